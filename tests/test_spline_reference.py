"""The spline reference against its definitions: scipy's B-splines and tensor-spline 1.0.0."""

import copy
import math

import numpy as np
import pytest
import tensor_spline
import torch
from scipy.interpolate import BSpline

import tspline_kernels as tk
from tspline_kernels import backend
from tspline_kernels.reference import spline as ref
from tspline_kernels.spline import ops
from tspline_kernels.testing import assert_close


@pytest.mark.parametrize("n, g", [(1, 4), (2, 4), (37, 4), (64, 7), (100, 33), (5, 12)])
def test_bspline_basis_matches_scipy(n, g):
    knots = np.concatenate([[-1.0] * 3, np.linspace(-1, 1, g - 2), [1.0] * 3])
    x = np.linspace(-1, 1, n)
    expected = BSpline.design_matrix(x, knots, 3).toarray()
    assert_close(ref.basis_matrix(n, g, ref.BSPLINE, torch.float64), torch.from_numpy(expected), name="B-spline basis")


def test_bspline_basis_is_partition_of_unity_and_banded():
    b = ref.basis_matrix(513, 40, ref.BSPLINE, torch.float64)
    assert_close(b.sum(1), torch.ones(513, dtype=torch.float64))
    assert int((b != 0).sum(1).max()) <= 4


def test_eisenstein_lattice_matches_tensor_spline():
    for n in (1, 2, 7, 16, 19, 50, 121):
        assert torch.equal(ref.eisenstein_lattice(n), tensor_spline.EisensteinLattice(n).positions())


def _outputs_and_grads(module, x, g, names):
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(g)
    params = dict(module.named_parameters())
    return [y, x.grad] + [params[n].grad for n in names]


@pytest.mark.parametrize("basis", ["bspline", "gaussian", "eisenstein"])
@pytest.mark.parametrize("n", [1, 9, 16, 30])
def test_from_tensor_spline_same_outputs_and_gradients(basis, n):
    """Outputs and every gradient within 1e-5 (relative to the tensor's scale when that exceeds 1)
    of tensor-spline's maths evaluated in fp64; its own fp32 autograd loses ~1e-5 to cancellation in
    d/d log_bandwidth, ours does not."""
    _check_against_tensor_spline(basis, n, log_bandwidth=-0.4)


@pytest.mark.parametrize("n", [1, 16])
def test_narrow_gaussian_matches_tensor_spline(n):
    """sigma = e^-3.5 puts most exp arguments below the reference's floor of -60 (kept out of
    denormals); the result still matches the unfloored maths."""
    _check_against_tensor_spline("gaussian", n, log_bandwidth=-3.5)


def _check_against_tensor_spline(basis: str, n: int, log_bandwidth: float) -> None:
    theirs = tensor_spline.SplineLinear(23, 17, n_control_points=n, basis=basis)
    with torch.no_grad():
        theirs.control_values.normal_()
        theirs.bias.normal_()
        if basis == "gaussian":
            theirs.log_bandwidth.fill_(log_bandwidth)
    ours = tk.SplineLinear.from_tensor_spline(theirs)
    assert ours.basis == {"bspline": "bicubic"}.get(basis, basis)
    x, g = torch.randn(2, 5, 23), torch.randn(2, 5, 17)
    names = [n for n, _ in theirs.named_parameters()]  # control_values, [log_bandwidth], bias
    exact = _outputs_and_grads(copy.deepcopy(theirs).double(), x.double(), g.double(), names)
    ours_names = [{"control_values": "control"}.get(n, n) for n in names]
    for got, want in zip(_outputs_and_grads(ours, x, g, ours_names), exact):
        assert (got.double() - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())
    assert_close(ours.materialize(), theirs._materialize(), name="weight")


def test_from_tensor_spline_rejects_other_modules():
    with pytest.raises(TypeError, match="tensor_spline.SplineLinear"):
        tk.SplineLinear.from_tensor_spline(torch.nn.Linear(3, 3))


def test_separable_weight_is_the_product_of_bases():
    c = torch.randn(6, 9, dtype=torch.float64)
    w = ref.separable_weight(c, 31, 40, ref.BSPLINE)
    bo = ref.basis_matrix(31, 6, ref.BSPLINE, torch.float64)
    bi = ref.basis_matrix(40, 9, ref.BSPLINE, torch.float64)
    assert_close(w, bo @ c @ bi.T)


