"""``torch.library`` custom ops for DecoupledSplineMLP: Triton on CUDA (or when forced), reference otherwise.

y = g(x @ V) @ W.T + bias, with z = x @ V ``(*, r)`` and g the per-unit cubic B-spline activation
(``reference/decoupled.py``). The backward is one op, decoupled_mlp_backward, with u = dy @ W and
dz = u * g'(z): its first pass gives (dx = dz @ V.T, G = g(z), dz, dcoef): dcoef[i, j] = sum over
rows of u[:, i] * dg_i/dcoef[i, j] (the four nonzero basis values of each scalar, extrapolation
included), G and dz in the compute dtype; then (dV, dW, dbias) = (x.T @ dz, dy.T @ G, sum of dy's
rows) by the low-rank family's two-sided skinny product (its launcher or reference, called
directly: one op dispatch per backward, not two).
The knot ranges lo, hi are constants (buffers): they get no gradient. Second order runs the
vector-Jacobian product of the reference backward (``torch.func.vjp``), on any backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._backend import kernels_of, owned, register_autograd, use_triton
from .._layers import cast
from ..reference import decoupled as ref
from ..reference import lowrank as lowrank_ref
from ..reference.common import bias_grad, compute_dtype, grad_dtype

_kernels = kernels_of(__package__)  # the Triton launchers, imported on first use
_lowrank_kernels = kernels_of("tspline_kernels.lowrank")


# ------------------------------------------------------------------------------------- forward op
@torch.library.custom_op("tspline::decoupled_mlp", mutates_args=())
def decoupled_mlp(x: Tensor, v: Tensor, w: Tensor, coef: Tensor, lo: Tensor, hi: Tensor,
                  bias: Tensor | None) -> Tensor:
    """y = g(x @ v) @ w.T + bias ``(*, n)`` in x's dtype; x ``(*, m)``, v ``(m, r)``, w ``(n, r)``,
    coef ``(r, K)``, lo/hi ``(r,)`` (hi > lo), bias ``(n,)`` or None."""
    if use_triton(x):
        return owned(_kernels().decoupled_mlp(x, v, w, coef, lo, hi, bias))
    return owned(ref.decoupled_mlp(x, v, w, coef, lo, hi, bias))


@decoupled_mlp.register_fake
def _(x, v, w, coef, lo, hi, bias):
    return x.new_empty(*x.shape[:-1], w.shape[0])


# ------------------------------------------------------------------------------------ backward op
def reference_backward(dy: Tensor, x: Tensor, v: Tensor, w: Tensor, coef: Tensor, lo: Tensor, hi: Tensor,
                       need_input: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``decoupled_mlp_backward`` in plain PyTorch (differentiable by autograd in dy, x, v, w, coef)."""
    cd, coef_dtype = compute_dtype(x), coef.dtype
    x2, dy2 = x.reshape(-1, x.shape[-1]).to(cd), dy.reshape(-1, dy.shape[-1]).to(cd)
    v, coef, lo, hi = v.to(cd), coef.to(cd), lo.to(cd), hi.to(cd)
    z = x2 @ v
    u = dy2 @ w.to(cd)
    g = ref.spline_activation(z, coef, lo, hi)
    dz = u * ref.spline_activation_derivative(z, coef, lo, hi)
    r, k = coef.shape
    first, values, _ = ref.spline_rows(z, lo, hi, k)
    cols = (first + torch.arange(r, device=x.device) * k)[..., None] + torch.arange(4, device=x.device)
    dcoef = torch.zeros(r * k, dtype=cd, device=x.device).index_add(0, cols.reshape(-1), (u[..., None] * values).reshape(-1))
    dx = (dz @ v.T).reshape(x.shape).to(x.dtype) if need_input else x.new_empty(0)
    lead = x.shape[:-1]
    return dx, g.reshape(*lead, r), dz.reshape(*lead, r), dcoef.reshape(r, k).to(coef_dtype)


def _gradients(backward, grad_factors, dy: Tensor, x: Tensor, v: Tensor, w: Tensor, coef: Tensor, lo: Tensor,
               hi: Tensor, need_input: bool, factor_dtype: torch.dtype | None) -> tuple[Tensor, ...]:
    """``decoupled_mlp_backward`` from a first pass ``backward`` (the launcher or
    ``reference_backward``) and a factor-gradient product ``grad_factors`` (the low-rank family's)."""
    dx, g, dz, dcoef = backward(dy, x, v, w, coef, lo, hi, need_input)
    if factor_dtype is None:
        return dx, dcoef, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    return dx, dcoef, *grad_factors(x, dy, g, dz, factor_dtype)


