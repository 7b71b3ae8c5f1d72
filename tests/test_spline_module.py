"""SplineLinear's nn.Linear contract, input validation and parameter handling."""

import numpy as np
import pytest
import torch
from torch import nn

import tspline_kernels as tk
from tspline_kernels.testing import assert_close, assert_learns

ALL = [
    dict(basis="bspline", grid=(5, 6)),
    dict(basis="bicubic", n_control_points=9),
    dict(basis="gaussian", n_control_points=9),
    dict(basis="eisenstein", n_control_points=9),
    dict(basis="eisenstein", n_control_points=30, support="local"),
]
IDS = ["bspline", "bicubic", "gaussian", "eisenstein", "eisenstein-local"]


@pytest.mark.parametrize("kw", ALL, ids=IDS)
def test_forward_is_linear_in_materialized_weight(kw):
    layer = tk.SplineLinear(19, 13, **kw)
    x = torch.randn(2, 3, 19)
    assert layer(x).shape == (2, 3, 13)
    assert_close(layer(x), nn.functional.linear(x, layer.materialize(), layer.bias))
    assert layer.materialize().shape == (13, 19)


@pytest.mark.parametrize("kw", ALL, ids=IDS)
def test_init_matches_nn_linear_scale(kw):
    layer = tk.SplineLinear(256, 128, **kw)
    mean_sq = layer.materialize().pow(2).mean().item()
    assert 0.5 / (3 * 256) < mean_sq < 2.0 / (3 * 256)


def test_parameters_extra_repr_and_counts():
    layer = tk.SplineLinear(64, 32, grid=(8, 16))
    assert [n for n, _ in layer.named_parameters()] == ["bias", "control"]
    assert layer.num_parameters() == 8 * 16 + 32
    assert layer.dense_parameters() == 64 * 32 + 32
    text = repr(layer)
    assert "grid=(8, 16)" in text and "params=160" in text
    g = tk.SplineLinear(64, 32, basis="gaussian", n_control_points=7, bias=False)
    assert {n for n, _ in g.named_parameters()} == {"control", "log_bandwidth"}
    assert "lattice" not in g.state_dict()  # derived from n, not saved


def test_default_grid_and_control_count():
    assert tk.SplineLinear(512, 64).grid == (8, 64)
    assert tk.SplineLinear(8, 8).grid == (4, 4)
    assert tk.SplineLinear(8, 8, basis="eisenstein").control.shape == (16,)


def test_device_and_dtype_kwargs():
    layer = tk.SplineLinear(10, 4, basis="gaussian", device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    assert layer(torch.randn(3, 10, dtype=torch.float64)).dtype == torch.float64


def test_cast_keeps_lattice_fp32():
    layer = tk.SplineLinear(10, 4, basis="eisenstein").to(torch.bfloat16)
    assert layer.control.dtype == torch.bfloat16 and layer.lattice.dtype == torch.float32
    assert torch.equal(layer.lattice, tk.reference.spline.eisenstein_lattice(16))


def test_state_dict_round_trip():
    a = tk.SplineLinear(12, 7, basis="gaussian")
    b = tk.SplineLinear(12, 7, basis="gaussian")
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 12)
    assert torch.equal(a(x), b(x))


