"""Host overhead per call of every layer family, measured with every Triton launch stubbed.

What is counted. A layer call runs as it would on a GPU with the Triton path forced
(``tspline_kernels.backend("triton")``): the module's Python, the custom-op dispatch and autograd
bookkeeping, the launchers' checks, constants, casts, allocations (``torch.empty``) and strides,
and each launch's grid: ``grid(meta)`` is evaluated with the config the launch would run (the
autotuner's first, under the interpreter its only one) and any ``triton.heuristics`` values, so
:class:`SplitSlots` and the other grid callables do their work. Torch ops between launches (a cast,
a sum of partial slots) also run: on a GPU each is an asynchronous kernel launch; without one (the
CPU) its arithmetic runs here and is part of the time, so each row also reports these "torch
kernels" per call (:func:`torch_kernels`). The row's ``<mode>_host_us`` is the measured time less the
stub's own cost per launch (:func:`stub_us`).

Which configs. Kernel paths depend on the autotuners' configs (TT's chain kernel runs where one
of its configs fits the cores), and without a GPU those are the interpreter's single small-block
config, under which TT 8^4 would take the per-step kernels the GPU does not. So without a GPU every
autotuner carries, while the layers are measured, the GPU's quick configs (the GPU check's
``TSPLINE_AUTOTUNE=quick``; :func:`gpu_configs`), and each launch's grid sees the first.

What is not counted. The launch ``kernel[grid](*args)`` itself is a no-op that records the kernel's
name and grid: nothing of Triton's launch path runs (the autotuner's key and cache lookup, the
JIT's argument binding and specialisation, the driver launch; under the interpreter, the whole
interpreted kernel). On a GPU that costs about the "launch floor" ``tspline bench`` measures per
launch (an empty kernel, ~3.7 us on an H200) plus a few us for an autotuner, so a call's GPU host
time is about this overhead plus launches x that. Outputs of stubbed launches are uninitialised
(``torch.empty``): fine for timing, never for checking values.

How. Each layer runs at a 4096 x 4096-like shape (or its family's natural shape near it) on
M = 16 rows in bf16, one thread, timed with ``torch.utils.benchmark.Timer.blocked_autorange`` in
CPU time of the calling thread (``time.thread_time``: other processes on a shared machine do not
inflate it). "fwd" is an inference call (timed under ``torch.no_grad``), "fwd+bwd" a forward and
``torch.autograd.grad`` into x and every parameter (no ``.grad`` accumulation). With a GPU the
tensors live on it (torch's kernels then run asynchronously), else on the CPU. ``torch.nn.Linear``
is reported for scale, unstubbed: at the same shape with its real 16-row matmul (fp32 on the CPU:
a bf16 CPU matmul takes milliseconds), and at 64 x 64, where its arithmetic is negligible (its
dispatch and autograd cost alone), and a layer that is one empty custom autograd Function (its
apply, saved tensors and the engine's call of a Python backward: the floor of every layer here,
all of which are built on such Functions). Each layer's row also gives ``<mode>_beyond_linear_us``, its
time less that 64 x 64 nn.Linear's in the same run: what the layer adds to the host cost PyTorch's
own layer pays (module call, dispatch, autograd engine), which moves less with the machine than
the absolute time. Goals (issue 10): <= 30 us per forward, <= 100 us per forward and backward, for
every layer, on ``<mode>_host_us``.

``tspline bench --only host_overhead`` (or ``python -m bench.host_overhead``) writes
``bench/results/host-overhead-<date>.json``.

Counting instead of timing. On a shared machine these times move by up to 2x between runs, more
than most changes to the host code. ``python -m bench.host_overhead --instructions`` runs the same
calls under valgrind's callgrind and reports host instructions per call (torch's kernel loops and
the stub left out, :func:`count_instructions`), which repeat within ~1%: the way to tell whether
a change cut host work. An instruction is no fixed time, so the goals stay on the times.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.benchmark
from torch import nn

import tspline_kernels as tk
from tspline_kernels._triton import INTERPRET, triton  # (sets TRITON_INTERPRET before triton is imported)

from .harness import free_path, write_json

GOAL_FWD_US = 30.0
GOAL_FWD_BWD_US = 100.0
ROWS = 16
N = 4096


@dataclass(frozen=True)
class Launch:
    """One stubbed Triton launch: the kernel's name and the grid it would have run."""

    kernel: str
    grid: tuple[int, ...]


