"""Pure-PyTorch reference for the spline layers: the maths every spline kernel must match.

Weight W[o, i] (shape ``(n_out, n_in)``) sits at ``(x_i, y_o) = (linspace(-1, 1, n_in)[i],
linspace(-1, 1, n_out)[o])``.

Separable bases (W = Bo @ C @ Bi.T, ``C`` shaped ``(G_out, G_in)``):
  * ``BSPLINE``: clamped uniform cubic B-spline on [-1, 1] with ``G >= 4`` control points
    (knots: four at -1, ``G - 4`` uniform interior knots, four at +1).
  * ``BICUBIC``: ``grid_sample(mode="bicubic", padding_mode="border", align_corners=True)``:
    Keys cubic convolution (A = -0.75) with the four taps clamped to the grid.

Field bases (not separable): W = sum_k c_k phi_k / (sum_k phi_k + eps) over lattice points L_k,
d_k = |(x_i, y_o) - L_k|:
  * ``IDW`` (tensor-spline "eisenstein"): phi = 1 / (d^2 + 1e-6), eps = 0.
  * ``GAUSSIAN``: phi = exp(max(-d^2 / (2 sigma^2), -60)), eps = 1e-8 (the floor moves W by at most n e^-60 / 1e-8
    relative and keeps CPU arithmetic out of denormals, which made small bandwidths 3x slower).
    The layers' parameter is log_bandwidth: sigma = max(exp(log_bandwidth), 1e-3) (``gaussian_width``);
    the ops take log_bandwidth and apply that map themselves.
  * local support (``rho > 0``): phi is multiplied by the taper (1 - d^2 / rho^2)^2 for d < rho
    and is 0 beyond, so only lattice points within ``rho`` of a weight contribute.
"""

from __future__ import annotations

import functools
import math

import torch

from .common import bias_grad, compute_dtype

BSPLINE, BICUBIC = 0, 1
IDW, GAUSSIAN = 0, 1
IDW_EPS, GAUSSIAN_EPS = 1e-6, 1e-8
SIGMA_MIN = 1e-3  # the Gaussian's smallest width
EXP_FLOOR = -60.0  # exp(-60) ~ 1e-26: negligible next to GAUSSIAN_EPS, and keeps CPU math out of denormals
KEYS_A = -0.75

__all__ = [
    "BSPLINE", "BICUBIC", "IDW", "GAUSSIAN", "positions", "bspline_rows", "basis_matrix", "separable_weight",
    "control_grid", "grid_values", "input_projection", "separable_linear", "separable_levels",
    "separable_grad_control", "separable_backward", "eisenstein_lattice",
    "support_radius", "gaussian_width", "field_weight", "field_linear", "field_linear_backward",
]


