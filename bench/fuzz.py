"""Fuzz sweep: random layers, options, dtypes and inputs, Triton kernels against the reference.

Every case is reproducible from ``(seed, index)`` (``make_case``). A case draws one layer family
(cycled by index so each family gets the same share), random constructor arguments (odd sizes,
modes and ranks of 1, every basis, support, strategy and gating option, bias on and off), a dtype
(fp32, fp16, bf16), leading batch dims (one row, 3-D, empty ``(0, in)`` and ``(2, 0, in)``), a memory
layout for x (contiguous, transposed, strided, every other row, broadcast with stride 0), an
input magnitude and, for layers whose weight is a product of factors, a skew (first factor times
s, last one divided by s: the same W with larger or smaller intermediates). About one case in ten
instead passes one deliberately invalid argument.

``run_case`` then checks, with ``tspline_kernels.testing``'s per-dtype tolerances (``assert_close``):
  * construction: a valid-looking case either builds or raises a clean ValueError / TypeError
    ("rejected", not a failure); arguments that build, with one invalid argument put in, must
    raise one of those two;
  * Triton (``backend("triton")``, the interpreter on CPU) against the reference: y, dx and the
    gradient of every parameter, in value and dtype, on the same (possibly strided) x; a result
    the reference gives as non-finite is counted, not compared (fp16 overflow of the output). A
    mismatch record adds each backend's error against the reference run in fp64, which tells a
    kernel bug (Triton far, reference close) from an ill-conditioned quantity (both far): a
    mismatch whose Triton error is at most twice the reference's (or within the dtype's RMS
    tolerance) is counted as "ill_conditioned", every other one fails the case;
  * an empty batch gives zero (finite) parameter gradients on both backends;
  * ``device="meta"``: the same layer builds on meta and, after ``to_empty`` and
    ``load_state_dict`` of the real layer's state (large-model loading), computes the same y.

Run ``python -m tspline_kernels.bench.fuzz --cases 10000 --out bench/results/fuzz-<date>.json``
(from the repository root, ``python -m bench.fuzz`` works too). ``--start`` picks the first index,
so a long sweep can be split into chunks (one process each) and joined with ``--merge``;
``--resume`` continues an interrupted run from its last checkpoint in ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import random
import re
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import tspline_kernels as tk
from tspline_kernels.testing import TOLERANCES, assert_close

FAMILIES = (
    "spline-bspline", "spline-bicubic", "spline-gaussian", "spline-eisenstein", "hierarchical",
    "lowrank", "tt", "spline-tt", "kronecker", "kronecker-gated",
)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Leading batch dims of x; the empty ones must give empty y / dx and zero parameter gradients;
# 17 to 33 rows span several row blocks of the interpreter's configs (16 rows).
FEW_ROWS = ((1,), (2,), (3,), (5,), (7,), (9,), (1, 1), (2, 3), (3, 1, 2), (0,), (2, 0))
LEADS = FEW_ROWS + ((17,), (33,), (3, 7))
# Feature counts; 40 and 65 span several 32-wide blocks.
SIZES = (1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 24, 31, 33, 40, 65)
MODES = (1, 1, 2, 3, 4, 5, 7)
# Input magnitudes: fp16's range ends at 65504, the others reach 3e38.
SCALES = {"fp32": (1e-3, 1.0, 1e3), "bf16": (1e-3, 1.0, 1e3), "fp16": (1e-2, 1.0, 1e2, 1e4)}
INVALID_SHARE = 0.1


# ---- inputs ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layout:
    """A memory layout of x ``(*lead, n)``: the shape of a base tensor, the view of it that is x,
    and that view as Python source (``{lead}`` stands for the leading dims)."""

    base: Callable[[tuple[int, ...], int], tuple[int, ...]]
    view: Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]
    code: str


LAYOUTS = {
    "contiguous": Layout(lambda lead, n: (*lead, n), lambda b, lead: b, "x"),
    "transposed": Layout(lambda lead, n: (*lead[:-1], n, lead[-1]), lambda b, lead: b.transpose(-1, -2),
                         "x.transpose(-1, -2)"),
    "strided": Layout(lambda lead, n: (*lead, 2 * n), lambda b, lead: b[..., ::2], "x[..., ::2]"),
    "every-other-row": Layout(lambda lead, n: (2 * lead[0], *lead[1:], n), lambda b, lead: b[::2], "x[::2]"),
    "broadcast": Layout(lambda lead, n: (*(1,) * len(lead), n), lambda b, lead: b.expand(*lead, b.shape[-1]),
                        "x.expand(*{lead}, -1)"),
}


# ---- cases ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    """One fuzz case: a layer (class name and keyword arguments), its dtype and an input."""

    seed: int
    index: int
    family: str
    cls: str
    kwargs: dict
    dtype: str
    lead: tuple[int, ...]
    layout: str
    scale: float
    invalid: str | None = None  # what is deliberately invalid, None for an ordinary case
    skew: float = 1.0  # first factor times skew, last one divided by it (``skew``)
    grads: str = "all"  # which gradients are asked for (``GRADS``)

    @property
    def torch_seed(self) -> int:
        return zlib.crc32(f"fuzz:{self.seed}:{self.index}".encode())

    def arguments(self) -> dict:
        """The layer's keyword arguments: the drawn ones, the invalid override if any, the dtype."""
        return {**self.kwargs, "dtype": DTYPES[self.dtype], **(INVALID[self.family][self.invalid] if self.invalid else {})}

    def layer_code(self) -> str:
        return f"tk.{self.cls}({', '.join(f'{k}={_code(v)}' for k, v in self.arguments().items())})"

    def snippet(self, features: tuple[int, int] | None = None) -> str:
        """Standalone Python that rebuilds this case and prints every disagreement; ``features``
        ``(in, out)`` of the built layer (None: the construction alone)."""
        helpers = (["check_case_inputs"] * (features is not None) + ["skew"] * (self.skew != 1.0)
                   + ["freeze"] * (self.grads in FROZEN))
        lines = ["import torch", "import tspline_kernels as tk"]
        lines += [f"from tspline_kernels.bench.fuzz import {', '.join(helpers)}"] * bool(helpers)
        lines += [f"torch.manual_seed({self.torch_seed})", f"layer = {self.layer_code()}"]
        lines += [f"skew(layer, {self.skew!r})"] * (self.skew != 1.0)
        lines += [f"freeze(layer, {self.grads!r})"] * (self.grads in FROZEN)
        if features is not None:
            n_in, n_out = features
            dt = _code(DTYPES[self.dtype])
            lines += [f"x = torch.randn({LAYOUTS[self.layout].base(self.lead, n_in)}, dtype={dt}) * {self.scale!r}",
                      f"x = {LAYOUTS[self.layout].code.format(lead=self.lead)}",
                      f"g = torch.randn({(*self.lead, n_out)}, dtype={dt})",
                      f"print(check_case_inputs(layer, x, g{', x_grad=False' * (self.grads == 'params-only')}))"]
        return "\n".join(lines)

    def describe(self) -> dict:
        return {"seed": self.seed, "index": self.index, "family": self.family, "layer": self.layer_code(),
                "dtype": self.dtype, "lead": list(self.lead), "layout": self.layout, "scale": self.scale,
                "skew": self.skew, "grads": self.grads, "invalid": self.invalid}


