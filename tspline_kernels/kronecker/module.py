"""KroneckerLinear: an nn.Linear replacement with NdLinear's per-mode maps, W = A_1 (x) ... (x) A_N."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .._fit import damped_gram, fit_inputs, output_error, weighted_als
from .._layers import (CompressedLinear, FitReport, SavedSettings, cast, check_count, check_flag, check_ints,
                       fit_report)
from ..reference import kronecker as ref
from ..reference.common import compute_dtype
from . import ops

GATING_MODES = ("soft", "hard")


def check_dims(in_dims: Sequence[int], out_dims: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validated ``(in_dims, out_dims)``: equally long, non-empty sequences of positive ints."""
    ins, outs = check_ints("in_dims", in_dims, 1), check_ints("out_dims", out_dims, 1)
    if not ins or not outs:
        raise ValueError(f"in_dims and out_dims need at least one mode, got {ins} and {outs}")
    if len(ins) != len(outs):
        raise ValueError(f"in_dims and out_dims need the same number of modes, got {ins} and {outs}")
    return ins, outs


def _check_gated_modes(gated_modes, n: int, transform_outer: bool) -> tuple[int, ...]:
    """NdLinearGated's choice as mode indices: "all", "first" (the first mode applied) or indices."""
    if isinstance(gated_modes, str):
        if gated_modes not in ("all", "first"):
            raise ValueError(f'gated_modes must be "all", "first" or a sequence of mode indices, got {gated_modes!r}')
        return tuple(range(n)) if gated_modes == "all" else (0,) if transform_outer else (n - 1,)
    modes = check_ints("gated_modes", gated_modes, 0)
    if not modes or max(modes) >= n:
        raise ValueError(f"gated_modes needs mode indices in [0, {n}) (at least one; gated=False gates none), "
                         f"got {modes}")
    return tuple(sorted(set(modes)))


def _split(ins: tuple[int, ...], outs: tuple[int, ...]) -> int:
    """Where the modes are cut into the two groups of the fused op: the cut whose largest grouped
    size is smallest (0 for one mode, whose first group is then the trivial ``(1, 1)`` factor)."""
    return min(range(1, len(ins)), default=0,
               key=lambda s: max(math.prod(ins[:s]), math.prod(outs[:s]), math.prod(ins[s:]), math.prod(outs[s:])))


