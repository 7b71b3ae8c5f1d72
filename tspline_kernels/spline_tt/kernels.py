"""Triton launchers for SplineTTLinear. Reference: ``reference/spline_tt.py``.

The kernels are the TT ones (``tt/kernels.py``):
* ``contract``: ``_step_kernel`` with ``SPLINE=True`` generates every core tile it multiplies from the
  control points and the four nonzero cubic B-spline taps of each mode index, in registers; no
  core (let alone W) is written to memory. The backward's dy sweep does the same (``TRANSPOSED``);
  the per-core reductions ``_grad_step_kernel`` give d(core) partials that the host projects onto
  the control points (dC_k = Bo_k.T dG_k Bi_k, a core-sized product).
* ``rebuild``: the head product L is needed on the host anyway, so the (core-sized) spline cores
  are formed there first, in fp32; then the TT rebuild kernels run unchanged. W is never formed.
"""

from __future__ import annotations

import math

import torch

from .._triton import check_inputs, flatten
from ..reference import spline_tt as ref
from ..tt import cost
from ..tt.kernels import Core, contract_grad, contract_linear, rebuild_grad, rebuild_linear, tt_transposed


def _ranks(controls: list[torch.Tensor]) -> tuple[int, ...]:
    return (controls[0].shape[0],) + tuple(c.shape[3] for c in controls)


def _spline_cores(controls, in_modes, out_modes) -> list[Core]:
    return [Core(c, o, i, spline=True) for c, i, o in zip(controls, in_modes, out_modes)]


def spline_tt_linear(x: torch.Tensor, controls: list[torch.Tensor], bias: torch.Tensor | None,
                     in_modes: list[int], out_modes: list[int], strategy: str) -> torch.Tensor:
    """y = x @ W.T + bias; x ``(*, prod in_modes)``, controls ``(r0, Go, Gi, r1)`` -> ``(*, prod out_modes)``."""
    check_inputs(x, *controls, *([bias] if bias is not None else []))
    x2 = flatten(x)
    if cost.resolve(strategy, x2.shape[0], in_modes, out_modes, _ranks(controls), x.element_size()) == "rebuild":
        y = rebuild_linear(x2, ref.spline_cores(controls, in_modes, out_modes), bias)
    else:
        y = contract_linear(x2, _spline_cores(controls, in_modes, out_modes), bias)
    return y.reshape(*x.shape[:-1], math.prod(out_modes))


def spline_tt_grad(dy: torch.Tensor, x: torch.Tensor, controls: list[torch.Tensor], in_modes: list[int],
                   out_modes: list[int], strategy: str, need_dx: bool) -> list[torch.Tensor]:
    """``[dC_1 .. dC_d]`` (fp32) of sum(dy * (x @ W.T)), then dx = dy @ W if ``need_dx``."""
    check_inputs(dy, x, *controls)
    dy2, x2 = flatten(dy), flatten(x)
    m = dy2.shape[0]
    if m == 0:
        grads = [torch.zeros(c.shape, device=dy.device, dtype=torch.float32) for c in controls]
        return grads + ([x.new_zeros(x.shape)] if need_dx else [])
    if cost.resolve(strategy, m, in_modes, out_modes, _ranks(controls), dy.element_size()) == "rebuild":
        cores = ref.spline_cores(controls, in_modes, out_modes)
        d_cores = rebuild_grad(dy2, x2, cores)
        dx = rebuild_linear(dy2, tt_transposed(cores), None) if need_dx else None
    else:
        d_cores, dx = contract_grad(dy2, x2, _spline_cores(controls, in_modes, out_modes), need_dx)
    grads = ref.project_to_control(d_cores, controls)
    # contiguous, as the fake implementation promises (torch.compile checks strides)
    return [g.contiguous() for g in grads] + ([dx.reshape(x.shape).to(x.dtype)] if need_dx else [])
