"""Activation-aware (input_gram) fits of SplineLinear, TTLinear and SplineTTLinear against brute force."""

import math

import pytest
import torch
from torch import nn

from tspline_kernels import SplineLinear, SplineTTLinear, TTLinear
from tspline_kernels.reference.spline import BSPLINE, basis_matrix
from tspline_kernels.tt import module as tt_module
from tspline_kernels.testing import assert_close

F64 = torch.float64


def _linear(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


def _correlated_inputs(n: int, features: int) -> torch.Tensor:
    """``(n, features)`` inputs with strongly unequal, correlated directions (a Gram far from I)."""
    mix = torch.randn(features, features, dtype=F64) * torch.logspace(0, -2, features, dtype=F64)[:, None]
    return torch.randn(n, features, dtype=F64) @ mix


def _output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    """||(W - W_hat) X.T||_F / ||W X.T||_F from the inputs themselves."""
    w = w.double()
    return ((w - w_hat.double()) @ x.T).norm().item() / (w @ x.T).norm().item()


def _damped_sqrt(gram: torch.Tensor, damping: float = 1e-6) -> torch.Tensor:
    """S with S S = G + damping mean(diag G) I (the whitening every weighted fit uses)."""
    g = gram + damping * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=F64)
    e, v = torch.linalg.eigh(g)
    return (v * e.sqrt()) @ v.T


# ---------------------------------------------------------------------------- SplineLinear
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
def test_spline_fit_equals_dense_lstsq(weighted):
    """C minimises ||(W - Bo C Bi.T) S||_F: the closed form equals lstsq on the vectorised problem
    vec(Bo C Bi.T S) = kron(Bo, S Bi) vec(C) (row-major vec), S = I without a Gram."""
    w = torch.randn(9, 11, dtype=F64)
    x = _correlated_inputs(40, 11)
    gram = x.T @ x
    layer = SplineLinear.from_linear(_linear(w), (5, 6), gram if weighted else None)
    s = _damped_sqrt(gram) if weighted else torch.eye(11, dtype=F64)
    bo, bi = basis_matrix(9, 5, BSPLINE, F64), basis_matrix(11, 6, BSPLINE, F64)
    dense = torch.linalg.lstsq(torch.kron(bo, s @ bi), (w @ s).reshape(-1, 1), driver="gelsd").solution
    assert_close(layer.control, dense.reshape(5, 6))
    report = layer.fit_report
    w_hat = layer.materialize()
    assert report.relative_error == pytest.approx(((w_hat - w).norm() / w.norm()).item(), rel=1e-9)
    if weighted:
        assert report.output_error == pytest.approx(_output_error(w, w_hat, x), rel=1e-9)
        assert report.method == "weighted spline least squares"
    else:
        assert report.output_error is None and report.method == "spline least squares"
    assert report.details["grid"] == (5, 6) and report.params == layer.num_parameters()


def test_spline_weighted_fit_beats_plain_on_output_error():
    w = torch.randn(9, 11, dtype=F64)
    x = _correlated_inputs(40, 11)
    plain = SplineLinear.from_linear(_linear(w), (5, 6))
    weighted = SplineLinear.from_linear(_linear(w), (5, 6), x.T @ x)
    assert _output_error(w, weighted.materialize(), x) < 0.9 * _output_error(w, plain.materialize(), x)
    assert weighted.fit_report.relative_error >= plain.fit_report.relative_error  # plain is optimal there


def test_spline_fit_recovers_a_spline_weight_exactly_even_with_a_singular_gram():
    """W = Bo C Bi.T is reproduced (unique solution: both bases have full column rank), with no
    Gram and with a rank-deficient one (fewer samples than inputs: only the damping, 1e-6, makes
    Bi.T G Bi invertible, so float64 keeps about 1e-9 of it); float32 layers stay float32."""
    control = torch.randn(5, 6, dtype=F64)
    w = basis_matrix(9, 5, BSPLINE, F64) @ control @ basis_matrix(11, 6, BSPLINE, F64).T
    x = _correlated_inputs(4, 11)
    for gram in (None, x.T @ x):
        layer = SplineLinear.from_linear(_linear(w), (5, 6), gram)
        assert ((layer.control - control).norm() / control.norm()).item() < 1e-8
        layer32 = SplineLinear.from_linear(_linear(w.float()), (5, 6), gram)
        assert layer32.control.dtype == torch.float32
        assert_close(layer32.control, control.float())


def test_spline_fit_with_a_grid_larger_than_the_layer_is_exact():
    """More control points than weights per axis (the default grid of a tiny layer): the bases have
    full row rank, so W itself is reached, by the minimum-norm control grid."""
    w = torch.randn(2, 3, dtype=F64)
    x = _correlated_inputs(40, 3)
    for gram in (None, x.T @ x):
        layer = SplineLinear.from_linear(_linear(w), input_gram=gram)
        assert layer.grid == (4, 4) and layer.fit_report.relative_error < 1e-10


