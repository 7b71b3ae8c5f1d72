"""Pure-PyTorch reference for the Kronecker (NdLinear-style) layer: the maths every kernel must match.

Layout. KroneckerLinear is an ``nn.Linear`` drop-in: x ``(*, n)`` with n = prod(in_dims), the
feature index the row-major flattening of the mode indices, f = ((i_1 * n_2 + i_2) * n_3 + ...).
NdLinear takes the same data as ``(batch, *in_dims)``: ``x.reshape(-1, *in_dims)``.

NdLinear (``ndlinear.NdLinear``, v1.0.0). Mode k has an ``nn.Linear(in_k, out_k)``: weight A_k
``(out_k, in_k)``, bias b_k ``(out_k,)``. The modes are applied one after the other, in the order
1, ..., N (``transform_outer=True``) or N, ..., 1 (``transform_outer=False``); applying mode k
moves axis k last, runs the linear layer on every fibre, and moves it back:
    X <- A_k x_k X + b_k (b_k broadcast along every axis but k),
with x_k the mode-k product. The maps act on different axes, so they commute and the whole layer
is affine: y = (A_1 (x) ... (x) A_N) x + b_eff, W = A_1 (x) ... (x) A_N of shape
``(prod out_dims, prod in_dims)``. Only the biases feel the order: b_k is later multiplied by
the row sums A_j 1 of the modes j applied after it and is constant along the modes applied
before it, b_eff = sum_k (x)_{j before k} 1_{out_j} (x) b_k (x)_{j after k} A_j 1_{in_j}
(modes in axis order). ``kronecker_bias`` computes it by running the layer on x = 0.

Gated layer (NdLinearGated, from the NdLinear repository; not in the ``ndlinear`` 1.0.0 wheel).
Each gated mode k has a gate network Linear(in_k, h) -> ReLU -> Linear(h, 1) -> Sigmoid applied to
the mean of all mode-k fibres of the current tensor over the whole batch (one scalar g_k per
call, shared by every sample), and an identity path P_k: the identity when in_k = out_k, else a
second Linear(in_k, out_k) (weight P_k, bias p_k). Soft gating mixes the two paths:
    X <- g_k (A_k x_k X + b_k) + (1 - g_k) (P_k x_k X + p_k),
i.e. mode k with factor g_k A_k + (1 - g_k) P_k and bias g_k b_k + (1 - g_k) p_k; hard gating
takes the transform path when g_k > 0.5, else the identity path. Averages commute with the
affine maps, so the fibre mean seen by mode k is the mean over the other axes of the layers
before k applied to the batch mean of x: ``gated_modes`` finds every gate from that one
"sample", and the layer is then the plain Kronecker layer with the mixed factors and biases.
For two modes ``gated_maps`` gives the mixed factors and the effective bias of the two-factor op
below from x and the parameters, and ``kronecker_gated_linear`` applies them: the gated op.

Fused op. For two modes, y[b] = A X[b] B.T + bias with X[b] = x[b].reshape(n_1, n_2):
``kronecker_linear(x, a, b, bias)``; its input gradient is the same op with (A.T, B.T). More modes
are grouped into two (``kron_factors`` of each group). Every reference computes in fp32 (fp64
for fp64 inputs) and never forms the dense weight, except ``kronecker_weight`` (its definition).

Nearest Kronecker product (Van Loan & Pitsianis): with R(W)[(o_1, i_1), (o_2, i_2)] =
W[(o_1, o_2), (i_1, i_2)], ||W - A (x) B||_F = ||R(W) - vec(A) vec(B).T||_F, so the rank-1 SVD of
R(W) gives the optimum and the residual sqrt(sum_{i >= 2} s_i^2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .common import compute_dtype

__all__ = [
    "effective_bias",
    "gate_paths",
    "gated_maps",
    "gated_modes",
    "kronecker_gated_linear",
    "kron_factors",
    "kronecker_bias",
    "kronecker_grad_factors",
    "kronecker_linear",
    "kronecker_weight",
    "mode_product",
    "ndlinear_forward",
    "nearest_kronecker",
    "rearrange",
]

# Gate network of one mode: (w1 (h, in_k), b1 (h,), w2 (1, h), b2 (1,)).
Gate = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
# Identity path of one mode: None (in_k == out_k) or the projection (weight (out_k, in_k), bias (out_k,)).
Projection = tuple[torch.Tensor, torch.Tensor] | None


def mode_product(t: torch.Tensor, a: torch.Tensor, axis: int) -> torch.Tensor:
    """t with ``a`` ``(out, in)`` applied along ``axis`` (of size in): the mode product a x_axis t."""
    return torch.movedim(torch.movedim(t, axis, -1) @ a.mT, -1, axis)


def _order(n_modes: int, transform_outer: bool) -> range:
    return range(n_modes) if transform_outer else range(n_modes - 1, -1, -1)


def _add_along(t: torch.Tensor, v: torch.Tensor, axis: int) -> torch.Tensor:
    """t + v broadcast along every axis but ``axis`` (counted from the end)."""
    return t + v.reshape(v.shape[0], *([1] * (-axis - 1)))


def ndlinear_forward(x: torch.Tensor, factors: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None,
                     transform_outer: bool = True) -> torch.Tensor:
    """NdLinear's definition, mode by mode: x ``(batch, *in_dims)`` -> ``(batch, *out_dims)`` in x's dtype."""
    cd = compute_dtype(x)
    n = len(factors)
    t = x.to(cd)
    for k in _order(n, transform_outer):
        t = mode_product(t, factors[k].to(cd), k - n)
        if biases is not None:
            t = _add_along(t, biases[k].to(cd), k - n)
    return t.to(x.dtype)


def kron_factors(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A_1 (x) ... (x) A_N ``(prod out_k, prod in_k)`` for a non-empty list, row-major mode indices."""
    out = factors[0]
    for f in factors[1:]:
        # the outer product reshaped, not torch.kron: kron raises a view error for a non-contiguous
        # (e.g. transposed) operand
        (m1, n1), (m2, n2) = out.shape, f.shape
        out = (out[:, None, :, None] * f[None, :, None, :]).reshape(m1 * m2, n1 * n2)
    return out


