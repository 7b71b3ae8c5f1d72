"""Every-config check: each Triton kernel runs one small shape under EVERY autotune config of its
GPU space (``configs.full``), not only the config autotuning would pick, against the reference:
forward, dx and every parameter gradient of every layer family.

Two ways to run a config, both through the real launchers:

* ``isolated``: the autotuner holds just that config, so it is the only one to touch the buffers;
* ``sequence``: the autotuner benchmarks every other config that survives its pruning first, on
  the same launcher call (same buffers, same grid closure, its own reset hooks), and the config
  under test wins. This is what autotuning does on a GPU, and it exposes kernels that leave
  results of an earlier config behind (partial-sum slots that the winner never overwrites).

Other kernels of the same layer run their first pruned config. Under the Triton interpreter the
same code runs any config's block sizes (warps and stages do not apply there, so configs that
differ only in those are run once); ``python -m tspline_kernels.bench.every_config --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import tspline_kernels as tk
from tspline_kernels import _triton
from tspline_kernels.decoupled import kernels as decoupled_kernels
from tspline_kernels.kronecker import kernels as kron_kernels
from tspline_kernels.lowrank import kernels as lowrank_kernels
from tspline_kernels.spline import kernels as spline_kernels
from tspline_kernels.testing import assert_close
from tspline_kernels.tt import kernels as tt_kernels

KERNEL_MODULES = (spline_kernels, lowrank_kernels, kron_kernels, tt_kernels, decoupled_kernels)
MODES = ("isolated", "sequence")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (name, layer factory, rows): odd sizes; 300 rows exceed every row block of every config (<= 256)
CASES: list[tuple[str, Callable[[], torch.nn.Module], int]] = [
    ("spline.bspline", lambda: tk.SplineLinear(37, 45, grid=(6, 9)), 300),
    ("spline.bspline-windowed", lambda: tk.SplineLinear(37, 45, grid=(40, 70)), 300),
    ("spline.bicubic", lambda: tk.SplineLinear(37, 45, basis="bicubic", n_control_points=10), 300),
    # fields: 256 rows run the on-the-fly kernel (two row blocks of its largest BM, 128), more rows
    # the sliced path (FIELD_ON_THE_FLY_MAX_ROWS)
    ("spline.gaussian", lambda: tk.SplineLinear(37, 45, basis="gaussian", n_control_points=10), 256),
    ("spline.eisenstein", lambda: tk.SplineLinear(37, 45, basis="eisenstein", n_control_points=10), 256),
    ("spline.gaussian-local",
     lambda: tk.SplineLinear(37, 45, basis="gaussian", n_control_points=40, support="local"), 256),
    ("spline.eisenstein-local",
     lambda: tk.SplineLinear(37, 45, basis="eisenstein", n_control_points=40, support="local"), 256),
    ("spline.gaussian-sliced", lambda: tk.SplineLinear(37, 45, basis="gaussian", n_control_points=10), 300),
    ("spline.eisenstein-local-sliced",
     lambda: tk.SplineLinear(37, 45, basis="eisenstein", n_control_points=40, support="local"), 300),
    ("spline.hierarchical", lambda: tk.HierarchicalSplineLinear(37, 45), 300),
    ("lowrank", lambda: tk.LowRankLinear(37, 45, rank=5), 300),
    ("tt.contract", lambda: tk.TTLinear((3, 2, 5), (2, 3, 4), (1, 2, 3, 1), strategy="contract"), 300),
    ("tt.rebuild", lambda: tk.TTLinear((3, 2, 5), (2, 3, 4), (1, 2, 3, 1), strategy="rebuild"), 300),
    # 8^4 rank 8 on rows enough for the cost model's Kronecker-sum forward and backward (64 x 64 halves)
    ("tt.kronsum", lambda: tk.TTLinear((8,) * 4, (8,) * 4, 8, strategy="contract"), 1024),
    # a middle core too large for the chain kernels: the per-step kernels
    ("tt.steps", lambda: tk.TTLinear((2, 40, 2), (2, 40, 2), (1, 8, 8, 1), strategy="contract"), 40),
    ("spline_tt.contract", lambda: tk.SplineTTLinear((5, 4, 3), (3, 5, 4), 2, (4, 4), strategy="contract"), 300),
    ("spline_tt.rebuild", lambda: tk.SplineTTLinear((5, 4, 3), (3, 5, 4), 2, (4, 4), strategy="rebuild"), 300),
    ("kronecker", lambda: tk.KroneckerLinear((3, 5), (4, 7)), 300),
    ("kronecker.gated", lambda: tk.KroneckerLinear((3, 5, 2), (4, 3, 3), gated=True), 300),
    # 130 features and rank 40: every output tile (up to 256) and rank block (up to 64) survives pruning
    ("decoupled", lambda: tk.DecoupledSplineMLP(130, 130, rank=40, n_basis=7), 300),
]


def autotuners() -> dict[str, object]:
    """Every autotuned kernel of the package, by function name."""
    from triton.runtime.autotuner import Autotuner

    return {t.base_fn.__name__: t for m in KERNEL_MODULES for t in vars(m).values() if isinstance(t, Autotuner)}


def describe(config) -> str:
    """A config as text: its block sizes, and warps/stages on a GPU."""
    blocks = ", ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return blocks if _triton.INTERPRET else f"{blocks}, warps={config.num_warps}, stages={config.num_stages}"


def space(tuner) -> list:
    """The GPU configs of an autotuned kernel that this machine can tell apart: all of them on a
    GPU; under the interpreter one per block-size dict (warps and stages do not apply there)."""
    full = tuner.configs.full
    if not _triton.INTERPRET:
        return list(full)
    seen, out = set(), []
    for c in full:
        key = tuple(sorted(c.kwargs.items()))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


class Pins:
    """While active, every autotuned kernel sees its full GPU space (``configs.full``) and each
    launch runs the configs ``plan(kernel name, pruned configs)`` returns: the last one is the one
    that counts, any before it are benchmarked first by the autotuner itself on the same call.
    ``launched`` records each kernel's pruned configs over the launches seen. ``tuners``: the
    autotuned kernels to pin (default: all of the package's)."""

    def __init__(self, plan: Callable[[str, list], list], tuners: dict[str, object] | None = None):
        self.plan = plan
        self.tuners = tuners
        self.launched: dict[str, list] = {}

    @contextlib.contextmanager
    def active(self) -> Iterator[Pins]:
        tuners = self.tuners or autotuners()
        saved = {name: t.configs for name, t in tuners.items()}
        # instance entries replaced below (Triton 3.6 caches do_bench there once it has tuned)
        own = {name: {a: t.__dict__[a] for a in ("run", "do_bench") if a in t.__dict__} for name, t in tuners.items()}
        try:
            for name, t in tuners.items():
                t.configs = space(t)
                t.run = self._runner(name, t)
                # each config benchmarked once, the last one fastest: the plan's last config wins
                clock = iter(range(10**9, 0, -1))
                t.__dict__["do_bench"] = lambda call, quantiles=None, clock=clock: (call(), [float(next(clock))] * 3)[1]
            yield self
        finally:
            for name, t in tuners.items():
                t.configs = saved[name]
                t.cache.clear()
                for attr in ("run", "do_bench"):
                    t.__dict__.pop(attr, None)
                t.__dict__.update(own[name])

    def _runner(self, name: str, tuner) -> Callable:
        full = tuner.configs
        original = type(tuner).run.__get__(tuner)

        def run(*args, **kwargs):
            nargs = dict(zip(tuner.arg_names, args))
            pruned = tuner.early_config_prune(full, nargs, **kwargs) if tuner.early_config_prune else full
            seen = self.launched.setdefault(name, [])
            seen += [c for c in pruned if not any(c is s for s in seen)]
            tuner.configs = self.plan(name, list(pruned))
            tuner.cache.clear()
            try:
                return original(*args, **kwargs)
            finally:
                tuner.configs = full
        return run


def _first(name: str, pruned: list) -> list:
    """The plan running every kernel on its first pruned config."""
    return pruned[:1]


def pin(kernel: str, config, mode: str) -> Callable[[str, list], list]:
    """The plan running ``config`` for ``kernel`` (where its pruning keeps it; else the first
    config) after, in ``sequence`` mode, every other pruned config; other kernels run their first."""
    def plan(name: str, pruned: list) -> list:
        if name != kernel or not any(c is config for c in pruned):
            return pruned[:1]
        return ([c for c in pruned if c is not config] if mode == "sequence" else []) + [config]
    return plan


def results(layer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, which: str) -> dict[str, torch.Tensor]:
    """y, dx and every parameter gradient of one forward/backward under backend ``which``."""
    params = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    with tk.backend(which):
        xi = x.detach().clone().requires_grad_(True)
        y = layer(xi)
        grads = torch.autograd.grad(y, [xi] + [p for _, p in params], g, allow_unused=True)
    names = ["y", "dx"] + [f"d{n}" for n, _ in params]
    return {n: t for n, t in zip(names, (y, *grads)) if t is not None}


@dataclass
class Outcome:
    """One run: which case, dtype, kernel, config and mode, and the error if it failed."""

    case: str
    dtype: str
    kernel: str
    config: str
    mode: str
    error: str | None = None
    seconds: float = 0.0


@dataclass
class Work:
    """One case (layer, inputs, reference results) and the kernels and configs it launches."""

    name: str
    layer: torch.nn.Module
    x: torch.Tensor
    g: torch.Tensor
    expected: dict[str, torch.Tensor]
    launched: dict[str, list] = field(default_factory=dict)


def prepare(name: str, make: Callable[[], torch.nn.Module], rows: int, dtype: torch.dtype, device: str) -> Work:
    """Build the case, its reference results, and record which kernels it launches with which
    pruned configs (one run with every kernel on its first config)."""
    torch.manual_seed(0)
    layer = make().to(device=device, dtype=dtype)
    x = torch.randn(rows, layer.in_features, device=device, dtype=dtype)
    g = torch.randn(rows, layer.out_features, device=device, dtype=dtype)
    work = Work(name, layer, x, g, results(layer, x, g, "reference"))
    pins = Pins(_first)
    with pins.active():
        results(layer, x, g, "triton")
    work.launched = pins.launched
    return work


def check(work: Work, kernel: str, config, mode: str, dtype: torch.dtype) -> Outcome:
    """Run ``work`` with ``kernel`` on ``config`` (``mode``) and compare with the reference."""
    out = Outcome(work.name, str(dtype).removeprefix("torch."), kernel, describe(config), mode)
    start = time.perf_counter()
    try:
        with Pins(pin(kernel, config, mode)).active():
            got = results(work.layer, work.x, work.g, "triton")
        assert got.keys() == work.expected.keys(), f"gradients {sorted(got)} != {sorted(work.expected)}"
        for name, want in work.expected.items():
            assert_close(got[name], want, dtype, name=name)
    except Exception as e:  # every failure is reported, the check goes on
        out.error = f"{type(e).__name__}: {e}".splitlines()[0][:500]
    out.seconds = time.perf_counter() - start
    return out


def select(configs: list, limit: int | None) -> list:
    """All configs, or at most ``limit`` spread evenly (first and last included)."""
    if limit is None or len(configs) <= limit:
        return configs
    if limit == 1:
        return configs[:1]
    step = (len(configs) - 1) / (limit - 1)
    return [configs[round(i * step)] for i in range(limit)]


def run(dtypes=(torch.bfloat16,), modes=MODES, cases=None, limit: int | None = None, shard: tuple[int, int] = (0, 1),
        rows: int | None = None, device: str | None = None, progress: Callable[[str], None] = print,
        on_outcome: Callable[[list[Outcome]], None] | None = None) -> list[Outcome]:
    """Every (case, dtype, kernel, config, mode) item of this shard; ``limit`` configs per kernel
    and case at most (None: all), ``cases`` a subset of ``CASES`` names, ``rows`` instead of each
    case's own row count (fewer rows: faster under the interpreter, fewer row blocks tried).
    ``on_outcome(outcomes so far)`` runs after each item (a shard saves its progress with it).

    Item order, so that a run cut short has covered every kernel: isolated runs before sequence
    runs (a sequence needs every config of the kernel compiled, which the isolated runs of all
    shards do first), and the i-th config of every kernel and case before any (i+1)-th."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    unknown = set(cases or ()) - {c[0] for c in CASES}
    if unknown:
        raise ValueError(f"unknown cases {sorted(unknown)}; choose from {[c[0] for c in CASES]}")
    works = [(prepare(name, make, rows or case_rows, dtype, device), dtype)
             for name, make, case_rows in CASES if cases is None or name in cases for dtype in dtypes]
    items = sorted(((modes.index(mode), rank, w, (work, dtype, kernel, config, mode))
                    for w, (work, dtype) in enumerate(works) for kernel in sorted(work.launched)
                    for rank, config in enumerate(select(work.launched[kernel], limit)) for mode in modes),
                   key=lambda item: item[:3])
    index, count = shard
    outcomes = []
    for *_, (work, dtype, kernel, config, mode) in items[index::count]:
        out = check(work, kernel, config, mode, dtype)
        outcomes.append(out)
        if on_outcome:
            on_outcome(outcomes)
        progress(f"{'FAIL' if out.error else 'ok  '} {out.case:<24} {out.dtype:<8} {kernel:<24} "
                 f"{mode:<8} {out.config}" + (f"\n     {out.error}" if out.error else ""))
    return outcomes


def warm(dtypes, cases, rows: int | None) -> None:
    """Compile every case's first configs once (the shards then load them from Triton's cache)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name, make, case_rows in CASES:
        if cases is None or name in cases:
            for dtype in dtypes:
                prepare(name, make, rows or case_rows, dtype, device)


