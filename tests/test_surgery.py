"""replace_linear: in-place swaps with include/exclude/min_features and a report."""

import pytest
import torch
from torch import nn

import tspline_kernels as tk


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(32, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 4)


def spline(linear):
    return tk.SplineLinear(linear.in_features, linear.out_features, grid=(8, 8), bias=linear.bias is not None)


def test_replace_all_and_report():
    model = Block()
    report = tk.replace_linear(model, spline)
    assert [r.name for r in report] == ["attn", "mlp.0", "mlp.2", "head"]
    assert report[0].old_params == 32 * 32 + 32 and report[0].new_params == 64 + 32
    assert all(isinstance(m, tk.SplineLinear) for m in (model.attn, model.mlp[0], model.mlp[2], model.head))
    x = torch.randn(3, 32)
    assert model.head(model.mlp(model.attn(x))).shape == (3, 4)


def test_include_exclude_min_features():
    model = Block()
    report = tk.replace_linear(model, spline, include=r"^mlp\.", exclude=r"\.2$")
    assert [r.name for r in report] == ["mlp.0"]
    model = Block()
    report = tk.replace_linear(model, spline, min_features=32)
    assert [r.name for r in report] == ["attn", "mlp.0", "mlp.2"]
    assert isinstance(model.head, nn.Linear)


def test_keeps_device_and_dtype_and_rejects_bad_factory():
    model = Block().double()
    tk.replace_linear(model, spline)
    assert model.attn.control.dtype == torch.float64
    with pytest.raises(TypeError, match="nn.Module"):
        tk.replace_linear(Block(), lambda lin: None)


def test_training_script_switch():
    """The intended use: build a dense model, swap its layers, train with an optimizer."""
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    tk.replace_linear(model, spline)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(64, 16)
    y = x[:, :1] * 0.5
    loss0 = nn.functional.mse_loss(model(x), y).item()
    for _ in range(50):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < loss0
