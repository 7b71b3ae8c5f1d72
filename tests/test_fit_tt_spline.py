"""Activation-aware (input_gram) fits of SplineLinear, TTLinear and SplineTTLinear against brute force."""

import pytest
import torch
from torch import nn

from tspline_kernels import SplineLinear
from tspline_kernels.reference.spline import BSPLINE, basis_matrix
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
