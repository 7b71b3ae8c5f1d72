"""Backend selection shared by every op: Triton kernels or the pure-PyTorch reference.

``auto`` (default) sends CUDA tensors to Triton and everything else to the reference.
``triton`` forces the kernels (on CPU tensors they run under the Triton interpreter) and
``reference`` forces the reference. The choice comes from, in order: the innermost
``tspline_kernels.backend(name)`` block of the current thread (or asyncio task), the
``TSPLINE_BACKEND`` environment variable, ``auto``.

Autograd may run a backward on another thread (CUDA's device threads), where the caller's
override is not in force; every op therefore records the backend at forward time and its
backward runs under that same backend (``register_autograd``).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator

import torch

BACKENDS = ("auto", "triton", "reference")
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("tspline_backend", default=None)


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    return name


def get_backend() -> str:
    """The backend in force now, in this thread: ``"auto"``, ``"triton"`` or ``"reference"``."""
    name = _override.get()
    return name if name is not None else _checked(os.environ.get("TSPLINE_BACKEND", "auto"))


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force ``name`` (``auto``, ``triton`` or ``reference``) for every op inside the block, in the
    current thread (or asyncio task) only; blocks nest."""
    token = _override.set(_checked(name))
    try:
        yield
    finally:
        _override.reset(token)


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on tensor ``t`` runs the Triton kernels under the current backend."""
    name = get_backend()
    return t.is_cuda if name == "auto" else name == "triton"


def register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    """``op.register_autograd(backward, setup_context=...)``, with the backend in force at forward
    time recorded in ``ctx`` and forced again while ``backward`` runs, whatever thread runs it."""
    def setup(ctx, inputs, output) -> None:
        ctx.tspline_backend = get_backend()
        setup_context(ctx, inputs, output)

    def replay(ctx, *grads):
        with backend(ctx.tspline_backend):
            return backward(ctx, *grads)

    op.register_autograd(replay, setup_context=setup)


def owned(out):
    """A forward op's result (a tensor or a tuple of tensors) with every view of the op's own
    scratch (the launchers and references reshape a 2-D result back to ``(*, n)``) re-labelled as
    a plain tensor (``aten._unsafe_view``: no copy). Autograd forbids in-place ops on a view
    returned by a custom Function, so without this ``nn.ReLU(inplace=True)`` or ``y += r`` after
    the layer raise, where they work after ``nn.Linear`` (FSDP2 also warns about view outputs)."""
    if isinstance(out, tuple):
        return tuple(owned(t) for t in out)
    return torch.ops.aten._unsafe_view(out, out.shape) if out._is_view() else out
