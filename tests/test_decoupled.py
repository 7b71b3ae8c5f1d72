"""DecoupledSplineMLP: the spline reference against scipy's BSpline (values, derivatives, linear
extrapolation), gradchecks, and the layer against the reference at odd shapes and every dtype."""

import numpy as np
import pytest
import torch
from scipy.interpolate import BSpline
from torch import nn

import tspline_kernels as tk
from tspline_kernels.decoupled import DecoupledSplineMLP
from tspline_kernels.reference import decoupled as ref
from tspline_kernels.testing import assert_close

F64 = torch.float64


def _units(r: int, k: int):
    """Random ranges (lo, hi) and coefficients (r, k) in fp64."""
    lo = torch.randn(r, dtype=F64)
    return lo, lo + 0.5 + 3 * torch.rand(r, dtype=F64), torch.randn(r, k, dtype=F64)


def _scipy(lo: float, hi: float, c: torch.Tensor) -> BSpline:
    """The definition: clamped cubic spline, four knots at lo and hi, K - 4 uniform interior knots."""
    k = c.numel()
    knots = np.r_[[lo] * 3, np.linspace(lo, hi, k - 2), [hi] * 3]
    return BSpline(knots, c.numpy(), 3, extrapolate=False)


# ------------------------------------------------------------------------------ the definition
@pytest.mark.parametrize("k", [4, 5, 7, 12])
def test_spline_matches_scipy_inside_the_range(k):
    lo, hi, coef = _units(3, k)
    z = lo + (hi - lo) * torch.rand(41, 3, dtype=F64)
    z[0], z[1] = lo, hi  # the end points themselves
    g = ref.spline_activation(z, coef, lo, hi)
    dg = ref.spline_activation_derivative(z, coef, lo, hi)
    for i in range(3):
        b = _scipy(lo[i].item(), hi[i].item(), coef[i])
        assert_close(g[:, i], torch.from_numpy(b(z[:, i].numpy())), name=f"g_{i}")
        assert_close(dg[:, i], torch.from_numpy(b.derivative()(z[:, i].numpy())), name=f"g'_{i}")


@pytest.mark.parametrize("k", [4, 9])
def test_spline_extrapolates_linearly(k):
    lo, hi, coef = _units(2, k)
    out = torch.rand(2, 5, 2, dtype=F64) * 4
    z = torch.cat([lo - 0.01 - out[0], hi + 0.01 + out[1]])  # (10, 2): below, then above the range
    g = ref.spline_activation(z, coef, lo, hi)
    dg = ref.spline_activation_derivative(z, coef, lo, hi)
    for i in range(2):
        b = _scipy(lo[i].item(), hi[i].item(), coef[i])
        db = b.derivative()
        edge = torch.cat([lo[i].expand(5), hi[i].expand(5)])
        value = torch.from_numpy(b(edge.numpy()))
        slope = torch.from_numpy(db(edge.numpy()))
        assert_close(g[:, i], value + slope * (z[:, i] - edge), name=f"g_{i}")
        assert_close(dg[:, i], slope, name=f"g'_{i}")


def test_gradcheck_reference():
    lo, hi, coef = _units(3, 6)
    z = (lo + (hi - lo) * (1.6 * torch.rand(7, 3, dtype=F64) - 0.3)).requires_grad_()  # some outside
    assert torch.autograd.gradcheck(lambda z, c: ref.spline_activation(z, c, lo, hi), (z, coef.requires_grad_()))
    x = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
    v = (torch.randn(5, 3, dtype=F64) / 2).requires_grad_()
    w = torch.randn(4, 3, dtype=F64, requires_grad=True)
    bias = torch.randn(4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ref.decoupled_mlp(a[0], a[1], a[2], a[3], lo, hi, a[4]),
                                    (x, v, w, coef, bias))


def test_autograd_slope_is_the_derivative():
    lo, hi, coef = _units(4, 8)
    z = (lo + (hi - lo) * (1.4 * torch.rand(30, 4, dtype=F64) - 0.2)).requires_grad_()
    (dz,) = torch.autograd.grad(ref.spline_activation(z, coef, lo, hi).sum(), z)
    assert_close(dz, ref.spline_activation_derivative(z.detach(), coef, lo, hi))


def test_decoupled_mlp_matches_definition():
    lo, hi, coef = _units(3, 7)
    x, v, w, b = (torch.randn(*s, dtype=F64) for s in [(2, 4, 6), (6, 3), (5, 3), (5,)])
    g = ref.spline_activation((x @ v).reshape(-1, 3), coef, lo, hi).reshape(2, 4, 3)
    assert_close(ref.decoupled_mlp(x, v, w, coef, lo, hi, b), g @ w.T + b)
    assert_close(ref.decoupled_mlp(x, v, w, coef, lo, hi, None), g @ w.T)


# --------------------------------------------------------------------------------- the layer
def _reference(layer: DecoupledSplineMLP, x: torch.Tensor) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.double()
    return ref.decoupled_mlp(x.double(), layer.V.double(), layer.W.double(), layer.coef.double(),
                             layer.lo.double(), layer.hi.double(), bias)