def test_local_support_radius_reaches_three_points_everywhere():
    for n in (7, 16, 64, 200):
        lattice = ref.eisenstein_lattice(n).double()
        rho = ref.support_radius(lattice, 3)
        g = torch.linspace(-1, 1, 301, dtype=torch.float64)
        grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
        inside = (torch.cdist(grid, lattice) < rho).sum(1)
        assert int(inside.min()) >= 3


@pytest.mark.parametrize("n", [1, 2, 7, 64, 300])
def test_support_radius_tiled_scan_is_exact(n):
    """The tiled scan (only lattice points that can be among a tile's k nearest) returns exactly
    the brute-force maximum k-th distance over the whole grid."""
    lattice = ref.eisenstein_lattice(n).double()
    g = ref.positions(257, torch.float64)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    for k in (1, 3):
        dist = torch.cdist(grid, lattice, compute_mode="donot_use_mm_for_euclid_dist")
        kth = dist.kthvalue(min(k, n), dim=1).values.max().item()
        assert ref.support_radius(lattice, k) == 1.25 * (kth + (2 / 256) * math.sqrt(0.5))


def test_local_support_uses_only_points_within_radius():
    layer = tk.SplineLinear(41, 33, basis="eisenstein", n_control_points=64, support="local")
    w0 = layer.materialize()
    far = ref.eisenstein_lattice(64).norm(dim=1) > 0.9
    with torch.no_grad():
        layer.control[far] += 10.0  # moving far lattice points leaves central weights alone
    w1 = layer.materialize()
    pos = ref.positions(33)[:, None].abs().maximum(ref.positions(41)[None, :].abs())
    central = pos < 0.9 - layer.rho
    assert central.any() and torch.equal(w0[central], w1[central])


FIELD_CASES = [(ref.IDW, False), (ref.GAUSSIAN, False), (ref.IDW, True), (ref.GAUSSIAN, True)]


@pytest.mark.parametrize("basis, local", FIELD_CASES, ids=["idw", "gaussian", "idw-local", "gaussian-local"])
@pytest.mark.parametrize("transpose", [False, True])
def test_field_linear_gradcheck(basis, local, transpose):
    n_out, n_in = 5, 7
    a = torch.randn(3, n_in if not transpose else n_out, dtype=torch.float64, requires_grad=True)
    control = torch.randn(9, dtype=torch.float64, requires_grad=True)
    lattice = ref.eisenstein_lattice(9)
    rho = ref.support_radius(lattice) if local else 0.0
    log_bandwidth = torch.tensor([-0.5], dtype=torch.float64, requires_grad=basis == ref.GAUSSIAN)
    bias = torch.randn(n_in if transpose else n_out, dtype=torch.float64, requires_grad=True)
    with backend("reference"):
        assert torch.autograd.gradcheck(
            lambda a, c, lb, b: ops.field_linear(a, c, lattice, lb, b, n_out, n_in, basis, rho, transpose),
            (a, control, log_bandwidth, bias),
        )
        # second order through field_linear_backward's own autograd formula, its d_bias included
        assert torch.autograd.gradgradcheck(
            lambda a, c, lb: ops.field_linear(a, c, lattice, lb, None, n_out, n_in, basis, rho, transpose),
            (a, control, log_bandwidth),
        )
        assert torch.autograd.gradgradcheck(
            lambda a, c, lb, b: ops.field_linear(a, c, lattice, lb, b, n_out, n_in, basis, rho, transpose),
            (a, control, log_bandwidth, bias),
        )


