"""Triton low-rank kernels against the reference: forward, projection t, dx, dU, dV, d(bias).

On CPU the kernels run under the Triton interpreter (blocks BM=16, BK=BN=BF=32, two output and two
batch splits), on CUDA compiled; shapes are deliberately not block multiples. Tolerances:
``tspline_kernels.testing.TOLERANCES`` for the input dtype.
"""

import pytest
import torch

from tspline_kernels import backend
from tspline_kernels.lowrank import LowRankLinear, kernels, ops
from tspline_kernels.testing import assert_backends_agree, assert_close, cuda_step_peak_bytes

# (leading shape of x, in_features, out_features)
SHAPES = {
    "odd-5x37x45": ((5,), 37, 45),
    "one-row": ((1,), 37, 45),
    "3d-2x3": ((2, 3), 37, 45),
    "empty-batch": ((0,), 37, 45),
    "rows-70-splits": ((70,), 29, 33),  # several row blocks per batch split and per output split
}
RANKS = [1, 3, 20]  # padded to 16, 16, 32


def make_layer(n_in, n_out, rank, dtype, device, bias=True):
    layer = LowRankLinear(n_in, n_out, rank, bias=bias).to(device=device, dtype=dtype)
    if bias:
        with torch.no_grad():
            layer.bias.normal_()
    return layer


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_fp32_shapes(shape, rank, kernel_device):
    lead, n_in, n_out = SHAPES[shape]
    rank = min(rank, n_in, n_out)
    layer = make_layer(n_in, n_out, rank, torch.float32, kernel_device)
    x = torch.randn(*lead, n_in, device=kernel_device)
    g = torch.randn(*lead, n_out, device=kernel_device)
    assert_backends_agree(layer, x, g, torch.float32)


def test_tiny_layer_rank_one(kernel_device):
    layer = make_layer(1, 1, 1, torch.float32, kernel_device)
    assert_backends_agree(layer, torch.randn(4, 1, device=kernel_device), torch.randn(4, 1, device=kernel_device), torch.float32)


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_dtypes(dtype, rank, kernel_device):
    layer = make_layer(50, 33, rank, dtype, kernel_device)
    x = torch.randn(7, 50, device=kernel_device, dtype=dtype)
    g = torch.randn(7, 33, device=kernel_device, dtype=dtype)
    assert_backends_agree(layer, x, g, dtype)


# Scales of (V, U, x, dy) for which an fp32 projection of the kernels leaves fp16's range (x @ V or
# dy @ U past 65504, or x @ V a few fp16 subnormal steps) while every result is a normal fp16 number.
FP16_RANGE = {"x-large": (50, 1e-2, 2e3, 3e-3), "dy-large": (1e-2, 50, 1e-2, 2e3), "x-tiny": (3e-4, 1e3, 3e-4, 100)}


@pytest.mark.parametrize("case", list(FP16_RANGE))
def test_fp16_intermediates_keep_fp32_range(case, kernel_device):
    """Large- and small-magnitude fp16 data: y, dx, dU, dV and the bias gradient as the reference
    (which keeps the projections in fp32) gives them, not inf, NaN or underflowed values."""
    sv, su, sx, sg = FP16_RANGE[case]
    layer = make_layer(20, 12, 3, torch.float16, kernel_device)
    with torch.no_grad():
        layer.V.copy_(torch.randn_like(layer.V) * sv)
        layer.U.copy_(torch.randn_like(layer.U) * su)
    x = (torch.randn(6, 20, device=kernel_device) * sx).half()
    g = (torch.randn(6, 12, device=kernel_device) * sg).half()
    t, q = x.float() @ layer.V.float(), g.float() @ layer.U.float()
    assert max(t.abs().max(), q.abs().max()) > 65504 or t.abs().max() < 1e-6
    with backend("reference"):
        xr = x.clone().requires_grad_()
        y = layer(xr)
        assert all(r.isfinite().all() for r in (y, *torch.autograd.grad(y, [xr, *layer.parameters()], g)))
    assert_backends_agree(layer, x, g, torch.float16)