def _wrappers(kernel) -> tuple[dict[str, int], list[tuple[str, object]]]:
    """(argument name -> position, the wrappers between ``kernel[grid]`` and the compiled kernel,
    outermost first): an autotuner adds its config (its first, under the interpreter its only
    one), a ``triton.heuristics`` its values."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    index, chain = {name: k for k, name in enumerate(kernel.arg_names)}, []
    while isinstance(kernel, (Autotuner, Heuristics)):
        if isinstance(kernel, Autotuner):
            chain.append(("config", kernel.configs[0].all_kwargs()))
        else:
            chain.append(("heuristics", kernel.values))
        kernel = kernel.fn
    return index, chain


class _Meta(dict):
    """The ``meta`` a launch's grid callable receives: a dict, as Triton's, of the launch's keyword
    arguments and what its :func:`_wrappers` add (config, heuristics); a positional argument is
    read on first use (``__missing__``: copying every argument into the dict would add ~1.5 us to
    every launch, more than a grid's few reads). Built by :func:`_meta`."""

    __slots__ = ("index", "args")

    def __missing__(self, key: str):
        k = self.index[key]
        if k >= len(self.args):
            raise KeyError(key)
        return self.args[k]


def _meta(wrappers: tuple[dict[str, int], list[tuple[str, object]]], args: tuple, kwargs: dict) -> _Meta:
    meta = _Meta(kwargs)
    meta.index, meta.args = wrappers[0], args
    for kind, payload in wrappers[1]:
        if kind == "config":
            meta.update(payload)
        else:  # in order: a heuristic sees the values of those before it, as in Triton
            for name, value in payload.items():
                meta[name] = value(meta)
    return meta


@contextlib.contextmanager
def gpu_configs() -> Iterator[None]:
    """Inside the block every autotuned kernel of the package carries the GPU's quick configs
    (``configs.quick``) in place of the interpreter's; nothing changes on a GPU."""
    from .every_config import autotuners

    tuners = autotuners() if INTERPRET else {}
    saved = {name: t.configs for name, t in tuners.items()}
    try:
        for t in tuners.values():
            t.configs = list(t.configs.quick)
        yield
    finally:
        for name, t in tuners.items():
            t.configs = saved[name]


def _kernel_name(kernel) -> str:
    """The name of the Python function under a kernel's wrappers."""
    while not inspect.isfunction(kernel):
        kernel = kernel.fn
    return kernel.__name__


@contextlib.contextmanager
def stubbed_launches() -> Iterator[list[Launch]]:
    """Inside the block every Triton launch ``kernel[grid](*args, **kwargs)`` is a no-op that
    evaluates the grid (callable grids on the launch's :class:`_Meta`) and appends a :class:`Launch`
    to the yielded list; nothing of Triton's launch path and no kernel body runs, outputs stay as
    allocated. Not thread-safe: the patch is process-wide for the block."""
    from triton.runtime.jit import KernelInterface

    launches: list[Launch] = []
    known: dict[int, tuple[str, tuple]] = {}  # per kernel in this block: name and wrappers, looked up once

    def launcher(kernel, grid):
        if id(kernel) not in known:
            known[id(kernel)] = (_kernel_name(kernel), _wrappers(kernel))
        name, wrappers = known[id(kernel)]

        def launch(*args, **kwargs) -> None:
            shape = grid(_meta(wrappers, args, kwargs)) if callable(grid) else grid
            launches.append(Launch(name, tuple(shape)))
        return launch

    original = KernelInterface.__dict__["__getitem__"]
    KernelInterface.__getitem__ = launcher
    try:
        yield launches
    finally:
        KernelInterface.__getitem__ = original


# ------------------------------------------------------------------------------------------ layers
LAYERS: dict[str, Callable[[], nn.Module]] = {
    "lowrank r16": lambda: tk.LowRankLinear(N, N, 16),
    "kronecker 64x64": lambda: tk.KroneckerLinear((64, 64), (64, 64)),
    "kronecker 64x64 gated": lambda: tk.KroneckerLinear((64, 64), (64, 64), gated=True),
    "tt 16x16x16 r16": lambda: tk.TTLinear((16, 16, 16), (16, 16, 16), 16),
    "tt 8x8x8x8 r8": lambda: tk.TTLinear((8,) * 4, (8,) * 4, 8),
    "spline_tt 16x16x16 r16 grid 8x8": lambda: tk.SplineTTLinear((16, 16, 16), (16, 16, 16), 16, (8, 8)),
    "spline bspline 64x64": lambda: tk.SplineLinear(N, N, grid=(64, 64)),
    "spline bicubic n16": lambda: tk.SplineLinear(N, N, basis="bicubic", n_control_points=16),
    "spline gaussian n16": lambda: tk.SplineLinear(N, N, basis="gaussian", n_control_points=16),
    "spline eisenstein n16": lambda: tk.SplineLinear(N, N, basis="eisenstein", n_control_points=16),
    "spline gaussian local n64": lambda: tk.SplineLinear(N, N, basis="gaussian", n_control_points=64, support="local"),
    "spline eisenstein local n64": lambda: tk.SplineLinear(N, N, basis="eisenstein", n_control_points=64,
                                                           support="local"),
    "spline hierarchical 16x16+64x64": lambda: tk.HierarchicalSplineLinear(N, N, coarse_grid=(16, 16),
                                                                          fine_grid=(64, 64)),
    "decoupled r64 K12": lambda: tk.DecoupledSplineMLP(N, N, rank=64, n_basis=12),
}


class _Empty(torch.autograd.Function):
    """y = an uninitialised (M, out) tensor; the gradients of x and w likewise: the host cost of a
    custom autograd Function itself (apply, saving, the engine calling a Python backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return x.new_empty(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, w = ctx.saved_tensors
        return torch.empty_like(x), torch.empty_like(w)


class EmptyFunctionLayer(nn.Module):
    """A 64 x 64 "layer" whose forward is one :class:`_Empty` call: the floor of any layer built on a
    Python autograd Function (ours are), without a kernel, a launch or an allocation beyond its outputs."""

    def __init__(self, n: int = 64) -> None:
        super().__init__()
        self.in_features = self.out_features = n
        self.weight = nn.Parameter(torch.randn(n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Empty.apply(x, self.weight)


# for scale, unstubbed: nn.Linear at the same shape with its real matmul of 16 rows, and at 64 x 64,
# where its arithmetic is negligible (fp32 on the CPU, bf16 on a GPU); an empty autograd Function
BASELINES: dict[str, Callable[[], nn.Module]] = {
    "nn.Linear 4096 (real matmul)": lambda: nn.Linear(N, N),
    "empty autograd.Function 64": EmptyFunctionLayer,
    "nn.Linear 64 (dispatch only)": lambda: nn.Linear(64, 64),
}


GRAD_MODE = {"fwd": False, "fwd+bwd": True}  # the grad mode each call runs (and is timed) under


def calls(layer: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """``fwd``: an inference call (run it under ``torch.no_grad``, see ``GRAD_MODE``: entering that
    context inside the timed call would add its own ~2 us); ``fwd+bwd``: forward and the gradients
    of x and every parameter (``torch.autograd.grad``: nothing accumulates into ``.grad``)."""
    inputs = [x.detach().requires_grad_(), *(p for p in layer.parameters() if p.requires_grad)]

    def forward_backward():
        y = layer(inputs[0])
        return torch.autograd.grad(y, inputs, torch.ones_like(y))

    return {"fwd": lambda: layer(x), "fwd+bwd": forward_backward}


def median_us(fn: Callable[[], object], min_run_time: float) -> float:
    """Median microseconds per call of ``fn`` on one thread (blocked autorange), in CPU time of the
    calling thread: other processes on a shared machine do not inflate it."""
    timer = torch.utils.benchmark.Timer("fn()", globals={"fn": fn}, num_threads=1, timer=time.thread_time)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e6


# aten ops that only allocate, re-describe memory or return their input: no kernel on a GPU
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "reshape", "view_as",
              "_unsafe_view", "_reshape_alias", "as_strided", "select", "slice", "narrow", "expand", "expand_as",
              "t", "mT", "transpose", "permute", "movedim", "flatten", "unflatten", "squeeze", "unsqueeze", "split",
              "split_with_sizes", "chunk", "unbind", "diagonal", "detach", "alias", "lift_fresh", "resolve_conj",
              "resolve_neg", "to", "contiguous", "set_", "requires_grad_", "_has_compatible_shallow_copy_type"}


def torch_kernels(fn: Callable[[], object], calls: int = 3) -> float:
    """Torch kernels per call of ``fn``: the aten ops it runs that do arithmetic (a copy, a fill, a
    sum, a matmul: ops outside ``_NO_KERNEL`` none of whose callees does arithmetic, from the
    profiler's op tree). On a GPU each is a launch of its own; here their arithmetic runs on the CPU
    and is part of the measured time."""
    def kernels(event) -> int:
        below = sum(kernels(c) for c in event.cpu_children)
        return below or int(event.name.startswith("aten::") and event.name[6:] not in _NO_KERNEL)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    return sum(kernels(e) for e in prof.events() if e.cpu_parent is None) / calls


@triton.jit
def _no_op(x_ptr):
    pass


def stub_us(min_run_time: float) -> float:
    """Microseconds of the launch stub itself per launch (its closures, :class:`_Meta`, the record),
    timed on a one-argument kernel with a one-entry callable grid: Triton's own launch path, which
    does that work on a GPU, is not part of the host overhead."""
    x = torch.empty(1)
    with stubbed_launches():
        return median_us(lambda: _no_op[lambda meta: (1,)](x), min_run_time)


def measure_layer(name: str, layer: nn.Module, device: str, dtype: torch.dtype, stub: float | None,
                  min_run_time: float) -> dict:
    """One row: median us per fwd and per fwd+bwd, the Triton launches each call makes, the torch
    kernels it runs besides (:func:`torch_kernels`) and the host time: the median less the stub's
    cost (``stub`` us per launch, :func:`stub_us`; None: launches not stubbed)."""
    layer = layer.to(device=device, dtype=dtype)
    x = torch.randn(ROWS, layer.in_features, device=device, dtype=dtype)
    row = {"layer": name, "type": type(layer).__name__, "in_features": layer.in_features,
           "out_features": layer.out_features, "rows": ROWS, "dtype": str(dtype), "device": device, "stubbed": stub}
    for mode, fn in calls(layer, x).items():
        with stubbed_launches() as launches, torch.set_grad_enabled(GRAD_MODE[mode]):
            fn()  # warm-up: the layers' caches fill on the first call
            launches.clear()
            fn()
            row[f"{mode}_launches"] = len(launches)
            row[f"{mode}_kernels"] = sorted({launch.kernel for launch in launches})
            row[f"{mode}_torch_kernels"] = torch_kernels(fn)
            row[f"{mode}_us"] = median_us(fn, min_run_time)
            row[f"{mode}_host_us"] = row[f"{mode}_us"] - row[f"{mode}_launches"] * (stub or 0.0)
            goal = GOAL_FWD_US if mode == "fwd" else GOAL_FWD_BWD_US
            row[f"{mode}_goal_met"] = row[f"{mode}_host_us"] <= goal if stub is not None else None
    return row


def run(out: str | None = None, layers: list[str] | None = None, min_run_time: float = 0.5) -> Path:
    """Measure every layer (or ``layers``) and the nn.Linear baselines on CUDA tensors where there is
    a GPU (torch's own kernels then run asynchronously), else on the CPU; write and return the JSON."""
    torch.set_num_threads(1)
    names = layers or list(LAYERS)
    unknown = sorted(set(names) - set(LAYERS))
    if unknown:
        raise SystemExit(f"unknown layers {unknown}; choose from {list(LAYERS)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    date = datetime.date.today().isoformat()
    path = free_path(out or Path("bench/results") / f"host-overhead-{date}{'-cuda' if device == 'cuda' else ''}.json")
    from tqdm import tqdm

    print(f"{'layer':<36} {'fwd us':>7} {'host':>7} {'launch':>6} {'torch':>5} {'fwd+bwd us':>10} {'host':>7}"
          f" {'launch':>6} {'torch':>5} {'host beyond nn.Linear 64: fwd, fwd+bwd':>40}")
    baselines = []
    for name, build in BASELINES.items():
        baseline_dtype = torch.bfloat16 if device == "cuda" else torch.float32
        baselines.append(measure_layer(name, build(), device, baseline_dtype, None, min_run_time))
        print(_line(baselines[-1]))
    dispatch = next(r for r in baselines if r["layer"] == "nn.Linear 64 (dispatch only)")
    stub = stub_us(min_run_time)
    print(f"the launch stub itself: {stub:.1f} us per launch (subtracted)")
    rows = []
    with tk.backend("triton"), gpu_configs():
        for name in (bar := tqdm(names, desc="host overhead", leave=False, disable=None)):  # no bar off a terminal
            row = measure_layer(name, LAYERS[name](), device, torch.bfloat16, stub, min_run_time)
            for mode in GRAD_MODE:
                row[f"{mode}_beyond_linear_us"] = row[f"{mode}_host_us"] - dispatch[f"{mode}_host_us"]
            rows.append(row)
            bar.write(_line(row))
    rows += baselines
    extra = {"rows_per_call": ROWS, "goal_fwd_us": GOAL_FWD_US, "goal_fwd_bwd_us": GOAL_FWD_BWD_US,
             "stub_us_per_launch": stub, "threads": 1, "timer": "time.thread_time", "what": __doc__.split("\n\n")[1:4]}
    write_json(path, device, rows, [], extra)
    print(f"wrote {path}")
    return path


# ------------------------------------------------------------------------ instruction counts
# baselines whose instructions are host work (nn.Linear 4096's are its matmul's arithmetic)
COUNTED_BASELINES = ("empty autograd.Function 64", "nn.Linear 64 (dispatch only)")


def _callgrind_child(names: list[str], calls_per_row: int, manifest: str) -> None:
    """Run under callgrind with ``--dump-before=getsid``: each ``os.getsid`` call dumps the counts
    since the previous one. Per row and mode: the layer's set-up and warm-up (one dump, not used),
    then ``calls_per_row`` calls (the next dump); the rows' order and launches go to ``manifest``."""
    torch.set_num_threads(1)
    order = []

    def count(label: str, mode: str, fn: Callable[[], object], stubbed: bool) -> None:
        with contextlib.ExitStack() as stack:
            launches = stack.enter_context(stubbed_launches()) if stubbed else []
            stack.enter_context(torch.set_grad_enabled(GRAD_MODE[mode]))
            for _ in range(3):
                fn()
            launches.clear()
            fn()
            order.append((label, mode, len(launches)))
            os.getsid(0)
            for _ in range(calls_per_row):
                fn()
                launches.clear()
            os.getsid(0)

    x = torch.empty(1)
    count("launch stub", "fwd", lambda: _no_op[lambda meta: (1,)](x), True)
    for name in COUNTED_BASELINES:
        layer = BASELINES[name]()
        for mode, fn in calls(layer, torch.randn(ROWS, layer.in_features)).items():
            count(name, mode, fn, False)
    with tk.backend("triton"), gpu_configs():
        for name in names:
            layer = LAYERS[name]().to(torch.bfloat16)
            for mode, fn in calls(layer, torch.randn(ROWS, layer.in_features, dtype=torch.bfloat16)).items():
                count(name, mode, fn, True)
    Path(manifest).write_text(json.dumps(order))


# callgrind counts only inside these functions when given them as --toggle-collect: the loops of
# torch's TensorIterator kernels (a fill, a sum, a cast), whose arithmetic a GPU runs, not the host
ARITHMETIC = "*::callback_fn<*"


def _callgrind(valgrind: str, tmp: str, names: list[str], calls_per_row: int, only: str | None) -> subprocess.Popen:
    """The :func:`_callgrind_child` process counting into ``tmp`` (``only``: a --toggle-collect pattern)."""
    cmd = [valgrind, "--tool=callgrind", "--dump-before=getsid", f"--callgrind-out-file={tmp}/cg",
           *([f"--toggle-collect={only}"] if only else []), sys.executable, "-m", "bench.host_overhead",
           "--callgrind-child", f"{tmp}/order.json", "--calls", str(calls_per_row), "--layers", *names]
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONHASHSEED": "0"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _counted(process: subprocess.Popen, tmp: str) -> tuple[list, list[int]]:
    """(the rows' order, each row's instructions in its timed calls) once ``process`` ends: the
    even dumps hold the timed calls (:func:`_callgrind_child`)."""
    _, err = process.communicate()
    if process.returncode != 0 or not Path(f"{tmp}/order.json").exists():
        raise SystemExit(f"the callgrind run failed:\n{err[-3000:]}")
    order = json.loads(Path(f"{tmp}/order.json").read_text())
    return order, [int(re.search(r"^totals: (\d+)", Path(f"{tmp}/cg.{2 * (k + 1)}").read_text(), re.M)[1])
                   for k in range(len(order))]


def instruction_rows(order: list, totals: list[int], arithmetic: list[int], calls_per_row: int) -> list[dict]:
    """Rows from the counts of :func:`_callgrind_child`'s ``order`` (the launch stub first, then
    (name, mode, launches) per row): per call, ``<mode>_instructions`` is the host's (all counted,
    less torch's kernel arithmetic and, for a stubbed layer, the stub's per launch),
    ``<mode>_arithmetic_instructions`` torch's kernel loops (a GPU's work, not the host's) and
    ``<mode>_vs_linear64`` the host count over ``nn.Linear 64 (dispatch only)``'s."""
    per_call = [(t - a) / calls_per_row for t, a in zip(totals, arithmetic)]
    stub = per_call[0]  # one launch per call
    rows: dict[str, dict] = {}
    for (name, mode, launches), n, arith in zip(order[1:], per_call[1:], arithmetic[1:]):
        stubbed = name in LAYERS
        row = rows.setdefault(name, {"layer": name, "rows": ROWS, "stubbed": stubbed})
        row[f"{mode}_launches"] = launches
        row[f"{mode}_instructions"] = round(n - launches * stub if stubbed else n)
        row[f"{mode}_arithmetic_instructions"] = round(arith / calls_per_row)
    linear = rows["nn.Linear 64 (dispatch only)"]
    for row in rows.values():
        for mode in GRAD_MODE:
            row[f"{mode}_vs_linear64"] = row[f"{mode}_instructions"] / linear[f"{mode}_instructions"]
    return list(rows.values())


def count_instructions(out: str | None = None, layers: list[str] | None = None, calls_per_row: int = 200) -> Path:
    """Host instructions per call of every layer (or ``layers``) and of the baselines but nn.Linear
    4096, counted by valgrind's callgrind (the calls of :func:`run`, launches stubbed), written to
    ``bench/results/host-instructions-<date>.json``. A second process counts, at the same time, the
    instructions inside torch's kernel loops (``ARITHMETIC``): a GPU runs those, so the host count
    leaves them out, as it leaves out the stub's own per launch. Unlike times, counts repeat
    within ~1% on a shared machine (a few thousand instructions: addresses, hence hashes and
    garbage collection, differ between runs), so they compare two versions of the host code; they
    do not see the CPU's speed, cache misses or system calls (an instruction is not a fixed time)."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("--instructions needs valgrind (Debian: apt install valgrind)")
    names = layers or list(LAYERS)
    path = free_path(out or Path("bench/results") / f"host-instructions-{datetime.date.today().isoformat()}.json")
    print(f"counting {len(names) + len(COUNTED_BASELINES)} rows under callgrind (minutes: ~50x slower than native)")
    with tempfile.TemporaryDirectory() as every, tempfile.TemporaryDirectory() as loops:
        processes = [_callgrind(valgrind, every, names, calls_per_row, None),
                     _callgrind(valgrind, loops, names, calls_per_row, ARITHMETIC)]
        (order, totals), (_, arithmetic) = _counted(processes[0], every), _counted(processes[1], loops)
    rows = instruction_rows(order, totals, arithmetic, calls_per_row)
    print(f"{'layer':<36} {'fwd host instr':>14} {'x Linear64':>10} {'fwd+bwd host instr':>18} {'x Linear64':>10}"
          f" {'torch arithmetic':>16}")
    for row in rows:
        print(f"{row['layer']:<36} {row['fwd_instructions']:>14} {row['fwd_vs_linear64']:>10.2f}"
              f" {row['fwd+bwd_instructions']:>18} {row['fwd+bwd_vs_linear64']:>10.2f}"
              f" {row['fwd+bwd_arithmetic_instructions']:>16}")
    extra = {"rows_per_call": ROWS, "calls_per_row": calls_per_row,
             "stub_instructions_per_launch": round((totals[0] - arithmetic[0]) / calls_per_row),
             "counter": f"valgrind callgrind Ir, PYTHONHASHSEED=0; arithmetic: --toggle-collect={ARITHMETIC}",
             "what": count_instructions.__doc__}
    write_json(path, "cpu", rows, [], extra)
    print(f"wrote {path}")
    return path


def _line(row: dict) -> str:
    """A row of the printed table; ``*`` marks a host time over its goal."""
    marks = {True: " ", False: "*", None: " "}
    cells = [f"{row['layer']:<36}"]
    for mode, width in (("fwd", 7), ("fwd+bwd", 10)):
        cells.append(f"{row[f'{mode}_us']:>{width}.1f} {row[f'{mode}_host_us']:>6.1f}{marks[row[f'{mode}_goal_met']]}"
                     f" {row[f'{mode}_launches']:>6} {row[f'{mode}_torch_kernels']:>5.0f}")
    if "fwd_beyond_linear_us" in row:
        cells.append(f"{row['fwd_beyond_linear_us']:>19.1f} {row['fwd+bwd_beyond_linear_us']:>20.1f}")
    return " ".join(cells)


def main(quick: bool = False, out: str | None = None) -> Path:
    """``tspline bench --only host_overhead``: every layer (``quick``: shorter timing runs)."""
    return run(out=out, min_run_time=0.1 if quick else 0.5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON file (default bench/results/host-overhead-<date>.json)")
    parser.add_argument("--layers", nargs="+", choices=list(LAYERS), metavar="LAYER", help="only these layers")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timing per measurement")
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions per call under valgrind instead of timing (repeatable on a noisy machine)")
    parser.add_argument("--calls", type=int, default=200, help="calls counted per row with --instructions")
    parser.add_argument("--callgrind-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.callgrind_child:
        _callgrind_child(args.layers or list(LAYERS), args.calls, args.callgrind_child)
    elif args.instructions:
        count_instructions(args.out, args.layers, args.calls)
    else:
        run(args.out, args.layers, args.min_run_time)
