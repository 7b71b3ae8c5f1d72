"""Shared activation-aware fitting maths (tspline_kernels/_fit.py): Gram checks, whitening, the
calibrated output error, and the weighted alternating least squares used by the Kronecker, TT and
spline-TT fits."""

import gc

import pytest
import torch
from torch import nn

from tspline_kernels import KroneckerLinear, LowRankLinear, TTLinear
from tspline_kernels import _fit as fit
from tspline_kernels._fit import check_gram, output_error, whiten
from tspline_kernels._layers import fit_report
from tspline_kernels.testing import assert_close

DT = torch.float64


def _correlated_inputs(n: int, d: int, rank: int | None = None) -> torch.Tensor:
    """X ``(n, d)`` with strongly correlated features (a random mixing of decaying scales)."""
    scales = torch.logspace(0, -2, rank or d, dtype=DT)
    return (torch.randn(n, rank or d, dtype=DT) * scales) @ torch.randn(rank or d, d, dtype=DT)


# -------------------------------------------------------------------------------- check_gram
def test_check_gram_symmetrises_and_keeps_device():
    x = _correlated_inputs(50, 20)
    g = (x.T @ x).float()
    checked = check_gram(g, 20)
    assert checked.dtype == DT and checked.device == g.device
    assert torch.equal(checked, checked.T)
    assert_close(checked, x.T @ x, torch.float32)


@pytest.mark.parametrize(("gram", "error", "match"), [
    ([[1.0]], TypeError, "input_gram must be a torch.Tensor"),
    (torch.eye(4, dtype=torch.int64), TypeError, "input_gram must be a real floating-point"),
    (torch.eye(3), ValueError, r"input_gram must have shape .*\(4, 4\)"),
    (torch.eye(4).expand(2, 4, 4), ValueError, "input_gram must have shape"),
    (torch.eye(4, device="meta"), ValueError, "input_gram is on the meta device"),
    (torch.eye(4).index_put((torch.tensor([1]), torch.tensor([1])), torch.tensor(float("nan"))),
     ValueError, "input_gram has non-finite"),
    (torch.zeros(4, 4), ValueError, "input_gram is all zeros"),
    (torch.eye(4) + torch.triu(torch.ones(4, 4), 1), ValueError, "input_gram must be symmetric"),
    (-torch.eye(4), ValueError, "input_gram has a negative diagonal"),
], ids=["list", "int", "shape", "batched", "meta", "nan", "zero", "asymmetric", "negative"])
def test_check_gram_rejects_bad_grams(gram, error, match):
    with pytest.raises(error, match=match):
        check_gram(gram, 4)


# ------------------------------------------------------------------------------------ whiten
@pytest.mark.parametrize("n", [50, 8], ids=["full-rank", "rank-deficient"])
def test_whiten_is_the_damped_square_root_and_its_inverse(n):
    x = _correlated_inputs(n, 20)
    g = x.T @ x
    s, s_inv = whiten(g, damping=1e-4)
    lam = 1e-4 * g.diagonal().mean()
    assert_close(s, s.T)
    assert_close(s @ s, g + lam * torch.eye(20, dtype=DT))
    assert_close(s @ s_inv, torch.eye(20, dtype=DT), torch.float32)  # condition number up to 1e4 * 20


def test_whiten_refuses_a_singular_gram_without_damping():
    x = _correlated_inputs(8, 20)
    s, _ = whiten(x.T @ x + torch.eye(20, dtype=DT), damping=0.0)
    assert_close(s @ s, x.T @ x + torch.eye(20, dtype=DT))
    with pytest.raises(ValueError, match="singular"):
        whiten(x.T @ x, damping=0.0)
    with pytest.raises(ValueError, match="damping must be >= 0"):
        whiten(x.T @ x, damping=-1.0)
    with pytest.raises(TypeError, match="damping must be a float >= 0"):
        whiten(x.T @ x, damping="1e-6")


# ------------------------------------------------------------------- cache per Gram tensor
def _count_roots(monkeypatch) -> list:
    """Every computation of a whitening (``_fit._matrix_root``) from now on, recorded."""
    calls = []
    root = fit._matrix_root
    monkeypatch.setattr(fit, "_matrix_root", lambda *a: calls.append(a) or root(*a))
    return calls


