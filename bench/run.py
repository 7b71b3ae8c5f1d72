"""``tspline bench``: run every family's cases, check the stated targets, write one JSON file."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch

from .harness import device_name, measure, write_json

FAMILIES = ["spline", "lowrank", "tt", "kronecker"]


def default_out(device: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return Path("bench/results") / f"{slug}.json"


def main(quick: bool = False, out: str | None = None, only: list[str] | None = None) -> Path:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    families = only or FAMILIES
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise SystemExit(f"unknown benchmark families {unknown}; choose from {FAMILIES}")
    rows, targets = [], []
    for name in families:
        module = importlib.import_module(f"{__package__}.{name}")
        print(f"== {name} on {device_name(device)}")
        family_rows = measure(module.cases(device, quick), device)
        rows += family_rows
        targets += module.targets(family_rows, device, quick)
    path = Path(out) if out else default_out(device)
    write_json(path, device, rows, targets, {"quick": quick, "families": families})
    print("\n== targets (benchmarks, not tests)")
    for t in targets:
        state = {True: "met", False: "NOT met", None: "not measured here"}[t["met"]]
        value = "-" if t["measured"] is None else f"{t['measured']:.3g}"
        print(f"  [{state:>17}] {t['target']}: {value} (threshold {t['threshold']})")
    print(f"\nwrote {path}")
    return path
