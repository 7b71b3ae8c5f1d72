"""Large batches on a GPU: M >= 4096 rows for every layer family, so that autotuning picks tiles
beyond the smallest (the other CUDA tests use a few rows), forward and backward against the
reference. Skipped without CUDA (``bench/gpu_check.sh`` runs them)."""

import pytest
import torch

import tspline_kernels as tk
from tspline_kernels.testing import assert_backends_agree

LAYERS = {
    "spline.bspline": lambda: tk.SplineLinear(384, 320, grid=(24, 40)),
    "spline.bicubic": lambda: tk.SplineLinear(384, 320, basis="bicubic", n_control_points=12),
    "spline.gaussian": lambda: tk.SplineLinear(384, 320, basis="gaussian", n_control_points=16),
    "spline.eisenstein": lambda: tk.SplineLinear(384, 320, basis="eisenstein", n_control_points=16),
    "spline.gaussian-local": lambda: tk.SplineLinear(384, 320, basis="gaussian", n_control_points=64, support="local"),
    "spline.hierarchical": lambda: tk.HierarchicalSplineLinear(384, 320),
    "lowrank": lambda: tk.LowRankLinear(384, 320, rank=24),
    "tt.contract": lambda: tk.TTLinear((8, 8, 6), (8, 8, 5), 8, strategy="contract"),
    "tt.rebuild": lambda: tk.TTLinear((8, 8, 6), (8, 8, 5), 8, strategy="rebuild"),
    # the goal row's 8^4 rank 8: the Kronecker-sum forward, core gradients and dx at this many rows
    "tt.kronsum": lambda: tk.TTLinear((8,) * 4, (8,) * 4, 8, strategy="contract"),
    "tt.steps": lambda: tk.TTLinear((4, 64, 4), (4, 64, 4), 16, strategy="contract"),
    "spline_tt.contract": lambda: tk.SplineTTLinear((8, 8, 6), (8, 8, 5), 4, (6, 6), strategy="contract"),
    "spline_tt.rebuild": lambda: tk.SplineTTLinear((8, 8, 6), (8, 8, 5), 4, (6, 6), strategy="rebuild"),
    "kronecker": lambda: tk.KroneckerLinear((24, 16), (20, 16)),
    "kronecker.gated": lambda: tk.KroneckerLinear((8, 6, 8), (8, 5, 8), gated=True),
}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", LAYERS)
def test_large_batch_forward_and_backward_match_the_reference(name, dtype):
    torch.manual_seed(0)
    layer = LAYERS[name]().to(device="cuda", dtype=dtype)
    rows = 4099  # past 4096, not a multiple of any row block: a ragged last block
    x = torch.randn(rows, layer.in_features, device="cuda", dtype=dtype)
    g = torch.randn(rows, layer.out_features, device="cuda", dtype=dtype)
    assert_backends_agree(layer, x, g, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["spline.bspline", "lowrank", "tt.contract", "kronecker"])
def test_large_batch_with_leading_dims(name):
    """(2, 2500, in): rows flattened across leading dims, 5000 in all."""
    layer = LAYERS[name]().to(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 2500, layer.in_features, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(2, 2500, layer.out_features, device="cuda", dtype=torch.bfloat16)
    assert_backends_agree(layer, x, g, torch.bfloat16)