def test_non_contiguous_input_and_expanded_grad(kernel_device):
    layer = make_layer(37, 45, 3, torch.float32, kernel_device)
    x = torch.randn(6, 2 * 37, device=kernel_device)[:, ::2]  # column stride 2
    xt = torch.randn(37, 6, device=kernel_device).T  # transposed
    g_expanded = torch.randn(45, device=kernel_device).expand(6, 45)  # row stride 0, as from y.sum()
    for inp in (x, xt):
        assert not inp.is_contiguous()
        assert_backends_agree(layer, inp, torch.randn(6, 45, device=kernel_device), torch.float32)
    assert_backends_agree(layer, x, g_expanded, torch.float32)


@pytest.mark.parametrize("frozen", ["x", "U", "V", "U+V+bias"])
def test_partial_gradients(frozen, kernel_device):
    """Each backward branch (fused factor kernel, single skinny product, dx only) against the reference."""
    layer = make_layer(37, 45, 3, torch.float32, kernel_device, bias="bias" not in frozen)
    for name, p in layer.named_parameters():
        p.requires_grad_(name not in frozen.split("+"))
    x, g = torch.randn(5, 37, device=kernel_device), torch.randn(5, 45, device=kernel_device)
    assert_backends_agree(layer, x, g, torch.float32, x_grad="x" not in frozen)


def test_second_order_gradients(kernel_device):
    """Gradients of a penalty on every first-order gradient: differentiates the backward's own ops,
    including the gradient that reaches the projections t (forward's and the dx call's)."""
    layer = make_layer(29, 21, 4, torch.float32, kernel_device)
    x = torch.randn(6, 29, device=kernel_device, requires_grad=True)
    wrt = [x, *layer.parameters()]
    weights = [torch.randn_like(t) for t in wrt]
    out = {}
    for which in ("triton", "reference"):
        with backend(which):
            first = torch.autograd.grad(layer(x).square().sum(), wrt, create_graph=True)
            penalty = sum((g * w).sum() for g, w in zip(first, weights))
            out[which] = torch.autograd.grad(penalty, wrt)
    for name, got, want in zip(["x", "bias", "U", "V"], out["triton"], out["reference"]):
        assert_close(got, want, torch.float32, name=name)


@pytest.mark.parametrize("lead", [(3, 23), (5,)], ids=["69-rows", "5-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ops_directly(dtype, lead, kernel_device):
    """The projection output t and the factor-gradient op in the parameters' dtype: with 69 rows
    (5 row blocks over 2 splits) the fp32 partials summed into it, with 5 rows (one program per
    feature tile) the kernel's own stores in it."""
    x = torch.randn(*lead, 19, device=kernel_device, dtype=dtype)
    a = torch.randn(19, 5, device=kernel_device, dtype=dtype)
    b = torch.randn(26, 5, device=kernel_device, dtype=dtype)
    dy = torch.randn(*lead, 26, device=kernel_device, dtype=dtype)
    p = torch.randn(*lead, 5, device=kernel_device)
    q = torch.randn(*lead, 5, device=kernel_device)
    results = {}
    for which in ("triton", "reference"):
        with backend(which):
            results[which] = (*ops.lowrank_linear(x, a, b, None), *ops.lowrank_grad_factors(x, dy, p, q, dtype))
    for name, got, want in zip(["y", "t", "x.T q", "dy.T p", "dy row sum"], results["triton"], results["reference"]):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert_close(got, want, dtype, name=name)
    assert results["triton"][2].dtype == dtype


def test_routing(spy, kernel_device):
    """auto sends CPU tensors to the reference and CUDA tensors to Triton; triton forces the launchers."""
    calls = spy(kernels, "lowrank_linear", "lowrank_grad_factors")
    layer = make_layer(9, 5, 2, torch.float32, "cpu")
    x = torch.randn(2, 9)
    for device, which, expected in (("cpu", "auto", []),
                                    (kernel_device, "triton", ["lowrank_linear", "lowrank_linear", "lowrank_grad_factors"])):
        layer.to(device)
        with backend(which):
            layer(x.to(device).requires_grad_()).sum().backward()
        assert calls == expected
        calls.clear()


@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=["0-rows", "2x0-rows"])
@pytest.mark.parametrize("which", ["triton", "reference"])
def test_empty_batch_gives_zero_gradients(which, lead, kernel_device):
    """An empty batch: an empty output and exactly zero gradients for U, V and the bias."""
    layer = make_layer(37, 45, 3, torch.float32, kernel_device)
    x = torch.randn(*lead, 37, device=kernel_device, requires_grad=True)
    with backend(which):
        y = layer(x)
        y.backward(torch.randn_like(y))
    assert y.shape == (*lead, 45) and x.grad.shape == x.shape
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), name


