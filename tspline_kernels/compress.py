"""compress_: swap a model's Linear layers for compressed ones in place, fitted to calibration data.

A config says which format and size every targeted ``nn.Linear`` gets: ``LowRank``,
``TensorTrain``, ``Kronecker``, ``Spline`` (one format, sized per layer by rank, grid or a
per-layer ``ratio``) or ``Auto`` (format and size chosen per layer under one global parameter
budget). A "ratio" is always dense parameters / compressed parameters, biases included (> 1 means
smaller). Fits use the layer's calibration Gram when there is one (``from_linear(...,
input_gram=)``), so they minimise the output error ||(W - W_hat) X^T|| rather than the weight error.
``recommend`` measures every format's error per layer without changing the model; ``sensitivity``
measures how much the model's output moves with each layer's error, as weights for ``Auto``.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import math
import numbers
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch import nn

from ._backend import backend
from ._fit import check_gram, lowrank_error_curve
from ._layers import CompressedLinear, check_count, check_flag, check_grid, check_ints
from .calibration import Calibration, calibrate, check_calibration, collect_inputs, run_calibration, with_progress
from .decoupled import DecoupledSplineMLP
from .kronecker import KroneckerLinear
from .lowrank import LowRankLinear
from .spline import SplineLinear
from .surgery import count_parameters, require_linear, require_untied, swap_module
from .tt import TTLinear, suggest_modes

FORMATS = ("lowrank", "tt", "spline", "kronecker")
DENSE = "dense"
# Auto ignores error decreases below this (squared relative error): rounding, not signal (a
# float32 weight alone carries ~1e-7 relative rounding error, 1e-14 squared).
NEGLIGIBLE = 1e-12

Spec = dict  # the from_linear keyword arguments that fix one layer's structure


def _check_ratio(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not (math.isfinite(value) and value > 1):
        raise ValueError(f"{name} (dense parameters / compressed parameters) must be a finite number > 1, got {value!r}")
    return float(value)


def _exactly_one(config, names: Sequence[str]) -> None:
    given = [n for n in names if getattr(config, n) is not None]
    if len(given) != 1:
        options = " | ".join(f"{n}=" for n in names)
        raise ValueError(f"{type(config).__name__} takes exactly one of {options}, got "
                         f"{', '.join(given) if given else 'none'}")


def _bias(linear: nn.Linear) -> int:
    return linear.out_features if linear.bias is not None else 0


def _budget(linear: nn.Linear, ratio: float) -> float:
    """The parameter count a layer may keep at ``ratio``."""
    return count_parameters(linear) / ratio


# ---- per-family sizing and fitting ---------------------------------------------------------------
# Each family maps a Linear and a size to from_linear's keyword arguments (a Spec), counts the
# parameters a Spec gives without fitting, and fits. ``at_ratio`` returns the largest Spec within
# the ratio's parameter budget, or the reason (a str) why the family has none.

class _LowRankFamily:
    name = "lowrank"

    def params(self, linear: nn.Linear, spec: Spec) -> int:
        return spec["rank"] * (linear.in_features + linear.out_features) + _bias(linear)

    def at_ratio(self, linear: nn.Linear, ratio: float) -> Spec | str:
        rank = int((_budget(linear, ratio) - _bias(linear)) // (linear.in_features + linear.out_features))
        if rank < 1:
            return f"rank 1 already has {self.params(linear, {'rank': 1})} parameters, over the {ratio:g}x budget"
        return {"rank": min(rank, linear.in_features, linear.out_features)}

    def fit(self, linear: nn.Linear, spec: Spec, gram: torch.Tensor | None) -> CompressedLinear:
        return LowRankLinear.from_linear(linear, spec["rank"], input_gram=gram)


class _TTFamily:
    name = "tt"

    def __init__(self, d: int, sweeps: int = 10) -> None:
        self.d, self.sweeps = d, sweeps

    def modes(self, linear: nn.Linear) -> tuple[tuple[int, ...], tuple[int, ...]]:
        m = suggest_modes(linear.out_features, linear.in_features, self.d)
        return m.in_modes, m.out_modes

    def params(self, linear: nn.Linear, spec: Spec) -> int:
        """TT-SVD's ranks are at most min(max_rank, the sizes of both sides of each unfolding)."""
        sizes = [i * o for i, o in zip(spec["in_modes"], spec["out_modes"])]
        cap = spec.get("max_rank") or math.inf
        ranks = [1] + [min(cap, math.prod(sizes[:k + 1]), math.prod(sizes[k + 1:])) for k in range(self.d - 1)] + [1]
        return sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(sizes)) + _bias(linear)

    def at_ratio(self, linear: nn.Linear, ratio: float) -> Spec | str:
        ins, outs = self.modes(linear)
        spec = {"in_modes": ins, "out_modes": outs, "max_rank": 1}
        budget = _budget(linear, ratio)
        if self.params(linear, spec) > budget:
            return (f"modes in={ins}, out={outs} give {self.params(linear, spec)} parameters at rank 1, over the "
                    f"{ratio:g}x budget")
        top = max(linear.in_features, linear.out_features)
        lo, hi = 1, top  # largest max_rank within the budget, by bisection (params grow with max_rank)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.params(linear, {**spec, "max_rank": mid}) <= budget else (lo, mid - 1)
        return {**spec, "max_rank": lo}

    def fit(self, linear: nn.Linear, spec: Spec, gram: torch.Tensor | None) -> CompressedLinear:
        return TTLinear.from_linear(linear, spec["in_modes"], spec["out_modes"], eps=spec.get("eps"),
                                    max_rank=spec.get("max_rank"), input_gram=gram, sweeps=self.sweeps)


class _SplineFamily:
    name = "spline"

    def params(self, linear: nn.Linear, spec: Spec) -> int:
        return math.prod(spec["grid"]) + _bias(linear)

    def at_ratio(self, linear: nn.Linear, ratio: float) -> Spec | str:
        """The grid shaped like the weight (the same share of control points along each axis)."""
        n_out, n_in = linear.out_features, linear.in_features
        points = _budget(linear, ratio) - _bias(linear)
        too_many = (f"a 4 x 4 control grid has {self.params(linear, {'grid': (4, 4)})} parameters, over the "
                    f"{ratio:g}x budget")
        if points < 16:  # also when the bias alone is over the budget (points < 0)
            return too_many
        g_out = min(max(4, math.floor(math.sqrt(points * n_out / n_in))), n_out)
        g_in = min(math.floor(points / g_out), n_in)
        return too_many if g_out < 4 or g_in < 4 else {"grid": (g_out, g_in)}

    def fit(self, linear: nn.Linear, spec: Spec, gram: torch.Tensor | None) -> CompressedLinear:
        return SplineLinear.from_linear(linear, grid=spec["grid"], input_gram=gram)