@pytest.mark.parametrize(("lead", "m", "n", "rank", "k", "bias"), [
    pytest.param((1,), 5, 3, 2, 12, True, id="one-row"),
    pytest.param((2, 3), 7, 5, 4, 6, True, id="3d"),
    pytest.param((0,), 4, 3, 2, 12, True, id="empty"),
    pytest.param((9,), 6, 1, 1, 4, False, id="rank1-k4-nobias"),
    pytest.param((3, 1, 2), 13, 11, 9, 5, True, id="odd-4d"),
])
@pytest.mark.parametrize("which", ["reference", "triton"])
def test_layer_matches_reference(lead, m, n, rank, k, bias, which):
    dtype = F64 if which == "reference" else torch.float32  # the kernels run fp32 and the half types
    layer = DecoupledSplineMLP(m, n, rank, n_basis=k, bias=bias, dtype=dtype)
    with torch.no_grad():  # spread the ranges so inputs land inside and outside them
        layer.lo.uniform_(-2, -0.5)
        layer.hi.uniform_(0.2, 1.5)
    x = 2 * torch.randn(*lead, m, dtype=dtype)
    with tk.backend(which):
        y = layer(x)
    assert y.shape == (*lead, n)
    assert_close(y, _reference(layer, x), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_dtype(dtype):
    layer = DecoupledSplineMLP(9, 6, 5, dtype=dtype)
    x = torch.randn(3, 9, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    assert_close(y, _reference(layer, x), dtype)


def test_autocast_runs_in_the_autocast_dtype():
    layer = DecoupledSplineMLP(8, 4, 3)
    x = torch.randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert_close(y, _reference(layer, x), torch.bfloat16)


def test_init_is_gelu_on_three_sigma():
    layer = DecoupledSplineMLP(16, 8, 4, dtype=F64)
    z = torch.linspace(-3, 3, 301, dtype=F64)[:, None].expand(-1, 4)
    g = ref.spline_activation(z, layer.coef, layer.lo, layer.hi)
    assert (g - nn.functional.gelu(z)).abs().max() < 1e-3  # a 12-function cubic spline, measured 6.7e-4
    bound = 1 / 16 ** 0.5
    assert layer.V.abs().max() <= bound and layer.V.std() > bound / 3
    assert layer.W.abs().max() <= 1 / 2


def test_gradients_reach_every_parameter():
    layer = DecoupledSplineMLP(6, 4, 3, dtype=F64)
    x = torch.randn(10, 6, dtype=F64, requires_grad=True)
    y = layer(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
    expected = torch.autograd.grad(_reference_params(layer, x).square().sum(), [x, *layer.parameters()])
    for got, want in zip(grads, expected):
        assert_close(got, want)
        assert got.abs().max() > 0


def _reference_params(layer, x):
    return ref.decoupled_mlp(x, layer.V, layer.W, layer.coef, layer.lo, layer.hi, layer.bias)


def test_state_dict_carries_the_knot_ranges():
    a = DecoupledSplineMLP(5, 3, 2, n_basis=7)
    with torch.no_grad():
        a.lo.uniform_(-2, -1)
        a.hi.uniform_(1, 2)
    assert {"lo", "hi"} <= set(a.state_dict())
    b = DecoupledSplineMLP(5, 3, 2, n_basis=7)
    b.load_state_dict(a.state_dict())
    x = 3 * torch.randn(4, 5)
    assert torch.equal(a(x), b(x))


def test_meta_device_and_to_empty():
    layer = DecoupledSplineMLP(6, 4, 3, device="meta")
    assert layer(torch.empty(2, 5, 6, device="meta")).shape == (2, 5, 4)
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    layer.reset_bias()
    assert torch.isfinite(layer(torch.randn(2, 6))).all()


def test_repr_and_parameters():
    layer = tk.DecoupledSplineMLP(20, 10, 4, n_basis=8)
    assert layer.num_parameters() == 4 * (20 + 10 + 8) + 10
    text = repr(layer)
    assert "rank=4" in text and "n_basis=8" in text and f"params={layer.num_parameters()}" in text
    with pytest.raises(NotImplementedError, match="nonlinear"):
        layer.materialize()


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"rank": 0}, ValueError, "rank"),
    ({"rank": 2.0}, TypeError, "rank"),
    ({"n_basis": 3}, ValueError, "n_basis"),
    ({"bias": 1}, TypeError, "bias"),
    ({"dtype": torch.int32}, TypeError, "dtype"),
])
def test_bad_arguments(kwargs, error, match):
    args = {"in_features": 4, "out_features": 3, "rank": 2, **kwargs}
    with pytest.raises(error, match=match):
        DecoupledSplineMLP(**args)


def test_bad_inputs():
    layer = DecoupledSplineMLP(4, 3, 2)
    with pytest.raises(ValueError, match="in_features=4"):
        layer(torch.randn(2, 5))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 4, dtype=torch.int64))
