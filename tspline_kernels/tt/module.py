"""TTLinear: an nn.Linear replacement whose weight is a tensor-train (TT) matrix, never formed."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from .._fit import damped_gram, fit_inputs, output_error, weighted_als
from .._layers import CompressedLinear, cast, check_count, check_flag, check_ints, fit_report, full_value
from ..reference import tt as ref
from . import cost, ops

MIN_CORES, MAX_CORES = 2, 6


class TTModes(NamedTuple):
    """A factorisation of a layer's features into TT modes (``TTLinear(*modes, ranks)`` order)."""

    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]


def _check_d(d: int) -> None:
    if not isinstance(d, int) or isinstance(d, bool) or not MIN_CORES <= d <= MAX_CORES:
        raise ValueError(f"a TT matrix here has {MIN_CORES} to {MAX_CORES} cores, got d={d!r}")


def _balanced(n: int, d: int) -> tuple[int, ...]:
    """``d`` factors of ``n`` as equal as possible: prime factors, largest first, each given to the
    currently smallest factor; sorted largest first."""
    primes, p, rest = [], 2, n
    while p * p <= rest:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    if rest > 1:
        primes.append(rest)
    factors = [1] * d
    for q in sorted(primes, reverse=True):
        factors[factors.index(min(factors))] *= q
    return tuple(sorted(factors, reverse=True))


def suggest_modes(out_features: int, in_features: int, d: int) -> TTModes:
    """Balanced mode factorisations of both sizes into ``d`` modes, e.g. 4096 -> (16, 16, 16) for d=3.

    A feature count with a prime factor larger than its d-th root gets unbalanced modes (a prime
    count becomes ``(n, 1, ..., 1)``); pad the layer if that matters.
    """
    _check_d(d)
    n_out, n_in = check_count("out_features", out_features, 1), check_count("in_features", in_features, 1)
    return TTModes(_balanced(n_in, d), _balanced(n_out, d))


