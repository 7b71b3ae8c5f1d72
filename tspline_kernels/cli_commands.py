"""What ``tspline compress``, ``tspline compare`` and ``tspline plot FILE --layer NAME`` do
(``cli.py`` parses the arguments and turns the ValueError / OSError raised here into usage errors).

A compress source is a model directory (sentence-transformers: has ``modules.json``; Hugging Face
transformers: has ``config.json``), loaded offline, or a plain safetensors state dict (one file or
a ``*.safetensors.index.json`` with its shards), which has no architecture: every 2-D floating
``<name>.weight`` that ``include`` / ``exclude`` select (with ``<name>.bias`` if stored) is taken
as the weight ``(out_features, in_features)`` of an ``nn.Linear`` at module path ``<name>``, fitted
data-free, and written out one layer at a time (:class:`~tspline_kernels.files.StreamingWriter`).
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ._layers import CompressedLinear, fit_report
from .calibration import Calibration, calibrate, with_progress
from .compress import (DENSE, Auto, CompressionReport, Kronecker, LayerReport, LowRank, Spline, TensorTrain,
                       allocate, compress_, config_for)
from .fidelity import embed, fidelity, sentence_embedding, tokenized
from .files import (ModelMismatch, StreamingWriter, _filesystem, _read_header, load_compressed, open_compressed,
                    save_compressed)
from .heal import heal
from .surgery import _pattern, count_parameters

FORMATS = ("auto", "lowrank", "tt", "kronecker", "spline")
ST, HF, STATE_DICT = "sentence-transformers", "transformers", "safetensors"
_FLOATS = {"F64", "F32", "F16", "BF16"}


def source_kind(src: str) -> str:
    """``"sentence-transformers"``, ``"transformers"`` (model directories) or ``"safetensors"``."""
    p = Path(src)
    if p.is_dir():
        if (p / "modules.json").is_file():
            return ST
        if (p / "config.json").is_file():
            return HF
        raise ValueError(f"{src}: a model directory holds modules.json (sentence-transformers) or config.json "
                         "(Hugging Face); this one has neither")
    if not p.exists():
        raise FileNotFoundError(f"{src}: no such file or directory")
    if p.name.endswith((".safetensors", ".safetensors.index.json")):
        return STATE_DICT
    raise ValueError(f"{src}: expected a model directory, a .safetensors state dict or its .safetensors.index.json")


def _check_out(src: str, out: str) -> None:
    """Refuse an ``out`` that would overwrite or remove the source: inside a source directory, or
    beside a source file with the same stem (its shards and index share the stem's names)."""
    source, target = Path(src).resolve(), Path(out).resolve()
    inside = source.is_dir() and target.is_relative_to(source)
    if inside or (not source.is_dir() and target.parent == source.parent
                  and target.name.split(".")[0] == source.name.split(".")[0]):
        raise ValueError(f"--out {out} would overwrite the source {src}: write it elsewhere or under another name")


def load_model(src: str, kind: str) -> nn.Module:
    """The model in directory ``src`` on the CPU in eval mode, without network access."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if kind == ST:
            from sentence_transformers import SentenceTransformer

            return SentenceTransformer(str(src), device="cpu").eval()
        from transformers import AutoModel

        return AutoModel.from_pretrained(str(src)).eval()
    except ImportError as e:
        raise ImportError(f'loading {src} needs {e.name}: pip install "tspline-kernels[fidelity]"') from e


def read_texts(path: str, option: str) -> list[str]:
    """The non-empty lines of text file ``path`` (given as ``option``), stripped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{option} {path}: no such file")
    texts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"{option} {path}: the file holds no text (one text per line)")
    return texts


