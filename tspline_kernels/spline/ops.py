"""``torch.library`` custom ops for SplineLinear: Triton on CUDA (or when forced), reference otherwise.

Each forward op has a fake implementation and an autograd formula built from other ops, so
``torch.compile(fullgraph=True)`` traces straight through. Backward:
  separable: dx = separable_linear(dy, C.T) (the same two passes, per level, with the axes swapped),
             dC = separable_grad_control(dy, x) per level, in the parameters' dtype (Triton: the input
             pass on dy and on x, then their product, rounded once), and with the first level d(bias),
             which the input pass on dy sums from the blocks it loads;
  field:     field_linear_backward gives dx, d(control, log_bandwidth) (one vector) and d(bias) together
             (the reference builds each weight block once for both; Triton runs the transposed matmul
             and a reduction kernel whose partial sums hold both, and which sums d(bias) from the dy
             tiles it loads);
             its own backward (double backward) is the vector-Jacobian product of the reference maths.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._backend import kernels_of, owned, register_autograd, use_triton
from .._layers import cast
from ..reference import spline as ref
from ..reference.common import bias_grad

_kernels = kernels_of(__package__)  # the Triton launchers, imported on first use


# --------------------------------------------------------------------------------------- separable
@torch.library.custom_op("tspline::separable_linear", mutates_args=())
def separable_linear(x: Tensor, control: Tensor, bias: Tensor | None, out_features: int, kind: int,
                     fine: Tensor | None = None) -> Tensor:
    """y = ((x @ Bi) @ C.T) @ Bo.T + bias (+ the same through ``fine``, a second level's grid: a
    hierarchical layer's, whose output pass adds the first level's output, in x's dtype, before its
    one rounding); x ``(*, n_in)``, C ``(G_out, G_in)``, fine ``(G_out', G_in')`` -> ``(*, out_features)``.
    Two tensors, not a list of levels: a list argument costs an eager call ~10 us of packing."""
    controls = [control] if fine is None else [control, fine]
    if use_triton(x):
        return owned(_kernels().separable_levels(x, controls, bias, out_features, kind))
    return owned(ref.separable_levels(x, controls, bias, out_features, kind))


@separable_linear.register_fake
def _(x, control, bias, out_features, kind, fine=None):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("tspline::separable_grad_control", mutates_args=())
def separable_grad_control(u: Tensor, v: Tensor, g_out: int, g_in: int, kind: int, dtype: torch.dtype,
                           bias_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """(dC, d_bias): dC = (u @ Bo).T @ (v @ Bi) in fp32 (fp64 for fp64 inputs), returned in ``dtype``;
    d_bias u's row sum ``(n_out,)`` in ``bias_dtype`` (empty for None); u ``(*, n_out)``, v ``(*, n_in)``."""
    if use_triton(u):
        return _kernels().separable_grad_control(u, v, g_out, g_in, kind, dtype, bias_dtype)
    return ref.separable_grad_control(u, v, g_out, g_in, kind, dtype, bias_dtype)


@separable_grad_control.register_fake
def _(u, v, g_out, g_in, kind, dtype, bias_dtype):
    return (u.new_empty(g_out, g_in, dtype=dtype),
            u.new_empty(0 if bias_dtype is None else u.shape[-1], dtype=bias_dtype or u.dtype))


def _grad_control_setup(ctx, inputs, output):
    u, v, g_out, g_in, kind, dtype, bias_dtype = inputs
    ctx.save_for_backward(u, v)
    ctx.kind = kind
    ctx.set_materialize_grads(False)


def _grad_control_backward(ctx, grad, grad_bias):
    """dC is bilinear in (u, v): du = v @ (Bo G Bi.T).T and dv = u @ (Bo G Bi.T), both separable;
    d_bias, u's row sum, adds its gradient to every row of du."""
    u, v = ctx.saved_tensors
    du = dv = None
    if grad is not None:
        grad = grad.to(u.dtype)
        du = separable_linear(v, grad, None, u.shape[-1], ctx.kind, None) if ctx.needs_input_grad[0] else None
        dv = separable_linear(u, grad.mT, None, v.shape[-1], ctx.kind, None) if ctx.needs_input_grad[1] else None
    if grad_bias is not None and grad_bias.numel() and ctx.needs_input_grad[0]:
        du_bias = grad_bias.to(u.dtype).expand(u.shape)
        du = du_bias if du is None else du + du_bias
    return du, dv, None, None, None, None, None


register_autograd(separable_grad_control, _grad_control_backward, _grad_control_setup)


def _separable_setup(ctx, inputs, output):
    x, control, bias, out_features, kind, fine = inputs
    ctx.save_for_backward(x, control, fine)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.kind = kind
    # read here, not from needs_input_grad: torch.library's dispatch drops a trailing default argument
    ctx.has_fine = fine is not None


def _separable_backward(ctx, dy):
    """dx: the same levels on W.T's grids (C.T); dC per level; d bias."""
    x, control, fine = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx = dc = db = d_fine = None
    if need[0]:
        dx = separable_linear(dy, control.mT, None, x.shape[-1], ctx.kind, None if fine is None else fine.mT)
    bias_dtype = ctx.bias_dtype if need[2] else None
    if need[1]:  # the bias gradient from the input pass on dy that dC runs anyway
        dc, db = separable_grad_control(dy, x, control.shape[0], control.shape[1], ctx.kind, control.dtype,
                                        bias_dtype)
    elif bias_dtype is not None:
        db = bias_grad(dy, bias_dtype)
    if ctx.has_fine and need[5]:
        d_fine, _ = separable_grad_control(dy, x, fine.shape[0], fine.shape[1], ctx.kind, fine.dtype, None)
    return dx, dc, None if bias_dtype is None else db, None, None, d_fine


