"""Healing: a short distillation of a dense teacher's outputs into its compressed copy."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ._layers import check_count, check_flag

Forward = Callable[[nn.Module, object], torch.Tensor]
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class HealReport:
    """What :func:`heal` did: the training loss after every step and, when ``held_out`` batches
    were given, the loss on them (student vs teacher, mean over batches) before and after."""

    steps: int
    lr: float
    loss: str
    history: list[float] = field(repr=False)
    held_out_before: float | None
    held_out_after: float | None
    seconds: float

    def __str__(self) -> str:
        held = "" if self.held_out_before is None else \
            f"; held-out {self.loss} {self.held_out_before:.4g} -> {self.held_out_after:.4g}"
        return (f"healed {self.steps} steps (Adam, lr {self.lr:g}) in {self.seconds:.1f}s: train {self.loss} "
                f"{self.history[0]:.4g} -> {self.history[-1]:.4g}{held}")


def call(model: nn.Module, batch) -> torch.Tensor:
    """``model(batch)`` for a tensor, ``model(**batch)`` for a mapping, ``model(*batch)`` for a
    tuple or list: the default ``forward`` of :func:`heal`."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over rows of 1 - cos(student, teacher), rows along the last dimension."""
    return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()


LOSSES: dict[str, Loss] = {"mse": F.mse_loss, "cosine": cosine_loss}


def _loss_fn(loss) -> tuple[str, Loss]:
    if callable(loss):
        return getattr(loss, "__name__", type(loss).__name__), loss
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)} or a callable (student, teacher) -> scalar, "
                         f"got {loss!r}")
    return loss, LOSSES[loss]


def _positive(name: str, value) -> float:
    """``value`` as a finite float > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _cycled(batches: Iterable, steps: int, target: Callable[[object], torch.Tensor]):
    """``steps`` (batch, teacher output) pairs: ``batches`` once, then again from the start as often
    as needed; each distinct batch's teacher output is computed once."""
    seen = []
    for batch in batches:
        if len(seen) == steps:
            return
        seen.append((batch, target(batch)))
        yield seen[-1]
    if not seen:
        raise ValueError("batches is empty")
    for i in range(steps - len(seen)):
        yield seen[i % len(seen)]


@torch.no_grad()
def _diverged(params: list[nn.Parameter], initial: list[torch.Tensor], what: str, lr: float) -> None:
    """Put ``initial`` back into ``params`` and raise ValueError saying ``what`` happened."""
    for p, value in zip(params, initial):
        p.copy_(value)
    raise ValueError(f"healing diverged: {what} (lr {lr:g} may be too high, or the data holds inf or NaN); the "
                     "student's parameters are restored to their values before healing")


def _modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def heal(student: nn.Module, teacher: nn.Module, batches: Iterable, steps: int, lr: float,
         forward: Forward | None = None, loss: str | Loss = "mse", *, held_out: Iterable | None = None,
         train_mode: bool = False, max_grad_norm: float | None = 1.0, progress: bool = True) -> HealReport:
    """Distil ``teacher`` into ``student`` (e.g. a model and its compressed copy) for ``steps`` Adam
    steps at learning rate ``lr``.

    Each step runs one batch of ``batches`` (cycled from the start if it has fewer than ``steps``;
    the batches seen are kept for that) through both models and minimises ``loss`` between
    ``forward(student, batch)`` and ``forward(teacher, batch)``: ``"mse"``, ``"cosine"`` (mean of
    1 - cos over the last dimension) or a callable ``(student_out, teacher_out) -> scalar``.
    ``forward`` returns the tensor to match (any shape, the same for both models); by default
    ``model(batch)``, ``model(**batch)`` for a dict, ``model(*batch)`` for a tuple or list.

    The teacher runs in eval mode without autograd and is not changed; only the student's
    parameters with ``requires_grad`` are updated. The student runs in eval mode (dropout off)
    unless ``train_mode``; both models' train/eval flags are restored afterwards, also on error.
    ``max_grad_norm`` clips the gradient norm (None: no clipping). ``held_out`` batches give the
    loss before and after healing in the returned :class:`HealReport`. ``progress`` shows a tqdm bar.
    A loss or parameter that becomes inf or NaN (too high an ``lr``) stops healing: the student's
    parameters are restored to their values before it and ValueError is raised.
    """
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        bad, value = ("student", student) if not isinstance(student, nn.Module) else ("teacher", teacher)
        raise TypeError(f"{bad} must be an nn.Module, got {type(value).__name__}")
    if student is teacher:
        raise ValueError("student and teacher are the same module: heal a compressed copy of the teacher")
    steps = check_count("steps", steps, 1)
    lr = _positive("lr", lr)
    if forward is None:
        forward = call
    elif not callable(forward):
        raise TypeError(f"forward must be a callable (model, batch) -> Tensor, got {type(forward).__name__}")
    loss_name, loss_fn = _loss_fn(loss)
    check_flag("train_mode", train_mode)
    check_flag("progress", progress)
    if max_grad_norm is not None:
        max_grad_norm = _positive("max_grad_norm", max_grad_norm)
    if isinstance(batches, (torch.Tensor, Mapping)):
        raise TypeError("batches must be an iterable of batches (a list, a DataLoader, ...), not a single "
                        f"{type(batches).__name__}")
    teacher_ids = {id(p) for p in teacher.parameters()}
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("student has no parameters with requires_grad=True: nothing to heal")
    if any(id(p) in teacher_ids for p in params):
        raise ValueError("student shares trainable parameters with teacher: heal a copy (copy.deepcopy)")

    def target(batch) -> torch.Tensor:
        with torch.no_grad():
            return forward(teacher, batch).detach()

    def held_out_loss() -> float | None:
        if held_out is None:
            return None
        student.eval()
        with torch.no_grad():
            values = [loss_fn(forward(student, b), target(b)).item() for b in held_out]
        if not values:
            raise ValueError("held_out is empty")
        return sum(values) / len(values)

    modes = _modes(student) + _modes(teacher)
    initial = [p.detach().clone() for p in params]
    start = time.perf_counter()
    bar = None
    try:
        teacher.eval()
        before = held_out_loss()
        student.train(train_mode)
        optimizer = torch.optim.Adam(params, lr=lr)
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="heal", unit="step")
        history = []
        for batch, want in _cycled(batches, steps, target):
            value = loss_fn(forward(student, batch), want)
            if value.dim() != 0:
                raise ValueError(f"loss must return a scalar, got shape {tuple(value.shape)}")
            history.append(value.item())
            if not math.isfinite(history[-1]):
                _diverged(params, initial, f"the loss became {history[-1]} at step {len(history)} of {steps}", lr)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            if bar is not None:
                bar.update()
                bar.set_postfix(loss=f"{history[-1]:.4g}")
        if not all(torch.isfinite(p).all() for p in params):
            _diverged(params, initial, f"a parameter became non-finite at step {steps}", lr)
        after = held_out_loss()
    finally:
        if bar is not None:
            bar.close()
        for module, mode in modes:
            module.training = mode
    return HealReport(steps, lr, loss_name, history, before, after, time.perf_counter() - start)
