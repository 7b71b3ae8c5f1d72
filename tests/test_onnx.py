"""tk.export_onnx: every family exported as its factored graph, run by onnxruntime.

One model mixing every family (each layer's output concatenated, so a mismatch names its layer)
is exported once with a 3-D example input; onnxruntime must match PyTorch (fp32 tolerances of
``assert_close``: relative 1e-4) at other sizes of both leading dims, and the file must hold
exactly the model's tensors under their module paths, plus scalars and shape vectors (no dense
weight, basis, Kronecker group or spline core). Per factored family, a single layer
large enough that the fixed-size graph (a few KB per layer) is small next to its data gives a file
within 1.2x of its compressed parameter bytes.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import tspline_kernels as tk
from tspline_kernels import export
from tspline_kernels.testing import assert_close

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

IN = 24


class Mixed(nn.Module):
    """Every layer applied to the same x ``(*, IN)``, outputs concatenated along the last dim."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer(x) for layer in self.layers.values()], dim=-1)


def every_family() -> dict[str, nn.Module]:
    return {
        "lowrank": tk.LowRankLinear(IN, IN, rank=4),
        "tt": tk.TTLinear((4, 6), (6, 4), (1, 3, 1), bias=False),
        "tt_3_modes": tk.TTLinear((2, 3, 4), (4, 1, 6), (1, 2, 3, 1)),
        "spline_tt": tk.SplineTTLinear((4, 6), (6, 4), (1, 3, 1), grid=(4, 4)),
        "kronecker": tk.KroneckerLinear((4, 6), (6, 4)),
        "kronecker_3_modes": tk.KroneckerLinear((2, 3, 4), (3, 4, 2), transform_outer=False),
        "kronecker_gated": tk.KroneckerLinear((2, 3, 4), (3, 4, 2), gated=True),
        "kronecker_gated_2_modes": tk.KroneckerLinear((4, 6), (6, 4), gated=True, transform_outer=False),
        "bspline": tk.SplineLinear(IN, IN, grid=(6, 6)),
        "bicubic": tk.SplineLinear(IN, IN, basis="bicubic", n_control_points=10),
        "gaussian": tk.SplineLinear(IN, IN, basis="gaussian", n_control_points=10),
        "eisenstein": tk.SplineLinear(IN, IN, basis="eisenstein", n_control_points=10),
        "gaussian_local": tk.SplineLinear(IN, IN, basis="gaussian", n_control_points=12, support="local"),
        "eisenstein_local": tk.SplineLinear(IN, IN, basis="eisenstein", n_control_points=12, support="local"),
        "hierarchical": tk.HierarchicalSplineLinear(IN, IN, coarse_grid=(4, 4), fine_grid=(6, 6)),
        "decoupled": tk.DecoupledSplineMLP(IN, IN, rank=5),
    }


def run_onnx(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    torch.manual_seed(0)
    model = Mixed(every_family()).eval()
    path = tmp_path_factory.mktemp("onnx") / "mixed.onnx"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, IN)
    with torch.no_grad():  # as the test compares it: with autograd on, torch's matmul may take another path
        y = model(x)
    tk.export_onnx(model, x, path)
    return model, path, before, x, y


@pytest.mark.parametrize("lead", [(1, 5), (6, 2)], ids=["1x5", "6x2"])
def test_every_family_matches_pytorch(mixed, lead):
    model, path, *_ = mixed
    x = torch.randn(*lead, IN)
    with torch.no_grad():
        expected = model(x)
    got = run_onnx(path, x)
    assert got.shape == expected.shape
    start = 0
    for name, layer in model.layers.items():
        n = layer.out_features
        assert_close(got[..., start:start + n], expected[..., start:start + n], name=name)
        start += n


