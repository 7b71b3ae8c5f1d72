"""``bash bench/gpu_check.sh --dry``: the prepared GPU check end to end on CPU (interpreter, tiny
sizes), so that the first GPU call cannot fail on a typo; and a stage that fails or times out is
reported while the next one still runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine run the real check")


def _run(out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--dry"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env})


def test_dry_run_passes_every_stage_and_writes_its_results(tmp_path):
    done = _run(tmp_path)
    log = (tmp_path / "gpu_check.log").read_text()
    assert done.returncode == 0, log[-4000:]
    assert "all stages passed" in log and "FAILED" not in log
    for stage in ("cuda-tests", "kernel-tests", "every-config", "host-overhead", "bench"):
        assert f"=== [{stage}] exit 0" in log, stage
    every = json.loads((tmp_path / "every_config.json").read_text())
    assert every["checked"] >= 4 and every["failed"] == 0 and not every["notes"]
    assert "=== [bench-warm] done" in log and "0 of 2 failed" in log
    warmed = (tmp_path / "bench-warm.log").read_text().splitlines()
    for k in range(2):  # every goal row, once, split between the two processes
        assert sum(line.startswith(f"[warm {k}/2] warm ") for line in warmed) == 10, k
    assert not any("FAILED" in line for line in warmed)
    # the device tool brings back at most 8 files from $OUT
    assert len([p for p in tmp_path.rglob("*") if p.is_file()]) <= 8
    host = json.loads((tmp_path / "host-overhead.json").read_text())
    assert [r["layer"] for r in host["rows"] if r["stubbed"]] == ["lowrank r16"]
    assert all(r["fwd_us"] > 0 and r["fwd+bwd_us"] > 0 for r in host["rows"])
    (bench,) = tmp_path.glob("cpu-*-goal-tiny.json")
    data = json.loads(bench.read_text())
    meta = data["meta"]
    assert meta["goal"] and meta["tiny"] and meta["autotune"] == "quick" and not meta["errors"]
    assert meta["peaks"]["float32"] > 0 and meta["peaks"]["bytes_per_s"] > 0
    assert {"commit", "dirty", "torch", "triton"} <= set(meta)
    # rows: low rank 4, Kronecker 2, TT 8, spline 6; every GPU goal (and the keep_u check) unmeasured on
    # CPU, with its prediction
    assert len(data["rows"]) == 20 and len(data["targets"]) == 35 and not meta["not_run"]
    assert all(t["measured"] is None and t["met"] is None and t["predicted"] is not None for t in data["targets"])
    for row in data["rows"]:
        assert row["ms"] > 0 and row["baseline_ms"] > 0 and 0 < row["flops"] <= row["executed_flops"], row["kernel"]


def test_a_failed_stage_is_reported_and_the_next_one_still_runs(tmp_path):
    done = _run(tmp_path, STAGES="cuda-tests kernel-tests", T_CUDA_TESTS="1")
    log = (tmp_path / "gpu_check.log").read_text()
    assert done.returncode == 1, log[-4000:]
    assert "FAILED: cuda-tests: timed out after 1s" in log
    assert "=== [kernel-tests] exit 0" in log
    assert "=== [every-config] skipped" in log and "=== [bench] skipped" in log
    assert "[bench-warm]" not in log  # no bench, nothing to warm
