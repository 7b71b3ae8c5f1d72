"""Activation-aware fitting maths shared by every ``from_linear(..., input_gram=)``.

A layer y = x @ W.T sees inputs X ``(N, in)``; fitting W_hat to minimise the output error
||(W - W_hat) X^T||_F needs only the Gram G = X^T X ``(in, in)``:
||(W - W_hat) X^T||_F^2 = tr(E G E^T), E = W - W_hat. With the whitening S = G^{1/2} (S S^T = G)
it is ||E S||_F^2, a plain Frobenius norm. G is often rank-deficient (N < in, dead features), so
``whiten`` adds a small damping lambda = damping * mean(diag G) to its eigenvalues: fits then
minimise tr(E G E^T) + lambda ||E||_F^2, which keeps S invertible and, among the fits that are
equally good on the calibration inputs, picks the one nearest to W in the directions G never saw.
All maths runs in float64. The checked Gram and its whitening are cached per Gram tensor (``_derived``),
so fitting one layer at several sizes or in several formats computes them once.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
from torch import nn


def fit_inputs(linear, input_gram=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What every ``from_linear`` fits: (``linear.weight`` detached ``(out, in)``, ``input_gram`` checked
    by :func:`check_gram` and moved to the weight's device, or None). ``linear`` must be an
    ``nn.Linear`` whose weight has values (not on the meta device)."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
    if linear.weight.is_meta:
        raise ValueError("from_linear fits the Linear's weight values, but it is on the meta device and has "
                         "none: load its weights first")
    for name, t in (("weight", linear.weight), ("bias", linear.bias)):
        if t is not None and not torch.isfinite(t).all():
            raise ValueError(f"the Linear's {name} has non-finite values (inf or NaN): there is nothing to fit")
    weight = linear.weight.detach()
    return weight, None if input_gram is None else check_gram(input_gram, linear.in_features).to(weight.device)


# Tensors tracked by identity, id(t) -> (weak reference to t, a copy of t's values, payload); an
# entry goes with its tensor and is ignored once the tensor's values have changed. ``_derived``: what
# ``derived`` computed from a tensor, {key: (value, the value's stamps)}; ``_checked``: the
# tensors check_gram returned (payload None), so that checking one again returns it as it is.
_Entry = tuple[weakref.ref, object, object]
_derived: dict[int, _Entry] = {}
_checked: dict[int, _Entry] = {}


def _stamp(t: torch.Tensor) -> torch.Tensor:
    """What tells whether ``t`` changed: a copy of its values. Not its version counter, which writes
    through ``.data`` or a numpy view of the storage leave as it was (and inference-mode tensors,
    which calibration under ``torch.inference_mode`` makes, do not have); comparing the values costs
    one pass over a Gram, little beside the fits that reuse it."""
    return t.detach().clone()


def _unchanged(t: torch.Tensor, stamp: torch.Tensor) -> bool:
    return torch.equal(t, stamp)


def _tensors(value: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return value if isinstance(value, tuple) else (value,)


def _tracked(table: dict[int, _Entry], t: torch.Tensor) -> _Entry | None:
    """``t``'s entry in ``table`` if it has one and has not changed in place since."""
    entry = table.get(id(t))
    return entry if entry is not None and entry[0]() is t and _unchanged(t, entry[1]) else None


def _track(table: dict[int, _Entry], t: torch.Tensor, payload: object) -> _Entry:
    """A new entry of ``t`` in ``table``, removed when ``t`` is freed."""
    def forget(ref: weakref.ref, key: int = id(t)) -> None:
        if key in table and table[key][0] is ref:
            del table[key]

    entry = table[id(t)] = (weakref.ref(t, forget), _stamp(t), payload)
    return entry


def derived(source: torch.Tensor, key: Hashable, compute: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]]):
    """``compute()`` (a tensor or a tuple of tensors computed from ``source``), cached under ``key`` for
    this ``source`` object while it is alive and neither its values nor the cached value's have
    changed since."""
    cache = (_tracked(_derived, source) or _track(_derived, source, {}))[2]
    hit = cache.get(key)
    if hit is not None and all(_unchanged(v, s) for v, s in zip(_tensors(hit[0]), hit[1])):
        return hit[0]
    value = compute()
    cache[key] = (value, tuple(_stamp(v) for v in _tensors(value)))
    return value


