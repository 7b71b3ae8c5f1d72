"""``torch.library`` custom ops for LowRankLinear: Triton on CUDA (or when forced), reference otherwise.

Each op has a fake implementation and an autograd formula built from ops, so
``torch.compile(fullgraph=True)`` traces straight through. For y = (x @ a) @ b.T + bias with the
projection t = x @ a also returned (the layer passes a = V, b = U):
  dx = lowrank_linear(dy, b, a) (the same fused kernel, roles swapped; its projection is q = dy @ b),
  (da, db, dbias) = lowrank_grad_factors(x, dy, t, q, dtype) = (x.T @ q, dy.T @ t, sum of dy's rows)
  in the parameters' dtype (the kernel rounds once: no cast after it),
so the backward reuses the forward's t and the dx kernel's q: it reads dy twice (dx kernel,
factor kernel) and x once, and the bias gradient is summed from the dy tiles the factor kernel
loads anyway. Recomputing t and q there instead would cost one more pass over each of x and dy.
A gradient flowing into t itself (second-order terms) adds dt @ a.T to dx and dt to q.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._backend import kernels_of, owned, register_autograd, use_triton
from .._layers import cast
from ..reference import lowrank as ref
from ..reference.common import bias_grad, compute_dtype, grad_dtype

_kernels = kernels_of(__package__)  # the Triton launchers, imported on first use


# ----------------------------------------------------------------------------------- forward op
@torch.library.custom_op("tspline::lowrank_linear", mutates_args=())
def lowrank_linear(x: Tensor, a: Tensor, b: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """(y, t): t = x @ a ``(*, r)`` in the compute dtype, y = t @ b.T + bias ``(*, n)`` in x's dtype;
    x ``(*, k)``, a ``(k, r)``, b ``(n, r)``."""
    if use_triton(x):
        return owned(_kernels().lowrank_linear(x, a, b, bias))
    return owned(ref.lowrank_linear(x, a, b, bias))


@lowrank_linear.register_fake
def _(x, a, b, bias):
    lead = x.shape[:-1]
    return x.new_empty(*lead, b.shape[0]), x.new_empty(*lead, a.shape[1], dtype=compute_dtype(x))


# --------------------------------------------------------------------------- factor-gradient op
@torch.library.custom_op("tspline::lowrank_grad_factors", mutates_args=())
def lowrank_grad_factors(x: Tensor, dy: Tensor, p: Tensor, q: Tensor, dtype: torch.dtype
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """(x.T @ q ``(k, r)``, dy.T @ p ``(n, r)``, dy's row sum ``(n,)``) summed over the leading dims
    in the compute dtype, returned in ``dtype``; x ``(*, k)``, dy ``(*, n)``, p and q ``(*, r)``."""
    if use_triton(x):
        return _kernels().lowrank_grad_factors(x, dy, p, q, dtype)
    return ref.lowrank_grad_factors(x, dy, p, q, dtype)


@lowrank_grad_factors.register_fake
def _(x, dy, p, q, dtype):
    r = p.shape[-1]
    n = dy.shape[-1]
    return x.new_empty(x.shape[-1], r, dtype=dtype), x.new_empty(n, r, dtype=dtype), x.new_empty(n, dtype=dtype)


def _mm(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """a @ b in the compute dtype, returned in ``dtype`` (rank-r products only, never n_out x n_in)."""
    cd = compute_dtype(a)
    return (a.to(cd) @ b.to(cd)).to(dtype)


def _grad_factors_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.set_materialize_grads(False)


def _grad_factors_backward(ctx, gda, gdb, gsum):
    """The op is bilinear: da = x.T q gives dx = q gda.T, dq = x gda; db = dy.T p gives
    d(dy) = p gdb.T, dp = dy gdb (all rank-r products); the row sum gives d(dy) += gsum."""
    x, dy, p, q = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx = ddy = dp = dq = None
    if gda is not None:
        dx = _mm(q, gda.mT, x.dtype) if need[0] else None
        dq = _mm(x, gda, q.dtype) if need[3] else None
    if gdb is not None:
        ddy = _mm(p, gdb.mT, dy.dtype) if need[1] else None
        dp = _mm(dy, gdb, p.dtype) if need[2] else None
    if gsum is not None and need[1]:
        ddy_sum = gsum.to(dy.dtype).expand(dy.shape)
        ddy = ddy_sum if ddy is None else ddy + ddy_sum
    return dx, ddy, dp, dq, None


register_autograd(lowrank_grad_factors, _grad_factors_backward, _grad_factors_setup)


# --------------------------------------------------------------------------- forward's autograd
def _linear_setup(ctx, inputs, output):
    x, a, b, bias = inputs
    ctx.save_for_backward(x, a, b, output[1])
    ctx.bias_dtype = None if bias is None else bias.dtype
    # The layer discards t: its gradient then arrives as None rather than a zero tensor.
    ctx.set_materialize_grads(False)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _linear_backward(ctx, dy, dt):
    x, a, b, t = ctx.saved_tensors
    need_x, need_a, need_b, need_bias = ctx.needs_input_grad
    if dy is None and dt is None:
        return None, None, None, None
    dx = q = None
    if dy is not None and need_x:
        dx, q = lowrank_linear(dy, b, a, None)
    elif dy is not None and need_a:
        q = _mm(dy, b, t.dtype)  # dx is not wanted: only the projection dy @ b
    if dt is not None:  # second order: t itself reaches the loss
        if need_x:
            dx_t = _mm(dt, a.mT, x.dtype)
            dx = dx_t if dx is None else dx + dx_t
        if need_a:
            q = dt if q is None else q + dt
    da = db = dbias = None
    want_b = need_b and dy is not None
    if need_a and want_b:
        da, db, dsum = lowrank_grad_factors(x, dy, t, q, grad_dtype(t.dtype, a, b, ctx.bias_dtype))
        if need_bias and ctx.bias_dtype is not None:
            dbias = cast(dsum, ctx.bias_dtype)
    elif need_a:  # one skinny product only: no need for the two-sided kernel
        da = _mm(_flat(x).mT, _flat(q), t.dtype)
    elif want_b:
        db = _mm(_flat(dy).mT, _flat(t), t.dtype)
    da, db = cast(da, a.dtype), cast(db, b.dtype)
    if dbias is None and need_bias and dy is not None and ctx.bias_dtype is not None:
        dbias = bias_grad(dy, ctx.bias_dtype)
    return dx, da, db, dbias


register_autograd(lowrank_linear, _linear_backward, _linear_setup)
