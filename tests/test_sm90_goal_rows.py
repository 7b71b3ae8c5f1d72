"""The issue's static checks at the benchmarks' goal rows, as the GPU image's Triton (3.6) builds them.

``sm90_dryrun.py --bench --report`` compiles, for sm_90, every config the goal rows' autotuners try
in the GPU check; a file of its own (not ``test_sm90_compile.py``) so that pytest-xdist's
``--dist loadfile`` runs the two long dry runs on different workers.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

SCRIPT = Path(__file__).with_name("sm90_dryrun.py")

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="a real GPU runs the kernels themselves"),
    pytest.mark.skipif(not triton.__version__.startswith("3.6."),
                       reason="checks what the GPU image's Triton (3.6) builds for the goal rows: CI's Triton 3.6 stage runs it"),
]


def test_goal_rows_compile_without_spills_on_tensor_cores_with_wide_loads_of_x(tmp_path):
    """The issue's static checks at the benchmarks' goal shapes, for every config their autotuner
    tries in the GPU check (``TSPLINE_AUTOTUNE=quick``): no spills, every bf16 ``tl.dot`` on tensor
    cores (HMMA/HGMMA in the SASS), and x streamed with 128-bit loads (``X_STREAMING``)."""
    report = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--bench", "--report", str(report)], capture_output=True,
                          text=True, timeout=1200, env={**os.environ, "TSPLINE_AUTOTUNE": "quick"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["mode"] == "bench" and data["autotune"] == "quick" and data["failures"] == 0
    assert not data["findings"], "\n".join(data["findings"])
    records = data["kernels"]
    kernels = {r["kernel"] for r in records}
    # the kernels the goal rows launch (at M >= 4096 TT 16^3's rebuild and the fields run in slices + cuBLAS,
    # TT 8^4 the Kronecker-sum kernels)
    assert {"_separable_in_kernel", "_separable_out_kernel", "_lowrank_fwd_kernel", "_lowrank_grad_kernel",
            "_kron_fwd_kernel", "_kron_grad_kernel", "_chain_kernel", "_chain_grad_kernel", "_rebuild_slice_kernel",
            "_field_slice_kernel", "_kronsum_kernel", "_kronsum_grad_kernel"} <= kernels
    for r in records:
        assert r["local_bytes"] == 0, r
        loads = r["global_loads"]
        if r["kernel"] in ("_lowrank_fwd_kernel", "_kron_fwd_kernel", "_separable_in_kernel", "_chain_kernel",
                           "_kronsum_kernel", "_kronsum_grad_kernel"):
            assert loads["128"] + loads["tma"] > 0, r