def make_config(fmt: str, ratio: float | None):
    """The ``compress_`` config of ``--format`` at ``--ratio`` (Kronecker has one size: no ratio)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "kronecker" and ratio is not None:
        raise ValueError("--format kronecker has one size per layer (the balanced factorisation of its "
                         "features): leave out --ratio")
    if fmt != "kronecker" and ratio is None:
        raise ValueError(f"--format {fmt} needs --ratio (dense / compressed parameters, > 1)")
    return config_for(fmt, ratio)


@dataclass(frozen=True)
class _Data:
    """How to calibrate and heal one kind of model on some texts."""

    calibration: object  # what tk.calibrate takes
    batches: list  # heal batches
    forward: Callable[[nn.Module, object], torch.Tensor]
    loss: str


def _data(model: nn.Module, src: str, kind: str, texts: list[str], batch_size: int = 32) -> _Data:
    """Sentence embeddings (cosine) for a sentence-transformers model; the last hidden state (mse)
    of a transformers model, tokenized by the directory's tokenizer."""
    if kind == ST:
        return _Data(lambda m: m.encode(texts, batch_size=batch_size, show_progress_bar=True),
                     tokenized(model, texts, batch_size), sentence_embedding, "cosine")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src))
    batches = [dict(tokenizer(texts[i:i + batch_size], padding=True, truncation=True, return_tensors="pt"))
               for i in range(0, len(texts), batch_size)]
    return _Data(batches, batches, lambda m, batch: m(**batch).last_hidden_state, "mse")


