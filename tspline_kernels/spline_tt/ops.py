"""``torch.library`` custom ops for SplineTTLinear: Triton on CUDA (or when forced), reference otherwise.

Same structure as ``tt/ops.py``: d(controls) and dx = spline_tt_grad(dy, x, controls, ..., need_dx);
dx alone = spline_tt_linear(dy, controls with the o and i axes swapped, modes swapped). Each core is
linear in its control tensor, so the gradient op's own backward is ``_multilinear.multilinear_double_backward``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._backend import kernels_of, owned, register_autograd, use_triton
from .._multilinear import linear_backward, multilinear_double_backward, transpose_factors
from ..reference import spline_tt as ref


_kernels = kernels_of(__package__)  # the Triton launchers, imported on first use


@torch.library.custom_op("tspline::spline_tt_linear", mutates_args=())
def spline_tt_linear(x: Tensor, controls: list[Tensor], bias: Tensor | None, in_modes: list[int],
                     out_modes: list[int], strategy: str) -> Tensor:
    """y = x @ W.T + bias; x ``(*, prod in_modes)``, controls ``(r_{k-1}, Go_k, Gi_k, r_k)`` -> ``(*, prod out_modes)``."""
    if use_triton(x):
        return owned(_kernels().spline_tt_linear(x, controls, bias, in_modes, out_modes, strategy))
    return owned(ref.spline_tt_linear(x, controls, bias, in_modes, out_modes))


@spline_tt_linear.register_fake
def _(x, controls, bias, in_modes, out_modes, strategy):
    return x.new_empty(*x.shape[:-1], math.prod(out_modes))


@torch.library.custom_op("tspline::spline_tt_grad", mutates_args=())
def spline_tt_grad(dy: Tensor, x: Tensor, controls: list[Tensor], in_modes: list[int], out_modes: list[int],
                   strategy: str, need_dx: bool) -> list[Tensor]:
    """``[dC_1, ..., dC_d]`` of sum(dy * (x @ W.T)), summed in fp32 (fp64 for fp64 inputs) and
    returned in each control's dtype, then ``dx = dy @ W`` (x's shape and dtype) if ``need_dx``."""
    if use_triton(dy):
        return _kernels().spline_tt_grad(dy, x, controls, in_modes, out_modes, strategy, need_dx)
    return ref.spline_tt_grad(dy, x, controls, in_modes, out_modes, need_dx)


@spline_tt_grad.register_fake
def _(dy, x, controls, in_modes, out_modes, strategy, need_dx):
    return [c.new_empty(c.shape) for c in controls] + ([x.new_empty(x.shape)] if need_dx else [])


def _grad_setup(ctx, inputs, output):
    dy, x, controls, in_modes, out_modes, strategy, need_dx = inputs
    ctx.save_for_backward(dy, x, *controls)
    ctx.args = (list(in_modes), list(out_modes), strategy)


def _grad_backward(ctx, grads):
    dy, x, *controls = ctx.saved_tensors
    ins, outs, s = ctx.args
    d_dy, d_x, d_controls = multilinear_double_backward(
        ctx, grads, controls, dy, x,
        forward=lambda a, cs: spline_tt_linear(a, cs, None, ins, outs, s),
        adjoint=lambda a, cs: spline_tt_linear(a, transpose_factors(cs), None, outs, ins, s),
        grad_params=lambda u, v, cs: spline_tt_grad(u, v, cs, ins, outs, s, False),
    )
    return d_dy, d_x, d_controls, None, None, None, None


register_autograd(spline_tt_grad, _grad_backward, _grad_setup)


def _linear_setup(ctx, inputs, output):
    x, controls, bias, in_modes, out_modes, strategy = inputs
    ctx.save_for_backward(x, *controls)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.args = (list(in_modes), list(out_modes), strategy)


def _linear_backward(ctx, dy):
    x, *controls = ctx.saved_tensors
    ins, outs, s = ctx.args
    dx, d_controls, db = linear_backward(
        ctx, dy, controls, grad_op=lambda need_dx: spline_tt_grad(dy, x, controls, ins, outs, s, need_dx),
        adjoint=lambda transposed: spline_tt_linear(dy, transposed, None, outs, ins, s))
    return dx, d_controls, db, None, None, None


register_autograd(spline_tt_linear, _linear_backward, _linear_setup)