def test_autocast_runs_in_autocast_dtype():
    layer = tk.SplineLinear(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(4, 16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.control.grad.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(basis="spline"), ValueError, "unknown basis"),
        (dict(grid=(3, 8)), ValueError, "at least 4"),
        (dict(grid=(8,)), ValueError, "pair"),
        (dict(basis="gaussian", n_control_points=0), ValueError, "n_control_points"),
        (dict(basis="bspline", n_control_points=8), ValueError, "not n_control_points"),
        (dict(basis="eisenstein", grid=(4, 4)), ValueError, "not grid"),
        (dict(basis="bspline", support="local"), ValueError, "gaussian and eisenstein"),
        (dict(basis="eisenstein", support="nearby"), ValueError, "'global' or 'local'"),
        (dict(basis="eisenstein", support="local", support_radius=0.01), ValueError, "no lattice point"),
        (dict(dtype=torch.int32), TypeError, "floating-point"),
        # floats and strings were truncated by int(); bools and NaN slipped through
        (dict(grid=(4.7, 5.9)), TypeError, r"grid\[0\].*must be an int"),
        (dict(grid=("4", "5")), TypeError, r"grid\[0\].*must be an int"),
        (dict(grid="45"), TypeError, "pair"),
        (dict(grid=(True, 5)), TypeError, "must be an int"),
        (dict(grid=(5, 6, 7)), ValueError, "pair"),
        (dict(grid=(4, -5)), ValueError, r"grid\[1\].*>= 4"),
        (dict(grid=(4, float("inf"))), TypeError, "must be an int"),
        (dict(basis="gaussian", n_control_points=True), TypeError, "n_control_points must be an int"),
        (dict(basis="gaussian", n_control_points=4.0), TypeError, "n_control_points must be an int"),
        (dict(basis="bicubic", n_control_points=-3), ValueError, "n_control_points must be >= 1"),
        (dict(basis="eisenstein", support="local", support_radius=float("nan")), ValueError, "finite"),
        (dict(basis="eisenstein", support="local", support_radius=float("inf")), ValueError, "finite"),
        (dict(basis="eisenstein", support="local", support_radius=-1.0), ValueError, "no lattice point"),
        (dict(basis="eisenstein", support="local", support_radius="0.5"), TypeError, "real number"),
        (dict(basis="eisenstein", support="local", support_radius=True), TypeError, "real number"),
        (dict(basis="gaussian", support_radius=0.5), ValueError, "support='local' only"),
        (dict(basis="gaussian", support="global", support_radius=0.5), ValueError, "support='local' only"),
        (dict(basis="BSPLINE"), ValueError, "unknown basis"),
        (dict(basis=None), ValueError, "unknown basis"),
        (dict(basis="eisenstein", support=None), ValueError, "'global' or 'local'"),
        (dict(bias="yes"), TypeError, "bias must be True or False"),
    ],
)
def test_bad_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        tk.SplineLinear(10, 6, **kwargs)


def test_integer_like_arguments_are_accepted():
    """numpy and 0-d tensor integers are exact, so they are taken as ints (floats are refused)."""
    layer = tk.SplineLinear(10, 6, grid=(np.int64(5), torch.tensor(6)))
    assert layer.grid == (5, 6) and all(type(g) is int for g in layer.grid)
    assert tk.SplineLinear(10, 6, basis="gaussian", n_control_points=np.int32(7)).control.shape == (7,)
    local = tk.SplineLinear(10, 6, basis="eisenstein", n_control_points=12, support="local", support_radius=np.float32(0.9))
    assert local.rho == pytest.approx(0.9)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(fine_grid=(4.7, 8)), TypeError, r"fine_grid\[0\].*must be an int"),
        (dict(coarse_grid=("4", "5")), TypeError, r"coarse_grid\[0\].*must be an int"),
        (dict(coarse_grid=(3, 4)), ValueError, r"coarse_grid\[0\].*>= 4"),
        (dict(fine_grid=8), TypeError, "fine_grid must be a pair"),
        (dict(fine_grid=(8, 8, 8)), ValueError, "fine_grid must be a pair"),
        (dict(bias=1), TypeError, "bias must be True or False"),
    ],
)
def test_bad_hierarchical_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        tk.HierarchicalSplineLinear(10, 6, **kwargs)


def test_bad_features():
    with pytest.raises(ValueError, match="in_features"):
        tk.SplineLinear(0, 6)


def test_bad_inputs():
    layer = tk.SplineLinear(10, 6)
    with pytest.raises(ValueError, match="in_features=10"):
        layer(torch.randn(3, 11))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(3, 10, dtype=torch.int64))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(3, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="meta"):
        layer(torch.randn(3, 10, device="meta"))


