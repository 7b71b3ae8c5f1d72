"""Backend selection shared by every op: Triton kernels or the pure-PyTorch reference.

``auto`` (default) sends CUDA tensors to Triton and everything else to the reference.
``triton`` forces the kernels (on CPU tensors they run under the Triton interpreter) and
``reference`` forces the reference. The choice comes from, in order: the innermost
``tspline_kernels.backend(name)`` block, the ``TSPLINE_BACKEND`` environment variable, ``auto``.
The override is process-wide (not per thread) so that autograd's backward threads see it too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "reference")
_stack: list[str] = []


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    return name


def get_backend() -> str:
    """The backend in force now: ``"auto"``, ``"triton"`` or ``"reference"``."""
    if _stack:
        return _stack[-1]
    return _checked(os.environ.get("TSPLINE_BACKEND", "auto"))


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force ``name`` (``auto``, ``triton`` or ``reference``) for every op inside the block."""
    _stack.append(_checked(name))
    try:
        yield
    finally:
        _stack.pop()


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on tensor ``t`` runs the Triton kernels under the current backend."""
    name = get_backend()
    return t.is_cuda if name == "auto" else name == "triton"
