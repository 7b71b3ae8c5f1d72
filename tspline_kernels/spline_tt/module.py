"""SplineTTLinear: a TT-matrix layer whose cores are smooth cubic B-spline surfaces."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .._layers import SavedSettings, check_grid, fit_report
from ..reference import spline_tt as ref
from ..reference import tt as ref_tt
from ..tt.module import TTLinear, TTStructured, init_scale
from . import ops


def _check_core_grids(grid, d: int) -> tuple[tuple[int, int], ...]:
    """``grid`` as d pairs ``(G_out_k, G_in_k)`` of ints >= 4: one pair for every core, or a
    sequence of d pairs (numpy / torch ints accepted; floats, strings and bools refused)."""
    def sequence(g) -> list:
        if isinstance(g, (str, bytes, Mapping)) or not hasattr(g, "__getitem__") or not hasattr(g, "__len__"):
            raise ValueError(f"grid must be a pair (G_out, G_in) or {d} such pairs, got {grid!r}")
        return list(g)

    items = sequence(grid)
    if not any(hasattr(g, "__len__") and not isinstance(g, (str, bytes)) for g in items):  # one pair for every core
        return (check_grid(items),) * d
    if len(items) != d:
        raise ValueError(f"grid needs one (G_out, G_in) pair per core ({d}), got {grid!r}")
    return tuple(check_grid(sequence(g), f"grid[{k}]") for k, g in enumerate(items))


class SplineTTLinear(SavedSettings, TTStructured):
    """A TT matrix (see ``TTLinear``) whose cores vary smoothly along their mode indices:

        core_k[a, o, i, b] = sum_{p, q} Bo_k[o, p] control[k][a, p, q, b] Bi_k[i, q]

    with the clamped cubic B-spline bases of SplineLinear's "bspline" (``Bo_k``: ``out_modes[k]``
    points on ``G_out_k`` control points, ``Bi_k`` likewise). ``control[k]`` is
    ``(r_{k-1}, G_out_k, G_in_k, r_k)``; ``grid`` is one ``(G_out, G_in)`` pair for every core or a
    sequence of d pairs, each >= 4 (a grid larger than its mode size is allowed but redundant).
    The Triton "contract" kernels generate core tiles from the control points on chip.
    The control shapes do not show the modes, so the state dict carries them (``_extra_state``);
    loading it into a layer with other modes raises. ``device="meta"`` builds without initialising.
    """

    def __init__(self, in_modes: Sequence[int], out_modes: Sequence[int], ranks, grid, bias: bool = True,
                 device=None, dtype=None, strategy: str = "auto") -> None:
        super().__init__(in_modes, out_modes, ranks, bias, device, dtype, strategy)
        self.grid = _check_core_grids(grid, len(self.in_modes))
        rks = self.ranks
        self.control = nn.ParameterList(
            nn.Parameter(torch.empty(rks[k], go, gi, rks[k + 1], device=device, dtype=dtype))
            for k, (go, gi) in enumerate(self.grid)
        )
        self.reset_parameters()

    def _factors(self) -> nn.ParameterList:
        return self.control

    def _settings(self) -> dict[str, float]:
        return {**{f"in_modes[{k}]": m for k, m in enumerate(self.in_modes)},
                **{f"out_modes[{k}]": m for k, m in enumerate(self.out_modes)}}

    def cores(self) -> list[torch.Tensor]:
        """The TT cores ``(r_{k-1}, O_k, I_k, r_k)`` the control points define (for inspection)."""
        return [c.to(self.control[0].dtype) for c in ref.spline_cores(list(self.control), self.in_modes, self.out_modes)]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Uniform control points rescaled so that mean(W^2) equals nn.Linear's default init;
        nn.Linear's bias."""
        for c in self.control:
            c.uniform_(-1, 1)
        cores = ref.spline_cores([c.double() for c in self.control], self.in_modes, self.out_modes)
        scale = init_scale(cores, self.in_features)
        for c in self.control:
            c.mul_(scale)
        self.reset_bias()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._prepare(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        return ops.spline_tt_linear(x.to(dtype), [c.to(dtype) for c in self.control], bias,
                                    list(self.in_modes), list(self.out_modes), self.strategy)

    def materialize(self) -> torch.Tensor:
        return ref_tt.tt_weight(ref.spline_cores(list(self.control), self.in_modes, self.out_modes)).to(self.control[0].dtype)

    def _structure(self) -> str:
        grid = self.grid[0] if len(set(self.grid)) == 1 else self.grid
        return (f"in_modes={self.in_modes}, out_modes={self.out_modes}, ranks={self.ranks}, grid={grid}, "
                f"strategy={self.strategy!r}")

    @classmethod
    def from_ttlinear(cls, tt: TTLinear, grid, strategy: str | None = None) -> SplineTTLinear:
        """Least-squares spline fit of every core of ``tt``: C_k = pinv(Bo_k) core_k pinv(Bi_k).T per
        rank pair (exact LS solution; minimum-norm when a grid exceeds its mode size). The bias is
        copied. Attaches ``fit_report`` (relative error of the whole weight, per-core errors in details)."""
        if not isinstance(tt, TTLinear):
            raise TypeError(f"expected a TTLinear, got {type(tt).__name__}")
        ref_core = tt.cores[0]
        if ref_core.is_meta:
            raise ValueError("from_ttlinear fits the TTLinear's core values, but it is on the meta device and has "
                             "none: load its weights first")
        new = cls(tt.in_modes, tt.out_modes, tt.ranks, grid, bias=tt.bias is not None, device=ref_core.device,
                  dtype=ref_core.dtype, strategy=strategy or tt.strategy)
        core_errors = []
        with torch.no_grad():
            for core, control, (go, gi), o, i in zip(tt.cores, new.control, new.grid, tt.out_modes, tt.in_modes):
                g = core.double()
                po = torch.linalg.pinv(ref.bases(o, go, torch.float64, g.device))
                pi = torch.linalg.pinv(ref.bases(i, gi, torch.float64, g.device))
                fitted = torch.einsum("po,aoib,qi->apqb", po, g, pi)
                control.copy_(fitted)
                back = ref.spline_cores([fitted], [i], [o])[0]
                core_errors.append(round(((back - g).norm() / g.norm().clamp_min(1e-300)).item(), 6))
            if tt.bias is not None:
                new.bias.copy_(tt.bias)
        new.fit_report = fit_report("spline-tt least squares", tt.materialize(), new, grid=new.grid,
                                    core_errors=tuple(core_errors))
        return new
