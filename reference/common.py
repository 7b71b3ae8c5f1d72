"""Helpers shared by every reference family."""

from __future__ import annotations

import torch


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64; every other float type is computed in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def bias_grad(dy: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Gradient of a bias added over the leading dims of ``dy`` ``(*, n)``: ``(n,)`` in ``dtype``."""
    return dy.reshape(-1, dy.shape[-1]).sum(0, dtype=compute_dtype(dy)).to(dtype)
