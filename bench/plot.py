"""``tspline plot FILE.json``: speed-up over dense F.linear, one panel per (kernel family, mode)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def main(path: str, out: str | None = None) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit('plotting needs matplotlib: pip install "tspline-kernels[bench]"') from None
    data = json.loads(Path(path).read_text())
    panels = defaultdict(list)
    for r in data["rows"]:
        panels[(r["kernel"].split(".")[0], r["mode"])].append(r)
    keys = sorted(panels)
    fig, axes = plt.subplots(len(keys), 1, figsize=(12, 3.2 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        rows = panels[key]
        labels = [f"{r['kernel'].split('.', 1)[-1]} {r['shape'].get('in')}/{r['shape']['M']} {r['dtype'][:4]}" for r in rows]
        speedups = [r["speedup"] for r in rows]
        ax.bar(range(len(rows)), speedups, color=["tab:green" if s >= 1 else "tab:red" for s in speedups])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
        ax.set_ylabel("speed-up vs dense")
        ax.set_title(f"{key[0]} {key[1]}  ({data['meta']['device']}, {data['meta']['commit']})")
    fig.tight_layout()
    target = Path(out) if out else Path(path).with_suffix(".png")
    fig.savefig(target, dpi=120)
    print(f"wrote {target}")
    return target
