"""Every Triton kernel compiles for an H100/H200 (sm_90), checked on a machine without a GPU.

The interpreter runs code the GPU compiler rejects (shared-memory overflow, unsupported dot
shapes, type errors in the lowering), so this runs ``sm90_dryrun.py --quick --report`` in a fresh
process: the real launchers of every layer family, forward and backward, fp32 and bf16, compiled to
cubin, and the per-kernel report of registers, spills, shared memory and tensor-core instructions.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("sm90_dryrun.py")
PACKAGE = SCRIPT.parent.parent / "tspline_kernels"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a real GPU runs the kernels themselves")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    report = tmp_path_factory.mktemp("sm90") / "report.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--report", str(report)],
                          capture_output=True, text=True, timeout=1200)
    return done, report


def test_every_kernel_compiles_for_sm90(dry_run):
    done, _ = dry_run
    summary = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "compiled"))]
    assert done.returncode == 0, "\n".join(summary) or done.stderr[-3000:]
    assert summary and summary[-1].endswith("0 failures"), done.stdout[-3000:]


def _kernel_names() -> set[str]:
    """Every ``*_kernel`` Triton kernel defined in the package."""
    return {name for path in PACKAGE.glob("*/*.py") for name in re.findall(r"^def (_\w+_kernel)\(", path.read_text(), re.M)}


def test_report_has_every_kernels_resources(dry_run):
    done, path = dry_run
    assert path.exists(), done.stderr[-3000:]
    report = json.loads(path.read_text())
    assert report["target"] == "sm_90" and report["mode"] == "quick" and report["failures"] == 0
    records = report["kernels"]
    missing = _kernel_names() - {r["kernel"] for r in records}
    assert not missing, f"kernels the dry run never compiles (give sm90_dryrun.layers a case that launches them): {missing}"
    for r in records:
        assert 0 < r["registers"] <= 255, r
        assert r["local_bytes"] >= 0 and r["n_spills"] == r["local_bytes"] // 4, r
        assert 0 <= r["shared_bytes"] <= 232448, r
        assert r["num_warps"] in (1, 2, 4, 8, 16) and r["num_stages"] >= 1, r
        assert set(r["tensor_core_instructions"]) == {"HGMMA", "HMMA"}, r
        for d in r["dots"]:
            assert d["a"] in ("bf16", "f16", "f32") and d["out"] == "f32" and len(d["mnk"]) == 3, d
        assert isinstance(r["findings"], list) and all(isinstance(f, str) for f in r["findings"])
    assert report["findings"] == [f"{r['kernel']} [{r['case']}] warps={r['num_warps']}: {f}" for r in records for f in r["findings"]]
    # the IR and the SASS were both read: bf16 dots are on tensor cores, and their kernels hold
    # HMMA (mma.sync) and HGMMA (wgmma) instructions, both of which the quick run's tiles produce
    bf16 = [r for r in records if "bfloat16" in r["case"]]
    assert bf16 and all(d["tensor_cores"] for r in bf16 for d in r["dots"] if d["a"] == "bf16")
    for op in ("HMMA", "HGMMA"):
        assert any(r["tensor_core_instructions"][op] > 0 for r in bf16), op
    fp32_ieee = [d for r in records if "float32" in r["case"] for d in r["dots"] if d["precision"] == "ieee"]
    assert fp32_ieee and not any(d["tensor_cores"] for d in fp32_ieee)  # exact fp32 dots stay on FMAs
