"""calibrate: streamed input Grams of the targeted Linears, for every kind of calibration input."""

import pytest
import torch
from torch import nn

import tspline_kernels as tk
from tspline_kernels.testing import assert_close


class TwoInputs(nn.Module):
    """y = head(relu(a(x)) + b(z)); ``z`` optional so tuple, dict and tensor batches all work."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(3, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x, z=None):
        h = torch.relu(self.a(x))
        if z is not None:
            h = h + self.b(z)
        return self.head(h)


def recorded_inputs(model: nn.Module, run) -> dict[str, torch.Tensor]:
    """Brute force: every input row each Linear saw, kept in full."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_hook(lambda m, args, out, name=name: seen.setdefault(name, []).append(
        args[0].detach().reshape(-1, m.in_features).double())) for name, m in model.named_modules()
        if isinstance(m, nn.Linear)]
    with torch.no_grad():
        run()
    for h in handles:
        h.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}


def check_grams(cal: tk.Calibration, inputs: dict[str, torch.Tensor]) -> None:
    assert list(cal) == list(inputs)
    for name, x in inputs.items():
        assert cal[name].tokens == x.shape[0]
        assert cal[name].gram.dtype == torch.float64
        assert_close(cal[name].gram, x.T @ x, name=name)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TwoInputs()


def test_tensor_batches_flatten_leading_dims(model):
    batches = [torch.randn(4, 3, 6), torch.randn(2, 6)]
    cal = tk.calibrate(model, batches, exclude="^b$", progress=False)
    inputs = recorded_inputs(model, lambda: [model(t) for t in batches])
    inputs.pop("b", None)
    check_grams(cal, inputs)
    assert cal["a"].tokens == 14


def test_tuple_dict_and_callable_calibrations(model):
    xs, zs = [torch.randn(5, 6) for _ in range(3)], [torch.randn(5, 3) for _ in range(3)]
    expected = recorded_inputs(model, lambda: [model(x, z) for x, z in zip(xs, zs)])
    check_grams(tk.calibrate(model, list(zip(xs, zs))), expected)
    check_grams(tk.calibrate(model, ({"x": x, "z": z} for x, z in zip(xs, zs))), expected)
    check_grams(tk.calibrate(model, lambda m: [m(x, z) for x, z in zip(xs, zs)]), expected)


def test_linear_called_with_keyword_input():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(input=x)

    model, x = Keyword(), torch.randn(7, 4)
    check_grams(tk.calibrate(model, [x]), {"lin": x.double()})


def test_selection_and_min_features(model):
    cal = tk.calibrate(model, [(torch.randn(3, 6), torch.randn(3, 3))], min_features=4)
    assert list(cal) == ["a"]
    cal = tk.calibrate(model, [(torch.randn(3, 6), torch.randn(3, 3))], include=r"^(a|head)$")
    assert list(cal) == ["a", "head"]
    assert "2 layers" in repr(cal)


def test_errors_name_the_problem(model):
    with pytest.raises(ValueError, match="no nn.Linear"):
        tk.calibrate(model, [torch.randn(2, 6)], include="nothing")
    with pytest.raises(ValueError, match="never reached 1 .*: b "):
        tk.calibrate(model, [torch.randn(2, 6)])
    with pytest.raises(TypeError, match="wrap a single batch"):
        tk.calibrate(model, torch.randn(2, 6))
    with pytest.raises(TypeError):
        tk.calibrate(model, [3.0])
    with pytest.raises(TypeError, match="include"):
        tk.calibrate(model, [torch.randn(2, 6)], include=3)
    with pytest.raises(ValueError, match="min_features"):
        tk.calibrate(model, [torch.randn(2, 6)], min_features=-1)
    mlp = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"layer '0' takes inputs of 8 features .* gave it shape \(4, 9\)"):
        tk.calibrate(mlp, [torch.randn(4, 9)])
    with pytest.raises(ValueError, match=r"layer '0' takes inputs of 8 features"):
        tk.compress_(mlp, tk.LowRank(rank=2), [torch.randn(4, 9)], progress=False)
    assert all(not m._forward_pre_hooks for m in mlp.modules())


def test_hooks_removed_and_no_grad_even_on_error(model):
    def failing(m):
        assert not torch.is_grad_enabled()
        m(torch.randn(2, 6))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        tk.calibrate(model, failing)
    assert all(not m._forward_pre_hooks for m in model.modules())
    tk.calibrate(model, [(torch.randn(2, 6), torch.randn(2, 3))])
    assert all(not m._forward_pre_hooks for m in model.modules())


class Padded(nn.Module):
    """A token model called like Hugging Face's: ``model(input_ids=, attention_mask=)``."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.lin = nn.Linear(6, 4)

    def forward(self, input_ids, attention_mask=None):
        return self.lin(self.emb(input_ids))


def test_padding_rows_are_left_out_whatever_the_batching():
    """Padded batches with a key-padding attention_mask give the Grams of the real tokens only,
    the same for one padded batch as for unpadded single sequences (padding had counted: 41-45% of
    the rows for MiniLM calibrated as in the README)."""
    torch.manual_seed(0)
    model = Padded()
    seqs = [torch.randint(1, 10, (n,)) for n in (3, 7, 5)]
    single = [{"input_ids": s[None], "attention_mask": torch.ones(1, len(s), dtype=torch.long)} for s in seqs]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    padded = [{"input_ids": ids, "attention_mask": mask}]
    a = tk.calibrate(model, single, progress=False)
    b = tk.calibrate(model, padded, progress=False)
    assert a["lin"].tokens == b["lin"].tokens == 15
    assert_close(a["lin"].gram, b["lin"].gram)
    assert tk.calibrate(model, padded, progress=False, mask_padding=False)["lin"].tokens == 21
