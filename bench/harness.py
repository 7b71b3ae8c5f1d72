"""Benchmark harness shared by every layer family: timing, memory, roofline and JSON rows.

A family module (``bench/<family>.py``) yields :class:`Case` objects and checks its stated targets
against the measured rows. CUDA timings use ``triton.testing.do_bench`` (median and 20/80 %
quantiles); CPU timings use ``torch.utils.benchmark`` (median of blocked runs). Every case is timed
against dense ``F.linear`` (cuBLAS on CUDA) on the same shapes in the same run.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import platform
import resource
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# Datasheet peaks (SXM parts, dense tensor-core FLOP/s; fp32 means TF32 tensor cores when allowed,
# else CUDA-core FP32) and HBM bandwidth in bytes/s.
PEAKS = {
    "H100": {"bfloat16": 989e12, "float16": 989e12, "tf32": 494e12, "float32": 67e12, "bw": 3.35e12},
    "H200": {"bfloat16": 989e12, "float16": 989e12, "tf32": 494e12, "float32": 67e12, "bw": 4.8e12},
}


@dataclass
class Case:
    """One benchmark: our layer call vs dense F.linear (and optional other baselines) on one shape.

    ``flops`` and ``bytes`` are the useful work and the minimal HBM traffic of our call, from the
    kernel docstrings; they give the roofline fraction on CUDA.
    """

    kernel: str
    mode: str  # "fwd" or "fwd+bwd"
    shape: dict
    dtype: torch.dtype
    run: Callable[[], object]
    dense: Callable[[], object]
    flops: float
    bytes: float
    others: dict[str, Callable[[], object]] = field(default_factory=dict)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def time_ms(fn: Callable[[], object], device: str) -> tuple[float, float, float]:
    """(median, 20 %, 80 %) wall time of ``fn`` in milliseconds."""
    if device == "cuda":
        import triton

        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    from torch.utils import benchmark

    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.5)
    return tuple(float(q) * 1e3 for q in np.percentile(m.times, [50, 20, 80]))


def cuda_peak_mb(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _rss_probe(builder: Callable[..., Callable[[], object]], args: tuple, warmup: tuple, queue) -> None:
    def rss_kb() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

    builder(*warmup)()  # load libraries and lazy state on a small instance first
    before = rss_kb()
    builder(*args)()
    queue.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)


def cpu_peak_mb(builder: Callable[..., Callable[[], object]], args: tuple, warmup: tuple) -> float:
    """Peak resident memory (MiB) that building and running ``builder(*args)()`` adds, measured in
    a fresh process after a warm-up call of ``builder(*warmup)()``."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_rss_probe, args=(builder, args, warmup, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def forward_backward(layer: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """A closure running ``layer(x)`` and a backward pass into every parameter and x."""
    def step():
        y = layer(x)
        y.backward(torch.ones_like(y))
    return step


def module_call(module: torch.nn.Module, x: torch.Tensor, mode: str) -> Callable[[], object]:
    """A closure running ``module(x)``: without autograd for "fwd", else forward and backward
    (x must then require grad)."""
    if mode != "fwd":
        return forward_backward(module, x)

    def run():
        with torch.no_grad():
            return module(x)
    return run


def dense_call(x: torch.Tensor, n_out: int, mode: str) -> Callable[[], object]:
    """The baseline: F.linear with a dense (n_out, n_in) weight in x's dtype (cuBLAS on CUDA)."""
    w = torch.randn(n_out, x.shape[-1], device=x.device, dtype=x.dtype, requires_grad=mode != "fwd")
    b = torch.zeros(n_out, device=x.device, dtype=x.dtype, requires_grad=mode != "fwd")
    if mode == "fwd":
        return lambda: F.linear(x, w, b)

    def step():
        y = F.linear(x, w, b)
        y.backward(torch.ones_like(y))
    return step