def check_gram(input_gram, in_features: int) -> torch.Tensor:
    """``input_gram`` ``(in_features, in_features)`` validated (a real floating-point tensor, finite,
    symmetric up to rounding, non-negative diagonal, not all zero) and returned as a symmetrised
    float64 tensor on its own device. Cached (:func:`derived`): the same ``input_gram``, its values unchanged,
    gives the same tensor, and that tensor checked again is itself, so what is derived from it
    (the whitening) is computed once per Gram."""
    if not isinstance(input_gram, torch.Tensor):
        raise TypeError(f"input_gram must be a torch.Tensor (the input Gram X^T X), got {type(input_gram).__name__}")
    if not input_gram.dtype.is_floating_point:
        raise TypeError(f"input_gram must be a real floating-point tensor, got dtype {input_gram.dtype}")
    if tuple(input_gram.shape) != (in_features, in_features):
        raise ValueError(f"input_gram must have shape (in_features, in_features) = ({in_features}, {in_features}), "
                         f"got {tuple(input_gram.shape)}")
    if input_gram.is_meta:
        raise ValueError("input_gram is on the meta device and has no values")
    if _tracked(_checked, input_gram):
        return input_gram
    gram = derived(input_gram, "check_gram", lambda: _checked_gram(input_gram))
    if not _tracked(_checked, gram):
        _track(_checked, gram, None)
    return gram


def _checked_gram(input_gram: torch.Tensor) -> torch.Tensor:
    """:func:`check_gram`'s value checks and symmetrisation of a square floating-point tensor."""
    g = input_gram.detach().double()
    if not torch.isfinite(g).all():
        raise ValueError("input_gram has non-finite values (inf or NaN): the calibration activations overflowed")
    scale = g.abs().max().item()
    if scale == 0:
        raise ValueError("input_gram is all zeros: the layer saw no (non-zero) calibration input")
    asym = (g - g.T).abs().max().item()
    if asym > 1e-6 * scale:
        raise ValueError(f"input_gram must be symmetric (X^T X), but |G - G^T| reaches {asym:.3e} "
                         f"(largest entry {scale:.3e})")
    if (g.diagonal() < 0).any():
        raise ValueError("input_gram has a negative diagonal entry: it is not a Gram matrix X^T X")
    return (g + g.T) / 2


def _check_nonnegative(name: str, value, integer: bool = False) -> float:
    """``value`` (an int, or with ``integer=False`` also a float; never a bool) checked to be >= 0."""
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name} must be {'an int' if integer else 'a float'} >= 0, got {value!r}")
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def damping_shift(gram: torch.Tensor, damping: float = 1e-6) -> torch.Tensor:
    """lambda = ``damping`` * mean(diag G), the shift fits add to G (a float64 scalar tensor)."""
    return float(_check_nonnegative("damping", damping)) * gram.double().diagonal().mean()


def damped_gram(gram: torch.Tensor, damping: float = 1e-6) -> torch.Tensor:
    """G + lambda I ``(in, in)`` float64, lambda = :func:`damping_shift`: every fit minimises
    tr(E (G + lambda I) E^T) = ||E S||_F^2, S = whiten(G, damping)[0]."""
    g = gram.double()
    return g + damping_shift(g, damping) * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)


def whiten(gram: torch.Tensor, damping: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S_inv), both symmetric float64 ``(in, in)``: S = (G + lambda I)^{1/2} and its inverse,
    lambda = ``damping`` * mean(diag G), by an eigendecomposition of G (rounding's negative
    eigenvalues clamped to 0). ``gram`` as returned by :func:`check_gram`. Cached per ``gram``
    tensor and ``damping`` (:func:`derived`): treat the result as read-only."""
    _check_nonnegative("damping", damping)
    return derived(gram, ("whiten", float(damping)), lambda: _matrix_root(gram, damping))


def _matrix_root(gram: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`whiten`'s (S, S_inv), computed."""
    g = gram.double()
    lam = damping_shift(g, damping)
    evals, evecs = torch.linalg.eigh(g)
    evals = evals.clamp_min(0) + lam
    if evals.min() <= 0:
        raise ValueError("input_gram is singular (rank-deficient) and damping=0 cannot whiten it: use damping > 0")
    root = evals.sqrt()
    return (evecs * root) @ evecs.T, (evecs / root) @ evecs.T


