"""Triton launchers for SplineTTLinear. Reference: ``reference/spline_tt.py``.

The multiplying kernels are the TT ones (``tt/chain.py``, ``tt/steps.py``, ``tt/rebuild.py``),
launched by ``tt/kernels.py``:
* ``contract``: ``_chain_kernel`` (forward, dx), ``_chain_grad_kernel`` (core gradients) and, where
  those do not fit, ``_step_kernel`` with ``SPLINE=True`` generate every core tile they multiply
  from the control points and the four nonzero cubic B-spline taps of each mode index, in
  registers; no core (let alone W) is written to memory. The step backward's dy sweep does the
  same (``TRANSPOSED``). The core gradients (from the gradient chain, or the per-core reductions
  ``_grad_step_kernel``) are d(core) in fp32, which ``_project_kernel`` projects onto the control
  points (dC_k = Bo_k.T dG_k Bi_k, a core-sized product), one launch per core.
* ``rebuild``: the head product L is needed on the host anyway, so the (core-sized) spline cores
  are formed there first, in fp32 (kept while the controls are unchanged, ``tt.kernels.derived``);
  then the TT rebuild kernels run unchanged. W is never formed.
"""

from __future__ import annotations

import torch

from .._triton import dot_dim, tl, triton
from ..reference import spline_tt as ref
from ..tt.kernels import Core, cores_grad, cores_linear


def _spline_cores(controls, in_modes, out_modes) -> list[Core]:
    return [Core(c, o, i, spline=True) for c, i, o in zip(controls, in_modes, out_modes)]


def spline_tt_linear(x: torch.Tensor, controls: list[torch.Tensor], bias: torch.Tensor | None,
                     in_modes: list[int], out_modes: list[int], strategy: str) -> torch.Tensor:
    """y = x @ W.T + bias; x ``(*, prod in_modes)``, controls ``(r0, Go, Gi, r1)`` -> ``(*, prod out_modes)``."""
    return cores_linear(x, _spline_cores(controls, in_modes, out_modes), bias, strategy)


def spline_tt_grad(dy: torch.Tensor, x: torch.Tensor, controls: list[torch.Tensor], in_modes: list[int],
                   out_modes: list[int], strategy: str, need_dx: bool) -> list[torch.Tensor]:
    """``[dC_1 .. dC_d]`` (each in its control's dtype) of sum(dy * (x @ W.T)), then dx = dy @ W if ``need_dx``."""
    d_cores, dx = cores_grad(dy, x, _spline_cores(controls, in_modes, out_modes), strategy, need_dx)
    return [project_to_control(g, c) for g, c in zip(d_cores, controls)] + ([dx] if need_dx else [])


BLOCK_O = 32  # output-mode rows of dG per step of _project_kernel


@triton.jit
def _project_kernel(dg_ptr, bo_ptr, bi_ptr, dc_ptr, O, I, GO, GI, R1, s_a, s_o, s_i, s_b,
                    GOP: tl.constexpr, IP: tl.constexpr, GIP: tl.constexpr, BO: tl.constexpr):
    """dC[a, :, :, b] = Bo.T @ dG[a, :, :, b] @ Bi for program (a, b): dG ``(R0, O, I, R1)`` (strides
    s_*), Bo ``(O, GO)`` and Bi ``(I, GI)`` fp32 contiguous, dC ``(R0, GO, GI, R1)`` contiguous in its
    dtype. Bo.T @ dG accumulates over O in steps of BO rows, then one product with Bi; fp32 ("ieee")
    throughout, rounded once to dC's dtype (the bases are exact in fp32, as in the reference).
    FLOPs (useful): 2*R0*R1*GO*I*(O + GI). Bytes: 4*R0*R1*O*I + elt*R0*R1*GO*GI (bases from L2).
    """
    a = tl.program_id(0)
    b = tl.program_id(1)
    rp = tl.arange(0, GOP)
    ri = tl.arange(0, IP)
    rq = tl.arange(0, GIP)
    t = tl.zeros((GOP, IP), dtype=tl.float32)
    for o0 in range(0, O, BO):
        ro = o0 + tl.arange(0, BO)
        g = tl.load(dg_ptr + a * s_a + ro[:, None] * s_o + ri[None, :] * s_i + b * s_b,
                    mask=(ro < O)[:, None] & (ri < I)[None, :], other=0.0).to(tl.float32)
        bo_t = tl.load(bo_ptr + ro[None, :] * GO + rp[:, None], mask=(rp < GO)[:, None] & (ro < O)[None, :], other=0.0)
        t = tl.dot(bo_t, g, t, input_precision="ieee")
    bi = tl.load(bi_ptr + ri[:, None] * GI + rq[None, :], mask=(ri < I)[:, None] & (rq < GI)[None, :], other=0.0)
    dc = tl.dot(t, bi, input_precision="ieee")
    tl.store(dc_ptr + ((a * GO + rp[:, None]) * GI + rq[None, :]) * R1 + b, dc.to(dc_ptr.dtype.element_ty),
             mask=(rp < GO)[:, None] & (rq < GI)[None, :])


def project_to_control(d_core: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    """dC = Bo.T dG Bi per rank pair (``reference.spline_tt.project_to_control``) by one
    ``_project_kernel`` launch: d_core ``(r0, O, I, r1)`` -> ``(r0, Go, Gi, r1)`` contiguous in
    control's dtype."""
    r0, o, i, r1 = d_core.shape
    go, gi = control.shape[1], control.shape[2]
    bo = ref.bases(o, go, torch.float32, d_core.device)
    bi = ref.bases(i, gi, torch.float32, d_core.device)
    dc = torch.empty(r0, go, gi, r1, device=d_core.device, dtype=control.dtype)
    if dc.numel():
        _project_kernel[(r0, r1)](d_core, bo, bi, dc, o, i, go, gi, r1, *d_core.stride(),
                                  GOP=dot_dim(go), IP=dot_dim(i), GIP=dot_dim(gi), BO=min(BLOCK_O, dot_dim(o)), num_warps=4)
    return dc
