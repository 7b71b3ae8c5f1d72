"""Benchmark harness shared by every layer family: timing, memory, roofline and JSON rows.

A family module (``bench/<family>.py``) yields :class:`Case` objects and checks its stated targets
against the measured rows. CUDA timings use ``triton.testing.do_bench`` (median and 20/80 %
quantiles; rows with M <= ``SMALL_M`` also ``do_bench_cudagraph``, so Python launch overhead is
visible); CPU timings use ``torch.utils.benchmark`` (median of blocked runs). Every case is timed
against dense ``F.linear`` (cuBLAS on CUDA) on the same shapes in the same run. Gradients of both
sides are cleared before every fwd+bwd repetition, so neither pays a ``.grad +=``.

Honest numbers: the roofline fraction uses the useful FLOPs (the structure's minimal work) and the
minimal bytes, against peaks measured in the same run (a large GEMM per dtype, a device-to-device
copy), never a datasheet; the FLOPs the kernels execute (padding, recomputation) get their own
column; the launch floor (an empty kernel) is measured in the same run; each row records the
autotune config every Triton kernel ran (``best_config``).
"""

from __future__ import annotations

import datetime
import importlib.metadata
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
import triton
import triton.language as tl

SMALL_M = 256  # rows up to this many also get a CUDA-graph timing


@dataclass
class Step:
    """A timed callable and the tensors whose ``.grad`` it fills (cleared before every repetition)."""

    fn: Callable[[], object]
    grads: list[torch.Tensor] = field(default_factory=list)

    def __call__(self) -> object:
        return self.fn()


@dataclass
class Case:
    """One benchmark: our layer call vs dense F.linear (and optional other baselines) on one shape.

    ``flops`` is the useful work (the structure's minimal FLOPs, no padding or recomputation) and
    ``bytes`` the minimal memory traffic of our call; together they give the roofline floor.
    ``executed_flops`` is what the kernels actually compute (padded tiles, recomputed stages), from
    the kernel docstrings. ``missing`` names baselines that could not be built here (not installed).
    """

    kernel: str
    mode: str  # "fwd" or "fwd+bwd"
    shape: dict
    dtype: torch.dtype
    run: Step
    dense: Step
    flops: float
    bytes: float
    executed_flops: float
    others: dict[str, Step] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def time_ms(step: Step, device: str) -> tuple[float, float, float]:
    """(median, 20 %, 80 %) wall time of ``step`` in milliseconds, its gradients cleared before
    every repetition (outside the timed region on CUDA, a few attribute stores inside it on CPU)."""
    if device == "cuda":
        return tuple(triton.testing.do_bench(step, grad_to_none=step.grads or None, quantiles=[0.5, 0.2, 0.8]))
    from torch.utils import benchmark

    def clear_and_run():
        for t in step.grads:
            t.grad = None
        step()

    m = benchmark.Timer(stmt="fn()", globals={"fn": clear_and_run}).blocked_autorange(min_run_time=0.5)
    return tuple(float(q) * 1e3 for q in np.percentile(m.times, [50, 20, 80]))


def graph_ms(step: Step) -> float:
    """Median time of ``step`` replayed from a CUDA graph (no Python or launch overhead), ms."""
    return float(triton.testing.do_bench_cudagraph(step, grad_to_none=step.grads or None, return_mode="median"))


def graph_times(case: Case) -> dict:
    """CUDA-graph times of ours and of the dense baseline; a call that cannot be captured is
    recorded as ``graph_error`` instead of stopping the run."""
    try:
        return {"graph_ms": graph_ms(case.run), "baseline_graph_ms": graph_ms(case.dense), "graph_error": None}
    except Exception as e:  # noqa: BLE001 - any capture failure is a finding to report, not a crash
        torch.cuda.synchronize()
        return {"graph_ms": None, "baseline_graph_ms": None, "graph_error": f"{type(e).__name__}: {e}"[:300]}


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


def seed_gradient(cache: dict, y: torch.Tensor) -> torch.Tensor:
    """dy = ones like ``y``, made on the first repetition and reused after: its fill (``elt*M*O``
    bytes written, ~16 us for a bf16 8192 x 4096 y at 4.2 TB/s) is no part of either side's work,
    is in no row's byte count, and would otherwise be timed in every fwd+bwd repetition."""
    dy = cache.get("dy")
    if dy is None or dy.shape != y.shape or dy.dtype != y.dtype or dy.device != y.device:
        dy = cache["dy"] = torch.ones_like(y)
    return dy


def forward_backward(layer: torch.nn.Module, x: torch.Tensor) -> Step:
    """``layer(x)`` and a backward pass into every parameter and x (dy made once: ``seed_gradient``)."""
    cache: dict = {}

    def step():
        y = layer(x)
        y.backward(seed_gradient(cache, y))
    return Step(step, [x, *(p for p in layer.parameters() if p.requires_grad)])


