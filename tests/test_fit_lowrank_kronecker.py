"""Activation-aware fits of the low-rank and Kronecker layers (``from_linear(..., input_gram=)``),
against brute-force optima computed from explicit calibration inputs X."""

import pytest
import torch
from torch import nn

from tspline_kernels import KroneckerLinear, LowRankLinear
from tspline_kernels._fit import lowrank_error_curve
from tspline_kernels.testing import assert_close

DT = torch.float64


def _correlated_inputs(n: int, d: int) -> torch.Tensor:
    """X ``(n, d)`` with strongly correlated features of decaying scales (condition number ~100)."""
    scales = torch.logspace(0, -2, d, dtype=DT)
    return (torch.randn(n, d, dtype=DT) * scales) @ torch.randn(d, d, dtype=DT)


def _relative_output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    """||(W - W_hat) X^T|| / ||W X^T||, straight from the inputs."""
    return (((w - w_hat) @ x.T).norm() / (w @ x.T).norm()).item()


def _optimal_rank_error(w: torch.Tensor, x: torch.Tensor, rank: int) -> float:
    """The smallest ||(W - W_hat) X^T|| / ||W X^T|| over rank-``rank`` W_hat: W_hat X^T has rank <= r,
    so the error is at least the SVD tail of Y = W X^T, and W_hat = P_r P_r^T W (P_r the top left
    singular vectors of Y) reaches it. Independent of whitening and of the Gram."""
    s = torch.linalg.svdvals(w @ x.T)
    return (s[rank:].square().sum() / s.square().sum()).sqrt().item()


# ------------------------------------------------------------------------------ low rank
@pytest.mark.parametrize("rank", [1, 4, 9])
def test_whitened_lowrank_reaches_the_optimal_output_error(rank):
    linear = nn.Linear(20, 12, dtype=DT)
    x = _correlated_inputs(50, 20)
    w = linear.weight.detach()
    layer = LowRankLinear.from_linear(linear, rank, x.T @ x)
    report = layer.fit_report
    optimum = _optimal_rank_error(w, x, rank)
    measured = _relative_output_error(w, layer.materialize().detach(), x)
    # the damping (1e-6 of the mean eigenvalue, the smallest eigenvalue ~1e-4 of it) moves the optimum by < 1e-8
    assert measured == pytest.approx(optimum, rel=1e-8)
    assert report.output_error == pytest.approx(measured, rel=1e-10)
    assert report.method == "whitened SVD" and report.details["rank"] == rank
    # optimal_error is the fitted (damped) objective: ||(W - W_hat) S|| / ||W S||, S^2 = G + lambda I
    lam = 1e-6 * (x.T @ x).diagonal().mean()
    e = w - layer.materialize().detach()
    damped = ((e @ x.T).square().sum() + lam * e.square().sum()) / ((w @ x.T).square().sum() + lam * w.square().sum())
    assert report.details["optimal_error"] == pytest.approx(damped.sqrt().item(), rel=1e-8)
    assert report.relative_error == pytest.approx(((layer.materialize() - w).norm() / w.norm()).item(), rel=1e-10)
    assert torch.equal(layer.bias, linear.bias)
    # better than the weight-space SVD on these correlated inputs (by 8% to 90% over 40 seeds)
    plain = LowRankLinear.from_linear(linear, rank)
    assert plain.fit_report.output_error is None
    assert measured < _relative_output_error(w, plain.materialize().detach(), x)


def test_whitened_lowrank_beats_perturbed_and_random_rank_r_weights():
    linear = nn.Linear(20, 12, dtype=DT)
    x = _correlated_inputs(50, 20)
    w = linear.weight.detach()
    best = LowRankLinear.from_linear(linear, 5, x.T @ x)
    err = best.fit_report.output_error
    for _ in range(5):
        u = best.U.detach() + 1e-3 * torch.randn(12, 5, dtype=DT)
        v = best.V.detach() + 1e-3 * torch.randn(20, 5, dtype=DT)
        assert _relative_output_error(w, u @ v.T, x) > err
        # the best rank-5 weight on random 5-dimensional row spaces (least squares through X)
        basis = torch.linalg.qr(torch.randn(20, 5, dtype=DT)).Q
        coef = torch.linalg.lstsq(x @ basis, x @ w.T).solution
        assert _relative_output_error(w, (basis @ coef).T, x) > err