@pytest.mark.parametrize("kind", [ref.BSPLINE, ref.BICUBIC], ids=["bspline", "bicubic"])
def test_separable_linear_gradcheck(kind):
    """The op with one level and with two (a hierarchical layer's grids), first and second order."""
    x = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    control = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    fine = torch.randn(8, 7, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True)
    with backend("reference"):
        # dC from x projected in the backward, or from the kept forward's u
        for y in (lambda x, c, b=None, f=None: ops.separable_linear(x, c, b, 9, kind, f),
                  lambda x, c, b=None, f=None: ops.separable_linear_kept(x, c, b, 9, kind, f)[0]):
            assert torch.autograd.gradcheck(y, (x, control, bias, fine))
            # second order through separable_backward's own autograd formula (dx, dC, d_bias)
            assert torch.autograd.gradgradcheck(y, (x, control))
            assert torch.autograd.gradgradcheck(y, (x, control, bias))
            assert torch.autograd.gradgradcheck(lambda x, c, f: y(x, c, None, f), (x, control, fine))
        # u is x's projection on each level's input basis, and not differentiable
        y, u = ops.separable_linear_kept(x, control, bias, 9, kind, fine)
        torch.testing.assert_close(u, torch.cat([ref.input_projection(x, 6, kind), ref.input_projection(x, 7, kind)], -1))
        assert not u.requires_grad
        torch.testing.assert_close(y, ops.separable_linear(x, control, bias, 9, kind, fine), rtol=0, atol=0)


@pytest.mark.parametrize("n", [9, 10], ids=["square", "padded"])
def test_separable_linear_takes_bicubic_values(n):
    """A bicubic layer's (n,) values are the op's control as they are: the same output as their
    K x K grid (zero-padded to K^2), gradients of their own shape, first and second order."""
    x = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    values = torch.randn(n, dtype=torch.float64, requires_grad=True)
    grid = ref.control_grid(values)
    assert grid.shape == ((4, 4) if n == 10 else (3, 3))
    torch.testing.assert_close(grid.reshape(-1)[:n], values, rtol=0, atol=0)
    assert not grid.reshape(-1)[n:].any()
    with backend("reference"):
        for y in (lambda x, c: ops.separable_linear(x, c, None, 9, ref.BICUBIC),
                  lambda x, c: ops.separable_linear_kept(x, c, None, 9, ref.BICUBIC)[0]):
            torch.testing.assert_close(y(x, values), ops.separable_linear(x, grid, None, 9, ref.BICUBIC))
            assert torch.autograd.gradcheck(y, (x, values))
            assert torch.autograd.gradgradcheck(y, (x, values))


def test_separable_levels_sum_the_levels():
    """Two levels are the sum of each level's map (float64: one rounding is none), plus the bias once."""
    x = torch.randn(4, 11, dtype=torch.float64)
    coarse, fine, bias = torch.randn(5, 6, dtype=torch.float64), torch.randn(8, 7, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    want = (x @ (ref.separable_weight(coarse, 9, 11, ref.BSPLINE) + ref.separable_weight(fine, 9, 11, ref.BSPLINE)).T
            + bias)
    torch.testing.assert_close(ref.separable_levels(x, [coarse, fine], bias, 9, ref.BSPLINE), want)
    with pytest.raises(ValueError, match="at least one control grid"):
        ref.separable_levels(x, [], bias, 9, ref.BSPLINE)


@pytest.mark.parametrize("basis", ["bspline", "bicubic", "gaussian", "eisenstein"])
def test_module_gradcheck(basis):
    kw = {"grid": (4, 5)} if basis == "bspline" else {"n_control_points": 6}
    layer = tk.SplineLinear(7, 5, basis=basis, dtype=torch.float64, **kw)
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    params = tuple(layer.parameters())

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip([n for n, _ in layer.named_parameters()], ps)), (x,))

    with backend("reference"):
        assert torch.autograd.gradcheck(f, (x, *params))


def test_hierarchical_is_sum_of_two_bspline_levels():
    layer = tk.HierarchicalSplineLinear(30, 20, coarse_grid=(4, 4), fine_grid=(10, 12))
    coarse = ref.separable_weight(layer.control_coarse, 20, 30, ref.BSPLINE)
    fine = ref.separable_weight(layer.control_fine, 20, 30, ref.BSPLINE)
    assert_close(layer.materialize(), coarse + fine)
    # the fine level is genuinely finer: it varies within a coarse span, not block-constant
    assert fine.diff(dim=1).abs().max() > 0 and fine.diff(dim=0).abs().max() > 0
    x = torch.randn(4, 30)
    assert_close(layer(x), torch.nn.functional.linear(x, layer.materialize(), layer.bias))
