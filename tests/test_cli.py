"""The ``tspline`` command end to end, on small budgets: demo, bench (one family), plot."""

import json

import pytest

from tspline_kernels import cli
from tspline_kernels.demo import MODELS


def test_demo_trains_every_model_on_both_tasks(capsys):
    cli.main(["demo", "--epochs", "1"])
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith(("digits", "smooth")) and "best is" not in line]
    assert len(table) == 2 * len(MODELS)
    for line in table:
        *_, params, ratio, metric, seconds = line.split()
        assert int(params) > 0 and float(ratio[:-1]) >= 1.0
        assert float(metric) == float(metric) and float(seconds) >= 0  # not NaN
    assert "best is" in out


def test_bench_writes_json_then_plot_draws_it(tmp_path, capsys):
    path = tmp_path / "bench.json"
    cli.main(["bench", "--quick", "--only", "lowrank", "--out", str(path)])
    data = json.loads(path.read_text())
    assert data["meta"]["torch"] and data["meta"]["families"] == ["lowrank"]
    assert data["rows"] and all(r["ms"] > 0 and r["kernel"].startswith("lowrank") for r in data["rows"])
    assert "targets (benchmarks, not tests)" in capsys.readouterr().out
    png = tmp_path / "bench.png"
    cli.main(["plot", str(path), "--out", str(png)])
    assert png.stat().st_size > 0


def test_bench_rejects_unknown_family():
    with pytest.raises(SystemExit, match="unknown benchmark families"):
        cli.main(["bench", "--only", "nope"])
