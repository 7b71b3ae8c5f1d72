"""Shared activation-aware fitting maths (tspline_kernels/_fit.py): Gram checks, whitening, the
calibrated output error, and the weighted alternating least squares used by the Kronecker, TT and
spline-TT fits."""

import pytest
import torch
from torch import nn

from tspline_kernels import LowRankLinear
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
    with pytest.raises(ValueError, match="damping must be a float >= 0"):
        whiten(x.T @ x, damping=-1.0)


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
