"""LowRankLinear: reference against its definition, gradchecks, conversions (truncated SVD,
tensor-spline), the nn.Linear contract, input validation and torch.compile."""

import copy

import numpy as np
import pytest
import tensor_spline
import torch
import torch.nn.functional as F
from torch import nn

from tspline_kernels import backend
from tspline_kernels.lowrank import LowRankLinear, ops
from tspline_kernels.reference import lowrank as ref
from tspline_kernels.testing import assert_close, assert_compiles_like_eager, assert_learns


def _dense_outputs_and_grads(layer, x, g):
    """y and (dx, d bias, dU, dV) by plain autograd through W = U @ V.T and F.linear, in fp64."""
    u = layer.U.detach().double().requires_grad_()
    v = layer.V.detach().double().requires_grad_()
    b = layer.bias.detach().double().requires_grad_()
    xd = x.double().requires_grad_()
    y = F.linear(xd, u @ v.T, b)
    return (y, *torch.autograd.grad(y, [xd, b, u, v], g.double()))


def _outputs_and_grads(layer, x, g):
    x = x.clone().requires_grad_()
    y = layer(x)
    return (y, *torch.autograd.grad(y, [x, layer.bias, layer.U, layer.V], g))


# ------------------------------------------------------------------------------ the definition
@pytest.mark.parametrize("rank", [1, 3, 11])
def test_reference_ops_match_definition(rank):
    x = torch.randn(2, 5, 13, dtype=torch.float64)
    a, b = torch.randn(13, rank, dtype=torch.float64), torch.randn(11, rank, dtype=torch.float64)
    bias = torch.randn(11, dtype=torch.float64)
    y, t = ref.lowrank_linear(x, a, b, bias)
    assert y.shape == (2, 5, 11) and t.shape == (2, 5, rank)
    assert_close(t, torch.einsum("mnk,kr->mnr", x, a))
    assert_close(y, torch.einsum("mnk,ok->mno", x, b @ a.T) + bias)
    dy = torch.randn(2, 5, 11, dtype=torch.float64)
    da, db, dbias = ref.lowrank_grad_factors(x, dy, t, dy @ b, torch.float64)
    x2, dy2 = x.reshape(10, 13), dy.reshape(10, 11)
    assert_close(da, x2.T @ dy2 @ b)
    assert_close(db, dy2.T @ x2 @ a)
    assert_close(dbias, torch.einsum("mno->o", dy))


def test_reference_computes_half_types_in_fp32():
    x = torch.randn(4, 9).bfloat16()
    a, b = torch.randn(9, 3).bfloat16(), torch.randn(6, 3).bfloat16()
    y, t = ref.lowrank_linear(x, a, b, None)
    assert y.dtype == torch.bfloat16 and t.dtype == torch.float32
    assert_close(t, x.double() @ a.double(), torch.float32)


@pytest.mark.parametrize("rank", [1, 4, 7])
def test_module_outputs_and_grads_match_dense_weight(rank):
    """forward = F.linear with W = U @ V.T, and every gradient equals autograd through that W."""
    layer = LowRankLinear(13, 7, rank, dtype=torch.float64)
    x, g = torch.randn(3, 4, 13, dtype=torch.float64), torch.randn(3, 4, 7, dtype=torch.float64)
    for got, want in zip(_outputs_and_grads(layer, x, g), _dense_outputs_and_grads(layer, x, g)):
        assert_close(got, want)
    w = layer.materialize()
    assert w.shape == (7, 13) and torch.linalg.matrix_rank(w) == rank
    assert_close(w, layer.U @ layer.V.T)


# --------------------------------------------------------------------------------- gradchecks
def test_lowrank_linear_gradcheck_both_outputs():
    """Both outputs reach one output tensor, so the backward sees gradients for y and for t at once
    (the second-order branch); then second order through the formula's own ops."""
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    a = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def both(*args):
        y, t = ops.lowrank_linear(*args)
        return torch.cat([y.flatten(), t.flatten()])

    with backend("reference"):
        assert torch.autograd.gradcheck(both, (x, a, b, bias))
        assert torch.autograd.gradcheck(lambda *args: ops.lowrank_linear(*args)[0], (x, a, b, bias))
        assert torch.autograd.gradcheck(lambda *args: ops.lowrank_linear(*args)[1], (x, a, b, bias))
        assert torch.autograd.gradgradcheck(lambda x, a, b: ops.lowrank_linear(x, a, b, None)[0], (x, a, b))
        assert torch.autograd.gradgradcheck(both, (x, a, b, bias))


