"""Triton decoupled-MLP kernels against the reference: y and dx, dV, dW, dcoef, dbias.

On CPU the kernels run under the Triton interpreter (blocks BM=16, BK=BN=32, BR=16, two row
splits in the backward), on CUDA compiled; shapes are deliberately not block multiples, ranks
above 16 span two rank blocks, and z = x @ V falls on both sides of every unit's knot range
(linear extrapolation). Tolerances: ``tspline_kernels.testing.TOLERANCES`` for the input dtype.
"""

import pytest
import torch

from tspline_kernels import backend
from tspline_kernels.decoupled import kernels, ops
from tspline_kernels.reference import decoupled as ref
from tspline_kernels.testing import assert_close

NAMES = ["y", "dx", "dV", "dW", "dcoef", "dbias"]

# (leading shape of x, in_features m, out_features n, rank r, n_basis K)
SHAPES = {
    "odd-5x37x45-r3-K6": ((5,), 37, 45, 3, 6),
    "one-row": ((1,), 37, 45, 3, 6),
    "3d-2x3": ((2, 3), 37, 45, 3, 6),
    "empty-batch": ((0,), 37, 45, 3, 6),
    "rows-40-splits-r20-K12": ((40,), 29, 33, 20, 12),  # 3 row blocks over 2 splits, 2 rank blocks
    "rank-1": ((6,), 9, 5, 1, 6),
    "n_basis-4": ((6,), 9, 5, 4, 4),
    "all-ones": ((3,), 1, 1, 1, 4),
}


def make_args(lead, m, n, r, k, dtype, device, bias=True, x_scale=1.0, v_scale=1.0):
    """x, V, W, coef, lo, hi, bias; with 5 rows or more each unit's range is the middle half of its
    z = x @ V, so the rows fall below, inside and above it (linear extrapolation on both sides);
    lo and hi are then strided views (rows of the quantiles' ``(2, r)`` result)."""
    x = (x_scale * torch.randn(*lead, m, device=device)).to(dtype)
    v = (2 * v_scale * torch.randn(m, r, device=device) / m ** 0.5).to(dtype)
    w = torch.randn(n, r, device=device).to(dtype)
    coef = torch.randn(r, k, device=device).to(dtype)
    z = x.reshape(-1, m).float() @ v.float()
    if z.shape[0] >= 5:
        lo, hi = torch.quantile(z, torch.tensor([0.25, 0.75], device=device), dim=0)
    else:
        lo, hi = -0.5 - torch.rand(r, device=device), 0.5 + torch.rand(r, device=device)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    return x, v, w, coef, lo, hi, b


def run(args, dy, which, need=(True, True, True, True, True)):
    """y and the gradients of (x, V, W, coef, bias) that ``need`` asks for (None for the others),
    under backend ``which``."""
    x, v, w, coef, lo, hi, b = args
    with backend(which):
        leaves = [t.detach().clone().requires_grad_(q) for t, q in zip((x, v, w, coef), need)]
        bias = None if b is None else b.detach().clone().requires_grad_(need[4])
        y = ops.decoupled_mlp(*leaves, lo, hi, bias)
        wanted = [t for t in (*leaves, bias) if t is not None and t.requires_grad]
        grads = dict(zip(map(id, wanted), torch.autograd.grad(y, wanted, dy)))
    return {"y": y} | {name: grads.get(id(t)) for name, t in zip(NAMES[1:], (*leaves, bias))}


def assert_agree(args, dy, dtype, need=(True, True, True, True, True)):
    got, want = run(args, dy, "triton", need), run(args, dy, "reference", need)
    for name in NAMES:
        if want[name] is None:
            assert got[name] is None, name
            continue
        assert got[name].dtype == want[name].dtype, f"{name}: {got[name].dtype} != {want[name].dtype}"
        assert_close(got[name], want[name], dtype, name=name)


def assert_extrapolates(args):
    """Some z lie below lo and some above hi (when there are enough rows to expect it)."""
    x, v, _, _, lo, hi, _ = args
    z = x.reshape(-1, x.shape[-1]).float() @ v.float()
    if z.shape[0] >= 5:
        assert (z < lo).any() and (z > hi).any() and ((z > lo) & (z < hi)).any()


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_fp32_shapes(shape, kernel_device):
    lead, m, n, r, k = SHAPES[shape]
    args = make_args(lead, m, n, r, k, torch.float32, kernel_device)
    assert_extrapolates(args)
    assert_agree(args, torch.randn(*lead, n, device=kernel_device), torch.float32)