def _check_modes(in_modes: Sequence[int], out_modes: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Equally long sequences of 2..6 ints >= 1 (numpy / torch ints accepted; strings, mappings,
    sets, floats and bools refused: TypeError)."""
    ins, outs = check_ints("in_modes", in_modes, 1), check_ints("out_modes", out_modes, 1)
    if len(ins) != len(outs):
        raise ValueError(f"in_modes and out_modes need the same number of modes, got {ins} and {outs}")
    _check_d(len(ins))
    return ins, outs


def _check_ranks(ranks, d: int) -> tuple[int, ...]:
    """``ranks`` as ``(1, r_1, ..., r_{d-1}, 1)``; an int r means ``(1, r, ..., r, 1)``."""
    if hasattr(ranks, "__len__") or isinstance(ranks, str):
        ranks = check_ints("ranks", ranks, 1)
    else:
        ranks = (1,) + (check_count("ranks", ranks, 1),) * (d - 1) + (1,)
    if len(ranks) != d + 1:
        raise ValueError(f"ranks must have d + 1 = {d + 1} entries (1, r_1, ..., r_{{d-1}}, 1), got {ranks}")
    if ranks[0] != 1 or ranks[-1] != 1:
        raise ValueError(f"the boundary ranks must be 1 (ranks = (1, r_1, ..., r_{{d-1}}, 1)), got {ranks}")
    return ranks


def check_structure(in_modes, out_modes, ranks) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Validated ``(in_modes, out_modes, ranks)``; clear ValueErrors otherwise."""
    ins, outs = _check_modes(in_modes, out_modes)
    return ins, outs, _check_ranks(ranks, len(ins))


def _check_product(modes: tuple[int, ...], features: int, name: str) -> None:
    if math.prod(modes) != features:
        raise ValueError(f"{name} modes {modes} multiply to {math.prod(modes)}, but the layer has {name}_features={features}")


def init_scale(cores: list[torch.Tensor], in_features: int) -> float:
    """Factor to multiply every core by so that mean(W^2) = 1 / (3 in_features), nn.Linear's default
    weight variance; ||W||^2 comes from ``tt_norm_sq`` (W is not formed). 1 for meta tensors (no
    values: ``device="meta"`` builds without initialising)."""
    if cores[0].is_meta:
        return 1.0
    n = math.prod(c.shape[1] * c.shape[2] for c in cores)
    mean_sq = ref.tt_norm_sq([full_value(c).detach().double() for c in cores]).item() / n
    return (1.0 / (3 * in_features * max(mean_sq, 1e-300))) ** (1.0 / (2 * len(cores)))


class TTStructured(CompressedLinear):
    """What the TT layers share: validated ``in_modes``, ``out_modes`` and ``ranks``, and the choice
    of Triton kernels, ``strategy``: "contract" (sequential contraction), "rebuild" (W tiles rebuilt
    on chip for ``tl.dot``) or "auto" (cost model, per call, forward and backward picked separately;
    see ``picked_strategy``)."""

    def __init__(self, in_modes: Sequence[int], out_modes: Sequence[int], ranks, bias: bool,
                 device, dtype, strategy: str) -> None:
        ins, outs, rks = check_structure(in_modes, out_modes, ranks)
        super().__init__(math.prod(ins), math.prod(outs), check_flag("bias", bias), device, dtype)
        self.in_modes, self.out_modes, self.ranks = ins, outs, rks
        self.strategy = strategy

    def _factors(self) -> nn.ParameterList:
        """The per-core trainable tensors (their dtype is the kernels' dtype)."""
        raise NotImplementedError

    def _cast_factors(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """The per-core tensors in ``dtype`` for a forward call (read from the list's parameter
        dict: iterating an ``nn.ParameterList`` costs ~2 us per entry in ``__getattr__``)."""
        return [cast(p, dtype) for p in self._factors()._parameters.values()]

    @property
    def strategy(self) -> str:
        return self._strategy

    @strategy.setter
    def strategy(self, value: str) -> None:
        self._strategy = cost.check_strategy(value, self.in_modes, self.out_modes)

    def picked_strategy(self, m: int, dtype: torch.dtype | None = None, backward: bool = False) -> str:
        """The kernel strategy the Triton path runs for ``m`` rows ("contract" or "rebuild"): for the
        forward, or with ``backward`` for the core gradients and dx (picked separately)."""
        dtype = dtype or self._factors()[0].dtype
        return cost.resolve(self.strategy, m, self.in_modes, self.out_modes, self.ranks, dtype.itemsize, backward,
                            cost.state_dtype(dtype).itemsize)


class TTLinear(TTStructured):
    """``nn.Linear`` whose ``(prod out_modes, prod in_modes)`` weight is a tensor-train matrix.

    ``cores[k]`` is ``(r_{k-1}, out_modes[k], in_modes[k], r_k)`` (tltorch ``BlockTT`` layout and
    index order); ``ranks`` is ``(1, r_1, ..., r_{d-1}, 1)`` or one int for every inner rank; d = 2..6.
    ``strategy``: see :class:`TTStructured`.
    """

    def __init__(self, in_modes: Sequence[int], out_modes: Sequence[int], ranks, bias: bool = True,
                 device=None, dtype=None, strategy: str = "auto") -> None:
        super().__init__(in_modes, out_modes, ranks, bias, device, dtype, strategy)
        rks = self.ranks
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(rks[k], o, i, rks[k + 1], device=device, dtype=dtype))
            for k, (o, i) in enumerate(zip(self.out_modes, self.in_modes))
        )
        self.reset_parameters()

    def _factors(self) -> nn.ParameterList:
        return self.cores

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal cores rescaled so that mean(W^2) equals nn.Linear's default init; nn.Linear's bias."""
        for c in self.cores:
            c.normal_()
        scale = init_scale(list(self.cores), self.in_features)
        for c in self.cores:
            c.mul_(scale)
        self.reset_bias()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._prepare(x)
        return ops.tt_linear(cast(x, dtype), self._cast_factors(dtype), cast(self.bias, dtype), self.strategy)

    def materialize(self) -> torch.Tensor:
        return ref.tt_weight(list(self.cores)).to(self.cores[0].dtype)

    def _structure(self) -> str:
        return f"in_modes={self.in_modes}, out_modes={self.out_modes}, ranks={self.ranks}, strategy={self.strategy!r}"

    # ---- conversions ----------------------------------------------------------------------------
    @classmethod
    def from_tltorch(cls, module: nn.Module, strategy: str = "auto") -> TTLinear:
        """Convert a ``tltorch.FactorizedLinear(..., factorization='blocktt')``: same cores, same
        outputs; parameters are copied, so the two train independently afterwards."""
        weight = getattr(module, "weight", None)
        if type(weight).__name__ != "BlockTT" or getattr(module, "n_layers", 1) != 1:
            raise TypeError(f"expected a single-layer tltorch FactorizedLinear with a BlockTT weight, got {type(module).__name__}")
        out_modes, in_modes = weight.tensorized_shape
        factors = [f.detach() for f in weight.factors]
        ranks = (1,) + tuple(f.shape[-1] for f in factors)
        bias = getattr(module, "bias", None)
        new = cls(in_modes, out_modes, ranks, bias=bias is not None, device=factors[0].device,
                  dtype=factors[0].dtype, strategy=strategy)
        with torch.no_grad():
            for core, f in zip(new.cores, factors):
                core.copy_(f)
            if bias is not None:
                new.bias.copy_(bias)
        return new

    @classmethod
    def from_linear(cls, linear: nn.Linear, in_modes: Sequence[int], out_modes: Sequence[int],
                    eps: float | None = None, max_rank: int | None = None, input_gram: torch.Tensor | None = None,
                    *, strategy: str = "auto", sweeps: int = 10, damping: float = 1e-6,
                    progress: bool = False) -> TTLinear:
        """TT-SVD of ``linear.weight`` (Oseledets 2011): ||W - W_hat||_F <= eps ||W||_F whenever
        ``max_rank`` does not bind. Each unfolding keeps the fewest singular values whose discarded
        tail has norm <= eps / sqrt(d - 1) * ||W||_F; ``max_rank`` caps every rank. ``eps=None``
        keeps every numerically nonzero singular value (exact up to rounding) unless capped. The
        cores share ||W|| evenly (``balanced``).

        With the calibration Gram ``input_gram`` G = X.T X ``(in, in)`` the TT-SVD cores (ranks as
        above) start at most ``sweeps`` sweeps of alternating least squares on the output error
        ||(W - W_hat) X.T||_F over the cores (``refine_weighted``; ``damping`` as in
        ``_fit.whiten``; ``progress`` shows a bar), which never ends above the TT-SVD's output
        error. Computed in float64, stored in the Linear's dtype. Attaches ``fit_report`` (measured
        errors; ranks, and with a Gram the start's and the final output error and the ALS objective
        after every step, in its details)."""
        cost.check_strategy(strategy, *_check_modes(in_modes, out_modes))  # before the (long) fit
        fit = fit_tt_cores(linear, in_modes, out_modes, eps, max_rank, input_gram, sweeps, damping, progress)
        ins, outs, ranks = ref.modes_of(fit.cores)
        w = fit.weight
        new = cls(ins, outs, ranks, bias=linear.bias is not None, device=w.device, dtype=w.dtype, strategy=strategy)
        with torch.no_grad():
            for core, c in zip(new.cores, fit.cores):
                core.copy_(c)
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        method = "tt-svd" if fit.gram is None else "tt-svd + weighted als"
        new.fit_report = fit_report(method, w, new, input_gram=fit.gram, **fit.details)
        return new


class CoreFit(NamedTuple):
    """A TT fit of a Linear (``fit_tt_cores``): its weight ``(out, in)`` (its own dtype), the checked
    Gram (float64) or None, the float64 cores ``(r_{k-1}, O_k, I_k, r_k)`` and the report details."""

    weight: torch.Tensor
    gram: torch.Tensor | None
    cores: list[torch.Tensor]
    details: dict


def fit_tt_cores(linear: nn.Linear, in_modes: Sequence[int], out_modes: Sequence[int], eps: float | None,
                 max_rank: int | None, input_gram: torch.Tensor | None, sweeps: int, damping: float,
                 progress: bool) -> CoreFit:
    """``TTLinear.from_linear``'s fit in float64, arguments checked: TT-SVD, then with ``input_gram``
    ``refine_weighted`` over the cores."""
    w, gram = fit_inputs(linear, input_gram)
    ins, outs = _check_modes(in_modes, out_modes)
    _check_product(ins, linear.in_features, "in")
    _check_product(outs, linear.out_features, "out")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, numbers.Real)):
        raise TypeError(f"eps must be a real number or None, got {eps!r}")
    if eps is not None and not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if max_rank is not None:
        max_rank = check_count("max_rank", max_rank, 1)
    sweeps, progress = check_count("sweeps", sweeps, 1), check_flag("progress", progress)
    cores = tt_svd(w.double(), ins, outs, eps, max_rank)
    details = {"ranks": ref.modes_of(cores)[2], "eps": eps, "max_rank": max_rank}
    if gram is not None:
        system = structured_system(cores, w, gram, damping)
        solve = None if system is None else _tt_block_solver(system)
        cores, refined = refine_weighted(cores, ref.tt_weight, w.double(), gram, sweeps, progress, damping, solve)
        details.update(refined)
    return CoreFit(w, gram, balanced(cores), details)


def refine_weighted(blocks: list[torch.Tensor], build: Callable[[list[torch.Tensor]], torch.Tensor],
                    target: torch.Tensor, gram: torch.Tensor, sweeps: int, progress: bool, damping: float,
                    solve: Callable[[list[torch.Tensor], int], torch.Tensor] | None) -> tuple[list[torch.Tensor], dict]:
    """``_fit.weighted_als`` from ``blocks`` on ||(target - build(blocks)) X.T||_F (``build``
    multilinear in the blocks, ``target`` ``(out, in)``, ``gram`` = X.T X checked; ``solve`` an exact
    structured block step or None, see ``weighted_als``). Returns the float64 blocks with the lower
    output error, the start's or the ALS result's (ALS lowers the damped objective, so the
    comparison on G itself makes the guarantee exact), and the details
    ``start_output_error``, ``final_output_error`` and ``als_history``: the ALS objective's relative
    value sqrt(f / ||target S||_F^2) at the start and after every block step (non-increasing), as
    ``KroneckerLinear.from_linear`` reports it."""
    start = output_error(target, build(blocks), gram)
    result = weighted_als(blocks, build, target, gram, sweeps, progress=progress, damping=damping, solve=solve)
    final = output_error(target, build(result.blocks), gram)
    best, err = (result.blocks, final) if final <= start else ([b.double() for b in blocks], start)
    history = [math.sqrt(f / max(result.energy, 1e-300)) for f in result.history]
    return best, {"start_output_error": start, "final_output_error": err, "als_history": history}


# Largest number of entries a structured TT block step may build (its normal matrix or an
# intermediate: 256 MB in float64); a fit with a larger one leaves every step to weighted_als' own solve.
_STRUCTURED_ENTRIES = 1 << 25


def _interfaces(cores: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L ``(O_<k, I_<k, r_{k-1})`` and R ``(r_k, O_>k, I_>k)``, the products of the cores left and right
    of core k, so that W[(x, o, p), (y, i, z)] = sum_{a, b} L[x, y, a] G_k[a, o, i, b] R[b, p, z]."""
    one = cores[k].new_ones(1, 1, 1)
    left = one if k == 0 else ref.head_product(cores[:k + 1])
    right = one
    for core in reversed(cores[k + 1:]):
        a, o, i, _ = core.shape
        right = torch.einsum("aoib,bpz->aopiz", core, right).reshape(a, o * right.shape[1], i * right.shape[2])
    return left, right