def module_call(module: torch.nn.Module, x: torch.Tensor, mode: str) -> Step:
    """``module(x)``: without autograd for "fwd", else forward and backward (x must then require grad)."""
    if mode != "fwd":
        return forward_backward(module, x)

    def run():
        with torch.no_grad():
            return module(x)
    return Step(run)


def dense_call(x: torch.Tensor, n_out: int, mode: str) -> Step:
    """The baseline: F.linear with a dense (n_out, n_in) weight in x's dtype (cuBLAS on CUDA)."""
    w = torch.randn(n_out, x.shape[-1], device=x.device, dtype=x.dtype, requires_grad=mode != "fwd")
    b = torch.randn(n_out, device=x.device, dtype=x.dtype, requires_grad=mode != "fwd")
    if mode == "fwd":
        return Step(lambda: F.linear(x, w, b))

    cache: dict = {}

    def step():
        y = F.linear(x, w, b)
        y.backward(seed_gradient(cache, y))
    return Step(step, [x, w, b])


def peer(build: Callable[..., Step], *args) -> Step | None:
    """``build(*args)``, or None when the peer package is not installed here."""
    try:
        return build(*args)
    except ImportError:
        return None


def layer_case(kernel: str, layer: torch.nn.Module, m: int, dtype: torch.dtype, device: str, mode: str,
               flops: float, bytes_: float, executed_flops: float, shape: dict,
               others: dict[str, Step | None] | None = None) -> Case:
    """A case timing ``layer`` on a random (m, in_features) input against dense F.linear; ``others``
    that are None (peer not installed) are listed as missing."""
    layer = layer.to(device=device, dtype=dtype)
    x = torch.randn(m, layer.in_features, device=device, dtype=dtype, requires_grad=mode != "fwd")
    others = others or {}
    return Case(kernel, mode, shape, dtype, module_call(layer, x, mode), dense_call(x, layer.out_features, mode),
                flops, bytes_, executed_flops, {k: v for k, v in others.items() if v is not None},
                sorted(k for k, v in others.items() if v is None))


def _git(*args: str) -> str:
    here = Path(__file__).resolve().parent
    return subprocess.check_output(["git", *args], cwd=here, text=True, stderr=subprocess.DEVNULL).strip()


def git_state() -> tuple[str, bool | None]:
    """(short commit, whether tracked files differ from it) of the checkout; ("unknown", None)
    outside git."""
    try:
        return _git("rev-parse", "--short", "HEAD"), bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return "unknown", None


def _cublas_version() -> str | None:
    """The cuBLAS wheel's version (torch's pip builds load it), or None when there is none."""
    names = [d.metadata["Name"] for d in importlib.metadata.distributions() if (d.metadata["Name"] or "").lower().startswith("nvidia-cublas")]
    return f"{names[0]} {importlib.metadata.version(names[0])}" if names else None


