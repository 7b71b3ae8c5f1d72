"""SplineTTLinear: a TT-matrix layer whose cores are smooth cubic B-spline surfaces."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .._layers import SavedSettings, cast, check_grid, fit_report, full_value
from ..reference import spline_tt as ref
from ..reference import tt as ref_tt
from ..tt.module import (TTLinear, TTStructured, check_structure, fit_tt_cores, init_scale, refine_weighted,
                         structured_system, tt_normal_equations)
from . import ops


def _check_core_grids(grid, d: int) -> tuple[tuple[int, int], ...]:
    """``grid`` as d pairs ``(G_out_k, G_in_k)`` of ints >= 4: one pair for every core, or a
    sequence of d pairs (numpy / torch ints accepted; floats, strings and bools refused)."""
    def sequence(g) -> list:
        if isinstance(g, (str, bytes, Mapping)) or not hasattr(g, "__getitem__") or not hasattr(g, "__len__"):
            raise TypeError(f"grid must be a pair (G_out, G_in) or {d} such pairs, got {grid!r} ({type(grid).__name__})")
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
        cores = ref.spline_cores([full_value(c).double() for c in self.control], self.in_modes, self.out_modes)
        scale = init_scale(cores, self.in_features)
        for c in self.control:
            c.mul_(scale)
        self.reset_bias()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._prepare(x)
        return ops.spline_tt_linear(cast(x, dtype), self._cast_factors(dtype), cast(self.bias, dtype),
                                    list(self.in_modes), list(self.out_modes), self.strategy)

    def materialize(self) -> torch.Tensor:
        return ref_tt.tt_weight(ref.spline_cores(list(self.control), self.in_modes, self.out_modes)).to(self.control[0].dtype)

    def _structure(self) -> str:
        grid = self.grid[0] if len(set(self.grid)) == 1 else self.grid
        return (f"in_modes={self.in_modes}, out_modes={self.out_modes}, ranks={self.ranks}, grid={grid}, "
                f"strategy={self.strategy!r}")

    @torch.no_grad()
    def _load(self, controls: list[torch.Tensor], bias: torch.Tensor | None) -> None:
        """Copy fitted control grids and a bias (None: keep the layer's) into the parameters."""
        for control, c in zip(self.control, controls):
            control.copy_(c)
        if bias is not None:
            self.bias.copy_(bias)

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
        controls, core_errors = _project_cores([c.detach().double() for c in tt.cores], new.grid)
        new._load(controls, tt.bias)
        new.fit_report = fit_report("spline-tt least squares", tt.materialize(), new, grid=new.grid,
                                    core_errors=core_errors)
        return new

    @classmethod
    def from_linear(cls, linear: nn.Linear, in_modes: Sequence[int], out_modes: Sequence[int], grid,
                    eps: float | None = None, max_rank: int | None = None, input_gram: torch.Tensor | None = None,
                    *, strategy: str = "auto", sweeps: int = 10, damping: float = 1e-6,
                    progress: bool = False) -> SplineTTLinear:
        """Spline-TT fit of ``linear.weight``: ``TTLinear.from_linear``'s TT fit (TT-SVD with ``eps`` /
        ``max_rank``, then with ``input_gram`` weighted ALS over the cores), then the least-squares
        spline projection of every core (``from_ttlinear``), then with ``input_gram`` G = X.T X
        ``(in, in)`` at most ``sweeps`` sweeps of ALS over the control grids on the output error
        ||(W - W_hat) X.T||_F (the cores are linear in their controls, so W_hat stays multilinear in
        them), never ending above the projection's output error. Computed in float64, stored in the
        Linear's dtype; the bias is copied. Attaches ``fit_report`` (errors against W; details: ranks,
        grid, per-core projection errors and, with a Gram, the TT fit's output error, the projection's
        (``start_output_error``), the final one and the ALS history)."""
        _check_core_grids(grid, len(check_structure(in_modes, out_modes, 1)[0]))  # before the (long) fit
        fit = fit_tt_cores(linear, in_modes, out_modes, eps, max_rank, input_gram, sweeps, damping, progress)
        ins, outs, ranks = ref_tt.modes_of(fit.cores)
        w = fit.weight
        new = cls(ins, outs, ranks, grid, bias=linear.bias is not None, device=w.device, dtype=w.dtype,
                  strategy=strategy)
        controls, core_errors = _project_cores(fit.cores, new.grid)
        details = {"ranks": ranks, "grid": new.grid, "eps": eps, "max_rank": max_rank, "core_errors": core_errors}
        if fit.gram is not None:
            def build(blocks: list[torch.Tensor]) -> torch.Tensor:
                return ref_tt.tt_weight(ref.spline_cores(blocks, ins, outs))

            details["tt_output_error"] = fit.details["final_output_error"]
            system = structured_system(fit.cores, w, fit.gram, damping)
            solve = None if system is None else _control_block_solver(system, ins, outs)
            controls, refined = refine_weighted(controls, build, w.double(), fit.gram, sweeps, progress, damping, solve)
            details.update(refined)
        new._load(controls, linear.bias)
        method = "tt-svd + spline least squares" if fit.gram is None else "tt-svd + spline + weighted als"
        new.fit_report = fit_report(method, w, new, input_gram=fit.gram, **details)
        return new


def _project_cores(cores: list[torch.Tensor], grid: tuple[tuple[int, int], ...]
                   ) -> tuple[list[torch.Tensor], tuple[float, ...]]:
    """Least-squares control points C_k = pinv(Bo_k) core_k pinv(Bi_k).T ``(r_{k-1}, G_out_k, G_in_k,
    r_k)`` of every core ``(r_{k-1}, O_k, I_k, r_k)`` (per rank pair, in the cores' dtype), and each
    core's relative error (6 decimals)."""
    controls, errors = [], []
    for core, (go, gi) in zip(cores, grid):
        _, o, i, _ = core.shape
        po = torch.linalg.pinv(ref.bases(o, go, core.dtype, core.device))
        pi = torch.linalg.pinv(ref.bases(i, gi, core.dtype, core.device))
        control = torch.einsum("po,aoib,qi->apqb", po, core, pi)
        back = ref.spline_cores([control], [i], [o])[0]
        controls.append(control)
        errors.append(round(((back - core).norm() / core.norm().clamp_min(1e-300)).item(), 6))
    return controls, tuple(errors)


def _control_block_solver(system: tuple[torch.Tensor, torch.Tensor], in_modes: tuple[int, ...],
                          out_modes: tuple[int, ...]) -> Callable[[list[torch.Tensor], int], torch.Tensor]:
    """``solve(controls, k)`` for ``weighted_als`` over spline-TT control grids: the exact (minimum-norm)
    minimiser over control k. Core k is Bo C Bi^T per rank pair, i.e. core_o = sum_p Bo[o, p] P C_p with
    P = I (x) Bi (x) I mapping (a, q, b) to (a, i, b); with H, C from ``tt_normal_equations`` on the
    current cores the normal equations (Bo^T Bo) X (P^T H P) = Bo^T C^T P give X = pinv(Bo) C^T P pinv(P^T H P)."""
    def solve(blocks: list[torch.Tensor], k: int) -> torch.Tensor:
        h, c = tt_normal_equations(ref.spline_cores(blocks, in_modes, out_modes), k, *system)
        r0, go, gi, r1 = blocks[k].shape
        o, i = out_modes[k], in_modes[k]
        bo = ref.bases(o, go, h.dtype, h.device)
        bi = ref.bases(i, gi, h.dtype, h.device)
        m = torch.einsum("aibcjd,iq,js->aqbcsd", h.reshape(r0, i, r1, r0, i, r1), bi, bi).reshape(r0 * gi * r1, -1)
        rhs = torch.einsum("po,aibo,iq->paqb", torch.linalg.pinv(bo), c.reshape(r0, i, r1, o), bi).reshape(go, -1)
        return (rhs @ torch.linalg.pinv(m, hermitian=True)).reshape(go, r0, gi, r1).permute(1, 0, 2, 3)

    return solve
