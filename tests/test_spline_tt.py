"""SplineTTLinear: nn.Linear contract, spline structure of the cores, grid validation, the
least-squares conversion from TTLinear and torch.compile."""

import numpy as np
import pytest
import torch
from torch import nn

from tspline_kernels.reference import spline_tt as sref
from tspline_kernels.reference import tt as ref
from tspline_kernels.reference.spline import BSPLINE, basis_matrix
from tspline_kernels.spline_tt import SplineTTLinear
from tspline_kernels.testing import assert_close, assert_compiles_like_eager
from tspline_kernels.tt import TTLinear


def test_forward_is_linear_in_materialized_weight():
    layer = SplineTTLinear((9, 6), (5, 7), 3, (4, 5))
    x = torch.randn(2, 3, 54)
    assert layer(x).shape == (2, 3, 35) and layer.materialize().shape == (35, 54)
    assert_close(layer(x), nn.functional.linear(x, layer.materialize(), layer.bias))
    assert_close(layer.materialize(), ref.tt_weight(layer.cores()))


def test_cores_are_smooth_spline_surfaces():
    """Each core slice is Bo C Bi.T: it lies in the span of the bases, so projecting onto that span
    leaves it unchanged, and it is smooth (small second differences) on a fine mode grid."""
    layer = SplineTTLinear((40, 3), (32, 4), 2, [(6, 4), (4, 4)], dtype=torch.float64)
    core = layer.cores()[0]
    bo = basis_matrix(32, 6, BSPLINE, torch.float64)
    bi = basis_matrix(40, 4, BSPLINE, torch.float64)
    po, pi = bo @ torch.linalg.pinv(bo), bi @ torch.linalg.pinv(bi)
    projected = torch.einsum("xo,aoib,yi->axyb", po, core, pi)
    assert_close(projected, core)
    # rms second difference over rms value along the 32 output positions: sqrt(6) ~ 2.45 for noise
    roughness = core.diff(n=2, dim=1).pow(2).mean().sqrt() / core.pow(2).mean().sqrt()
    assert roughness < 0.2


def test_parameters_grid_and_repr():
    layer = SplineTTLinear((8, 6, 5), (4, 5, 6), (1, 2, 3, 1), [(4, 5), (5, 4), (4, 4)])
    assert [n for n, _ in layer.named_parameters()] == ["bias", "control.0", "control.1", "control.2"]
    assert [tuple(c.shape) for c in layer.control] == [(1, 4, 5, 2), (2, 5, 4, 3), (3, 4, 4, 1)]
    assert layer.grid == ((4, 5), (5, 4), (4, 4))
    same = SplineTTLinear((8, 6), (4, 5), 2, (4, 5))
    assert same.grid == ((4, 5), (4, 5)) and "grid=(4, 5)" in repr(same)
    assert layer.num_parameters() == 40 + 120 + 48 + 120


def test_init_matches_nn_linear_scale():
    layer = SplineTTLinear((16, 16), (8, 32), 4, (6, 6))
    mean_sq = layer.materialize().double().pow(2).mean().item()
    assert mean_sq == pytest.approx(1 / (3 * 256), rel=1e-5)


@pytest.mark.parametrize(
    "grid, error, match",
    [
        ((3, 8), ValueError, "at least 4"),
        ((8,), ValueError, "pair"),
        ([(4, 4)], ValueError, "one \\(G_out, G_in\\) pair per core"),
        ([(4, 4), (4, 4), (4, 4)], ValueError, "one \\(G_out, G_in\\) pair per core \\(2\\)"),
        ([(4, 4), (4, 2)], ValueError, "grid\\[1\\]\\[1\\] must be >= 4 \\(a cubic B-spline needs at least 4"),
        (4, TypeError, "pair"),
        (None, TypeError, "pair"),
        ("45", TypeError, "pair"),
        ({4: 5, 5: 4}, TypeError, "pair"),
        ((4.0, 5), TypeError, "grid\\[0\\] must be an int, got 4.0"),
        ((4.7, 5.9), TypeError, "grid\\[0\\] must be an int, got 4.7"),  # was truncated silently elsewhere
        (("4", "5"), TypeError, "grid\\[0\\] must be an int, got '4'"),
        ((True, 5), TypeError, "grid\\[0\\] must be an int, got True"),
        ([(4, 4), (4, 4.5)], TypeError, "grid\\[1\\]\\[1\\] must be an int"),
    ],
)
def test_bad_grid(grid, error, match):
    with pytest.raises(error, match=match):
        SplineTTLinear((8, 6), (4, 5), 2, grid)


def test_grid_takes_int_likes():
    assert SplineTTLinear((8, 6), (4, 5), 2, np.array([4, 5])).grid == ((4, 5), (4, 5))
    layer = SplineTTLinear((8, 6), (4, 5), 2, np.array([[4, 5], [5, 4]]))
    assert layer.grid == ((4, 5), (5, 4)) and all(type(g) is int for pair in layer.grid for g in pair)


def test_modes_travel_in_the_state_dict(tmp_path):
    """The control shapes do not show the modes: a state dict saved with other modes (same grid,
    ranks and features) is refused, by load_state_dict and by safetensors."""
    from safetensors.torch import load_model, save_model

    saved = SplineTTLinear((8, 6), (4, 5), 2, (4, 4))
    other = SplineTTLinear((6, 8), (5, 4), 2, (4, 4))
    assert [p.shape for p in saved.parameters()] == [p.shape for p in other.parameters()]
    with pytest.raises(ValueError, match="in_modes\\[0\\]=8 in the state dict but 6 in this layer"):
        other.load_state_dict(saved.state_dict())
    with pytest.raises(RuntimeError, match="size mismatch for control.0"):  # the grid is in the shapes
        SplineTTLinear((8, 6), (4, 5), 2, (5, 4)).load_state_dict(saved.state_dict())
    path = str(tmp_path / "layer.safetensors")
    save_model(saved, path)
    with pytest.raises(ValueError, match="out_modes\\[0\\]=4 in the state dict but 5 in this layer"):
        load_model(other, path)
    same = SplineTTLinear((8, 6), (4, 5), 2, (4, 4), strategy="contract")  # the strategy is not the function
    load_model(same, path)
    x = torch.randn(3, 48)
    assert torch.equal(same(x), saved(x))


