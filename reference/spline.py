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
  * ``GAUSSIAN``: phi = exp(-d^2 / (2 sigma^2)), eps = 1e-8.
  * local support (``rho > 0``): phi is multiplied by the taper (1 - d^2 / rho^2)^2 for d < rho
    and is 0 beyond, so only lattice points within ``rho`` of a weight contribute.
"""

from __future__ import annotations

import functools
import math

import torch

from .common import compute_dtype

BSPLINE, BICUBIC = 0, 1
IDW, GAUSSIAN = 0, 1
IDW_EPS, GAUSSIAN_EPS = 1e-6, 1e-8
KEYS_A = -0.75

__all__ = [
    "BSPLINE", "BICUBIC", "IDW", "GAUSSIAN", "positions", "basis_matrix", "separable_weight",
    "separable_linear", "separable_grad_control", "eisenstein_lattice", "support_radius",
    "field_weight", "field_linear", "field_grad_params",
]


def positions(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Coordinates of ``n`` weights along one axis: ``linspace(-1, 1, n)``."""
    return torch.linspace(-1.0, 1.0, n, dtype=dtype, device=device)


def _bspline_rows(v: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cox-de Boor for cubic B-splines at ``v`` in span units [0, g - 3].

    Returns the first nonzero basis index per point and the four values, shaped (n,), (n, 4).
    In span units the clamped knots are integers: U[j] = clamp(j - 3, 0, g - 3).
    """
    spans = g - 3
    s = torch.clamp(torch.floor(v), 0, spans - 1)
    left = [None] + [v - torch.clamp(s + 1 - j, 0, spans) for j in (1, 2, 3)]
    right = [None] + [torch.clamp(s + j, 0, spans) - v for j in (1, 2, 3)]
    n = [torch.ones_like(v)]
    for j in (1, 2, 3):
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


@functools.lru_cache(maxsize=64)
def basis_matrix(n: int, g: int, kind: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Dense ``(n, g)`` basis matrix B with B[i, q] = basis function q at position x_i."""
    if kind == BSPLINE:
        if g < 4:
            raise ValueError(f"a cubic B-spline grid needs at least 4 control points per axis, got {g}")
        v = (positions(n, torch.float64, device) + 1) / 2 * (g - 3)
        first, w = _bspline_rows(v, g)
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


def separable_weight(control: torch.Tensor, n_out: int, n_in: int, kind: int) -> torch.Tensor:
    """Dense W = Bo @ C @ Bi.T, shape ``(n_out, n_in)``, in the control's compute dtype."""
    cd = compute_dtype(control)
    bo = basis_matrix(n_out, control.shape[0], kind, cd, control.device)
    bi = basis_matrix(n_in, control.shape[1], kind, cd, control.device)
    return bo @ control.to(cd) @ bi.T


def separable_linear(
    x: torch.Tensor, control: torch.Tensor, bias: torch.Tensor | None, out_features: int, kind: int
) -> torch.Tensor:
    """y = ((x @ Bi) @ C.T) @ Bo.T + bias for x ``(*, n_in)``, C ``(G_out, G_in)`` -> ``(*, out_features)``."""
    cd = compute_dtype(x)
    bi = basis_matrix(x.shape[-1], control.shape[1], kind, cd, x.device)
    bo = basis_matrix(out_features, control.shape[0], kind, cd, x.device)
    y = ((x.to(cd) @ bi) @ control.to(cd).T) @ bo.T
    if bias is not None:
        y = y + bias.to(cd)
    return y.to(x.dtype)


def separable_grad_control(u: torch.Tensor, v: torch.Tensor, g_out: int, g_in: int, kind: int) -> torch.Tensor:
    """dC = (u @ Bo).T @ (v @ Bi) for u ``(*, n_out)`` (output grad), v ``(*, n_in)`` (input)."""
    cd = compute_dtype(u)
    bo = basis_matrix(u.shape[-1], g_out, kind, cd, u.device)
    bi = basis_matrix(v.shape[-1], g_in, kind, cd, u.device)
    u2, v2 = u.reshape(-1, u.shape[-1]).to(cd), v.reshape(-1, v.shape[-1]).to(cd)
    return (u2 @ bo).T @ (v2 @ bi)


def eisenstein_lattice(n: int) -> torch.Tensor:
    """The ``n`` Eisenstein integers a + b*omega nearest the origin as (x, y), shape ``(n, 2)``.

    Ties in distance are broken by (x, y); positions are scaled so the farthest has norm 1.
    Same point order as tensor-spline 1.0.0's ``EisensteinLattice``.
    """
    if n < 1:
        raise ValueError(f"n_control_points must be >= 1, got {n}")
    r = max(math.ceil(math.sqrt(n / 3.0)) + 2, 3)
    half_sqrt3 = math.sqrt(3.0) / 2.0
    pts = [(float(a) - float(b) * 0.5, float(b) * half_sqrt3) for a in range(-r, r + 1) for b in range(-r, r + 1)]
    pts.sort(key=lambda p: (round(p[0] * p[0] + p[1] * p[1], 9), p[0], p[1]))
    lattice = torch.tensor(pts[:n], dtype=torch.float32)
    far = lattice.norm(dim=1).max()
    return lattice / far if far > 0 else lattice


def support_radius(lattice: torch.Tensor, min_points: int = 3) -> float:
    """Smallest taper radius (with margin) that gives every point of [-1, 1]^2 at least
    ``min_points`` lattice points strictly inside it.

    The distance to the k-th nearest point is 1-Lipschitz, so its maximum over a 257^2 grid plus
    half a grid diagonal bounds it on the whole square; the 1.25 factor keeps the k-th point's
    taper weight at least (1 - 0.8^2)^2 = 0.13.
    """
    k = min(min_points, lattice.shape[0])
    g = positions(257, torch.float64)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), dim=-1).reshape(-1, 2)
    kth = torch.cdist(grid, lattice.double()).kthvalue(k, dim=1).values.max().item()
    return 1.25 * (kth + (2 / 256) * math.sqrt(0.5))