def _code(v) -> str:
    """Python source for a constructor argument."""
    if isinstance(v, torch.dtype):
        return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return f"float('{v}')"
    if isinstance(v, tuple):
        inner = ", ".join(_code(e) for e in v)
        return f"({inner},)" if len(v) == 1 else f"({inner})"
    return repr(v)


def _maybe(rng: random.Random, p: float, value):
    """``value`` with probability ``p``, else None (the argument is left out: its default)."""
    return value if rng.random() < p else None


def _bias(rng: random.Random) -> bool:
    return rng.random() < 0.6


def _features(rng: random.Random) -> dict:
    return {"in_features": rng.choice(SIZES), "out_features": rng.choice(SIZES)}


def _grid(rng: random.Random) -> tuple[int, int]:
    return rng.choice((4, 4, 5, 6, 7, 9, 12)), rng.choice((4, 4, 5, 6, 7, 9, 12))


def _bspline(rng: random.Random) -> dict:
    return {**_features(rng), "grid": _maybe(rng, 0.8, _grid(rng)), "bias": _bias(rng)}


def _bicubic(rng: random.Random) -> dict:
    return {**_features(rng), "basis": "bicubic", "n_control_points": rng.choice((1, 2, 3, 4, 5, 9, 16, 17, 30)),
            "bias": _bias(rng)}


def _field(basis: str) -> Callable[[random.Random], dict]:
    """Generator of a gaussian or eisenstein layer, global or local support (default or random radius)."""
    def generate(rng: random.Random) -> dict:
        kw = {**_features(rng), "basis": basis, "n_control_points": rng.choice((1, 2, 3, 5, 7, 12, 16, 19, 30)),
              "bias": _bias(rng)}
        if rng.random() < 0.5:
            kw.update(support="local", support_radius=_maybe(rng, 0.4, round(rng.uniform(0.3, 2.5), 3)))
        return kw
    return generate


