"""``tspline bench``: run every family's cases, check the stated targets, write one JSON file.

The file is named by device and commit (``bench/results/<device>-<commit>[-dirty].json``) and an
existing file is never overwritten (``-2``, ``-3``, ... are added). It is rewritten after each
family, so a run cut short keeps what it measured; a family that fails is recorded in
``meta.errors`` and the others still run.
"""

from __future__ import annotations

import importlib
import re
import time
import traceback
from pathlib import Path

import torch

from .harness import device_name, free_path, git_state, launch_floor, measure, measure_peaks, metadata, write_json

FAMILIES = ["lowrank", "kronecker", "tt", "spline"]  # cheapest goal rows first: a run cut by its deadline keeps them
# not kernel families: compressed MiniLM's fidelity (bench/fidelity.py), its MLP blocks decoupled
# (bench/decoupling.py) and every layer's host overhead (bench/host_overhead.py), each run alone
# with its own JSON
STANDALONE = ("fidelity", "decoupling", "host_overhead")


def default_out(device: str, goal: bool = False, tiny: bool = False) -> Path:
    """``bench/results/<device slug>-<commit>[-dirty][-goal][-tiny].json`` (not checked for existence)."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    commit, dirty = git_state()
    tags = "".join(f"-{t}" for t, on in (("dirty", dirty), ("goal", goal), ("tiny", tiny)) if on)
    return Path("bench/results") / f"{slug}-{commit}{tags}.json"


def warm(shard: int, shards: int, quick: bool = False, only: list[str] | None = None, goal: bool = False,
         tiny: bool = False) -> None:
    """Call every callable of each ``shards``-th case from case ``shard`` on (ours, dense and the
    other baselines) once: their Triton kernels compile and autotune, ``torch.compile`` baselines
    compile, nothing is timed or written. Triton's and Inductor's on-disk caches keep the binaries,
    so parallel warm processes (``bench/gpu_check.sh``) shorten a timed run of the same cases that
    follows; its autotuning then benchmarks compiled configs only. A failing callable is reported
    and the rest still run; raises SystemExit(1) at the end if one failed."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    families = only or FAMILIES
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise SystemExit(f"unknown benchmark families for --warm {unknown}; choose from {FAMILIES}")
    index, failed = 0, 0
    for name in families:
        module = importlib.import_module(f"{__package__}.{name}")
        for case in module.goal_cases(device, tiny) if goal else module.cases(device, quick):
            index += 1
            if (index - 1) % shards != shard:
                continue
            start = time.monotonic()
            for label, step in (("ours", case.run), ("dense", case.dense), *case.others.items()):
                try:
                    step()
                    if device == "cuda":
                        torch.cuda.synchronize()
                except Exception:
                    failed += 1
                    print(f"FAILED warm {case.kernel} {case.mode} {case.shape} {label}:\n{traceback.format_exc()}")
            print(f"warm {case.kernel:<26} {case.mode:<8} {str(case.shape):<44} {time.monotonic() - start:6.1f} s",
                  flush=True)
    if failed:
        raise SystemExit(1)


def main(quick: bool = False, out: str | None = None, only: list[str] | None = None, goal: bool = False,
         tiny: bool = False, deadline: float | None = None) -> Path:
    """Benchmark ``only`` (default: every family): every case (``quick``: a subset), or with
    ``goal`` only the rows the GPU targets read (``tiny``: at smoke-test sizes). ``out``: the file,
    or a folder for the default name. ``deadline``: seconds after the start past which no new row
    starts (those left are listed in ``meta.not_run``). Returns the path written; raises
    SystemExit(1) after writing it if a family failed."""
    start = time.monotonic()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    families = only or FAMILIES
    unknown = sorted(set(families) - set(FAMILIES) - set(STANDALONE))
    if unknown:
        raise SystemExit(f"unknown benchmark families {unknown}; choose from {FAMILIES + list(STANDALONE)}")
    alone = [f for f in families if f in STANDALONE]
    if alone:
        if len(families) > 1:
            raise SystemExit(f"--only {alone[0]} runs alone (it writes its own JSON)")
        return importlib.import_module(f"{__package__}.{alone[0]}").main(quick=quick, out=out)
    path = default_out(device, goal, tiny)
    if out:  # a folder (existing, or named with a trailing /) takes the default file name
        path = Path(out) / path.name if out.endswith("/") or Path(out).is_dir() else Path(out)
    path = free_path(path)
    print(f"== peaks and launch floor on {device_name(device)}")
    peaks, floor = measure_peaks(device, tiny), launch_floor(device)
    print("  " + ", ".join(f"{k} {v:.4g}" for k, v in {**peaks, **floor}.items()))
    extra = {**metadata(device), "quick": quick, "goal": goal, "tiny": tiny, "families": families, "peaks": peaks,
             "launch_floor": floor, "errors": {}, "deadline_s": deadline, "not_run": []}
    # metadata taken once: commit and dirty flag as the run began
    rows, targets = [], []

    def show(family_targets: list[dict]) -> None:  # printed per family: a stage cut later keeps them
        for t in family_targets:
            state = {True: "met", False: "NOT met", None: "not measured here"}[t["met"]]
            value = "-" if t["measured"] is None else f"{t['measured']:.3g}"
            guess = "" if t.get("predicted") is None else \
                f"; PREDICTED {t['predicted']:.3g}" + (", not measured" if t["measured"] is None else "") + \
                ": bench/NOTES.md's estimate for an H200"
            print(f"  [{state:>17}] {t['target']}: {value} (threshold {t['threshold']}{guess})", flush=True)

    for name in families:
        module = importlib.import_module(f"{__package__}.{name}")
        print(f"== {name} on {device_name(device)}")
        try:
            family_rows = []
            for case in (module.goal_cases(device, tiny) if goal else module.cases(device, quick)):
                elapsed = time.monotonic() - start
                if deadline is not None and elapsed > deadline:
                    extra["not_run"].append(f"{case.kernel} {case.mode} {case.shape}")
                    print(f"  not run (past the {deadline:g} s deadline): {case.kernel} {case.mode} {case.shape}")
                    continue
                family_rows += measure([case], device, peaks=peaks, floor=floor,
                                       progress=lambda line, t=elapsed: print(f"[{t:5.0f} s] {line}"))
                write_json(path, device, rows + family_rows, targets, extra)
            rows += family_rows
            family_targets = module.targets(family_rows, device, quick)  # GPU goals are measured on CUDA only
            targets += family_targets
            print(f"== {name} targets (benchmarks, not tests)")
            show(family_targets)
        except Exception:  # keep going: the other families' numbers are still worth having
            extra["errors"][name] = traceback.format_exc()
            print(f"FAILED {name}:\n{extra['errors'][name]}")
        write_json(path, device, rows, targets, extra)
    print("\n== targets (benchmarks, not tests)")
    show(targets)
    print(f"\nwrote {path}")
    if extra["errors"]:
        raise SystemExit(1)
    return path
