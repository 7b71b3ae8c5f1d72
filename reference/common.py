"""Helpers shared by every reference family."""

from __future__ import annotations

import torch


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64; every other float type is computed in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def bias_grad(dy: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Gradient of a bias added over the leading dims of ``dy`` ``(*, n)``: ``(n,)`` in ``dtype``."""
    rows = dy.reshape(-1, dy.shape[-1])
    # one reduction (torch accumulates fp16/bf16 in fp32) rounded once to dtype; to a narrower
    # dtype the sum is taken in dy's and then rounded (sum's dtype= would round every term first)
    return rows.sum(0, dtype=dtype) if dtype.itemsize >= dy.dtype.itemsize else rows.sum(0).to(dtype)


def grad_dtype(fallback: torch.dtype, *params: torch.Tensor | torch.dtype | None) -> torch.dtype:
    """The dtype a factor-gradient op should return: the one dtype of ``params`` (tensors or dtypes;
    None skipped), so that no cast follows the op; ``fallback`` (the compute dtype, each gradient
    then cast to its parameter's) where they differ."""
    dtypes = {p if isinstance(p, torch.dtype) else p.dtype for p in params if p is not None}
    return dtypes.pop() if len(dtypes) == 1 else fallback
