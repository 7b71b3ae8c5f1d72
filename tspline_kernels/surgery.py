"""Model surgery: swap ``nn.Linear`` modules for compressed layers in place."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Replacement:
    """One replaced layer: its qualified name and parameter counts before and after."""

    name: str
    old_params: int
    new_params: int


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def replace_linear(
    model: nn.Module,
    factory: Callable[[nn.Linear], nn.Module],
    include: str | None = None,
    exclude: str | None = None,
    min_features: int = 0,
) -> list[Replacement]:
    """Replace every ``nn.Linear`` in ``model`` whose qualified name matches ``include`` (regex,
    searched; all when None), does not match ``exclude``, and has both in and out features
    >= ``min_features``, by ``factory(linear)``. The new module is moved to the old weight's device
    and dtype. Returns one :class:`Replacement` per swapped layer, in module order.
    """
    inc = re.compile(include) if include is not None else None
    exc = re.compile(exclude) if exclude is not None else None
    targets = [
        (name, m) for name, m in model.named_modules()
        if type(m) is nn.Linear
        and (inc is None or inc.search(name))
        and not (exc is not None and exc.search(name))
        and min(m.in_features, m.out_features) >= min_features
    ]
    report = []
    for name, linear in targets:
        new = factory(linear)
        if not isinstance(new, nn.Module):
            raise TypeError(f"factory returned {type(new).__name__} for {name!r}, expected an nn.Module")
        new = new.to(device=linear.weight.device, dtype=linear.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        report.append(Replacement(name, _count(linear), _count(new)))
    return report