def test_spline_fit_defaults_copies_bias_and_checks_arguments():
    lin = nn.Linear(40, 24)
    layer = SplineLinear.from_linear(lin)
    assert layer.grid == SplineLinear(40, 24).grid and layer.basis == "bspline"
    assert torch.equal(layer.bias, lin.bias) and layer.control.dtype == torch.float32
    assert SplineLinear.from_linear(nn.Linear(40, 24, bias=False)).bias is None
    with pytest.raises(ValueError, match="basis='bspline' only"):
        SplineLinear.from_linear(lin, basis="gaussian")
    with pytest.raises(TypeError, match="expected an nn.Linear"):
        SplineLinear.from_linear(layer)
    with pytest.raises(ValueError, match="meta device"):
        SplineLinear.from_linear(nn.Linear(40, 24, device="meta"))
    with pytest.raises(ValueError, match="grid"):
        SplineLinear.from_linear(lin, grid=(3, 8))
    with pytest.raises(ValueError, match="input_gram"):
        SplineLinear.from_linear(lin, input_gram=torch.eye(24))
    with pytest.raises(TypeError, match="input_gram"):
        SplineLinear.from_linear(lin, input_gram=[[1.0]])


# ---------------------------------------------------------------------------- TTLinear and SplineTTLinear
def _check_weighted_fit(layer: nn.Module, plain: nn.Module, lin: nn.Linear, x: torch.Tensor) -> None:
    """A Gram-weighted fit against the plain one on the same structure: the ALS history never rises,
    the final output error is at most the start's and the plain fit's (and clearly lower on these
    correlated inputs), and the report's numbers are the measured ones; the bias is copied."""
    w = lin.weight.detach()
    report, details = layer.fit_report, layer.fit_report.details
    history = details["als_history"]
    assert len(history) >= 2 and all(b <= a for a, b in zip(history, history[1:]))
    assert details["final_output_error"] <= details["start_output_error"]
    w_hat = layer.materialize()
    measured = _output_error(w, w_hat, x)
    assert report.output_error == pytest.approx(measured, rel=1e-9)
    assert details["final_output_error"] == pytest.approx(measured, rel=1e-9)
    assert report.relative_error == pytest.approx(((w_hat - w).norm() / w.norm()).item(), rel=1e-9)
    assert measured < 0.9 * _output_error(w, plain.materialize(), x)
    assert layer.ranks == plain.ranks and torch.equal(layer.bias, lin.bias)


@pytest.mark.parametrize("in_modes, out_modes", [((2, 3), (3, 2)), ((2, 1, 3), (1, 3, 2))], ids=["d2", "d3-ones"])
def test_tt_weighted_als_lowers_the_output_error(in_modes, out_modes):
    w = torch.randn(6, 6, dtype=F64)
    x = _correlated_inputs(40, 6)
    lin = _linear(w)
    plain = TTLinear.from_linear(lin, in_modes, out_modes, max_rank=2)
    layer = TTLinear.from_linear(lin, in_modes, out_modes, max_rank=2, input_gram=x.T @ x)
    assert plain.fit_report.output_error is None and layer.fit_report.method == "tt-svd + weighted als"
    # the ALS starts at the TT-SVD, which is exactly the plain fit
    assert layer.fit_report.details["start_output_error"] == pytest.approx(_output_error(w, plain.materialize(), x),
                                                                           rel=1e-9)
    _check_weighted_fit(layer, plain, lin, x)


@pytest.mark.parametrize("in_modes, out_modes, grid", [((2, 3), (3, 2), None), ((2, 1, 3), (1, 3, 2), None),
                                                    ((6, 5), (5, 6), (4, 4)), ((3, 1, 10), (1, 5, 6), (4, 5))],
                         ids=["tt-d2", "tt-d3-ones", "spline-tt-d2", "spline-tt-d3-ones-redundant-grid"])
def test_structured_block_steps_equal_the_generic_solve(monkeypatch, in_modes, out_modes, grid):
    """The exact structured step (normal equations through the TT interfaces, and through the spline
    bases for control grids) reaches what weighted_als' generic least squares on the block Jacobian
    reaches, step for step; a fit whose steps exceed the size budget takes the generic path."""
    w = torch.randn(math.prod(out_modes), math.prod(in_modes), dtype=F64)
    x = _correlated_inputs(40, w.shape[1])
    family, extra = (TTLinear, ()) if grid is None else (SplineTTLinear, (grid,))

    def fit() -> nn.Module:
        return family.from_linear(_linear(w), in_modes, out_modes, *extra, max_rank=2, input_gram=x.T @ x, sweeps=3)

    structured = fit()
    monkeypatch.setattr(tt_module, "_STRUCTURED_ENTRIES", 0)
    generic = fit()
    assert_close(structured.materialize(), generic.materialize())
    steps = structured.fit_report.details["als_history"]
    assert steps == pytest.approx(generic.fit_report.details["als_history"], rel=1e-6)
    assert len(steps) == 1 + 3 * len(in_modes)  # three whole sweeps


