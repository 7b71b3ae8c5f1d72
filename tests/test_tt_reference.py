"""The TT and spline-TT references against their definitions: tltorch's BlockTT, dense algebra,
autograd (gradcheck / gradgradcheck in float64 through the custom ops on the reference backend)."""

import math

import pytest
import tltorch
import torch

from tspline_kernels import backend
from tspline_kernels.reference import spline_tt as sref
from tspline_kernels.reference import tt as ref
from tspline_kernels.reference.spline import BSPLINE, basis_matrix
from tspline_kernels.spline_tt import ops as sops
from tspline_kernels.testing import assert_close
from tspline_kernels.tt import TTLinear
from tspline_kernels.tt import ops

# (in_modes, out_modes, rank): tltorch accepts one int rank or the full (1, r_1, ..., 1) list
STRUCTURES = {
    "d2-odd-3x5-7x2-r3": ((3, 5), (7, 2), 3),
    "d2-rank1": ((3, 5), (7, 2), 1),
    "d3-odd-r123": ((3, 2, 5), (2, 3, 4), [1, 2, 3, 1]),
    "d4": ((2, 3, 2, 2), (3, 2, 2, 2), [1, 2, 3, 4, 1]),
}


def random_cores(in_modes, out_modes, ranks, dtype=torch.float64, requires_grad=False):
    return [torch.randn(ranks[k], out_modes[k], in_modes[k], ranks[k + 1], dtype=dtype, requires_grad=requires_grad)
            for k in range(len(in_modes))]


def tltorch_layer(in_modes, out_modes, rank):
    fl = tltorch.FactorizedLinear(in_tensorized_features=in_modes, out_tensorized_features=out_modes,
                                  factorization="blocktt", rank=rank).double()
    with torch.no_grad():
        for f in fl.weight.factors:
            f.normal_()
        fl.bias.normal_()
    return fl


@pytest.mark.parametrize("name", list(STRUCTURES), ids=list(STRUCTURES))
def test_weight_and_outputs_match_tltorch_blocktt(name):
    in_modes, out_modes, rank = STRUCTURES[name]
    fl = tltorch_layer(in_modes, out_modes, rank)
    cores = [f.detach() for f in fl.weight.factors]
    assert [tuple(c.shape[1:3]) for c in cores] == list(zip(out_modes, in_modes))
    assert_close(ref.tt_weight(cores), fl.weight.to_matrix().detach(), name="to_matrix")
    x = torch.randn(2, 3, math.prod(in_modes), dtype=torch.float64)
    assert_close(ref.tt_linear(x, cores, fl.bias.detach()), fl(x).detach(), name="forward")


@pytest.mark.parametrize("name", list(STRUCTURES), ids=list(STRUCTURES))
def test_from_tltorch_same_outputs_and_gradients(name):
    in_modes, out_modes, rank = STRUCTURES[name]
    fl = tltorch_layer(in_modes, out_modes, rank)
    ours = TTLinear.from_tltorch(fl)
    assert ours.ranks == tuple(fl.weight.rank)
    assert_close(ours.materialize(), fl.weight.to_matrix().detach(), name="materialize")
    x = torch.randn(4, math.prod(in_modes), dtype=torch.float64)
    g = torch.randn(4, math.prod(out_modes), dtype=torch.float64)
    results = []
    for module, params in ((fl, list(fl.weight.factors) + [fl.bias]), (ours, list(ours.cores) + [ours.bias])):
        xx = x.clone().requires_grad_()
        y = module(xx)
        results.append([y, *torch.autograd.grad(y, [xx, *params], g)])
    for a, b, what in zip(results[1], results[0], ["y", "dx"] + [f"core{k}" for k in range(len(in_modes))] + ["bias"]):
        assert_close(a, b, name=what)


def test_from_tltorch_rejects_other_modules():
    with pytest.raises(TypeError, match="BlockTT"):
        TTLinear.from_tltorch(torch.nn.Linear(4, 4))
    cp = tltorch.FactorizedLinear(in_tensorized_features=(2, 2), out_tensorized_features=(2, 2), factorization="cp", rank=2)
    with pytest.raises(TypeError, match="BlockTT"):
        TTLinear.from_tltorch(cp)


@pytest.mark.parametrize("shape, end_pair", [
    (((3, 2, 5), (2, 3, 4), (1, 2, 3, 1)), False),
    (((6, 3, 2), (5, 2, 2), (1, 3, 2, 1)), True),  # last two cores through their environment T
    (((2, 5, 3, 2), (3, 4, 2, 3), (1, 2, 3, 2, 1)), True),
])
def test_grad_is_the_dense_gradient(shape, end_pair):
    """tt_grad's core gradients and dx equal autograd through the dense weight, with and without
    the end-pair shortcut."""
    in_modes, out_modes, ranks = shape
    assert (len(ref.merged_modes(in_modes, out_modes, ranks)[0]) < len(in_modes)) == end_pair
    cores = random_cores(in_modes, out_modes, ranks, requires_grad=True)
    x = torch.randn(2, 3, math.prod(in_modes), dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 3, math.prod(out_modes), dtype=torch.float64)
    expected = torch.autograd.grad(x @ ref.tt_weight(cores).T, [*cores, x], dy)
    got = ref.tt_grad(dy, x, cores, True)
    for a, b in zip(got, expected):
        assert_close(a, b)
    assert len(ref.tt_grad(dy, x, cores, False)) == len(cores)