def layer_case(kernel: str, layer: torch.nn.Module, m: int, dtype: torch.dtype, device: str, mode: str,
               flops: float, bytes_: float, shape: dict, others: dict | None = None) -> Case:
    """A case timing ``layer`` on a random (m, in_features) input against dense F.linear."""
    layer = layer.to(device=device, dtype=dtype)
    x = torch.randn(m, layer.in_features, device=device, dtype=dtype, requires_grad=mode != "fwd")
    return Case(kernel, mode, shape, dtype, module_call(layer, x, mode), dense_call(x, layer.out_features, mode),
                flops, bytes_, others or {})


def _git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def metadata(device: str) -> dict:
    import triton

    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def roofline_fraction(case: Case, ms: float, device: str) -> float | None:
    """Fraction of the roofline floor max(flops / peak, bytes / bandwidth) reached, CUDA only."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    peaks = next((p for key, p in PEAKS.items() if key in name), None)
    if peaks is None:
        return None
    key = str(case.dtype).removeprefix("torch.")
    if key == "float32" and torch.backends.cuda.matmul.allow_tf32:
        key = "tf32"
    floor_s = max(case.flops / peaks[key], case.bytes / peaks["bw"])
    return floor_s / (ms * 1e-3)


def measure(cases: Iterable[Case], device: str, progress: Callable[[str], None] = print) -> list[dict]:
    """Time every case (ours, dense, others) and return one JSON-ready row per case."""
    meta = metadata(device)
    rows = []
    for case in cases:
        ms, p20, p80 = time_ms(case.run, device)
        dense_ms = time_ms(case.dense, device)[0]
        row = {
            "kernel": case.kernel, "mode": case.mode, "shape": case.shape,
            "dtype": str(case.dtype).removeprefix("torch."), "device": meta["device"],
            "ms": ms, "ms_p20": p20, "ms_p80": p80,
            "baseline": "F.linear (dense)", "baseline_ms": dense_ms, "speedup": dense_ms / ms,
            "flops": case.flops, "bytes": case.bytes,
            "roofline_fraction": roofline_fraction(case, ms, device),
            "others_ms": {name: time_ms(fn, device)[0] for name, fn in case.others.items()},
            "peak_mem_mb": cuda_peak_mb(case.run) if device == "cuda" else None,
            "torch": meta["torch"], "triton": meta["triton"], "commit": meta["commit"],
        }
        rows.append(row)
        others = "".join(f", {k} {v:.3f} ms" for k, v in row["others_ms"].items())
        progress(f"{case.kernel:<26} {case.mode:<8} {str(case.shape):<44} {row['dtype']:<9} "
                 f"{ms:9.3f} ms  dense {dense_ms:9.3f} ms  x{row['speedup']:.2f}{others}")
    return rows


def find(rows: list[dict], kernel: str, mode: str, dtype: str, **shape) -> dict | None:
    """The row for one kernel/mode/dtype whose shape contains ``shape``."""
    for r in rows:
        if (r["kernel"], r["mode"], r["dtype"]) == (kernel, mode, dtype) and all(r["shape"].get(k) == v for k, v in shape.items()):
            return r
    return None


def speedup(rows: list[dict], kernel: str, mode: str, dtype: str, other: str | None = None, **shape) -> float | None:
    """Baseline time / our time for one row: dense F.linear, or the named ``other`` of the same run."""
    r = find(rows, kernel, mode, dtype, **shape)
    base = None if r is None else r["others_ms"].get(other) if other else r["baseline_ms"]
    return None if base is None else base / r["ms"]


def target(text: str, measured: float | None, threshold: float, higher_is_better: bool = True) -> dict:
    """One stated target: met when the measured ratio clears the threshold (None: not measured here)."""
    met = None if measured is None else (measured >= threshold if higher_is_better else measured <= threshold)
    return {"target": text, "measured": measured, "threshold": threshold, "met": met}


def write_json(path: str | Path, device: str, rows: list[dict], targets: list[dict], extra: dict | None = None) -> None:
    data = {"meta": {**metadata(device), **(extra or {})}, "rows": rows, "targets": targets}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1))
