"""What every family shares through ``CompressedLinear`` (``tspline_kernels/_layers.py``)."""

import pytest
import torch

import tspline_kernels as tk

FAMILIES = {
    "spline": lambda **kw: tk.SplineLinear(12, 8, **kw),
    "hierarchical": lambda **kw: tk.HierarchicalSplineLinear(12, 8, **kw),
    "lowrank": lambda **kw: tk.LowRankLinear(12, 8, 3, **kw),
    "tt": lambda **kw: tk.TTLinear((3, 4), (2, 4), 2, **kw),
    "spline_tt": lambda **kw: tk.SplineTTLinear((3, 4), (2, 4), 2, (4, 4), **kw),
    "kronecker": lambda **kw: tk.KroneckerLinear((3, 4), (2, 4), **kw),
    "gaussian": lambda **kw: tk.SplineLinear(12, 8, basis="gaussian", n_control_points=6, **kw),
    "decoupled": lambda **kw: tk.DecoupledSplineMLP(12, 8, 3, n_basis=5, **kw),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_meta_forward_gives_shapes(family):
    """Like nn.Linear, a layer on the meta device runs on meta inputs (shape inference)."""
    layer = FAMILIES[family](device="meta")
    y = layer(torch.randn(2, 5, 12, device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 5, 8)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bad_dtype_and_features_raise_clearly(family):
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        FAMILIES[family](dtype="float32")
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        FAMILIES[family](dtype=torch.int32)
    with pytest.raises(TypeError, match="bias must be True or False"):
        FAMILIES[family](bias="yes")


def test_features_are_checked_ints():
    with pytest.raises(TypeError, match="in_features must be an int"):
        tk.LowRankLinear(12.0, 8, 3)
    with pytest.raises(ValueError, match="out_features must be >= 1"):
        tk.SplineLinear(12, 0)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "kronecker"])  # Kronecker: per-mode biases
def test_reset_bias_after_to_empty(family):
    """``reset_bias`` draws nn.Linear's U(-1/sqrt(in), 1/sqrt(in)) bias, also after ``to_empty``."""
    layer = FAMILIES[family](device="meta").to_empty(device="cpu")
    layer.bias.data.fill_(float("nan"))
    layer.reset_bias()
    assert torch.isfinite(layer.bias).all() and layer.bias.abs().max() <= 12 ** -0.5


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_inplace_op_on_the_output(family, backend):
    """As after nn.Linear, an in-place op on the layer's output (``ReLU(inplace=True)``, ``y += r``)
    works and backpropagates like its out-of-place form: the ops return no view of their scratch."""
    torch.manual_seed(0)
    layer = FAMILIES[family]()
    x = torch.randn(2, 3, 12)
    with tk.backend(backend):
        y = layer(x)
        expected = torch.autograd.grad(torch.relu(y).square().sum(), list(layer.parameters()))
        y = layer(x)
        y.relu_()
        got = torch.autograd.grad(y.square().sum(), list(layer.parameters()))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
