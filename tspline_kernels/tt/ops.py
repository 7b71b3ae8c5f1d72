"""``torch.library`` custom ops for TTLinear: Triton on CUDA (or when forced), reference otherwise.

``strategy`` ("auto", "contract" or "rebuild", see ``tt/cost.py``) picks the Triton kernels; the
reference ignores it. Autograd is written with the same ops, so ``torch.compile(fullgraph=True)``
traces straight through:
  d(cores) and dx = tt_grad(dy, x, cores, need_dx=True)   (one backward sweep gives both),
  dx alone        = tt_linear(dy, cores with the o and i axes swapped)   (the TT matrix of W.T).
tt_grad is linear in dy, in x and in each core, so its own backward is again a sum of these two
ops (``multilinear_double_backward``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._backend import owned, register_autograd, use_triton
from ..reference import tt as ref
from ..reference.common import bias_grad, compute_dtype


def transpose_cores(cores: list[Tensor]) -> list[Tensor]:
    """Cores of W.T: ``(r0, O, I, r1) -> (r0, I, O, r1)`` views."""
    return [c.transpose(1, 2) for c in cores]


@torch.library.custom_op("tspline::tt_linear", mutates_args=())
def tt_linear(x: Tensor, cores: list[Tensor], bias: Tensor | None, strategy: str) -> Tensor:
    """y = x @ W.T + bias; x ``(*, prod I_k)``, cores ``(r_{k-1}, O_k, I_k, r_k)`` -> ``(*, prod O_k)``."""
    if use_triton(x):
        from .kernels import tt_linear as launch
        return owned(launch(x, cores, bias, strategy))
    return owned(ref.tt_linear(x, cores, bias))


@tt_linear.register_fake
def _(x, cores, bias, strategy):
    return x.new_empty(*x.shape[:-1], math.prod(c.shape[1] for c in cores))


@torch.library.custom_op("tspline::tt_grad", mutates_args=())
def tt_grad(dy: Tensor, x: Tensor, cores: list[Tensor], strategy: str, need_dx: bool) -> list[Tensor]:
    """``[dG_1, ..., dG_d]`` of sum(dy * (x @ W.T)) in fp32 (fp64 for fp64 inputs), then ``dx = dy @ W``
    (x's shape and dtype) if ``need_dx``; dy ``(*, O)``, x ``(*, I)``."""
    if use_triton(dy):
        from .kernels import tt_grad as launch
        return launch(dy, x, cores, strategy, need_dx)
    return ref.tt_grad(dy, x, cores, need_dx)


@tt_grad.register_fake
def _(dy, x, cores, strategy, need_dx):
    return [dy.new_empty(c.shape, dtype=compute_dtype(dy)) for c in cores] + ([x.new_empty(x.shape)] if need_dx else [])


def multilinear_double_backward(ctx, grads, params: list[Tensor], dy: Tensor, x: Tensor,
                                 forward, adjoint, grad_params):
    """Backward of a gradient op returning ``[df/dP_1, ..., df/dP_d] (+ [dx])`` for
    f = sum(dy * forward(x, params)), ``forward`` linear in x and in each parameter tensor (TT cores,
    spline controls); ``adjoint(a, params)`` is a @ W and ``grad_params(dy, x, params)`` the list of
    df/dP_j.

    With Gk the gradient flowing into output k, sum_k <Gk, df/dP_k> = sum_k f(dy, x, params[k := Gk])
    by linearity in P_k, so d/d(dy) = sum_k forward(x, params_k), d/dx = sum_k adjoint(dy, params_k)
    and d/dP_j = sum_{k != j} grad_params(dy, x, params_k)[j]. The dx output (dy @ W) with incoming
    Gx adds forward(Gx, params) to d/d(dy) and grad_params(dy, Gx, params) to every d/dP_j.
    ``needs_input_grad`` is ``(dy, x, [one per parameter], ...)``. Returns ``(d_dy, d_x, d_params)``.
    """
    need = ctx.needs_input_grad
    d = len(params)
    d_dy = d_x = None
    d_params: list[Tensor | None] = [None] * d

    def add(acc, term):
        return term if acc is None else acc + term

    for k, g in enumerate(grads[:d]):
        if g is None:
            continue
        swapped = params[:k] + [g.to(params[k].dtype)] + params[k + 1:]
        if need[0]:
            d_dy = add(d_dy, forward(x, swapped))
        if need[1]:
            d_x = add(d_x, adjoint(dy, swapped))
        if any(need[2]) and d > 1:
            for j, gj in enumerate(grad_params(dy, x, swapped)):
                if j != k:
                    d_params[j] = add(d_params[j], gj.to(params[j].dtype))
    gx = grads[d] if len(grads) > d else None
    if gx is not None:
        if need[0]:
            d_dy = add(d_dy, forward(gx, params))
        if any(need[2]):
            for j, gj in enumerate(grad_params(dy, gx, params)):
                d_params[j] = add(d_params[j], gj.to(params[j].dtype))
    return d_dy, d_x, d_params


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
        adjoint=lambda a, cs: tt_linear(a, transpose_cores(cs), None, s),
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
    need = ctx.needs_input_grad  # (x, [one per core], bias, strategy)
    dx = db = None
    d_cores = [None] * len(cores)  # the list input needs a list of gradients
    if any(need[1]):
        grads = tt_grad(dy, x, cores, ctx.strategy, need[0])
        d_cores = [g.to(c.dtype) for g, c in zip(grads, cores)]
        dx = grads[-1] if need[0] else None
    elif need[0]:
        dx = tt_linear(dy, transpose_cores(cores), None, ctx.strategy)
    if ctx.bias_dtype is not None and need[2]:
        db = bias_grad(dy, ctx.bias_dtype)
    return dx, d_cores, db, None


register_autograd(tt_linear, _linear_backward, _linear_setup)
