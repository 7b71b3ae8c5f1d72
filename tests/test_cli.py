"""The ``tspline`` command end to end, on small budgets: demo, bench (one family), plot."""

import json

import pytest

from tspline_kernels import cli, demo
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


@pytest.mark.parametrize("epochs", ["0", "-3", "two"])
def test_demo_refuses_epochs_below_one(epochs, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo", "--epochs", epochs])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "argument --epochs:" in err and ">= 1" in err


@pytest.mark.parametrize("epochs, error", [(0, ValueError), (-3, ValueError), (1.5, TypeError)])
def test_demo_main_refuses_epochs_below_one(epochs, error, capsys):
    with pytest.raises(error, match="epochs must"):
        demo.main(epochs=epochs)
    assert capsys.readouterr().out == ""  # nothing trained, no table


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


def test_bench_warm_runs_its_shard_of_the_cases_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    lines = []
    for shard in ("0/2", "1/2"):
        cli.main(["bench", "--goal", "--tiny", "--only", "lowrank", "--warm", shard])
        lines.append([line for line in capsys.readouterr().out.splitlines() if line.startswith("warm ")])
    assert [len(part) for part in lines] == [2, 2]  # the four low-rank goal rows, split between the shards
    assert not set(lines[0]) & set(lines[1]) and not list(tmp_path.iterdir())


@pytest.mark.parametrize("bad, message", [(["--warm", "2/2"], "0 <= K < N"), (["--warm", "a/b"], "K/N"),
                                          (["--warm", "0/2", "--out", "x.json"], "writes nothing")])
def test_bench_warm_rejects_bad_arguments(bad, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--goal", *bad])
    assert message in capsys.readouterr().err
