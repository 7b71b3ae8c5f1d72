"""``torch.library`` custom ops for SplineLinear: Triton on CUDA (or when forced), reference otherwise.

Each forward op has a fake implementation and an autograd formula built from other ops, so
``torch.compile(fullgraph=True)`` traces straight through. Backward:
  separable: dx = separable_linear(dy, C.T) (the same fused kernel with the axes swapped),
             dC = separable_grad_control(dy, x);
  field:     dx = field_linear(dy, transpose=not transpose), d(control, sigma) = field_grad_params.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._backend import use_triton
from ..reference import spline as ref
from ..reference.common import bias_grad, compute_dtype


# --------------------------------------------------------------------------------------- separable
@torch.library.custom_op("tspline::separable_linear", mutates_args=())
def separable_linear(x: Tensor, control: Tensor, bias: Tensor | None, out_features: int, kind: int) -> Tensor:
    """y = ((x @ Bi) @ C.T) @ Bo.T + bias; x ``(*, n_in)``, C ``(G_out, G_in)`` -> ``(*, out_features)``."""
    if use_triton(x):
        from .kernels import separable_linear as launch
        return launch(x, control, bias, out_features, kind)
    return ref.separable_linear(x, control, bias, out_features, kind)


@separable_linear.register_fake
def _(x, control, bias, out_features, kind):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("tspline::separable_grad_control", mutates_args=())
def separable_grad_control(u: Tensor, v: Tensor, g_out: int, g_in: int, kind: int) -> Tensor:
    """dC = (u @ Bo).T @ (v @ Bi) in fp32 (fp64 for fp64 inputs): u ``(*, n_out)``, v ``(*, n_in)``."""
    if use_triton(u):
        from .kernels import separable_grad_control as launch
        return launch(u, v, g_out, g_in, kind)
    return ref.separable_grad_control(u, v, g_out, g_in, kind)


@separable_grad_control.register_fake
def _(u, v, g_out, g_in, kind):
    return u.new_empty(g_out, g_in, dtype=compute_dtype(u))


def _grad_control_setup(ctx, inputs, output):
    u, v, g_out, g_in, kind = inputs
    ctx.save_for_backward(u, v)
    ctx.kind = kind


def _grad_control_backward(ctx, grad):
    """dC is bilinear in (u, v): du = v @ (Bo G Bi.T).T and dv = u @ (Bo G Bi.T), both separable."""
    u, v = ctx.saved_tensors
    grad = grad.to(u.dtype)
    du = separable_linear(v, grad, None, u.shape[-1], ctx.kind) if ctx.needs_input_grad[0] else None
    dv = separable_linear(u, grad.mT, None, v.shape[-1], ctx.kind) if ctx.needs_input_grad[1] else None
    return du, dv, None, None, None


separable_grad_control.register_autograd(_grad_control_backward, setup_context=_grad_control_setup)


def _separable_setup(ctx, inputs, output):
    x, control, bias, out_features, kind = inputs
    ctx.save_for_backward(x, control)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.kind = kind


def _separable_backward(ctx, dy):
    x, control = ctx.saved_tensors
    dx = dc = db = None
    if ctx.needs_input_grad[0]:
        dx = separable_linear(dy, control.mT, None, x.shape[-1], ctx.kind)
    if ctx.needs_input_grad[1]:
        dc = separable_grad_control(dy, x, control.shape[0], control.shape[1], ctx.kind).to(control.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        db = bias_grad(dy, ctx.bias_dtype)
    return dx, dc, db, None, None


separable_linear.register_autograd(_separable_backward, setup_context=_separable_setup)


# ------------------------------------------------------------------------------------------- field
@torch.library.custom_op("tspline::field_linear", mutates_args=())
def field_linear(
    a: Tensor, control: Tensor, lattice: Tensor, sigma: Tensor | None, bias: Tensor | None,
    n_out: int, n_in: int, basis: int, rho: float, transpose: bool,
) -> Tensor:
    """``a @ W.T + bias`` (a ``(*, n_in)``) or ``a @ W + bias`` if ``transpose`` (a ``(*, n_out)``),
    W ``(n_out, n_in)`` interpolated from ``control`` at the ``lattice`` points."""
    if use_triton(a):
        from .kernels import field_linear as launch
        return launch(a, control, lattice, sigma, bias, n_out, n_in, basis, rho, transpose)
    return ref.field_linear(a, control, lattice, sigma, bias, n_out, n_in, basis, rho, transpose)


@field_linear.register_fake
def _(a, control, lattice, sigma, bias, n_out, n_in, basis, rho, transpose):
    return a.new_empty(*a.shape[:-1], n_in if transpose else n_out)


@torch.library.custom_op("tspline::field_grad_params", mutates_args=())
def field_grad_params(
    u: Tensor, v: Tensor, control: Tensor, lattice: Tensor, sigma: Tensor | None, basis: int, rho: float
) -> tuple[Tensor, Tensor]:
    """Gradients (control ``(n,)``, sigma ``(1,)``) of sum((u.T @ v) * W); u ``(*, n_out)``, v ``(*, n_in)``."""
    if use_triton(u):
        from .kernels import field_grad_params as launch
        return launch(u, v, control, lattice, sigma, basis, rho)
    return ref.field_grad_params(u, v, control, lattice, sigma, basis, rho)


@field_grad_params.register_fake
def _(u, v, control, lattice, sigma, basis, rho):
    cd = compute_dtype(u)
    return u.new_empty(control.shape[0], dtype=cd), u.new_empty(1, dtype=cd)


def _field_setup(ctx, inputs, output):
    a, control, lattice, sigma, bias, n_out, n_in, basis, rho, transpose = inputs
    ctx.save_for_backward(a, control, lattice, sigma)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.args = (n_out, n_in, basis, rho, transpose)


def _field_backward(ctx, dy):
    a, control, lattice, sigma = ctx.saved_tensors
    n_out, n_in, basis, rho, transpose = ctx.args
    da = dc = ds = db = None
    if ctx.needs_input_grad[0]:
        da = field_linear(dy, control, lattice, sigma, None, n_out, n_in, basis, rho, not transpose)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
        u, v = (a, dy) if transpose else (dy, a)
        dc, ds = field_grad_params(u, v, control, lattice, sigma, basis, rho)
        dc = dc.to(control.dtype)
        ds = ds.to(sigma.dtype) if sigma is not None else None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[4]:
        db = bias_grad(dy, ctx.bias_dtype)
    return da, dc, None, ds, db, None, None, None, None, None


field_linear.register_autograd(_field_backward, setup_context=_field_setup)
