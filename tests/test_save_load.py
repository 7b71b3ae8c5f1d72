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
    "kronecker-reversed": lambda: tk.KroneckerLinear((4, 6), (6, 3), transform_outer=False),
    "kronecker-hard-first": lambda: tk.KroneckerLinear((4, 6), (6, 3), gated=True, gating_mode="hard",
                                                       gated_modes="first"),
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


# (saved layer, a layer built with other settings, the error): settings no parameter shape shows
# must not load into a layer that would compute another function with them.
MISMATCHED = {
    "kronecker-transform_outer": (lambda: tk.KroneckerLinear((4, 6), (6, 3)),
                                  lambda: tk.KroneckerLinear((4, 6), (6, 3), transform_outer=False),
                                  "transform_outer=True in the state dict but False in this layer"),
    "kronecker-gating_mode": (lambda: tk.KroneckerLinear((4, 6), (6, 3), gated=True),
                              lambda: tk.KroneckerLinear((4, 6), (6, 3), gated=True, gating_mode="hard"),
                              "gating_mode='soft' in the state dict but 'hard' in this layer"),
    "kronecker-gated_modes": (lambda: tk.KroneckerLinear((4, 6, 2), (6, 3, 2), gated=True, gated_modes=[0, 2]),
                              lambda: tk.KroneckerLinear((4, 6, 2), (6, 3, 2), gated=True, gated_modes="first"),
                              r"gated_modes=\(0, 2\) in the state dict but \(0,\) in this layer"),
    "kronecker-gated": (lambda: tk.KroneckerLinear((4, 6), (6, 3), gated=True),
                        lambda: tk.KroneckerLinear((4, 6), (6, 3)),
                        "gated=True in the state dict but False in this layer"),
    "lowrank-rank": (lambda: tk.LowRankLinear(23, 17, 4), lambda: tk.LowRankLinear(23, 17, 5),
                     "size mismatch for U"),
}


@pytest.mark.parametrize("name", list(MISMATCHED))
def test_differently_configured_layer_refuses_the_file(name, tmp_path):
    saved, other, match = MISMATCHED[name]
    path = tmp_path / "model.safetensors"
    save_model(saved(), str(path))
    with pytest.raises((ValueError, RuntimeError), match=match):
        load_model(other(), str(path))
    with pytest.raises((ValueError, RuntimeError), match=match):
        other().load_state_dict(saved().state_dict())