def test_meta_device_then_to_empty():
    source = SplineTTLinear((8, 6, 3), (4, 5, 2), (1, 2, 3, 1), [(4, 5), (5, 4), (4, 4)])
    layer = SplineTTLinear((8, 6, 3), (4, 5, 2), (1, 2, 3, 1), [(4, 5), (5, 4), (4, 4)], device="meta")
    assert all(p.is_meta for p in layer.parameters()) and "grid=" in repr(layer)
    layer.to_empty(device="cpu")
    layer.load_state_dict(source.state_dict())
    x = torch.randn(4, 144)
    assert torch.equal(layer(x), source(x))
    layer.reset_parameters()
    assert layer.materialize().double().pow(2).mean().item() == pytest.approx(1 / (3 * 144), rel=1e-5)
    assert layer.bias.abs().max() <= 1 / 12 and torch.isfinite(layer(x)).all()


def test_bad_structure_and_strategy():
    with pytest.raises(ValueError, match="boundary ranks"):
        SplineTTLinear((8, 6), (4, 5), (2, 2, 1), (4, 4))
    with pytest.raises(ValueError, match="2 to 6 cores"):
        SplineTTLinear((48,), (20,), (1, 1), (4, 4))
    with pytest.raises(ValueError, match="unknown TT strategy"):
        SplineTTLinear((8, 6), (4, 5), 2, (4, 4), strategy="dense")


def test_from_ttlinear_recovers_spline_cores_exactly():
    """A TT whose cores are spline surfaces (mode sizes >= grid) is fitted exactly."""
    source = SplineTTLinear((9, 7, 6), (8, 5, 6), (1, 2, 3, 1), [(5, 4), (4, 5), (6, 4)], dtype=torch.float64)
    tt = TTLinear(source.in_modes, source.out_modes, source.ranks, dtype=torch.float64)
    with torch.no_grad():
        for core, c in zip(tt.cores, source.cores()):
            core.copy_(c)
        tt.bias.copy_(source.bias)
    fitted = SplineTTLinear.from_ttlinear(tt, source.grid)
    assert fitted.fit_report.relative_error < 1e-12
    for got, want in zip(fitted.control, source.control):
        assert_close(got, want)
    assert torch.equal(fitted.bias, tt.bias) and fitted.grid == source.grid


def test_from_ttlinear_is_the_least_squares_fit():
    """For a generic TT the residual of every core is orthogonal to the spline span (normal
    equations), and the reported error is the measured one."""
    tt = TTLinear((9, 7), (8, 6), 3, dtype=torch.float64)
    fitted = SplineTTLinear.from_ttlinear(tt, (4, 5))
    for core, spline_core, (go, gi), o, i in zip(tt.cores, fitted.cores(), fitted.grid, tt.out_modes, tt.in_modes):
        bo = basis_matrix(o, go, BSPLINE, torch.float64)
        bi = basis_matrix(i, gi, BSPLINE, torch.float64)
        normal = torch.einsum("op,aoib,iq->apqb", bo, (core - spline_core).detach(), bi)
        assert normal.abs().max() < 1e-10 * core.abs().max()
    w, w_hat = tt.materialize(), fitted.materialize()
    assert fitted.fit_report.relative_error == pytest.approx(((w_hat - w).norm() / w.norm()).item(), rel=1e-9)
    assert 0 < fitted.fit_report.relative_error < 1
    assert len(fitted.fit_report.details["core_errors"]) == 2


def test_from_ttlinear_rejects_other_modules_and_meta():
    with pytest.raises(TypeError, match="TTLinear"):
        SplineTTLinear.from_ttlinear(nn.Linear(4, 4), (4, 4))
    with pytest.raises(ValueError, match="meta device"):
        SplineTTLinear.from_ttlinear(TTLinear((9, 7), (8, 6), 3, device="meta"), (4, 4))


def test_autocast_and_state_dict():
    a = SplineTTLinear((8, 6), (4, 5), 2, (4, 4))
    b = SplineTTLinear((8, 6), (4, 5), 2, (4, 4))
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 48)
    assert torch.equal(a(x), b(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = a(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(c.grad.dtype == torch.float32 for c in a.control)


def test_spline_reference_gradients_match_autograd_through_cores():
    layer = SplineTTLinear((6, 5), (4, 7), 2, (4, 4), dtype=torch.float64)
    x = torch.randn(3, 30, dtype=torch.float64)
    dy = torch.randn(3, 28, dtype=torch.float64)
    controls = [c.detach().requires_grad_() for c in layer.control]
    cores = sref.spline_cores(controls, layer.in_modes, layer.out_modes)
    expected = torch.autograd.grad(x @ ref.tt_weight(cores).T, controls, dy)
    got = sref.spline_tt_grad(dy, x, controls, list(layer.in_modes), list(layer.out_modes), False)
    for a, b in zip(got, expected):
        assert_close(a, b)


@pytest.mark.compile
def test_torch_compile_fullgraph():
    model = nn.Sequential(SplineTTLinear((6, 4), (4, 5), 2, (4, 4)), nn.GELU(), nn.Linear(20, 3))
    assert_compiles_like_eager(model, torch.randn(5, 24, requires_grad=True))