class _KroneckerFamily:
    name = "kronecker"

    def __init__(self, in_dims: tuple[int, ...] | None = None, out_dims: tuple[int, ...] | None = None) -> None:
        self.in_dims, self.out_dims = in_dims, out_dims

    def spec(self, linear: nn.Linear) -> Spec:
        """The given dims, else the balanced two-mode factorisation of each side."""
        if self.in_dims is None:
            m = suggest_modes(linear.out_features, linear.in_features, 2)
            return {"in_dims": m.in_modes, "out_dims": m.out_modes}
        if math.prod(self.in_dims) != linear.in_features or math.prod(self.out_dims) != linear.out_features:
            raise ValueError(f"Kronecker in_dims={self.in_dims}, out_dims={self.out_dims} multiply to "
                             f"({math.prod(self.in_dims)}, {math.prod(self.out_dims)}), but a targeted layer has "
                             f"(in_features, out_features) = ({linear.in_features}, {linear.out_features}): "
                             "give dims only when every targeted layer has that shape")
        return {"in_dims": self.in_dims, "out_dims": self.out_dims}

    def params(self, linear: nn.Linear, spec: Spec) -> int:
        # one bias per mode (NdLinear's), when the Linear has a bias
        bias = sum(spec["out_dims"]) if linear.bias is not None else 0
        return sum(i * o for i, o in zip(spec["in_dims"], spec["out_dims"])) + bias

    def at_ratio(self, linear: nn.Linear, ratio: float) -> Spec | str:
        spec = self.spec(linear)
        if self.params(linear, spec) > _budget(linear, ratio):
            have = count_parameters(linear) / self.params(linear, spec)
            return (f"in_dims={spec['in_dims']}, out_dims={spec['out_dims']} fix the size at {have:.2f}x, "
                    f"short of {ratio:g}x")
        return spec

    def fit(self, linear: nn.Linear, spec: Spec, gram: torch.Tensor | None) -> CompressedLinear:
        return KroneckerLinear.from_linear(linear, spec["in_dims"], spec["out_dims"], input_gram=gram)


# ---- configs ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LowRank:
    """W = U V^T: a fixed ``rank`` for every layer, or each layer's largest rank within ``ratio``."""

    rank: int | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        _exactly_one(self, ("rank", "ratio"))
        if self.rank is not None:
            check_count("rank", self.rank, 1)
        else:
            _check_ratio("ratio", self.ratio)

    def _plan(self, linear: nn.Linear) -> tuple[_LowRankFamily, Spec | str]:
        family = _LowRankFamily()
        if self.ratio is not None:
            return family, family.at_ratio(linear, self.ratio)
        limit = min(linear.in_features, linear.out_features)
        if self.rank > limit:
            return family, f"rank {self.rank} exceeds min(in_features, out_features) = {limit}"
        return family, {"rank": self.rank}


@dataclass(frozen=True)
class TensorTrain:
    """A ``d``-core tensor train on the balanced modes of ``suggest_modes``: the largest ``max_rank``
    within ``ratio``, or TT-SVD truncated at relative error ``eps`` and/or capped at ``max_rank``.
    With calibration, at most ``sweeps`` sweeps of weighted ALS refine each TT-SVD fit
    (``TTLinear.from_linear``); the first few give most of the gain (all-MiniLM-L6-v2 layers: 3
    sweeps ~97% of the output-error reduction of 10), each further one costs as much."""

    ratio: float | None = None
    eps: float | None = None
    max_rank: int | None = None
    d: int = 3
    sweeps: int = 10

    def __post_init__(self) -> None:
        if self.ratio is not None:
            if self.eps is not None or self.max_rank is not None:
                raise ValueError("TensorTrain takes either ratio= or eps= and/or max_rank=, not both")
            _check_ratio("ratio", self.ratio)
        elif self.eps is None and self.max_rank is None:
            raise ValueError("TensorTrain needs ratio=, eps= or max_rank=")
        if self.eps is not None and (isinstance(self.eps, bool) or not isinstance(self.eps, numbers.Real)
                                     or not 0 <= self.eps < 1):
            raise ValueError(f"eps (the relative error TT-SVD may leave) must be in [0, 1), got {self.eps!r}")
        if self.max_rank is not None:
            check_count("max_rank", self.max_rank, 1)
        check_count("sweeps", self.sweeps, 1)
        suggest_modes(1, 1, self.d)  # validates d

    def _plan(self, linear: nn.Linear) -> tuple[_TTFamily, Spec | str]:
        family = _TTFamily(self.d, self.sweeps)
        if self.ratio is not None:
            return family, family.at_ratio(linear, self.ratio)
        ins, outs = family.modes(linear)
        return family, {"in_modes": ins, "out_modes": outs, "eps": self.eps, "max_rank": self.max_rank}


@dataclass(frozen=True)
class Kronecker:
    """W = A (x) B with A ``(out_dims[0], in_dims[0])``, B ``(out_dims[1], in_dims[1])``; by default
    the balanced two-mode factorisation of each layer's sizes. Its size is fixed by the dims."""

    in_dims: tuple[int, int] | None = None
    out_dims: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if (self.in_dims is None) != (self.out_dims is None):
            raise ValueError("Kronecker takes both in_dims and out_dims, or neither (balanced per layer)")
        if self.in_dims is not None:
            for name in ("in_dims", "out_dims"):
                dims = check_ints(name, getattr(self, name), 1)
                if len(dims) != 2:
                    raise ValueError(f"{name} must be two ints (A (x) B), got {dims}")
                object.__setattr__(self, name, dims)

    def _plan(self, linear: nn.Linear) -> tuple[_KroneckerFamily, Spec | str]:
        family = _KroneckerFamily(self.in_dims, self.out_dims)
        return family, family.spec(linear)


@dataclass(frozen=True)
class Spline:
    """A cubic B-spline control ``grid`` (G_out, G_in) for every layer, or per layer the grid shaped
    like the weight with the most control points within ``ratio``."""

    grid: tuple[int, int] | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        _exactly_one(self, ("grid", "ratio"))
        if self.grid is not None:
            object.__setattr__(self, "grid", check_grid(self.grid))
        else:
            _check_ratio("ratio", self.ratio)

    def _plan(self, linear: nn.Linear) -> tuple[_SplineFamily, Spec | str]:
        family = _SplineFamily()
        return family, family.at_ratio(linear, self.ratio) if self.ratio is not None else {"grid": self.grid}


