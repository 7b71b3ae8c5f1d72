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


def _padding_mask(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The key-padding ``attention_mask`` a module call carries: a 2-D bool or integer tensor
    ``(batch, tokens)`` (1 = token, 0 = padding, as tokenizers make it), passed as the keyword
    ``attention_mask`` or inside a dict argument (sentence-transformers' features); else None.
    Additive or 4-D masks (what BERT layers get inside the model) are not padding masks here."""
    candidates = [kwargs.get("attention_mask")] + [a.get("attention_mask") for a in args if isinstance(a, Mapping)]
    for mask in candidates:
        if (isinstance(mask, torch.Tensor) and mask.dim() == 2
                and (mask.dtype == torch.bool or not (mask.dtype.is_floating_point or mask.dtype.is_complex))):
            return mask
    return None


def observe_inputs(model: nn.Module, calibration, modules: Sequence[tuple[str, nn.Module]], features: Sequence[int],
                   record: Callable[[str, torch.Tensor], None], progress: bool = True,
                   mask_padding: bool = True) -> None:
    """Run ``calibration`` on ``model`` (see :func:`calibrate`) with a hook that passes every input
    of each named module, detached and flattened to ``(rows, features)``, to ``record(name, x)``.
    With ``mask_padding``, while a module of ``model`` runs with a key-padding ``attention_mask``
    ``(batch, tokens)`` (keyword, or in a dict argument), an input ``(batch, tokens, features)`` of
    a named module drops its padding rows (mask 0): a padded batch then gives the rows of its real
    tokens only, independent of how the texts were batched.
    A module the calibration never reaches, or reaches with inputs of another width, raises
    ValueError."""
    check_flag("progress", progress)
    check_flag("mask_padding", mask_padding)
    check_calibration(calibration)
    rows = {name: 0 for name, _ in modules}
    masks: list[torch.Tensor | None] = []  # the padding masks of the module calls under way, innermost last

    def push(module: nn.Module, args: tuple, kwargs: dict) -> None:
        masks.append(_padding_mask(args, kwargs))

    def pop(module: nn.Module, args: tuple, kwargs: dict, out) -> None:
        if masks:
            masks.pop()

    def keep(x: torch.Tensor) -> torch.Tensor:
        """``x`` without its padding rows, when a current mask has its leading shape."""
        for mask in reversed(masks):
            if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
                return x[mask.to(x.device) != 0]
        return x

    def hook_for(name: str, width: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, torch.Tensor):
                return  # the module itself raises on it
            if x.dim() == 0 or x.shape[-1] != width:
                raise ValueError(f"layer {name!r} takes inputs of {width} features (the last dimension), but the "
                                 f"calibration gave it shape {tuple(x.shape)}: check the batches' width")
            x = keep(x.detach()).reshape(-1, width)
            rows[name] += x.shape[0]
            if x.shape[0]:
                record(name, x)
        return hook

    handles = []
    if mask_padding:  # registered first, so that a module's mask is pushed before its own input is seen
        for m in model.modules():
            handles.append(m.register_forward_pre_hook(push, with_kwargs=True))
            handles.append(m.register_forward_hook(pop, with_kwargs=True, always_call=True))
    handles += [m.register_forward_pre_hook(hook_for(name, width), with_kwargs=True)
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
              progress: bool = True, mask_padding: bool = True) -> Calibration:
    """Run ``calibration`` on ``model`` (under ``torch.no_grad``) and collect, for every Linear that
    :func:`~tspline_kernels.surgery.select_linear` picks (at least one), the float64 Gram X^T X of its inputs and
    the number of input rows. Activations are never stored: each layer keeps one ``(in, in)`` sum.

    ``calibration`` is a callable run as ``calibration(model)`` (e.g. ``lambda m: m.encode(texts)``)
    or an iterable of batches: a tensor runs ``model(t)``, a tuple or list ``model(*t)``, a dict
    ``model(**d)``; ``progress`` shows a bar over an iterable that has a length. A Linear the
    calibration never reaches raises (its statistics would be empty).

    ``mask_padding`` (default): where the model runs on padded batches with a key-padding
    ``attention_mask`` (1 = token, 0 = padding; a keyword or a dict entry, as tokenizers,
    Hugging Face models and sentence-transformers pass it), the padding positions' inputs are left
    out of the Grams and ``tokens``, so that the statistics (and the reported output errors) are
    those of the real tokens, whatever the batch size. ``mask_padding=False`` counts every row.
    """
    targets = require_linear(model, include, exclude, min_features)
    grams: dict[str, torch.Tensor] = {}
    tokens = {name: 0 for name, _ in targets}

    def record(name: str, x: torch.Tensor) -> None:
        x = x.double()
        grams[name] = x.T @ x + grams[name] if name in grams else x.T @ x
        tokens[name] += x.shape[0]

    observe_inputs(model, calibration, targets, [m.in_features for _, m in targets], record, progress, mask_padding)
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