def test_tt_weighted_fit_in_float32_and_argument_checks():
    w = torch.randn(6, 6)
    x = _correlated_inputs(40, 6)
    layer = TTLinear.from_linear(_linear(w), (2, 3), (3, 2), max_rank=2, input_gram=x.T @ x)
    layer64 = TTLinear.from_linear(_linear(w.double()), (2, 3), (3, 2), max_rank=2, input_gram=x.T @ x)
    assert all(c.dtype == torch.float32 for c in layer.cores)
    assert_close(layer.materialize(), layer64.materialize().float())
    lin = _linear(w)
    with pytest.raises(ValueError, match="input_gram must have shape"):
        TTLinear.from_linear(lin, (2, 3), (3, 2), input_gram=torch.eye(5))
    with pytest.raises(ValueError, match="sweeps must be >= 1"):
        TTLinear.from_linear(lin, (2, 3), (3, 2), input_gram=x.T @ x, sweeps=0)
    with pytest.raises(TypeError, match="progress must be True or False"):
        TTLinear.from_linear(lin, (2, 3), (3, 2), progress=1)
    with pytest.raises(ValueError, match="damping"):
        TTLinear.from_linear(lin, (2, 3), (3, 2), input_gram=x.T @ x, damping=-1.0)


@pytest.mark.parametrize("in_modes, out_modes", [((6, 5), (5, 6)), ((6, 1, 5), (1, 5, 6))], ids=["d2", "d3-ones"])
def test_spline_tt_weighted_als_lowers_the_output_error(in_modes, out_modes):
    w = torch.randn(30, 30, dtype=F64)
    x = _correlated_inputs(40, 30)
    lin = _linear(w)
    plain = SplineTTLinear.from_linear(lin, in_modes, out_modes, (4, 4), max_rank=2)
    layer = SplineTTLinear.from_linear(lin, in_modes, out_modes, (4, 4), max_rank=2, input_gram=x.T @ x)
    assert plain.fit_report.output_error is None and plain.fit_report.method == "tt-svd + spline least squares"
    assert layer.fit_report.method == "tt-svd + spline + weighted als"
    # without a Gram: the TT-SVD's spline projection, as from_ttlinear computes it
    projected = SplineTTLinear.from_ttlinear(TTLinear.from_linear(lin, in_modes, out_modes, max_rank=2), (4, 4))
    assert_close(plain.materialize(), projected.materialize())
    measured = ((plain.materialize() - w).norm() / w.norm()).item()
    assert plain.fit_report.relative_error == pytest.approx(measured, rel=1e-9)
    _check_weighted_fit(layer, plain, lin, x)


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
@pytest.mark.parametrize("family", [TTLinear, SplineTTLinear], ids=["tt", "spline-tt"])
def test_fit_is_exact_on_a_weight_of_the_family(family, weighted):
    """A weight that is exactly a TT (a spline-TT) with those ranks (and grid) is fitted exactly,
    with or without a Gram; modes of 1 included."""
    if family is TTLinear:
        truth, grid = TTLinear((2, 1, 3), (3, 2, 1), (1, 2, 2, 1), dtype=F64), ()
    else:
        truth, grid = SplineTTLinear((6, 1, 5), (1, 5, 6), (1, 2, 2, 1), (4, 4), dtype=F64), ((4, 4),)
    w = truth.materialize().detach()
    x = _correlated_inputs(40, w.shape[1])
    layer = family.from_linear(_linear(w), truth.in_modes, truth.out_modes, *grid, max_rank=2,
                               input_gram=x.T @ x if weighted else None)
    assert layer.ranks == truth.ranks and layer.fit_report.relative_error < 1e-10
    if weighted:
        assert layer.fit_report.output_error < 1e-10


def test_spline_tt_fit_argument_checks():
    lin = nn.Linear(30, 30)
    with pytest.raises(ValueError, match="at least 4 control points"):
        SplineTTLinear.from_linear(lin, (6, 5), (5, 6), (3, 4))
    with pytest.raises(ValueError, match="in modes"):
        SplineTTLinear.from_linear(lin, (6, 4), (5, 6), (4, 4))
    with pytest.raises(TypeError, match="expected an nn.Linear"):
        SplineTTLinear.from_linear(SplineLinear(30, 30), (6, 5), (5, 6), (4, 4))
    with pytest.raises(TypeError, match="input_gram"):
        SplineTTLinear.from_linear(lin, (6, 5), (5, 6), (4, 4), input_gram=torch.eye(30, dtype=torch.int64))
    layer = SplineTTLinear.from_linear(nn.Linear(30, 30, bias=False), (6, 5), (5, 6), (4, 4), max_rank=3,
                                       strategy="contract")
    assert layer.bias is None and layer.strategy == "contract" and layer.control[0].dtype == torch.float32