class KroneckerLinear(SavedSettings, CompressedLinear):
    """``nn.Linear`` with weight W = A_1 (x) ... (x) A_N and NdLinear's per-mode biases.

    x ``(*, prod(in_dims))`` -> y ``(*, prod(out_dims))``: the features are the row-major flattening
    of the mode indices, so ``layer(x.reshape(b, -1)).reshape(b, *out_dims)`` equals
    ``NdLinear(in_dims, out_dims)`` on x ``(b, *in_dims)``. ``factors[k]`` ``(out_dims[k],
    in_dims[k])`` and ``biases[k]`` ``(out_dims[k],)`` are NdLinear's ``align_layers[k]`` weight and
    bias, applied in mode order (reversed when ``transform_outer=False``); the layer is affine,
    y = x @ W.T + ``effective_bias()``. ``bias=False`` drops every per-mode bias.

    ``gated=True`` is NdLinearGated: per gated mode a gate network (``gates[k]``) reads the batch
    mean of that mode's fibres and mixes the transform with an identity path (``projections[k]``,
    a Linear where in_k != out_k); ``gating_mode`` "soft" or "hard", ``gated_modes`` "all", "first"
    or mode indices. The gates depend on the whole batch, as in NdLinearGated, so a gated layer
    has no fixed weight (``materialize`` refuses).

    The modes run as one fused two-factor op: more than two modes are cut into two groups whose
    factors are Kronecker products of the group's modes (small: never the dense weight). A gated
    layer of two modes is one op too, whose kernels find the gates and the mixed factors on chip
    (``ops.kronecker_gated_linear``); with other mode counts the gates run as torch ops. An ungated
    two-mode layer with biases takes that op too, without gates, so that the effective bias is found
    (and differentiated) on chip, not by torch ops. Nothing derived from the parameters is kept
    between calls: a fused optimizer or a write through ``.data`` changes them without a trace.

    The state dict's ``_extra_state`` holds the settings no parameter shape shows
    (``transform_outer``, ``gated``, ``gating_mode``, ``gated_modes``): loading it into a layer
    built with other settings raises instead of silently computing another function.
    """

    def __init__(self, in_dims: Sequence[int], out_dims: Sequence[int], bias: bool = True, device=None, dtype=None,
                 gated: bool = False, transform_outer: bool = True, gating_mode: str = "soft",
                 gating_hidden_dim: int = 16, gated_modes: str | Sequence[int] = "all") -> None:
        ins, outs = check_dims(in_dims, out_dims)
        bias, gated, transform_outer = (check_flag(name, v) for name, v in
                                        (("bias", bias), ("gated", gated), ("transform_outer", transform_outer)))
        if not isinstance(gating_mode, str) or gating_mode not in GATING_MODES:
            raise ValueError(f"gating_mode must be one of {GATING_MODES}, got {gating_mode!r}")
        hidden = check_count("gating_hidden_dim", gating_hidden_dim, 1)
        modes = _check_gated_modes(gated_modes, len(ins), transform_outer)
        if not gated and (gating_mode, hidden, modes) != ("soft", 16, tuple(range(len(ins)))):
            raise ValueError("gating_mode, gating_hidden_dim and gated_modes only apply with gated=True, got "
                             f"gating_mode={gating_mode!r}, gating_hidden_dim={hidden}, gated_modes={gated_modes!r}")
        super().__init__(math.prod(ins), math.prod(outs), False, device, dtype)
        self.in_dims, self.out_dims = ins, outs
        self.transform_outer = transform_outer
        self._cut = _split(ins, outs)
        factory = {"device": device, "dtype": dtype}
        self.factors = nn.ParameterList(nn.Parameter(torch.empty(o, i, **factory)) for i, o in zip(ins, outs))
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(o, **factory)) for o in outs) if bias else None
        self.gated = gated
        if self.gated:
            self.gating_mode = gating_mode
            self.gated_modes = modes
            self.gates = nn.ModuleList(
                nn.Sequential(nn.Linear(i, hidden, **factory), nn.ReLU(), nn.Linear(hidden, 1, **factory), nn.Sigmoid())
                for i in ins
            )
            self.projections = nn.ModuleList(
                nn.Linear(i, o, **factory) if i != o else nn.Identity() for i, o in zip(ins, outs)
            )
        self._reset_maps()  # the gates and projections were drawn by their nn.Linear constructors

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Factors uniform with a common bound such that E[W^2] = 1 / (3 in_features), nn.Linear's
        default, so activations keep its scale; each bias as its mode's nn.Linear(in_k, out_k); a
        gated layer's gate networks and projections as nn.Linear's (after ``to_empty`` they hold
        uninitialised memory too)."""
        self._reset_maps()
        for m in (*self.gates.modules(), *self.projections.modules()) if self.gated else ():
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    @torch.no_grad()
    def _reset_maps(self) -> None:
        bound = math.sqrt(3) * (3 * self.in_features) ** (-1 / (2 * len(self.in_dims)))
        for f in self.factors:
            nn.init.uniform_(f, -bound, bound)
        for b, n in zip(self.biases or (), self.in_dims):
            nn.init.uniform_(b, -1 / math.sqrt(n), 1 / math.sqrt(n))

    # ---- maths --------------------------------------------------------------------------------
    def _mode_maps(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Per-mode factors and biases in x's dtype; for a gated layer the mixes for this batch x."""
        factors = [cast(f, x.dtype) for f in self.factors]
        biases = None if self.biases is None else [cast(b, x.dtype) for b in self.biases]
        if not self.gated:
            return factors, biases
        gates = [(g[0].weight, g[0].bias, g[2].weight, g[2].bias) if k in self.gated_modes else None
                 for k, g in enumerate(self.gates)]
        projections = [None if isinstance(p, nn.Identity) else (p.weight, p.bias) for p in self.projections]
        rows = x.reshape(-1, self.in_features)
        # An empty batch has no mean: its gates read zeros instead of NaN, so the (empty) output has
        # zero, not NaN, gradients for every parameter.
        x_mean = (rows.sum(0, dtype=compute_dtype(x)) / max(rows.shape[0], 1)).reshape(self.in_dims)
        zeros = [f.new_zeros(f.shape[0]) for f in factors]
        mixed_f, mixed_b = ref.gated_modes(x_mean, factors, biases or zeros, gates, projections,
                                           self.gating_mode == "hard", self.transform_outer)
        return [f.to(x.dtype) for f in mixed_f], [b.to(x.dtype) for b in mixed_b]

    def _gated_arguments(self) -> tuple:
        """``ops.kronecker_gated_linear``'s arguments after x for a two-mode layer: factors, biases,
        per mode the gate network and projection (None where ungated or the identity), and the two
        flags. Read from the modules' dicts: ``self.factors`` and ``self.gates[k]`` cost ~0.5 us
        each through ``nn.Module``'s attribute and index lookups."""
        modules = self._modules
        factors = modules["factors"]._parameters
        args = [factors["0"], factors["1"]]
        biases = modules.get("biases")  # None (bias=False) is a plain attribute, not a module
        args += (None, None) if biases is None else biases._parameters.values()
        gated = self.gated_modes if self.gated else ()
        if gated:
            gates, projections = modules["gates"]._modules, modules["projections"]._modules
        for k in ("0", "1"):
            if int(k) in gated:
                first, second = gates[k]._modules["0"]._parameters, gates[k]._modules["2"]._parameters
                proj = projections[k]._parameters
                args += (first["weight"], first["bias"], second["weight"], second["bias"],
                         proj.get("weight"), proj.get("bias"))
            else:
                args += (None,) * 6
        return (*args, self.gated and self.gating_mode == "hard", self.transform_outer)

    def _pair(self, factors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The two factors of the fused op: Kronecker products of the modes before and after the cut."""
        head = ref.kron_factors(factors[:self._cut]) if self._cut else factors[0].new_ones(1, 1)
        return head, ref.kron_factors(factors[self._cut:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = cast(x, self._prepare(x))
        # Two modes, gated or with biases: the gated op, whose kernels find the maps and the
        # closed-form bias on chip (no gate given: the factors as they are), in place of the ~10
        # torch ops for the bias (and, training, their backward).
        if len(self.in_dims) == 2 and (self.gated or self.biases is not None):
            return ops.kronecker_gated_linear(x, *self._gated_arguments())[0]
        return ops.kronecker_linear(x, *self._fused_maps(x))

    def _fused_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(A, B, bias) of the fused two-factor op for the batch x, in x's dtype (x only matters
        to a gated layer)."""
        factors, biases = self._mode_maps(x)
        bias = None if biases is None else cast(ref.effective_bias(factors, biases, self.transform_outer), x.dtype)
        return (*self._pair(factors), bias)

    def _prepare(self, x: torch.Tensor) -> torch.dtype:
        try:
            return super()._prepare(x)
        except ValueError as e:
            if isinstance(x, torch.Tensor) and tuple(x.shape[-len(self.in_dims):]) == self.in_dims:
                raise ValueError(f"{e}; an NdLinear-shaped input (*, *in_dims) = (*, {', '.join(map(str, self.in_dims))}) "
                                 f"must be flattened first: x.flatten(-{len(self.in_dims)})") from None
            raise

    def materialize(self) -> torch.Tensor:
        if self.gated:
            raise RuntimeError("a gated KroneckerLinear has no fixed weight: its gates depend on the input batch")
        # a copy: with one mode the product is the factor itself
        return ref.kronecker_weight(list(self.factors)).to(self.factors[0].dtype, copy=True)

    def effective_bias(self) -> torch.Tensor | None:
        """b_eff ``(out_features,)`` with y = x @ W.T + b_eff (ungated layers), None without biases."""
        if self.gated:
            raise RuntimeError("a gated KroneckerLinear has no fixed bias: its gates depend on the input batch")
        if self.biases is None:
            return None
        return ref.kronecker_bias(list(self.factors), list(self.biases), self.transform_outer).to(self.factors[0].dtype)

    # ---- saved settings -------------------------------------------------------------------------
    def _settings(self) -> dict[str, float]:
        """gating_mode as its index in GATING_MODES (-1 ungated), gated_modes as a bit mask."""
        gating = (GATING_MODES.index(self.gating_mode), sum(1 << k for k in self.gated_modes)) if self.gated else (-1, 0)
        return {"transform_outer": self.transform_outer, "gated": self.gated,
                "gating_mode": gating[0], "gated_modes": gating[1]}

    def _describe(self, name: str, value: float) -> str:
        if name in ("transform_outer", "gated") and value in (0, 1):
            return repr(bool(value))
        if name == "gating_mode" and value in (-1, *range(len(GATING_MODES))):
            return "None (ungated)" if value == -1 else repr(GATING_MODES[int(value)])
        if name == "gated_modes" and float(value).is_integer() and value >= 0:
            return repr(tuple(k for k in range(int(value).bit_length()) if int(value) >> k & 1))
        return super()._describe(name, value)

    # ---- reporting ----------------------------------------------------------------------------
    def dense_parameters(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.biases is not None else 0)

    def _structure(self) -> str:
        text = f"in_dims={self.in_dims}, out_dims={self.out_dims}"
        if not self.transform_outer:
            text += ", transform_outer=False"
        if self.gated:
            text += f", gated={self.gating_mode} on modes {self.gated_modes}"
        return text

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self._structure()}, "
            f"bias={self.biases is not None}, params={self.num_parameters()} "
            f"({self.compression_ratio():.1f}x fewer than dense)"
        )

    # ---- conversions --------------------------------------------------------------------------
    @classmethod
    def from_ndlinear(cls, module: nn.Module) -> KroneckerLinear:
        """Convert an ``ndlinear.NdLinear`` or an NdLinearGated (same outputs on flattened inputs).

        Weights, biases, gate networks and identity projections are copied; ``gated_modes="topk"``
        needs the modes the module picked on its first batch. The two train independently. A mode
        whose Linear has no bias gets a zero bias (trainable here) when another mode has one."""
        layers = getattr(module, "align_layers", None)
        ins, outs = getattr(module, "input_dims", None), getattr(module, "hidden_size", None)
        if not (isinstance(layers, nn.ModuleList) and all(isinstance(m, nn.Linear) for m in layers)
                and ins is not None and outs is not None):
            raise TypeError(f"expected an ndlinear.NdLinear or NdLinearGated, got {type(module).__name__}")
        gated = hasattr(module, "gate_networks")
        kwargs = {}
        if gated:
            modes = module.gated_modes
            if modes == "topk":
                if not module.topk_modes:
                    raise ValueError('gated_modes="topk": the module picks its gated modes on its first batch; '
                                     "run one batch through it before converting")
                modes = tuple(module.topk_modes)
            kwargs = {"gating_mode": module.gating_mode, "gating_hidden_dim": module.gating_hidden_dim,
                      "gated_modes": modes}
        shapes = [tuple(m.weight.shape) for m in layers]
        if shapes != [(o, i) for i, o in zip(ins, outs)]:
            raise ValueError(f"the module's per-mode Linear weights have shapes {shapes}, but its input_dims "
                             f"{tuple(ins)} and hidden_size {tuple(outs)} call for (hidden_size[k], input_dims[k])")
        weight = layers[0].weight
        new = cls(ins, outs, bias=any(m.bias is not None for m in layers), device=weight.device,
                  dtype=weight.dtype, gated=gated, transform_outer=module.transform_outer, **kwargs)
        with torch.no_grad():
            for k, layer in enumerate(layers):
                new.factors[k].copy_(layer.weight)
                if new.biases is not None:
                    new.biases[k].copy_(layer.bias if layer.bias is not None else torch.zeros_like(new.biases[k]))
        if gated:
            new.gates.load_state_dict(module.gate_networks.state_dict())
            new.projections.load_state_dict(module.identity_projections.state_dict())
        return new

    @classmethod
    def from_linear(cls, linear: nn.Linear, in_dims: Sequence[int], out_dims: Sequence[int],
                    input_gram: torch.Tensor | None = None, *, sweeps: int = 10, damping: float = 1e-6,
                    progress: bool = False) -> KroneckerLinear:
        """A two-mode Kronecker product A (x) B (A ``(out_dims[0], in_dims[0])``, B ``(out_dims[1],
        in_dims[1])``) fitted to ``linear.weight`` W ``(out, in)``.

        Without ``input_gram``: the nearest one in Frobenius norm (Van Loan-Pitsianis: rank-1 SVD of
        the rearranged weight R(W), see ``reference/kronecker.py``), the global optimum.

        With ``input_gram`` G = X^T X ``(in, in)`` of the calibration inputs X: minimising
        ||(W - A (x) B) X^T||_F^2 + lambda ||W - A (x) B||_F^2 (lambda = ``damping`` * mean(diag G),
        see ``tspline_kernels._fit``) by alternating least squares started from the Van Loan fit:
        ``sweeps`` rounds of exact minimisation over A with B fixed, then B with A fixed. With
        G' = G + lambda I and P = W G' read as 4-index tensors G'[j1, j2, j1', j2'] and
        P[i1, i2, j1, j2], the A step solves A M = C, M[j1, j1'] = sum (B^T B)[j2, j2'] G'[j1, j2, j1', j2'],
        C[i1, j1] = sum B[i2, j2] P[i1, i2, j1, j2] (and symmetrically for B): in^2 work per step, no
        weight-sized products. The objective never increases; the problem is not convex, so ALS
        reaches a stationary point, not necessarily the global optimum.

        The per-mode biases are the least-squares fit of ``linear.bias`` by the layer's effective bias.
        ``layer.fit_report`` (a :class:`FitReport`) holds the weight's relative error, the
        ``output_error`` on the calibration inputs (None without a Gram) and in ``details``
        ``bias_error``, the relative error of the fitted effective bias, and: without a Gram,
        ``residual`` = ||W - A (x) B||_F = sqrt(sum_{i >= 2} s_i^2) over the singular values s of R(W)
        and ``optimal_error`` = residual / ||W||_F (the smallest relative error any Kronecker product
        reaches); with one, ``start_output_error`` (the Van Loan fit's) and ``als_history``, the ALS
        objective's relative value sqrt(f / ||W S||_F^2) at the start and after every block step.
        """
        weight, gram = fit_inputs(linear, input_gram)
        ins, outs = check_dims(in_dims, out_dims)
        if len(ins) != 2:
            raise ValueError(f"from_linear fits two modes (A (x) B), got {len(ins)}: in_dims={ins}, out_dims={outs}")
        if math.prod(ins) != linear.in_features or math.prod(outs) != linear.out_features:
            raise ValueError(f"in_dims {ins} and out_dims {outs} multiply to ({math.prod(ins)}, {math.prod(outs)}), "
                             f"but the layer has (in_features, out_features) = ({linear.in_features}, {linear.out_features})")
        new = cls(ins, outs, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
        a, b, s = ref.nearest_kronecker(weight, outs, ins)
        if gram is None:
            residual = s[1:].norm()
            details = {"residual": residual.item(), "optimal_error": (residual / s.norm().clamp_min(1e-300)).item()}
        else:
            details = {"start_output_error": output_error(weight, torch.kron(a, b), gram)}
            fit = weighted_als([a, b], lambda f: torch.kron(*f), weight, gram, sweeps, progress=progress,
                               damping=damping, solve=_kronecker_block_solver(weight, gram, outs, ins, damping))
            a, b = fit.blocks
            if a.norm() > 0 and b.norm() > 0:  # A (x) B = (c A) (x) (B / c): split ||A (x) B|| evenly
                balance = (b.norm() / a.norm()).sqrt()
                a, b = a * balance, b / balance
            details["als_history"] = [math.sqrt(f / max(fit.energy, 1e-300)) for f in fit.history]
        with torch.no_grad():
            new.factors[0].copy_(a)
            new.factors[1].copy_(b)
            if linear.bias is not None:
                target = linear.bias.detach().double()
                # b_eff is linear in (b_1, b_2): its columns are the effective biases of unit vectors.
                units = torch.eye(sum(outs), dtype=torch.float64, device=weight.device)
                design = torch.stack([ref.kronecker_bias([a, b], [e[:outs[0]], e[outs[0]:]]) for e in units], 1)
                fit = torch.linalg.lstsq(design, target[:, None], driver="gelsd" if design.is_cpu else None).solution[:, 0]
                new.biases[0].copy_(fit[:outs[0]])
                new.biases[1].copy_(fit[outs[0]:])
                details["bias_error"] = ((design @ fit - target).norm() / target.norm().clamp_min(1e-300)).item()
        method = "nearest Kronecker product" if gram is None else "weighted Kronecker ALS"
        new.fit_report: FitReport = fit_report(method, weight, new, gram, **details)
        return new


def _kronecker_block_solver(weight: torch.Tensor, gram: torch.Tensor, outs: tuple[int, int], ins: tuple[int, int],
                            damping: float) -> Callable[[list[torch.Tensor], int], torch.Tensor]:
    """``solve(blocks, k)`` for :func:`weighted_als` on W ~ A (x) B: the exact minimiser of
    tr(E G' E^T), G' = G + lambda I, over factor k with the other fixed (normal equations in
    ``KroneckerLinear.from_linear``'s docstring; M is symmetric, A M = C is solved as M A^T = C^T)."""
    g = damped_gram(gram, damping)
    g4 = g.reshape(ins[0], ins[1], ins[0], ins[1])
    p4 = (weight.double() @ g).reshape(outs[0], outs[1], ins[0], ins[1])
    driver = "gelsd" if weight.is_cpu else None

    def solve(blocks: list[torch.Tensor], k: int) -> torch.Tensor:
        other = blocks[1 - k]
        if k == 0:
            m = torch.einsum("bd,abcd->ac", other.T @ other, g4)
            c = torch.einsum("kl,ikjl->ij", other, p4)
        else:
            m = torch.einsum("ac,abcd->bd", other.T @ other, g4)
            c = torch.einsum("ij,ikjl->kl", other, p4)
        return torch.linalg.lstsq(m, c.T, driver=driver).solution.T

    return solve