def test_head_product_and_its_gradient():
    cores = random_cores((3, 2, 4, 2), (2, 3, 2, 3), (1, 2, 3, 2, 1), requires_grad=True)
    head = ref.head_product(cores)
    w = torch.einsum("xya,aoib->xoyi", head, cores[-1]).reshape(ref.tt_weight(cores).shape)
    assert_close(w, ref.tt_weight(cores), name="W from (L, last core)")
    d_head = torch.randn_like(head)
    expected = torch.autograd.grad(head, cores[:-1], d_head)
    for a, b in zip(ref.head_product_grad(cores, d_head), expected):
        assert_close(a, b)


@pytest.mark.parametrize("shapes", [
    [(1, 2, 3, 4), (4, 3, 2, 5)],  # the first half of a cut (leading rank 1)
    [(3, 2, 1, 4), (4, 1, 3, 2), (2, 2, 2, 1)],  # a second half (trailing rank 1), modes of 1
    [(2, 3, 4, 1)],  # one core
    [(1, 2, 2, 3), (3, 1, 1, 2), (2, 3, 1, 4), (4, 2, 2, 1)],
], ids=["d2", "d3", "d1", "d4"])
def test_merge_cores_and_its_gradient(shapes):
    """merge_cores is the TT product (a whole TT merges to W), merge_cores_grad its exact VJP."""
    cores = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in shapes]
    merged = ref.merge_cores(cores)
    if merged.shape[0] == merged.shape[3] == 1:
        assert_close(merged[0, :, :, 0], ref.tt_weight(cores), name="merged TT against W")
    d_merged = torch.randn_like(merged)
    for a, b in zip(ref.merge_cores_grad([c.detach() for c in cores], d_merged),
                    torch.autograd.grad(merged, cores, d_merged)):
        assert a.shape == b.shape
        assert_close(a, b)


def test_norm_sq_without_forming_w():
    cores = random_cores((3, 4, 2), (2, 5, 3), (1, 3, 2, 1))
    assert_close(ref.tt_norm_sq(cores), ref.tt_weight(cores).square().sum())


def test_empty_batch():
    cores = random_cores((3, 5), (7, 2), (1, 3, 1))
    x = torch.randn(0, 15, dtype=torch.float64)
    assert ref.tt_linear(x, cores, None).shape == (0, 14)
    grads = ref.tt_grad(torch.randn(0, 14, dtype=torch.float64), x, cores, True)
    assert all(torch.count_nonzero(g) == 0 for g in grads) and grads[-1].shape == (0, 15)


@pytest.mark.parametrize("name", ["d2-odd-3x5-7x2-r3", "d3-odd-r123", "d4"])  # d4: end-pair shortcut
def test_tt_ops_gradcheck(name):
    in_modes, out_modes, rank = STRUCTURES[name]
    ranks = rank if isinstance(rank, list) else [1] + [rank] * (len(in_modes) - 1) + [1]
    cores = random_cores(in_modes, out_modes, ranks, requires_grad=True)
    x = torch.randn(2, 2, math.prod(in_modes), dtype=torch.float64, requires_grad=True)
    bias = torch.randn(math.prod(out_modes), dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 2, math.prod(out_modes), dtype=torch.float64, requires_grad=True)

    def linear(x, b, *cs):
        return ops.tt_linear(x, list(cs), b, "auto")

    def grad(dy, x, *cs):
        return tuple(ops.tt_grad(dy, x, list(cs), "auto", True))

    with backend("reference"):
        assert torch.autograd.gradcheck(linear, (x, bias, *cores))
        assert torch.autograd.gradgradcheck(linear, (x, bias, *cores))  # through tt_grad's own backward
        assert torch.autograd.gradcheck(grad, (dy, x, *cores))
        assert torch.autograd.gradcheck(lambda dy, x, *cs: tuple(ops.tt_grad(dy, x, list(cs), "auto", False)),
                                         (dy, x, *cores))


# ------------------------------------------------------------------------------------ spline TT
def test_spline_cores_are_basis_products():
    controls = [torch.randn(1, 4, 5, 3, dtype=torch.float64), torch.randn(3, 6, 4, 1, dtype=torch.float64)]
    cores = sref.spline_cores(controls, [9, 7], [8, 11])
    for c, g, n_in, n_out in zip(controls, cores, [9, 7], [8, 11]):
        bo = basis_matrix(n_out, c.shape[1], BSPLINE, torch.float64)
        bi = basis_matrix(n_in, c.shape[2], BSPLINE, torch.float64)
        for a in range(c.shape[0]):
            for b in range(c.shape[3]):
                assert_close(g[a, :, :, b], bo @ c[a, :, :, b] @ bi.T)


def test_spline_tt_ops_gradcheck():
    in_modes, out_modes = [6, 5], [4, 7]
    controls = [torch.randn(1, 4, 5, 2, dtype=torch.float64, requires_grad=True),
                torch.randn(2, 5, 4, 1, dtype=torch.float64, requires_grad=True)]
    x = torch.randn(3, 30, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 28, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(28, dtype=torch.float64, requires_grad=True)

    def linear(x, b, *cs):
        return sops.spline_tt_linear(x, list(cs), b, in_modes, out_modes, "auto")

    with backend("reference"):
        assert torch.autograd.gradcheck(linear, (x, bias, *controls))
        assert torch.autograd.gradgradcheck(linear, (x, bias, *controls))
        assert torch.autograd.gradcheck(
            lambda dy, x, *cs: tuple(sops.spline_tt_grad(dy, x, list(cs), in_modes, out_modes, "auto", True)),
            (dy, x, *controls))
