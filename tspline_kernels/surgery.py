"""Model surgery: find the targeted ``nn.Linear`` modules of a model and swap them in place."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ._layers import check_count


@dataclass(frozen=True)
class Replacement:
    """One replaced layer: its qualified name and parameter counts before and after."""

    name: str
    old_params: int
    new_params: int


def count_parameters(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _pattern(name: str, value: str | None) -> re.Pattern | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a regular expression (str) or None, got {value!r}")
    try:
        return re.compile(value)
    except re.error as e:
        raise ValueError(f"{name}={value!r} is not a valid regular expression: {e}") from None


def select_linear(model: nn.Module, include: str | None = None, exclude: str | None = None,
                  min_features: int = 0) -> list[tuple[str, nn.Linear]]:
    """``(qualified name, module)`` of every plain ``nn.Linear`` in ``model`` (module order) whose
    name matches ``include`` (regex, searched; all when None), does not match ``exclude``, and has
    both in and out features >= ``min_features``. Subclasses of nn.Linear are not selected. A
    module reached by several paths (shared) is listed once, by its first path, and since
    :func:`swap_module` replaces it at every path, it is selected when any of its paths matches
    ``include`` and none matches ``exclude`` (excluding one path keeps the module at all of them)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if type(model) is nn.Linear:
        raise ValueError("the model is itself an nn.Linear, which cannot be replaced in place: wrap it "
                         "(e.g. nn.Sequential(linear)) and pass the wrapper")
    inc, exc = _pattern("include", include), _pattern("exclude", exclude)
    min_features = check_count("min_features", min_features, 0)
    paths: dict[int, tuple[nn.Module, list[str]]] = {}  # module order: first paths first
    for name, m in model.named_modules(remove_duplicate=False):
        if type(m) is nn.Linear:
            paths.setdefault(id(m), (m, []))[1].append(name)
    return [
        (names[0], m) for m, names in paths.values()
        if (inc is None or any(inc.search(n) for n in names))
        and not (exc is not None and any(exc.search(n) for n in names))
        and min(m.in_features, m.out_features) >= min_features
    ]


def require_untied(model: nn.Module, targets: list[tuple[str, nn.Module]]) -> None:
    """Raise ValueError naming the first target that shares a parameter with another module of
    ``model`` (tied weights, such as an output projection tied to the input embedding): replacing
    it would untie them and leave the tensor in the other module, so the model would gain
    parameters instead of losing them."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}  # parameter -> every module holding it
    for path, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append((path, m))
    for name, module in targets:
        for pname, p in module.named_parameters():
            other = next((path for path, m in owners.get(id(p), []) if m is not module), None)
            if other is not None:
                raise ValueError(f"layer {name!r} shares its {pname} with {other!r} (tied parameters, e.g. an "
                                 "output layer tied to the embedding): replacing it would untie them and leave that "
                                 f"tensor in {other!r}, so the model would gain parameters instead of losing them; "
                                 f"exclude {name!r}")


def require_linear(model: nn.Module, include: str | None = None, exclude: str | None = None,
                   min_features: int = 0) -> list[tuple[str, nn.Linear]]:
    """:func:`select_linear`, raising ValueError when it selects nothing."""
    targets = select_linear(model, include, exclude, min_features)
    if not targets:
        raise ValueError(f"no nn.Linear in the model matches include={include!r}, exclude={exclude!r}, "
                         f"min_features={min_features}")
    return targets


def swap_module(model: nn.Module, name: str, new: nn.Module, like: nn.Linear) -> None:
    """Put ``new``, on ``like.weight``'s device and dtype, in place of the module at the qualified
    ``name`` of ``model``, at every path that holds that module (a shared module stays shared)."""
    if not isinstance(new, nn.Module):
        raise TypeError(f"factory returned {type(new).__name__} for {name!r}, expected an nn.Module")
    if not name:
        raise ValueError("cannot replace the model itself: wrap it (e.g. in nn.Sequential) and pass the wrapper")
    new = new.to(device=like.weight.device, dtype=like.weight.dtype)
    old = model.get_submodule(name)
    for path in [n for n, m in model.named_modules(remove_duplicate=False) if m is old]:
        parent_name, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)


def replace_linear(
    model: nn.Module,
    factory: Callable[[nn.Linear], nn.Module],
    include: str | None = None,
    exclude: str | None = None,
    min_features: int = 0,
) -> list[Replacement]:
    """Replace every ``nn.Linear`` that :func:`select_linear` picks by ``factory(linear)``. The new
    module is moved to the old weight's device and dtype. Returns one :class:`Replacement` per
    swapped layer, in module order.
    """
    report = []
    for name, linear in select_linear(model, include, exclude, min_features):
        new = factory(linear)
        swap_module(model, name, new, linear)
        report.append(Replacement(name, count_parameters(linear), count_parameters(new)))
    return report