def positions(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Coordinates of ``n`` weights along one axis: ``linspace(-1, 1, n)``."""
    return torch.linspace(-1.0, 1.0, n, dtype=dtype, device=device)


def bspline_rows(v: torch.Tensor, g: int, degree: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Cox-de Boor for clamped uniform B-splines (``g`` basis functions of ``degree``, cubic by
    default) at ``v`` in span units [0, g - degree].

    Returns the first nonzero basis index per point and the degree + 1 values, shaped (n,), (n, degree + 1).
    In span units the clamped knots are integers: U[j] = clamp(j - degree, 0, g - degree).
    """
    spans = g - degree
    # a NaN point takes span 0 (a valid index; its values stay NaN), as the kernels' clamp does
    s = torch.clamp(torch.nan_to_num(torch.floor(v), nan=0.0), 0, spans - 1)
    steps = range(1, degree + 1)
    left = [None] + [v - torch.clamp(s + 1 - j, 0, spans) for j in steps]
    right = [None] + [torch.clamp(s + j, 0, spans) - v for j in steps]
    n = [torch.ones_like(v)]
    for j in steps:
        saved = torch.zeros_like(v)
        for r in range(j):
            temp = n[r] / (right[r + 1] + left[j - r])
            n[r] = saved + right[r + 1] * temp
            saved = left[j - r] * temp
        n.append(saved)
    return s.long(), torch.stack(n, dim=1)


def _keys_rows(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys cubic convolution weights (A = -0.75) at fractional grid coordinate ``v``.

    Returns the tap before the cell (``floor(v) - 1``, unclamped) and the four weights.
    """
    i0 = torch.floor(v)
    t = v - i0

    def near(z):  # |z| <= 1
        return ((KEYS_A + 2) * z - (KEYS_A + 3)) * z * z + 1

    def far(z):  # 1 < |z| < 2
        return ((KEYS_A * z - 5 * KEYS_A) * z + 8 * KEYS_A) * z - 4 * KEYS_A

    return i0.long() - 1, torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=1)


def basis_matrix(n: int, g: int, kind: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Dense ``(n, g)`` basis matrix B with B[i, q] = basis function q at position x_i (on the CPU
    unless ``device`` is given: a default-device context must not leak into the cache). Cached,
    except while ``torch.export`` traces: the basis is then built in the graph (ONNX export keeps
    it as the few ops that make it) and no traced tensor enters the cache."""
    if torch.compiler.is_exporting():
        return _basis_matrix(n, g, kind, dtype, device)
    return _cached_basis_matrix(n, g, kind, dtype, device)


def _basis_matrix(n: int, g: int, kind: int, dtype: torch.dtype, device) -> torch.Tensor:
    device = torch.device("cpu") if device is None else device
    if kind == BSPLINE:
        if g < 4:
            raise ValueError(f"a cubic B-spline grid needs at least 4 control points per axis, got {g}")
        v = (positions(n, torch.float64, device) + 1) / 2 * (g - 3)
        first, w = bspline_rows(v, g)
        cols = first[:, None] + torch.arange(4, device=device)
    elif kind == BICUBIC:
        # grid_sample's own arithmetic, in fp32, so the cell boundaries match it exactly.
        v = ((positions(n, torch.float32, device) + 1) / 2 * (g - 1)).double()
        first, w = _keys_rows(v)
        cols = torch.clamp(first[:, None] + torch.arange(4, device=device), 0, g - 1)
    else:
        raise ValueError(f"unknown separable basis kind {kind}")
    b = torch.zeros(n, g, dtype=torch.float64, device=device)
    b.scatter_add_(1, cols, w)
    return b.to(dtype)


_cached_basis_matrix = functools.lru_cache(maxsize=64)(_basis_matrix)


def control_grid(control: torch.Tensor) -> torch.Tensor:
    """A separable layer's control grid ``(G_out, G_in)``: a grid as given, or a bicubic layer's n
    control values ``(n,)`` as the K x K grid, K = ceil(sqrt(n)), filled row by row and zero-padded
    (a view where n is square)."""
    if control.dim() == 2:
        return control
    n = control.shape[0]
    k = math.isqrt(n)
    k += k * k < n
    return (torch.nn.functional.pad(control, (0, k * k - n)) if k * k > n else control).view(k, k)


def grid_values(d_grid: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    """A gradient with respect to ``control_grid(control)`` as one with respect to ``control``."""
    if control.dim() == 2:
        return d_grid
    n = control.shape[0]
    return d_grid.view(n) if d_grid.numel() == n else d_grid.view(-1)[:n]


def separable_weight(control: torch.Tensor, n_out: int, n_in: int, kind: int) -> torch.Tensor:
    """Dense W = Bo @ C @ Bi.T, shape ``(n_out, n_in)``, in the control's compute dtype."""
    cd = compute_dtype(control)
    bo = basis_matrix(n_out, control.shape[0], kind, cd, control.device)
    bi = basis_matrix(n_in, control.shape[1], kind, cd, control.device)
    return bo @ control.to(cd) @ bi.T


def input_projection(x: torch.Tensor, g_in: int, kind: int) -> torch.Tensor:
    """x @ Bi, x on a level's ``g_in`` input basis functions: ``(*, n_in)`` -> ``(*, g_in)`` in the
    compute dtype. A level's output starts from it, and its grid's gradient ends with it."""
    cd = compute_dtype(x)
    return x.to(cd) @ basis_matrix(x.shape[-1], g_in, kind, cd, x.device)


def separable_linear(
    x: torch.Tensor, control: torch.Tensor, bias: torch.Tensor | None, out_features: int, kind: int,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = ((x @ Bi) @ C.T) @ Bo.T + bias + residual for x ``(*, n_in)``, C ``(G_out, G_in)``, residual
    (optional) ``(*, out_features)`` -> ``(*, out_features)``."""
    cd = compute_dtype(x)
    bo = basis_matrix(out_features, control.shape[0], kind, cd, x.device)
    y = (input_projection(x, control.shape[1], kind) @ control.to(cd).T) @ bo.T
    if bias is not None:
        y = y + bias.to(cd)
    if residual is not None:
        y = y + residual.to(cd)
    return y.to(x.dtype)


def separable_levels(x: torch.Tensor, controls: list[torch.Tensor], bias: torch.Tensor | None, out_features: int,
                     kind: int) -> torch.Tensor:
    """The sum of separable levels (a hierarchical layer's grids, coarse to fine) + bias: level k's
    output, in x's dtype, is level k + 1's ``residual`` (``separable_linear``), the bias is added by
    the last. x ``(*, n_in)``, controls ``[(G_out_k, G_in_k)]`` -> ``(*, out_features)``."""
    if not controls:
        raise ValueError("separable_levels needs at least one control grid")
    y = None
    for k, control in enumerate(controls):
        y = separable_linear(x, control, bias if k == len(controls) - 1 else None, out_features, kind, y)
    return y


def separable_grad_control(dy: torch.Tensor, xb: torch.Tensor, g_out: int, kind: int, dtype: torch.dtype) -> torch.Tensor:
    """dC = (dy @ Bo).T @ xb for the output gradient dy ``(*, n_out)`` and the input's projection xb
    ``(*, G_in)`` (``input_projection``), in the compute dtype, returned in ``dtype``."""
    cd = compute_dtype(dy)
    bo = basis_matrix(dy.shape[-1], g_out, kind, cd, dy.device)
    return ((dy.reshape(-1, dy.shape[-1]).to(cd) @ bo).T @ xb.reshape(-1, xb.shape[-1]).to(cd)).to(dtype)


def separable_backward(
    dy: torch.Tensor, x: torch.Tensor, controls: list[torch.Tensor], kind: int, need_dx: bool,
    need_controls: list[bool], bias_dtype: torch.dtype | None, u: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, list[torch.Tensor | None], torch.Tensor | None]:
    """Gradients of ``separable_levels(x, controls, bias, n_out, kind)`` for the output gradient dy
    ``(*, n_out)``: (dx = dy @ W in x's dtype, [dC_k in control k's dtype], d_bias ``(n_out,)`` in
    ``bias_dtype``), None where not wanted. W's levels transposed are the levels of W.T. ``u``: the
    levels' ``input_projection`` of x side by side ``(*, sum G_in_k)``, as the forward kept them;
    None: projected here."""
    dx = separable_levels(dy, [c.mT for c in controls], None, x.shape[-1], kind).to(x.dtype) if need_dx else None
    xbs = [None] * len(controls) if u is None else u.split([c.shape[1] for c in controls], -1)
    d_controls = [separable_grad_control(dy, input_projection(x, c.shape[1], kind) if xb is None else xb,
                                         c.shape[0], kind, c.dtype) if need else None
                  for c, need, xb in zip(controls, need_controls, xbs)]
    return dx, d_controls, None if bias_dtype is None else bias_grad(dy, bias_dtype)


def eisenstein_lattice(n: int) -> torch.Tensor:
    """The ``n`` Eisenstein integers a + b*omega nearest the origin as (x, y), shape ``(n, 2)``.

    Ties in distance are broken by (x, y); positions are scaled so the farthest has norm 1.
    Same point order as tensor-spline 1.0.0's ``EisensteinLattice``. A fresh CPU fp32 tensor.
    """
    return _eisenstein_lattice(n).clone()


@functools.lru_cache(maxsize=64)
def _eisenstein_lattice(n: int) -> torch.Tensor:
    if n < 1:
        raise ValueError(f"n_control_points must be >= 1, got {n}")
    r = max(math.ceil(math.sqrt(n / 3.0)) + 2, 3)
    half_sqrt3 = math.sqrt(3.0) / 2.0
    pts = [(float(a) - float(b) * 0.5, float(b) * half_sqrt3) for a in range(-r, r + 1) for b in range(-r, r + 1)]
    pts.sort(key=lambda p: (round(p[0] * p[0] + p[1] * p[1], 9), p[0], p[1]))
    lattice = torch.tensor(pts[:n], dtype=torch.float32, device="cpu")
    far = lattice.norm(dim=1).max()
    return lattice / far if far > 0 else lattice


def support_radius(lattice: torch.Tensor, min_points: int = 3) -> float:
    """Smallest taper radius (with margin) that gives every point of [-1, 1]^2 at least
    ``min_points`` lattice points strictly inside it.

    The distance to the k-th nearest point is 1-Lipschitz, so its maximum over a 257^2 grid plus
    half a grid diagonal bounds it on the whole square; the 1.25 factor keeps the k-th point's
    taper weight at least (1 - 0.8^2)^2 = 0.13.
    The grid is scanned in 64 x 64 tiles against only the lattice points that can be among a
    tile point's k nearest, so time and memory stay small for any n (the whole grid against every
    point took 2 GB and several seconds at n = 1024). Distances are plain differences (no matmul
    expansion), so they are exact to rounding.
    """
    lat = lattice.double()
    k = min(min_points, lat.shape[0])
    g = positions(257, torch.float64, lat.device)
    kth = 0.0
    for rows in g.split(64):
        for cols in g.split(64):
            tile = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
            centre = tile.mean(0)
            half = (tile - centre).norm(dim=1).max()
            from_centre = (lat - centre).norm(dim=1)
            # a tile point's k-th distance is at most the centre's plus half, so its k nearest lie
            # within the centre's k-th distance plus twice half of the centre
            near = lat[from_centre <= from_centre.kthvalue(k).values + 2 * half]
            dist = torch.cdist(tile, near, compute_mode="donot_use_mm_for_euclid_dist")
            kth = max(kth, dist.topk(k, dim=1, largest=False).values[:, -1].max().item())
    return 1.25 * (kth + (2 / 256) * math.sqrt(0.5))


def gaussian_width(log_bandwidth: torch.Tensor) -> torch.Tensor:
    """The Gaussian's sigma from its parameter: exp(log_bandwidth), at least ``SIGMA_MIN``."""
    return log_bandwidth.exp().clamp(min=SIGMA_MIN)


def _field_chunks(lattice, sigma, n_out, n_in, basis, rho, cd, device, budget=1 << 18):
    """Yield (row slice, phi, d2) over blocks of output rows; phi and d2 are ``(rows, n_in, n)``.

    Blocks hold about ``budget`` elements (cache-sized), so memory stays O(n_out n_in) for any n.
    """
    if basis not in (IDW, GAUSSIAN):
        raise ValueError(f"unknown field basis {basis}")
    lat = lattice.to(device=device, dtype=cd)
    dx2 = (positions(n_in, cd, device)[:, None] - lat[:, 0]) ** 2  # (n_in, n)
    dy2 = (positions(n_out, cd, device)[:, None] - lat[:, 1]) ** 2  # (n_out, n)
    if basis == GAUSSIAN:
        neg_inv = -0.5 / sigma.to(cd).reshape(()) ** 2
    rows = max(1, budget // max(n_in * lat.shape[0], 1))
    for r0 in range(0, n_out, rows):
        d2 = dy2[r0:r0 + rows, None, :] + dx2[None, :, :]
        phi = (d2 + IDW_EPS).reciprocal_() if basis == IDW else (d2 * neg_inv).clamp_(min=EXP_FLOOR).exp_()
        if rho > 0:  # out of place: autograd saved exp_'s output (phi depends on sigma)
            phi = phi * (1 - d2 / (rho * rho)).clamp_(min=0).square_()
        yield slice(r0, r0 + rows), phi, d2


def _normaliser(s: torch.Tensor, basis: int) -> torch.Tensor:
    return s + GAUSSIAN_EPS if basis == GAUSSIAN else s


def field_weight(
    control: torch.Tensor, lattice: torch.Tensor, sigma: torch.Tensor | None,
    n_out: int, n_in: int, basis: int, rho: float = 0.0, budget: int = 1 << 18,
) -> torch.Tensor:
    """Dense W ``(n_out, n_in)`` of a field basis, built in row blocks of about ``budget`` elements
    (cache-sized by default; ONNX export passes a larger one so the graph has fewer blocks)."""
    cd = compute_dtype(control)
    c = control.to(cd)
    w = torch.empty(n_out, n_in, dtype=cd, device=control.device)
    for rows, phi, _ in _field_chunks(lattice, sigma, n_out, n_in, basis, rho, cd, control.device, budget):
        w[rows] = (phi @ c) / _normaliser(phi.sum(-1), basis)
    return w


def field_linear(
    a: torch.Tensor, control: torch.Tensor, lattice: torch.Tensor, log_bandwidth: torch.Tensor | None,
    bias: torch.Tensor | None, n_out: int, n_in: int, basis: int, rho: float, transpose: bool,
    budget: int = 1 << 18,
) -> torch.Tensor:
    """``a @ W.T + bias`` for a ``(*, n_in)``, or ``a @ W + bias`` (``transpose``) for a ``(*, n_out)``;
    the Gaussian's sigma is ``gaussian_width(log_bandwidth)`` (``(1,)``; None for IDW); ``budget`` as
    in :func:`field_weight`."""
    cd = compute_dtype(a)
    sigma = None if log_bandwidth is None else gaussian_width(log_bandwidth.to(cd))
    w = field_weight(control.to(cd), lattice, sigma, n_out, n_in, basis, rho, budget)
    y = a.to(cd) @ (w if transpose else w.T)
    if bias is not None:
        y = y + bias.to(cd)
    return y.to(a.dtype)


def field_linear_backward(
    dy: torch.Tensor, a: torch.Tensor, control: torch.Tensor, lattice: torch.Tensor,
    log_bandwidth: torch.Tensor | None, n_out: int, n_in: int, basis: int, rho: float, transpose: bool,
    need_input: bool, need_params: bool, bias_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``field_linear`` from one pass over the generated weights.

    With G = dy.T @ a (or a.T @ dy when ``transpose``), shape ``(n_out, n_in)``, and S the normaliser:
    da = dy @ W (or dy @ W.T);  d c_k = sum G phi_k / S;
    d sigma = sum G sum_k (c_k - W) phi_k d_k^2 / (sigma^3 S)  (0 for IDW), computed centred: as
    sum_k phi_k (c_k - W) = num - W S = W eps is ~0, the inner sum is
    sum_k phi_k (c_k - W)(d_k^2 - D) + W eps D with D = sum_k phi_k d_k^2 / S, a covariance that
    does not cancel as the plain sum does (fp32 lost ~10x more of it); and through
    sigma = max(e, SIGMA_MIN), e = exp(log_bandwidth): d log_bandwidth = d sigma * e where
    e >= SIGMA_MIN, else 0 (the clamp's gradient).
    Returns ``(da like a, d_params (n + 1,), d_bias (n,))``, d_params the concatenation of d_control
    and d_log_bandwidth in control's dtype, d_bias dy's row sum in ``bias_dtype``; unrequested ones
    (``bias_dtype`` None: no d_bias) are empty tensors.
    """
    cd = compute_dtype(dy)
    e = None if log_bandwidth is None else log_bandwidth.to(cd).exp()
    sigma = None if e is None else e.clamp(min=SIGMA_MIN)
    dy2 = dy.reshape(-1, dy.shape[-1]).to(cd)
    a2 = a.reshape(-1, a.shape[-1]).to(cd)
    c = control.to(cd)
    da = torch.zeros(a2.shape, dtype=cd, device=dy.device) if need_input else a2.new_empty(0)
    d_control = torch.zeros_like(c) if need_params else c.new_empty(0)
    d_sigma = torch.zeros(1, dtype=cd, device=dy.device) if need_params else c.new_empty(0)
    g = (a2.T @ dy2 if transpose else dy2.T @ a2) if need_params else None
    for rows, phi, d2 in _field_chunks(lattice, sigma, n_out, n_in, basis, rho, cd, dy.device):
        den = _normaliser(phi.sum(-1), basis)
        w = (phi @ c) / den
        if need_input:
            if transpose:  # out = a @ W: da[:, rows] = dy @ W[rows].T
                da[:, rows] = dy2 @ w.T
            else:  # out = a @ W.T: da += dy[:, rows] @ W[rows]
                da += dy2[:, rows] @ w
        if need_params:
            h = g[rows] / den
            d_control += torch.einsum("oi,oik->k", h, phi)
            if basis == GAUSSIAN:  # centred (see the docstring)
                mean = (phi * d2).sum(-1) / den
                d_sigma += torch.einsum("oi,oik->", h, (c - w[..., None]) * phi * (d2 - mean[..., None]))
                d_sigma += (h * mean * w).sum() * GAUSSIAN_EPS
    d_log_bandwidth = d_sigma
    if need_params and basis == GAUSSIAN:
        d_log_bandwidth = d_sigma / sigma.reshape(()) ** 3 * torch.where(e >= SIGMA_MIN, e, 0)
    d_params = torch.cat([d_control, d_log_bandwidth]).to(control.dtype) if need_params else control.new_empty(0)
    d_bias = dy.new_empty(0) if bias_dtype is None else bias_grad(dy, bias_dtype)
    return da.reshape(a.shape).to(a.dtype) if need_input else da, d_params, d_bias
