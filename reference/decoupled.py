"""Pure-PyTorch reference for the decoupled B-spline MLP: the maths every decoupled kernel must match.

y = g(x @ V) @ W.T + b for x ``(*, m)``, V ``(m, r)``, W ``(n, r)``, b ``(n,)``: r hidden units,
unit i with its own activation g_i, a clamped uniform cubic B-spline with K >= 4 basis functions on
[lo_i, hi_i] (knots: four at lo_i, K - 4 uniform interior knots, four at hi_i, the convention of
``spline.BSPLINE``), g_i(z) = sum_j coef[i, j] B_j(z). Outside [lo_i, hi_i] g_i continues linearly
with the value and slope it has at the edge.

Both g and g' are linear in the coefficients: with u = (z - lo) / (hi - lo) * (K - 3) in span
units and u_c = clamp(u, 0, K - 3),
  g(z)  = sum_j coef[j] (B_j(u_c) + B_j'(u_c) (u - u_c)),   g'(z) = (K - 3) / (hi - lo) sum_j coef[j] B_j'(u_c),
with B_j' in span units. ``spline_rows`` gives those four nonzero rows per scalar; the activation,
its derivative and the fit's design matrices are all built from it.
"""

from __future__ import annotations

import torch

from .common import compute_dtype
from .spline import bspline_rows

__all__ = ["spline_rows", "spline_activation", "spline_activation_derivative", "decoupled_mlp"]


def _derivative_rows(v: torch.Tensor, k: int) -> torch.Tensor:
    """d/dv of the four nonzero cubic basis values at ``v`` (span units, inside [0, K - 3]), ``(n, 4)``.

    The derivative of a clamped cubic spline is the quadratic spline on the inner knots with
    coefficients 3 (c_{j+1} - c_j) / (U[j+4] - U[j+1]), so B_j' = 3 N_{j-1} / den_{j-1} - 3 N_j / den_j
    with N the quadratic basis (same span, three nonzero values) and den_j = U[j+4] - U[j+1].
    """
    first, quad = bspline_rows(v, k - 1, degree=2)
    spans = k - 3
    j = first[:, None] + torch.arange(3, device=v.device)
    den = (torch.clamp(j + 1, 0, spans) - torch.clamp(j - 2, 0, spans)).to(v.dtype)
    d = 3 * quad / den
    zero = torch.zeros_like(v)[:, None]
    return torch.cat([zero, d], dim=1) - torch.cat([d, zero], dim=1)


def spline_rows(
    z: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, n_basis: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Basis rows of every unit's spline at z ``(M, r)`` with ranges lo, hi ``(r,)``.

    Returns (first, values, slopes): the first nonzero basis index ``(M, r)`` (int64, columns
    first..first + 3), and ``(M, r, 4)`` rows with g_i(z) = sum_a values[..., a] coef[i, first + a]
    and g_i'(z) = sum_a slopes[..., a] coef[i, first + a] (linear extrapolation included), in z's dtype.
    """
    spans = n_basis - 3
    scale = spans / (hi - lo)
    u = (z - lo) * scale
    uc = torch.clamp(u, 0, spans)
    first, b = bspline_rows(uc.reshape(-1), n_basis)
    db = _derivative_rows(uc.reshape(-1), n_basis)
    values = b + db * (u - uc).reshape(-1, 1)
    slopes = db * scale.expand_as(z).reshape(-1, 1)
    shape = (*z.shape, 4)
    return first.reshape(z.shape), values.reshape(shape), slopes.reshape(shape)


def _gather(coef: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """coef[i, first[..., i] + a] as ``(M, r, 4)`` for coef ``(r, K)`` and first ``(M, r)``."""
    r, k = coef.shape
    idx = first + (torch.arange(r, device=first.device) * k)
    return coef.reshape(-1)[idx[..., None] + torch.arange(4, device=first.device)]


def spline_activation(z: torch.Tensor, coef: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """g(z) ``(M, r)`` for z ``(M, r)``, coef ``(r, K)``, lo/hi ``(r,)``, in z's dtype; differentiable
    by autograd in z and coef."""
    first, values, _ = spline_rows(z, lo.to(z.dtype), hi.to(z.dtype), coef.shape[1])
    return (values * _gather(coef.to(z.dtype), first)).sum(-1)


def spline_activation_derivative(
    z: torch.Tensor, coef: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> torch.Tensor:
    """g'(z) ``(M, r)`` for z ``(M, r)``, coef ``(r, K)``, lo/hi ``(r,)``, in z's dtype (constant
    outside [lo, hi])."""
    first, _, slopes = spline_rows(z, lo.to(z.dtype), hi.to(z.dtype), coef.shape[1])
    return (slopes * _gather(coef.to(z.dtype), first)).sum(-1)


def decoupled_mlp(
    x: torch.Tensor, v: torch.Tensor, w: torch.Tensor, coef: torch.Tensor,
    lo: torch.Tensor, hi: torch.Tensor, bias: torch.Tensor | None,
) -> torch.Tensor:
    """y = g(x @ V) @ W.T + bias for x ``(*, m)``, V ``(m, r)``, W ``(n, r)``, coef ``(r, K)``,
    lo/hi ``(r,)``, bias ``(n,)`` or None -> ``(*, n)`` in x's dtype, computed in fp32 (fp64 for fp64 x)."""
    cd = compute_dtype(x)
    z = x.reshape(-1, x.shape[-1]).to(cd) @ v.to(cd)
    y = spline_activation(z, coef.to(cd), lo.to(cd), hi.to(cd)) @ w.to(cd).T
    if bias is not None:
        y = y + bias.to(cd)
    return y.reshape(*x.shape[:-1], w.shape[0]).to(x.dtype)