def test_trains_like_a_linear_layer():
    torch.manual_seed(0)
    target = tk.SplineLinear(20, 10, grid=(6, 6))
    model = tk.SplineLinear(20, 10, grid=(6, 6))
    assert_learns(model, target, torch.randn(256, 20), steps=200, lr=0.05)


META_LAYERS = {
    **{name: (lambda kw=kw: tk.SplineLinear(19, 13, **kw)) for name, kw in zip(IDS, ALL)},
    "gaussian-local": lambda: tk.SplineLinear(19, 13, basis="gaussian", n_control_points=12, support="local"),
    "hierarchical": lambda: tk.HierarchicalSplineLinear(19, 13, coarse_grid=(4, 5), fine_grid=(8, 9)),
}


@pytest.mark.parametrize("name", list(META_LAYERS))
def test_meta_device_then_to_empty_and_load(name):
    """Large-model loading: build on meta (no memory, no init maths), materialise with
    ``to_empty`` and load the real state: the same layer as the original."""
    original = META_LAYERS[name]()
    with torch.device("meta"):
        meta = META_LAYERS[name]()
        settings = meta.state_dict()["_extra_state"]  # real values, whatever the default device
    assert torch.equal(settings, original.state_dict()["_extra_state"])
    assert all(p.is_meta for p in meta.parameters())
    assert repr(meta) == repr(original)
    meta.to_empty(device="cpu")
    meta.load_state_dict(original.state_dict())
    x = torch.randn(4, 19)
    assert torch.equal(meta(x), original(x))
    assert torch.equal(meta.materialize(), original.materialize())


def test_meta_device_kwarg():
    layer = tk.SplineLinear(19, 13, basis="eisenstein", n_control_points=12, support="local", device="meta")
    assert layer.control.is_meta and layer.lattice.is_meta and layer.bias.is_meta


@pytest.mark.parametrize(
    "saved, loading, match",
    [
        (dict(basis="bicubic", n_control_points=9), dict(basis="eisenstein", n_control_points=9), "basis='bicubic'"),
        (dict(basis="eisenstein", n_control_points=12, support="local", support_radius=0.9),
         dict(basis="eisenstein", n_control_points=12, support="local", support_radius=1.1), "support_radius=0.9"),
        (dict(basis="eisenstein", n_control_points=12, support="local"),
         dict(basis="eisenstein", n_control_points=12), "support='local'"),
        (dict(basis="gaussian", n_control_points=12),
         dict(basis="gaussian", n_control_points=12, support="local"), "support='global'"),
    ],
    ids=["basis", "radius", "local-into-global", "global-into-local"],
)
def test_load_into_differently_configured_layer_raises(saved, loading, match):
    """Same parameter shapes, different function: loading used to succeed silently."""
    state = tk.SplineLinear(19, 13, **saved).state_dict()
    with pytest.raises(ValueError, match=match):
        tk.SplineLinear(19, 13, **loading).load_state_dict(state)


@pytest.mark.parametrize("make", [lambda n_in: tk.SplineLinear(n_in, 13, grid=(5, 6)),
                                  lambda n_in: tk.HierarchicalSplineLinear(n_in, 13, coarse_grid=(4, 4), fine_grid=(8, 8))],
                         ids=["bspline", "hierarchical"])
def test_load_with_other_in_features_raises(make):
    """The control grid's shape does not pin in_features; the saved settings do."""
    with pytest.raises(ValueError, match="in_features=19 in the state dict but 23"):
        make(23).load_state_dict(make(19).state_dict())


