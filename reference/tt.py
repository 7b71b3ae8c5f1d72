"""Pure-PyTorch reference for the tensor-train (TT-matrix) layers: the maths every TT kernel must match.

A TT matrix with ``d`` cores ``G_k`` shaped ``(r_{k-1}, O_k, I_k, r_k)`` (``r_0 = r_d = 1``; the
layout of tltorch's ``BlockTT``) is the ``(O, I)`` weight, ``O = prod O_k``, ``I = prod I_k``,

    W[(o_1, ..., o_d), (i_1, ..., i_d)] = G_1[:, o_1, i_1, :] @ G_2[:, o_2, i_2, :] @ ... @ G_d[:, o_d, i_d, :]

with row and column multi-indices in row-major order (``o_1`` slowest), as tltorch's ``to_matrix()``.

y = x @ W.T is computed by sequential contraction, never forming W. Step k (1-based) maps the
state ``U_k`` laid out ``(M, O_<k, r_{k-1}, I_k, I_>k)`` to ``U_{k+1}`` laid out
``(M, O_<k, O_k, r_k, I_>k)``: with ``B = M O_<k`` and ``C = I_>k`` it is the batched product
``U_{k+1}[b, :, c] = A_k @ U_k[b, :, c]``, ``A_k[(o, b), (a, i)] = G_k[a, o, i, b]`` (``(O_k r_k, r_{k-1} I_k)``).
``U_1`` is x and ``U_{d+1}`` is y; no step copies its state. Backward, right to left with
``V_{d+1} = dy``: ``dA_k = sum_{b, c} V_{k+1}[b, :, c] U_k[b, :, c].T`` and ``V_k[b] = A_k.T @ V_{k+1}[b]``;
``V_1`` is dx. Both run on the cores with the last two merged where ``merged_modes`` says so.
The Triton "contract" kernels use the same layout.
"""

from __future__ import annotations

import math

import torch

from .common import compute_dtype

__all__ = [
    "modes_of", "step_matrix", "tt_weight", "tt_linear", "tt_grad", "tt_norm_sq",
    "head_product", "head_product_grad", "merged_modes", "merge_cores", "merge_cores_grad",
]


