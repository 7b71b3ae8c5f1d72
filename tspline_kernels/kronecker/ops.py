"""``torch.library`` custom ops for KroneckerLinear: Triton on CUDA (or when forced), reference otherwise.

Each op has a fake implementation and an autograd formula built from ops, so
``torch.compile(fullgraph=True)`` traces straight through. For y[r] = A X[r] B.T + bias:
  dx = kronecker_linear(dy, A.T, B.T) (the same fused kernel on transposed views),
  (dA, dB, dbias) = kronecker_grad_factors(x, dy, A, B, dtype)
                  = (sum_r dY[r] B X[r].T, sum_r dY[r].T A X[r], sum_r dY[r])
in the parameters' dtype (the kernel rounds once: no cast after it).
Nothing is saved but the inputs: the per-row intermediates are as large as x, so the backward
recomputes them on chip instead of storing them.

The two-mode gated layer is kronecker_gated_linear(x, parameters...) = (kronecker_linear(x, A', B',
b_eff), A', B') with the maps (A', B', b_eff) its gates give for the batch; A' and B' are outputs
(not differentiable) for the backward. On the Triton backend the backward reuses them for
kronecker_grad_factors' (dA', dB', dbias) and dx, and the gate kernel pulls those back through the
maps; else the reference recomputes the maps under autograd and pulls back.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import vjp

from .._backend import eager_mode, kernels_of, owned, register_autograd, use_triton
from .._layers import cast
from ..reference import kronecker as ref
from ..reference.common import bias_grad, compute_dtype, grad_dtype

_kernels = kernels_of(__package__)  # the Triton launchers, imported on first use


# ----------------------------------------------------------------------------------- forward op
@torch.library.custom_op("tspline::kronecker_linear", mutates_args=())
def kronecker_linear(x: Tensor, a: Tensor, b: Tensor, bias: Tensor | None) -> Tensor:
    """y[r] = A X[r] B.T + bias ``(*, m_1 m_2)`` in x's dtype; x ``(*, n_1 n_2)``, a ``(m_1, n_1)``,
    b ``(m_2, n_2)``, bias ``(m_1 m_2,)``, X[r] = x[r].reshape(n_1, n_2)."""
    if use_triton(x):
        return owned(_kernels().kronecker_linear(x, a, b, bias))
    return owned(ref.kronecker_linear(x, a, b, bias))


@kronecker_linear.register_fake
def _(x, a, b, bias):
    return x.new_empty(*x.shape[:-1], a.shape[0] * b.shape[0])


# --------------------------------------------------------------------------- factor-gradient op
@torch.library.custom_op("tspline::kronecker_grad_factors", mutates_args=())
def kronecker_grad_factors(x: Tensor, dy: Tensor, a: Tensor, b: Tensor, dtype: torch.dtype
                           ) -> tuple[Tensor, Tensor, Tensor]:
    """(sum_r dY[r] B X[r].T ``(m_1, n_1)``, sum_r dY[r].T A X[r] ``(m_2, n_2)``, dy's row sum
    ``(m_1 m_2,)``) over the leading dims of x ``(*, n_1 n_2)`` and dy ``(*, m_1 m_2)``, in the
    compute dtype, returned in ``dtype``."""
    if use_triton(x):
        return _kernels().kronecker_grad_factors(x, dy, a, b, dtype)
    return ref.kronecker_grad_factors(x, dy, a, b, dtype)


@kronecker_grad_factors.register_fake
def _(x, dy, a, b, dtype):
    return a.new_empty(a.shape, dtype=dtype), b.new_empty(b.shape, dtype=dtype), dy.new_empty(dy.shape[-1], dtype=dtype)


def _grad_factors_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.set_materialize_grads(False)


def _grad_factors_backward(ctx, gda, gdb, gsum):
    """The op is linear in each of x, dy, a, b. With G = gda and H = gdb:
    dX[r] = G.T dY[r] B + A.T dY[r] H, d(dY)[r] = G X[r] B.T + A X[r] H.T + gsum,
    dA = sum_r dY[r] H X[r].T and dB = sum_r dY[r].T G X[r]: the forward op and this op again."""
    x, dy, a, b = ctx.saved_tensors
    need_x, need_dy, need_a, need_b, _ = ctx.needs_input_grad
    g = torch.zeros_like(a) if gda is None else gda.to(a.dtype)
    h = torch.zeros_like(b) if gdb is None else gdb.to(b.dtype)
    dx = ddy = da = db = None
    if need_x:
        dx = (kronecker_linear(dy, g.mT, b.mT, None) + kronecker_linear(dy, a.mT, h.mT, None)).to(x.dtype)
    if need_dy:
        bias = None if gsum is None else gsum.to(dy.dtype)
        ddy = (kronecker_linear(x, g, b, bias) + kronecker_linear(x, a, h, None)).to(dy.dtype)
    if need_a or need_b:
        ga, gb, _ = kronecker_grad_factors(x, dy, g, h, grad_dtype(compute_dtype(x), a, b))
        da, db = (ga.to(a.dtype) if need_a else None), (gb.to(b.dtype) if need_b else None)
    return dx, ddy, da, db, None


register_autograd(kronecker_grad_factors, _grad_factors_backward, _grad_factors_setup)


# --------------------------------------------------------------------------- forward's autograd
def _linear_setup(ctx, inputs, output):
    x, a, b, bias = inputs
    ctx.save_for_backward(x, a, b)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _linear_backward(ctx, dy):
    x, a, b = ctx.saved_tensors
    need_x, need_a, need_b, need_bias = ctx.needs_input_grad
    dx = da = db = dbias = None
    if need_x:
        dx = kronecker_linear(dy, a.mT, b.mT, None)
    if need_a or need_b:
        da, db, dsum = kronecker_grad_factors(x, dy, a, b, grad_dtype(compute_dtype(x), a, b, ctx.bias_dtype))
        da = cast(da, a.dtype) if need_a else None
        db = cast(db, b.dtype) if need_b else None
        if need_bias and ctx.bias_dtype is not None:
            dbias = cast(dsum, ctx.bias_dtype)
    elif need_bias and ctx.bias_dtype is not None:
        dbias = bias_grad(dy, ctx.bias_dtype)
    return dx, da, db, dbias


register_autograd(kronecker_linear, _linear_backward, _linear_setup)


# ------------------------------------------------------------------------- gated layer (two modes)
@torch.library.custom_op("tspline::kronecker_gated_linear", mutates_args=())
def kronecker_gated_linear(
    x: Tensor, a: Tensor, b: Tensor, bias_a: Tensor | None, bias_b: Tensor | None,
    w1_a: Tensor | None, b1_a: Tensor | None, w2_a: Tensor | None, b2_a: Tensor | None,
    p_a: Tensor | None, pb_a: Tensor | None,
    w1_b: Tensor | None, b1_b: Tensor | None, w2_b: Tensor | None, b2_b: Tensor | None,
    p_b: Tensor | None, pb_b: Tensor | None, hard: bool, transform_outer: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The two-mode gated layer (y ``(*, m_1 m_2)``, A' ``(m_1, n_1)``, B' ``(m_2, n_2)``), all in
    x's dtype, for x ``(*, n_1 n_2)``: the fused op on the mixed factors and effective bias its
    gates give for this batch (arguments: ``reference.kronecker.gated_maps``), and those mixed
    factors, which the backward reuses (not differentiable)."""
    run = _kernels().gated_linear if use_triton(x) else ref.kronecker_gated_linear
    y, a_mixed, b_mixed = run(x, a, b, bias_a, bias_b, w1_a, b1_a, w2_a, b2_a, p_a, pb_a,
                              w1_b, b1_b, w2_b, b2_b, p_b, pb_b, hard, transform_outer)
    # without gates a map can be the factor itself: an op's outputs must not alias its inputs
    return owned(y), a_mixed.clone() if a_mixed is a else a_mixed, b_mixed.clone() if b_mixed is b else b_mixed


