"""Triton launchers for SplineTTLinear. Reference: ``reference/spline_tt.py``.

The multiplying kernels are the TT ones (``tt/chain.py``, ``tt/steps.py``, ``tt/rebuild.py``),
launched by ``tt/kernels.py``:
* ``contract``: ``_chain_kernel`` (forward, dx), ``_chain_grad_kernel`` (core gradients) and, where
  those do not fit, ``_step_kernel`` with ``SPLINE=True`` generate every core tile they multiply
  from the control points and the four nonzero cubic B-spline taps of each mode index, in
  registers; no core (let alone W) is written to memory. The step backward's dy sweep does the
  same (``TRANSPOSED``). The core gradients (from the gradient chain, or the per-core reductions
  ``_grad_step_kernel``) are d(core) in fp32, which ``_project_kernel`` projects onto the control
  points (dC_k = Bo_k.T dG_k Bi_k, a core-sized product), every core in one launch.
* ``rebuild``: the head product L is needed on the host anyway, so the (core-sized) spline cores
  are formed there first, in fp32 (every call: nothing derived from the controls is kept);
  then the TT rebuild kernels run unchanged. W is never formed.
"""

from __future__ import annotations

import functools

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
    return project_to_controls(d_cores, controls) + ([dx] if need_dx else [])


BLOCK_O = 32  # output-mode rows of dG per step of _project_kernel


@triton.jit
def _project(dg_ptr, bo_ptr, bi_ptr, dc_ptr, a, b, O, I, GO, GI, R1, s_a, s_o, s_i, s_b,
             GOP: tl.constexpr, IP: tl.constexpr, GIP: tl.constexpr, BO: tl.constexpr):
    """dC[a, :, :, b] = Bo.T @ dG[a, :, :, b] @ Bi (``_project_kernel``, one core)."""
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


@triton.jit
def _project_kernel(dgs, bos, bis, dcs, sizes, GOP: tl.constexpr, IP: tl.constexpr, GIP: tl.constexpr,
                    BO: tl.constexpr):
    """For each core j, ``sizes[j] = (first, R0, R1, O, I, GO, GI, s_a, s_o, s_i, s_b)``: program
    first + a R1 + b computes dC[a, :, :, b] = Bo.T @ dG[a, :, :, b] @ Bi, dG ``dgs[j]`` ``(R0, O,
    I, R1)`` (strides s_*), Bo ``bos[j]`` ``(O, GO)`` and Bi ``bis[j]`` ``(I, GI)`` fp32 contiguous,
    dC ``dcs[j]`` ``(R0, GO, GI, R1)`` contiguous in its dtype; tile sizes ``GOP[j]``, ``IP[j]``,
    ``GIP[j]``. Bo.T @ dG accumulates over O in steps of ``BO[j]`` rows, then one product with Bi;
    fp32 ("ieee") throughout, rounded once to dC's dtype (the bases are exact in fp32, as in the
    reference). FLOPs (useful): 2*R0*R1*GO*I*(O + GI) per core. Bytes: 4*R0*R1*O*I + elt*R0*R1*GO*GI
    per core (bases from L2).
    """
    pid = tl.program_id(0)
    for j in tl.static_range(len(dgs)):
        first, r0, r1, o, i, go, gi, s_a, s_o, s_i, s_b = sizes[j]
        if (pid >= first) & (pid < first + r0 * r1):
            _project(dgs[j], bos[j], bis[j], dcs[j], (pid - first) // r1, (pid - first) % r1, o, i, go, gi, r1,
                     s_a, s_o, s_i, s_b, GOP[j], IP[j], GIP[j], BO[j])


def project_to_controls(d_cores: list[torch.Tensor], controls: list[torch.Tensor]) -> list[torch.Tensor]:
    """dC = Bo.T dG Bi per rank pair of every core (``reference.spline_tt.project_to_control``) by
    one ``_project_kernel`` launch: each d_core ``(r0, O, I, r1)`` (any strides) -> ``(r0, Go, Gi,
    r1)`` contiguous in its control's dtype."""
    device = d_cores[0].device
    programs, sizes, bases, consts = _projection(
        tuple((g.shape, g.stride(), c.shape[1], c.shape[2]) for g, c in zip(d_cores, controls)), device)
    dcs = [torch.empty(c.shape, device=device, dtype=c.dtype) for c in controls]
    if programs:
        _project_kernel[(programs,)](tuple(d_cores), *bases, tuple(dcs), sizes, **consts, num_warps=4)
    return dcs


@functools.lru_cache(maxsize=256)
def _projection(cores: tuple, device: torch.device) -> tuple[int, tuple, tuple[tuple, tuple], dict]:
    """(programs, ``sizes``, (the Bo, the Bi of each core), the constexprs) of ``_project_kernel`` for
    cores given as (d_core's shape and strides, Go, Gi) each: one lookup per call."""
    sizes, bos, bis, first = [], [], [], 0
    for (r0, o, i, r1), strides, go, gi in cores:
        sizes.append((first, r0, r1, o, i, go, gi, *strides))
        bos.append(ref.bases(o, go, torch.float32, device))
        bis.append(ref.bases(i, gi, torch.float32, device))
        first += r0 * r1
    consts = dict(GOP=tuple(dot_dim(go) for _, _, go, _ in cores), IP=tuple(dot_dim(s[2]) for s, *_ in cores),
                  GIP=tuple(dot_dim(gi) for *_, gi in cores), BO=tuple(min(BLOCK_O, dot_dim(s[1])) for s, *_ in cores))
    return first, tuple(sizes), (tuple(bos), tuple(bis)), consts