def modes_of(cores: list[torch.Tensor]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(in_modes, out_modes, ranks)`` of a list of cores ``(r_{k-1}, O_k, I_k, r_k)``."""
    in_modes = tuple(c.shape[2] for c in cores)
    out_modes = tuple(c.shape[1] for c in cores)
    ranks = (cores[0].shape[0],) + tuple(c.shape[3] for c in cores)
    return in_modes, out_modes, ranks


def step_matrix(core: torch.Tensor) -> torch.Tensor:
    """``A[(o, b), (a, i)] = G[a, o, i, b]``: the ``(O_k r_k, r_{k-1} I_k)`` matrix of one step."""
    r0, o, i, r1 = core.shape
    return core.permute(1, 3, 0, 2).reshape(o * r1, r0 * i)


def tt_weight(cores: list[torch.Tensor]) -> torch.Tensor:
    """Dense ``(O, I)`` weight in the cores' compute dtype (tests and export only)."""
    cd = compute_dtype(cores[0])
    w = cores[0].to(cd)[0]  # (O_1, I_1, r_1)
    for core in cores[1:]:
        x, y, _ = w.shape
        _, o, i, b = core.shape
        w = torch.einsum("xya,aoib->xoyib", w, core.to(cd)).reshape(x * o, y * i, b)
    return w[..., 0]


def _step(a: torch.Tensor, u: torch.Tensor, b: int, c: int) -> torch.Tensor:
    """``out[b, :, c] = a @ u[b, :, c]`` for the flat state u ``(b, J, c)``; returns ``(b, P * c)``."""
    if c == 1:
        return u.reshape(b, -1) @ a.T
    if c < 16:  # batches of skinny products are slow: one GEMM on a permuted copy instead
        return torch.einsum("pj,bjc->bpc", a, u.reshape(b, -1, c)).reshape(b, -1)
    return torch.matmul(a, u.reshape(b, -1, c)).reshape(b, -1)


def _reduce(v: torch.Tensor, u: torch.Tensor, b: int, c: int) -> torch.Tensor:
    """``sum_{b, c} v[b, :, c] u[b, :, c].T`` for flat states v ``(b, P, c)``, u ``(b, J, c)``: ``(P, J)``."""
    if c == 1:
        return v.reshape(b, -1).T @ u.reshape(b, -1)
    v3, u3 = v.reshape(b, -1, c), u.reshape(b, -1, c)
    p, j = v3.shape[1], u3.shape[1]
    if p * j <= (p + j) * c:  # a (b, P, J) product is smaller than the copies a flat GEMM needs
        return torch.bmm(v3, u3.transpose(1, 2)).sum(0)
    return torch.einsum("bpc,bjc->pj", v3, u3)


def _states(x: torch.Tensor, cores: list[torch.Tensor], in_modes: tuple[int, ...]) -> list[torch.Tensor]:
    """``[U_1 = x, U_2, ...]`` after each of ``cores``, each flat ``(M, -1)``."""
    m = x.shape[0]
    states = [x]
    o_done = 1
    for k, core in enumerate(cores):
        out = _step(step_matrix(core), states[-1], m * o_done, math.prod(in_modes[k + 1:]))
        states.append(out.reshape(m, -1))
        o_done *= core.shape[1]
    return states


def merged_modes(in_modes: tuple[int, ...], out_modes: tuple[int, ...], ranks: tuple[int, ...]
                 ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(in_modes, out_modes, ranks)`` that the reference contracts: the last two cores merged
    into one when d >= 3, the merged core is no larger than 1/8 of W, and O_d < 2 r_{d-1}. Then the
    merged last step is one plain GEMM with fewer FLOPs than the two steps it replaces, and the
    backward need not recompute U_d. Otherwise the modes unchanged."""
    merged = ranks[-3] * out_modes[-2] * out_modes[-1] * in_modes[-2] * in_modes[-1] if len(out_modes) >= 3 else 0
    if not merged or 8 * merged > math.prod(out_modes) * math.prod(in_modes) or out_modes[-1] >= 2 * ranks[-2]:
        return in_modes, out_modes, ranks
    return (in_modes[:-2] + (in_modes[-2] * in_modes[-1],), out_modes[:-2] + (out_modes[-2] * out_modes[-1],),
            ranks[:-2] + (1,))


def merge_cores(cores: list[torch.Tensor]) -> torch.Tensor:
    """One core ``(r_0, prod O_k, prod I_k, r_d)`` equal to the TT product of ``cores`` (each merged
    mode index row-major, the first core's most significant, as in W's rows and columns)."""
    out = cores[0]
    for c in cores[1:]:
        r0, o, i, _ = out.shape
        out = torch.einsum("aoib,bpjc->aopijc", out, c).reshape(r0, o * c.shape[1], i * c.shape[2], c.shape[3])
    return out


def merge_cores_grad(cores: list[torch.Tensor], d_merged: torch.Tensor) -> list[torch.Tensor]:
    """``[dG_k]`` of sum(d_merged * merge_cores(cores)), each in its core's shape and d_merged's
    dtype (the cores are cast to it): d_merged contracted with the merge of the cores before core k
    and of those after it."""
    r0, _, _, r1 = d_merged.shape
    cores = [c.to(d_merged.dtype) for c in cores]
    grads = []
    for k, core in enumerate(cores):
        left = merge_cores(cores[:k]) if k else None  # (r0, O_<k, I_<k, r_{k-1})
        right = merge_cores(cores[k + 1:]) if k + 1 < len(cores) else None  # (r_k, O_>k, I_>k, r1)
        o_l, i_l = (left.shape[1], left.shape[2]) if k else (1, 1)
        o_r, i_r = (right.shape[1], right.shape[2]) if right is not None else (1, 1)
        dm = d_merged.reshape(r0, o_l, core.shape[1], o_r, i_l, core.shape[2], i_r, r1)
        # x: r0, p/s: O_<k/I_<k, o/i: core k's modes, q/t: O_>k/I_>k, z: r1
        terms, operands = ["xpoqsitz"], [dm]
        if left is not None:
            terms.append("xpsa")
            operands.append(left)
        if right is not None:
            terms.append("bqtz")
            operands.append(right)
        out = ("a" if left is not None else "x") + "oi" + ("b" if right is not None else "z")
        grads.append(torch.einsum(",".join(terms) + "->" + out, *operands))
    return grads


def _merge_last(cores: list[torch.Tensor]) -> list[torch.Tensor]:
    """The same TT matrix with the last two cores merged, ``(r_{d-2}, O_{d-1} O_d, I_{d-1} I_d, 1)``,
    where ``merged_modes`` merges them; otherwise ``cores`` unchanged."""
    if len(merged_modes(*modes_of(cores))[0]) == len(cores):
        return cores
    a, b = cores[-2:]
    # stored as its step matrix ((o', o, c), (a, i', i)), so that step_matrix() needs no copy
    merged = torch.einsum("axjb,boic->xocaji", a, b).reshape(
        a.shape[1] * b.shape[1], b.shape[3], a.shape[0], a.shape[2] * b.shape[2])
    return cores[:-2] + [merged.permute(2, 0, 3, 1)]


def tt_linear(x: torch.Tensor, cores: list[torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W.T + bias for x ``(*, I)`` -> ``(*, O)`` by sequential contraction (W never formed;
    the last two cores merged where ``merged_modes`` says so)."""
    cd = compute_dtype(x)
    in_modes, out_modes, _ = modes_of(cores)
    n_out, n_in = math.prod(out_modes), math.prod(in_modes)
    t = x.reshape(-1, n_in).to(cd)
    cores = _merge_last([c.to(cd) for c in cores])
    y = _states(t, cores, modes_of(cores)[0])[-1] if t.shape[0] else t.new_zeros(0, n_out)
    if bias is not None:
        y = y + bias.to(cd)
    return y.reshape(*x.shape[:-1], n_out).to(x.dtype)


def tt_grad(dy: torch.Tensor, x: torch.Tensor, cores: list[torch.Tensor], need_dx: bool) -> list[torch.Tensor]:
    """Gradients of sum(dy * (x @ W.T)): ``[dG_1, ..., dG_d]`` in the compute dtype, then
    ``dx = dy @ W`` (x's shape and dtype) if ``need_dx``. dy ``(*, O)``, x ``(*, I)``.

    The forward states U_1..U_d are recomputed (not saved: each is r x the activations); then,
    right to left, dA_k from (V_{k+1}, U_k) and V_k = A_k.T V_{k+1}; V_1 is dx. Where ``merged_modes``
    merges the last two cores this runs on the cores with the last two merged, and the merged core's gradient is
    split back into dG_{d-1} and dG_d.
    """
    cd = compute_dtype(dy)
    g = [c.to(cd) for c in cores]
    merged = _merge_last(g)
    m = dy.numel() // dy.shape[-1]
    if m == 0:
        grads = [torch.zeros(c.shape, dtype=cd, device=dy.device) for c in cores]
        return grads + ([x.new_zeros(x.shape)] if need_dx else [])
    grads, dx = _sweep(dy.reshape(m, -1).to(cd), x.reshape(m, -1).to(cd), merged, need_dx)
    if len(merged) < len(g):
        a, b = g[-2:]
        dm = grads.pop().reshape(a.shape[0], a.shape[1], b.shape[1], a.shape[2], b.shape[2], b.shape[3])
        grads += [torch.einsum("axojic,boic->axjb", dm, b), torch.einsum("axojic,axjb->boic", dm, a)]
    return [t.contiguous() for t in grads] + ([dx.reshape(x.shape).to(x.dtype)] if need_dx else [])


def _sweep(dy: torch.Tensor, x: torch.Tensor, cores: list[torch.Tensor], need_dx: bool
           ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """(``[dG_k]``, dx or None) for flat dy ``(M, O)`` and x ``(M, I)`` in the compute dtype."""
    in_modes, out_modes, _ = modes_of(cores)
    m, d = x.shape[0], len(cores)
    states = _states(x, cores[:-1], in_modes)  # U_1 .. U_d
    v = dy
    grads: list[torch.Tensor] = [None] * d  # type: ignore[list-item]
    for k in range(d - 1, -1, -1):
        r0, o, i, r1 = cores[k].shape
        b, c = m * math.prod(out_modes[:k]), math.prod(in_modes[k + 1:])
        da = _reduce(v, states[k], b, c)  # (o r1, r0 i)
        grads[k] = da.reshape(o, r1, r0, i).permute(2, 0, 3, 1)
        if k > 0 or need_dx:
            v = _step(step_matrix(cores[k]).T, v, b, c).reshape(m, -1)
    return grads, v if need_dx else None


def tt_norm_sq(cores: list[torch.Tensor]) -> torch.Tensor:
    """||W||_F^2 without forming W: Z_k = sum_{o,i} G_k[:, o, i, :].T Z_{k-1} G_k[:, o, i, :]."""
    cd = compute_dtype(cores[0])
    z = torch.ones(1, 1, dtype=cd, device=cores[0].device)
    for core in cores:
        c = core.to(cd)
        z = torch.einsum("ab,aoic,boid->cd", z, c, c)
    return z[0, 0]


def head_product(cores: list[torch.Tensor]) -> torch.Tensor:
    """L ``(O_1..O_{d-1}, I_1..I_{d-1}, r_{d-1})``, the product of all cores but the last, so that
    W[(o_h, o_d), (i_h, i_d)] = sum_r L[o_h, i_h, r] G_d[r, o_d, i_d, 0]. Compute dtype."""
    cd = compute_dtype(cores[0])
    h = cores[0].to(cd)[0]
    for core in cores[1:-1]:
        x, y, _ = h.shape
        _, o, i, b = core.shape
        h = torch.einsum("xya,aoib->xoyib", h, core.to(cd)).reshape(x * o, y * i, b)
    return h


def head_product_grad(cores: list[torch.Tensor], d_head: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of the first ``d - 1`` cores given the gradient of ``head_product(cores)``."""
    cd = compute_dtype(d_head)
    g = [c.to(cd) for c in cores[:-1]]
    partial = [g[0][0]]  # L_1 .. L_{d-2}
    for core in g[1:-1]:
        x, y, _ = partial[-1].shape
        _, o, i, b = core.shape
        partial.append(torch.einsum("xya,aoib->xoyib", partial[-1], core).reshape(x * o, y * i, b))
    grads: list[torch.Tensor] = [None] * len(g)  # type: ignore[list-item]
    dh = d_head.to(cd)
    for k in range(len(g) - 1, 0, -1):
        _, o, i, b = g[k].shape
        x, y, _ = partial[k - 1].shape
        dh5 = dh.reshape(x, o, y, i, b)
        grads[k] = torch.einsum("xya,xoyib->aoib", partial[k - 1], dh5)
        dh = torch.einsum("xoyib,aoib->xya", dh5, g[k])
    grads[0] = dh[None]
    return [g.contiguous() for g in grads]
