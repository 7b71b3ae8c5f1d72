"""``torch.library`` custom ops for SplineLinear: Triton on CUDA (or when forced), reference otherwise.

Each forward op has a fake implementation and an autograd formula built from other ops, so
``torch.compile(fullgraph=True)`` traces straight through. Backward:
  separable: separable_backward gives dx (the same two passes per level on W.T's grids, C.T), dC per
             level in the parameters' dtype and d(bias) together: Triton runs one input pass on dy per
             level (dy @ Bo) for both dx's output pass and dC's product with x @ Bi (rounded once),
             which a training forward of many rows keeps (``keeps_u``: ``(*, G_in)`` fp32 per level,
             a few % of x's bytes) so the backward neither re-reads x nor runs an input pass on it,
             and which is otherwise projected again; the first
             level's input pass sums d(bias) from the blocks it loads; its own backward (double
             backward) runs the same two ops, the outputs being bilinear;
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
from ..reference.common import compute_dtype

_kernels = kernels_of(__package__)  # the Triton launchers, imported on first use


# --------------------------------------------------------------------------------------- separable
@torch.library.custom_op("tspline::separable_linear", mutates_args=())
def separable_linear(x: Tensor, control: Tensor, bias: Tensor | None, out_features: int, kind: int,
                     fine: Tensor | None = None) -> Tensor:
    """y = ((x @ Bi) @ C.T) @ Bo.T + bias (+ the same through ``fine``, a second level's grid: a
    hierarchical layer's, whose output pass adds the first level's output, in x's dtype, before its
    one rounding); x ``(*, n_in)``, C ``(G_out, G_in)`` or a bicubic layer's ``(n,)`` values (their
    grid ``ref.control_grid``, made inside the op), fine ``(G_out', G_in')`` -> ``(*, out_features)``.
    Two tensors, not a list of levels: a list argument costs an eager call ~10 us of packing."""
    return owned(_levels(x, control, bias, out_features, kind, fine, None))


@separable_linear.register_fake
def _(x, control, bias, out_features, kind, fine=None):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("tspline::separable_linear_kept", mutates_args=())
def separable_linear_kept(x: Tensor, control: Tensor, bias: Tensor | None, out_features: int, kind: int,
                          fine: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``separable_linear``'s y and u, the levels' input projections x @ Bi side by side ``(*, G_in
    [+ G_in'])`` in the compute dtype (not differentiable), which the backward reuses for the grids'
    gradients instead of projecting x again: a training forward of many rows (``keeps_u``)."""
    u = _u_like(x, control, fine)
    return owned(_levels(x, control, bias, out_features, kind, fine, u)), u


@separable_linear_kept.register_fake
def _(x, control, bias, out_features, kind, fine=None):
    return x.new_empty(*x.shape[:-1], out_features), _u_like(x, control, fine)


def _u_like(x: Tensor, control: Tensor, fine: Tensor | None) -> Tensor:
    """``separable_linear_kept``'s u, uninitialised."""
    return x.new_empty(*x.shape[:-1], ref.control_grid(control).shape[1] + (0 if fine is None else fine.shape[1]),
                       dtype=compute_dtype(x))


def _levels(x: Tensor, control: Tensor, bias: Tensor | None, out_features: int, kind: int, fine: Tensor | None,
            u: Tensor | None) -> Tensor:
    """The forward ops' y, and x's projections written into u where given."""
    control = ref.control_grid(control)
    controls = [control] if fine is None else [control, fine]
    if use_triton(x):
        return _kernels().separable_levels(x, controls, bias, out_features, kind, u=u)
    if u is not None:
        torch.cat([ref.input_projection(x, c.shape[1], kind) for c in controls], -1, out=u)
    return ref.separable_levels(x, controls, bias, out_features, kind)


# Rows from which a training forward keeps u. Below, a step is bound by the host (~100 us per
# fwd+bwd at 16 rows, while the GPU's work at 4096 x 4096 is predicted at ~100 us near 4096 rows,
# bench/NOTES-separable.md), and the kept op's second output costs the host more (~6 us measured)
# than the launch of the input pass it saves; above, the saved pass over x is GPU time. A
# prediction until a GPU run measures the crossover.
KEEP_U_MIN_ROWS = 4096


def keeps_u(x: Tensor, control: Tensor, fine: Tensor | None = None) -> bool:
    """Whether a forward of x ``(*, n_in)`` on these grids runs ``separable_linear_kept``: autograd
    records it, a grid wants a gradient (u serves only theirs), x has at least ``KEEP_U_MIN_ROWS``
    rows, and no trace (compile, export) runs: there a test of a dynamic batch would guard the graph."""
    # the trace test first: under compile or export x.numel() is symbolic, and comparing it would
    # guard the graph to batches below the threshold (a dynamic batch Dim then fails to export)
    return (not torch.compiler.is_compiling() and torch.is_grad_enabled()
            and (control.requires_grad or fine is not None and fine.requires_grad)
            and x.numel() >= KEEP_U_MIN_ROWS * x.shape[-1])


def separable(x: Tensor, control: Tensor, bias: Tensor | None, out_features: int, kind: int,
              fine: Tensor | None = None) -> Tensor:
    """The layers' forward: ``separable_linear``, or its kept variant's y where ``keeps_u``."""
    if keeps_u(x, control, fine):
        return separable_linear_kept(x, control, bias, out_features, kind, fine)[0]
    return separable_linear(x, control, bias, out_features, kind, fine)