def summary(outcomes: list[Outcome]) -> dict:
    """Counts, the kernels run and not run, and the failures."""
    failed = [o for o in outcomes if o.error]
    kernels = {o.kernel for o in outcomes}
    return {"checked": len(outcomes), "failed": len(failed), "kernels": sorted(kernels),
            "not_run": sorted(set(autotuners()) - kernels), "failures": [asdict(o) for o in failed]}


def _write(path: str, outcomes: list[Outcome], extra: dict | None = None) -> None:
    Path(path).write_text(json.dumps({**summary(outcomes), **(extra or {}), "outcomes": [asdict(o) for o in outcomes]}, indent=1))


def _parallel(argv: list[str], jobs: int, deadline: float, start: float) -> tuple[list[Outcome], list[str]]:
    """Run ``jobs`` shards of this check as subprocesses (Triton compiles in parallel), each saving
    its outcomes as it goes; ``deadline`` seconds after ``start`` the unfinished ones are stopped
    and what they saved is kept. Returns every outcome and a note per shard that did not finish
    cleanly."""
    import subprocess
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="every_config-"))
    notes = []
    procs = [subprocess.Popen([sys.executable, "-m", __spec__.name, *argv, "--shard", f"{i}/{jobs}", "--jobs", "1",
                               "--json", str(tmp / f"shard{i}.json")]) for i in range(jobs)]
    for i, proc in enumerate(procs):
        try:
            proc.wait(timeout=max(0.0, deadline - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            notes.append(f"shard {i}/{jobs} stopped at the {deadline:.0f} s deadline (its remaining items did not run)")
        else:
            if proc.returncode not in (0, 1):
                notes.append(f"shard {i}/{jobs} exited with {proc.returncode}")
    outcomes = []
    for i in range(jobs):
        f = tmp / f"shard{i}.json"
        if f.exists():
            outcomes += [Outcome(**o) for o in json.loads(f.read_text())["outcomes"]]
        else:
            notes.append(f"shard {i}/{jobs} saved no outcomes")
    return outcomes, notes


def main(argv: list[str] | None = None) -> int:
    """The command line; exit status 1 if any run failed or a shard did not finish."""
    parser = argparse.ArgumentParser(prog="every_config", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", nargs="+", default=["bf16"], choices=sorted(DTYPES))
    parser.add_argument("--mode", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--case", nargs="+", help="only these cases (default: all)")
    parser.add_argument("--limit", type=int, help="at most this many configs per kernel and case (default: all)")
    parser.add_argument("--rows", type=int, help="rows of x for every case (default: each case's own)")
    parser.add_argument("--shard", default="0/1", help="run items i, i+n, ... of the list: 'i/n'")
    parser.add_argument("--jobs", type=int, default=1, help="run this many shards in parallel processes")
    parser.add_argument("--deadline", type=float, default=float("inf"),
                        help="with --jobs: stop unfinished shards this many seconds after the start (their partial results are kept)")
    parser.add_argument("--json", help="write the outcomes here")
    parser.add_argument("--warm-only", action="store_true",
                        help="only compile every case's first configs (fills Triton's on-disk cache for a later run) and exit")
    args = parser.parse_args(argv)
    dtypes = [DTYPES[d] for d in args.dtype]
    if args.warm_only:
        start = time.monotonic()
        warm(dtypes, args.case, args.rows)
        print(f"every-config warm: {len(args.case or CASES)} cases x {len(dtypes)} dtype(s) in {time.monotonic() - start:.0f} s")
        return 0
    if args.jobs > 1:
        start = time.monotonic()
        if not _triton.INTERPRET:  # compiled once here, not once per shard
            warm(dtypes, args.case, args.rows)
        forward = _strip(argv if argv is not None else sys.argv[1:], {"--jobs": 1, "--deadline": 1, "--json": 1, "--shard": 1})
        outcomes, notes = _parallel(forward, args.jobs, args.deadline, start)
    else:
        index, count = (int(v) for v in args.shard.split("/"))
        save = (lambda so_far: _write(args.json, so_far)) if args.json else None
        outcomes = run(dtypes, args.mode, args.case, args.limit, (index, count), args.rows, on_outcome=save)
        notes = []
    report = summary(outcomes)
    if args.json:
        _write(args.json, outcomes, {"notes": notes})
    for note in notes:
        print(f"NOTE {note}")
    for f in report["failures"]:
        print(f"FAILED {f['case']} {f['dtype']} {f['kernel']} {f['mode']} [{f['config']}]: {f['error']}")
    print(f"every-config check (shard {args.shard}, {args.jobs} job(s)): {report['checked']} runs, {report['failed']} failed; "
          f"kernels run: {', '.join(report['kernels'])}; not run: {', '.join(report['not_run']) or '-'}")
    return 1 if report["failed"] or notes else 0


def _strip(argv: list[str], options: dict[str, int]) -> list[str]:
    """``argv`` without the given options and their values (``--opt v`` or ``--opt=v``)."""
    out, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
        elif a.split("=")[0] in options:
            skip = 0 if "=" in a else options[a]
        else:
            out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
