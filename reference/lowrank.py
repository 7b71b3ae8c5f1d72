"""Pure-PyTorch reference for the low-rank layer: the maths every low-rank kernel must match.

LowRankLinear stores ``U`` ``(n_out, r)`` and ``V`` ``(n_in, r)``; its weight is W = U @ V.T,
shape ``(n_out, n_in)`` like ``nn.Linear.weight``, and y = x @ W.T + b = (x @ V) @ U.T + b.

The ops are written for generic factors so that one op serves forward and input gradient:
``lowrank_linear(x, a, b, bias)`` is y = (x @ a) @ b.T + bias together with the rank-r
projection t = x @ a (forward: a = V, b = U; input gradient: a = U, b = V). Every reference
computes in fp32 (fp64 for fp64 inputs) and never forms an ``(n_out, n_in)`` tensor, except
``lowrank_weight`` which is the definition of W.
"""

from __future__ import annotations

import torch

from .common import compute_dtype

__all__ = ["lowrank_weight", "lowrank_linear", "lowrank_grad_factors"]


def lowrank_weight(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense W = U @ V.T, shape ``(n_out, n_in)``, for U ``(n_out, r)`` and V ``(n_in, r)``."""
    cd = compute_dtype(u)
    return u.to(cd) @ v.to(cd).T


def lowrank_linear(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, t) with t = x @ a and y = t @ b.T + bias.

    x ``(*, k)``, a ``(k, r)``, b ``(n, r)``, bias ``(n,)`` -> y ``(*, n)`` in x's dtype and
    t ``(*, r)`` in the compute dtype (fp32, or fp64 for fp64 inputs).
    """
    cd = compute_dtype(x)
    t = x.to(cd) @ a.to(cd)
    y = t @ b.to(cd).T
    if bias is not None:
        y = y + bias.to(cd)
    return y.to(x.dtype), t


def lowrank_grad_factors(
    x: torch.Tensor, dy: torch.Tensor, p: torch.Tensor, q: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x.T @ q, dy.T @ p, dy summed over rows) over the flattened leading dims, accumulated in the
    compute dtype and returned in ``dtype`` (the parameters').

    x ``(*, k)``, dy ``(*, n)``, p ``(*, r)``, q ``(*, r)`` -> ``(k, r)``, ``(n, r)``, ``(n,)``.
    With y = (x @ a) @ b.T + bias, p = x @ a and q = dy @ b these are dL/da, dL/db and dL/dbias.
    """
    cd = compute_dtype(x)
    r = p.shape[-1]
    x2 = x.reshape(-1, x.shape[-1]).to(cd)
    dy2 = dy.reshape(-1, dy.shape[-1]).to(cd)
    return (x2.T @ q.reshape(-1, r).to(cd)).to(dtype), (dy2.T @ p.reshape(-1, r).to(cd)).to(dtype), dy2.sum(0).to(dtype)