@dataclass(frozen=True)
class Decoupled:
    """Each MLP block fc2(activation(fc1 x)) replaced by one ``DecoupledSplineMLP`` (W g(V^T x) + b,
    its own cubic B-spline per hidden unit) with the largest rank that keeps at most 1/``ratio``
    of the block's parameters (both Linears), fitted by ``from_mlp`` to the block's values and
    Jacobians at up to ``tokens`` inputs of fc1 drawn from one calibration run of the original model
    (so it needs ``calibration``; padding rows are left out where the model runs with a key-padding
    ``attention_mask``, as for :func:`calibrate`), ``iters`` ALS iterations, ``value_weight`` weighing values against Jacobians. ``include`` selects the
    blocks' first Linears; fc2 and the activation are found for Hugging Face BERT-style encoders
    (``*.intermediate.dense`` -> ``*.intermediate.intermediate_act_fn`` -> ``*.output.dense``; the
    residual and LayerNorm stay) and ``nn.Sequential(..., Linear, activation, Linear, ...)``;
    other models give ``blocks`` = ((fc1_name, fc2_name, activation), ...), the activation being
    the name of the model attribute that holds it or the module itself. fc1 becomes the new layer,
    the activation and fc2 identities (:class:`Absorbed`, which ``save_compressed`` records). The
    report's row is named after fc1, with the fit's held-out relative Jacobian error as
    ``weight_error`` and value error as ``output_error``."""

    ratio: float
    blocks: tuple[tuple[str, str, str | nn.Module], ...] | None = None
    n_basis: int = 12
    iters: int = 5
    tokens: int = 2048
    value_weight: float = 1.0

    def __post_init__(self) -> None:
        _check_ratio("ratio", self.ratio)
        check_count("n_basis", self.n_basis, 4, " (a cubic B-spline needs at least 4 basis functions)")
        check_count("iters", self.iters, 0)
        check_count("tokens", self.tokens, 2)
        if isinstance(self.value_weight, bool) or not isinstance(self.value_weight, numbers.Real) or not (
                math.isfinite(self.value_weight) and self.value_weight >= 0):
            raise ValueError(f"value_weight must be a finite number >= 0, got {self.value_weight!r}")
        if self.blocks is not None:
            if isinstance(self.blocks, (str, bytes)) or not isinstance(self.blocks, Iterable):
                raise TypeError(f"blocks must be a sequence of (fc1_name, fc2_name, activation), got {self.blocks!r}")
            blocks = tuple(tuple(b) if isinstance(b, (tuple, list)) else b for b in self.blocks)
            for b in blocks:
                if not (isinstance(b, tuple) and len(b) == 3 and isinstance(b[0], str) and isinstance(b[1], str)
                        and isinstance(b[2], (str, nn.Module))):
                    raise TypeError("each of blocks must be (fc1_name: str, fc2_name: str, activation: attribute "
                                    f"name or nn.Module of the model), got {b!r}")
            if not blocks:
                raise ValueError("blocks is empty: give at least one (fc1_name, fc2_name, activation)")
            object.__setattr__(self, "blocks", blocks)


_CHEAPEST_FIRST = ("lowrank", "kronecker", "spline", "tt")
_FAMILIES: dict[str, Callable[[], object]] = {
    "lowrank": _LowRankFamily, "tt": lambda: _TTFamily(TensorTrain.d), "spline": _SplineFamily,
    "kronecker": _KroneckerFamily,
}


def _check_formats(formats) -> tuple[str, ...]:
    if isinstance(formats, str) or not isinstance(formats, Iterable):
        raise TypeError(f"formats must be a tuple of format names from {FORMATS}, got {formats!r}")
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats or len(set(formats)) != len(formats):
        raise ValueError(f"formats must be distinct names from {FORMATS} (at least one), got {formats!r}")
    return formats