@pytest.mark.parametrize("rows", [9, 40], ids=["one-split", "splits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_dtypes(dtype, rows, kernel_device):
    """Every dtype, dcoef rounded once to coef's: by the kernel's single split, or by the slot sum."""
    args = make_args((rows,), 37, 45, 20, 7, dtype, kernel_device)
    assert_agree(args, torch.randn(rows, 45, device=kernel_device).to(dtype), dtype)


def test_fp16_large_projection_keeps_fp32_range(kernel_device):
    """dz = (dy @ W) g'(z) past fp16's 65504 (the tensor-core operand of dx = dz @ V.T and of
    dV = x.T @ dz is rescaled) while every result is a normal fp16 number, as in the reference,
    which keeps dz in fp32: small x and V make narrow knot ranges, hence steep splines."""
    x, v, w, coef, lo, hi, b = make_args((6,), 20, 12, 3, 6, torch.float16, kernel_device, x_scale=0.02, v_scale=0.02)
    dy = (2 * torch.randn(6, 12, device=kernel_device)).half()
    z = x.float() @ v.float()
    dz = (dy.float() @ w.float()) * ref.spline_activation_derivative(z, coef.float(), lo, hi)
    assert dz.abs().max() > 65504
    assert_agree((x, v, w, coef, lo, hi, b), dy, torch.float16)


def test_fp64_runs_the_reference_exactly(kernel_device):
    """fp64 takes the reference on the auto backend (CPU) with fp64 gradients; the Triton kernels
    refuse it with a TypeError naming the dtype."""
    x, v, w, coef, lo, hi, b = make_args((4,), 7, 5, 3, 6, torch.float64, "cpu")
    y = ops.decoupled_mlp(x, v, w, coef, lo, hi, b)
    assert y.dtype == torch.float64
    assert torch.equal(y, ref.decoupled_mlp(x, v, w, coef, lo.double(), hi.double(), b))
    params = [t.requires_grad_() for t in (x, v, w, coef, b)]
    assert torch.autograd.gradcheck(lambda x, v, w, coef, b: ops.decoupled_mlp(x, v, w, coef, lo, hi, b), params)
    with backend("triton"), pytest.raises(TypeError, match="float64"):
        ops.decoupled_mlp(*(t.detach().to(kernel_device) for t in (x, v, w, coef, lo, hi, b)))


def test_non_contiguous_input_and_expanded_grad(kernel_device):
    args = make_args((6,), 37, 45, 3, 6, torch.float32, kernel_device)
    strided = torch.randn(6, 2 * 37, device=kernel_device)[:, ::2]  # column stride 2
    transposed = torch.randn(37, 6, device=kernel_device).T
    for x in (strided, transposed):
        assert not x.is_contiguous()
        assert_agree((x, *args[1:]), torch.randn(6, 45, device=kernel_device), torch.float32)
    expanded = torch.randn(45, device=kernel_device).expand(6, 45)  # row stride 0, as from y.sum()
    assert_agree(args, expanded, torch.float32)
    strided_bias = torch.randn(2 * 45, device=kernel_device)[::2]
    assert_agree((*args[:6], strided_bias), torch.randn(6, 45, device=kernel_device), torch.float32)


@pytest.mark.parametrize("need", [(False, True, True, True, True), (True, False, False, False, False),
                                  (False, False, False, True, False), (False, False, False, False, True)],
                         ids=["no-dx", "dx-only", "dcoef-only", "dbias-only"])
def test_partial_gradients(need, kernel_device):
    """Each backward branch (no dx tiles, no factor products, bias alone) against the reference."""
    args = make_args((7,), 29, 21, 4, 6, torch.float32, kernel_device)
    assert_agree(args, torch.randn(7, 21, device=kernel_device), torch.float32, need)


def test_no_bias(kernel_device):
    args = make_args((5,), 29, 21, 4, 6, torch.float32, kernel_device, bias=False)
    assert_agree(args, torch.randn(5, 21, device=kernel_device), torch.float32)


def test_second_order_gradients(kernel_device):
    """Gradients of a penalty on every first-order gradient (the backward op's own autograd)."""
    x, v, w, coef, lo, hi, b = make_args((6,), 11, 7, 3, 6, torch.float32, kernel_device)
    wrt = [t.requires_grad_() for t in (x, v, w, coef, b)]
    weights = [torch.randn_like(t) for t in wrt]
    out = {}
    for which in ("triton", "reference"):
        with backend(which):
            first = torch.autograd.grad(ops.decoupled_mlp(x, v, w, coef, lo, hi, b).square().sum(), wrt,
                                        create_graph=True)
            out[which] = torch.autograd.grad(sum((g * s).sum() for g, s in zip(first, weights)), wrt)
    for name, got, want in zip(["x", "V", "W", "coef", "bias"], out["triton"], out["reference"]):
        assert_close(got, want, torch.float32, name=name)


def test_backward_kernel_outputs(kernel_device):
    """G = g(x @ V) and dz = (dy @ W) g'(x @ V) stored by the backward kernel, on a 3-D input."""
    x, v, w, coef, lo, hi, _ = make_args((3, 7), 19, 13, 20, 9, torch.float32, kernel_device)
    dy = torch.randn(3, 7, 13, device=kernel_device)
    z = x.reshape(-1, 19) @ v
    dx, g, dz, dcoef = kernels.decoupled_mlp_backward(dy, x, v, w, coef, lo, hi, True)
    assert g.shape == dz.shape == (3, 7, 20) and dcoef.shape == (20, 9) and dx.shape == x.shape
    assert_close(g.reshape(-1, 20), ref.spline_activation(z, coef, lo, hi), torch.float32, name="G")
    want_dz = (dy.reshape(-1, 13) @ w) * ref.spline_activation_derivative(z, coef, lo, hi)
    assert_close(dz.reshape(-1, 20), want_dz, torch.float32, name="dz")


@pytest.mark.parametrize("factor_dtype", [None, torch.float32, torch.bfloat16], ids=["no-factors", "fp32", "bf16"])
def test_backward_op_gives_every_gradient(factor_dtype, kernel_device):
    """The one backward op: dx, dcoef, and dV, dW, d_bias in ``factor_dtype`` (empty for None), the
    kernels against the reference, on a 3-D input."""
    x, v, w, coef, lo, hi, _ = make_args((3, 7), 19, 13, 20, 9, torch.float32, kernel_device)
    dy = torch.randn(3, 7, 13, device=kernel_device)
    out = {}
    for which in ("triton", "reference"):
        with backend(which):
            out[which] = ops.decoupled_mlp_backward(dy, x, v, w, coef, lo, hi, True, factor_dtype)
    shapes = [x.shape, coef.shape, *([(19, 20), (13, 20), (13,)] if factor_dtype else [(0,)] * 3)]
    for name, got, want, shape in zip(["dx", "dcoef", "dV", "dW", "dbias"], out["triton"], out["reference"], shapes):
        assert got.shape == shape, name
        if got.numel():
            assert got.dtype == (factor_dtype if name in ("dV", "dW", "dbias") else torch.float32), name
            assert_close(got, want, name=name)


def _opcheck_args(device):
    x, v, w, coef, lo, hi, b = make_args((2, 3), 7, 5, 3, 6, torch.float32, device)
    params = [t.requires_grad_() for t in (x, v, w, coef, b)]
    return params, lo, hi, torch.randn(2, 3, 5, device=device)


@pytest.mark.parametrize("which", ["reference", "triton"])
def test_opcheck_forward(which, kernel_device):
    """Schema, fake implementation (shapes, strides, dtypes), autograd registration and AOT dispatch."""
    (x, v, w, coef, b), lo, hi, _ = _opcheck_args(kernel_device)
    with backend(which):
        torch.library.opcheck(ops.decoupled_mlp, (x, v, w, coef, lo, hi, b))


@pytest.mark.parametrize("which", ["reference", "triton"])
@pytest.mark.parametrize("need_input, factor_dtype", [(True, torch.float32), (False, None)],
                         ids=["dx-factors", "no-dx-no-factors"])
def test_opcheck_backward(which, need_input, factor_dtype, kernel_device):
    """The backward op as the forward's autograd calls it. AOT dispatch traces its second-order
    formula (the same on both backends): once, on the kernels, with static shapes (dynamic ones
    take 3x as long, ~16 s on a CPU core; the forward op's opcheck covers dynamic shapes)."""
    (x, v, w, coef, _), lo, hi, dy = _opcheck_args(kernel_device)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    if which == "triton" and need_input:
        tests += ("test_aot_dispatch_static",)
    with backend(which):
        torch.library.opcheck(ops.decoupled_mlp_backward, (dy, x, v, w, coef, lo, hi, need_input, factor_dtype),
                              test_utils=tests)


@pytest.mark.compile
def test_torch_compile_fullgraph(kernel_device):
    """fullgraph tracing through the forward op and the backward's ops, both backends."""
    x, v, w, coef, lo, hi, b = make_args((5,), 9, 6, 3, 6, torch.float32, kernel_device)
    params = [t.requires_grad_() for t in (x, v, w, coef, b)]

    def loss(x, v, w, coef, b):
        return ops.decoupled_mlp(x, v, w, coef, lo, hi, b).square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    want = torch.autograd.grad(loss(*params), params)
    for which in ("reference", "triton"):
        with backend(which):
            got = torch.autograd.grad(compiled(*params), params)
        for name, a, e in zip(["x", "V", "W", "coef", "bias"], got, want):
            assert_close(a, e, torch.float32, name=f"{which} d{name}")


def test_shape_mismatch_is_a_value_error(kernel_device):
    x, v, w, coef, lo, hi, b = make_args((2,), 7, 5, 3, 6, torch.float32, kernel_device)
    with backend("triton"), pytest.raises(ValueError, match="coef"):
        ops.decoupled_mlp(x, v, w, coef[:2], lo, hi, b)


def test_routing(spy, kernel_device):
    """auto sends CPU tensors to the reference; triton forces both launchers."""
    calls = spy(kernels, "decoupled_mlp", "decoupled_mlp_backward")
    args = make_args((2,), 7, 5, 3, 6, torch.float32, "cpu")
    for device, which, expected in (("cpu", "auto", []), (kernel_device, "triton", ["decoupled_mlp", "decoupled_mlp_backward"])):
        x, v, w, coef, lo, hi, b = (t.to(device) for t in args)
        v.requires_grad_()
        with backend(which):
            ops.decoupled_mlp(x, v, w, coef, lo, hi, b).sum().backward()
        assert calls == expected
        calls.clear()
