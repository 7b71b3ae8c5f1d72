"""Compressed models save and load through safetensors (and state_dict) with identical outputs."""

import pytest
import torch
from safetensors.torch import load_model, save_model

import tspline_kernels as tk

LAYERS = {
    "bspline": lambda: tk.SplineLinear(23, 17, grid=(5, 6)),
    "eisenstein-local": lambda: tk.SplineLinear(23, 17, basis="eisenstein", n_control_points=12, support="local"),
    "gaussian": lambda: tk.SplineLinear(23, 17, basis="gaussian", n_control_points=9),
    "hierarchical": lambda: tk.HierarchicalSplineLinear(23, 17),
    "lowrank": lambda: tk.LowRankLinear(23, 17, 4),
    "tt": lambda: tk.TTLinear((2, 3, 4), (3, 2, 3), 3),
    "spline_tt": lambda: tk.SplineTTLinear((4, 6), (6, 3), 2, (4, 4)),
    "kronecker-gated": lambda: tk.KroneckerLinear((4, 6), (6, 3), gated=True),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_safetensors_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(LAYERS[name](), torch.nn.GELU())
    path = tmp_path / "model.safetensors"
    save_model(model, str(path))
    torch.manual_seed(1)
    fresh = torch.nn.Sequential(LAYERS[name](), torch.nn.GELU())
    x = torch.randn(3, model[0].in_features)
    assert not torch.equal(fresh(x), model(x))
    missing, unexpected = load_model(fresh, str(path))
    assert not missing and not unexpected
    assert torch.equal(fresh(x), model(x))