@dataclass(frozen=True, repr=False)
class Auto:
    """Format and size chosen per layer to minimise the summed squared calibrated output error
    sum_l ||(W_l - W_hat_l) X_l^T||^2 / ||W_l X_l^T||^2 (each layer relative to its own output
    energy; without calibration the weight error, with the bias error Kronecker's per-mode biases
    leave in units of ||W||, as ||(W, b) - (W_hat, b_hat)|| / ||W||; with calibration that bias error
    is not scored: the Gram does not hold the inputs' mean) under one budget: the targeted Linears keep at
    most (their dense parameters) / ``ratio`` parameters in total. Keeping a layer dense is always
    an option. Low rank is scored at every rank from one SVD; TT and spline are fitted at each of
    ``candidate_ratios()`` (per-layer ratios), Kronecker at its one size. The cost is dominated by
    the TT fits (alternating least squares with a Gram, at most ``tt_sweeps`` sweeps each: see
    ``TensorTrain``): leave "tt" out of ``formats`` for speed.
    With ``prune`` (default) formats are scored cheapest first, and a format's sizes are fitted
    nearest the target first, stopping at the first fit that an option already scored matches or
    beats in both parameters and error (a format that loses near the target is not fitted at
    every size); ``prune=False`` fits every candidate.

    Why squared errors: to first order the perturbations of different layers add up in energy,
    and low rank's squared error curve is convex in the parameter count (its steps are the sorted
    squared singular values), which is where greedy allocation is optimal.

    ``weights`` (layer name -> w_l, e.g. from :func:`sensitivity`) minimises sum_l w_l e_l^2
    instead: a layer's relative error says nothing of how much the model's output moves with it
    (all-MiniLM-L6-v2's 36 encoder Linears, 128 calibration and 64 held-out sentences, weights
    from 64: mean held-out embedding cosine 0.75 -> 0.86 at 2x and 0.915 -> 0.944 at 1.33x; the
    uniform whitened low rank reaches 0.80 at 2x). Low rank won every layer there."""

    ratio: float
    formats: tuple[str, ...] = FORMATS
    ratios: tuple[float, ...] | None = None
    weights: Mapping[str, float] | None = None
    prune: bool = True
    tt_sweeps: int = 3

    def __post_init__(self) -> None:
        _check_ratio("ratio", self.ratio)
        check_flag("prune", self.prune)
        check_count("tt_sweeps", self.tt_sweeps, 1)
        object.__setattr__(self, "formats", _check_formats(self.formats))
        if self.weights is not None:
            if not isinstance(self.weights, Mapping):
                raise TypeError(f"weights must map layer names to numbers (see tk.sensitivity), got {self.weights!r}")
            bad = {k: v for k, v in self.weights.items() if isinstance(v, bool) or not isinstance(v, numbers.Real)
                   or not (math.isfinite(v) and v >= 0)}
            if bad:
                raise ValueError(f"weights must be finite numbers >= 0, got {bad}")
            object.__setattr__(self, "weights", {k: float(v) for k, v in self.weights.items()})
        if self.ratios is None:
            return
        if isinstance(self.ratios, (str, bytes)) or not isinstance(self.ratios, Iterable):
            raise TypeError(f"ratios must be a tuple of per-layer ratios > 1, got {self.ratios!r}")
        ratios = tuple(sorted({_check_ratio("ratios[]", r) for r in self.ratios}))
        if not ratios:
            raise ValueError("ratios needs at least one per-layer ratio > 1")
        object.__setattr__(self, "ratios", ratios)

    def __repr__(self) -> str:
        weights = "None" if self.weights is None else f"<{len(self.weights)} layers>"
        return (f"Auto(ratio={self.ratio!r}, formats={self.formats!r}, ratios={self.ratios!r}, weights={weights}, "
                f"prune={self.prune}, tt_sweeps={self.tt_sweeps})")

    def candidate_ratios(self) -> tuple[float, ...]:
        """The per-layer ratios at which TT and spline are fitted: ``ratios``, or by default
        2/3, 1, 1.5 and 2 times the target (at least 1.1), as most layers land near the target."""
        if self.ratios is not None:
            return self.ratios
        return tuple(sorted({max(1.1, self.ratio * f) for f in (2 / 3, 1, 1.5, 2)}))

    def _options(self, linear: nn.Linear, gram: torch.Tensor | None) -> list[tuple[object, Spec | None, int, float]]:
        """(family, spec, params, squared error) of every candidate for one layer, dense first."""
        dense = count_parameters(linear)
        options = [(None, None, dense, 0.0)]
        for name in sorted(self.formats, key=_CHEAPEST_FIRST.index):
            family = _TTFamily(TensorTrain.d, self.tt_sweeps) if name == "tt" else _FAMILIES[name]()
            if name == "lowrank":
                curve = lowrank_error_curve(linear.weight.detach(), gram).square().tolist()
                options += [(family, {"rank": r}, family.params(linear, {"rank": r}), curve[r])
                            for r in range(1, len(curve)) if family.params(linear, {"rank": r}) < dense]
                continue
            if name == "kronecker":
                specs = [family.spec(linear)]  # its one size, whatever the target
            else:  # nearest the target first
                ratios = sorted(self.candidate_ratios(), key=lambda r: abs(math.log(r / self.ratio)))
                specs = [family.at_ratio(linear, r) for r in ratios]
            specs = [s for s in specs if not isinstance(s, str) and family.params(linear, s) < dense]
            for spec in {repr(s): s for s in specs}.values():
                new = family.fit(linear, spec, gram)
                rep = new.fit_report
                error = (rep.relative_error if gram is None else rep.output_error) ** 2
                if gram is None and linear.bias is not None:  # Kronecker's biases fit the bias in least squares
                    error += (rep.details.get("bias_error", 0.0) * _ratio_of_norms(linear.bias, linear.weight)) ** 2
                dominated = any(p <= new.num_parameters() and e <= error for _, _, p, e in options)
                options.append((family, spec, new.num_parameters(), error))
                if dominated and self.prune:
                    break
        return options

    def _allocate(self, targets: list[tuple[str, nn.Linear]], grams: dict[str, torch.Tensor | None],
                  progress: bool) -> dict[str, tuple[object, Spec | str]]:
        weights = dict.fromkeys((name for name, _ in targets), 1.0) if self.weights is None else self.weights
        missing = [name for name, _ in targets if name not in weights]
        if missing:
            raise ValueError(f"Auto's weights have no entry for {', '.join(missing)}: measure them with "
                             "tk.sensitivity over the same layers")
        options = []
        for name, linear in with_progress(targets, progress, desc="Auto: error curves", unit="layer"):
            with _layer(name):
                options.append(self._options(linear, grams[name]))
        budget = sum(count_parameters(linear) for _, linear in targets) / self.ratio
        chosen = allocate([[(p, weights[name] * e) for _, _, p, e in opts] for (name, _), opts in zip(targets, options)],
                          budget)
        plans = {}
        for (name, _), opts, k in zip(targets, options, chosen):
            family, spec, _, _ = opts[k]
            plans[name] = (family, spec) if family is not None else (None, f"Auto keeps it dense ({self.ratio:g}x budget)")
        return plans


def allocate(options: list[list[tuple[int, float]]], budget: float) -> list[int]:
    """Index of the chosen ``(params, error)`` option of every layer such that the chosen params sum
    to at most ``budget``, greedily minimising the summed error: start from each layer's smallest
    option, then repeatedly take the move (one layer, to an option with lower error, by more than
    ``NEGLIGIBLE``) with the largest error decrease per added parameter that still fits, until
    none does.

    Moves are kept in a max-heap; the budget only shrinks, so a layer's best move only gets worse
    and a stale entry is recomputed when it reaches the top (lazy greedy)."""
    params = [np.array([p for p, _ in opts], dtype=np.float64) for opts in options]
    errors = [np.array([e for _, e in opts], dtype=np.float64) for opts in options]
    chosen = [int(np.lexsort((e, p))[0]) for p, e in zip(params, errors)]
    left = budget - sum(p[k] for p, k in zip(params, chosen))
    if left < 0:
        raise ValueError(f"the smallest option of every layer already needs {budget - left:.0f} parameters, over "
                         f"the budget of {budget:.0f}: ask for a smaller ratio")

    def best(i: int) -> tuple[float, int, int, int] | None:
        grow = params[i] - params[i][chosen[i]]
        gain = errors[i][chosen[i]] - errors[i]
        ok = (grow > 0) & (grow <= left) & (gain > NEGLIGIBLE)
        if not ok.any():
            return None
        slope = np.where(ok, gain / np.where(ok, grow, 1), -np.inf)
        j = int(np.argmax(slope))
        return -slope[j], i, j, version[i]

    version = [0] * len(options)
    heap = [m for m in map(best, range(len(options))) if m is not None]
    heapq.heapify(heap)
    while heap:
        _, i, j, v = heapq.heappop(heap)
        if v != version[i]:
            continue  # this layer moved since; its newer best move is in the heap
        grow = params[i][j] - params[i][chosen[i]]
        if grow <= left:
            left -= grow
            chosen[i] = j
            version[i] += 1
        move = best(i)  # after the move, or (it no longer fits) with the budget that is left
        if move is not None:
            heapq.heappush(heap, move)
    return chosen