def _hierarchical(rng: random.Random) -> dict:
    return {**_features(rng), "coarse_grid": _maybe(rng, 0.6, _grid(rng)), "fine_grid": _maybe(rng, 0.7, _grid(rng)),
            "bias": _bias(rng)}


def _lowrank(rng: random.Random) -> dict:
    """Ranks 1..min, and above min (which the layer rejects)."""
    f = _features(rng)
    low, high = sorted(f.values())
    return {**f, "rank": rng.choice((1, 1, 2, 3, low, low + 1, 2 * high)), "bias": _bias(rng)}


def _modes(rng: random.Random, d: int) -> tuple[int, ...]:
    """d modes, 1s anywhere; rarely (each such case costs ~10 s under the interpreter) one large
    mode (> 128 or an odd 17) with the others 1."""
    if rng.random() < 0.015:
        big = [1] * d
        big[rng.randrange(d)] = rng.choice((17, 130))
        return tuple(big)
    return tuple(rng.choice(MODES) for _ in range(d))


def _tt(rng: random.Random, budget: int = 1024) -> dict:
    """d = 1..4 (1 is rejected: a TT matrix has 2 to 6 cores), one rank for all or one per bond;
    at most ``budget`` weights (four times that with a large mode) to keep the interpreter fast."""
    d = rng.choice((1, 2, 2, 3, 3, 3, 4, 4))
    ins, outs = _modes(rng, d), _modes(rng, d)
    while math.prod(ins) * math.prod(outs) > (budget if max(ins + outs) < 17 else 4 * budget):
        ins, outs = _modes(rng, d), _modes(rng, d)
    if rng.random() < 0.5:
        ranks = rng.choice((1, 1, 2, 3, 5))
    else:
        ranks = (1, *(rng.choice((1, 2, 3, 4)) for _ in range(d - 1)), 1)
    return {"in_modes": ins, "out_modes": outs, "ranks": ranks, "strategy": rng.choice(("contract", "rebuild", "auto")),
            "bias": _bias(rng)}


def _spline_tt(rng: random.Random) -> dict:
    """A TT structure with one grid for every core or one per core; smaller than TTLinear's (the
    kernels generate every core tile from the control points, slow under the interpreter)."""
    kw = _tt(rng, budget=256)
    return {**kw, "grid": rng.choice((_grid(rng), tuple(_grid(rng) for _ in kw["in_modes"])))}


def _kronecker(rng: random.Random) -> dict:
    n = rng.choice((1, 2, 2, 3, 3))
    if rng.random() < 0.05:  # one mode above the fused kernel's limit: the batched-matmul fallback
        ins = tuple(rng.choice((70, 130)) if k == 0 else 1 for k in range(n))
    else:
        ins = tuple(rng.choice(MODES) for _ in range(n))
    outs = tuple(rng.choice(MODES) for _ in range(n))
    return {"in_dims": ins, "out_dims": outs, "bias": _bias(rng), "transform_outer": rng.random() < 0.7}


def _gated(rng: random.Random) -> dict:
    kw = _kronecker(rng)
    n = len(kw["in_dims"])
    modes = rng.choice(("all", "first", tuple(sorted(rng.sample(range(n), rng.randint(1, n))))))
    return {**kw, "gated": True, "gating_mode": rng.choice(("soft", "hard")),
            "gating_hidden_dim": rng.choice((1, 3, 16)), "gated_modes": modes}


# family -> (layer class in tspline_kernels, generator of its keyword arguments)
GENERATORS: dict[str, tuple[str, Callable[[random.Random], dict]]] = {
    "spline-bspline": ("SplineLinear", _bspline),
    "spline-bicubic": ("SplineLinear", _bicubic),
    "spline-gaussian": ("SplineLinear", _field("gaussian")),
    "spline-eisenstein": ("SplineLinear", _field("eisenstein")),
    "hierarchical": ("HierarchicalSplineLinear", _hierarchical),
    "lowrank": ("LowRankLinear", _lowrank),
    "tt": ("TTLinear", _tt),
    "spline-tt": ("SplineTTLinear", _spline_tt),
    "kronecker": ("KroneckerLinear", _kronecker),
    "kronecker-gated": ("KroneckerLinear", _gated),
}
# Layers whose weight is a product of factors (parameter name of the first and of the last):
# ``skew`` moves magnitude from one to the other without changing W, so intermediates grow or
# shrink while the output stays put.
SKEWED = {"LowRankLinear": ("U", "V"), "TTLinear": ("cores", "cores"), "SplineTTLinear": ("control", "control"),
          "KroneckerLinear": ("factors", "factors")}