@pytest.mark.parametrize("inference", [False, True], ids=["tensor", "inference-mode"])
def test_gram_and_whitening_are_cached_until_the_gram_changes(inference, monkeypatch):
    """The same unchanged Gram object gives the same checked Gram and whitening, computed once and
    equal to a fresh computation; an in-place change of the Gram (or of the cached value) is seen.
    Inference-mode Grams (no version counter) are compared by value."""
    calls = _count_roots(monkeypatch)
    x = _correlated_inputs(50, 12)
    with torch.inference_mode(inference):
        gram = x.T @ x
    checked = check_gram(gram, 12)
    s, s_inv = whiten(checked, 1e-4)
    assert check_gram(gram, 12) is checked and check_gram(checked, 12) is checked
    assert whiten(check_gram(gram, 12), 1e-4)[0] is s and len(calls) == 1
    fresh = whiten(checked.clone(), 1e-4)  # another tensor object: computed again, same values
    assert len(calls) == 2 and torch.equal(fresh[0], s) and torch.equal(fresh[1], s_inv)
    whiten(checked, 1e-3)  # another damping
    assert len(calls) == 3
    with torch.inference_mode(inference):
        gram.mul_(2)
    doubled = check_gram(gram, 12)
    assert doubled is not checked
    assert_close(doubled, 2 * checked)
    assert_close(whiten(doubled, 1e-4)[0] @ whiten(doubled, 1e-4)[0], fit.damped_gram(2 * checked, 1e-4))
    assert len(calls) == 4
    doubled.add_(1.0)  # the cached value itself changed: recomputed from the Gram
    again = check_gram(gram, 12)
    assert again is not doubled
    assert_close(again, 2 * checked)
    if not inference:  # writes that leave the version counter alone: through .data and a numpy view
        gram.data.mul_(0.5)
        assert_close(check_gram(gram, 12), checked)
        gram.numpy()[:] *= 3
        assert_close(check_gram(gram, 12), 3 * checked)


def test_cache_entries_go_with_their_gram():
    x = _correlated_inputs(30, 8)
    gram = x.T @ x
    checked = check_gram(gram, 8)
    whiten(checked)
    keys = id(gram), id(checked)
    assert keys[0] in fit._derived and keys[1] in fit._derived and keys[1] in fit._checked
    del gram, checked
    gc.collect()
    assert not any(k in fit._derived or k in fit._checked for k in keys)


def test_one_layer_fitted_at_several_sizes_and_formats_whitens_once(monkeypatch):
    calls = _count_roots(monkeypatch)
    linear = nn.Linear(12, 8)
    x = _correlated_inputs(40, 12)
    gram = x.T @ x
    fits = [TTLinear.from_linear(linear, (3, 4), (2, 4), max_rank=r, input_gram=gram, sweeps=1) for r in (2, 3)]
    fits.append(LowRankLinear.from_linear(linear, 2, gram))
    fits.append(KroneckerLinear.from_linear(linear, (3, 4), (2, 4), gram, sweeps=1))
    assert len(calls) == 1
    for layer in fits:  # the reported errors are those of the fitted weights on the Gram
        assert output_error(linear.weight, layer.materialize(), x.T @ x) == \
            pytest.approx(layer.fit_report.output_error, rel=1e-9)


# ------------------------------------------------------------------------------ output_error
def test_output_error_equals_the_error_on_the_inputs():
    w, w_hat = torch.randn(12, 20, dtype=DT), torch.randn(12, 20, dtype=DT)
    x = _correlated_inputs(50, 20)
    expected = ((w - w_hat) @ x.T).norm() / (w @ x.T).norm()
    assert output_error(w, w_hat, x.T @ x) == pytest.approx(expected.item(), rel=1e-10)
    assert output_error(w, w, x.T @ x) == 0.0


def test_fit_report_fills_output_error_only_with_a_gram():
    linear = nn.Linear(20, 12, dtype=DT)
    layer = LowRankLinear.from_linear(linear, 4)
    x = _correlated_inputs(50, 20)
    plain = fit_report("svd", linear.weight, layer)
    assert plain.output_error is None and "output error" not in str(plain)
    report = fit_report("svd", linear.weight, layer, input_gram=(x.T @ x).float())
    e = (linear.weight - layer.materialize()).detach()
    expected = (e @ x.T).norm() / (linear.weight.detach() @ x.T).norm()
    assert report.output_error == pytest.approx(expected.item(), rel=1e-6)  # fp32 Gram
    assert report.relative_error == plain.relative_error
    assert f"output error {report.output_error:.3e}" in str(report)
    with pytest.raises(ValueError, match="input_gram must have shape"):
        fit_report("svd", linear.weight, layer, input_gram=torch.eye(12))