@torch.library.custom_op("tspline::decoupled_mlp_backward", mutates_args=())
def decoupled_mlp_backward(dy: Tensor, x: Tensor, v: Tensor, w: Tensor, coef: Tensor, lo: Tensor, hi: Tensor,
                           need_input: bool, factor_dtype: torch.dtype | None
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx like x (empty unless ``need_input``), dcoef ``(r, K)`` summed in the compute dtype and
    rounded once to coef's, dV ``(m, r)``, dW ``(n, r)``, d_bias ``(n,)`` in ``factor_dtype`` (all
    three empty for None)); dy ``(*, n)``."""
    if use_triton(x):
        return _gradients(_kernels().decoupled_mlp_backward, _lowrank_kernels().lowrank_grad_factors,
                          dy, x, v, w, coef, lo, hi, need_input, factor_dtype)
    return _gradients(reference_backward, lowrank_ref.lowrank_grad_factors, dy, x, v, w, coef, lo, hi, need_input,
                      factor_dtype)


@decoupled_mlp_backward.register_fake
def _(dy, x, v, w, coef, lo, hi, need_input, factor_dtype):
    dx = x.new_empty(x.shape) if need_input else x.new_empty(0)
    if factor_dtype is None:
        return dx, coef.new_empty(coef.shape), x.new_empty(0), x.new_empty(0), x.new_empty(0)
    r = v.shape[1]
    return (dx, coef.new_empty(coef.shape), x.new_empty(v.shape[0], r, dtype=factor_dtype),
            x.new_empty(w.shape[0], r, dtype=factor_dtype), x.new_empty(w.shape[0], dtype=factor_dtype))


def _grad_setup(ctx, inputs, output):
    dy, x, v, w, coef, lo, hi, need_input, factor_dtype = inputs
    ctx.save_for_backward(dy, x, v, w, coef, lo, hi)
    ctx.need_input, ctx.factor_dtype = need_input, factor_dtype


def _grad_backward(ctx, *grads):
    """Second order: the vector-Jacobian product of the reference gradients (``torch.func.vjp``,
    itself differentiable), on any device and backend; rare enough that no kernel is worth it."""
    dy, x, v, w, coef, lo, hi = ctx.saved_tensors
    outputs, vjp = torch.func.vjp(
        lambda *p: _gradients(reference_backward, lowrank_ref.lowrank_grad_factors, *p, lo, hi, ctx.need_input,
                              ctx.factor_dtype), dy, x, v, w, coef)
    cotangents = tuple(torch.zeros_like(o) if g is None else g.to(o.dtype) for g, o in zip(grads, outputs))
    return (*vjp(cotangents), None, None, None, None)


register_autograd(decoupled_mlp_backward, _grad_backward, _grad_setup)


# ---------------------------------------------------------------------------- forward's autograd
def _setup(ctx, inputs, output):
    x, v, w, coef, lo, hi, bias = inputs
    ctx.save_for_backward(x, v, w, coef, lo, hi)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy):
    x, v, w, coef, lo, hi = ctx.saved_tensors
    need_x, need_v, need_w, need_coef, _, _, need_bias = ctx.needs_input_grad
    need_bias = need_bias and ctx.bias_dtype is not None
    dx = dv = dw = dcoef = dbias = None
    if need_x or need_v or need_w or need_coef:
        factors = need_v or need_w
        dx, dcoef, dv, dw, dsum = decoupled_mlp_backward(
            dy, x, v, w, coef, lo, hi, need_x, grad_dtype(compute_dtype(x), v, w, ctx.bias_dtype) if factors else None)
        dx = dx if need_x else None
        dcoef = dcoef if need_coef else None
        if factors:
            dv = cast(dv, v.dtype) if need_v else None
            dw = cast(dw, w.dtype) if need_w else None
            dbias = cast(dsum, ctx.bias_dtype) if need_bias else None
    if need_bias and dbias is None:
        dbias = bias_grad(dy, ctx.bias_dtype)
    return dx, dv, dw, dcoef, None, None, dbias


register_autograd(decoupled_mlp, _backward, _setup)