register_autograd(separable_linear, _separable_backward, _separable_setup)


# ------------------------------------------------------------------------------------------- field
@torch.library.custom_op("tspline::field_linear", mutates_args=())
def field_linear(
    a: Tensor, control: Tensor, lattice: Tensor, log_bandwidth: Tensor | None, bias: Tensor | None,
    n_out: int, n_in: int, basis: int, rho: float, transpose: bool,
) -> Tensor:
    """``a @ W.T + bias`` (a ``(*, n_in)``) or ``a @ W + bias`` if ``transpose`` (a ``(*, n_out)``),
    W ``(n_out, n_in)`` interpolated from ``control`` at the ``lattice`` points; the Gaussian's width
    is ``ref.gaussian_width(log_bandwidth)`` (the layer's parameter itself: no ops of its own)."""
    if use_triton(a):
        k = _kernels()
        field = k.Field(control, lattice, log_bandwidth, n_out, n_in, basis, rho)
        return owned(k.field_linear(a, field, bias, transpose))
    return owned(ref.field_linear(a, control, lattice, log_bandwidth, bias, n_out, n_in, basis, rho, transpose))


@field_linear.register_fake
def _(a, control, lattice, log_bandwidth, bias, n_out, n_in, basis, rho, transpose):
    return a.new_empty(*a.shape[:-1], n_in if transpose else n_out)


@torch.library.custom_op("tspline::field_linear_backward", mutates_args=())
def field_linear_backward(
    dy: Tensor, a: Tensor, control: Tensor, lattice: Tensor, log_bandwidth: Tensor | None, n_out: int,
    n_in: int, basis: int, rho: float, transpose: bool, need_input: bool, need_params: bool,
    bias_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(da like a, d_params ``(n + 1,)`` in control's dtype: d_control, then d_log_bandwidth (0 for
    IDW), d_bias: dy's row sum ``(n,)`` in ``bias_dtype``) of ``field_linear``; unrequested ones
    (d_bias: ``bias_dtype`` None) are empty."""
    if use_triton(dy):
        k = _kernels()
        field = k.Field(control, lattice, log_bandwidth, n_out, n_in, basis, rho)
        return k.field_linear_backward(dy, a, field, transpose, need_input, need_params, bias_dtype)
    return ref.field_linear_backward(dy, a, control, lattice, log_bandwidth, n_out, n_in, basis, rho, transpose,
                                     need_input, need_params, bias_dtype)


@field_linear_backward.register_fake
def _(dy, a, control, lattice, log_bandwidth, n_out, n_in, basis, rho, transpose, need_input, need_params,
      bias_dtype):
    da = a.new_empty(a.shape) if need_input else a.new_empty(0)
    return (da, control.new_empty(control.shape[0] + 1 if need_params else 0),
            dy.new_empty(0 if bias_dtype is None else dy.shape[-1], dtype=bias_dtype or dy.dtype))


def _field_setup(ctx, inputs, output):
    a, control, lattice, log_bandwidth, bias, n_out, n_in, basis, rho, transpose = inputs
    ctx.save_for_backward(a, control, lattice, log_bandwidth)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.args = (n_out, n_in, basis, rho, transpose)


def _field_backward(ctx, dy):
    a, control, lattice, log_bandwidth = ctx.saved_tensors
    n_out, n_in, basis, rho, transpose = ctx.args
    need_input = ctx.needs_input_grad[0]
    need_params = ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
    bias_dtype = ctx.bias_dtype if ctx.needs_input_grad[4] else None
    da = dc = dl = db = None
    if need_input or need_params or bias_dtype is not None:
        da, dp, db = field_linear_backward(dy, a, control, lattice, log_bandwidth, n_out, n_in, basis, rho,
                                           transpose, need_input, need_params, bias_dtype)
        da = da if need_input else None
        db = db if bias_dtype is not None else None
        if need_params:  # in control's dtype; log_bandwidth shares it in a layer
            dc = dp[:-1]
            dl = None if log_bandwidth is None else cast(dp[-1:], log_bandwidth.dtype)
    return da, dc, None, dl, db, None, None, None, None, None


register_autograd(field_linear, _field_backward, _field_setup)


def _field_grad_setup(ctx, inputs, output):
    dy, a, control, lattice, log_bandwidth, *args = inputs
    ctx.save_for_backward(dy, a, control, lattice, log_bandwidth)
    ctx.args = args


def _field_grad_backward(ctx, *grads):
    """Second order: the vector-Jacobian product of the reference's ``field_linear_backward``
    (``torch.func.vjp``, itself differentiable), on any device and backend. It builds the weight
    in cache-sized row blocks like the reference forward; double backward is rare enough that no
    dedicated kernel is worth it."""
    dy, a, control, lattice, log_bandwidth = ctx.saved_tensors
    args = ctx.args
    primals = (dy, a, control) + (() if log_bandwidth is None else (log_bandwidth,))

    def grads_of(dy, a, control, *log_bandwidth):
        return ref.field_linear_backward(dy, a, control, lattice, log_bandwidth[0] if log_bandwidth else None, *args)

    outputs, vjp = torch.func.vjp(grads_of, *primals)
    d_dy, d_a, d_control, *d_log_bandwidth = vjp(tuple(torch.zeros_like(o) if g is None else g.to(o.dtype)
                                                      for g, o in zip(grads, outputs)))
    return (d_dy, d_a, d_control, None, d_log_bandwidth[0] if d_log_bandwidth else None) + (None,) * len(args)


register_autograd(field_linear_backward, _field_grad_backward, _field_grad_setup)