def test_settings_survive_casts_and_safetensors(tmp_path):
    from safetensors.torch import load_model, save_model

    layer = tk.SplineLinear(19, 13, basis="gaussian", n_control_points=12, support="local", support_radius=1.07)
    save_model(layer.half(), str(tmp_path / "a.safetensors"))  # a cast must not round the saved radius
    fresh = tk.SplineLinear(19, 13, basis="gaussian", n_control_points=12, support="local", support_radius=1.07).half()
    load_model(fresh, str(tmp_path / "a.safetensors"))
    assert torch.equal(fresh.control, layer.control)
    other = tk.SplineLinear(19, 13, basis="gaussian", n_control_points=12, support="local").half()
    with pytest.raises(ValueError, match="support_radius=1.07"):
        load_model(other, str(tmp_path / "a.safetensors"))


MATERIALIZE = {
    **{name: (lambda kw=kw: tk.SplineLinear(11, 7, dtype=torch.float64, **kw)) for name, kw in zip(IDS, ALL)},
    "gaussian-local": lambda: tk.SplineLinear(11, 7, basis="gaussian", n_control_points=12, support="local",
                                              dtype=torch.float64),
    "hierarchical": lambda: tk.HierarchicalSplineLinear(11, 7, dtype=torch.float64),
}


@pytest.mark.parametrize("name", list(MATERIALIZE))
def test_materialize_backprop_matches_forward(name):
    """d/dparams of sum(R * W) through ``materialize`` (local Gaussian: in-place taper after exp_
    broke autograd) equals the same through the forward op, since layer(I) = W.T + bias."""
    layer = MATERIALIZE[name]()
    params = [p for n, p in layer.named_parameters() if n != "bias"]
    r = torch.randn(7, 11, dtype=torch.float64)
    via_weight = torch.autograd.grad((layer.materialize() * r).sum(), params)
    via_forward = torch.autograd.grad(((layer(torch.eye(11, dtype=torch.float64)) - layer.bias) * r.T).sum(), params)
    for a, b in zip(via_weight, via_forward):
        assert_close(a, b)


@pytest.mark.parametrize("which", ["reference", "triton"])
@pytest.mark.parametrize("make", [lambda: tk.SplineLinear(19, 13, basis="bicubic", n_control_points=5),
                                  lambda: tk.HierarchicalSplineLinear(19, 13, coarse_grid=(4, 4), fine_grid=(5, 6))],
                         ids=["bicubic", "hierarchical"])
def test_training_forward_of_many_rows_gives_the_same_gradients(make, which, monkeypatch):
    """From ``KEEP_U_MIN_ROWS`` rows the forward keeps x @ Bi for the grids' gradients (lowered here):
    the same output and gradients as the forward that keeps nothing."""
    from tspline_kernels.spline import ops

    torch.manual_seed(0)
    layer = make()
    x = torch.randn(2, 3, 19, requires_grad=True)
    dy = torch.randn(2, 3, 13)
    results = []
    for rows in (7, 6):
        monkeypatch.setattr(ops, "KEEP_U_MIN_ROWS", rows)
        with tk.backend(which):
            y = layer(x)
            results.append((y, *torch.autograd.grad(y, [x, *layer.parameters()], dy)))
    for name, plain, kept in zip(["y", "dx", *(n for n, _ in layer.named_parameters())], *results):
        torch.testing.assert_close(kept, plain, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("make", [lambda: tk.SplineLinear(24, 16, grid=(5, 6)),
                                  lambda: tk.SplineLinear(24, 16, basis="bicubic", n_control_points=10),
                                  lambda: tk.HierarchicalSplineLinear(24, 16, coarse_grid=(4, 4), fine_grid=(6, 6))],
                         ids=["bspline", "bicubic", "hierarchical"])
@pytest.mark.parametrize("strict", [False, True])
def test_export_with_a_dynamic_batch(make, strict):
    """The kept-projection choice (``ops.keeps_u``, by row count) is not made under a trace: comparing
    the symbolic batch with its threshold had bounded the exported batch to 4095 rows
    (ConstraintViolation for an unbounded Dim)."""
    torch.manual_seed(0)
    layer = make()
    ep = torch.export.export(layer, (torch.randn(5, 24),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                             strict=strict)
    x = torch.randn(4100, 24)
    assert_close(ep.module()(x), layer(x))