SKEWS = (1.0, 1.0, 1e-3, 1e3)
# Which gradients a case asks for, so every backward branch runs: all, x only (parameters frozen),
# the parameters only (x without grad), or every other parameter frozen.
GRADS = ("all",) * 7 + ("input-only", "params-only", "some-params")
FROZEN = {"input-only": slice(None), "some-params": slice(None, None, 2)}

# Deliberately invalid arguments per family (label -> keyword overrides): each must raise a
# ValueError or TypeError. Shared ones apply to every family with in_features / out_features.
_COMMON_INVALID = {
    "in_features=0": {"in_features": 0},
    "in_features=3.0": {"in_features": 3.0},
    "out_features=True": {"out_features": True},
    "out_features=-2": {"out_features": -2},
    "dtype=torch.int32": {"dtype": torch.int32},
}
_FIELD_INVALID = {
    "support_radius=nan": {"support": "local", "support_radius": float("nan")},
    "support_radius=-1": {"support": "local", "support_radius": -1.0},
    "support_radius with support='global'": {"support": "global", "support_radius": 1.0},
    "support='locale'": {"support": "locale"},
    "n_control_points=True": {"n_control_points": True},
    "n_control_points=2.5": {"n_control_points": 2.5},
    "n_control_points=0": {"n_control_points": 0},
    "grid with a field basis": {"grid": (4, 4)},
}
_TT_INVALID = {
    "d=7": {"in_modes": (1,) * 7, "out_modes": (1,) * 7, "ranks": 1},
    "a mode of 0": {"in_modes": (2, 0), "out_modes": (2, 2), "ranks": 1},
    "a float mode": {"in_modes": (2.0, 3), "out_modes": (2, 2), "ranks": 1},
    "boundary rank 2": {"in_modes": (2, 3), "out_modes": (2, 2), "ranks": (2, 2, 1)},
    "ranks=0": {"in_modes": (2, 3), "out_modes": (2, 2), "ranks": 0},
    "ranks=2.0": {"in_modes": (2, 3), "out_modes": (2, 2), "ranks": 2.0},
    "modes of unequal length": {"in_modes": (2, 3, 2), "out_modes": (2, 2), "ranks": 1},
    "strategy='fast'": {"strategy": "fast"},
    "dtype=torch.int32": {"dtype": torch.int32},
}
_KRON_INVALID = {
    "no modes": {"in_dims": (), "out_dims": ()},
    "a mode of 0": {"in_dims": (2, 0), "out_dims": (2, 2)},
    "a float mode": {"in_dims": (2.5, 2), "out_dims": (2, 2)},
    "dims of unequal length": {"in_dims": (2, 3), "out_dims": (2,)},
    "dtype=torch.int32": {"dtype": torch.int32},
}
INVALID: dict[str, dict[str, dict]] = {
    "spline-bspline": {**_COMMON_INVALID, "grid=(4.7, 5.9)": {"grid": (4.7, 5.9)}, "grid=('4', '5')": {"grid": ("4", "5")},
                       "grid=(3, 5)": {"grid": (3, 5)}, "grid=(True, 5)": {"grid": (True, 5)}, "grid=4": {"grid": 4},
                       "grid=(4, 5, 6)": {"grid": (4, 5, 6)}, "n_control_points with bspline": {"n_control_points": 9},
                       "support='local' with bspline": {"support": "local"},
                       "support_radius with bspline": {"support_radius": 1.0}, "basis='spline'": {"basis": "spline"}},
    "spline-bicubic": {**_COMMON_INVALID, **{k: v for k, v in _FIELD_INVALID.items() if "support" not in k},
                       "n_control_points='8'": {"n_control_points": "8"},
                       "support='local' with bicubic": {"support": "local"}},
    "spline-gaussian": {**_COMMON_INVALID, **_FIELD_INVALID},
    "spline-eisenstein": {**_COMMON_INVALID, **_FIELD_INVALID},
    "hierarchical": {**_COMMON_INVALID, "fine_grid=(4.7, 5)": {"fine_grid": (4.7, 5)},
                     "coarse_grid=('4', '5')": {"coarse_grid": ("4", "5")}, "coarse_grid=(2, 4)": {"coarse_grid": (2, 4)}},
    "lowrank": {**_COMMON_INVALID, "rank=0": {"rank": 0}, "rank=2.0": {"rank": 2.0}, "rank=True": {"rank": True},
                "rank=None": {"rank": None}},
    "tt": _TT_INVALID,
    "spline-tt": {**_TT_INVALID, "grid=(3, 4)": {"grid": (3, 4)}, "grid=(4.5, 4)": {"grid": (4.5, 4)},
                  "grid with the wrong number of pairs": {"grid": ((4, 4),) * 5}},
    "kronecker": _KRON_INVALID,
    "kronecker-gated": {**_KRON_INVALID, "gating_mode='medium'": {"gating_mode": "medium"},
                        "gated_modes=(5,)": {"gated_modes": (5,)}, "gated_modes='some'": {"gated_modes": "some"},
                        "gating_hidden_dim=0": {"gating_hidden_dim": 0}},
}