def test_ranks_past_max_rank_fall_back_to_the_reference(spy, kernel_device):
    """A rank padded past MAX_RANK (no config fits a GPU block's shared memory) runs the reference
    inside the launchers, with the same results; MAX_RANK itself stays fused."""
    calls = spy(kernels.ref, "lowrank_linear", "lowrank_grad_factors")
    fallbacks = ["lowrank_linear", "lowrank_linear", "lowrank_grad_factors"]
    for rank, expected in ((kernels.MAX_RANK, []), (kernels.MAX_RANK + 1, fallbacks)):
        layer = make_layer(rank + 3, rank + 5, rank, torch.float32, kernel_device)
        x = torch.randn(3, rank + 3, device=kernel_device, requires_grad=True)
        with backend("triton"):
            layer(x).sum().backward()
        assert kernels.fits(rank) == (not expected) and calls == expected, rank
        calls.clear()
    assert_backends_agree(layer, x.detach(), torch.randn(3, rank + 5, device=kernel_device), torch.float32)


def test_kernel_launch_input_checks():
    with backend("triton"), pytest.raises(TypeError, match="fp32, fp16 or bf16"):
        LowRankLinear(9, 5, 2, dtype=torch.float64)(torch.randn(3, 9, dtype=torch.float64))


@pytest.mark.cuda
@pytest.mark.parametrize("n, m", [(4096, 64), (4096, 4096)])
def test_no_dense_weight_buffer_on_cuda(n, m):
    """Forward and backward never allocate an (out x in) buffer: beyond y and dx themselves, the
    peak (t, q, batch-split partials of dU, dV, d bias) stays below half of a bf16 W."""
    layer = make_layer(n, n, 16, torch.bfloat16, "cuda")
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    peak = cuda_step_peak_bytes(layer, x, g)
    activations = 2 * m * n * 2  # y and dx
    dense_weight = n * n * 2
    assert peak - activations < dense_weight / 2, f"peak {peak / 2**20:.1f} MiB beyond activations"



@pytest.mark.parametrize("which", ["triton", "reference"])
def test_op_with_parameters_of_mixed_dtypes(which, kernel_device):
    """Factors in bf16 and the bias in fp32 (a layer refuses it; the op takes it): the factor
    gradients are computed in the compute dtype (``grad_dtype``'s fallback) and each is returned in
    its own parameter's dtype, equal to the all-fp32 gradients rounded once."""
    x = torch.randn(7, 19, device=kernel_device, dtype=torch.bfloat16)
    a = torch.randn(19, 5, device=kernel_device, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(26, 5, device=kernel_device, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(26, device=kernel_device, requires_grad=True)
    dy = torch.randn(7, 26, device=kernel_device, dtype=torch.bfloat16)
    with backend(which):
        grads = torch.autograd.grad(ops.lowrank_linear(x, a, b, bias)[0], (a, b, bias), dy)
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.bfloat16, torch.float32]
    with backend("reference"):
        want = torch.autograd.grad(ops.lowrank_linear(x, a.float(), b.float(), bias)[0], (a, b, bias), dy)
    for g, w in zip(grads, want):
        assert_close(g, w.to(g.dtype), torch.bfloat16)