# ---- reports ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerReport:
    """One layer: ``shape`` (out_features, in_features); ``format`` a name from ``FORMATS`` or
    "dense"; ``structure`` the compressed layer's, or why no fit was made; ``weight_error``
    ||W - W_hat|| / ||W||; ``output_error`` ||(W - W_hat) X^T|| / ||W X^T|| on the calibration
    inputs (None without calibration); both None where no fit was made; ``fit_seconds``."""

    name: str
    shape: tuple[int, int]
    format: str
    structure: str
    params_before: int
    params_after: int
    weight_error: float | None
    output_error: float | None
    fit_seconds: float

    def cells(self) -> list[str]:
        def err(e: float | None) -> str:
            return "-" if e is None else f"{e:.4f}"
        return [self.name, f"{self.shape[0]}x{self.shape[1]}", self.format, self.structure,
                str(self.params_before), str(self.params_after), f"{self.params_before / self.params_after:.2f}x",
                err(self.weight_error), err(self.output_error), f"{self.fit_seconds:.2f}"]


_HEADER = ["layer", "shape", "format", "structure", "params", "after", "ratio", "weight err", "output err", "fit s"]


def _table(rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = [_HEADER, ["---"] * len(_HEADER)] + rows
        return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in lines)
    widths = [max(len(r[k]) for r in [_HEADER] + rows) for k in range(len(_HEADER))]
    return "\n".join("  ".join(c.ljust(w) if k < 4 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths))).rstrip()
                     for r in [_HEADER] + rows)


class _Rows:
    """JSON and table rendering shared by the reports: a dataclass with ``layers`` and scalars."""

    layers: tuple[LayerReport, ...]

    def _rows(self) -> list[list[str]]:
        return [layer.cells() for layer in self.layers]

    def __str__(self) -> str:
        return _table(self._rows(), markdown=False)

    def to_markdown(self) -> str:
        return _table(self._rows(), markdown=True)

    def to_dict(self) -> dict:
        """Plain JSON types (tuples as lists): ``json.loads(report.to_json()) == report.to_dict()``."""
        return json.loads(json.dumps(asdict(self)))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict):
        layers = tuple(LayerReport(**{**row, "shape": tuple(row["shape"])}) for row in data["layers"])
        return cls(**{**data, "layers": layers})

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class CompressionReport(_Rows):
    """What :func:`compress_` did, one :class:`LayerReport` per targeted Linear (module order), the
    config's repr and the call's wall ``seconds`` (calibration and Auto's scoring included).
    ``print(report)`` is a table with a total row; ``to_json`` / ``from_json`` round-trip."""

    layers: tuple[LayerReport, ...]
    config: str
    seconds: float

    @property
    def params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def ratio(self) -> float:
        """Dense / compressed parameters over the targeted Linears."""
        return self.params_before / self.params_after

    def _rows(self) -> list[list[str]]:
        total = [f"total ({len(self.layers)} layers)", "", "", self.config, str(self.params_before),
                 str(self.params_after), f"{self.ratio:.2f}x", "", "", f"{self.seconds:.2f}"]
        return super()._rows() + [total]

    def to_dict(self) -> dict:
        return {**super().to_dict(), "params_before": self.params_before, "params_after": self.params_after,
                "ratio": self.ratio}

    @classmethod
    def from_dict(cls, data: dict) -> CompressionReport:
        return super().from_dict({k: data[k] for k in (f.name for f in fields(cls))})


@dataclass(frozen=True)
class Recommendation(_Rows):
    """What :func:`recommend` measured: for every targeted Linear, one :class:`LayerReport` per
    format at ``ratio`` (where a format cannot reach it, ``structure`` says why and the errors are
    None). The model is not changed."""

    layers: tuple[LayerReport, ...]
    ratio: float

    def best(self) -> dict[str, str]:
        """Layer name -> the format with the lowest output error (weight error without calibration)."""
        out: dict[str, tuple[float, str]] = {}
        for row in self.layers:
            err = row.output_error if row.output_error is not None else row.weight_error
            if err is not None and (row.name not in out or err < out[row.name][0]):
                out[row.name] = (err, row.format)
        return {name: fmt for name, (_, fmt) in out.items()}


# ---- decoupled MLP blocks ---------------------------------------------------------------------------

@dataclass(frozen=True)
class MLPBlock:
    """An MLP block of a model, fc2(activation(fc1 x)): the qualified names of its two Linears and
    of the attribute holding its activation, and the modules themselves."""

    first: str
    second: str
    activation: str
    fc1: nn.Linear
    act: Callable[[torch.Tensor], torch.Tensor]
    fc2: nn.Linear

    @property
    def params(self) -> int:
        return count_parameters(self.fc1) + count_parameters(self.fc2)


def _attribute(model: nn.Module, name: str):
    parent, _, child = name.rpartition(".")
    try:
        return getattr(model.get_submodule(parent), child)
    except AttributeError:
        raise ValueError(f"the model has no attribute {name!r}") from None


def _block(model: nn.Module, first: str, second: str, activation: str | nn.Module) -> MLPBlock:
    """The block with these names (``activation`` a name, or a submodule of ``model``), checked."""
    if isinstance(activation, nn.Module):
        found = [n for n, m in model.named_modules(remove_duplicate=False) if m is activation]
        if not found:
            raise ValueError(f"the activation {activation!r} of block {first!r} is not a submodule of the model: "
                             "give the module or the name of the attribute that holds it, so that it can be "
                             "replaced by nn.Identity()")
        activation = found[0]
    fc1, act, fc2 = (_attribute(model, n) for n in (first, activation, second))
    for role, name, lin in (("first", first, fc1), ("second", second, fc2)):
        if type(lin) is not nn.Linear:
            raise ValueError(f"the {role} Linear of block {first!r}, {name!r}, is a {type(lin).__name__}, "
                             "not an nn.Linear")
    if not callable(act):
        raise ValueError(f"the activation of block {first!r}, {activation!r}, is a {type(act).__name__}, not callable")
    if fc2.in_features != fc1.out_features:
        raise ValueError(f"block {first!r}: {second!r} takes {fc2.in_features} features but {first!r} gives "
                         f"{fc1.out_features}")
    return MLPBlock(first, second, activation, fc1, act, fc2)


