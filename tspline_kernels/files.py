"""Compressed model files: safetensors with the layers' structure, a SHA-256 per tensor and the
compression report, loaded without the dense weights.

Layout: one ``*.safetensors`` file, or (past ``max_shard_size``) shards ``<stem>-00001-of-0000N.safetensors``
beside a Hugging Face style ``<path>.index.json`` (``{"metadata": {...}, "weight_map": {tensor: shard}}``).
Tensor names are the model's state-dict keys (module paths). The JSON document (in the file's
``__metadata__["tspline"]``, or the index's ``metadata["tspline"]``) holds the format version, the
package version, every compressed layer's class and constructor arguments, each tensor's dtype,
shape and SHA-256 (of its bytes as stored), tied tensors (``aliases``), which tensors are buffers
(``buffers``; null from a streamed state dict, which cannot tell) and the report. Storage goes
through fsspec, so a path may be any fsspec URL. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ._layers import CompressedLinear, check_flag
from .calibration import with_progress
from .compress import Absorbed, put_module
from .surgery import _pattern

FORMAT = "tspline-compressed"
FORMAT_VERSION = 1
INDEX_SUFFIX = ".index.json"
_KEY = "tspline"
_SHARD_KEY = "tspline_shard_of"
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _version() -> str:
    from . import __version__  # at call time: the package imports this module before defining it

    return __version__


class IntegrityError(ValueError):
    """A tensor's bytes, dtype or shape differ from what ``save_compressed`` recorded."""


def _need(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ImportError(f"compressed model files need {module.split('.')[0]}: "
                          "pip install 'tspline-kernels[files]'") from None


def _filesystem(path) -> tuple[object, str, bool]:
    """(fsspec filesystem, path within it, whether it is the local disk) for a path or URL."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str, os.PathLike or fsspec URL, got {type(path).__name__}")
    fsspec = _need("fsspec")
    fs, root = fsspec.core.url_to_fs(os.fspath(path))
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return fs, root, "file" in protocols or "local" in protocols


def _sha256(t: torch.Tensor) -> str:
    """SHA-256 of ``t``'s bytes in row-major order (what safetensors stores, little-endian)."""
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy()).hexdigest()


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _class_key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _call(cls: type, init_args: Mapping, **extra):
    """``cls(...)`` with the recorded ``init_args`` (see ``CompressedLinear``): positional-only
    parameters, ``*args`` and the parameters before it by position, ``**kwargs`` spread."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    star = next((k for k, p in enumerate(params) if p.kind is p.VAR_POSITIONAL), -1)
    args, kwargs = [], {}
    for k, p in enumerate(params):
        if p.name not in init_args:
            continue
        value = init_args[p.name]
        if p.kind is p.VAR_POSITIONAL:
            args.extend(value)
        elif p.kind is p.VAR_KEYWORD:
            kwargs.update(value)
        elif p.kind is p.POSITIONAL_ONLY or k < star:
            args.append(value)
        else:
            kwargs[p.name] = value
    return cls(*args, **kwargs, **extra)


def _known_classes() -> dict[str, type]:
    """Every CompressedLinear subclass imported so far (the package imports all of its own)."""
    found, todo = {}, [CompressedLinear]
    while todo:
        for sub in todo.pop().__subclasses__():
            found[_class_key(sub)] = sub
            todo.append(sub)
    return found


def _shard_bytes(value) -> int | None:
    """``max_shard_size`` in bytes: an int, or a string such as "500MB" or "2GiB"."""
    if value is None:
        return None
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"max_shard_size must be bytes (int) or a size such as '500MB' or '2GiB', got {value!r}")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    elif isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"max_shard_size must be an int (bytes), a size string or None, got {value!r}")
    if value < 1:
        raise ValueError(f"max_shard_size must be at least 1 byte, got {value}")
    return value


def _report_json(report) -> dict | None:
    if report is None:
        return None
    data = report.to_json() if hasattr(report, "to_json") else report
    if isinstance(data, str):
        data = json.loads(data)
    if not isinstance(data, Mapping):
        raise TypeError(f"report must be a mapping or have to_json() (a compression report), "
                        f"got {type(report).__name__}")
    return dict(data)


def _owner_in(key: str, names) -> str | None:
    """The member of ``names`` that is a proper module-path prefix of ``key`` (``"a.b"`` of
    ``"a.b.U"``), or None."""
    parts = key.split(".")
    return next((p for p in (".".join(parts[:k]) for k in range(1, len(parts))) if p in names), None)


def _outermost_compressed(model: nn.Module) -> dict[str, CompressedLinear]:
    """Qualified name -> compressed layer, skipping those nested inside another compressed layer;
    a layer reached by several paths (shared) is listed at each."""
    found: dict[str, CompressedLinear] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, CompressedLinear) and _owner_in(name, found) is None:
            if name == "":
                raise ValueError("save_compressed takes a model that contains compressed layers; the model "
                                 f"itself is a {type(m).__name__} (wrap it, e.g. in nn.Sequential)")
            found[name] = m
    return found


def _absorbed(model: nn.Module, layers: Mapping[str, CompressedLinear]) -> dict[str, dict[str, Absorbed]]:
    """Layer path -> {path: its :class:`Absorbed` identity} for the layers of ``layers`` that
    replaced a whole MLP block (the first path holding the layer, when it is shared)."""
    first = {}
    for name, layer in layers.items():
        first.setdefault(id(layer), name)
    found: dict[str, dict[str, Absorbed]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, Absorbed) and id(m.layer) in first:
            found.setdefault(first[id(m.layer)], {})[path] = m
    return found


def _layer_record(name: str, layer: CompressedLinear, absorbed: Mapping[str, Absorbed] | None = None) -> dict:
    """What the metadata holds of compressed ``layer`` at ``name``; with ``absorbed`` (the
    identities left where the rest of the block it replaced was), their places by role and the
    block's dense parameter count."""
    args = getattr(layer, "init_args", None)
    if not isinstance(args, dict):
        raise ValueError(f"layer {name!r} ({type(layer).__name__}) has no recorded constructor arguments (init_args)")
    for key, value in args.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise TypeError(f"layer {name!r} ({type(layer).__name__}): argument {key}={value!r} cannot be "
                            "recorded in JSON") from None
    record = {"class": _class_key(type(layer)), "init_args": args, "in_features": layer.in_features,
              "out_features": layer.out_features, "params": layer.num_parameters(),
              "dense_params": layer.dense_parameters()}
    if absorbed:
        record["absorbs"] = {m.role: path for path, m in absorbed.items()}
        record["dense_params"] = next(iter(absorbed.values())).block_params
    return record