@pytest.mark.parametrize("n", [8, 15], ids=["N=8", "N=15"])
def test_rank_deficient_gram_stays_finite_and_near_optimal(n):
    """N < in: G has rank N, the undamped whitening would divide by zero."""
    linear = nn.Linear(20, 12, dtype=DT)
    x = _correlated_inputs(n, 20)
    w = linear.weight.detach()
    for rank in (3, min(n, 12)):
        layer = LowRankLinear.from_linear(linear, rank, x.T @ x)
        w_hat = layer.materialize().detach()
        assert torch.isfinite(w_hat).all()
        measured = _relative_output_error(w, w_hat, x)
        optimum = _optimal_rank_error(w, x, rank)
        assert optimum <= measured <= optimum + 5e-5  # the damping's share: up to 6e-6 over 40 seeds
        # the damping keeps W_hat near W off the calibration inputs instead of blowing up
        assert (w_hat - w).norm() < w.norm()


def test_whitened_factors_are_balanced_and_independent_of_the_gram_scale():
    linear = nn.Linear(20, 12, dtype=DT)
    x = _correlated_inputs(50, 20)
    layer = LowRankLinear.from_linear(linear, 5, x.T @ x)
    assert_close(layer.U.norm(dim=0), layer.V.norm(dim=0))
    # a Gram summed over 1e8 times more tokens: same factors (no overflow in half precision)
    scaled = LowRankLinear.from_linear(linear, 5, 1e8 * x.T @ x)
    assert_close(scaled.U, layer.U)
    assert_close(scaled.V, layer.V)
    half = LowRankLinear.from_linear(linear.half(), 5, 1e8 * x.T @ x)
    assert torch.isfinite(half.materialize()).all()
    assert half.fit_report.output_error == pytest.approx(layer.fit_report.output_error, abs=2e-3)


def test_error_curve_matches_every_fitted_rank():
    linear = nn.Linear(20, 12, dtype=DT)
    x = _correlated_inputs(50, 20)
    w = linear.weight.detach()
    curve = lowrank_error_curve(w, (x.T @ x).float())
    assert curve.shape == (13,) and curve.dtype == DT
    assert curve[0].item() == pytest.approx(1.0, rel=1e-12) and curve[-1].item() < 1e-6
    assert (curve[1:] <= curve[:-1]).all()
    for rank in (1, 6, 12):
        layer = LowRankLinear.from_linear(linear, rank, (x.T @ x).float())
        assert curve[rank].item() == pytest.approx(layer.fit_report.output_error, rel=1e-7, abs=1e-9)
    plain = lowrank_error_curve(w)
    for rank in (2, 7):
        assert plain[rank].item() == pytest.approx(LowRankLinear.from_linear(linear, rank).fit_report.relative_error,
                                                   rel=1e-10)
    with pytest.raises(ValueError, match="input_gram must have shape"):
        lowrank_error_curve(w, torch.eye(12))


def test_lowrank_gram_errors_name_input_gram_and_keep_dtype():
    linear = nn.Linear(20, 12)
    x = torch.randn(50, 20)
    layer = LowRankLinear.from_linear(linear, 4, x.T @ x)
    assert layer.U.dtype == torch.float32 and layer.fit_report.output_error is not None
    assert layer.fit_report.output_error == pytest.approx(
        _relative_output_error(linear.weight.detach().double(), layer.materialize().detach().double(), x.double()),
        rel=1e-6)
    with pytest.raises(ValueError, match="input_gram must have shape"):
        LowRankLinear.from_linear(linear, 4, x @ x.T)
    with pytest.raises(TypeError, match="input_gram must be a torch.Tensor"):
        LowRankLinear.from_linear(linear, 4, (x.T @ x).tolist())
    with pytest.raises(ValueError, match="input_gram has non-finite"):
        LowRankLinear.from_linear(linear, 4, torch.full((20, 20), float("inf")))


# ------------------------------------------------------------------------------ Kronecker
def test_kronecker_als_lowers_the_output_error_from_the_van_loan_start():
    linear = nn.Linear(20, 12, dtype=DT)
    x = _correlated_inputs(50, 20)
    w = linear.weight.detach()
    layer = KroneckerLinear.from_linear(linear, (4, 5), (3, 4), x.T @ x, sweeps=15)
    report = layer.fit_report
    start = KroneckerLinear.from_linear(linear, (4, 5), (3, 4))
    start_error = _relative_output_error(w, start.materialize().detach(), x)
    measured = _relative_output_error(w, layer.materialize().detach(), x)
    assert report.method == "weighted Kronecker ALS"
    assert report.output_error == pytest.approx(measured, rel=1e-10)
    assert report.details["start_output_error"] == pytest.approx(start_error, rel=1e-10)
    assert measured < 0.9 * start_error
    history = torch.tensor(report.details["als_history"])
    assert len(history) == 1 + 2 * 15 and (history[1:] <= history[:-1]).all()
    # the objective is the damped one, ~ the output error (damping 1e-6)
    assert history[-1].item() == pytest.approx(measured, rel=1e-4)
    assert report.relative_error == pytest.approx(((layer.materialize() - w).norm() / w.norm()).item(), rel=1e-10)
    assert layer.factors[0].norm().item() == pytest.approx(layer.factors[1].norm().item(), rel=1e-10)
    # the bias is fitted as before: y = x @ W_hat.T + b_eff, b_eff the least-squares fit of the bias
    assert report.details["bias_error"] == pytest.approx(
        ((layer.effective_bias() - linear.bias).norm() / linear.bias.norm()).item(), rel=1e-8)
    assert report.details["bias_error"] < 1


