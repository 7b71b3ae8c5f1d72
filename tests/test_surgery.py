"""replace_linear: in-place swaps with include/exclude/min_features and a report."""

import pytest
import torch
from torch import nn

import tspline_kernels as tk
from tspline_kernels.surgery import select_linear


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


def test_a_bare_linear_is_refused():
    """A model that is itself the Linear cannot be replaced in place: a clear error, no partial swap."""
    linear = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="wrap it"):
        tk.replace_linear(linear, lambda m: tk.LowRankLinear(8, 8, 2))
    with pytest.raises(ValueError, match="wrap it"):
        tk.compress_(linear, tk.LowRank(rank=2), progress=False)
    assert list(linear.state_dict()) == ["weight", "bias"]


def test_a_shared_linear_is_replaced_everywhere_and_stays_shared():
    """A Linear used at two places (shared weights) is replaced at both by one compressed layer:
    the model shrinks, its two uses keep sharing, and the report counts the layer once."""
    torch.manual_seed(0)
    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    before = sum(p.numel() for p in model.parameters())
    report = tk.replace_linear(model, lambda m: tk.LowRankLinear(16, 16, 2))
    assert [r.name for r in report] == ["0"] and model[0] is model[2]
    assert isinstance(model[0], tk.LowRankLinear)
    assert sum(p.numel() for p in model.parameters()) == report[0].new_params < before
    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    rows = tk.compress_(model, tk.LowRank(rank=2), progress=False).layers
    assert len(rows) == 1 and model[0] is model[2] and isinstance(model[2], tk.LowRankLinear)


def test_a_shared_linear_is_selected_by_any_of_its_paths():
    """A module at two paths is replaced at both: excluding either path keeps it, including either
    selects it (it had been judged by its first path alone, so exclude='^dec' replaced dec.0)."""
    def make():
        model = nn.Module()
        model.enc, model.dec, model.other = nn.Sequential(nn.Linear(8, 8)), nn.Sequential(), nn.Linear(8, 8)
        model.dec.append(model.enc[0])
        return model

    model = make()
    assert [n for n, _ in select_linear(model, exclude=r"^dec\.")] == ["other"]
    assert [n for n, _ in select_linear(model, include=r"^dec\.")] == ["enc.0"]
    tk.replace_linear(model, lambda m: tk.LowRankLinear(8, 8, 2), exclude=r"^dec\.")
    assert type(model.dec[0]) is nn.Linear and model.dec[0] is model.enc[0]