def _nvidia_smi() -> dict:
    """Driver version and clocks as nvidia-smi reports them (empty without nvidia-smi)."""
    fields = ["driver_version", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem", "power.limit", "temperature.gpu"]
    try:
        out = subprocess.check_output(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                                      text=True, stderr=subprocess.DEVNULL, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(zip(fields, (v.strip() for v in out.splitlines()[0].split(","))))


def metadata(device: str) -> dict:
    """Where and with what the numbers were taken: device, versions, commit, autotune mode."""
    commit, dirty = git_state()
    meta = {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": commit,
        "dirty": dirty,
        "autotune": os.environ.get("TSPLINE_AUTOTUNE", "full"),
        "backend": os.environ.get("TSPLINE_BACKEND", "auto"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        meta.update(sm_count=props.multi_processor_count, gpu_memory_gb=props.total_memory / 1e9,
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    cublas=_cublas_version(), tf32=torch.backends.cuda.matmul.allow_tf32, nvidia_smi=_nvidia_smi())
    return meta


def measure_peaks(device: str, tiny: bool = False) -> dict:
    """Ceilings measured now, on this device: matrix FLOP/s per dtype (a square GEMM on random
    data: cuBLAS on CUDA, fp32 only on CPU; fp32 follows torch's TF32 setting) and memory bytes/s
    (a device-to-device copy, bytes read plus written). ``tiny``: small sizes (smoke tests)."""
    if device == "cuda":
        n, copy_mb, dtypes = (512, 64, (torch.bfloat16, torch.float16, torch.float32)) if tiny else \
            (8192, 2048, (torch.bfloat16, torch.float16, torch.float32))
    else:
        n, copy_mb, dtypes = (256, 16, (torch.float32,)) if tiny else (1024, 256, (torch.float32,))
    peaks = {"gemm_n": n, "copy_mb": copy_mb}
    for dtype in dtypes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        ms = time_ms(Step(lambda a=a, b=b: a @ b), device)[0]
        peaks[str(dtype).removeprefix("torch.")] = 2.0 * n**3 / (ms * 1e-3)
        del a, b
    src = torch.randn(copy_mb * 2**18, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(Step(lambda: dst.copy_(src)), device)[0]
    peaks["bytes_per_s"] = 2.0 * src.numel() * src.element_size() / (ms * 1e-3)
    return peaks


@triton.jit
def _empty(x_ptr, N: tl.constexpr):
    pass


def empty_launch(device: str) -> Step:
    """One launch of an empty Triton kernel on ``device``."""
    x = torch.empty(1, device=device)
    return Step(lambda: _empty[(1,)](x, 1))


def launch_floor(device: str) -> dict:
    """Time of an empty Triton kernel: per launch from Python (``do_bench``) and per replay from a
    CUDA graph; the floor any single-kernel call sits on. CUDA only (empty dict elsewhere)."""
    if device != "cuda":
        return {}
    step = empty_launch(device)
    return {"launch_ms": time_ms(step, device)[0], "launch_graph_ms": graph_ms(step)}


def autotune_configs(step: Step) -> dict[str, str]:
    """One call of ``step``, and the config each autotuned kernel it launched ran (the last
    launch's, for a kernel launched more than once)."""
    from .every_config import autotuners, describe

    tuners = autotuners()
    for t in tuners.values():
        t.best_config = None
    step()
    return {name: describe(t.best_config) for name, t in tuners.items() if getattr(t, "best_config", None) is not None}


def roofline_fraction(case: Case, ms: float, peaks: dict) -> float | None:
    """Fraction of the roofline floor max(useful flops / GEMM peak, bytes / copy bandwidth) that
    ``ms`` reaches, with this run's measured peaks (None without a peak for the dtype)."""
    peak = peaks.get(str(case.dtype).removeprefix("torch."))
    if not peak or not peaks.get("bytes_per_s"):
        return None
    floor_s = max(case.flops / peak, case.bytes / peaks["bytes_per_s"])
    return floor_s / (ms * 1e-3)


def measure(cases: Iterable[Case], device: str, progress: Callable[[str], None] = print,
            peaks: dict | None = None, floor: dict | None = None) -> list[dict]:
    """Time every case (ours, dense, others) and return one JSON-ready row per case; ``peaks``
    (``measure_peaks``) and ``floor`` (``launch_floor``) of this run go into each row."""
    meta = metadata(device)
    peaks, floor = peaks or {}, floor or {}
    rows = []
    for case in cases:
        ms, p20, p80 = time_ms(case.run, device)
        dense_ms = time_ms(case.dense, device)[0]
        small = device == "cuda" and case.shape.get("M", SMALL_M + 1) <= SMALL_M
        row = {
            "kernel": case.kernel, "mode": case.mode, "shape": case.shape,
            "dtype": str(case.dtype).removeprefix("torch."), "device": meta["device"],
            "ms": ms, "ms_p20": p20, "ms_p80": p80,
            "baseline": "F.linear (dense)", "baseline_ms": dense_ms, "speedup": dense_ms / ms,
            **(graph_times(case) if small else {"graph_ms": None, "baseline_graph_ms": None, "graph_error": None}),
            "launch_floor_ms": floor.get("launch_ms") if small else None,
            "flops": case.flops, "executed_flops": case.executed_flops, "bytes": case.bytes,
            "roofline_fraction": roofline_fraction(case, ms, peaks),
            "others_ms": {name: time_ms(fn, device)[0] for name, fn in case.others.items()},
            "others_missing": case.missing,
            "peak_mem_mb": None, "configs": {},
            "torch": meta["torch"], "triton": meta["triton"], "commit": meta["commit"], "dirty": meta["dirty"],
        }
        def record_configs():
            row["configs"] = autotune_configs(case.run)

        if device == "cuda":  # the extra call that records the configs also gives the peak memory
            row["peak_mem_mb"] = cuda_peak_mb(record_configs)
        else:
            record_configs()
        rows.append(row)
        others = "".join(f", {k} {v:.3f} ms" for k, v in row["others_ms"].items())
        graph = f"  graph {row['graph_ms']:.3f} ms" if row["graph_ms"] is not None else ""
        progress(f"{case.kernel:<26} {case.mode:<8} {str(case.shape):<44} {row['dtype']:<9} "
                 f"{ms:9.3f} ms{graph}  dense {dense_ms:9.3f} ms  x{row['speedup']:.2f}{others}")
    return rows


def find(rows: list[dict], kernel: str, mode: str, dtype: str, **shape) -> dict | None:
    """The row for one kernel/mode/dtype whose shape contains ``shape``."""
    for r in rows:
        if (r["kernel"], r["mode"], r["dtype"]) == (kernel, mode, dtype) and all(r["shape"].get(k) == v for k, v in shape.items()):
            return r
    return None


def speedup(rows: list[dict], kernel: str, mode: str, dtype: str, other: str | None = None, graph: bool = False,
            **shape) -> float | None:
    """Baseline time / our time for one row: dense F.linear, or the named ``other`` of the same run;
    ``graph``: both timed as CUDA-graph replays (the small-M rows)."""
    r = find(rows, kernel, mode, dtype, **shape)
    if r is None:
        return None
    if graph:
        ours, base = r.get("graph_ms"), r.get("baseline_graph_ms")
    else:
        ours, base = r["ms"], r["others_ms"].get(other) if other else r["baseline_ms"]
    return None if ours is None or base is None else base / ours


GOALS = ("fwd small", "fwd large", "fwd+bwd small", "fwd+bwd large", "roofline fwd", "roofline fwd+bwd")


def layer_goals(rows: list[dict], device: str, kernel: str, label: str, small: dict, large: dict,
                predicted: dict[str, float], large_ratio: float | None = None,
                large_time_at_most: float | None = None, small_ratio: float = 3.0) -> list[dict]:
    """The GPU goals of one layer (bf16, vs cuBLAS F.linear in the same run): forward at the small
    M (CUDA-graph timing) at least ``small_ratio`` faster; forward at the large M at least
    ``large_ratio`` faster, or at most ``large_time_at_most`` times the dense time; forward+backward
    at both at least 0.7x the forward's ratio; forward and forward+backward at the large M at least
    70% of the roofline floor. ``small``/``large``: the rows' shape keys. ``predicted``: the cost
    model's value for each of ``GOALS``. None where not measured."""
    if set(predicted) != set(GOALS):
        raise ValueError(f"predicted must give exactly {GOALS}, got {sorted(predicted)}")

    def ratio(mode: str, at: dict, graph: bool = False) -> float | None:
        return speedup(rows, kernel, mode, "bfloat16", graph=graph, **at) if device == "cuda" else None

    def relative(at: dict, graph: bool = False) -> float | None:
        fwd, both = ratio("fwd", at, graph), ratio("fwd+bwd", at, graph)
        return None if fwd is None or both is None else both / fwd

    def roofline(mode: str) -> float | None:
        r = find(rows, kernel, mode, "bfloat16", **large) if device == "cuda" else None
        return None if r is None else r["roofline_fraction"]

    m_small, m_large = small["M"], large["M"]
    p = predicted
    out = [target(f"GPU bf16 {label} fwd vs cuBLAS, M={m_small}, CUDA graphs (x faster)",
                  ratio("fwd", small, graph=True), small_ratio, predicted=p["fwd small"])]
    if large_ratio is not None:
        out.append(target(f"GPU bf16 {label} fwd vs cuBLAS, M={m_large} (x faster)", ratio("fwd", large), large_ratio,
                          predicted=p["fwd large"]))
    else:
        fwd = ratio("fwd", large)
        out.append(target(f"GPU bf16 {label} fwd time / cuBLAS time, M={m_large}", None if fwd is None else 1 / fwd,
                          large_time_at_most, higher_is_better=False, predicted=p["fwd large"]))
    out += [target(f"GPU bf16 {label} fwd+bwd ratio / fwd ratio, M={m_small}, CUDA graphs", relative(small, True), 0.7,
                   predicted=p["fwd+bwd small"]),
            target(f"GPU bf16 {label} fwd+bwd ratio / fwd ratio, M={m_large}", relative(large), 0.7,
                   predicted=p["fwd+bwd large"])]
    out += [target(f"GPU bf16 {label} {mode} at M={m_large}: fraction of its roofline floor", roofline(mode), 0.7,
                   predicted=p[f"roofline {mode}"]) for mode in ("fwd", "fwd+bwd")]
    return out


def target(text: str, measured: float | None, threshold: float, higher_is_better: bool = True,
           predicted: float | None = None) -> dict:
    """One stated target: met when the measured ratio clears the threshold (None: not measured
    here). ``predicted``: the labelled H200 estimate (reasoning in bench/NOTES.md), reported
    beside the target until it is measured, never as a measurement."""
    met = None if measured is None else (measured >= threshold if higher_is_better else measured <= threshold)
    return {"target": text, "measured": measured, "threshold": threshold, "met": met, "predicted": predicted}


def free_path(path: str | Path) -> Path:
    """``path``, or with the first of -2, -3, ... before the suffix that names no existing file:
    results are never overwritten."""
    path = Path(path)
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def write_json(path: str | Path, device: str, rows: list[dict], targets: list[dict], extra: dict | None = None) -> None:
    """Write the run (metadata, rows, targets) to ``path``."""
    data = {"meta": {**metadata(device), **(extra or {})}, "rows": rows, "targets": targets}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1))
