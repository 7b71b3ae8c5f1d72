"""Triton launchers for SplineTTLinear. Reference: ``reference/spline_tt.py``.

The kernels are the TT ones (``tt/chain.py``, ``tt/steps.py``, ``tt/rebuild.py``), launched by
``tt/kernels.py``:
* ``contract``: ``_chain_kernel`` (forward, dx), ``_chain_grad_kernel`` (core gradients) and, where
  those do not fit, ``_step_kernel`` with ``SPLINE=True`` generate every core tile they multiply
  from the control points and the four nonzero cubic B-spline taps of each mode index, in
  registers; no core (let alone W) is written to memory. The step backward's dy sweep does the
  same (``TRANSPOSED``). The core gradients (from the gradient chain, or the per-core reductions
  ``_grad_step_kernel``) are d(core) in fp32, which the host projects onto the control points
  (dC_k = Bo_k.T dG_k Bi_k, a core-sized product).
* ``rebuild``: the head product L is needed on the host anyway, so the (core-sized) spline cores
  are formed there first, in fp32 (kept while the controls are unchanged, ``tt.kernels.derived``);
  then the TT rebuild kernels run unchanged. W is never formed.
"""

from __future__ import annotations

import torch

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
    """``[dC_1 .. dC_d]`` (fp32) of sum(dy * (x @ W.T)), then dx = dy @ W if ``need_dx``."""
    d_cores, dx = cores_grad(dy, x, _spline_cores(controls, in_modes, out_modes), strategy, need_dx)
    # project_to_control returns contiguous tensors, as the fake implementation promises
    return ref.project_to_control(d_cores, controls) + ([dx] if need_dx else [])
