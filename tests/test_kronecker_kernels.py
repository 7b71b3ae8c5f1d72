"""Triton Kronecker kernels against the reference: forward, dx, every factor, bias and gate gradient.

On CPU the kernels run under the Triton interpreter (four rows per forward program, two batch
splits in the gradient kernel), on CUDA compiled; mode sizes are deliberately odd (padded to 16).
Tolerances: ``tspline_kernels.testing.TOLERANCES`` for the input dtype.
"""

import math

import pytest
import torch

from tspline_kernels import backend
from tspline_kernels._triton import dot_dim
from tspline_kernels.kronecker import KroneckerLinear, kernels, ops
from tspline_kernels.reference import kronecker as ref
from tspline_kernels.testing import assert_backends_agree, assert_close, cuda_step_peak_bytes

# (leading shape of x, in_dims, out_dims)
SHAPES = {
    "odd-5x(3,5)->(4,7)": ((5,), (3, 5), (4, 7)),
    "one-row": ((1,), (3, 5), (4, 7)),
    "3d-2x3": ((2, 3), (3, 5), (4, 7)),
    "empty-batch": ((0,), (3, 5), (4, 7)),
    "rows-9-splits": ((9,), (6, 2), (3, 9)),  # several rows per forward block and per batch split
    "3-modes": ((4,), (3, 5, 2), (4, 3, 3)),  # grouped into (3 x 5) and (12 x 10) factors
    "1-mode": ((3,), (13,), (9,)),
    "wide-17": ((3,), (17, 3), (2, 18)),  # padded to 32
}


def make_layer(in_dims, out_dims, dtype, device, **kwargs):
    layer = KroneckerLinear(in_dims, out_dims, **kwargs).to(device=device, dtype=dtype)
    with torch.no_grad():
        for b in layer.biases or ():
            b.normal_()
    return layer