def _phi(d2: torch.Tensor, sigma: torch.Tensor | None, basis: int, rho: float) -> torch.Tensor:
    phi = 1.0 / (d2 + IDW_EPS) if basis == IDW else torch.exp(-d2 / (2 * sigma * sigma))
    if rho > 0:
        phi = phi * torch.clamp(1 - d2 / (rho * rho), min=0) ** 2
    return phi


def _field_terms(lattice, sigma, n_out, n_in, basis, rho, cd, device):
    """Yield (k, phi_k, d2_k) over lattice points, each ``(n_out, n_in)``."""
    if basis not in (IDW, GAUSSIAN):
        raise ValueError(f"unknown field basis {basis}")
    ys = positions(n_out, cd, device)[:, None]
    xs = positions(n_in, cd, device)[None, :]
    lat = lattice.to(device=device, dtype=cd)
    sig = None if sigma is None else sigma.to(cd).reshape(())
    for k in range(lat.shape[0]):
        d2 = (xs - lat[k, 0]) ** 2 + (ys - lat[k, 1]) ** 2
        yield k, _phi(d2, sig, basis, rho), d2


def _normaliser(s: torch.Tensor, basis: int) -> torch.Tensor:
    return s + GAUSSIAN_EPS if basis == GAUSSIAN else s


def field_weight(
    control: torch.Tensor, lattice: torch.Tensor, sigma: torch.Tensor | None,
    n_out: int, n_in: int, basis: int, rho: float = 0.0,
) -> torch.Tensor:
    """Dense W ``(n_out, n_in)`` of a field basis, one lattice point at a time (memory O(n_out n_in))."""
    cd = compute_dtype(control)
    c = control.to(cd)
    num = torch.zeros(n_out, n_in, dtype=cd, device=control.device)
    den = torch.zeros_like(num)
    for k, phi, _ in _field_terms(lattice, sigma, n_out, n_in, basis, rho, cd, control.device):
        num += c[k] * phi
        den += phi
    return num / _normaliser(den, basis)


def field_linear(
    a: torch.Tensor, control: torch.Tensor, lattice: torch.Tensor, sigma: torch.Tensor | None,
    bias: torch.Tensor | None, n_out: int, n_in: int, basis: int, rho: float, transpose: bool,
) -> torch.Tensor:
    """``a @ W.T + bias`` for a ``(*, n_in)``, or ``a @ W + bias`` (``transpose``) for a ``(*, n_out)``."""
    cd = compute_dtype(a)
    w = field_weight(control.to(cd), lattice, sigma, n_out, n_in, basis, rho)
    y = a.to(cd) @ (w if transpose else w.T)
    if bias is not None:
        y = y + bias.to(cd)
    return y.to(a.dtype)


def field_grad_params(
    u: torch.Tensor, v: torch.Tensor, control: torch.Tensor, lattice: torch.Tensor,
    sigma: torch.Tensor | None, basis: int, rho: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of sum(G * W) with G = u.T @ v, for u ``(*, n_out)`` and v ``(*, n_in)``.

    d c_k = sum G phi_k / S;  d sigma = sum G sum_k (c_k - W) phi_k d_k^2 / (sigma^3 S)
    (S the normaliser). Returns ``(d_control (n,), d_sigma (1,))``; d_sigma is 0 for IDW.
    """
    cd = compute_dtype(u)
    n_out, n_in = u.shape[-1], v.shape[-1]
    g = u.reshape(-1, n_out).to(cd).T @ v.reshape(-1, n_in).to(cd)
    c = control.to(cd)
    w = field_weight(c, lattice, sigma, n_out, n_in, basis, rho)
    den = torch.zeros_like(g)
    for _, phi, _ in _field_terms(lattice, sigma, n_out, n_in, basis, rho, cd, u.device):
        den += phi
    h = g / _normaliser(den, basis)
    d_control = torch.zeros_like(c)
    d_sigma = torch.zeros(1, dtype=cd, device=u.device)
    for k, phi, d2 in _field_terms(lattice, sigma, n_out, n_in, basis, rho, cd, u.device):
        d_control[k] = (h * phi).sum()
        if basis == GAUSSIAN:
            d_sigma += (h * (c[k] - w) * phi * d2).sum()
    if basis == GAUSSIAN:
        d_sigma = d_sigma / sigma.to(cd).reshape(()) ** 3
    return d_control, d_sigma