def make_case(seed: int, index: int) -> Case:
    """Case ``index`` of the sweep with ``seed`` (the family cycles with the index)."""
    rng = random.Random(f"fuzz:{seed}:{index}")
    family = FAMILIES[index % len(FAMILIES)]
    cls, generate = GENERATORS[family]
    kwargs = {k: v for k, v in generate(rng).items() if v is not None}  # None: left at its default
    dtype = rng.choice(("fp32", "fp32", "fp16", "bf16"))
    invalid = rng.choice(sorted(INVALID[family])) if rng.random() < INVALID_SHARE else None
    big_modes = max(kwargs.get("in_modes", ()) + kwargs.get("out_modes", ()), default=0) > 16
    lead = rng.choice(FEW_ROWS if big_modes else LEADS)  # a large TT mode is slow enough already
    layout = rng.choice(tuple(LAYOUTS))
    s = rng.choice(SKEWS) if cls in SKEWED and not kwargs.get("gated") else 1.0  # gates would see a new layer
    scale = rng.choice(SCALES[dtype])
    return Case(seed, index, family, cls, kwargs, dtype, lead, layout, scale, invalid, s, rng.choice(GRADS))


@torch.no_grad()
def skew(layer: torch.nn.Module, s: float) -> None:
    """Multiply the layer's first factor by ``s`` and divide its last by ``s`` (an ungated layer's W
    is unchanged; one factor alone stays as it is)."""
    first, last = SKEWED[type(layer).__name__]
    params = dict(layer.named_parameters())
    params[next(n for n in params if n.split(".")[0] == first)].mul_(s)
    params[[n for n in params if n.split(".")[0] == last][-1]].div_(s)


def freeze(layer: torch.nn.Module, grads: str) -> None:
    """Stop gradients of the parameters that ``grads`` ("input-only" or "some-params") leaves out."""
    for p in list(layer.parameters())[FROZEN[grads]]:
        p.requires_grad_(False)


def build(case: Case, device: str | None = None) -> torch.nn.Module:
    """The case's layer (a ValueError / TypeError for arguments it rejects)."""
    device_arg = {} if device is None else {"device": device}
    return getattr(tk, case.cls)(**case.arguments(), **device_arg)


def make_layer(case: Case) -> torch.nn.Module:
    """The case's layer, skewed and partly frozen, from the case's torch seed (as ``Case.snippet`` does)."""
    torch.manual_seed(case.torch_seed)
    layer = build(case)
    if case.skew != 1.0:
        skew(layer, case.skew)
    if case.grads in FROZEN:
        freeze(layer, case.grads)
    return layer