def test_grad_factors_gradcheck():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    p = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    q = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    with backend("reference"):
        assert torch.autograd.gradcheck(lambda *a: ops.lowrank_grad_factors(*a, torch.float64), (x, dy, p, q))
        # all three outputs in one: gradients reach d(dy) from dy.T @ p and from the row sum at once
        assert torch.autograd.gradcheck(
            lambda *a: torch.cat([o.flatten() for o in ops.lowrank_grad_factors(*a, torch.float64)]), (x, dy, p, q))


@pytest.mark.parametrize("frozen", ["none", "x", "U", "V", "U+V"])
def test_module_gradcheck(frozen):
    """Every combination of which inputs need gradients takes its own backward branch."""
    layer = LowRankLinear(6, 5, 2, dtype=torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad="x" not in frozen)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(n not in frozen.split("+")) for n, p in layer.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    with backend("reference"):
        assert torch.autograd.gradcheck(f, (x, *params))


# ---------------------------------------------------------------------------- from_linear (SVD)
@pytest.mark.parametrize("rank", [1, 5, 12])
def test_from_linear_reaches_the_eckart_young_optimum(rank):
    """The SVD error equals sqrt(sum_{i>r} s_i^2) / ||W|| computed independently from a weight
    with a known spectrum, to fp64 rounding."""
    n_out, n_in = 12, 20
    p, _ = torch.linalg.qr(torch.randn(n_out, n_out, dtype=torch.float64))
    q, _ = torch.linalg.qr(torch.randn(n_in, n_out, dtype=torch.float64))
    s = torch.sort(torch.rand(n_out, dtype=torch.float64) + 0.1, descending=True).values
    linear = nn.Linear(n_in, n_out, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(p @ torch.diag(s) @ q.T)
    layer = LowRankLinear.from_linear(linear, rank)
    expected = (s[rank:].square().sum() / s.square().sum()).sqrt().item()
    report = layer.fit_report
    assert report.method == "truncated SVD" and report.details["rank"] == rank
    assert abs(report.details["optimal_error"] - expected) < 1e-12
    assert abs(report.relative_error - expected) < 1e-12
    assert report.params == layer.num_parameters() == rank * (n_in + n_out) + n_out
    assert report.dense_params == n_in * n_out + n_out
    # the singular values are split evenly: U.T U = V.T V = diag(s_r)
    assert_close(layer.U.T @ layer.U, torch.diag(s[:rank]))
    assert_close(layer.V.T @ layer.V, torch.diag(s[:rank]))
    assert torch.equal(layer.bias, linear.bias)


def test_from_linear_beats_other_rank_r_weights_and_is_exact_at_full_rank():
    linear = nn.Linear(30, 18)
    best = LowRankLinear.from_linear(linear, 6)
    w = linear.weight.double()
    err = (best.materialize().double() - w).norm() / w.norm()
    assert abs(err.item() - best.fit_report.relative_error) < 1e-12
    assert abs(best.fit_report.relative_error - best.fit_report.details["optimal_error"]) < 1e-6  # fp32 factors
    for _ in range(5):  # perturbed factors are never better
        other = copy.deepcopy(best)
        with torch.no_grad():
            other.U.add_(1e-2 * torch.randn_like(other.U))
            other.V.add_(1e-2 * torch.randn_like(other.V))
        assert (other.materialize().double() - w).norm() / w.norm() > err
    full = LowRankLinear.from_linear(linear, 18)
    assert full.fit_report.details["optimal_error"] == 0.0 and full.fit_report.relative_error < 1e-6
    x = torch.randn(4, 30)
    assert_close(full(x), linear(x), torch.float32)
    assert "truncated SVD" in str(full.fit_report)


def test_from_linear_keeps_device_dtype_and_missing_bias():
    linear = nn.Linear(9, 7, bias=False, dtype=torch.float64)
    layer = LowRankLinear.from_linear(linear, 3)
    assert layer.bias is None and layer.U.dtype == torch.float64 and layer.rank == 3


def test_from_linear_rejects_bad_arguments():
    with pytest.raises(TypeError, match="nn.Linear"):
        LowRankLinear.from_linear(nn.Conv1d(3, 3, 1), 2)
    with pytest.raises(ValueError, match=r"min\(in_features, out_features\)=7"):
        LowRankLinear.from_linear(nn.Linear(9, 7), 8)
    with pytest.raises(ValueError, match="meta device"):
        LowRankLinear.from_linear(nn.Linear(9, 7, device="meta"), 2)


# ------------------------------------------------------------------------- from_tensor_spline
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rank", [1, 4, 9])
def test_from_tensor_spline_same_outputs_and_gradients(rank, bias):
    theirs = tensor_spline.LowRankLinear(17, 9, rank=rank, bias=bias, init_scale=0.3)
    if bias:
        with torch.no_grad():
            theirs.bias.normal_()
    ours = LowRankLinear.from_tensor_spline(theirs)
    assert (ours.U.shape, ours.V.shape, ours.rank) == ((9, rank), (17, rank), rank)
    x, g = torch.randn(2, 5, 17), torch.randn(2, 5, 9)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_theirs, y_ours = theirs(xa), ours(xb)
    assert torch.allclose(y_ours, y_theirs, rtol=1e-6, atol=1e-6)
    y_theirs.backward(g)
    y_ours.backward(g)
    assert_close(xb.grad, xa.grad, torch.float32, name="dx")
    assert_close(ours.V.grad, theirs.U.grad, torch.float32, name="dV = dU_ts")
    assert_close(ours.U.grad, theirs.V.grad.T, torch.float32, name="dU = dV_ts.T")
    if bias:
        assert_close(ours.bias.grad, theirs.bias.grad, torch.float32, name="d bias")
    assert_close(ours.materialize(), (theirs.U @ theirs.V).T.detach(), torch.float32, name="weight")


def test_from_tensor_spline_rejects_other_modules():
    with pytest.raises(TypeError, match="tensor_spline.LowRankLinear"):
        LowRankLinear.from_tensor_spline(nn.Linear(3, 3))


def test_from_tensor_spline_recompresses_rank_above_min_exactly():
    """tensor-spline's own inject_low_rank test model (rank 8 also on the 32 -> 4 layer) and its
    default rank 16 on an 8 -> 12 layer: rank min(in, out), the same weights and outputs."""
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    tensor_spline.inject_low_rank(model, rank=8)
    default = tensor_spline.LowRankLinear(8, 12)
    with torch.no_grad():
        for p in [*model.parameters(), *default.parameters()]:
            p.normal_(0, 0.3)
    ours = nn.Sequential(*(LowRankLinear.from_tensor_spline(m) if k != 1 else m for k, m in enumerate(model)))
    ours_default = LowRankLinear.from_tensor_spline(default)
    assert (ours[0].rank, ours[2].rank, ours_default.rank) == (8, 4, 8)
    for mine, theirs in ((ours[0], model[0]), (ours[2], model[2]), (ours_default, default)):
        assert_close(mine.materialize(), (theirs.U @ theirs.V).T.detach(), torch.float32, name="weight")
    x = torch.randn(2, 5, 64)
    assert_close(ours(x), model(x).detach(), torch.float32, name="inject_low_rank model")
    x = torch.randn(3, 8)
    assert_close(ours_default(x), default(x).detach(), torch.float32, name="default rank 16")


# ----------------------------------------------------------------------------- module contract
def test_parameters_counts_and_repr():
    layer = LowRankLinear(64, 32, 8)
    shapes = [(n, tuple(p.shape)) for n, p in layer.named_parameters()]
    assert shapes == [("bias", (32,)), ("U", (32, 8)), ("V", (64, 8))]
    assert layer.num_parameters() == 8 * (64 + 32) + 32
    assert layer.dense_parameters() == 64 * 32 + 32
    text = repr(layer)
    assert "rank=8" in text and "params=800" in text
    assert LowRankLinear(5, 5, 5, bias=False).num_parameters() == 50


def test_init_matches_nn_linear_scale():
    layer = LowRankLinear(256, 128, 8)
    mean_sq = layer.materialize().pow(2).mean().item()
    assert 0.5 / (3 * 256) < mean_sq < 2.0 / (3 * 256)
    bound = 1 / 256**0.5
    assert layer.bias.abs().max() <= bound and layer.bias.std() > 0.3 * bound


def test_device_dtype_state_dict_and_autocast():
    layer = LowRankLinear(10, 4, 2, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    assert layer(torch.randn(3, 10, dtype=torch.float64)).dtype == torch.float64
    a, b = LowRankLinear(12, 7, 3), LowRankLinear(12, 7, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 12)
    assert torch.equal(a(x), b(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = a(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert a.U.grad.dtype == torch.float32 and a.V.grad.dtype == torch.float32


@pytest.mark.parametrize(
    "rank, error, match",
    [(0, ValueError, "rank must be >= 1, got 0"), (-2, ValueError, "rank must be >= 1, got -2"),
     (2.0, TypeError, "rank must be an int, got 2.0"), (True, TypeError, "rank must be an int, got True"),
     ("2", TypeError, "rank must be an int, got '2'"), (None, TypeError, "rank must be an int, got None"),
     (7, ValueError, r"rank=7 exceeds min\(in_features, out_features\)=6")],
)
def test_bad_rank(rank, error, match):
    with pytest.raises(error, match=match):
        LowRankLinear(10, 6, rank)


def test_bad_construction():
    with pytest.raises(ValueError, match="in_features"):
        LowRankLinear(0, 6, 1)
    with pytest.raises(TypeError, match="floating-point"):
        LowRankLinear(10, 6, 2, dtype=torch.int32)
    for bias in ("no", None, 1):
        with pytest.raises(TypeError, match=f"bias must be True or False, got {bias!r}"):
            LowRankLinear(10, 6, 2, bias=bias)


def test_int_like_rank_is_accepted():
    layer = LowRankLinear(10, 6, np.int64(2))
    assert type(layer.rank) is int and layer.rank == 2 and layer.U.shape == (6, 2)


def test_meta_device_then_to_empty_and_load():
    """Large-model loading: build on meta (no memory), to_empty, load_state_dict: equal to the original."""
    original = LowRankLinear(13, 7, 3)
    meta = LowRankLinear(13, 7, 3, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    loaded = meta.to_empty(device="cpu")
    loaded.load_state_dict(original.state_dict())
    x = torch.randn(4, 13)
    assert torch.equal(loaded(x), original(x))


def test_bad_inputs():
    layer = LowRankLinear(10, 6, 2)
    with pytest.raises(ValueError, match="in_features=10"):
        layer(torch.randn(3, 11))
    with pytest.raises(ValueError, match="in_features=10"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(3, 10, dtype=torch.int64))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(3, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="meta"):
        layer(torch.randn(3, 10, device="meta"))
    with pytest.raises(TypeError, match="expects a tensor"):
        layer([1.0] * 10)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = LowRankLinear(9, 5, 3)
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = layer(torch.randn(2, 4, 9))
        assert y.shape == (2, 4, 5)
        da, db, dsum = ops.lowrank_grad_factors(torch.randn(2, 3, 9), torch.randn(2, 3, 5), torch.randn(2, 3, 3),
                                                torch.randn(2, 3, 3), torch.bfloat16)
        assert da.shape == (9, 3) and db.shape == (5, 3) and dsum.shape == (5,)
        assert da.dtype == db.dtype == dsum.dtype == torch.bfloat16


def test_trains_to_a_low_rank_target():
    torch.manual_seed(0)
    target = LowRankLinear(20, 10, 3)
    model = LowRankLinear(20, 10, 3)
    assert_learns(model, target, torch.randn(256, 20), steps=300, lr=0.03)


@pytest.mark.compile
def test_torch_compile_fullgraph():
    """fullgraph tracing through both custom ops and their autograd formulas; the compiled graph
    then runs the Triton kernels too (the backend is chosen inside the op at run time)."""
    model = nn.Sequential(LowRankLinear(24, 16, 5), nn.GELU(), nn.Linear(16, 3))
    assert_compiles_like_eager(model, torch.randn(5, 24, requires_grad=True))
