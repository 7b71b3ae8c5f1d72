"""compress_ with Decoupled: whole MLP blocks replaced by DecoupledSplineMLP, found or named."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tspline_kernels as tk
from tspline_kernels.testing import assert_close

M, H, N = 6, 24, 5


def _batches(seed: int, count: int = 2, rows: int = 40) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, M, generator=g) for _ in range(count)]


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(M, H), nn.GELU(), nn.Linear(H, N))


class _Named(nn.Module):
    """An MLP block no rule finds: it must be named with ``Decoupled(blocks=)``."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.squash, self.down = nn.Linear(M, H), nn.Tanh(), nn.Linear(H, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.squash(self.up(x)))


def test_sequential_block_report_and_budget():
    model, batches = _mlp(), _batches(1)
    original = _mlp()
    config = tk.Decoupled(ratio=2.0, iters=2, tokens=1000)
    report = tk.compress_(model, config, calibration=batches, progress=False)
    new = model[0]
    assert isinstance(new, tk.DecoupledSplineMLP)
    assert isinstance(model[1], nn.Identity) and isinstance(model[2], nn.Identity)
    (row,) = report.layers
    before = M * H + H + H * N + N
    assert (row.name, row.format, row.shape, row.params_before) == ("0", "decoupled", (N, M), before)
    assert row.params_after == new.num_parameters() == new.rank * (M + N + 12) + N
    assert row.params_after <= before / 2 < row.params_after + M + N + 12  # the largest rank within 1/ratio
    assert report.ratio == before / row.params_after
    assert (row.weight_error, row.output_error) == (new.fit_report.relative_error, new.fit_report.output_error)
    # the value error recomputed on the fit's held-out rows: all 80 calibration rows (the collection's
    # seeded permutation), of which from_mlp holds out a seeded 10 %
    x = torch.cat(batches)[torch.randperm(80, generator=torch.Generator().manual_seed(0))]
    held = x[torch.randperm(80, generator=torch.Generator().manual_seed(0))[:8]].double()
    with torch.no_grad():
        want, got = original.double()(held), new.double()(held)
    assert row.output_error == pytest.approx(((got - want).norm() / want.norm()).item(), rel=1e-6)
    assert row.output_error < 0.5
    fresh = torch.randn(3, 7, M, dtype=torch.float64)  # any leading dims, through the model's own forward
    with torch.no_grad():
        got, want = model.double()(fresh), original(fresh)
    assert got.shape == (3, 7, N) and (got - want).norm() / want.norm() < 0.5


def test_named_block_by_attribute_and_by_module():
    for activation in ("squash", None):
        torch.manual_seed(0)
        model = _Named()
        act = "squash" if activation else model.squash
        report = tk.compress_(model, tk.Decoupled(ratio=3, blocks=[("up", "down", act)], iters=1, tokens=50),
                              calibration=_batches(2), progress=False)
        assert isinstance(model.up, tk.DecoupledSplineMLP) and isinstance(model.squash, nn.Identity)
        assert isinstance(model.down, nn.Identity)
        assert report.layers[0].name == "up" and report.layers[0].params_after <= (M * H + H + H * N + N) / 3
        assert model(torch.randn(4, M)).shape == (4, N)


def _bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    return transformers.BertModel(config).eval()


def test_bert_blocks_keep_residual_and_layernorm():
    model = _bert()
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(0, 30, (3, 9), generator=g)} for _ in range(2)]
    layers = model.encoder.layer
    norms = [(layer.output.LayerNorm, {k: v.clone() for k, v in layer.output.LayerNorm.state_dict().items()})
             for layer in layers]
    attention = {k: v.clone() for k, v in layers[0].attention.state_dict().items()}
    report = tk.compress_(model, tk.Decoupled(ratio=2, iters=1, tokens=40), calibration=batches,
                          include=r"intermediate\.dense$", progress=False)
    assert [r.name for r in report.layers] == [f"encoder.layer.{k}.intermediate.dense" for k in range(2)]
    assert all(r.format == "decoupled" and r.params_before == 2 * 8 * 32 + 32 + 8 for r in report.layers)
    for layer, (norm, state) in zip(layers, norms):
        assert isinstance(layer.intermediate.dense, tk.DecoupledSplineMLP)
        assert isinstance(layer.intermediate.intermediate_act_fn, nn.Identity)
        assert isinstance(layer.output.dense, nn.Identity)
        assert layer.output.LayerNorm is norm
        for k, v in norm.state_dict().items():
            assert torch.equal(v, state[k])
    for k, v in layers[0].attention.state_dict().items():
        assert torch.equal(v, attention[k])
    h = torch.randn(2, 5, 8)
    layer = layers[1]
    with torch.no_grad():
        got = layer.output(layer.intermediate(h), h)
        want = layer.output.LayerNorm(layer.intermediate.dense(h) + h)  # residual, then LayerNorm
    assert_close(got, want, torch.float32)
    out = model(**batches[0]).last_hidden_state
    assert out.shape == (3, 9, 8) and torch.isfinite(out).all()


def test_bert_untargetable_linear_raises():
    with pytest.raises(ValueError, match="no MLP block .* starts at encoder.layer.0.attention.self.query"):
        tk.compress_(_bert(), tk.Decoupled(ratio=2, iters=1), calibration=[torch.randint(0, 30, (2, 5))],
                     progress=False)


def test_bad_inputs_raise():
    batches = _batches(4, 1)
    with pytest.raises(ValueError, match="pass calibration="):
        tk.compress_(_mlp(), tk.Decoupled(ratio=2), progress=False)
    model = _mlp()
    with pytest.raises(TypeError, match="Grams only"):
        tk.compress_(model, tk.Decoupled(ratio=2), calibration=tk.calibrate(model, batches, progress=False),
                     progress=False)
    with pytest.raises(ValueError, match="ratio=100 is unreachable for block '0'"):
        tk.compress_(model, tk.Decoupled(ratio=100), calibration=batches, progress=False)
    assert type(model[0]) is nn.Linear  # nothing was replaced
    with pytest.raises(ValueError, match="not a submodule"):
        tk.compress_(_Named(), tk.Decoupled(ratio=2, blocks=[("up", "down", nn.Tanh())]), calibration=batches,
                     progress=False)
    with pytest.raises(ValueError, match="'squash', is a Tanh, not an nn.Linear"):
        tk.compress_(_Named(), tk.Decoupled(ratio=2, blocks=[("up", "squash", "down")]), calibration=batches,
                     progress=False)
    with pytest.raises(ValueError, match="no MLP block"):
        tk.compress_(_Named(), tk.Decoupled(ratio=2), calibration=batches, progress=False)
    with pytest.raises(ValueError, match="no attribute 'upp'"):
        tk.compress_(_Named(), tk.Decoupled(ratio=2, blocks=[("upp", "down", "squash")]), calibration=batches,
                     progress=False)
    with pytest.raises(ValueError, match="none of the blocks' first Linears"):
        tk.compress_(_Named(), tk.Decoupled(ratio=2, blocks=[("up", "down", "squash")]), calibration=batches,
                     exclude="up", progress=False)
    with pytest.raises(TypeError, match="each of blocks"):
        tk.Decoupled(ratio=2, blocks=[("up", "down", torch.tanh)])
    with pytest.raises(ValueError, match="ratio"):
        tk.Decoupled(ratio=1)
    with pytest.raises(ValueError, match="iters"):
        tk.Decoupled(ratio=2, iters=-1)
    with pytest.raises(ValueError, match="value_weight"):
        tk.Decoupled(ratio=2, value_weight=-1.0)