def test_file_holds_the_compressed_tensors_only(mixed):
    model, path, *_ = mixed
    stored = {t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy()) for t in onnx.load(str(path)).graph.initializer}
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}  # buffers: lo, hi, lattice
    for name, value in state.items():  # equal tensors are stored once (the exporter deduplicates)
        assert name in stored or any(t.shape == value.shape and torch.equal(t, value) for t in stored.values()), \
            f"{name} is not stored"
        assert name not in stored or torch.equal(stored[name], value), f"{name} is stored with other values"
    others = {name: tuple(t.shape) for name, t in stored.items() if name not in state and t.numel() > 8}
    assert not others, f"tensors beyond the model's own state, scalars and shape vectors: {others}"
    graph = onnx.load(str(path)).graph
    assert not [n.op_type for n in graph.node if n.domain not in ("", "ai.onnx")], "non-standard ops"
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, True, False] and dims[2].dim_value == IN


def test_export_leaves_the_model_unchanged(mixed):
    model, _, before, x, y = mixed
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    with torch.no_grad():
        assert torch.equal(model(x), y)  # the spline basis cache holds no traced tensor


# Sizes so that the graph, a few KB per layer (the basis recipes of a spline: ~3 KB each), is small
# next to the data (file / parameters 1.04 to 1.12); the grids are not a realistic compression
# choice, the point is what the file holds.
FACTORED = {
    "lowrank": lambda: tk.LowRankLinear(256, 256, rank=16),
    "tt": lambda: tk.TTLinear((16, 16), (16, 16), (1, 16, 1)),
    "spline_tt": lambda: tk.SplineTTLinear((32, 32), (32, 32), (1, 40, 1), grid=(16, 16)),
    "kronecker": lambda: tk.KroneckerLinear((64, 64), (64, 64)),
    "bspline": lambda: tk.SplineLinear(256, 256, grid=(128, 128)),
    "hierarchical": lambda: tk.HierarchicalSplineLinear(256, 256, coarse_grid=(32, 32), fine_grid=(128, 128)),
}


@pytest.mark.parametrize("family", FACTORED)
def test_file_within_1_2x_of_compressed_bytes(family, tmp_path):
    layer = FACTORED[family]().eval()
    path = tmp_path / "layer.onnx"
    x = torch.randn(3, layer.in_features)
    tk.export_onnx(layer, x, path)
    data = sum(p.numel() * p.element_size() for p in layer.parameters())
    size = os.path.getsize(path)
    assert not os.path.exists(f"{path}.data")
    assert size <= 1.2 * data, f"{family}: file {size} B for {data} B of parameters"
    x = torch.randn(5, layer.in_features)
    with torch.no_grad():
        assert_close(run_onnx(path, x), layer(x), name=family)


# ---- arguments ----------------------------------------------------------------------------------
def test_bad_arguments(tmp_path):
    layer = tk.LowRankLinear(8, 6, rank=2)
    x = torch.randn(3, 8)
    path = tmp_path / "m.onnx"
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        tk.export_onnx(lambda t: t, x, path)
    with pytest.raises(TypeError, match="example_inputs"):
        tk.export_onnx(layer, {"x": x}, path)
    with pytest.raises(TypeError, match="example_inputs"):
        tk.export_onnx(layer, (), path)
    with pytest.raises(TypeError, match="path must be"):
        tk.export_onnx(layer, x, 3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tk.export_onnx(layer, x, tmp_path / "missing" / "m.onnx")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        tk.export_onnx(layer, x, tmp_path)
    with pytest.raises(ValueError, match=r"example_inputs\[0\] has shape \(1, 8\)"):
        tk.export_onnx(layer, torch.randn(1, 8), path)
    assert not os.listdir(tmp_path)


def test_dynamic_shapes_override(tmp_path):
    layer = tk.LowRankLinear(8, 6, rank=2).eval()
    path = tmp_path / "m.onnx"
    x = torch.randn(1, 8)  # a batch of 1 is fine once the batch is static
    tk.export_onnx(layer, x, path, dynamic_shapes=(None,))
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 8]
    with torch.no_grad():
        assert_close(run_onnx(path, x), layer(x))


def test_op_without_reference_named(tmp_path, monkeypatch):
    monkeypatch.delitem(export._REFERENCES, torch.ops.tspline.lowrank_linear.default)
    with pytest.raises(NotImplementedError, match="tspline.lowrank_linear"):
        tk.export_onnx(tk.LowRankLinear(8, 6, rank=2), torch.randn(3, 8), tmp_path / "m.onnx")
    assert not os.listdir(tmp_path)