def _step_entries(shape: Sequence[int], ins: tuple[int, int], outs: tuple[int, int]) -> int:
    """Largest tensor ``tt_normal_equations`` builds for a core ``shape`` (r0, O_k, I_k, r1) with
    ``ins`` = (I_<k, I_>k) and ``outs`` = (O_<k, O_>k)."""
    r0, o, i, r1 = shape
    (y, z), (xl, xr) = ins, outs
    n = r0 * i * r1
    return max(n * n, n * o, (y * r0) ** 2, (r1 * z) ** 2, min(r0 * z, y * r1) ** 2 * i * i,
               xl * y * r0, r1 * xr * z, r0 * o * xr * i * z)


def tt_normal_equations(cores: list[torch.Tensor], k: int, gram: torch.Tensor, target_gram: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(H ``(n, n)``, C ``(n, O_k)``), n = r_{k-1} I_k r_k: tr(E G E^T), E = W - TT(cores), as a function
    of core k is sum_o (g_o^T H g_o - 2 C[:, o]^T g_o) + const, g_o = core[:, o, :, :] flattened,
    ``gram`` G ``(I, I)``, ``target_gram`` W G ``(O, I)``. G couples input indices only, so one H serves
    every o: with the interfaces L, R (``_interfaces``), LL = sum_x L L and RR = sum_p R R,
        H[(a, i, b), (c, j, d)] = sum LL[y, a, u, c] G[(y, i, z), (u, j, w)] RR[b, z, d, w],
        C[(a, i, b), o] = sum L[x, y, a] (W G)[(x, o, p), (y, i, z)] R[b, p, z]."""
    left, right = _interfaces(cores, k)
    r0, o, i, r1 = cores[k].shape
    (x, y, _), (_, p, z) = left.shape, right.shape
    g6 = gram.reshape(y, i, z, y, i, z)
    ll = torch.einsum("xya,xuc->yauc", left, left)
    rr = torch.einsum("bpz,dpw->bzdw", right, right)
    if r0 * z <= y * r1:  # contract G first with the side that leaves the smaller intermediate
        h = torch.einsum("acizjw,bzdw->aibcjd", torch.einsum("yauc,yizujw->acizjw", ll, g6), rr)
    else:
        h = torch.einsum("yiujbd,yauc->aibcjd", torch.einsum("yizujw,bzdw->yiujbd", g6, rr), ll)
    c = torch.einsum("xya,xopyiz->aopiz", left, target_gram.reshape(x, o, p, y, i, z))
    c = torch.einsum("aopiz,bpz->aibo", c, right)
    n = r0 * i * r1
    return h.reshape(n, n), c.reshape(n, o)


def structured_system(cores: list[torch.Tensor], target: torch.Tensor, gram: torch.Tensor, damping: float
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(G' = G + lambda I, W G'), float64, for ``tt_normal_equations`` on TT cores shaped like ``cores``
    fitted to ``target`` W ``(O, I)``, if no core's step builds more than ``_STRUCTURED_ENTRIES``
    entries; None otherwise (``weighted_als`` then solves every step itself)."""
    ins, outs, _ = ref.modes_of(cores)
    sizes = [_step_entries(c.shape, (math.prod(ins[:k]), math.prod(ins[k + 1:])),
                           (math.prod(outs[:k]), math.prod(outs[k + 1:]))) for k, c in enumerate(cores)]
    if max(sizes) > _STRUCTURED_ENTRIES:
        return None
    g = damped_gram(gram, damping)
    return g, target.double() @ g


def _tt_block_solver(system: tuple[torch.Tensor, torch.Tensor]) -> Callable[[list[torch.Tensor], int], torch.Tensor]:
    """``solve(blocks, k)`` for ``weighted_als`` over TT cores: the exact minimiser over core k,
    H g_o = C[:, o] for every o (Cholesky; least squares if H is singular)."""
    def solve(blocks: list[torch.Tensor], k: int) -> torch.Tensor:
        h, c = tt_normal_equations(blocks, k, *system)
        chol, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            step = torch.cholesky_solve(c, chol)
        else:
            step = torch.linalg.lstsq(h, c, driver="gelsd" if h.is_cpu else None).solution
        r0, o, i, r1 = blocks[k].shape
        return step.reshape(r0, i, r1, o).permute(0, 3, 1, 2)

    return solve


def tt_svd(w: torch.Tensor, in_modes: tuple[int, ...], out_modes: tuple[int, ...],
           eps: float | None, max_rank: int | None) -> list[torch.Tensor]:
    """TT cores ``(r_{k-1}, O_k, I_k, r_k)`` of the ``(O, I)`` matrix ``w`` (computed in w's dtype).

    W is reshaped to the order-d tensor with merged indices (o_k, i_k), then split left to right:
    each unfolding ``(r_{k-1} O_k I_k, rest)`` is SVD-ed and truncated to the smallest rank whose
    discarded singular values have norm <= delta = eps ||W||_F / sqrt(d - 1), capped at max_rank;
    ``eps=None`` keeps the numerically nonzero ones (above max(shape) x the dtype's epsilon x the
    largest, as ``torch.linalg.matrix_rank``: rounding noise is no rank).
    """
    d = len(in_modes)
    t = w.reshape(*out_modes, *in_modes)
    t = t.permute(*[p for k in range(d) for p in (k, d + k)])  # (o_1, i_1, o_2, i_2, ...)
    delta = 0.0 if eps is None else eps * w.norm().item() / math.sqrt(d - 1)
    cores, r = [], 1
    rest = t.reshape(1, -1)
    for k in range(d - 1):
        n = out_modes[k] * in_modes[k]
        u, s, vh = torch.linalg.svd(rest.reshape(r * n, -1), full_matrices=False)
        # tail[j] = norm of s[j:]; keep the smallest rank whose tail is within delta
        tail = torch.cat([s.flip(0).square().cumsum(0).flip(0).sqrt(), s.new_zeros(1)])
        keep = int((tail > delta).sum().clamp(min=1))
        if eps is None:
            unfolding = rest.reshape(r * n, -1)
            keep = max(int((s > s[0] * max(unfolding.shape) * torch.finfo(s.dtype).eps).sum()), 1)
        if max_rank is not None:
            keep = min(keep, max_rank)
        cores.append(u[:, :keep].reshape(r, out_modes[k], in_modes[k], keep))
        rest = s[:keep, None] * vh[:keep]
        r = keep
    cores.append(rest.reshape(r, out_modes[-1], in_modes[-1], 1))
    return cores


def balanced(cores: list[torch.Tensor]) -> list[torch.Tensor]:
    """The same TT matrix with ||W|| shared evenly by the cores: each scaled by the geometric mean of
    the cores' norms over its own (the scales multiply to 1). TT-SVD leaves it all in the last core,
    which in a 16-bit layer can overflow where W does not."""
    norms = [c.norm() for c in cores]
    if not all(n > 0 for n in norms):
        return cores
    mean = torch.stack(norms).log().mean().exp()
    return [c * (mean / n) for c, n in zip(cores, norms)]