# ------------------------------------------------------------------------------ weighted_als
def _damped_from_inputs(x, lam):
    """G + lam I from the inputs themselves."""
    return x.T @ x + lam * torch.eye(x.shape[1], dtype=DT)


def _kron(blocks):
    return torch.kron(blocks[0], blocks[1])


def _dense_block_optimum(w, x, lam, fixed, k):
    """min over factor k of ||(W - A (x) B) X^T||^2 + lam ||W - A (x) B||^2 with the other factor
    ``fixed``, by lstsq on a design matrix built entry by entry from X (no whitening involved)."""
    shape = (3, 4) if k == 0 else (4, 5)
    lift = torch.cat([x.T, lam.sqrt() * torch.eye(20, dtype=DT)], 1)  # ||E lift||^2 = the objective
    columns = []
    for idx in range(shape[0] * shape[1]):
        unit = torch.zeros(shape[0] * shape[1], dtype=DT)
        unit[idx] = 1
        pair = [unit.reshape(shape), fixed] if k == 0 else [fixed, unit.reshape(shape)]
        columns.append((_kron(pair) @ lift).flatten())
    design = torch.stack(columns, 1)
    rhs = (w @ lift).flatten()
    sol = torch.linalg.lstsq(design, rhs[:, None]).solution[:, 0]
    return sol.reshape(shape), (design @ sol - rhs).square().sum().item()


@pytest.mark.parametrize("cg", [False, True], ids=["dense", "cg"])
def test_weighted_als_block_step_is_the_dense_least_squares_optimum(cg, monkeypatch):
    if cg:  # force the conjugate-gradient path (its 50 steps are exact on 12- and 20-entry blocks)
        monkeypatch.setattr(fit, "_DENSE_ENTRIES", 0)
    w = torch.randn(12, 20, dtype=DT)
    x = _correlated_inputs(50, 20)
    a, b = torch.randn(3, 4, dtype=DT), torch.randn(4, 5, dtype=DT)
    lam = 1e-3 * (x.T @ x).diagonal().mean()
    result = fit.weighted_als([a, b], _kron, w, x.T @ x, sweeps=1, damping=1e-3)
    a_opt, f_a = _dense_block_optimum(w, x, lam, b, 0)
    assert result.history[1] == pytest.approx(f_a, rel=1e-9)
    b_opt, f_b = _dense_block_optimum(w, x, lam, result.blocks[0], 1)
    assert result.history[2] == pytest.approx(f_b, rel=1e-9)
    # the A (x) B product is unique even though the scale split between A and B is not
    assert_close(_kron(result.blocks), _kron([result.blocks[0], b_opt]))
    assert len(result.history) == 3
    assert result.energy == pytest.approx((w @ _damped_from_inputs(x, lam) @ w.T).trace().item(), rel=1e-10)


def test_weighted_als_never_increases_the_objective_and_stops_at_tol():
    w = torch.randn(12, 20, dtype=DT)
    x = _correlated_inputs(50, 20)
    cores = [torch.randn(1, 3, 2, dtype=DT), torch.randn(2, 4, 2, dtype=DT), torch.randn(2, 20, dtype=DT)]

    def build(bl):  # a 3-block multilinear map: a rank-(2, 2) chain, (3 * 4, 20)
        return torch.einsum("aib,bjc,cn->ijn", *bl).reshape(12, 20)

    result = fit.weighted_als(cores, build, w, x.T @ x, sweeps=12, tol=0.0)
    steps = torch.tensor(result.history)
    assert len(result.history) == 1 + 12 * 3
    assert (steps[1:] <= steps[:-1]).all() and steps[-1] < 0.8 * steps[0]
    e = w - build(result.blocks)
    lam = 1e-6 * (x.T @ x).diagonal().mean()
    assert result.history[-1] == pytest.approx(((e @ x.T).square().sum() + lam * e.square().sum()).item(), rel=1e-9)
    assert result.relative_error == pytest.approx((result.history[-1] / result.energy) ** 0.5)
    early = fit.weighted_als(cores, build, w, x.T @ x, sweeps=30, tol=0.5)
    per_sweep = early.history[::3]  # f at the start and after each sweep
    drops = [(f0 - f1) / f0 for f0, f1 in zip(per_sweep, per_sweep[1:])]
    assert len(early.history) == 1 + 3 * len(drops) and len(drops) < 30
    assert all(d > 0.5 for d in drops[:-1]) and drops[-1] <= 0.5  # stops after the first sweep gaining < tol
    with pytest.raises(TypeError, match="sweeps must be an int >= 0"):
        fit.weighted_als(cores, build, w, x.T @ x, sweeps=1.5)
    with pytest.raises(ValueError, match="tol must be >= 0"):
        fit.weighted_als(cores, build, w, x.T @ x, tol=-1e-3)
    with pytest.raises(ValueError, match="input_gram must have shape"):
        fit.weighted_als(cores, build, w, torch.eye(12))