@kronecker_gated_linear.register_fake
def _(x, a, b, *rest):
    return x.new_empty(*x.shape[:-1], a.shape[0] * b.shape[0]), x.new_empty(a.shape), x.new_empty(b.shape)


def _gated_setup(ctx, inputs, output):
    ctx.tensors = [i for i, t in enumerate(inputs) if isinstance(t, Tensor)]
    ctx.flags = inputs[-2:]
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*(inputs[i] for i in ctx.tensors), output[1], output[2])


def _gated_backward(ctx, dy, _a_mixed, _b_mixed):
    """dx = the fused op on (A'.T, B'.T), plus the path through the batch mean; every parameter's
    gradient is the pullback of kronecker_grad_factors' (dA', dB', dbias) through the maps. On
    the Triton backend the forward's maps serve both and the gate kernel pulls back
    (``gated_grads``). Else, and where the backward is traced or differentiated (create_graph),
    the reference recomputes the maps under ``torch.func.vjp`` (traceable, differentiable again),
    or plain autograd in eager mode (~30% less host time)."""
    if dy is None:  # only the maps were used: they are not differentiable
        return (None,) * ctx.n_inputs
    *saved, a, b = ctx.saved_tensors
    args: list = [None] * (ctx.n_inputs - 2) + list(ctx.flags)
    for i, t in zip(ctx.tensors, saved):
        args[i] = t
    x = saved[0]
    plain = not torch.is_grad_enabled() and eager_mode(saved) is not None
    pulled = _kernels().gated_grads(x, dy, a, b, *args[1:]) if plain and use_triton(x) else None
    row_share = None  # x's gradient through the batch mean, the same for every row
    if pulled is not None:
        row_share, grads = pulled
        grads = [None, *grads, None, None]  # (x, the 16 tensors, the two flags)
    else:
        def reference_maps(*tensors):
            for i, t in zip(ctx.tensors, tensors):
                args[i] = t
            return ref.gated_maps(*args)

        if plain:
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in saved]
                outputs = reference_maps(*leaves)
            a, b = outputs[0].detach(), outputs[1].detach()
        else:
            (a, b, _), pullback = vjp(reference_maps, *saved)
        da, db, dsum = kronecker_grad_factors(x, dy, a, b, grad_dtype(compute_dtype(x), a, b))
        cotangents = (da.to(a.dtype), db.to(b.dtype), dsum.to(a.dtype))
        pulled = (torch.autograd.grad(outputs, leaves, cotangents, allow_unused=True) if plain
                  else pullback(cotangents))
        grads = [None] * ctx.n_inputs
        for i, g in zip(ctx.tensors, pulled):
            grads[i] = g
    grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad)]
    if ctx.needs_input_grad[0]:  # the rows' common share added as the fused op's bias: no extra pass
        dx = kronecker_linear(dy, a.mT, b.mT, row_share)
        grads[0] = dx if grads[0] is None else grads[0] + dx  # None: kernels or hard gates (x reaches them only)
    if ctx.flags[0]:  # hard gates are a step function: their networks get no gradient
        grads[5:9] = grads[11:15] = [None] * 4
    return tuple(grads)


register_autograd(kronecker_gated_linear, _gated_backward, _gated_setup)