def compress(src: str, out: str, fmt: str, ratio: float | None = None, calib: str | None = None,
             heal_steps: int = 0, heal_lr: float = 1e-4, include: str | None = None, exclude: str | None = None,
             max_shard_size: str | int = "1GB", progress: bool = True) -> CompressionReport:
    """``tspline compress``: compress the Linears of ``src`` that ``include`` / ``exclude`` select,
    calibrated on the texts of ``calib`` (one per line) and healed for ``heal_steps`` on the same
    texts when given (only the compressed layers are trained), and write ``out`` with
    ``save_compressed``. Returns the report."""
    kind = source_kind(src)
    _check_out(src, out)
    config = make_config(fmt, ratio)
    if heal_steps < 0:
        raise ValueError(f"--heal-steps must be >= 0, got {heal_steps}")
    if not heal_lr > 0:
        raise ValueError(f"--heal-lr must be > 0, got {heal_lr}")
    if kind == STATE_DICT:
        if calib is not None or heal_steps:
            raise ValueError(f"{src} is a plain state dict, with no architecture to run: --calib and --heal-steps "
                             "need a model directory (data-free fits only here)")
        return compress_state_dict(src, out, config, include, exclude, max_shard_size, progress)
    if heal_steps and calib is None:
        raise ValueError("--heal-steps needs --calib (the texts to distil the original's outputs on)")
    texts = read_texts(calib, "--calib") if calib is not None else None
    model = load_model(src, kind)
    data = _data(model, src, kind, texts) if texts is not None else None
    teacher = copy.deepcopy(model) if heal_steps else None
    grams = calibrate(model, data.calibration, include, exclude, progress=progress) if data else None
    report = compress_(model, config, grams, include, exclude, progress=progress)
    if heal_steps:
        # only the compressed layers learn: the rest of the file stays the original's
        trainable = {id(p) for m in model.modules() if isinstance(m, CompressedLinear) for p in m.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
        print(heal(model, teacher, data.batches, heal_steps, heal_lr, forward=data.forward, loss=data.loss,
                   progress=progress))
        report = remeasured(report, model, teacher, grams)
    save_compressed(model, out, report, max_shard_size, progress=progress)
    return report


@torch.no_grad()
def remeasured(report: CompressionReport, model: nn.Module, original: nn.Module,
             calibration: Calibration | None = None) -> CompressionReport:
    """``report`` with the weight error of every compressed layer of ``model`` measured again
    against the Linear of ``original`` at its name, and its output error against the calibration's
    Gram (when given): what they are after healing changed the compressed weights."""
    rows = []
    for row in report.layers:
        if row.format == DENSE:
            rows.append(row)
            continue
        gram = None if calibration is None else calibration[row.name].gram
        fit = fit_report("healed", original.get_submodule(row.name).weight.detach(), model.get_submodule(row.name),
                         gram)
        rows.append(replace(row, weight_error=fit.relative_error, output_error=fit.output_error))
    return replace(report, layers=tuple(rows))


class StateDictReader:
    """A safetensors state dict (one file, or an index and its shards) read one tensor at a time:
    the headers are read up front (their bytes only), and at most one shard is open (memory mapped)
    at a time, plus briefly another when a tensor lives elsewhere."""

    def __init__(self, path: str) -> None:
        from safetensors import safe_open

        self._safe_open = safe_open
        p = Path(path)
        shards = [p]
        if p.name.endswith(".index.json"):
            try:
                weight_map = json.loads(p.read_text())["weight_map"]
                shards = list(dict.fromkeys(p.parent / name for name in weight_map.values()))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: bad index file: {e}") from None
        self.info: dict[str, tuple[Path, tuple[int, ...], str]] = {}  # key -> (shard, shape, dtype)
        for shard in shards:
            fs, root, _ = _filesystem(shard)
            if not fs.isfile(root):
                raise FileNotFoundError(f"{shard}: no such file (named by {path})")
            header, _ = _read_header(fs, root)
            self.info.update({key: (shard, tuple(entry["shape"]), entry["dtype"]) for key, entry in header.items()})
        self._open: tuple[Path | None, object] = (None, None)

    def get(self, key: str) -> torch.Tensor:
        """Tensor ``key`` from its shard (which becomes the open one), copied out of the mapping: a
        tensor safetensors returns keeps its whole shard mapped while it lives."""
        shard = self.info[key][0]
        if self._open[0] != shard:
            self.close()
            self._open = (shard, self._safe_open(shard, framework="pt"))
        return self._open[1].get_tensor(key).clone()

    def get_once(self, key: str) -> torch.Tensor:
        """Tensor ``key`` without changing the open shard (a bias stored apart from its weight)."""
        shard = self.info[key][0]
        if self._open[0] == shard:
            return self.get(key)
        with self._safe_open(shard, framework="pt") as f:
            return f.get_tensor(key).clone()

    def close(self) -> None:
        if self._open[1] is not None:
            self._open[1].__exit__(None, None, None)
        self._open = (None, None)

    def linears(self, include: str | None, exclude: str | None) -> dict[str, str | None]:
        """Module path -> its bias key (or None) of every 2-D floating ``<path>.weight`` selected."""
        inc, exc = _pattern("include", include), _pattern("exclude", exclude)
        found = {}
        for key, (_, shape, dtype) in self.info.items():
            name = key.removesuffix(".weight")
            if (name and name != key and len(shape) == 2 and dtype in _FLOATS
                    and (inc is None or inc.search(name)) and not (exc is not None and exc.search(name))):
                bias = self.info.get(f"{name}.bias")
                found[name] = f"{name}.bias" if bias is not None and bias[1] == shape[:1] else None
        return found


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding ``weight`` ``(out, in)`` and ``bias`` themselves (no copy)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


@torch.no_grad()
def compress_state_dict(src: str, out: str, config, include: str | None = None, exclude: str | None = None,
                        max_shard_size: str | int = "1GB", progress: bool = True) -> CompressionReport:
    """Data-free ``compress_`` of the Linear weights of a safetensors state dict (see the module
    docstring), streamed: one tensor is read at a time and the result written in shards of at most
    ``max_shard_size`` as it goes, so memory holds about one layer and one shard, not the model.
    ``Auto`` reads the layers twice: once for every layer's error curves, once to fit its pick."""
    start = time.perf_counter()
    source = StateDictReader(src)
    linears = source.linears(include, exclude)
    if not linears:
        raise ValueError(f"{src}: no 2-D '<name>.weight' tensor matches include={include!r}, exclude={exclude!r}")
    biases = {b for b in linears.values() if b is not None}
    rows = []
    try:
        plans = _auto_plans(source, linears, config, progress) if isinstance(config, Auto) else None
        with StreamingWriter(out, max_shard_size) as writer:
            for key in with_progress(list(source.info), progress, desc="compressing", unit="tensor"):
                name = key.removesuffix(".weight")
                if key in biases:
                    continue  # written with its weight
                if name == key or name not in linears:
                    writer.add(key, source.get(key))
                    continue
                bias = source.get_once(linears[name]) if linears[name] else None
                holder = nn.Module()
                holder.add_module("linear", _linear(source.get(key), bias))
                layer_config = plans[name] if plans is not None else config
                if layer_config is None:
                    rows.append(_kept_dense(name, holder.linear, config))
                else:
                    rows.append(replace(compress_(holder, layer_config, progress=False).layers[0], name=name))
                if isinstance(holder.linear, CompressedLinear):
                    writer.add_layer(name, holder.linear)
                else:
                    writer.add(key, holder.linear.weight)
                    if bias is not None:
                        writer.add(linears[name], bias)
            report = CompressionReport(tuple(rows), repr(config), time.perf_counter() - start)
            writer.close(report)
    finally:
        source.close()
    return report


def _auto_plans(source: StateDictReader, linears: dict[str, str | None], config: Auto, progress: bool) -> dict:
    """The first pass of a streamed Auto: every layer's candidates (format, size, weight error),
    one layer in memory at a time, then the global allocation of ``compress_``'s Auto. Layer name
    -> the one-format config that refits its pick in the second pass, or None where it stays dense."""
    options, dense = {}, 0
    for name, bias in with_progress(linears.items(), progress, desc="Auto: error curves", unit="layer"):
        linear = _linear(source.get(f"{name}.weight"), source.get_once(bias) if bias else None)
        options[name] = config._options(linear, None)
        dense += count_parameters(linear)
    chosen = allocate([[(params, error) for _, _, params, error in opts] for opts in options.values()],
                      dense / config.ratio)
    refit = {"lowrank": lambda spec: LowRank(rank=spec["rank"]), "spline": lambda spec: Spline(grid=spec["grid"]),
             "kronecker": lambda spec: Kronecker(spec["in_dims"], spec["out_dims"]),
             "tt": lambda spec: TensorTrain(max_rank=spec["max_rank"])}  # Auto's TT: TensorTrain's default modes
    plans = {}
    for (name, opts), k in zip(options.items(), chosen):
        family, spec, _, _ = opts[k]
        plans[name] = None if family is None else refit[family.name](spec)
    return plans


def _kept_dense(name: str, linear: nn.Linear, config: Auto) -> LayerReport:
    params = count_parameters(linear)
    return LayerReport(name, (linear.out_features, linear.in_features), DENSE,
                       f"kept dense: Auto keeps it dense ({config.ratio:g}x budget)", params, params, 0.0, None, 0.0)


def compare(original: str, compressed: str, texts_file: str, batch_size: int = 32) -> dict[str, float]:
    """``tspline compare``: mean and min cosine between the sentence embeddings of ``original`` (a
    sentence-transformers directory) and of it with ``compressed`` loaded, and nearest-neighbour
    agreement, on the texts of ``texts_file`` (one per line, at least 2)."""
    texts = read_texts(texts_file, "--texts")
    if len(texts) < 2:
        raise ValueError(f"--texts {texts_file}: nearest-neighbour agreement needs at least 2 texts, got 1")
    open_compressed(compressed).close()  # a missing or unreadable file is named before the model loads
    kind = source_kind(original)
    if kind != ST:
        raise ValueError(f"{original}: compare measures sentence embeddings; ORIGINAL must be a "
                         "sentence-transformers model directory (with modules.json)")
    model = load_model(original, kind)
    reference = embed(model, texts, batch_size)
    try:
        load_compressed(model, compressed, progress=True)
    except ModelMismatch as e:
        raise ValueError(f"{compressed} does not fit {original}: {e.detail}; compare a file compressed from "
                         "this model (tspline compress ORIGINAL --out FILE ...)") from None
    return {**fidelity(reference, embed(model, texts, batch_size)), "texts": len(texts)}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError('plotting needs matplotlib: pip install "tspline-kernels[bench]"') from None
    return plt


def layer_png(path: str, name: str) -> Path:
    """The default picture path of layer ``name`` of file ``path``: ``<stem>.<name>.png`` beside it."""
    p = Path(path)
    folder, stem = (p, "model") if p.is_dir() else (p.parent, p.name.split(".")[0])
    return folder / f"{stem}.{name}.png"


def plot_bench(path: str, out: str | None = None) -> Path:
    """``tspline plot BENCH.json``: the speed-up charts of a ``tspline bench`` JSON file (checked
    first: a JSON object with a non-empty ``rows`` list and ``meta``), written to ``out``."""
    from .bench.plot import main

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"it holds a JSON {type(data).__name__}, not an object")
        rows, meta = data.get("rows"), data.get("meta")
        if not (isinstance(rows, list) and rows and isinstance(meta, dict)):
            raise ValueError("it has no 'meta' object and non-empty 'rows' list")
        keys = {"kernel", "mode", "shape", "dtype", "speedup"}
        if not all(isinstance(r, dict) and keys <= r.keys() and isinstance(r["shape"], dict) for r in rows):
            raise ValueError(f"a row lacks one of {sorted(keys)}")
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError too
        raise ValueError(f"{path} is not a bench results file (JSON written by tspline bench): {e}; to draw a "
                         "layer of a compressed model file, add --layer NAME") from None
    return main(path, out)


