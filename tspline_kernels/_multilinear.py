"""Autograd shared by the layers whose weight is multilinear in a list of factor tensors ``(r0, A, B,
r1)`` (TT cores, spline-TT control grids): W.T's factors, the backward of the linear op and the
double backward of its gradient op. Used by ``tt/ops.py`` and ``spline_tt/ops.py``."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ._layers import cast
from .reference.common import bias_grad


def transpose_factors(factors: list[Tensor]) -> list[Tensor]:
    """Factors of W.T: ``(r0, O, I, r1) -> (r0, I, O, r1)`` views (the o and i axes swapped)."""
    return [f.transpose(1, 2) for f in factors]


def linear_backward(ctx, dy: Tensor, factors: list[Tensor], grad_op: Callable[[bool], list[Tensor]],
                    adjoint: Callable[[list[Tensor]], Tensor]) -> tuple[Tensor | None, list[Tensor | None], Tensor | None]:
    """``(dx, [d factor], d bias)`` of y = x @ W.T + bias for the incoming ``dy``, what ctx needs
    (``needs_input_grad`` ``(x, [one per factor], bias, ...)``, ``bias_dtype`` None without a bias):
    ``grad_op(need_dx)`` is the gradient op's ``[d factor] (+ [dx])`` (one sweep gives both), and
    ``adjoint(factors of W.T)`` is dy @ W, for dx alone. Factor gradients in the factors' dtypes."""
    need = ctx.needs_input_grad
    dx = db = None
    d_factors: list[Tensor | None] = [None] * len(factors)  # the list input needs a list of gradients
    if any(need[1]):
        grads = grad_op(need[0])
        d_factors = [cast(g, f.dtype) for g, f in zip(grads, factors)]
        dx = grads[-1] if need[0] else None
    elif need[0]:
        dx = adjoint(transpose_factors(factors))
    if ctx.bias_dtype is not None and need[2]:
        db = bias_grad(dy, ctx.bias_dtype)
    return dx, d_factors, db


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
