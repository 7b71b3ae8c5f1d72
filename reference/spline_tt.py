"""Pure-PyTorch reference for SplineTTLinear: a TT matrix whose cores are cubic B-spline surfaces.

Core k is ``G_k[a, o, i, b] = sum_{p, q} Bo_k[o, p] C_k[a, p, q, b] Bi_k[i, q]`` with the clamped
cubic B-spline bases ``Bo_k = basis_matrix(O_k, Go_k, BSPLINE)`` and ``Bi_k = basis_matrix(I_k, Gi_k,
BSPLINE)`` (``reference.spline``) and control points ``C_k`` shaped ``(r_{k-1}, Go_k, Gi_k, r_k)``.
Everything else is the TT maths of ``reference.tt``.
"""

from __future__ import annotations

import torch

from . import tt
from .common import compute_dtype
from .spline import BSPLINE, basis_matrix

__all__ = ["bases", "spline_cores", "project_to_control", "spline_tt_linear", "spline_tt_grad"]


def bases(n: int, g: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """The ``(n, g)`` clamped cubic B-spline basis of one mode."""
    return basis_matrix(n, g, BSPLINE, dtype, device)


def spline_cores(controls: list[torch.Tensor], in_modes: list[int], out_modes: list[int]) -> list[torch.Tensor]:
    """TT cores ``(r_{k-1}, O_k, I_k, r_k)`` in the compute dtype from control points ``(r_{k-1}, Go_k, Gi_k, r_k)``."""
    cd = compute_dtype(controls[0])
    cores = []
    for c, n_in, n_out in zip(controls, in_modes, out_modes):
        bo = bases(n_out, c.shape[1], cd, c.device)
        bi = bases(n_in, c.shape[2], cd, c.device)
        cores.append(torch.einsum("op,apqb,iq->aoib", bo, c.to(cd), bi))
    return cores


def project_to_control(d_core: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    """Chain rule through the bases: dC = Bo.T dG Bi (per rank pair), computed in dG's dtype and
    returned contiguous in control's."""
    bo = bases(d_core.shape[1], control.shape[1], d_core.dtype, d_core.device)
    bi = bases(d_core.shape[2], control.shape[2], d_core.dtype, d_core.device)
    return torch.einsum("op,aoib,iq->apqb", bo, d_core, bi).to(control.dtype).contiguous()


def spline_tt_linear(
    x: torch.Tensor, controls: list[torch.Tensor], bias: torch.Tensor | None, in_modes: list[int], out_modes: list[int]
) -> torch.Tensor:
    """y = x @ W.T + bias, x ``(*, prod in_modes)`` -> ``(*, prod out_modes)``."""
    cd = compute_dtype(x)
    cores = spline_cores([c.to(cd) for c in controls], in_modes, out_modes)
    return tt.tt_linear(x, cores, bias)


def spline_tt_grad(
    dy: torch.Tensor, x: torch.Tensor, controls: list[torch.Tensor], in_modes: list[int], out_modes: list[int],
    need_dx: bool,
) -> list[torch.Tensor]:
    """Gradients of sum(dy * (x @ W.T)): ``[dC_1, ..., dC_d]``, each summed in the compute dtype
    and returned in its control's dtype, then ``dx = dy @ W`` (x's shape and dtype) if ``need_dx``."""
    cd = compute_dtype(dy)
    cores = spline_cores([c.to(cd) for c in controls], in_modes, out_modes)
    grads = tt.tt_grad(dy, x, cores, need_dx)
    return [project_to_control(g, c) for g, c in zip(grads, controls)] + grads[len(cores):]