@torch.no_grad()
def plot_layer(path: str, name: str, out: str | None = None) -> Path:
    """``tspline plot FILE --layer NAME``: one compressed layer as a PNG. Splines: the control grid
    heat map; low rank: the singular values of its weight with the kept rank marked; tensor trains:
    the TT ranks and each core's norm; other layers: the singular values of their weight (a layer
    that is not one linear map, such as a DecoupledSplineMLP, raises ValueError)."""
    from .spline import HierarchicalSplineLinear, SplineLinear
    from .tt.module import TTStructured

    with open_compressed(path) as f:
        try:
            layer = f.load_layer(name)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
    plt = _pyplot()
    title = f"{name}: {type(layer).__name__} {layer.out_features}x{layer.in_features}, {layer._structure()}"
    grids = []
    if isinstance(layer, SplineLinear) and layer.control.dim() == 2:
        grids = [("control grid", layer.control)]
    elif isinstance(layer, HierarchicalSplineLinear):
        grids = [("coarse control grid", layer.control_coarse), ("fine control grid", layer.control_fine)]
    if grids:
        fig, axes = plt.subplots(1, len(grids), figsize=(6 * len(grids), 5), squeeze=False)
        for ax, (label, grid) in zip(axes[0], grids):
            im = ax.imshow(grid.float().cpu().numpy(), cmap="RdBu_r", aspect="auto")
            ax.set(title=f"{label} {tuple(grid.shape)}", xlabel="input control point", ylabel="output control point")
            fig.colorbar(im, ax=ax)
    elif isinstance(layer, TTStructured):
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
        left.bar(range(len(layer.ranks)), layer.ranks, color="tab:blue")
        left.set(title="TT ranks (bond k between cores k-1 and k)", xlabel="bond", ylabel="rank")
        norms = [torch.linalg.vector_norm(c.double()).item() for c in layer._factors()]
        right.bar(range(len(norms)), norms, color="tab:orange")
        right.set(title="core Frobenius norms", xlabel="core", ylabel="norm")
        for ax in (left, right):
            ax.set_xticks(range(len(layer.ranks) if ax is left else len(norms)))
    else:
        try:
            weight = layer.materialize()
        except (NotImplementedError, RuntimeError):  # DecoupledSplineMLP; a gated KroneckerLinear
            raise ValueError(f"layer {name!r} is a {type(layer).__name__}, which has no weight matrix to draw "
                             "(it is not one linear map)") from None
        fig, ax = plt.subplots(figsize=(8, 4.5))
        values = torch.linalg.svdvals(weight.double()).cpu().numpy()
        ax.semilogy(range(1, len(values) + 1), values, marker=".", markersize=3)
        ax.set(title="singular values of the weight", xlabel="index", ylabel="singular value")
        rank = getattr(layer, "rank", None)
        if isinstance(rank, int):
            ax.axvline(rank, color="tab:red", linestyle="--", label=f"kept rank {rank}")
            ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    target = Path(out) if out else layer_png(path, name)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target
