"""Host overhead of a git revision against the working tree, from alternating runs.

Single runs of ``bench.host_overhead`` spread by up to ~20% between processes on a small shared
CPU (the same code measured 150-181 us for TT 16^3 fwd+bwd), more than most host-side changes
move. ``python -m bench.host_compare REV [--layers ...] [--runs N]`` runs the bench alternately in
a temporary worktree of REV and in the working tree, N times each, and prints per layer the
minimum and median host time of each side, fwd and fwd+bwd, and the change of the minima. The
worktree's ``tspline_kernels/reference`` links to its own ``reference/``: through the editable
install both sides would otherwise import the working tree's reference. Nothing is written to
``bench/results``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .host_overhead import GRAD_MODE, LAYERS

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def _run(tree: Path, layers: list[str], out: Path) -> dict[str, dict[str, float]]:
    """One bench process in ``tree``: layer -> mode -> host us."""
    subprocess.run([sys.executable, "-m", "bench.host_overhead", "--out", str(out), "--layers", *layers],
                   cwd=tree, check=True, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    return {r["layer"]: {mode: r[f"{mode}_host_us"] for mode in GRAD_MODE} for r in rows if r["layer"] in layers}


def summarize(runs: dict[str, list[dict[str, dict[str, float]]]]) -> list[str]:
    """Lines of the comparison table from each side's runs (side -> [layer -> mode -> us])."""
    base, head = runs["base"], runs["head"]
    lines = [f"{'layer':<34} {'mode':<8} {'base min':>8} {'median':>8} {'head min':>8} {'median':>8} {'change':>7}"]
    for layer in base[0]:
        for mode in GRAD_MODE:
            b = [r[layer][mode] for r in base]
            h = [r[layer][mode] for r in head]
            lines.append(f"{layer:<34} {mode:<8} {min(b):8.1f} {statistics.median(b):8.1f} {min(h):8.1f} "
                         f"{statistics.median(h):8.1f} {min(h) - min(b):+7.1f}")
    return lines


def compare(rev: str, layers: list[str], runs: int) -> list[str]:
    """Alternating bench runs of ``rev`` (a temporary worktree) and the working tree."""
    sha = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    results: dict[str, list] = {"base": [], "head": []}
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "base"
        _git("worktree", "add", "--detach", str(tree), sha)
        try:
            (tree / "tspline_kernels" / "reference").symlink_to(tree / "reference")
            for k in range(runs):
                for side, where in (("base", tree), ("head", ROOT)):
                    results[side].append(_run(where, layers, Path(tmp) / f"{side}-{k}.json"))
                    print(f"run {k + 1}/{runs} {side} done", file=sys.stderr)
        finally:
            _git("worktree", "remove", "--force", str(tree))
    return [f"base {sha[:7]} against the working tree, {runs} alternating runs each (host us)"] + summarize(results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the git revision to compare against (a commit, branch or tag)")
    parser.add_argument("--layers", nargs="+", choices=list(LAYERS), metavar="LAYER", default=list(LAYERS),
                        help="only these layers (default: all)")
    parser.add_argument("--runs", type=int, default=3, help="bench processes per side (default 3)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    print("\n".join(compare(args.rev, args.layers, args.runs)))