def kronecker_weight(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The dense weight ``(prod out_dims, prod in_dims)`` in the compute dtype (the definition)."""
    cd = compute_dtype(factors[0])
    return kron_factors([f.to(cd) for f in factors])


def kronecker_bias(factors: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                   transform_outer: bool = True) -> torch.Tensor:
    """b_eff ``(prod out_dims,)``: the layer's output at x = 0, in the compute dtype."""
    cd = compute_dtype(factors[0])
    zero = factors[0].new_zeros(1, *(f.shape[1] for f in factors), dtype=cd)
    return ndlinear_forward(zero, factors, biases, transform_outer).reshape(-1)


def effective_bias(factors: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                   transform_outer: bool = True) -> torch.Tensor:
    """``kronecker_bias`` (the layer's output at x = 0, ``(prod out_dims,)`` in the compute dtype) in
    closed form, a few vector ops instead of NdLinear's chain of mode products on a zero input (a
    dozen ops forward and as many backward on every training call). Bias k, added after mode k's
    map, is constant along every other mode; each mode j mapped after it turns that constant into
    the row sums A_j 1. So b_eff = sum_k (x)_j v_kj with v_kk = b_k, v_kj = A_j 1 for the modes
    mapped after k and 1 for those mapped before (row-major mode order)."""
    cd = compute_dtype(factors[0])
    n = len(factors)
    order = list(range(n)) if transform_outer else list(range(n - 1, -1, -1))

    def along(v: torch.Tensor, mode: int) -> torch.Tensor:
        return v.reshape([-1 if j == mode else 1 for j in range(n)])

    row_sums = {j: along(factors[j].sum(1, dtype=cd), j) for j in order[1:]}
    total = None
    for pos, k in enumerate(order):
        term = along(biases[k].to(cd), k)
        for j in order[pos + 1:]:
            term = term * row_sums[j]
        total = term if total is None else total + term
    return total.expand([f.shape[0] for f in factors]).reshape(-1)


def gated_modes(
    x_mean: torch.Tensor, factors: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
    gates: Sequence[Gate | None], projections: Sequence[Projection], hard: bool, transform_outer: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The mixed factors and biases of the gated layer for one batch, in the compute dtype.

    x_mean ``in_dims``: the batch mean of the input; ``gates[k]`` None leaves mode k ungated.
    Returns (factors, biases) such that the plain Kronecker layer built from them equals the
    gated layer on that batch (see the module docstring).
    """
    cd = compute_dtype(x_mean)
    n = len(factors)
    t = x_mean.to(cd)
    mixed_f = [f.to(cd) for f in factors]
    mixed_b = [b.to(cd) for b in biases]
    for k in _order(n, transform_outer):
        axis = k - n
        if gates[k] is not None:
            w1, b1, w2, b2 = (p.to(cd) for p in gates[k])
            fibre_mean = torch.movedim(t, axis, -1).reshape(-1, t.shape[axis]).mean(0)
            g = torch.sigmoid(w2 @ torch.relu(w1 @ fibre_mean + b1) + b2).reshape(())
            if hard:
                g = (g > 0.5).to(cd)
            if projections[k] is None:
                p_w, p_b = torch.eye(factors[k].shape[0], dtype=cd, device=t.device), None
            else:
                p_w, p_b = (p.to(cd) for p in projections[k])
            mixed_f[k] = g * mixed_f[k] + (1 - g) * p_w
            mixed_b[k] = g * mixed_b[k] + (0 if p_b is None else (1 - g) * p_b)
        t = _add_along(mode_product(t, mixed_f[k], axis), mixed_b[k], axis)
    return mixed_f, mixed_b


def gate_paths(*tensors: torch.Tensor | None) -> tuple[list[Gate | None], list[Projection]]:
    """``gated_maps``'s per-mode tensors (w1, b1, w2, b2, p, pb for each of the two modes) grouped
    as ``gated_modes`` takes them; a gate's four tensors and a projection's two come together."""
    gates, projections = [], []
    for k in (0, 1):
        w1, b1, w2, b2, p, pb = tensors[6 * k:6 * k + 6]
        if (b1 is None, w2 is None, b2 is None) != (w1 is None,) * 3:
            raise ValueError(f"mode {k}'s gate network (w1, b1, w2, b2) needs all its tensors or none")
        if (pb is None) != (p is None):
            raise ValueError(f"mode {k}'s projection (p, pb) needs both tensors or none")
        gates.append(None if w1 is None else (w1, b1, w2, b2))
        projections.append(None if p is None else (p, pb))
    return gates, projections


def gated_maps(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias_a: torch.Tensor | None, bias_b: torch.Tensor | None,
    w1_a: torch.Tensor | None, b1_a: torch.Tensor | None, w2_a: torch.Tensor | None, b2_a: torch.Tensor | None,
    p_a: torch.Tensor | None, pb_a: torch.Tensor | None,
    w1_b: torch.Tensor | None, b1_b: torch.Tensor | None, w2_b: torch.Tensor | None, b2_b: torch.Tensor | None,
    p_b: torch.Tensor | None, pb_b: torch.Tensor | None, hard: bool, transform_outer: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two-mode gated layer's (A', B', b_eff) for the batch x, in x's dtype: the mixed factors
    ``(m_1, n_1)``, ``(m_2, n_2)`` and the effective bias ``(m_1 m_2,)`` with which
    ``kronecker_linear(x, A', B', b_eff)`` is the gated layer's output.

    x ``(*, n_1 n_2)``; a, b the factors; bias_a, bias_b their biases (None: zero). Per mode
    (suffix _a for the first, _b for the second) the gate network w1 ``(h, n_k)``, b1 ``(h,)``, w2
    ``(1, h)``, b2 ``(1,)`` (all None: the mode is not gated) and the identity path's projection
    p ``(m_k, n_k)`` with bias pb ``(m_k,)`` (both None: the identity, m_k = n_k). The gates read
    the batch mean of x (zeros for an empty batch); see the module docstring."""
    gates, projections = gate_paths(w1_a, b1_a, w2_a, b2_a, p_a, pb_a, w1_b, b1_b, w2_b, b2_b, p_b, pb_b)
    cd = compute_dtype(x)
    rows = x.reshape(-1, x.shape[-1])
    x_mean = (rows.sum(0, dtype=cd) / max(rows.shape[0], 1)).reshape(a.shape[1], b.shape[1])
    biases = [f.new_zeros(f.shape[0]) if c is None else c for f, c in ((a, bias_a), (b, bias_b))]
    factors, mixed_b = gated_modes(x_mean, [a, b], biases, gates, projections, hard, transform_outer)
    bias = effective_bias(factors, mixed_b, transform_outer)
    return factors[0].to(x.dtype), factors[1].to(x.dtype), bias.to(x.dtype)


def kronecker_gated_linear(x: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two-mode gated layer: (y ``(*, m_1 m_2)`` in x's dtype = ``kronecker_linear`` with the
    maps ``gated_maps(x, *args)`` (same arguments), A', B'): the mixed factors too, which the
    op's backward reuses."""
    a, b, bias = gated_maps(x, *args)
    return kronecker_linear(x, a, b, bias), a, b


def kronecker_linear(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y[r] = A X[r] B.T + bias, X[r] = x[r].reshape(n_1, n_2): x ``(*, n_1 n_2)``, a ``(m_1, n_1)``,
    b ``(m_2, n_2)``, bias ``(m_1 m_2,)`` -> y ``(*, m_1 m_2)`` in x's dtype."""
    cd = compute_dtype(x)
    (m1, n1), (m2, n2) = a.shape, b.shape
    xs = x.to(cd).reshape(-1, n1, n2)
    u = (xs.reshape(-1, n2) @ b.to(cd).mT).reshape(-1, n1, m2)  # X B.T as one GEMM over all rows
    y = torch.matmul(a.to(cd), u).reshape(*x.shape[:-1], m1 * m2)
    if bias is not None:
        y = y + bias.to(cd)
    return y.to(x.dtype)


def kronecker_grad_factors(
    x: torch.Tensor, dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum_r dY[r] B X[r].T ``(m_1, n_1)``, sum_r dY[r].T A X[r] ``(m_2, n_2)``, dy summed over rows
    ``(m_1 m_2,)``) in the compute dtype, returned in ``dtype``: dL/da, dL/db and dL/dbias of
    ``kronecker_linear``."""
    cd = compute_dtype(x)
    (m1, n1), (m2, n2) = a.shape, b.shape
    xs = x.to(cd).reshape(-1, n1, n2)
    gs = dy.to(cd).reshape(-1, m1, m2)
    # Layouts chosen so that no operand is permuted into a copy (2-3x faster on CPU than einsum):
    # db = sum_{r,p} dY[r, p, :].T (A X[r])[p, :] is one GEMM; da = sum_r dY[r] (X[r] B.T).T a bmm.
    ax = torch.matmul(a.to(cd), xs)
    db = gs.reshape(-1, m2).mT @ ax.reshape(-1, n2)
    xb = (xs.reshape(-1, n2) @ b.to(cd).mT).reshape(-1, n1, m2)
    da = torch.bmm(gs, xb.mT).sum(0)
    return da.to(dtype), db.to(dtype), gs.sum(0).reshape(-1).to(dtype)


def rearrange(w: torch.Tensor, out_dims: tuple[int, int], in_dims: tuple[int, int]) -> torch.Tensor:
    """Van Loan-Pitsianis R(W) ``(m_1 n_1, m_2 n_2)`` of W ``(m_1 m_2, n_1 n_2)``: R(A (x) B) = vec(A) vec(B).T."""
    (m1, m2), (n1, n2) = out_dims, in_dims
    return w.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def nearest_kronecker(
    w: torch.Tensor, out_dims: tuple[int, int], in_dims: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A ``(m_1, n_1)``, B ``(m_2, n_2)``, singular values of R(W)) minimising ||W - A (x) B||_F, in
    fp64; the residual is ``s[1:].norm()``. The singular value is split evenly: ||A||_F = ||B||_F."""
    u, s, vh = torch.linalg.svd(rearrange(w.double(), out_dims, in_dims), full_matrices=False)
    root = s[0].sqrt()
    return (root * u[:, 0]).reshape(out_dims[0], in_dims[0]), (root * vh[0]).reshape(out_dims[1], in_dims[1]), s