def test_kronecker_factor_step_is_the_dense_least_squares_optimum():
    """One sweep's A step equals lstsq over A on the autograd Jacobian of A -> (A (x) B) [X^T, sqrt(lam) I]."""
    linear = nn.Linear(20, 12, dtype=DT)
    x = _correlated_inputs(50, 20)
    w = linear.weight.detach()
    damping = 1e-3
    layer = KroneckerLinear.from_linear(linear, (4, 5), (3, 4), x.T @ x, sweeps=1, damping=damping)
    b = KroneckerLinear.from_linear(linear, (4, 5), (3, 4)).factors[1].detach()
    lam = damping * (x.T @ x).diagonal().mean()
    lift = torch.cat([x.T, lam.sqrt() * torch.eye(20, dtype=DT)], 1)  # ||E lift||^2 = the damped objective
    jac = torch.func.jacrev(lambda a: (torch.kron(a, b) @ lift).flatten())(torch.zeros(3, 4, dtype=DT))
    rhs = (w @ lift).flatten()
    a_opt = torch.linalg.lstsq(jac.reshape(rhs.numel(), -1), rhs[:, None]).solution.reshape(3, 4)
    best = (torch.kron(a_opt, b) @ lift - w @ lift).norm() / (w @ lift).norm()
    assert layer.fit_report.details["als_history"][1] == pytest.approx(best.item(), rel=1e-9)


def test_kronecker_with_a_gram_recovers_a_kronecker_weight_and_keeps_van_loan_for_white_inputs():
    a, b = torch.randn(3, 4, dtype=DT), torch.randn(4, 5, dtype=DT)
    linear = nn.Linear(20, 12, dtype=DT)
    x = _correlated_inputs(50, 20)
    with torch.no_grad():
        linear.weight.copy_(torch.kron(a, b))
    exact = KroneckerLinear.from_linear(linear, (4, 5), (3, 4), x.T @ x)
    assert exact.fit_report.output_error < 1e-10 and exact.fit_report.relative_error < 1e-10
    # white inputs (G = c I): the weighted objective is the Frobenius one, whose optimum Van Loan already is
    other = nn.Linear(20, 12, dtype=DT)
    white = KroneckerLinear.from_linear(other, (4, 5), (3, 4), 7.0 * torch.eye(20, dtype=DT))
    plain = KroneckerLinear.from_linear(other, (4, 5), (3, 4))
    assert white.fit_report.output_error == pytest.approx(plain.fit_report.details["optimal_error"], rel=1e-9)
    assert_close(white.materialize(), plain.materialize())


def test_kronecker_gram_errors_name_input_gram_and_keep_dtype():
    linear = nn.Linear(20, 12)
    x = torch.randn(50, 20)
    layer = KroneckerLinear.from_linear(linear, (4, 5), (3, 4), x.T @ x)
    assert layer.factors[0].dtype == torch.float32 and layer.biases[0].dtype == torch.float32
    assert layer.fit_report.output_error == pytest.approx(
        _relative_output_error(linear.weight.detach().double(), layer.materialize().detach().double(), x.double()),
        rel=1e-5)
    assert KroneckerLinear.from_linear(linear, (4, 5), (3, 4)).fit_report.output_error is None
    with pytest.raises(ValueError, match="input_gram must have shape"):
        KroneckerLinear.from_linear(linear, (4, 5), (3, 4), torch.eye(12))
    with pytest.raises(ValueError, match="input_gram must be symmetric"):
        KroneckerLinear.from_linear(linear, (4, 5), (3, 4), torch.randn(20, 20))
    with pytest.raises(ValueError, match="sweeps must be >= 0"):
        KroneckerLinear.from_linear(linear, (4, 5), (3, 4), x.T @ x, sweeps=-1)


def test_a_zero_weight_fits_to_zero_with_a_gram():
    linear = nn.Linear(20, 12, dtype=DT)
    with torch.no_grad():
        linear.weight.zero_()
    x = _correlated_inputs(50, 20)
    for layer in (LowRankLinear.from_linear(linear, 3, x.T @ x),
                  KroneckerLinear.from_linear(linear, (4, 5), (3, 4), x.T @ x)):
        assert torch.equal(layer.materialize(), torch.zeros(12, 20, dtype=DT))
        assert layer.fit_report.output_error == 0.0 and layer.fit_report.relative_error == 0.0
