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


def _updates(layer: torch.nn.Module, x: torch.Tensor) -> dict:
    """Every way a parameter update reaches a layer, each named. Fused optimizers and writes
    through ``.data`` leave the parameters' version counters as they were: no value derived from
    the parameters may be kept between calls on the strength of them."""
    def step(optimizer):
        def run():
            layer(x).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        return run

    def load():
        layer.load_state_dict({k: torch.randn_like(v) if v.is_floating_point() and k != "_extra_state" else v
                               for k, v in layer.state_dict().items()})

    def data_inplace():
        for p in layer.parameters():
            p.data.mul_(-1.5)

    def data_assign():
        for p in layer.parameters():
            p.data = torch.randn_like(p)

    def no_grad_inplace():
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(torch.randn_like(p), alpha=0.1)

    return {"SGD step": step(torch.optim.SGD(layer.parameters(), lr=0.1)),
            "fused AdamW step": step(torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)),
            "p.data in place": data_inplace, "p.data =": data_assign, "in place under no_grad": no_grad_inplace,
            "load_state_dict": load}


UPDATED = {**FAMILIES, "kronecker 3 modes": lambda **kw: tk.KroneckerLinear((3, 2, 2), (2, 2, 2), **kw),
           "tt contract": lambda **kw: tk.TTLinear((3, 4), (2, 4), 2, strategy="contract", **kw),
           "spline_tt rebuild": lambda **kw: tk.SplineTTLinear((3, 4), (2, 4), 2, (4, 4), strategy="rebuild", **kw)}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("family", list(UPDATED))
def test_outputs_follow_every_parameter_update(family, backend):
    """After each kind of update (``_updates``), the layer's inference and training outputs equal
    those of a new layer holding the updated state, computed by the reference."""
    torch.manual_seed(5)
    layer, fresh = UPDATED[family](), UPDATED[family]()
    x = torch.randn(3, layer.in_features)
    with tk.backend(backend):
        for name, update in _updates(layer, x).items():
            with torch.no_grad():
                layer(x)  # a call before the update: anything it kept must not survive it
            update()
            fresh.load_state_dict(layer.state_dict())
            with tk.backend("reference"), torch.no_grad():
                want = fresh(x)
            with torch.no_grad():
                got = layer(x)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"inference after {name}: {m}")
            torch.testing.assert_close(layer(x).detach(), want, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"training call after {name}: {m}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_nan_row_stays_in_its_row(family, backend):
    """A NaN in one input row gives NaN in that row of the output and leaves every other row as it
    was, as nn.Linear does (no crash, no index from a NaN)."""
    torch.manual_seed(6)
    layer = FAMILIES[family]()
    x = torch.randn(3, 12)
    with tk.backend(backend), torch.no_grad():
        clean = layer(x)
        x[1, 4] = float("nan")
        y = layer(x)
    assert y[1].isnan().any()
    torch.testing.assert_close(y[[0, 2]], clean[[0, 2]])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reset_parameters_redraws_every_parameter(family):
    """As nn.Linear's, ``reset_parameters`` draws every parameter afresh, the bias (or Kronecker's
    per-mode biases) and the Gaussian's bandwidth included: after ``to_empty`` it leaves no
    uninitialised value."""
    layer = FAMILIES[family](device="meta").to_empty(device="cpu")
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(float("nan"))
    layer.reset_parameters()
    for name, p in layer.named_parameters():
        assert torch.isfinite(p).all(), name
    assert torch.isfinite(layer(torch.randn(2, 12))).all()


def test_gaussian_bandwidth_resets_to_the_lattice_spacing():
    layer = tk.SplineLinear(12, 8, basis="gaussian", n_control_points=6)
    start = layer.log_bandwidth.detach().clone()
    with torch.no_grad():
        layer.log_bandwidth.fill_(3.0)
    layer.reset_parameters()
    torch.testing.assert_close(layer.log_bandwidth.detach(), start)


@pytest.mark.parametrize("cls", [tk.SplineLinear, tk.HierarchicalSplineLinear])
def test_bias_device_dtype_positional_as_in_nn_linear(cls):
    layer = cls(16, 8, False, "cpu", torch.float64)
    assert layer.bias is None and layer(torch.randn(2, 16, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_autocast_computes_as_the_layer_in_its_dtype(family, backend):
    """Under autocast a layer computes what the same layer converted to autocast's dtype does: its
    ops run with autocast off, so their fp32 intermediates stay fp32 (under fp16 autocast the
    reference's products had run in fp16 and overflowed: inf where the fp16 layer is finite)."""
    torch.manual_seed(7)
    layer = FAMILIES[family]()
    x = 30 * torch.randn(3, 12)
    with tk.backend(backend):
        with torch.autocast("cpu", dtype=torch.float16):
            got = layer(x)
            got.float().square().sum().backward()
        grads = [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad()
        half = layer.half()
        want = half(x.half())
        want.float().square().sum().backward()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, p in zip(grads, half.parameters()):
        torch.testing.assert_close(g.half(), p.grad, rtol=2e-3, atol=1e-2)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_strided_bias_and_control_read_as_their_values(family):
    """A 1-D parameter that is a strided view (a column of a matrix) gives the kernels the same
    results as its contiguous copy: they read 1-D operands contiguous."""
    torch.manual_seed(8)
    layer = FAMILIES[family]()
    x = torch.randn(3, 12)
    with tk.backend("reference"), torch.no_grad():
        want = layer(x)
    for p in layer.parameters():
        if p.dim() == 1 and p.numel() > 1:
            p.data = torch.stack([p.data, torch.full_like(p.data, 7.0)], 1)[:, 0]
    assert any(not p.is_contiguous() for p in layer.parameters())
    with tk.backend("triton"), torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-5)