def make_inputs(case: Case, layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``(*lead, in)`` in the case's layout and magnitude, and the output gradient g ``(*lead, out)``,
    drawn from the global generator (as ``Case.snippet`` does)."""
    dtype = DTYPES[case.dtype]
    base = torch.randn(LAYOUTS[case.layout].base(case.lead, layer.in_features), dtype=dtype) * case.scale
    x = LAYOUTS[case.layout].view(base, case.lead)
    g = torch.randn(*case.lead, layer.out_features, dtype=dtype)
    return x, g


# ---- checks ---------------------------------------------------------------------------------------
# A mismatch where the kernels' error against the same maths in fp64 is at most this many times the
# reference's own (or within the dtype's RMS tolerance) is counted as ill-conditioned, not failed.
ILL_CONDITIONED_FACTOR = 2.0
# Notes a case may carry without failing -> the summary counter they go to.
NOTES = {"skipped": "skipped_nonfinite_reference", "ill-conditioned": "ill_conditioned"}
def _error(e: BaseException) -> str:
    """Exception type, message (first 300 characters) and the innermost frame."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}" if tb is not None else ""
    return f"{type(e).__name__}: {str(e)[:300]}{where}"


def _run(layer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, which: str, x_grad: bool = True) -> list:
    """[y, dx (if ``x_grad``), d(param) for every parameter that requires grad] on backend ``which``;
    x keeps its strides."""
    params = [p for p in layer.parameters() if p.requires_grad]
    with tk.backend(which):
        xi = x.detach().requires_grad_(x_grad)
        y = layer(xi)
        return [y.detach(), *torch.autograd.grad(y, [xi] * x_grad + params, g, allow_unused=True)]


def _relative_error(a: torch.Tensor, exact: torch.Tensor) -> float:
    """||a - exact|| / ||exact|| in fp64 (inf where a is not finite)."""
    diff = (a.double() - exact).norm().item()
    return diff / max(exact.norm().item(), 1e-300) if math.isfinite(diff) else math.inf


def check_case_inputs(layer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, x_grad: bool = True) -> list[dict]:
    """Every disagreement between Triton and the reference on ``layer(x)`` with output gradient ``g``
    (y, dx if ``x_grad``, the gradient of every parameter that requires grad), as ``{"check",
    "message"}`` records (empty when all agree). A quantity the reference returns as non-finite is
    reported with check "skipped" and not compared; a mismatch the fp64 run shows to be ill-conditioned
    (``ILL_CONDITIONED_FACTOR``) with check "ill-conditioned"."""
    params = [f"d{n}" for n, p in layer.named_parameters() if p.requires_grad]
    names = ["y"] + ["dx"] * x_grad + params
    results = {}
    for which in ("reference", "triton"):
        try:
            results[which] = _run(layer, x, g, which, x_grad)
        except Exception as e:  # a crash is the finding; any exception type counts
            return [{"check": f"{which} raised", "message": _error(e)}]
    problems, mismatched = [], {}
    for i, (name, got, want) in enumerate(zip(names, results["triton"], results["reference"])):
        if want is None or got is None:
            if (want is None) != (got is None):
                problems.append({"check": name, "message": f"gradient is None on {'triton' if got is None else 'reference'} only"})
            continue
        if got.dtype != want.dtype:
            problems.append({"check": name, "message": f"dtype {got.dtype} != reference {want.dtype}"})
        elif not torch.isfinite(want).all():
            problems.append({"check": "skipped", "message": f"{name}: the reference is not finite"})
        else:
            try:
                assert_close(got, want, x.dtype, name=name)
            except AssertionError as e:
                mismatched[i] = {"check": name, "message": str(e)}
    if mismatched:
        # How far each backend is from the same maths in fp64: a kernel bug leaves the reference
        # close and Triton far; an ill-conditioned quantity leaves both far.
        try:
            exact = _run(copy.deepcopy(layer).double(), x.double(), g.double(), "reference", x_grad)
        except Exception as e:
            exact, note = None, f"; the fp64 reference raised {_error(e)}"
        for i, problem in mismatched.items():
            if exact is not None:
                errors = [_relative_error(results[which][i], exact[i]) for which in ("triton", "reference")]
                note = f"; relative error vs fp64: triton {errors[0]:.2e}, reference {errors[1]:.2e}"
                if errors[0] <= max(ILL_CONDITIONED_FACTOR * errors[1], TOLERANCES[x.dtype][0]):
                    # The kernels are as close to the exact value as the reference itself: the two
                    # disagree because the quantity is ill-conditioned in this dtype, not a bug.
                    problem = {**problem, "check": "ill-conditioned"}
            problems.append({**problem, "message": problem["message"] + note})
    if x.numel() == 0:
        for which, values in results.items():
            for name, grad in zip(params, values[len(names) - len(params):]):
                if grad is not None and not (torch.isfinite(grad).all() and torch.count_nonzero(grad) == 0):
                    problems.append({"check": f"{name} empty batch",
                                     "message": f"{which}: gradient on an empty batch is not zero (max |.| "
                                                f"{grad.double().abs().max().item():.3g})"})
    return problems


def check_meta(case: Case, layer: torch.nn.Module, x: torch.Tensor) -> list[dict]:
    """The layer builds on ``device="meta"`` and, materialised with ``to_empty`` and the real layer's
    state dict, gives the real layer's reference output."""
    try:
        meta = build(case, device="meta")
    except Exception as e:
        return [{"check": "meta", "message": f"construction on device='meta': {_error(e)}"}]
    try:
        meta.to_empty(device=x.device)
        meta.load_state_dict(layer.state_dict())
        with torch.no_grad(), tk.backend("reference"):
            y = layer(x)
            if torch.isfinite(y).all():
                assert_close(meta(x), y, x.dtype, name="y after meta -> to_empty -> load_state_dict")
    except AssertionError as e:
        return [{"check": "meta", "message": str(e)}]
    except Exception as e:
        return [{"check": "meta", "message": f"meta -> to_empty -> load_state_dict -> forward: {_error(e)}"}]
    return []


@dataclasses.dataclass
class Result:
    """What ``run_case`` found: ``outcome`` is "pass", "rejected" (the layer refused an ordinary
    argument with a clean error), "invalid-rejected" (arguments the layer accepts plus one
    deliberately invalid one were refused, as they must be) or "fail"; ``problems`` the failing
    checks (and the ``NOTES``)."""

    case: Case
    outcome: str
    problems: list[dict]
    seconds: float  # wall clock
    cpu_seconds: float  # this process's CPU time (what one core needs, whatever else runs)
    message: str = ""
    features: tuple[int, int] | None = None


def run_case(case: Case) -> Result:
    """Build the case's layer and run every check on it."""
    start, cpu_start = time.perf_counter(), time.process_time()

    def done(outcome: str, problems: list[dict], message: str = "", features=None) -> Result:
        if outcome == "pass" and any(p["check"] not in NOTES for p in problems):
            outcome = "fail"
        return Result(case, outcome, problems, time.perf_counter() - start, time.process_time() - cpu_start,
                      message, features)

    try:  # the drawn arguments, without the invalid override
        layer = make_layer(dataclasses.replace(case, invalid=None))
    except (ValueError, TypeError) as e:
        return done("rejected", [], _error(e))
    except Exception as e:
        return done("fail", [{"check": "construction", "message": f"not a ValueError/TypeError: {_error(e)}"}])
    if case.invalid:  # the same arguments are accepted; with the override they must not be
        try:
            build(case)
        except (ValueError, TypeError) as e:
            return done("invalid-rejected", [], _error(e))
        except Exception as e:
            return done("fail", [{"check": "construction", "message": f"{case.invalid}: not a ValueError/TypeError: {_error(e)}"}])
        return done("fail", [{"check": "construction", "message": f"accepted the invalid argument {case.invalid}"}])
    try:
        x, g = make_inputs(case, layer)
        problems = check_case_inputs(layer, x, g, case.grads != "params-only") + check_meta(case, layer, x)
    except Exception as e:  # recorded, so that one case cannot end a long sweep
        problems = [{"check": "harness", "message": _error(e)}]
    return done("pass", problems, features=(layer.in_features, layer.out_features))


# ---- the sweep ------------------------------------------------------------------------------------
def _signature(family: str, problem: dict) -> str:
    """A failure's kind for counting distinct failures: family, check (parameter indices dropped) and
    the message with its numbers blanked."""
    return f"{family} | {_param_pattern(problem['check'])} | {_blank(problem['message'])}"


def _param_pattern(check: str) -> str:
    """A check's name with parameter indices replaced by * (dcores.2 -> dcores.*)."""
    return re.sub(r"\.\d+", ".*", check)


def _blank(message: str) -> str:
    """The first 120 characters of ``message`` with every number replaced by #."""
    return re.sub(r"[-+]?\d[\d.e+-]*", "#", message)[:120]


RECORDS_PER_KIND = 20  # failure records kept per distinct failure (the counts cover every case)


def empty_summary(seed: int, start: int, stop: int) -> dict:
    return {"seed": seed, "start": start, "stop": stop, "next_index": start, "cases": 0, "seconds": 0.0, "cpu_seconds": 0.0,
            "outcomes": {}, "per_family": {}, "mismatches": {}, "skipped_nonfinite_reference": {}, "ill_conditioned": {},
            "distinct_failures": {}, "rejected_messages": {}, "failures": []}


def record(summary: dict, result: Result) -> None:
    """Add one case's result to ``summary``: counts, and the failure record of a failing case while
    one of its failures has been seen at most ``RECORDS_PER_KIND`` times."""
    case = result.case
    summary["cases"] += 1
    summary["seconds"] += result.seconds
    summary["cpu_seconds"] += result.cpu_seconds
    summary["next_index"] = case.index + 1
    _bump(summary["outcomes"], result.outcome)
    fam = summary["per_family"].setdefault(case.family, {})
    _bump(fam, "cases")
    _bump(fam, "cpu_seconds", result.cpu_seconds)
    _bump(fam, result.outcome)
    if result.outcome == "rejected":
        _bump(summary["rejected_messages"], f"{case.family} | {_blank(result.message)}")
    new_kind = False
    for p in result.problems:
        if p["check"] in NOTES:
            _bump(summary[NOTES[p["check"]]], p["message"].split(":")[0])
            continue
        _bump(summary["mismatches"], _param_pattern(p["check"]))
        _bump(fam, "mismatches")
        signature = _signature(case.family, p)
        _bump(summary["distinct_failures"], signature)
        new_kind |= summary["distinct_failures"][signature] <= RECORDS_PER_KIND
    if result.outcome == "fail" and new_kind:
        summary["failures"].append({**case.describe(), "snippet": case.snippet(result.features),
                                    "problems": [p for p in result.problems if p["check"] not in NOTES]})


def _bump(counts: dict, key: str, n: int = 1) -> None:
    counts[key] = counts.get(key, 0) + n


def merge(summaries: Sequence[dict]) -> dict:
    """One summary from several chunks of the same seed (counts added, failures concatenated)."""
    seeds = {s["seed"] for s in summaries}
    if len(seeds) != 1:
        raise ValueError(f"chunks of different seeds cannot be merged: {sorted(seeds)}")
    out = empty_summary(seeds.pop(), min(s["start"] for s in summaries), max(s["stop"] for s in summaries))
    out["next_index"] = max(s["next_index"] for s in summaries)
    for s in summaries:
        out["cases"] += s["cases"]
        out["seconds"] += s["seconds"]
        out["cpu_seconds"] += s["cpu_seconds"]
        out["failures"] += s["failures"]
        for key in ("outcomes", "mismatches", *NOTES.values(), "distinct_failures", "rejected_messages"):
            for k, n in s.get(key, {}).items():  # chunks written before a counter existed lack it
                _bump(out[key], k, n)
        for family, counts in s["per_family"].items():
            for k, n in counts.items():
                _bump(out["per_family"].setdefault(family, {}), k, n)
    return out


def write(path: Path, summary: dict) -> None:
    """Write ``summary`` with run metadata, the case rate and the failure count on top."""
    from .harness import metadata

    data = dict(summary)
    data["meta"] = metadata("cpu")
    data["meta"]["torch_threads"] = torch.get_num_threads()
    data["cases_per_second"] = round(summary["cases"] / max(summary["seconds"], 1e-9), 3)
    data["cases_per_cpu_second"] = round(summary["cases"] / max(summary["cpu_seconds"], 1e-9), 3)
    data["failed_cases"] = summary["outcomes"].get("fail", 0)
    data["mismatch_total"] = sum(summary["mismatches"].values())
    data["distinct_failures"] = dict(sorted(summary["distinct_failures"].items(), key=lambda kv: -kv[1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def sweep(seed: int, start: int, cases: int, out: Path, resume: bool = False, checkpoint: int = 100,
          progress: bool = True) -> dict:
    """Run cases ``start .. start + cases - 1`` of ``seed``, writing ``out`` every ``checkpoint`` cases
    and at the end; with ``resume`` continue the summary already in ``out``."""
    summary = empty_summary(seed, start, start + cases)
    if resume and out.exists():
        old = json.loads(out.read_text())
        if (old["seed"], old["start"], old["stop"]) != (seed, start, start + cases):
            raise SystemExit(f"{out} holds seed {old['seed']} cases {old['start']}..{old['stop']}, not this run")
        summary = {k: old[k] for k in summary}
    indices = range(summary["next_index"], start + cases)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(indices, desc=f"fuzz seed {seed}", unit="case")
    for i, index in enumerate(indices, 1):
        record(summary, run_case(make_case(seed, index)))
        if bar is not None:
            bar.update()
            bar.set_postfix(failed=summary["outcomes"].get("fail", 0))
        if i % checkpoint == 0:
            write(out, summary)
    if bar is not None:
        bar.close()
    write(out, summary)
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000, help="number of cases to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="first case index (to split a sweep into chunks)")
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/fuzz-<date>-seed<seed>-<start>.json)")
    parser.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="CHUNK", help="merge chunk files into --out; run nothing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the rate on one core)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    date = datetime.date.today().isoformat()
    out = args.out or Path(f"bench/results/fuzz-{date}-seed{args.seed}-{args.start}.json")
    if args.merge:
        summary = merge([json.loads(p.read_text()) for p in args.merge])
        write(out, summary)
    else:
        summary = sweep(args.seed, args.start, args.cases, out, args.resume, progress=not args.no_progress)
    rate = summary["cases"] / max(summary["seconds"], 1e-9)
    cpu_rate = summary["cases"] / max(summary["cpu_seconds"], 1e-9)
    print(f"{summary['cases']} cases, {rate:.2f} cases/s ({cpu_rate:.2f} per CPU second); outcomes {summary['outcomes']}; "
          f"mismatches {sum(summary['mismatches'].values())}; written to {out}")


if __name__ == "__main__":
    main()
