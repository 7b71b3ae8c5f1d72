"""``torch.library`` custom ops for TTLinear: Triton on CUDA (or when forced), reference otherwise.

``strategy`` ("auto", "contract" or "rebuild", see ``tt/cost.py``) picks the Triton kernels; the
reference ignores it. Autograd is written with the same ops, so ``torch.compile(fullgraph=True)``
traces straight through:
  d(cores) and dx = tt_grad(dy, x, cores, need_dx=True)   (one backward sweep gives both),
  dx alone        = tt_linear(dy, cores with the o and i axes swapped)   (the TT matrix of W.T).
tt_grad is linear in dy, in x and in each core, so its own backward is again a sum of these two
ops (``_multilinear.multilinear_double_backward``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._backend import kernels_of, owned, register_autograd, use_triton
from .._multilinear import linear_backward, multilinear_double_backward, transpose_factors
from ..reference import tt as ref
from ..reference.common import compute_dtype, grad_dtype


_kernels = kernels_of(__package__)  # the Triton launchers, imported on first use


@torch.library.custom_op("tspline::tt_linear", mutates_args=())
def tt_linear(x: Tensor, cores: list[Tensor], bias: Tensor | None, strategy: str) -> Tensor:
    """y = x @ W.T + bias; x ``(*, prod I_k)``, cores ``(r_{k-1}, O_k, I_k, r_k)`` -> ``(*, prod O_k)``."""
    if use_triton(x):
        return owned(_kernels().tt_linear(x, cores, bias, strategy))
    return owned(ref.tt_linear(x, cores, bias))


@tt_linear.register_fake
def _(x, cores, bias, strategy):
    return x.new_empty(*x.shape[:-1], math.prod(c.shape[1] for c in cores))


@torch.library.custom_op("tspline::tt_grad", mutates_args=())
def tt_grad(dy: Tensor, x: Tensor, cores: list[Tensor], strategy: str, need_dx: bool) -> list[Tensor]:
    """``[dG_1, ..., dG_d]`` of sum(dy * (x @ W.T)), accumulated in fp32 (fp64 for fp64 inputs) and
    returned in the cores' dtype (``grad_dtype``: the compute dtype if they differ), then
    ``dx = dy @ W`` (x's shape and dtype) if ``need_dx``; dy ``(*, O)``, x ``(*, I)``."""
    dtype = grad_dtype(compute_dtype(dy), *cores)
    if use_triton(dy):
        return _kernels().tt_grad(dy, x, cores, strategy, need_dx, dtype)
    grads = ref.tt_grad(dy, x, cores, need_dx)
    return [g.to(dtype) for g in grads[:len(cores)]] + grads[len(cores):]


@tt_grad.register_fake
def _(dy, x, cores, strategy, need_dx):
    dtype = grad_dtype(compute_dtype(dy), *cores)
    return [dy.new_empty(c.shape, dtype=dtype) for c in cores] + ([x.new_empty(x.shape)] if need_dx else [])


def _grad_setup(ctx, inputs, output):
    dy, x, cores, strategy, need_dx = inputs
    ctx.save_for_backward(dy, x, *cores)
    ctx.strategy = strategy


def _grad_backward(ctx, grads):
    dy, x, *cores = ctx.saved_tensors
    s = ctx.strategy
    d_dy, d_x, d_cores = multilinear_double_backward(
        ctx, grads, cores, dy, x,
        forward=lambda a, cs: tt_linear(a, cs, None, s),
        adjoint=lambda a, cs: tt_linear(a, transpose_factors(cs), None, s),
        grad_params=lambda u, v, cs: tt_grad(u, v, cs, s, False),
    )
    return d_dy, d_x, d_cores, None, None


register_autograd(tt_grad, _grad_backward, _grad_setup)


def _linear_setup(ctx, inputs, output):
    x, cores, bias, strategy = inputs
    ctx.save_for_backward(x, *cores)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.strategy = strategy


def _linear_backward(ctx, dy):
    x, *cores = ctx.saved_tensors
    s = ctx.strategy
    dx, d_cores, db = linear_backward(ctx, dy, cores, grad_op=lambda need_dx: tt_grad(dy, x, cores, s, need_dx),
                                      adjoint=lambda transposed: tt_linear(dy, transposed, None, s))
    return dx, d_cores, db, None


register_autograd(tt_linear, _linear_backward, _linear_setup)
