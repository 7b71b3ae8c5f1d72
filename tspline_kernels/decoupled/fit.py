"""Fitting a DecoupledSplineMLP to a map from its values and Jacobians (``/work/shared/design/decoupling.md``).

Model f(x) ~ W g(V^T x) + b0 at samples x_k, with Jacobians J_k = df/dx(x_k) stacked as the tensor
J (n x m x N) = [[W, V, H]] (a CPD, H_ki = g_i'(v_i^T x_k)) and values F ~ G W^T + 1 b0^T
(G_ki = g_i(v_i^T x_k)). Alternating least squares on

  Phi = w_J ||J - [[W, V, H]]||^2 + w_F ||Fc - Gc W^T||^2 + l_c sum_i ||D2 c_i||^2 + l_w ||W||^2 + l_v ||V||^2

(Fc, Gc column-centred, which is the exact minimum over b0; w_J = 1 / ||J||^2, w_F = value_weight / ||Fc||^2;
D2 second differences; the l_* are ``regularization`` times the mean diagonal of each step's Gram at the
start, then fixed so that Phi is one function throughout), plus mu sum_i (mean_k g_i)^2, which fixes the
constant in each g_i that no other term sees (b0 takes it) and is 0 at every iterate. One iteration:
  1. W: the exact minimiser, W = [w_J M1 + w_F Fc^T Gc] [w_J (H^T H)*(V^T V) + w_F Gc^T Gc + l_w I]^-1;
  2. V: the CPD step V = M2 [w_J (H^T H)*(W^T W) + l_v I]^-1 w_J (H held fixed), columns normalised
     (the scale moves into g) and each unit's knots rebuilt on the samples' range of z_i, followed by
  3. C: the exact minimiser over all coefficients given W, V and the knots (one rK x rK system), or one
     Gauss-Seidel sweep of exact per-unit K x K solves (``c_update="branch"``).
Step 2 ignores that H and G depend on V, so it can raise Phi: it is taken with step lengths 1, 1/2,
1/4, 1/8 towards the proposal (each followed by step 3) and the first that does not raise Phi is kept,
otherwise V, the knots and C stay. Steps 1 and 3 are exact, so Phi never increases and the last iterate
is the best. MTTKRPs: M1 = J_(1)(H kr V), M2 = J_(2)(H kr W), M3 = J_(3)(V kr W).

For an MLP block f = W2 s(W1 x + b1) + b2 the Jacobian tensor is [[W2, W1^T, S]] with S = s'(X W1^T + b1)
(N x h), and with P = W1 V, Q = W2^T W, R = S^T H: M1 = W2 (P*R), M2 = W1^T (Q*R), M3 = S (Q*P),
||J||^2 = sum (W2^T W2)*(W1 W1^T)*(S^T S), so J (n m N numbers) is never formed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .._layers import FitReport, check_count, check_flag
from ..reference import decoupled as ref

C_UPDATES = ("auto", "exact", "branch")
EXACT_LIMIT = 2048  # "auto" solves the rK x rK system up to this size, per-unit sweeps beyond
STEPS = (1.0, 0.5, 0.25, 0.125)


# ------------------------------------------------------------------------------------------- data
class ExplicitJacobians:
    """Jacobians J ``(N, n, m)`` held explicitly (any callable ``f``)."""

    def __init__(self, jac: torch.Tensor) -> None:
        self.jac = jac

    def norm2(self) -> torch.Tensor:
        return self.jac.square().sum()

    def m1(self, v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """J_(1)(H kr V) ``(n, r)``."""
        return torch.einsum("kab,bi,ki->ai", self.jac, v, h)

    def m2(self, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """J_(2)(H kr W) ``(m, r)``."""
        return torch.einsum("kab,ai,ki->bi", self.jac, w, h)

    def m3(self, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """J_(3)(V kr W) ``(N, r)``."""
        return torch.einsum("kab,ai,bi->ki", self.jac, w, v)


class MLPJacobians:
    """Jacobians J_k = W2 diag(S_k) W1 of an MLP block, never formed: W1 ``(h, m)``, W2 ``(n, h)``,
    S ``(N, h)`` the activation's derivative at the samples."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, s: torch.Tensor) -> None:
        self.w1, self.w2, self.s = w1, w2, s

    def norm2(self) -> torch.Tensor:
        return ((self.w2.T @ self.w2) * (self.w1 @ self.w1.T) * (self.s.T @ self.s)).sum()

    def m1(self, v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.w2 @ ((self.w1 @ v) * (self.s.T @ h))

    def m2(self, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.w1.T @ ((self.w2.T @ w) * (self.s.T @ h))

    def m3(self, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.s @ ((self.w2.T @ w) * (self.w1 @ v))


@dataclass
class _Data:
    """Samples x ``(N, m)``, values f ``(N, n)`` and their Jacobians, all float64."""

    x: torch.Tensor
    f: torch.Tensor
    jac: ExplicitJacobians | MLPJacobians


@dataclass
class _State:
    """An iterate: V ``(m, r)`` (unit columns), W ``(n, r)``, coefficients ``(r, K)``, knot ranges ``(r,)``."""

    v: torch.Tensor
    w: torch.Tensor
    c: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor


# ------------------------------------------------------------------------------ spline helpers
def spline_coefficients(fn: Callable[[torch.Tensor], torch.Tensor], lo: torch.Tensor, hi: torch.Tensor,
                        n_basis: int) -> torch.Tensor:
    """Coefficients ``(r, n_basis)`` (float64) of the splines nearest ``fn`` in least squares on
    8 n_basis uniform points of each [lo_i, hi_i]; ``fn`` maps points ``(P, r)`` (column i in unit
    i's range) to values ``(P, r)``."""
    lo, hi = lo.double(), hi.double()
    t = torch.linspace(0, 1, 8 * n_basis, dtype=torch.float64, device=lo.device)[:, None]
    z = lo + t * (hi - lo)
    design = _dense(*ref.spline_rows(z, lo, hi, n_basis)[:2], n_basis)  # (P, r, K)
    values = fn(z).double()
    return torch.linalg.lstsq(design.transpose(0, 1), values.T[:, :, None]).solution[..., 0]


def _dense(first: torch.Tensor, rows: torch.Tensor, n_basis: int) -> torch.Tensor:
    """Dense design ``(N, r, K)`` from the four nonzero rows ``(N, r, 4)`` starting at ``first``."""
    out = rows.new_zeros(*first.shape, n_basis)
    return out.scatter_(-1, first[..., None] + torch.arange(4, device=first.device), rows)


def _designs(x: torch.Tensor, st: _State) -> tuple[torch.Tensor, torch.Tensor]:
    """Value and slope designs ``(N, r, K)``: G = sum_j A[..., j] c_j, H = sum_j D[..., j] c_j."""
    k = st.c.shape[1]
    first, values, slopes = ref.spline_rows(x @ st.v, st.lo, st.hi, k)
    return _dense(first, values, k), _dense(first, slopes, k)


def _knots(x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each unit's knot range: the samples' range of z_i = v_i^T x (widened to 1 when it is a point)."""
    z = x @ v
    lo, hi = z.min(0).values, z.max(0).values
    flat = hi - lo <= 1e-12 * torch.maximum(hi.abs(), lo.abs()).clamp_min(1)
    return torch.where(flat, lo - 0.5, lo), torch.where(flat, hi + 0.5, hi)


def _centred(x: torch.Tensor, st: _State) -> _State:
    """The same model with each g_i shifted to mean 0 over the samples ``x`` (b0 absorbs the shift;
    the basis values sum to 1 everywhere, extrapolation included, so the shift is one on c_i)."""
    a, _ = _designs(x, st)
    return _State(st.v, st.w, st.c - (a * st.c).sum(-1).mean(0)[:, None], st.lo, st.hi)


def _normalised(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=0).clamp_min(1e-300)


def _solve_psd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^-1 b for a symmetric positive semi-definite ``a`` (least squares when it is singular)."""
    chol, info = torch.linalg.cholesky_ex(a)
    if info.item() == 0:
        return torch.cholesky_solve(b, chol)
    return torch.linalg.lstsq(a, b, driver="gelsd" if a.device.type == "cpu" else None).solution


# ------------------------------------------------------------------------------------ the ALS
class _ALS:
    """The objective and its three block updates for fixed data and weights."""

    def __init__(self, data: _Data, start: _State, value_weight: float, regularization: float, c_update: str):
        self.data = data
        self.fc = data.f - data.f.mean(0)
        self.norm2 = data.jac.norm2()
        self.w_j = 1 / self.norm2.clamp_min(1e-300)
        self.w_f = value_weight / self.fc.square().sum().clamp_min(1e-300)
        r, k = start.c.shape
        self.exact = c_update == "exact" or (c_update == "auto" and r * k <= EXACT_LIMIT)
        d2 = torch.diff(torch.eye(k, dtype=torch.float64, device=start.c.device), n=2, dim=0)
        self.d2tn = d2.T @ d2
        # l_* from the Grams at the start (then fixed: Phi must stay one function)
        a, d = _designs(data.x, start)
        g, h = (a * start.c).sum(-1), (d * start.c).sum(-1)
        gc = g - g.mean(0)
        hh = h.T @ h
        self.l_w = regularization * (self.w_j * hh * (start.v.T @ start.v) + self.w_f * gc.T @ gc).diagonal().mean()
        self.l_v = regularization * (self.w_j * hh * (start.w.T @ start.w)).diagonal().mean()
        ac = a - a.mean(0)
        gram_c = (self.w_j * (start.v.T @ start.v).diagonal() * (start.w.T @ start.w).diagonal())[:, None] \
            * d.square().sum(0) + self.w_f * (start.w.T @ start.w).diagonal()[:, None] * ac.square().sum(0)
        self.l_c = regularization * gram_c.mean()
        # Adding a constant to g_i changes no term above (Gc is centred, H and D2 c_i ignore it), so
        # the C step would be singular: mu (mean_k g_i)^2 pins each g_i to mean 0 over the samples
        # (b0 absorbs it). It is 0 at every C step's minimiser and at the (centred) start.
        self.mu = gram_c.mean() if gram_c.mean() > 0 else torch.ones((), dtype=torch.float64)

    def objective(self, st: _State, a: torch.Tensor | None = None, d: torch.Tensor | None = None) -> float:
        if a is None:
            a, d = _designs(self.data.x, st)
        g, h = (a * st.c).sum(-1), (d * st.c).sum(-1)
        gc = g - g.mean(0)
        fit_j = (self.norm2 - 2 * (st.w * self.data.jac.m1(st.v, h)).sum()
                 + ((st.w.T @ st.w) * (st.v.T @ st.v) * (h.T @ h)).sum())
        fit_f = (self.fc - gc @ st.w.T).square().sum()
        reg = (self.l_w * st.w.square().sum() + self.l_v * st.v.square().sum()
               + self.l_c * torch.diff(st.c, n=2, dim=1).square().sum() + self.mu * g.mean(0).square().sum())
        return (self.w_j * fit_j + self.w_f * fit_f + reg).item()

    def update_w(self, st: _State, a: torch.Tensor, d: torch.Tensor) -> _State:
        """The exact W for ``st``'s V, knots and C (whose designs are ``a``, ``d``)."""
        g, h = (a * st.c).sum(-1), (d * st.c).sum(-1)
        gc = g - g.mean(0)
        lhs = self.w_j * (h.T @ h) * (st.v.T @ st.v) + self.w_f * gc.T @ gc
        lhs = lhs + self.l_w * torch.eye(lhs.shape[0], dtype=lhs.dtype, device=lhs.device)
        rhs = self.w_j * self.data.jac.m1(st.v, h) + self.w_f * self.fc.T @ gc
        return _State(st.v, _solve_psd(lhs, rhs.T).T, st.c, st.lo, st.hi)

    def propose_v(self, st: _State, d: torch.Tensor) -> torch.Tensor:
        """The CPD step for V with H (slope design ``d``) held fixed, before normalisation."""
        h = (d * st.c).sum(-1)
        lhs = self.w_j * (h.T @ h) * (st.w.T @ st.w)
        lhs = lhs + self.l_v * torch.eye(lhs.shape[0], dtype=lhs.dtype, device=lhs.device)
        return _solve_psd(lhs, self.w_j * self.data.jac.m2(st.w, h).T).T

    def update_c(self, st: _State) -> tuple[_State, torch.Tensor, torch.Tensor]:
        """Exact (or per-unit exact) coefficients for W, V and the knots of ``st``; also returns the designs."""
        a, d = _designs(self.data.x, st)
        am = a.mean(0)
        ac = a - am
        n_s, r, k = a.shape
        own = self.l_c * self.d2tn + self.mu * am[:, :, None] * am[:, None, :]  # unit i's own K x K terms
        gam = (st.v.T @ st.v) * (st.w.T @ st.w)
        om = st.w.T @ st.w
        m3 = self.data.jac.m3(st.w, st.v)
        fw = self.fc @ st.w
        if self.exact:
            df, af = d.reshape(n_s, r * k), ac.reshape(n_s, r * k)
            lhs = (self.w_j * (df.T @ df).reshape(r, k, r, k) * gam[:, None, :, None]
                   + self.w_f * (af.T @ af).reshape(r, k, r, k) * om[:, None, :, None])
            lhs = lhs + torch.eye(r, dtype=a.dtype, device=a.device)[:, None, :, None] * own[:, :, None, :]
            rhs = self.w_j * torch.einsum("nik,ni->ik", d, m3) + self.w_f * torch.einsum("nik,ni->ik", ac, fw)
            c = _solve_psd(lhs.reshape(r * k, r * k), rhs.reshape(-1, 1)).reshape(r, k)
        else:
            c = st.c.clone()
            h, gc = (d * c).sum(-1), (ac * c).sum(-1)
            lhs = (self.w_j * gam.diagonal()[:, None, None] * torch.einsum("nik,nil->ikl", d, d)
                   + self.w_f * om.diagonal()[:, None, None] * torch.einsum("nik,nil->ikl", ac, ac) + own)
            for i in range(r):
                di, ai = d[:, i], ac[:, i]
                res_j = m3[:, i] - h @ gam[:, i] + gam[i, i] * h[:, i]
                res_f = fw[:, i] - gc @ om[:, i] + om[i, i] * gc[:, i]
                c[i] = _solve_psd(lhs[i], (self.w_j * di.T @ res_j + self.w_f * ai.T @ res_f)[:, None])[:, 0]
                h[:, i], gc[:, i] = di @ c[i], ai @ c[i]
        return _State(st.v, st.w, c, st.lo, st.hi), a, d

    def step(self, st: _State, phi: float) -> tuple[_State, float]:
        """One iteration (W, then V with a step-length search, each V followed by C); never raises Phi."""
        a, d = _designs(self.data.x, st)
        updated = self.update_w(st, a, d)
        phi_w = self.objective(updated, a, d)
        if phi_w <= phi:  # W is the exact minimiser: only rounding can raise Phi here
            st = updated
        else:
            phi_w = phi
        proposal = self.propose_v(st, d)
        for t in STEPS:
            v = _normalised(st.v + t * (proposal - st.v))
            lo, hi = _knots(self.data.x, v)
            trial, a, d = self.update_c(_State(v, st.w, st.c, lo, hi))
            phi_t = self.objective(trial, a, d)
            if phi_t <= phi_w:
                return trial, phi_t
        return st, phi_w


# ------------------------------------------------------------------------------------- drivers
def _check_samples(samples, in_features: int | None) -> torch.Tensor:
    if not isinstance(samples, torch.Tensor) or not samples.dtype.is_floating_point:
        raise TypeError(f"samples must be a floating-point torch.Tensor (N, in_features), got {samples!r:.80}")
    if samples.dim() != 2 or (in_features is not None and samples.shape[1] != in_features):
        want = "(N, in_features)" if in_features is None else f"(N, {in_features})"
        raise ValueError(f"samples must have shape {want}, got {tuple(samples.shape)}")
    if samples.is_meta:
        raise ValueError("samples are on the meta device and have no values")
    if not torch.isfinite(samples).all():
        raise ValueError("samples have non-finite values (inf or NaN)")
    return samples.detach()


def _check_options(value_weight, regularization, holdout, c_update, tol, progress) -> None:
    check_flag("progress", progress)
    for name, value in (("value_weight", value_weight), ("regularization", regularization), ("tol", tol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 <= holdout < 1:
        raise ValueError(f"holdout must be a fraction in [0, 1), got {holdout!r}")
    if c_update not in C_UPDATES:
        raise ValueError(f"c_update must be one of {C_UPDATES}, got {c_update!r}")


def _split(n: int, holdout: float, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit rows, held-out rows) from a seeded permutation; at least 2 rows are fitted."""
    n_test = round(holdout * n)
    if n - n_test < 2:
        raise ValueError(f"{n} samples leave {n - n_test} to fit after holding out {n_test}: need at least 2")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
    return perm[n_test:], perm[:n_test]


def _jacobians(f: Callable, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """f(x) ``(N, n)`` and its row-wise Jacobians ``(N, n, m)`` by autograd, ``batch_size`` rows at a time."""
    values, jacs = [], []
    for xb in x.split(batch_size):
        xb = xb.detach().requires_grad_(True)
        with torch.enable_grad():
            fb = f(xb)
            if not isinstance(fb, torch.Tensor) or fb.dim() != 2 or fb.shape[0] != xb.shape[0]:
                raise ValueError(f"f must map samples (N, m) to a tensor (N, n), got "
                                 f"{tuple(fb.shape) if isinstance(fb, torch.Tensor) else type(fb).__name__}")
            eye = torch.eye(fb.shape[1], dtype=fb.dtype, device=fb.device)[:, None, :].expand(-1, *fb.shape)
            (jb,) = torch.autograd.grad(fb, xb, eye, is_grads_batched=True)
        values.append(fb.detach())
        jacs.append(jb.transpose(0, 1))
    return torch.cat(values).double(), torch.cat(jacs).double()


def _run(als: _ALS, st: _State, iters: int, tol: float, progress: bool) -> tuple[_State, list[float]]:
    """Up to ``iters`` iterations, stopping when Phi falls by less than ``tol`` relative; returns the
    last (best) iterate and Phi before and after each iteration."""
    history = [als.objective(st)]
    bar = None
    if progress and iters > 0:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=iters, desc="decoupling ALS", unit="it", leave=False)
        except ImportError:
            pass
    try:
        for _ in range(iters):
            st, phi = als.step(st, history[-1])
            history.append(phi)
            if bar is not None:
                bar.update()
                bar.set_postfix(objective=f"{phi:.4e}")
            if history[-2] - phi <= tol * abs(history[-2]):
                break
    finally:
        if bar is not None:
            bar.close()
    return st, history


def _evaluate(data: _Data, st: _State, bias: torch.Tensor) -> tuple[float, float]:
    """Relative errors (values, Jacobians) of the model at ``data``'s samples."""
    a, d = _designs(data.x, st)
    g, h = (a * st.c).sum(-1), (d * st.c).sum(-1)
    value = (data.f - g @ st.w.T - bias).norm() / data.f.norm().clamp_min(1e-300)
    norm2 = data.jac.norm2()
    diff2 = norm2 - 2 * (st.w * data.jac.m1(st.v, h)).sum() + ((st.w.T @ st.w) * (st.v.T @ st.v) * (h.T @ h)).sum()
    return value.item(), (diff2.clamp_min(0) / norm2.clamp_min(1e-300)).sqrt().item()


def _finish(cls, st: _State, fitted: _Data, held_out: _Data | None, history: list[float], seconds: float,
            dense_params: int, device, dtype, method: str) -> nn.Module:
    """The layer for iterate ``st`` (bias b0 = mean F - W mean G), with ``fit_report`` and ``fit_objective``."""
    a, _ = _designs(fitted.x, st)
    bias = fitted.f.mean(0) - st.w @ (a * st.c).sum(-1).mean(0)
    m, r = st.v.shape
    layer = cls(m, st.w.shape[0], r, st.c.shape[1], bias=True, device=device, dtype=dtype)
    with torch.no_grad():
        for name, value in (("V", st.v), ("W", st.w), ("coef", st.c), ("lo", st.lo), ("hi", st.hi), ("bias", bias)):
            getattr(layer, name).copy_(value)
    value_err, jac_err = _evaluate(held_out if held_out is not None else fitted, st, bias)
    details = {"rank": r, "n_basis": st.c.shape[1], "iterations": len(history) - 1, "seconds": round(seconds, 3),
               "evaluated_on": f"{held_out.x.shape[0]} held-out samples" if held_out is not None
               else f"the {fitted.x.shape[0]} fitted samples"}
    layer.fit_report = FitReport(method, jac_err, dense_params, layer.num_parameters(), details, value_err)
    layer.fit_objective = history
    return layer


def _start_from(layer: nn.Module, x: torch.Tensor) -> _State:
    """An iterate from a layer: V normalised, the scale moved into the knot ranges (the same function)."""
    v = layer.V.detach().double().to(x.device)
    scale = v.norm(dim=0).clamp_min(1e-300)
    return _State(v / scale, layer.W.detach().double().to(x.device), layer.coef.detach().double().to(x.device),
                  layer.lo.detach().double().to(x.device) / scale, layer.hi.detach().double().to(x.device) / scale)


def _linear_start(x: torch.Tensor, jac: torch.Tensor, rank: int, n_basis: int, seed: int) -> _State:
    """V from the top eigenvectors of sum_k J_k^T J_k (random unit columns beyond m), g_i = identity;
    W follows from the first W step."""
    m = x.shape[1]
    _, vecs = torch.linalg.eigh(torch.einsum("kab,kac->bc", jac, jac))
    v = vecs.flip(1)[:, :rank]
    if rank > m:
        extra = torch.randn(m, rank - m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        v = torch.cat([v, _normalised(extra.to(x.device))], dim=1)
    lo, hi = _knots(x, v)
    c = spline_coefficients(lambda z: z, lo, hi, n_basis)
    return _State(v, torch.zeros(jac.shape[1], rank, dtype=torch.float64, device=x.device), c, lo, hi)


def fit(cls, f: Callable, samples: torch.Tensor, rank: int, n_basis: int = 12, iters: int = 100, *,
        init: nn.Module | None = None, value_weight: float = 1.0, regularization: float = 1e-6,
        holdout: float = 0.1, c_update: str = "auto", tol: float = 1e-6, batch_size: int = 256,
        seed: int = 0, progress: bool = True) -> nn.Module:
    """Fit ``cls`` (a DecoupledSplineMLP) to ``f`` (row-wise: ``(N, m)`` -> ``(N, n)``, differentiable
    by autograd) at ``samples`` ``(N, m)``.

    A fraction ``holdout`` of the samples (seeded permutation) is kept out of the fit and measures it.
    ``init``: a layer to start from (default: V from the dominant input directions of the Jacobians,
    identity activations). ``value_weight`` weighs values against Jacobians (alpha), ``regularization``
    scales the Tikhonov terms, ``c_update`` picks the coefficient step ("exact": one rK x rK system,
    "branch": per-unit sweeps, "auto": exact up to rK = 2048); the ALS stops after ``iters`` iterations
    or when the objective falls by less than ``tol`` relative. ``fit_report.relative_error`` is the
    Jacobians' held-out relative error (for a linear f, the weight's; computed from inner products
    without forming J, so it bottoms out near 1e-8), ``output_error`` the values'.
    """
    if init is not None and not isinstance(init, cls):
        raise TypeError(f"init must be a {cls.__name__} to start from, got {type(init).__name__}")
    x_all = _check_samples(samples, None if init is None else init.in_features)
    rank = check_count("rank", rank, 1)
    n_basis = check_count("n_basis", n_basis, 4, " (a cubic B-spline needs at least 4 basis functions)")
    iters = check_count("iters", iters, 0)
    batch_size = check_count("batch_size", batch_size, 1)
    _check_options(value_weight, regularization, holdout, c_update, tol, progress)
    if not callable(f):
        raise TypeError(f"f must be a callable mapping samples (N, m) to values (N, n), got {type(f).__name__}")
    if init is not None and (init.rank, init.n_basis) != (rank, n_basis):
        raise ValueError(f"init has rank={init.rank}, n_basis={init.n_basis}; the fit asks for rank={rank}, "
                         f"n_basis={n_basis}")
    started = time.perf_counter()
    values, jac = _jacobians(f, x_all, batch_size)
    if init is not None and values.shape[1] != init.out_features:
        raise ValueError(f"f gives {values.shape[1]} outputs but init has out_features={init.out_features}")
    x = x_all.double()
    rows, test = _split(x.shape[0], holdout, seed, x.device)
    fitted = _Data(x[rows], values[rows], ExplicitJacobians(jac[rows]))
    held_out = _Data(x[test], values[test], ExplicitJacobians(jac[test])) if test.numel() else None
    start = _start_from(init, x) if init is not None else _linear_start(fitted.x, fitted.jac.jac, rank, n_basis, seed)
    start = _centred(fitted.x, start)
    if init is None:
        als = _ALS(fitted, start, value_weight, 0.0, c_update)
        start = als.update_w(start, *_designs(fitted.x, start))
    als = _ALS(fitted, start, value_weight, regularization, c_update)
    st, history = _run(als, start, iters, tol, progress)
    dense = sum(p.numel() for p in f.parameters()) if isinstance(f, nn.Module) else values.shape[1] * (x.shape[1] + 1)
    return _finish(cls, st, fitted, held_out, history, time.perf_counter() - started, dense,
                   samples.device, samples.dtype, "decoupled B-spline ALS")


def activation_and_slope(activation: Callable, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(activation(pre), activation'(pre)) for an elementwise ``activation``, by autograd, detached."""
    with torch.enable_grad():
        pre = pre.detach().requires_grad_(True)
        post = activation(pre)
        (slope,) = torch.autograd.grad(post.sum(), pre)
    return post.detach(), slope


def important_units(w1: torch.Tensor, w2: torch.Tensor, slope: torch.Tensor, rank: int) -> torch.Tensor:
    """Indices of the ``rank`` hidden units l of an MLP block (W1 ``(h, m)``, W2 ``(n, h)``) with the
    largest ||W2[:, l]|| ||W1[l]|| mean_k |s'(a_kl)| (``slope`` ``(N, h)``), most important first."""
    score = w2.norm(dim=0) * w1.norm(dim=1) * slope.abs().mean(0)
    return score.argsort(descending=True)[:rank]


def from_mlp(cls, fc1: nn.Linear, activation: Callable, fc2: nn.Linear, samples: torch.Tensor, rank: int,
             n_basis: int = 12, iters: int = 100, *, value_weight: float = 1.0, regularization: float = 1e-6,
             holdout: float = 0.1, c_update: str = "auto", tol: float = 1e-6, seed: int = 0,
             progress: bool = True) -> nn.Module:
    """Fit ``cls`` to the block fc2(activation(fc1 x)) at ``samples`` ``(N, fc1.in_features)`` with
    implicit Jacobians (see the module docstring), starting from the ``rank`` hidden units l with the
    largest ||W2[:, l]|| ||W1[l, :]|| mean_k |s'(a_kl)|: v_i = W1[l] / ||W1[l]||, w_i = W2[:, l] and
    g_i the spline nearest s(||W1[l]|| z + b1[l]) on the samples' range. Options as for :func:`fit`.
    """
    for name, lin in (("fc1", fc1), ("fc2", fc2)):
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"{name} must be an nn.Linear, got {type(lin).__name__}")
        if lin.weight.is_meta:
            raise ValueError(f"{name} is on the meta device and has no weights: load them first")
    if fc2.in_features != fc1.out_features:
        raise ValueError(f"fc2.in_features={fc2.in_features} must equal fc1.out_features={fc1.out_features}")
    if not callable(activation):
        raise TypeError(f"activation must be an elementwise callable, got {type(activation).__name__}")
    x_all = _check_samples(samples, fc1.in_features).double().to(fc1.weight.device)
    hidden = fc1.out_features
    rank = check_count("rank", rank, 1)
    if rank > hidden:
        raise ValueError(f"rank={rank} exceeds the block's hidden size {hidden}: the block itself is a "
                         f"rank-{hidden} decoupled MLP")
    n_basis = check_count("n_basis", n_basis, 4, " (a cubic B-spline needs at least 4 basis functions)")
    iters = check_count("iters", iters, 0)
    _check_options(value_weight, regularization, holdout, c_update, tol, progress)
    started = time.perf_counter()
    w1, w2 = fc1.weight.detach().double(), fc2.weight.detach().double()
    b1 = torch.zeros(hidden, dtype=torch.float64, device=w1.device) if fc1.bias is None else fc1.bias.detach().double()
    b2 = torch.zeros(fc2.out_features, dtype=torch.float64, device=w1.device) if fc2.bias is None \
        else fc2.bias.detach().double()
    post, slope = activation_and_slope(activation, x_all @ w1.T + b1)
    values = post @ w2.T + b2
    rows, test = _split(x_all.shape[0], holdout, seed, x_all.device)
    fitted = _Data(x_all[rows], values[rows], MLPJacobians(w1, w2, slope[rows]))
    held_out = _Data(x_all[test], values[test], MLPJacobians(w1, w2, slope[test])) if test.numel() else None
    units = important_units(w1, w2, slope[rows], rank)
    scale = w1[units].norm(dim=1).clamp_min(1e-300)
    v = (w1[units] / scale[:, None]).T
    lo, hi = _knots(fitted.x, v)
    shift = b1[units]
    with torch.no_grad():
        c = spline_coefficients(lambda z: activation(z * scale + shift), lo, hi, n_basis)
    start = _centred(fitted.x, _State(v, w2[:, units], c, lo, hi))
    als = _ALS(fitted, start, value_weight, regularization, c_update)
    st, history = _run(als, start, iters, tol, progress)
    dense = sum(p.numel() for lin in (fc1, fc2) for p in lin.parameters())
    return _finish(cls, st, fitted, held_out, history, time.perf_counter() - started, dense,
                   fc1.weight.device, fc1.weight.dtype, "decoupled B-spline ALS (MLP block)")