def _found_block(model: nn.Module, name: str) -> MLPBlock | None:
    """The block whose first Linear is ``name``: BERT-style or inside an nn.Sequential; else None."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    prefix = parent_name + "." if parent_name else ""
    if child == "dense" and parent_name.rpartition(".")[2] == "intermediate":
        layer = parent_name.rpartition(".")[0]
        layer_prefix = layer + "." if layer else ""
        output = getattr(model.get_submodule(layer), "output", None)
        act = next((a for a in ("intermediate_act_fn", "act_fn", "activation", "act") if hasattr(parent, a)), None)
        if act is not None and type(getattr(output, "dense", None)) is nn.Linear:
            return _block(model, name, f"{layer_prefix}output.dense", f"{prefix}{act}")
    if isinstance(parent, nn.Sequential) and child.isdigit() and int(child) + 2 < len(parent):
        i = int(child)
        if type(parent[i + 2]) is nn.Linear and type(parent[i + 1]) is not nn.Linear:
            return _block(model, name, f"{prefix}{i + 2}", f"{prefix}{i + 1}")
    return None


def find_blocks(model: nn.Module, targets: Sequence[tuple[str, nn.Linear]],
                blocks: Sequence[tuple[str, str, str | nn.Module]] | None = None) -> list[MLPBlock]:
    """The MLP blocks whose first Linear is among ``targets``: the given ``blocks`` (each checked,
    those targeted kept, at least one), or each target's block found by :func:`_found_block`; a targeted
    Linear that is the second Linear of another target's block is part of that block, any other
    raises ValueError."""
    names = [name for name, _ in targets]
    if blocks is not None:
        out = [block for block in (_block(model, *b) for b in blocks) if block.first in names]
        if not out:
            raise ValueError(f"none of the blocks' first Linears ({', '.join(b[0] for b in blocks)}) is a targeted "
                             "nn.Linear: check the names and include / exclude / min_features")
        return out
    found = {name: _found_block(model, name) for name in names}
    seconds = {b.second for b in found.values() if b is not None}
    missing = [name for name, b in found.items() if b is None and name not in seconds]
    if missing:
        raise ValueError(f"no MLP block (Linear, activation, Linear) starts at {', '.join(missing)}: only Hugging "
                         "Face BERT-style blocks (*.intermediate.dense) and nn.Sequential(Linear, activation, "
                         "Linear) are found; set include to the blocks' first Linears (e.g. "
                         "include=r'intermediate\\.dense$'), or pass Decoupled(blocks=[(fc1_name, fc2_name, "
                         "activation)])")
    return [b for name, b in found.items() if b is not None and name not in seconds]


def decoupled_rank(in_features: int, hidden: int, out_features: int, budget: float, n_basis: int = 12) -> int:
    """The largest rank (at most ``hidden``) of a DecoupledSplineMLP ``(in_features, out_features)``
    with at most ``budget`` parameters, rank (in + out + n_basis) + out; 0 when rank 1 is over."""
    return max(0, min(hidden, int((budget - out_features) // (in_features + out_features + n_basis))))


def _block_rank(block: MLPBlock, ratio: float, n_basis: int) -> int:
    m, h, n = block.fc1.in_features, block.fc1.out_features, block.fc2.out_features
    rank = decoupled_rank(m, h, n, block.params / ratio, n_basis)
    if rank < 1:
        raise ValueError(f"ratio={ratio:g} is unreachable for block {block.first!r}: rank 1 already has "
                         f"{m + n + n_basis + n} of its {block.params} parameters")
    return rank


class Absorbed(nn.Identity):
    """The identity left at the place of an MLP block's activation (``role="activation"``) or second
    Linear (``role="second"``) once ``layer``, at the first Linear's place, replaced the whole block
    of ``block_params`` dense parameters. ``save_compressed`` records these places with the layer,
    so that ``load_compressed`` can put the layer back into the original architecture."""

    def __init__(self, layer: nn.Module, role: str, block_params: int) -> None:
        super().__init__()
        object.__setattr__(self, "layer", layer)  # a reference, not a submodule: it lives at fc1's place
        self.role, self.block_params = role, block_params

    def extra_repr(self) -> str:
        return f"{self.role} of the block replaced by a {type(self.layer).__name__}"


def put_module(model: nn.Module, name: str, value) -> None:
    """Set the attribute at qualified ``name`` of ``model`` to ``value`` (a module, or what the
    attribute held before, such as a plain activation function)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if not isinstance(value, nn.Module) and child in parent._modules:
        delattr(parent, child)  # nn.Module refuses to assign a non-module over a child module
    setattr(parent, child, value)


def install_block(model: nn.Module, block: MLPBlock, new: nn.Module) -> None:
    """Put ``new`` (the whole block) at fc1's place, an :class:`Absorbed` identity at the
    activation's and fc2's."""
    swap_module(model, block.first, new, block.fc1)
    for role, name in (("activation", block.activation), ("second", block.second)):
        put_module(model, name, Absorbed(new, role, block.params))


def decouple_block(model: nn.Module, block: MLPBlock, samples: torch.Tensor, rank: int, n_basis: int = 12,
                   iters: int = 5, progress: bool = True, *, install: bool = True, **options):
    """Fit a rank-``rank`` DecoupledSplineMLP to ``block`` at ``samples`` ``(N, in)``
    (``DecoupledSplineMLP.from_mlp``; ``options``: its other keyword arguments), install it in
    ``model`` (:func:`install_block`) and return its report row; with ``install=False`` return
    (the fitted layer, its row) and leave ``model`` as it is."""
    start = time.perf_counter()
    new = DecoupledSplineMLP.from_mlp(block.fc1, block.act, block.fc2, samples, rank, n_basis, iters,
                                      progress=progress, **options)
    seconds = time.perf_counter() - start
    rep = new.fit_report
    row = LayerReport(block.first, (block.fc2.out_features, block.fc1.in_features), "decoupled",
                      f"{new._structure()}, block to {block.second}", block.params,
                      new.num_parameters(), rep.relative_error, rep.output_error, seconds)
    if not install:
        return new, row
    install_block(model, block, new)
    return row


