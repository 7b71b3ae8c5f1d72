"""Calibration: the input Gram X^T X of every targeted ``nn.Linear``, streamed over real batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ._layers import check_count, check_flag
from .heal import call
from .surgery import require_linear


@dataclass(frozen=True, eq=False)
class LayerStats:
    """What a Linear layer saw during calibration: ``gram`` = X^T X, float64 ``(in_features,
    in_features)``, over its ``tokens`` input rows (all leading dimensions flattened)."""

    gram: torch.Tensor
    tokens: int


class Calibration(Mapping):
    """Qualified Linear name -> :class:`LayerStats`, in module order (what :func:`calibrate` returns)."""

    def __init__(self, stats: Mapping[str, LayerStats]) -> None:
        self._stats = dict(stats)

    def __getitem__(self, name: str) -> LayerStats:
        return self._stats[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._stats)

    def __len__(self) -> int:
        return len(self._stats)

    def __repr__(self) -> str:
        tokens = {s.tokens for s in self._stats.values()}
        seen = f"{tokens.pop()} tokens each" if len(tokens) == 1 else "tokens per layer differ"
        return f"Calibration({len(self)} layers, {seen})"


def with_progress(iterable: Iterable, enable: bool = True, **kwargs) -> Iterable:
    """``iterable`` under a tqdm bar when ``enable`` and tqdm is installed (it is optional)."""
    if not enable:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **kwargs)


def check_calibration(calibration) -> None:
    if isinstance(calibration, (torch.Tensor, str, bytes, Mapping)) or not (
            callable(calibration) or isinstance(calibration, Iterable)):
        raise TypeError("calibration must be a callable run on the model or an iterable of batches, got "
                        f"{type(calibration).__name__} (wrap a single batch in a list)")


@torch.no_grad()
def run_calibration(model: nn.Module, calibration, progress: bool = False, keep: bool = True) -> list:
    """Run ``calibration`` on ``model`` under ``torch.no_grad``: ``[calibration(model)]`` for a
    callable, else ``model`` on every batch (see :func:`calibrate`); the outputs when ``keep``."""
    if callable(calibration):
        out = calibration(model)
        return [out] if keep else []
    total = len(calibration) if hasattr(calibration, "__len__") else None
    outputs = []
    for batch in with_progress(calibration, progress and total is not None, total=total, desc="calibrating",
                               unit="batch"):
        out = call(model, batch)
        if keep:
            outputs.append(out)
    return outputs


def observe_inputs(model: nn.Module, calibration, modules: Sequence[tuple[str, nn.Module]], features: Sequence[int],
                   record: Callable[[str, torch.Tensor], None], progress: bool = True) -> None:
    """Run ``calibration`` on ``model`` (see :func:`calibrate`) with a hook that passes every input
    of each named module, detached and flattened to ``(rows, features)``, to ``record(name, x)``.
    A module the calibration never reaches, or reaches with inputs of another width, raises
    ValueError."""
    check_flag("progress", progress)
    check_calibration(calibration)
    rows = {name: 0 for name, _ in modules}

    def hook_for(name: str, width: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, torch.Tensor):
                return  # the module itself raises on it
            if x.dim() == 0 or x.shape[-1] != width:
                raise ValueError(f"layer {name!r} takes inputs of {width} features (the last dimension), but the "
                                 f"calibration gave it shape {tuple(x.shape)}: check the batches' width")
            x = x.detach().reshape(-1, width)
            rows[name] += x.shape[0]
            record(name, x)
        return hook

    handles = [m.register_forward_pre_hook(hook_for(name, width), with_kwargs=True)
               for (name, m), width in zip(modules, features)]
    try:
        run_calibration(model, calibration, progress, keep=False)
    finally:
        for h in handles:
            h.remove()
    missed = [name for name, n in rows.items() if n == 0]
    if missed:
        raise ValueError(f"the calibration never reached {len(missed)} of the targeted layers: "
                         f"{', '.join(missed)} (exclude them, or run inputs that use them)")


def calibrate(model: nn.Module, calibration: Callable[[nn.Module], object] | Iterable,
              include: str | None = None, exclude: str | None = None, min_features: int = 0,
              progress: bool = True) -> Calibration:
    """Run ``calibration`` on ``model`` (under ``torch.no_grad``) and collect, for every Linear that
    :func:`~tspline_kernels.surgery.select_linear` picks (at least one), the float64 Gram X^T X of its inputs and
    the number of input rows. Activations are never stored: each layer keeps one ``(in, in)`` sum.

    ``calibration`` is a callable run as ``calibration(model)`` (e.g. ``lambda m: m.encode(texts)``)
    or an iterable of batches: a tensor runs ``model(t)``, a tuple or list ``model(*t)``, a dict
    ``model(**d)``; ``progress`` shows a bar over an iterable that has a length. A Linear the
    calibration never reaches raises (its statistics would be empty).
    """
    targets = require_linear(model, include, exclude, min_features)
    grams: dict[str, torch.Tensor] = {}
    tokens = {name: 0 for name, _ in targets}

    def record(name: str, x: torch.Tensor) -> None:
        x = x.double()
        grams[name] = x.T @ x + grams[name] if name in grams else x.T @ x
        tokens[name] += x.shape[0]

    observe_inputs(model, calibration, targets, [m.in_features for _, m in targets], record, progress)
    return Calibration({name: LayerStats(grams[name], tokens[name]) for name in tokens})


def collect_inputs(model: nn.Module, calibration, modules: Sequence[tuple[str, nn.Linear]], tokens: int,
                   seed: int = 0, progress: bool = True) -> dict[str, torch.Tensor]:
    """Up to ``tokens`` input rows of each named Linear ``(rows, in_features)`` (its input's dtype
    and device) while ``calibration`` runs on ``model`` (as for :func:`calibrate`): a seeded random
    choice among all rows it saw, which are held until the run ends (memory O(rows x in) per layer)."""
    tokens = check_count("tokens", tokens, 1)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name, _ in modules}
    observe_inputs(model, calibration, modules, [m.in_features for _, m in modules],
                   lambda name, x: seen[name].append(x.clone()), progress)
    out = {}
    for name, parts in seen.items():
        x = torch.cat(parts)
        pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:tokens]
        out[name] = x[pick.to(x.device)]
    return out