def _tensors_to_write(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(name -> CPU tensor to store, alias -> stored name) from ``model.state_dict()``: a tensor
    tied to an earlier one (same storage, offset, shape and strides) is stored once."""
    tensors, aliases, seen, storages = {}, {}, {}, set()
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state-dict entry {name!r} is a {type(t).__name__}: safetensors stores tensors only")
        if t.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device: there is no data to save")
        if type(t).__name__ == "DTensor":
            raise ValueError(f"tensor {name!r} is a DTensor shard (a model wrapped by FSDP2 or tensor "
                             "parallelism): save a distributed checkpoint and load it into one process, "
                             "then save_compressed that model (see the README's distributed recipe)")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        ptr = t.untyped_storage().data_ptr()
        t = t.detach().cpu().contiguous()
        if t.numel() and ptr in storages:
            t = t.clone()  # overlaps another tensor without being it: stored on its own
        seen[key] = name
        storages.add(ptr)
        tensors[name] = t
    return tensors, aliases


def _shards(tensors: Mapping[str, torch.Tensor], limit: int | None) -> list[list[str]]:
    groups, size = [[]], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if limit is not None and groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return groups


def _sibling(root: str, name: str) -> str:
    """File ``name`` in the folder of ``root`` (a path within an fsspec filesystem)."""
    return root[:root.rfind("/") + 1] + name


def save_compressed(model: nn.Module, path, report=None, max_shard_size=None, *, progress: bool = False) -> list[str]:
    """Write ``model.state_dict()`` with its compressed layers' structure to ``path`` (a file path or
    fsspec URL; ``*.safetensors`` by convention). ``report``: a compression report (anything with
    ``to_json()``, or a dict), stored in the metadata. ``max_shard_size`` (bytes, or "500MB") splits
    the tensors into shards beside ``path + ".index.json"``. Returns the paths written.

    Every compressed layer (``tk.CompressedLinear``, outermost only; a shared one at each path) is
    recorded by class and the constructor arguments it was built with (``layer.init_args``), one
    that replaced a whole MLP block (``Decoupled``) with the places of the block's activation and
    second Linear; every tensor by dtype, shape and SHA-256. Tied tensors are stored once. A
    previous file or index at ``path`` is replaced."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    st = _need("safetensors.torch")
    limit = _shard_bytes(max_shard_size)
    fs, root, _ = _filesystem(path)
    _check_previous(fs, root)
    compressed = _outermost_compressed(model)
    absorbed = _absorbed(model, compressed)
    layers = {name: _layer_record(name, m, absorbed.get(name)) for name, m in compressed.items()}
    tensors, aliases = _tensors_to_write(model)
    records = {name: {"dtype": _dtype_name(t), "shape": list(t.shape), "sha256": _sha256(t)}
               for name, t in with_progress(tensors.items(), progress, desc="checksums", total=len(tensors))}
    doc = _doc(layers, records, aliases, report, _buffer_keys(model, {*tensors, *aliases}))
    groups = _shards(tensors, limit)
    if "/" in root.strip("/"):
        fs.makedirs(root[:root.rfind("/")], exist_ok=True)
    if len(groups) == 1:
        _write(fs, root, st.save(tensors, {"format": "pt", _KEY: json.dumps(doc)}))
        _remove_previous(fs, root, keep={root})
        return [root]
    stem = root[root.rfind("/") + 1:].removesuffix(".safetensors")
    names = [f"{stem}-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    index_name = root[root.rfind("/") + 1:] + INDEX_SUFFIX
    for shard, group in with_progress(list(zip(names, groups)), progress, desc="shards"):
        _write(fs, _sibling(root, shard), st.save({n: tensors[n] for n in group},
                                                  {"format": "pt", _SHARD_KEY: index_name}))
    written = [_sibling(root, n) for n in names]
    _remove_previous(fs, root, keep=set(written))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_index(fs, root, doc, total, {n: shard for shard, group in zip(names, groups) for n in group})
    return written + [root + INDEX_SUFFIX]


def _buffer_keys(model: nn.Module, keys: set[str]) -> list[str]:
    """Which of the state-dict ``keys`` are ``model``'s buffers (running statistics, position ids):
    tensors that are not parameters, which ``inspect`` counts apart."""
    return [name for name, _ in model.named_buffers(remove_duplicate=False) if name in keys]


def _doc(layers: dict, records: dict, aliases: dict, report, buffers: list[str] | None) -> dict:
    """The JSON document a file's metadata holds (see the module docstring); ``buffers``: the
    buffers' keys, None where the writer cannot tell them from parameters (a streamed state dict)."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "package_version": _version(),
            "layers": layers, "tensors": records, "aliases": aliases, "report": _report_json(report),
            "buffers": buffers}


def _write_index(fs, root: str, doc: dict, total: int, weight_map: dict[str, str]) -> None:
    index = {"metadata": {"total_size": total, _KEY: doc}, "weight_map": weight_map}
    _write(fs, root + INDEX_SUFFIX, json.dumps(index, indent=1).encode())


def _write(fs, path: str, data: bytes) -> None:
    with fs.open(path, "wb") as f:
        f.write(data)


def _check_previous(fs, root: str) -> None:
    """Refuse to save at ``root`` when an index beside it was not written by tspline-kernels (a
    Hugging Face checkpoint's): replacing it would delete that index and every shard it names."""
    index = root + INDEX_SUFFIX
    if not fs.isfile(index):
        return
    try:
        ours = _KEY in json.loads(fs.cat_file(index))["metadata"]
    except (ValueError, KeyError, TypeError):
        ours = False
    if not ours:
        raise FileExistsError(f"{index} exists and was not written by tspline-kernels: saving to {root} would "
                              "delete it and the shards it names; choose another path")


def _remove_previous(fs, root: str, keep: set[str]) -> None:
    """Remove what a previous save left at ``root`` (the file, or the index and its shards) and
    the new save did not overwrite (``keep``)."""
    if root not in keep and fs.isfile(root):
        fs.rm(root)
    index = root + INDEX_SUFFIX
    if fs.isfile(index):
        try:
            shards = set(json.loads(fs.cat_file(index))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            shards = set()
        for shard in shards:
            old = _sibling(root, shard) if isinstance(shard, str) and "/" not in shard else None
            if old is not None and old not in keep and fs.isfile(old):
                fs.rm(old)
        fs.rm(index)


class StreamingWriter:
    """What :func:`save_compressed` writes, for a model that is never whole in memory: tensors and
    compressed layers are added one at a time and buffered until ``max_shard_size`` bytes (an int
    or a size such as "500MB"), then written out as a shard, so memory holds at most one shard.

    ``close(report)`` writes the metadata: one file at ``path`` when everything fit in one shard,
    else the shards (``<stem>-00001-of-0000N.safetensors``) beside ``path + ".index.json"``; what a
    previous save left at ``path`` is replaced only then. As a context manager, a clean exit closes
    the writer where ``close`` was not called (no report), and an exception inside it removes the
    shards written so far (``abort``)."""

    def __init__(self, path, max_shard_size="1GB") -> None:
        self._st = _need("safetensors.torch")
        self._limit = _shard_bytes(max_shard_size)
        if self._limit is None:
            raise ValueError("max_shard_size must be given: it bounds the memory the writer holds")
        self._fs, self._root, _ = _filesystem(path)
        _check_previous(self._fs, self._root)
        self._stem = self._root[self._root.rfind("/") + 1:].removesuffix(".safetensors")
        self._layers: dict[str, dict] = {}
        self._records: dict[str, dict] = {}
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0
        self._shards: list[tuple[str, list[str]]] = []  # (temporary file, its tensors)
        self.total = 0  # bytes of tensor data added
        self.closed = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Store ``tensor`` under the state-dict key ``name``."""
        if self.closed:
            raise RuntimeError("the writer is closed: nothing more can be added")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r} must be a torch.Tensor, got {type(tensor).__name__}")
        if name in self._records:
            raise ValueError(f"tensor {name!r} was already added")
        t = tensor.detach().cpu().contiguous()
        size = t.numel() * t.element_size()
        if self._buffer and self._buffered + size > self._limit:
            self._flush()
        self._records[name] = {"dtype": _dtype_name(t), "shape": list(t.shape), "sha256": _sha256(t)}
        self._buffer[name] = t
        self._buffered += size
        self.total += size

    def add_layer(self, name: str, layer: CompressedLinear) -> None:
        """Record compressed ``layer`` at module path ``name`` and store its state dict."""
        if not isinstance(layer, CompressedLinear):
            raise TypeError(f"layer {name!r} must be a compressed layer, got {type(layer).__name__}")
        if not name or name in self._layers:
            raise ValueError(f"layer name {name!r} is empty or was already added")
        self._layers[name] = _layer_record(name, layer)
        for key, t in layer.state_dict().items():
            self.add(f"{name}.{key}", t)

    def _flush(self) -> None:
        if not self._shards and "/" in self._root.strip("/"):
            self._fs.makedirs(self._root[:self._root.rfind("/")], exist_ok=True)
        tmp = _sibling(self._root, f"{self._stem}.partial-{len(self._shards) + 1:05d}.safetensors")
        index_name = self._root[self._root.rfind("/") + 1:] + INDEX_SUFFIX
        _write(self._fs, tmp, self._st.save(self._buffer, {"format": "pt", _SHARD_KEY: index_name}))
        self._shards.append((tmp, list(self._buffer)))
        self._buffer, self._buffered = {}, 0

    def close(self, report=None) -> list[str]:
        """Write what is buffered and the metadata (``report`` as for :func:`save_compressed`).
        Returns the paths written."""
        if self.closed:
            raise RuntimeError("the writer is closed already")
        self.closed = True
        doc = _doc(self._layers, self._records, {}, report, None)
        fs, root = self._fs, self._root
        if not self._shards:
            if "/" in root.strip("/"):
                fs.makedirs(root[:root.rfind("/")], exist_ok=True)
            _write(fs, root, self._st.save(self._buffer, {"format": "pt", _KEY: json.dumps(doc)}))
            _remove_previous(fs, root, keep={root})
            return [root]
        if self._buffer:
            self._flush()
        n = len(self._shards)
        names = [f"{self._stem}-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        written = [_sibling(root, name) for name in names]
        weight_map = {t: name for name, (_, group) in zip(names, self._shards) for t in group}
        for (tmp, _), final in zip(self._shards, written):
            fs.mv(tmp, final)
        self._shards = []
        _remove_previous(fs, root, keep=set(written))
        _write_index(fs, root, doc, self.total, weight_map)
        return written + [root + INDEX_SUFFIX]

    def abort(self) -> None:
        """Remove the shards written so far and drop the buffer."""
        for tmp, _ in self._shards:
            if self._fs.isfile(tmp):
                self._fs.rm(tmp)
        self._shards, self._buffer = [], {}

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()
        elif not self.closed:
            self.close()


# ---- reading -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor: dtype name (``"float32"``), shape, SHA-256 and the shard holding it."""

    dtype: str
    shape: tuple[int, ...]
    sha256: str
    shard: str


@dataclass(frozen=True)
class LayerInfo:
    """One compressed layer as recorded: its module path, class, constructor arguments, dense
    ``shape`` ``(out_features, in_features)``, parameter counts (``dense_params``: of what it
    replaced, a whole MLP block for a ``Decoupled`` one) and the report's errors for it.
    ``absorbs``: role ("activation", "second") -> module path, for a layer that replaced a whole
    block; ``shares``: the path of an earlier layer this one is (a shared module: same class,
    arguments and stored tensors), else None."""

    name: str
    class_name: str
    init_args: dict
    shape: tuple[int, int]
    params: int
    dense_params: int
    errors: dict = field(default_factory=dict)
    absorbs: dict = field(default_factory=dict)
    shares: str | None = None

    @property
    def ratio(self) -> float:
        """Dense parameters over compressed parameters."""
        return self.dense_params / max(self.params, 1)


def _read_header(fs, path: str) -> tuple[dict, dict]:
    """(tensor entries, ``__metadata__``) of a safetensors file, reading only its header."""
    size = fs.size(path)
    with fs.open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else None
        if n is None or n > min(size - 8, _MAX_HEADER):
            raise ValueError(f"{path}: bad header: not a safetensors file, or truncated inside its header "
                             f"({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        end = 0
        for name, entry in header.items():
            begin, stop = entry["data_offsets"]
            if not (isinstance(entry["shape"], list) and 0 <= begin <= stop):
                raise ValueError(f"tensor {name!r} has a malformed entry")
            end = max(end, stop)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: bad header: {e}") from None
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated: its header describes {8 + n + end} bytes, the file holds {size}")
    return header, meta


def _document(meta: Mapping, where: str) -> dict:
    doc = meta.get(_KEY)
    if doc is None and _SHARD_KEY in meta:
        raise ValueError(f"{where} is one shard of a sharded model: open its index, {meta[_SHARD_KEY]!r}")
    if doc is None:
        raise ValueError(f"{where}: not a tspline compressed model file (no {_KEY!r} metadata; "
                         "write it with tk.save_compressed)")
    try:
        doc = json.loads(doc) if isinstance(doc, str) else doc
        version = doc["format_version"]
        if doc.get("format") != FORMAT:
            raise ValueError(f"format is {doc.get('format')!r}, expected {FORMAT!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{where}: bad {_KEY!r} metadata: {e}") from None
    if version != FORMAT_VERSION:
        raise ValueError(f"{where}: format version {version!r}; this tspline-kernels ({_version()}) reads "
                         f"version {FORMAT_VERSION} (upgrade the package to read newer files)")
    return doc


def _layer_errors(report: dict | None) -> dict[str, dict]:
    """Per-layer numbers whose key names an error, from a report's ``layers`` (list or mapping)."""
    layers = (report or {}).get("layers")
    if isinstance(layers, Mapping):
        layers = [{"name": k, **v} for k, v in layers.items() if isinstance(v, Mapping)]
    if not isinstance(layers, list):
        return {}
    return {entry["name"]: {k: v for k, v in entry.items() if "error" in k and isinstance(v, (int, float))}
            for entry in layers if isinstance(entry, Mapping) and "name" in entry}


class CompressedFile:
    """A compressed model file opened by :func:`open_compressed`: metadata in memory, tensors read
    on demand. ``layers``: the :class:`LayerInfo` of every compressed layer, in model order;
    ``tensors``: name -> :class:`TensorInfo` of every stored tensor; ``report``: the stored report
    (a dict) or None. Use as a context manager, or ``close()``, to drop downloaded copies."""

    def __init__(self, path) -> None:
        self._fs, root, self._local = _filesystem(path)
        self.path = root
        if self._fs.isdir(root):
            root = f"{root.rstrip('/')}/model.safetensors"
        index = root if root.endswith(INDEX_SUFFIX) else root + INDEX_SUFFIX
        if not root.endswith(INDEX_SUFFIX) and self._fs.isfile(root):
            header, meta = _read_header(self._fs, root)
            doc = _document(meta, root)
            shards = {name: root for name in header}
            headers = {root: header}
        elif self._fs.isfile(index):
            try:
                data = json.loads(self._fs.cat_file(index))
                weight_map, meta = dict(data["weight_map"]), dict(data["metadata"])
                if not all(isinstance(v, str) and v and "/" not in v for v in weight_map.values()):
                    raise ValueError("weight_map must name shard files in the index's folder")
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: bad index file: {e}") from None
            doc = _document(meta, index)
            shards = {name: _sibling(index, shard) for name, shard in weight_map.items()}
            headers = {p: _read_header(self._fs, p)[0] for p in sorted(set(shards.values()))}
        else:
            raise FileNotFoundError(f"no compressed model at {os.fspath(path)!r} (neither the file nor "
                                    f"{os.path.basename(index)!r} exists)")
        self.format_version = doc["format_version"]
        self.package_version = doc.get("package_version")
        self.report = doc.get("report")
        self.aliases: dict[str, str] = dict(doc.get("aliases") or {})
        buffers = doc.get("buffers")
        self.buffers: set[str] | None = None if buffers is None else set(buffers)  # None: not told apart
        try:
            self.tensors = {name: TensorInfo(r["dtype"], tuple(r["shape"]), r["sha256"], shards[name])
                            for name, r in doc["tensors"].items()}
            self._classes = {name: r["class"] for name, r in doc["layers"].items()}
            self._by_layer: dict[str | None, list[str]] = {}  # layer name (None: outside them) -> its keys
            for key in self.keys():
                self._by_layer.setdefault(_owner_in(key, self._classes), []).append(key)
            errors = _layer_errors(self.report)
            firsts: dict[str, str] = {}  # what makes a layer (class, arguments, stored tensors) -> first path
            layers = []
            for name, r in doc["layers"].items():
                args = dict(r["init_args"])
                stored = sorted((k[len(name) + 1:], self.aliases.get(k, k)) for k in self.layer_tensors(name))
                first = firsts.setdefault(json.dumps([r["class"], args, stored], sort_keys=True), name)
                shares = first if stored and first != name else None
                layers.append(LayerInfo(name, r["class"].rpartition(".")[2], args,
                                        (r["out_features"], r["in_features"]), r["params"], r["dense_params"],
                                        errors.get(name, errors.get(shares, {})), dict(r.get("absorbs", {})),
                                        shares))
            self.layers = tuple(layers)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{self.path}: bad {_KEY!r} metadata: missing or malformed {e}") from None
        self._info = {info.name: info for info in self.layers}
        stored = {name for header in headers.values() for name in header}
        if stored != set(self.tensors):
            odd = sorted(stored ^ set(self.tensors))[:5]
            raise IntegrityError(f"{self.path}: the stored tensors and the recorded ones differ ({odd})")
        for p, header in headers.items():
            for name, entry in header.items():
                if shards[name] != p:
                    raise IntegrityError(f"tensor {name!r}: the index places it in {shards[name]}, but {p} holds it")
                if tuple(entry["shape"]) != self.tensors[name].shape:
                    raise IntegrityError(f"tensor {name!r}: the file stores shape {tuple(entry['shape'])}, "
                                         f"recorded {self.tensors[name].shape}")
        self._tmp: tempfile.TemporaryDirectory | None = None  # removed when closed or collected
        self._handles: dict[str, object] = {}  # shard -> open safe_open handle

    def __enter__(self) -> CompressedFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the open shards and remove downloaded copies (the object stays usable)."""
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles = {}
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __repr__(self) -> str:
        return f"CompressedFile({self.path!r}, {len(self.layers)} compressed layers, {len(self.tensors)} tensors)"

    def layer(self, name: str) -> LayerInfo:
        """The :class:`LayerInfo` of compressed layer ``name``."""
        if name in self._info:
            return self._info[name]
        raise KeyError(f"no compressed layer {name!r} in {self.path} (layers: {[i.name for i in self.layers]})")

    def keys(self) -> list[str]:
        """Every state-dict key the file holds: the stored tensors, then the tied ones (``aliases``)."""
        return [*self.tensors, *self.aliases]

    def layer_tensors(self, name: str) -> list[str]:
        """The state-dict keys of compressed layer ``name`` (prefixed by ``name + "."``)."""
        return self._by_layer.get(name, [])

    def other_tensors(self) -> list[str]:
        """The state-dict keys outside every compressed layer."""
        return self._by_layer.get(None, [])

    def _handle(self, shard: str):
        """A ``safe_open`` handle on ``shard``, opened once: on the file itself on the local disk,
        else on a copy downloaded to a temporary folder."""
        if shard not in self._handles:
            safetensors = _need("safetensors")
            local = shard
            if not self._local:
                if self._tmp is None:
                    self._tmp = tempfile.TemporaryDirectory(prefix="tspline-")
                local = os.path.join(self._tmp.name, f"{len(self._handles)}.safetensors")
                self._fs.get_file(shard, local)
            try:
                self._handles[shard] = safetensors.safe_open(local, framework="pt", device="cpu")
            except safetensors.SafetensorError as e:
                raise ValueError(f"{shard}: cannot read it: {e}") from e
        return self._handles[shard]

    def tensor(self, name: str) -> torch.Tensor:
        """Read stored tensor ``name`` (lazily, through ``safe_open``) and check its dtype, shape and
        SHA-256; a mismatch raises :class:`IntegrityError`. A tied name reads the tensor it is tied
        to. On the local disk only that tensor's bytes are read; other filesystems download the
        shard holding it once (to a temporary file)."""
        name = self.aliases.get(name, name)
        if name not in self.tensors:
            raise KeyError(f"no tensor {name!r} in {self.path}")
        info = self.tensors[name]
        handle = self._handle(info.shard)
        try:
            # copied out of the mapping: a tensor safe_open returns is a view of the file's pages, so
            # a later write to the file (a save to the same path) would change the loaded model
            t = handle.get_tensor(name).clone()
        except _need("safetensors").SafetensorError as e:
            raise ValueError(f"{info.shard}: cannot read tensor {name!r}: {e}") from e
        if _dtype_name(t) != info.dtype or tuple(t.shape) != info.shape:
            raise IntegrityError(f"tensor {name!r}: stored as {_dtype_name(t)} {tuple(t.shape)}, recorded as "
                                 f"{info.dtype} {info.shape}")
        if _sha256(t) != info.sha256:
            raise IntegrityError(f"tensor {name!r}: its SHA-256 differs from the one recorded when it was saved "
                                 f"(in {info.shard}: the file is corrupted or was modified)")
        return t

    def read(self, names: Iterable[str], progress: bool = False) -> dict[str, torch.Tensor]:
        """``tensor(name)`` for each of ``names``: every checksum is verified before this returns."""
        names = list(names)
        return {n: self.tensor(n) for n in with_progress(names, progress, desc="verify", total=len(names))}

    def _build(self, name: str, tensors: Mapping[str, torch.Tensor], device: torch.device) -> CompressedLinear:
        """The recorded layer ``name`` on ``device``, its state loaded from ``tensors`` (its keys
        prefixed by ``name + "."``); the tensors keep their stored dtype."""
        info, key = self.layer(name), self._classes[name]
        known = _known_classes()
        same_name = [c for c in known.values() if c.__qualname__ == key.rpartition(".")[2]]
        cls = known.get(key, same_name[0] if len(same_name) == 1 else None)  # a class moved to another module
        if cls is None:
            raise ValueError(f"layer {name!r}: class {key!r} is not a compressed layer this tspline-kernels "
                             f"({_version()}) knows")
        try:
            layer = _call(cls, info.init_args, device=device)
        except (TypeError, ValueError) as e:
            raise ValueError(f"layer {name!r}: cannot build {info.class_name}(**{info.init_args}): {e}") from e
        if (layer.out_features, layer.in_features) != info.shape:
            raise ValueError(f"layer {name!r}: {info.class_name}(**{info.init_args}) is "
                             f"{layer.out_features}x{layer.in_features}, recorded {info.shape[0]}x{info.shape[1]}")
        prefix = name + "."
        state = {k[len(prefix):]: tensors[k].to(device) for k in self.layer_tensors(name)}
        try:
            layer.load_state_dict(state, strict=True, assign=True)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"layer {name!r}: the recorded arguments {info.class_name}(**{info.init_args}) do "
                             f"not match the stored tensors: {e}") from e
        _tie(layer, {a[len(prefix):]: t[len(prefix):] for a, t in self.aliases.items()
                     if a.startswith(prefix) and t.startswith(prefix)})
        return layer

    def load_layer(self, name: str, device=None) -> CompressedLinear:
        """Compressed layer ``name`` rebuilt from its recorded class and arguments, its tensors read
        and verified (only this layer's), on ``device`` (default CPU)."""
        self.layer(name)  # KeyError naming the layers when there is no such layer
        tensors = self.read(self.layer_tensors(name))
        return self._build(name, tensors, torch.device(device if device is not None else "cpu"))

    @torch.no_grad()
    def materialize(self, name: str) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight of compressed layer ``name``."""
        return self.load_layer(name).materialize().detach()

    def verify(self, progress: bool = False) -> dict[str, str]:
        """Read every stored tensor and check its dtype, shape and SHA-256 (reads all the data).
        Returns tensor name -> why it failed, for each that failed (empty when all pass)."""
        failed = {}
        for name in with_progress(list(self.tensors), progress, desc="verify", unit="tensor"):
            try:
                self.tensor(name)
            except ValueError as e:  # IntegrityError, or bytes safetensors cannot read
                failed[name] = str(e)
        return failed

    def table(self, failed: Mapping[str, str] | None = None) -> str:
        """Per-layer table (format, shape, params, ratio, the report's weight and output errors,
        checksum status) and totals, from the metadata; ``failed`` (what :meth:`verify` returned)
        fills the checksum column, which reads "not verified" without it."""
        def status(keys: list[str]) -> str:
            if failed is None:
                return "not verified"
            bad = sum(self.aliases.get(k, k) in failed for k in keys)
            return f"FAILED ({bad} of {len(keys)})" if bad else "ok"

        def err(value) -> str:
            return "-" if value is None else f"{value:.4f}"

        header = ["layer", "format", "shape", "params", "dense", "ratio", "weight err", "output err", "checksum"]
        rows = [[i.name, i.class_name, f"{i.shape[0]}x{i.shape[1]}",
                 *((str(i.params), str(i.dense_params), f"{i.ratio:.2f}x") if i.shares is None
                   else (f"= {i.shares}", "-", "-")),
                 err(i.errors.get("weight_error")), err(i.errors.get("output_error")),
                 status(self.layer_tensors(i.name))] for i in self.layers]
        other = [t for t in self.other_tensors() if t in self.tensors]
        buffers = [] if self.buffers is None else [t for t in other if t in self.buffers]
        other = [t for t in other if t not in buffers]
        other_elements = sum(math.prod(self.tensors[t].shape) for t in other)
        what = "other parameters" if self.buffers is not None else "other tensors (parameters and buffers)"
        rows.append([f"({what}: {len(other)})", "-", "-", str(other_elements), str(other_elements), "-", "-",
                     "-", status(other)])
        if buffers:  # elements, not parameters: in no total
            rows.append([f"(buffers: {len(buffers)}, elements)", "-", "-",
                         f"({sum(math.prod(self.tensors[t].shape) for t in buffers)})", "-", "-", "-", "-",
                         status(buffers)])
        own = [i for i in self.layers if i.shares is None]  # a shared layer's parameters count once
        params = sum(i.params for i in own)
        dense = sum(i.dense_params for i in own)
        rows.append(["total", "-", "-", str(params + other_elements), str(dense + other_elements),
                     f"{(dense + other_elements) / max(params + other_elements, 1):.2f}x", "-", "-",
                     status(list(self.tensors))])
        widths = [max(len(r[k]) for r in [header] + rows) for k in range(len(header))]
        lines = ["  ".join(c.ljust(w) if k < 3 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths))).rstrip()
                 for r in [header] + rows]
        lines.insert(-1, "-" * len(lines[0]))
        shared = len(self.layers) - len(own)
        at = f"; {shared} more paths hold a layer listed before them ('= PATH'), counted once" if shared else ""
        lines.append(f"{len(own)} compressed layers ({dense / max(params, 1):.2f}x fewer parameters than what they "
                     f"replaced{at}), {len(self.tensors)} tensors, format version {self.format_version}, "
                     f"written by tspline-kernels {self.package_version}")
        if failed is None:
            lines.append("checksums: not verified (--verify reads every tensor and checks its SHA-256)")
        elif failed:
            lines.append(f"checksums: {len(failed)} of {len(self.tensors)} tensors FAILED: "
                         + "; ".join(failed.values()))
        else:
            lines.append(f"checksums: all {len(self.tensors)} tensors match their SHA-256")
        return "\n".join(lines)


def open_compressed(path) -> CompressedFile:
    """Open a file written by :func:`save_compressed` (the file, its ``.index.json``, or a folder
    holding ``model.safetensors[.index.json]``) reading its metadata only: headers and, for a
    sharded model, the index. No tensor data is read until asked for (``tensor``, ``load_layer``,
    ``materialize``). Raises FileNotFoundError, or ValueError for a truncated file, a bad header or
    an unknown format version."""
    return CompressedFile(path)


# ---- loading into a model ------------------------------------------------------------------------
def _home(t: torch.Tensor | None) -> torch.device:
    """Where a loaded tensor goes: the device of the one it replaces, the CPU for meta."""
    return torch.device("cpu") if t is None or t.device.type == "meta" else t.device


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    path, _, attr = key.rpartition(".")
    return model.get_submodule(path), attr


def _tie(module: nn.Module, aliases: Mapping[str, str]) -> None:
    """Make each alias key of ``module``'s state dict the very tensor object of its target."""
    if aliases:
        state = module.state_dict(keep_vars=True)
        for alias, target in aliases.items():
            if alias in state and target in state:
                owner, attr = _owner(module, alias)
                setattr(owner, attr, state[target])


class ModelMismatch(ValueError):
    """The file's layers or tensors and the model's modules differ (``load_compressed`` with
    ``strict``): ``detail`` says how; ``str()`` adds what ``strict=False`` does about it."""

    def __init__(self, detail: str, hint: str) -> None:
        super().__init__(detail, hint)
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.args[0]} ({self.args[1]})"


def _attribute(model: nn.Module, path: str):
    """What the attribute at qualified ``path`` of ``model`` holds; AttributeError when none."""
    parent, _, child = path.rpartition(".")
    return getattr(model.get_submodule(parent), child)


def _targets(model: nn.Module, f: CompressedFile, names: list[str], strict: bool) -> dict[str, nn.Module]:
    """The model's module at each recorded layer's path (usually an nn.Linear; for a layer that
    replaced a whole MLP block, the block's first Linear, or a module holding the block), with the
    layer's features where it has them: a block's inputs are its first Linear's, its outputs its
    second Linear's."""
    targets = {}
    for name in names:
        info = f.layer(name)
        try:
            old = model.get_submodule(name)
            second = {role: _attribute(model, path) for role, path in info.absorbs.items()}.get("second")
        except AttributeError:
            if strict:
                what = f"block ({', '.join([name, *info.absorbs.values()])})" if info.absorbs else "module"
                raise ModelMismatch(f"the file's layer {name!r} has no {what} in the model",
                                    "strict=False skips it") from None
            continue
        shape = (getattr(second, "out_features", getattr(old, "out_features", None)), getattr(old, "in_features", None))
        whole_block = info.absorbs or info.class_name == "DecoupledSplineMLP"  # may replace a module holding a block
        if not whole_block and not isinstance(old, (nn.Linear, CompressedLinear)):
            raise ValueError(f"layer {name!r}: the model holds a {type(old).__name__} there, not the nn.Linear "
                             f"(or compressed layer) the file's {info.class_name} replaces")
        if None not in shape and shape != info.shape:
            what = type(old).__name__ if second is None else f"block {name} .. {info.absorbs['second']}"
            raise ValueError(f"layer {name!r}: the model's {what} is {shape[0]}x{shape[1]}, the "
                             f"file's {info.class_name} {info.shape[0]}x{info.shape[1]}")
        targets[name] = old
    return targets


def _places(model: nn.Module, f: CompressedFile, targets: Mapping[str, nn.Module]) -> dict[str, list[str]]:
    """Layer to build -> the paths to put it at: every path of the model that holds the module its
    own path holds (a shared module stays shared), each of which the file must record as that same
    layer (:attr:`LayerInfo.shares`)."""
    paths: dict[int, list[str]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(path)
    places: dict[str, list[str]] = {}
    placed: set[str] = set()
    for name, old in targets.items():
        if name in placed:
            continue
        held, first = paths[id(old)], f.layer(name).shares or name
        odd = [f"no compressed layer at {p!r}" if p not in f._info else f"a different layer at {p!r}"
               for p in held if p not in f._info or (f.layer(p).shares or p) != first]
        if odd:
            raise ValueError(f"the model holds one module at {', '.join(map(repr, held))} (shared), but the file "
                             f"records {name!r} and {'; '.join(odd)}: load it into a model whose modules at those "
                             "paths are separate")
        places[name] = held
        placed.update(held)
    return places


def load_compressed(model: nn.Module, path, strict: bool = True, include: str | None = None, *,
                    progress: bool = False) -> nn.Module:
    """Load a file written by :func:`save_compressed` into ``model``, the original architecture
    (dense, or built on the meta device), in place, and return it.

    Each recorded compressed layer replaces the module at its path (an ``nn.Linear`` of the same
    features, a compressed layer, or the block a DecoupledSplineMLP replaced: the module holding it,
    or its first Linear, with identities at its activation's and second Linear's places); a module
    the model holds at several paths gets one layer at all of them when the file records the same
    layer there (ValueError otherwise); every other stored tensor is loaded into the model.
    Tensors keep their stored dtype and go to the device of what they replace (the CPU for meta);
    tied tensors are tied again. Non-persistent buffers are not in the file: on a meta model they
    stay on meta. ``include``: a regex; only the layers and tensors whose names match (searched)
    are loaded. ``strict``: every selected name must exist in the model and, without ``include``,
    every model tensor must be in the file (else :class:`ModelMismatch`). All checksums are
    verified, all layers built and every shape checked before the model is touched: on any error
    (:class:`IntegrityError` for corrupted data) the model is left exactly as it was."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    strict = check_flag("strict", strict)
    pattern = _pattern("include", include)
    with open_compressed(path) as f:
        picked = [i.name for i in f.layers if pattern is None or pattern.search(i.name)]
        plain = [t for t in f.other_tensors() if pattern is None or pattern.search(t)]
        if pattern is not None and not picked and not plain:
            raise ValueError(f"include={include!r} matches no layer or tensor of {f.path}")
        targets = _targets(model, f, picked, strict)
        places = _places(model, f, targets)
        replaced = {p for held in places.values() for p in held}
        replaced.update(p for name in places for p in f.layer(name).absorbs.values())
        kept = {k: v for k, v in model.state_dict(keep_vars=True).items()
                if _owner_in(k, replaced) is None}
        unexpected = [k for k in plain if k not in kept]
        missing = [k for k in kept if k not in plain] if pattern is None else []
        if strict and (unexpected or missing):
            raise ModelMismatch(f"the file and the model differ: in the file only {unexpected[:10]}, in the model "
                                f"only {missing[:10]}", "strict=False loads what matches")
        plain = [k for k in plain if k in kept]
        for k in plain:
            stored = f.tensors[f.aliases.get(k, k)].shape
            if tuple(kept[k].shape) != stored:
                raise ValueError(f"tensor {k!r}: the file holds shape {stored}, the model {tuple(kept[k].shape)}")
        tensors = f.read([t for name in places for t in f.layer_tensors(name)] + plain, progress)
        modules: dict[str, nn.Module] = {}
        for name, held in places.items():
            layer = f._build(name, tensors, _home(next(iter(targets[name].parameters()), None)))
            modules.update(dict.fromkeys(held, layer))
            info = f.layer(name)
            modules.update({path: Absorbed(layer, role, info.dense_params) for role, path in info.absorbs.items()})
        # ties among plain tensors, and ties between different layers (or a layer and a plain tensor)
        loaded = set(plain).union(*(f.layer_tensors(name) for name in places))
        aliases = {a: t for a, t in f.aliases.items() if a in loaded and t in loaded}
    _swap(model, modules, {k: tensors[k].to(_home(kept[k])) for k in plain}, aliases)
    return model


def _swap(model: nn.Module, modules: Mapping[str, nn.Module], state: Mapping[str, torch.Tensor],
          aliases: Mapping[str, str]) -> None:
    """Put ``modules`` (path -> module) in ``model``, assign ``state`` and re-tie ``aliases``; on
    any error put back every module, attribute and tensor object it replaced."""
    old = {path: _attribute(model, path) for path in modules}
    before = model.state_dict(keep_vars=True)
    try:
        for path, module in modules.items():
            put_module(model, path, module)
        model.load_state_dict(dict(state), strict=False, assign=True)
        _tie(model, aliases)
    except BaseException:
        for path, value in old.items():
            put_module(model, path, value)
        model.load_state_dict({k: before[k] for k in state}, strict=False, assign=True)
        raise