def _decouple(model: nn.Module, config: Decoupled, calibration, targets: list[tuple[str, nn.Linear]],
              progress: bool) -> list[LayerReport]:
    if calibration is None:
        raise ValueError("Decoupled fits each block to its inputs: pass calibration= (a callable run on the model "
                         "or an iterable of batches)")
    if isinstance(calibration, Calibration):
        raise TypeError("Decoupled needs input samples, which a Calibration (Grams only) does not hold: pass the "
                        "calibration callable or batches themselves")
    blocks = find_blocks(model, targets, config.blocks)
    ranks = [_block_rank(b, config.ratio, config.n_basis) for b in blocks]  # raises before any work
    samples = collect_inputs(model, calibration, [(b.first, b.fc1) for b in blocks], config.tokens,
                             progress=progress)
    fitted = []
    for b, rank in with_progress(list(zip(blocks, ranks)), progress, desc="decoupling", unit="block"):
        with _layer(b.first):
            fitted.append(decouple_block(model, b, samples[b.first], rank, config.n_basis, config.iters, progress,
                                         install=False, value_weight=config.value_weight))
    for b, (new, _) in zip(blocks, fitted):  # only once every fit succeeded: a failure leaves the model as it was
        install_block(model, b, new)
    return [row for _, row in fitted]


# ---- entry points -------------------------------------------------------------------------------------

_CONFIGS = (LowRank, TensorTrain, Kronecker, Spline, Auto, Decoupled)


@contextlib.contextmanager
def _layer(name: str):
    """Name the layer in an error raised while working on it: a ValueError or TypeError is raised
    again, same type, with the name in its message; another exception gets a note (Python 3.11+)."""
    try:
        yield
    except Exception as e:
        if type(e) in (ValueError, TypeError):
            raise type(e)(f"layer {name!r}: {e}") from e
        if hasattr(e, "add_note"):
            e.add_note(f"(while fitting layer {name!r})")
        raise


def _check_weights(targets: list[tuple[str, nn.Linear]]) -> None:
    """Every targeted Linear has finite weight and bias values (not on the meta device), before any work."""
    for name, linear in targets:
        for pname, t in (("weight", linear.weight), ("bias", linear.bias)):
            if t is None:
                continue
            if t.is_meta:
                raise ValueError(f"layer {name!r}: its {pname} is on the meta device and has no values to fit: "
                                 "load the weights first")
            if not torch.isfinite(t).all():
                raise ValueError(f"layer {name!r}: its {pname} has non-finite values (inf or NaN): there is nothing "
                                 "to fit (exclude it, or repair the checkpoint)")


def _targets(model: nn.Module, include, exclude, min_features, replacing: bool) -> list[tuple[str, nn.Linear]]:
    """The selected Linears (``require_linear``), refused where tied to another module if they are
    to be ``replacing``-d (``require_untied``) and checked for weights to fit (``_check_weights``)."""
    targets = require_linear(model, include, exclude, min_features)
    if replacing:
        require_untied(model, targets)
    _check_weights(targets)
    return targets


def _targets_and_grams(model: nn.Module, calibration, include, exclude, min_features, progress: bool,
                       replacing: bool = False) -> tuple[list[tuple[str, nn.Linear]], dict[str, torch.Tensor | None]]:
    check_flag("progress", progress)
    targets = _targets(model, include, exclude, min_features, replacing)
    if calibration is None:
        return targets, {name: None for name, _ in targets}
    if not isinstance(calibration, Calibration):
        calibration = calibrate(model, calibration, include, exclude, min_features, progress=progress)
    missing = [name for name, _ in targets if name not in calibration]
    if missing:
        raise ValueError(f"the calibration has no statistics for {', '.join(missing)}: calibrate with the same "
                         "include, exclude and min_features")
    grams = {}
    for name, linear in targets:
        try:
            grams[name] = check_gram(calibration[name].gram, linear.in_features).to(linear.weight.device)
        except (TypeError, ValueError) as e:
            raise type(e)(f"the calibration of {name!r}: {e}") from None
    return targets, grams