def test_weighted_als_rejects_a_worse_step_and_shows_progress(capsys):
    """A solve that returns a worse block is not taken: the iterate and the history stay put."""
    w = torch.randn(12, 20, dtype=DT)
    x = _correlated_inputs(50, 20)
    a, b = torch.randn(3, 4, dtype=DT), torch.randn(4, 5, dtype=DT)
    result = fit.weighted_als([a, b], _kron, w, x.T @ x, sweeps=2, tol=0.0, progress=True,
                              solve=lambda bl, k: 10 * bl[k] + 1)
    assert result.history == [result.history[0]] * 3  # no gain in the first sweep: it stops there
    assert torch.equal(result.blocks[0], a) and torch.equal(result.blocks[1], b)
    assert "weighted ALS" in capsys.readouterr().err


def test_grams_from_inference_mode_and_weights_that_require_grad():
    """Calibration usually runs under torch.inference_mode (sentence-transformers' encode does): its
    Grams, and a Linear's trainable weight, go through every fit and report without autograd."""
    linear = nn.Linear(20, 12)
    with torch.inference_mode():
        x = _correlated_inputs(50, 20)
        gram = x.T @ x
    low = LowRankLinear.from_linear(linear, 3, gram)
    kron = KroneckerLinear.from_linear(linear, (4, 5), (3, 4), gram, sweeps=2)
    curve = fit.lowrank_error_curve(linear.weight, gram)
    assert not curve.requires_grad
    assert curve[3].item() == pytest.approx(low.fit_report.output_error, rel=1e-6)
    assert output_error(linear.weight, kron.materialize(), gram) == pytest.approx(kron.fit_report.output_error)
    result = fit.weighted_als([torch.randn(3, 4), torch.randn(4, 5)], _kron, linear.weight, gram, sweeps=1)
    assert not any(b.requires_grad for b in result.blocks) and result.relative_error < 1


@pytest.mark.parametrize("where", ["weight", "bias"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_a_non_finite_linear_is_refused_by_every_fit(where, value):
    """A clear ValueError, not a NaN layer or a LAPACK error, whichever format fits it."""
    import tspline_kernels as tk

    linear = nn.Linear(12, 6)
    with torch.no_grad():
        getattr(linear, where)[1].fill_(value)
    for convert in (lambda: LowRankLinear.from_linear(linear, 2), lambda: TTLinear.from_linear(linear, (3, 4), (2, 3)),
                    lambda: KroneckerLinear.from_linear(linear, (3, 4), (2, 3)),
                    lambda: tk.SplineLinear.from_linear(linear, grid=(4, 4))):
        with pytest.raises(ValueError, match=f"Linear's {where} has non-finite values"):
            convert()


def test_a_fit_that_overflows_the_layer_dtype_is_refused():
    """Factors that do not fit in the layer's dtype (here a spline's least-squares controls
    overshooting fp16 where W is near its largest value) raise, naming them, not a NaN layer."""
    import tspline_kernels as tk

    linear = nn.Linear(16, 16).half()
    with torch.no_grad():
        linear.weight.copy_(torch.where(torch.rand(16, 16) < 0.5, 6.5e4, -6.5e4))
    with pytest.raises(ValueError, match="do not fit in torch.float16"):
        tk.SplineLinear.from_linear(linear, grid=(4, 4))
