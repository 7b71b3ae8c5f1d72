"""SplineLinear and HierarchicalSplineLinear: nn.Linear replacements with interpolated weights."""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .._fit import damped_gram, fit_inputs
from .._layers import (CompressedLinear, SavedSettings, cast, check_count, check_flag, check_grid, fit_report,
                       full_value)
from ..reference import spline as ref
from . import ops

BASES = ("bspline", "bicubic", "gaussian", "eisenstein")
_FIELD = {"eisenstein": ref.IDW, "gaussian": ref.GAUSSIAN}
_TENSOR_SPLINE_BASIS = {"bspline": "bicubic", "gaussian": "gaussian", "eisenstein": "eisenstein"}


def default_grid(n: int) -> int:
    """Control points along an axis of ``n`` weights when no grid is given: n/8, in [4, 64]."""
    return min(max(4, n // 8), 64)


def _scale_to_fan_in(control: torch.Tensor, mean_sq_weight: float, in_features: int, share: float = 1.0) -> None:
    """Rescale ``control`` so that mean(W^2) is ``share`` of nn.Linear's 1 / (3 in_features)."""
    target = share / (3 * in_features)
    control.mul_(math.sqrt(target / max(mean_sq_weight, 1e-30)))


def _separable_mean_sq(control: torch.Tensor, n_out: int, n_in: int, kind: int) -> float:
    """mean(W^2) of W = Bo C Bi.T via the small Gram matrices: ||W||^2 = sum((Bo'Bo C) * (C Bi'Bi))."""
    c = full_value(control).detach().double().cpu()
    bo = ref.basis_matrix(n_out, c.shape[0], kind, torch.float64)
    bi = ref.basis_matrix(n_in, c.shape[1], kind, torch.float64)
    return ((bo.T @ bo @ c) * (c @ (bi.T @ bi))).sum().item() / (n_out * n_in)


class SplineLinear(SavedSettings, CompressedLinear):
    """``nn.Linear`` whose weight W[o, i] is interpolated from a few control points.

    ``basis="bspline"`` (default): clamped cubic B-spline grid, ``control`` ``(G_out, G_in)``,
    W = Bo @ control @ Bi.T, computed separably so W is never formed.
    ``basis="bicubic" | "gaussian" | "eisenstein"``: ``control`` ``(n_control_points,)`` with the
    maths of tensor-spline 1.0.0 (its "bspline" is our "bicubic"). ``support="local"`` (gaussian and
    eisenstein only) keeps just the lattice points within ``support_radius`` of each weight,
    tapered by (1 - d^2 / rho^2)^2; by default rho is the smallest radius that reaches three
    lattice points from anywhere in [-1, 1]^2 (times 1.25), see ``reference.spline.support_radius``.
    The state dict carries the features, basis, support and radius (``_extra_state``); loading it
    into a layer built with other settings raises. ``device="meta"`` builds without initialising.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
        basis: str = "bspline", grid=None, n_control_points: int | None = None, support: str = "global",
        support_radius: float | None = None,
    ) -> None:
        if not isinstance(basis, str) or basis not in BASES:
            raise ValueError(f"unknown basis {basis!r}; expected one of {BASES}")
        if not isinstance(support, str) or support not in ("global", "local"):
            raise ValueError(f"support must be 'global' or 'local', got {support!r}")
        if support == "local" and basis not in _FIELD:
            raise ValueError(f"support='local' applies to the gaussian and eisenstein bases, not {basis!r}")
        if support_radius is not None and support != "local":
            raise ValueError(f"support_radius applies to support='local' only (got support={support!r})")
        super().__init__(in_features, out_features, check_flag("bias", bias), device, dtype)
        self.basis = basis
        self.support = support
        factory = {"device": device, "dtype": dtype}
        if basis == "bspline":
            if n_control_points is not None:
                raise ValueError("basis='bspline' takes grid=(G_out, G_in), not n_control_points")
            self.grid = check_grid(grid if grid is not None else (default_grid(out_features), default_grid(in_features)))
            self.control = nn.Parameter(torch.empty(self.grid, **factory))
        else:
            if grid is not None:
                raise ValueError(f"basis={basis!r} takes n_control_points, not grid")
            n = 16 if n_control_points is None else check_count("n_control_points", n_control_points, 1)
            self.n_control_points = n
            self.control = nn.Parameter(torch.empty(n, **factory))
        self.rho = 0.0
        if basis in _FIELD:
            lattice = ref.eisenstein_lattice(self.n_control_points)  # on the CPU, whatever ``device`` is
            self.register_buffer("lattice", lattice.to(device), persistent=False)
            if basis == "gaussian":
                self.log_bandwidth = nn.Parameter(torch.empty(1, **factory))
            if support == "local":
                self.rho = self._check_radius(lattice, support_radius)
        self.reset_parameters()

    @staticmethod
    def _check_radius(lattice: torch.Tensor, radius: float | None) -> float:
        reach_one = ref.support_radius(lattice, 1) / 1.25
        if radius is None:
            return ref.support_radius(lattice, 3)
        if isinstance(radius, bool) or not isinstance(radius, numbers.Real):
            raise TypeError(f"support_radius must be a real number, got {radius!r}")
        if not math.isfinite(radius):
            raise ValueError(f"support_radius must be finite, got {radius!r} (use support='global' for global support)")
        if radius <= reach_one:
            raise ValueError(f"support_radius={radius} leaves weights with no lattice point; it must exceed {reach_one:.4f}")
        return float(radius)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if hasattr(self, "lattice"):
            # The lattice is derived from n, not saved: rebuilt in fp32 whatever the parameters are
            # cast to, and with real values after ``to_empty`` (meta -> device loading).
            self.lattice = ref.eisenstein_lattice(self.n_control_points).to(self.lattice.device)
        return self

    # ---- parameters ---------------------------------------------------------------------------
    @property
    def _kind(self) -> int:
        return ref.BSPLINE if self.basis == "bspline" else ref.BICUBIC

    def _grid_control(self) -> torch.Tensor:
        """The control grid of a separable basis; bicubic zero-pads n to K x K, K = ceil(sqrt(n))."""
        return ref.control_grid(self.control)

    def _sigma(self) -> torch.Tensor | None:
        return ref.gaussian_width(self.log_bandwidth) if self.basis == "gaussian" else None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Uniform control values scaled so that mean(W^2) equals nn.Linear's default init, the
        Gaussian's bandwidth at the lattice spacing (neighbouring control points overlap without
        washing W out; tensor-spline starts at 1.0, ``from_tensor_spline`` copies it), nn.Linear's
        bias (nothing to do on the meta device: ``to_empty`` and ``load_state_dict`` fill the values)."""
        if self.control.is_meta:
            return
        if self.basis == "gaussian":
            spacing = torch.pdist(self.lattice.double()).min().item() if self.n_control_points > 1 else 1.0
            self.log_bandwidth.fill_(math.log(spacing))
        self.control.uniform_(-1, 1)
        if self.basis in _FIELD:
            sigma = None if self.basis != "gaussian" else ref.gaussian_width(full_value(self.log_bandwidth))
            w = ref.field_weight(full_value(self.control).double(), self.lattice, sigma,
                                 min(self.out_features, 64), min(self.in_features, 64), _FIELD[self.basis], self.rho)
            mean_sq = w.pow(2).mean().item()
        else:
            mean_sq = _separable_mean_sq(ref.control_grid(full_value(self.control)), self.out_features,
                                         self.in_features, self._kind)
        _scale_to_fan_in(self.control, mean_sq, self.in_features)
        self.reset_bias()

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._prepare(x)
        x, bias = cast(x, dtype), cast(self.bias, dtype)
        if self.basis in _FIELD:  # the op maps the Gaussian's log_bandwidth to its width itself
            log_bandwidth = cast(self.log_bandwidth, dtype) if self.basis == "gaussian" else None
            return ops.field_linear(x, cast(self.control, dtype), self.lattice, log_bandwidth, bias,
                                    self.out_features, self.in_features, _FIELD[self.basis], self.rho, False)
        # bicubic's (n,) values go to the op as they are, which makes their grid: no grid view
        # for autograd to record and replay per call
        return ops.separable(x, cast(self.control, dtype), bias, self.out_features, self._kind)

    def materialize(self) -> torch.Tensor:
        if self.basis in _FIELD:
            w = ref.field_weight(self.control, self.lattice, self._sigma(), self.out_features, self.in_features,
                                 _FIELD[self.basis], self.rho)
        else:
            w = ref.separable_weight(self._grid_control(), self.out_features, self.in_features, self._kind)
        return w.to(self.control.dtype)

    def _settings(self) -> dict[str, float]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "basis": BASES.index(self.basis), "support": self.support == "local", "support_radius": self.rho}

    def _describe(self, name: str, value: float) -> str:
        if name == "basis" and value in range(len(BASES)):
            return repr(BASES[int(value)])
        if name == "support" and value in (0, 1):
            return repr(("global", "local")[int(value)])
        return super()._describe(name, value)

    def _structure(self) -> str:
        if self.basis == "bspline":
            return f"basis='bspline', grid={self.grid}"
        local = f", support='local', support_radius={self.rho:.3f}" if self.support == "local" else ""
        return f"basis={self.basis!r}, n_control_points={self.n_control_points}{local}"

    @classmethod
    def from_linear(cls, linear: nn.Linear, grid=None, input_gram: torch.Tensor | None = None, *,
                    basis: str = "bspline", damping: float = 1e-6) -> SplineLinear:
        """Least-squares B-spline fit of ``linear.weight`` W ``(out, in)``: W_hat = Bo C Bi.T with the
        ``(out, G_out)`` and ``(in, G_in)`` bases (``grid`` defaults as in the constructor).

        Without ``input_gram``: C = pinv(Bo) W pinv(Bi).T minimises ||W - W_hat||_F. With the
        calibration Gram G = X.T X ``(in, in)`` it minimises the output error ||(W - W_hat) X.T||_F,
        i.e. ||(W - W_hat) S||_F with S S = G + damping mean(diag G) I; through the Kronecker
        structure the minimum-norm solution is C = pinv(Bo) W G Bi pinv(Bi.T G Bi). Computed in
        float64, stored in the Linear's dtype; the bias is copied. Only ``basis="bspline"`` is
        linear in its control grid, so it is the only basis fitted here. Attaches ``fit_report``.
        """
        if basis != "bspline":
            raise ValueError(f"from_linear fits basis='bspline' only (the one basis whose weight is linear in a "
                             f"control grid, so least squares is closed form), got basis={basis!r}")
        w, gram = fit_inputs(linear, input_gram)
        new = cls(linear.in_features, linear.out_features, grid=grid, bias=linear.bias is not None,
                  device=w.device, dtype=w.dtype)
        bo = ref.basis_matrix(new.out_features, new.grid[0], ref.BSPLINE, torch.float64, w.device)
        bi = ref.basis_matrix(new.in_features, new.grid[1], ref.BSPLINE, torch.float64, w.device)
        if gram is None:
            right = torch.linalg.pinv(bi).T
        else:
            g_bi = damped_gram(gram, damping) @ bi
            right = g_bi @ torch.linalg.pinv(bi.T @ g_bi, hermitian=True)
        with torch.no_grad():
            new.control.copy_(torch.linalg.pinv(bo) @ w.double() @ right)
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        method = "spline least squares" if gram is None else "weighted spline least squares"
        new.fit_report = fit_report(method, w, new, input_gram=gram, grid=new.grid)
        return new

    @classmethod
    def from_tensor_spline(cls, module: nn.Module) -> SplineLinear:
        """Convert a ``tensor_spline.SplineLinear``: same outputs and gradients (its "bspline" is our
        "bicubic"); parameters are copied, so the two train independently afterwards."""
        if getattr(module, "basis", None) not in _TENSOR_SPLINE_BASIS:
            raise TypeError(f"expected a tensor_spline.SplineLinear, got {type(module).__name__}")
        values = module.control_values
        new = cls(module.in_features, module.out_features, basis=_TENSOR_SPLINE_BASIS[module.basis],
                  n_control_points=module.n_control_points, bias=module.bias is not None,
                  device=values.device, dtype=values.dtype)
        with torch.no_grad():
            new.control.copy_(values)
            if module.basis == "gaussian":
                new.log_bandwidth.copy_(module.log_bandwidth)
            if module.bias is not None:
                new.bias.copy_(module.bias)
        return new


class HierarchicalSplineLinear(SavedSettings, CompressedLinear):
    """Sum of a coarse and a fine clamped cubic B-spline grid: W = Bo_c C_c Bi_c.T + Bo_f C_f Bi_f.T.

    Both levels are smooth and genuinely multi-scale (the coarse one carries the global shape, the
    fine one local detail); each is applied separably, so W is never formed.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 coarse_grid=None, fine_grid=None) -> None:
        super().__init__(in_features, out_features, check_flag("bias", bias), device, dtype)
        fine = fine_grid if fine_grid is not None else (default_grid(out_features), default_grid(in_features))
        self.fine_grid = check_grid(fine, "fine_grid")
        coarse = coarse_grid if coarse_grid is not None else tuple(max(4, g // 4) for g in self.fine_grid)
        self.coarse_grid = check_grid(coarse, "coarse_grid")
        factory = {"device": device, "dtype": dtype}
        self.control_coarse = nn.Parameter(torch.empty(self.coarse_grid, **factory))
        self.control_fine = nn.Parameter(torch.empty(self.fine_grid, **factory))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each level gets half of nn.Linear's default weight variance, the bias nn.Linear's
        (nothing to do on meta)."""
        if self.control_fine.is_meta:
            return
        for c in (self.control_coarse, self.control_fine):
            c.uniform_(-1, 1)
            mean_sq = _separable_mean_sq(c, self.out_features, self.in_features, ref.BSPLINE)
            _scale_to_fan_in(c, mean_sq, self.in_features, share=0.5)
        self.reset_bias()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._prepare(x)
        x = cast(x, dtype)
        # one op for both levels: the fine level's output pass adds the coarse output (no separate add)
        coarse, fine = cast(self.control_coarse, dtype), cast(self.control_fine, dtype)
        return ops.separable(x, coarse, cast(self.bias, dtype), self.out_features, ref.BSPLINE, fine)

    def materialize(self) -> torch.Tensor:
        w = sum(ref.separable_weight(c, self.out_features, self.in_features, ref.BSPLINE)
                for c in (self.control_coarse, self.control_fine))
        return w.to(self.control_fine.dtype)

    def _settings(self) -> dict[str, float]:
        return {"in_features": self.in_features, "out_features": self.out_features}

    def _structure(self) -> str:
        return f"coarse_grid={self.coarse_grid}, fine_grid={self.fine_grid}"