def _ratio_of_norms(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a|| / ||b|| (Frobenius, float64): a relative bias error in units of ||W||, so that without a
    Gram a candidate's error is ||(W, b) - (W_hat, b_hat)||_F / ||W||_F."""
    return (a.detach().double().norm() / b.detach().double().norm().clamp_min(1e-300)).item()


def _fit(linear: nn.Linear, family, spec: Spec | str, gram: torch.Tensor | None
         ) -> tuple[CompressedLinear | str, float]:
    """The fitted layer, or why there is none (the family has no size for it, or its fit is not
    smaller than the dense layer), and the seconds the fit took."""
    if isinstance(spec, str):
        return spec, 0.0
    start = time.perf_counter()
    new = family.fit(linear, spec, gram)
    seconds = time.perf_counter() - start
    if new.num_parameters() >= count_parameters(linear):
        return f"{new._structure()} has {new.num_parameters()} parameters, not fewer than dense", seconds
    return new, seconds


def _row(name: str, linear: nn.Linear, fmt: str, structure: str, params_after: int | None = None,
         errors: tuple[float | None, float | None] = (None, None), seconds: float = 0.0) -> LayerReport:
    before = count_parameters(linear)
    return LayerReport(name, (linear.out_features, linear.in_features), fmt, structure, before,
                       before if params_after is None else params_after, *errors, seconds)


def _fitted_row(name: str, linear: nn.Linear, fmt: str, new: CompressedLinear, seconds: float) -> LayerReport:
    rep = new.fit_report
    structure = new._structure()
    if rep.details.get("bias_error", 0.0) > 1e-6:  # Kronecker's per-mode biases fit the bias in least squares
        structure += f", bias error {rep.details['bias_error']:.3g}"
    return _row(name, linear, fmt, structure, new.num_parameters(), (rep.relative_error, rep.output_error), seconds)


def _flat(out) -> torch.Tensor:
    """Every number of a model output (tensors or arrays, nested in tuples, lists or dicts) as one
    float64 CPU vector."""
    if isinstance(out, torch.Tensor):
        return out.detach().double().reshape(-1).cpu()
    if isinstance(out, np.ndarray) and out.dtype.kind in "fiu":
        return torch.from_numpy(out).double().reshape(-1)
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return torch.cat([_flat(o) for o in out] + [torch.zeros(0, dtype=torch.float64)])
    raise TypeError(f"sensitivity compares model outputs, but the calibration produced a {type(out).__name__}: "
                    "make it return tensors or arrays")


@torch.no_grad()
def sensitivity(model: nn.Module, calibration, ratio: float = 2.0, include: str | None = None,
                exclude: str | None = None, min_features: int = 0, *, progress: bool = True) -> dict[str, float]:
    """How much the model's output moves per unit of each targeted Linear's squared calibrated
    output error, for ``Auto(weights=)``: each layer alone is replaced by its calibrated low-rank
    fit at ``ratio``, the calibration is run, and w_l = (||y_l - y||^2 / ||y||^2) / e_l^2, with y
    the dense model's outputs, y_l the outputs with layer l replaced, e_l that fit's relative
    output error. The model is restored. ``calibration`` (a callable or a list of batches, as for
    :func:`calibrate`) runs once per layer plus twice, so keep it small (a few dozen sentences
    for a sentence encoder); its outputs must be tensors or arrays (nested in tuples, lists or dicts)."""
    ratio = _check_ratio("ratio", ratio)
    check_calibration(calibration)
    if not callable(calibration) and iter(calibration) is calibration:
        raise TypeError("sensitivity runs the calibration once per layer: pass a callable or a list of batches, "
                        "not an iterator (it runs once only)")
    cal = calibrate(model, calibration, include, exclude, min_features, progress=False)
    reference = _flat(run_calibration(model, calibration))
    energy = reference.square().sum().clamp_min(1e-300)
    family = _LowRankFamily()
    weights = {}
    for name, linear in with_progress(require_linear(model, include, exclude, min_features), progress,
                                      desc="sensitivity", unit="layer"):
        spec = family.at_ratio(linear, ratio)
        fit = family.fit(linear, {"rank": 1} if isinstance(spec, str) else spec, cal[name].gram.to(linear.weight.device))
        swap_module(model, name, fit, linear)
        try:
            with backend("reference"):  # the same maths; the kernels would only add interpreter time on a CPU
                moved = (_flat(run_calibration(model, calibration)) - reference).square().sum() / energy
        finally:
            swap_module(model, name, linear, linear)
        weights[name] = moved.item() / max(fit.fit_report.output_error ** 2, NEGLIGIBLE)
    return weights


# Auto's formats in config_for: the ones whose candidates are cheap to score (TT's weighted ALS at
# every candidate size costs minutes per wide layer on a CPU; spline ~10 s)
QUICK_AUTO_FORMATS = ("lowrank", "kronecker")


def config_for(fmt: str, ratio: float | None = None):
    """The config of format ``fmt`` ("lowrank", "tt", "spline", "kronecker" or "auto") at ``ratio``
    (Kronecker: its one balanced size, no ratio; Auto: over ``QUICK_AUTO_FORMATS``)."""
    if fmt == "kronecker":
        if ratio is not None:
            raise ValueError("kronecker has one size per layer (the balanced factorisation of its features): "
                             "give no ratio")
        return Kronecker()
    makers = {"lowrank": LowRank, "tt": TensorTrain, "spline": Spline,
              "auto": lambda ratio: Auto(ratio=ratio, formats=QUICK_AUTO_FORMATS)}
    if fmt not in makers:
        raise ValueError(f"format must be one of {(*makers, 'kronecker')}, got {fmt!r}")
    if ratio is None:
        raise ValueError(f"format {fmt!r} needs a ratio (dense / compressed parameters, > 1)")
    return makers[fmt](ratio=ratio)


@torch.no_grad()
def compress_(model: nn.Module, config, calibration=None, include: str | None = None, exclude: str | None = None,
              min_features: int = 0, *, progress: bool = True) -> CompressionReport:
    """Replace the targeted ``nn.Linear`` modules of ``model`` (see ``select_linear``) in place by
    the compressed layers ``config`` asks for, fitted to each layer's calibration Gram when
    ``calibration`` is given (a :class:`Calibration`, or what :func:`calibrate` takes). A layer
    the format cannot make smaller at the requested size stays dense; its row says why.
    :class:`Decoupled` replaces whole MLP blocks instead (one row per block) and needs the
    calibration callable or batches (samples of each block's input, not Grams).
    Returns a :class:`CompressionReport`."""
    start = time.perf_counter()
    if not isinstance(config, _CONFIGS):
        raise TypeError(f"config must be one of {', '.join(c.__name__ for c in _CONFIGS)}, got {config!r}")
    if isinstance(config, Decoupled):
        check_flag("progress", progress)
        rows = _decouple(model, config, calibration, _targets(model, include, exclude, min_features, True), progress)
        return CompressionReport(tuple(rows), repr(config), time.perf_counter() - start)
    targets, grams = _targets_and_grams(model, calibration, include, exclude, min_features, progress, replacing=True)
    if isinstance(config, Auto):
        plans = config._allocate(targets, grams, progress)
    else:
        plans = {name: config._plan(linear) for name, linear in targets}
    rows, fitted = [], []
    for name, linear in with_progress(targets, progress, desc=f"compressing ({type(config).__name__})", unit="layer"):
        family, spec = plans[name]
        with _layer(name):
            new, seconds = _fit(linear, family, spec, grams[name])
        if isinstance(new, str):
            exact = (0.0, None if grams[name] is None else 0.0)
            rows.append(_row(name, linear, DENSE, f"kept dense: {new}", errors=exact, seconds=seconds))
        else:
            fitted.append((name, linear, new))
            rows.append(_fitted_row(name, linear, family.name, new, seconds))
    for name, linear, new in fitted:  # only once every fit succeeded: a failure leaves the model as it was
        swap_module(model, name, new, linear)
    return CompressionReport(tuple(rows), repr(config), time.perf_counter() - start)


@torch.no_grad()
def recommend(model: nn.Module, calibration, ratio: float, formats: Sequence[str] = FORMATS,
              include: str | None = None, exclude: str | None = None, min_features: int = 0, *,
              progress: bool = True) -> Recommendation:
    """Fit every format in ``formats`` to every targeted Linear at ``ratio`` (each family's largest
    size within it; Kronecker's one size if it is small enough) and report the weight and calibrated
    output errors, without changing ``model``. ``calibration`` as for :func:`compress_` (None
    scores the weight error only)."""
    ratio = _check_ratio("ratio", ratio)
    formats = _check_formats(formats)
    targets, grams = _targets_and_grams(model, calibration, include, exclude, min_features, progress)
    rows = []
    for name, linear in with_progress(targets, progress, desc="recommend", unit="layer"):
        for fmt in formats:
            family = _FAMILIES[fmt]()
            new, seconds = _fit(linear, family, family.at_ratio(linear, ratio), grams[name])
            rows.append(_row(name, linear, fmt, f"n/a: {new}", seconds=seconds) if isinstance(new, str)
                        else _fitted_row(name, linear, fmt, new, seconds))
    return Recommendation(tuple(rows), ratio)