@torch.library.custom_op("tspline::separable_backward", mutates_args=())
def separable_backward(dy: Tensor, x: Tensor, control: Tensor, fine: Tensor | None, kind: int, need_dx: bool,
                       need_control: bool, need_fine: bool, bias_dtype: torch.dtype | None, u: Tensor | None
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``separable_linear(x, control, bias, n_out, kind, fine)`` for the output gradient
    dy ``(*, n_out)``: (dx like x, dC in control's dtype, d_fine in fine's, d_bias ``(n_out,)`` in
    ``bias_dtype``), each summed in fp32 (fp64 for fp64 inputs); unrequested ones are empty. ``u``:
    ``separable_linear_kept``'s, x's projections; None: x is projected here."""
    grid = ref.control_grid(control)
    controls = [grid] if fine is None else [grid, fine]
    needs = [need_control] if fine is None else [need_control, need_fine]
    if use_triton(dy):
        dx, d_controls, d_bias = _kernels().separable_backward(dy, x, controls, kind, need_dx, needs, bias_dtype, u=u)
    else:
        dx, d_controls, d_bias = ref.separable_backward(dy, x, controls, kind, need_dx, needs, bias_dtype, u)
    d_control, d_fine = (d_controls + [None])[:2]
    return (x.new_empty(0) if dx is None else dx,
            control.new_empty(0) if d_control is None else ref.grid_values(d_control, control),
            (control if fine is None else fine).new_empty(0) if d_fine is None else d_fine,
            dy.new_empty(0) if d_bias is None else d_bias)


@separable_backward.register_fake
def _(dy, x, control, fine, kind, need_dx, need_control, need_fine, bias_dtype, u):
    return (x.new_empty(x.shape if need_dx else 0), control.new_empty(control.shape if need_control else 0),
            (control if fine is None else fine).new_empty(fine.shape if fine is not None and need_fine else 0),
            dy.new_empty(0 if bias_dtype is None else dy.shape[-1], dtype=bias_dtype or dy.dtype))


def _backward_setup(ctx, inputs, output):
    dy, x, control, fine, *args, u = inputs
    ctx.save_for_backward(dy, x, control, fine)
    ctx.args = args  # u is x's projection: the formulas below differentiate through x
    ctx.set_materialize_grads(False)


def _backward_backward(ctx, g_dx, g_control, g_fine, g_bias):
    """Second order, by the same ops. The outputs are bilinear: dx = dy @ W, dC_l = (dy @ Bo_l).T @
    (x @ Bi_l), d_bias = dy's row sum. So d(dy) = G_dx @ W.T + (x through a level of grid G_l) +
    G_bias on every row, d(x) = dy through a level of grid G_l.T, and d(C_l) = the dC_l of
    (dy, G_dx) (dx's term). A given u is x's projection: it gets no gradient of its own."""
    dy, x, control, fine = ctx.saved_tensors
    kind = ctx.args[0]
    need_dy, need_x, need_control, need_fine = ctx.needs_input_grad[:4]
    d_dy = d_x = d_control = d_fine = None

    def add(acc: Tensor | None, term: Tensor) -> Tensor:
        return term if acc is None else acc + term

    if g_dx is not None and g_dx.numel():
        g = g_dx.to(dy.dtype)
        if need_dy:
            d_dy = separable_linear(g, control, None, dy.shape[-1], kind, fine)
        if need_control or need_fine:
            _, d_control, d_fine, _ = separable_backward(dy, g, control, fine, kind, False, need_control, need_fine,
                                                         None, None)
    for grid, need in ((g_control, True), (g_fine, fine is not None)):
        if need and grid is not None and grid.numel():
            grid = ref.control_grid(grid.to(x.dtype))
            if need_dy:
                d_dy = add(d_dy, separable_linear(x, grid, None, dy.shape[-1], kind, None))
            if need_x:
                d_x = add(d_x, separable_linear(dy, grid.mT, None, x.shape[-1], kind, None))
    if g_bias is not None and g_bias.numel() and need_dy:
        d_dy = add(d_dy, g_bias.to(dy.dtype).expand(dy.shape))
    return (d_dy, d_x, d_control if need_control else None, d_fine if need_fine else None,
            None, None, None, None, None, None)


register_autograd(separable_backward, _backward_backward, _backward_setup)


def _separable_setup(ctx, inputs, output):
    x, control, bias, out_features, kind, fine = inputs
    u = None
    if isinstance(output, tuple):  # separable_linear_kept's
        u = output[1]
        ctx.mark_non_differentiable(u)
        ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, control, fine, u)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.kind = kind
    # read here, not from needs_input_grad: torch.library's dispatch drops a trailing default argument
    ctx.has_fine = fine is not None


def _separable_backward(ctx, dy, _u=None):
    """dx (the same levels on W.T's grids), dC per level (from the forward's u where it kept it)
    and d bias, by one op."""
    x, control, fine, u = ctx.saved_tensors
    need = ctx.needs_input_grad
    bias_dtype = ctx.bias_dtype if need[2] else None
    need_fine = ctx.has_fine and need[5]
    if dy is None or not (need[0] or need[1] or need_fine or bias_dtype is not None):
        return None, None, None, None, None, None
    dx, dc, d_fine, db = separable_backward(dy, x, control, fine, ctx.kind, need[0], need[1], need_fine, bias_dtype,
                                            u)
    return (dx if need[0] else None, dc if need[1] else None, None if bias_dtype is None else db, None, None,
            d_fine if need_fine else None)


register_autograd(separable_linear, _separable_backward, _separable_setup)
register_autograd(separable_linear_kept, _separable_backward, _separable_setup)


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