def inputs(lead, layer, dtype, device):
    x = torch.randn(*lead, layer.in_features, device=device, dtype=dtype)
    g = torch.randn(*lead, layer.out_features, device=device, dtype=dtype)
    return x, g


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_fp32_shapes(shape, bias, kernel_device):
    lead, ins, outs = SHAPES[shape]
    layer = make_layer(ins, outs, torch.float32, kernel_device, bias=bias)
    assert_backends_agree(layer, *inputs(lead, layer, torch.float32, kernel_device), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", ["odd-5x(3,5)->(4,7)", "3-modes"])
def test_half_dtypes(shape, dtype, kernel_device):
    lead, ins, outs = SHAPES[shape]
    layer = make_layer(ins, outs, dtype, kernel_device)
    assert_backends_agree(layer, *inputs(lead, layer, dtype, kernel_device), dtype)


@pytest.mark.parametrize("kwargs", [{}, {"gating_mode": "hard", "transform_outer": False}], ids=["soft", "hard-reversed"])
def test_gated(kwargs, kernel_device):
    """The three-mode gated layer runs the same kernels on its mixed factors (found by torch ops);
    gate and projection gradients too."""
    layer = make_layer((3, 5, 2), (4, 5, 3), torch.float32, kernel_device, gated=True, gating_hidden_dim=4, **kwargs)
    assert_backends_agree(layer, *inputs((2, 3), layer, torch.float32, kernel_device), torch.float32)


# two-mode gated layers (the gate kernels): (leading shape, in_dims, out_dims, layer keywords)
GATED_2 = {
    "soft-proj+identity": ((5,), (3, 5), (4, 5), {}),
    "hard-reversed": ((2, 3), (3, 5), (4, 5), {"gating_mode": "hard", "transform_outer": False}),
    "reversed-no-bias": ((4,), (6, 2), (3, 9), {"transform_outer": False, "bias": False}),
    "second-only": ((1,), (3, 5), (4, 7), {"gated_modes": [1]}),
    "first-reversed": ((3,), (5, 3), (5, 2), {"gated_modes": "first", "transform_outer": False}),
    "wide-17-hidden-20": ((3,), (17, 3), (2, 18), {"gating_hidden_dim": 20}),
}


@pytest.mark.parametrize("case", list(GATED_2), ids=list(GATED_2))
def test_gated_two_modes(case, kernel_device):
    """The gate kernels (batch sum, one-program gates) and their reference backward against the
    reference: output, dx (through the batch mean too) and every parameter's gradient."""
    lead, ins, outs, kwargs = GATED_2[case]
    layer = make_layer(ins, outs, torch.float32, kernel_device, **{**GATED_SMALL, **kwargs})
    assert_backends_agree(layer, *inputs(lead, layer, torch.float32, kernel_device), torch.float32)


@pytest.mark.parametrize("frozen", ["x+gates.0+factors.1", "every parameter"])
def test_gated_two_modes_partial_gradients(frozen, kernel_device):
    """The gated op's backward with some inputs frozen: only the gradients asked for, each as the reference's."""
    layer = make_layer((3, 5), (4, 5), torch.float32, kernel_device, **GATED_SMALL)
    for name, p in layer.named_parameters():
        p.requires_grad_(frozen != "every parameter" and not name.startswith(("gates.0", "factors.1")))
    x, g = inputs((4,), layer, torch.float32, kernel_device)
    assert_backends_agree(layer, x, g, torch.float32, x_grad=frozen == "every parameter")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gated_two_modes_half(dtype, kernel_device):
    layer = make_layer((3, 5), (4, 5), dtype, kernel_device, gated=True, gating_hidden_dim=4)
    assert_backends_agree(layer, *inputs((6,), layer, dtype, kernel_device), dtype)


@pytest.mark.parametrize("split_rows", [2, kernels.GATE_SPLIT_ROWS], ids=["5-slots", "rows-direct"])
def test_gated_maps_directly(split_rows, monkeypatch, kernel_device):
    """The gate kernels' (A', B', b_eff) and the gated op's y on a strided 3-D x of 9 rows, summed
    by the gate program itself or first into 5 partial slots; fp32 gate networks for bf16 x, a
    transposed gate weight, soft and hard, both orders; and a hidden size past the kernel's tile,
    which runs the reference."""
    monkeypatch.setattr(kernels, "GATE_SPLIT_ROWS", split_rows)
    x = torch.randn(3, 3, 40, device=kernel_device)[..., ::2]
    r = lambda *shape: torch.randn(*shape, device=kernel_device) * 0.5  # noqa: E731
    for hidden in (6, kernels.max_tile(torch.float32) + 1):
        for dtype in (torch.float32, torch.bfloat16):
            for hard, outer in ((False, True), (True, False)):
                args = (x.to(dtype), r(4, 4), r(2, 5), r(4), r(2),
                        r(4, hidden).T, r(hidden), r(1, hidden), r(1), None, None,  # mode 0: 4 x 4, identity
                        r(hidden, 5), r(hidden), r(1, hidden), r(1), r(2, 5), r(2), hard, outer)
                with backend("triton"):
                    maps = kernels.gated_maps(*args)
                    y, *mixed = ops.kronecker_gated_linear(*args)
                assert (maps is None) == (dot_dim(hidden) > kernels.max_tile(dtype))
                want = ref.gated_maps(*args)
                for name, got, expected in zip(("A'", "B'", "bias"), maps or want, want):
                    assert got.dtype == expected.dtype == dtype and got.shape == expected.shape, name
                    assert_close(got, expected, dtype, name=f"{name} ({dtype}, hard={hard})")
                for name, got, expected in zip(("A' (op)", "B' (op)"), mixed, want):
                    assert_close(got, expected, dtype, name=f"{name} ({dtype}, hard={hard})")
                assert_close(y, ref.kronecker_gated_linear(*args)[0], dtype, name=f"y (hidden {hidden}, {dtype})")


def test_non_contiguous_input_and_expanded_grad(kernel_device):
    layer = make_layer((3, 5), (4, 7), torch.float32, kernel_device)
    x = torch.randn(6, 30, device=kernel_device)[:, ::2]  # column stride 2
    xt = torch.randn(15, 6, device=kernel_device).T  # transposed
    g_expanded = torch.randn(28, device=kernel_device).expand(6, 28)  # row stride 0, as from y.sum()
    for inp in (x, xt):
        assert not inp.is_contiguous()
        assert_backends_agree(layer, inp, torch.randn(6, 28, device=kernel_device), torch.float32)
    assert_backends_agree(layer, x, g_expanded, torch.float32)


@pytest.mark.parametrize("frozen", ["x", "factors.0", "factors.0+factors.1", "biases"])
def test_partial_gradients(frozen, kernel_device):
    """Each backward branch (factor kernel, dx only, bias only) against the reference."""
    layer = make_layer((3, 5), (4, 7), torch.float32, kernel_device)
    for name, p in layer.named_parameters():
        p.requires_grad_(not any(name.startswith(f) for f in frozen.split("+")))
    x, g = torch.randn(5, 15, device=kernel_device), torch.randn(5, 28, device=kernel_device)
    assert_backends_agree(layer, x, g, torch.float32, x_grad=frozen != "x")


def test_second_order_gradients(kernel_device):
    """Gradients of a penalty on every first-order gradient: differentiates the backward's own ops."""
    layer = make_layer((3, 5), (4, 3), torch.float32, kernel_device)
    x = torch.randn(6, 15, device=kernel_device, requires_grad=True)
    wrt = [x, *layer.parameters()]
    weights = [torch.randn_like(t) for t in wrt]
    out = {}
    for which in ("triton", "reference"):
        with backend(which):
            first = torch.autograd.grad(layer(x).square().sum(), wrt, create_graph=True)
            penalty = sum((g * w).sum() for g, w in zip(first, weights))
            out[which] = torch.autograd.grad(penalty, wrt)
    for i, (got, want) in enumerate(zip(out["triton"], out["reference"])):
        assert_close(got, want, torch.float32, name=f"input {i}")


@pytest.mark.parametrize("lead", [(5, 7), (2,)], ids=["35-rows", "2-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ops_directly(dtype, lead, kernel_device):
    """Both ops on transposed factor views (as the dx call passes them); the factor gradients in
    the parameters' dtype: batch split partials summed into it (35 rows: 2 splits of at least
    MIN_SPLIT_ROWS), or one program's own stores in it (2 rows)."""
    x = torch.randn(*lead, 35, device=kernel_device, dtype=dtype)
    a = torch.randn(5, 4, device=kernel_device, dtype=dtype).mT  # (4, 5), strides swapped
    b = torch.randn(6, 7, device=kernel_device, dtype=dtype)
    dy = torch.randn(*lead, 24, device=kernel_device, dtype=dtype)
    results = {}
    for which in ("triton", "reference"):
        with backend(which):
            results[which] = (ops.kronecker_linear(x[..., :20], a.mT.mT[:, :4], b[:, :5], None),
                              *ops.kronecker_grad_factors(x, dy, a[:, :5], b, dtype))
    for name, got, want in zip(["y", "dA", "dB", "dy row sum"], results["triton"], results["reference"]):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert_close(got, want, dtype, name=name)


def test_large_modes_fall_back_to_the_reference(kernel_device):
    """A mode padded past max_tile runs the unfused reference path, with the same results."""
    n = kernels.max_tile(torch.float32) + 1
    layer = make_layer((n, 1), (2, 3), torch.float32, kernel_device)
    assert not kernels.fits(*layer._pair(list(layer.factors)), torch.float32)
    assert_backends_agree(layer, *inputs((3,), layer, torch.float32, kernel_device), torch.float32)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_routing(spy, kernel_device, bias):
    """auto sends CPU tensors to the reference and CUDA tensors to Triton; triton forces the
    launchers. A two-mode layer with biases runs the gated op without gates (the closed-form bias
    on chip, nothing kept between calls); without biases the plain fused op."""
    calls = spy(kernels, "kronecker_linear", "kronecker_grad_factors", "gated_linear")
    layer = make_layer((3, 5), (4, 7), torch.float32, "cpu", bias=bias)
    x = torch.randn(2, 15)
    trained = (["gated_linear", "kronecker_grad_factors", "kronecker_linear"] if bias
               else ["kronecker_linear", "kronecker_linear", "kronecker_grad_factors"])
    for device, which, expected in (("cpu", "auto", []), (kernel_device, "triton", trained)):
        layer.to(device)
        with backend(which):
            layer(x.to(device).requires_grad_()).sum().backward()
        assert calls == expected
        calls.clear()
        with backend(which), torch.no_grad():
            layer(x.to(device))
        assert calls == ([] if not expected else ["gated_linear"] if bias else ["kronecker_linear"])
        calls.clear()


def test_routing_gated(spy, kernel_device):
    """A two-mode gated layer under Triton: the gated launcher forward; in the backward the factor
    gradients (inside ``gated_grads``, with the maps and the gates' pullback) and dx."""
    calls = spy(kernels, "gated_linear", "kronecker_linear", "kronecker_grad_factors")
    layer = make_layer((3, 5), (4, 7), torch.float32, kernel_device, **GATED_SMALL)
    with backend("triton"):
        layer(torch.randn(2, 15, device=kernel_device, requires_grad=True)).sum().backward()
    assert calls == ["gated_linear", "kronecker_grad_factors", "kronecker_linear"]


GATED_SMALL = {"gated": True, "gating_hidden_dim": 4}


@pytest.mark.parametrize("dims", [((3, 5, 2), (4, 5, 3)), ((3, 5), (4, 5))], ids=["3-modes", "2-modes"])
@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=["0-rows", "2x0-rows"])
@pytest.mark.parametrize("kwargs", [{}, GATED_SMALL, {**GATED_SMALL, "gating_mode": "hard", "transform_outer": False}],
                         ids=["plain", "gated", "gated-hard-reversed"])
@pytest.mark.parametrize("which", ["triton", "reference"])
def test_empty_batch_gives_zero_gradients(which, kwargs, lead, dims, kernel_device):
    """An empty batch: an empty output and exactly zero (not NaN) gradients for every parameter,
    gates included (the gated layer's batch mean has no rows to average). Hard gates are a step
    function: their networks get no gradient on any batch."""
    layer = make_layer(*dims, torch.float32, kernel_device, **kwargs)
    x = torch.randn(*lead, layer.in_features, device=kernel_device, requires_grad=True)
    with backend(which):
        y = layer(x)
        y.backward(torch.randn_like(y))
    assert y.shape == (*lead, layer.out_features) and x.grad.shape == x.shape
    for name, p in layer.named_parameters():
        if kwargs.get("gating_mode") == "hard" and name.startswith("gates."):
            assert p.grad is None, name
        else:
            assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name


def test_kernel_launch_input_checks():
    with backend("triton"), pytest.raises(TypeError, match="fp32, fp16 or bf16"):
        KroneckerLinear((3, 5), (4, 7), dtype=torch.float64)(torch.randn(3, 15, dtype=torch.float64))


@pytest.mark.cuda
@pytest.mark.parametrize("m", [64, 4096])
def test_no_dense_weight_buffer_on_cuda(m):
    """Forward and backward never allocate an (out x in) buffer nor a per-row intermediate (each
    would be a whole bf16 W here): beyond y and dx, only the fp32 split partials of the factors
    (at most one slot per MIN_SPLIT_ROWS rows, 6 MiB at m = 4096), below a quarter of W."""
    layer = make_layer((64, 64), (64, 64), torch.bfloat16, "cuda")
    n = math.prod(layer.in_dims)
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    peak = cuda_step_peak_bytes(layer, x, g)
    activations = 2 * m * n * 2  # y and dx
    assert peak - activations < n * n * 2 / 4, f"peak {peak / 2**20:.1f} MiB beyond activations"