def weighted_energy(weight: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """tr(W G W^T) = ||W X^T||_F^2 for W ``(out, in)``, as a float64 scalar tensor (>= 0)."""
    w = weight.detach().double()
    return ((w @ gram.detach().double()) * w).sum().clamp_min(0)


def output_error(dense: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """||(W - W_hat) X^T||_F / ||W X^T||_F = sqrt(tr(E G E^T) / tr(W G W^T)), E = W - W_hat, for
    ``dense`` W and ``approx`` W_hat ``(out, in)`` and the (undamped) Gram G ``(in, in)``."""
    w = dense.detach().double()
    g = gram.detach().double().to(w.device)
    err = weighted_energy(approx.detach().double().to(w.device) - w, g)
    return (err / weighted_energy(w, g).clamp_min(1e-300)).sqrt().item()


def whitened_svd(weight: torch.Tensor, gram: torch.Tensor | None = None, damping: float = 1e-6
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(P ``(out, k)``, sigma ``(k,)``, Q ``(in, k)``, S_inv ``(in, in)`` or None), k = min(out, in), from
    the thin SVD W S = P diag(sigma) Q^T of ``weight`` W ``(out, in)`` whitened by S = whiten(gram)[0]
    (S = I and S_inv None without a Gram). W_r = P_r diag(sigma_r) Q_r^T S_inv is then the rank-r
    weight minimising ||(W - W_r) S||_F (SVD-LLM), i.e. tr(E G E^T) + lambda ||E||_F^2."""
    w = weight.detach().double()
    if gram is None:
        p, s, qh = torch.linalg.svd(w, full_matrices=False)
        return p, s, qh.T, None
    root, root_inv = whiten(gram.to(w.device), damping)
    p, s, qh = torch.linalg.svd(w @ root, full_matrices=False)
    return p, s, qh.T, root_inv


def lowrank_error_curve(weight: torch.Tensor, gram: torch.Tensor | None = None, damping: float = 1e-6) -> torch.Tensor:
    """Errors ``(min(out, in) + 1,)`` float64 of the (whitened) truncated SVD of ``weight`` ``(out, in)``
    at every rank r = 0 .. min(out, in), from one SVD: what ``LowRankLinear.from_linear(linear, r,
    input_gram=gram, damping=damping)`` reaches, without fitting each rank.

    Without a Gram: the weight error sqrt(sum_{i>r} s_i^2 / sum_i s_i^2). With one: the output error
    ||(W - W_r) X^T|| / ||W X^T|| measured on the undamped G. With W S = P diag(sigma) Q^T the residual
    is T = sum_{i>r} sigma_i p_i q_i^T S^{-1}, and since the p_i are orthonormal
    tr(T G T^T) = sum_{i>r} sigma_i^2 q_i^T S^{-1} G S^{-1} q_i = sum_{i>r} sigma_i^2 (1 - lambda ||S^{-1} q_i||^2)
    (S^2 = G + lambda I); the terms sum to tr(W G W^T), so the curve starts at 1."""
    if gram is not None:
        gram = check_gram(gram, weight.shape[1])
    _, s, q, s_inv = whitened_svd(weight, gram, damping)
    energy = s.square()
    if s_inv is not None:
        lam = damping_shift(gram, damping).to(s.device)
        energy = (energy * (1 - lam * (s_inv @ q).square().sum(0))).clamp_min(0)
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    return (tail / tail[0].clamp_min(1e-300)).sqrt()


# Blocks with at most this many (block entries) x (weight entries) are solved by a dense least
# squares on the block's Jacobian; larger ones by conjugate gradients (the Jacobian would not fit).
_DENSE_ENTRIES = 1 << 22


@dataclass
class ALSResult:
    """What :func:`weighted_als` found: ``blocks`` (float64, the best iterate) and ``history``, the
    objective ||(target - build(blocks)) S||_F^2 at the start and after every block step
    (non-increasing); ``energy`` = ||target S||_F^2, so ``relative_error`` = sqrt(history[-1] / energy)."""

    blocks: list[torch.Tensor]
    history: list[float]
    energy: float

    @property
    def relative_error(self) -> float:
        return math.sqrt(self.history[-1] / max(self.energy, 1e-300))


def _block_solve(lin: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rhs: torch.Tensor,
                 max_cg: int) -> torch.Tensor:
    """argmin_v ||rhs - lin(v)||_F^2 for a linear ``lin``: exactly by least squares on its Jacobian
    when small, else by at most ``max_cg`` conjugate-gradient steps on the normal equations
    lin^*(lin(v)) = lin^*(rhs) started from ``x`` (each step lowers the quadratic)."""
    _, adjoint = torch.func.vjp(lin, x)  # lin is linear: its vjp at x is its adjoint everywhere
    if x.numel() * rhs.numel() <= _DENSE_ENTRIES:
        units = torch.eye(x.numel(), dtype=x.dtype, device=x.device).reshape(-1, *x.shape)
        jac = torch.func.vmap(lin)(units).reshape(x.numel(), -1)
        driver = "gelsd" if jac.is_cpu else None
        return torch.linalg.lstsq(jac.T, rhs.reshape(-1, 1), driver=driver).solution.reshape(x.shape)
    r = adjoint(rhs - lin(x))[0]
    p, rr = r.clone(), r.square().sum()
    stop = 1e-24 * rr
    for _ in range(max_cg):
        hp = adjoint(lin(p))[0]
        curvature = (p * hp).sum()
        if curvature <= 0 or rr <= stop:
            break
        alpha = rr / curvature
        x = x + alpha * p
        r = r - alpha * hp
        rr, rr_old = r.square().sum(), rr
        p = r + (rr / rr_old) * p
    return x


def weighted_als(blocks: list[torch.Tensor], build: Callable[[list[torch.Tensor]], torch.Tensor], target: torch.Tensor,
                 gram: torch.Tensor, sweeps: int = 10, tol: float = 1e-6, progress: bool = False, *,
                 damping: float = 1e-6, max_cg: int = 50,
                 solve: Callable[[list[torch.Tensor], int], torch.Tensor] | None = None) -> ALSResult:
    """Block-coordinate ("alternating") least squares of f = ||(target - build(blocks)) S||_F^2.

    ``target`` ``(out, in)``; ``gram`` G ``(in, in)`` (checked by :func:`check_gram`), S = whiten(G,
    damping)[0], so f = tr(E G E^T) + lambda ||E||_F^2 with E = target - build(blocks);
    ``build(blocks)`` ``(out, in)`` must be linear in each block when the others are fixed
    (multilinear: Kronecker factors, TT cores, ...) and differentiable by torch.func. Each step
    replaces one block by the exact minimiser of the quadratic f in that block (least squares on the
    block's Jacobian, or ``max_cg`` conjugate-gradient steps from the current block for large ones),
    kept only if f does not increase, so ``history`` never increases. A sweep visits every block in
    order; the fit stops after ``sweeps`` sweeps or when a sweep lowers f by less than ``tol`` * f.
    ``progress`` shows a tqdm bar over sweeps. Blocks are fitted in float64.

    ``solve(blocks, k)``, if given, returns that exact minimiser of block k for the float64
    ``blocks`` instead of the generic solve (which costs out * in^2 per Jacobian column or CG step):
    a family whose block Hessians have structure (Kronecker: (I (x) M) with M small) solves its normal
    equations directly, from :func:`damped_gram`. Its steps are accepted under the same rule."""
    _check_nonnegative("sweeps", sweeps, integer=True)
    _check_nonnegative("tol", tol)
    _check_nonnegative("max_cg", max_cg, integer=True)
    target = target.detach().double()
    root, _ = whiten(check_gram(gram, target.shape[1]).to(target.device), damping)
    goal = target @ root
    blocks = [b.detach().double().to(target.device).clone() for b in blocks]

    def objective(bl: list[torch.Tensor]) -> float:
        return (goal - build(bl) @ root).square().sum().item()

    energy = goal.square().sum().item()
    history = [objective(blocks)]
    bar = range(sweeps)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="weighted ALS", leave=False)
    for _ in bar:
        start = history[-1]
        for k in range(len(blocks)):
            def lin(v: torch.Tensor, k: int = k) -> torch.Tensor:
                return build(blocks[:k] + [v] + blocks[k + 1:]) @ root

            step = _block_solve(lin, blocks[k], goal, max_cg) if solve is None else solve(blocks, k)
            trial = blocks[:k] + [step.double()] + blocks[k + 1:]
            f = objective(trial)
            if f <= history[-1]:
                blocks = trial
            history.append(min(f, history[-1]))
        if progress:
            bar.set_postfix(error=f"{math.sqrt(history[-1] / max(energy, 1e-300)):.3e}")
        if start - history[-1] <= tol * start:
            break
    return ALSResult(blocks, history, energy)
