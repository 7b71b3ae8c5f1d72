"""Triton kernels and launchers for KroneckerLinear. Reference: ``reference/kronecker.py``.

Forward and input gradient are one fused kernel, ``_kron_fwd_kernel``: y[r] = A X[r] B.T + bias
for every row r, X[r] = x[r].reshape(n_1, n_2). A program owns a block of rows, loads A and B.T
once, and per row keeps the intermediate T = A X[r] ``(m_1, n_2)`` on chip in fp32 between the
two products: only y is written. The input gradient is the same kernel with (A.T, B.T).

The factor gradients dA = sum_r dY[r] B X[r].T and dB = sum_r dY[r].T (A X[r]) and the bias
gradient sum_r dY[r] are reductions over the rows; ``_kron_grad_kernel`` computes all three in one
launch, a program per batch split, with both per-row intermediates on chip and the partials summed
on the host (deterministic, no atomics). No ``(m_1 m_2, n_1 n_2)`` tensor is ever formed.

Every mode size is zero-padded to ``dot_dim``: max(16, next_pow2) (``tl.dot`` needs dimensions >= 16); the
kernels hold whole factors and per-row tiles on chip, so they take padded sizes up to
``max_tile(dtype)`` (128 for 16-bit types, 64 for fp32: an sm_90 block's shared memory). Larger modes fall back to the reference (batched torch matmuls, intermediate in
global memory): ``fits`` tells which path a shape takes.

Intermediates. The per-row products A X[r] and dY[r] B are fp32, as in the reference, and become
tensor-core operands in the input dtype: bf16 keeps fp32's range, and for fp16 ``narrow`` first
scales each slice the next dot keeps by a power of two, so a large-magnitude fp16 input whose
intermediate passes 65504 (or drops below fp16's normal range) still gives the reference's
result (fp16 precision, fp32 range; see ``_rescale.py``). Keeping them fp32 with tf32 dots would
double the on-chip tiles, which already set the fp16 size limit (128).

Gated layer (two modes). Its factors and bias depend on the batch mean of x, through a small gate
network per mode (``reference.kronecker.gated_maps``). ``gated_linear`` finds them in one launch
(two past ``GATE_SPLIT_ROWS`` rows) instead of ~60 small torch ops, then runs the fused forward
on them: ``_kron_gate_kernel``, one program, sums x's rows (or, for a larger batch, the fp32
partial slots ``_kron_batch_sum_kernel`` wrote) and runs the modes in order on whole tiles: fibre
mean, gate, mixed factor and bias, then the effective bias. ``_kron_gate_grad_kernel`` is its
pullback (``gated_grads``): one program that recomputes the forward and runs it backwards.
"""

from __future__ import annotations

import functools

import torch

from .._layers import cast
from .._rescale import narrow
from .._triton import (
    SplitSlots,
    cdiv,
    check_inputs,
    configs,
    contiguous,
    dot_dim,
    dot_precision,
    flatten,
    m_bucket,
    tl,
    triton,
)

MIN_SPLIT_ROWS = 32  # rows per batch split of the gradient kernel, at least
from ..reference import kronecker as ref


def max_tile(dtype: torch.dtype) -> int:
    """The largest padded mode size the fused kernels keep on chip for inputs of ``dtype``."""
    return 64 if dtype == torch.float32 else 128


@functools.cache
def padded(m1: int, n1: int, m2: int, n2: int, dtype: torch.dtype) -> dict[str, int] | None:
    """The padded mode sizes ``M1P, N1P, M2P, N2P`` the fused kernels carry for factors
    ``(m_1, n_1)`` and ``(m_2, n_2)`` on ``dtype`` inputs, or None where they do not fit on chip."""
    sizes = dict(M1P=dot_dim(m1), N1P=dot_dim(n1), M2P=dot_dim(m2), N2P=dot_dim(n2))
    return sizes if max(sizes.values()) <= max_tile(dtype) else None


def fits(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether factors a ``(m_1, n_1)`` and b ``(m_2, n_2)`` run in the fused kernels on ``dtype`` inputs."""
    return padded(*a.shape, *b.shape, dtype) is not None


def _fwd_prune(cfgs, named_args, **kwargs):
    """Keep row blocks no larger than the batch bucket; never return nothing."""
    kept = [c for c in cfgs if c.kwargs["BM"] <= named_args["M_BUCKET"]]
    return kept or [min(cfgs, key=lambda c: c.kwargs["BM"])]


@triton.autotune(
    configs=configs([{"BM": bm} for bm in (1, 4, 16, 64)], interpret={"BM": 4},
                    quick=[{"BM": 1, "num_warps": 4, "num_stages": 3}, {"BM": 16, "num_warps": 4, "num_stages": 3}]),
    key=["M_BUCKET", "M1", "N1", "M2", "N2"],
    prune_configs_by={"early_config_prune": _fwd_prune},
)
@triton.jit(do_not_specialize=["M"])
def _kron_fwd_kernel(
    x_ptr, a_ptr, b_ptr, bias_ptr, y_ptr,
    M, M1, N1, M2, N2, M_BUCKET,
    stride_xm, stride_xk, stride_a0, stride_a1, stride_b0, stride_b1, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, M1P: tl.constexpr, N1P: tl.constexpr, M2P: tl.constexpr, N2P: tl.constexpr,
    PRECISION: tl.constexpr, BM: tl.constexpr,
):
    """y[r] = A X[r] B.T + bias for rows r in ``[pid*BM, (pid+1)*BM)``; x ``(M, N1*N2)``,
    a ``(M1, N1)``, b ``(M2, N2)``, bias ``(M1*M2,)``, y ``(M, M1*M2)``.

    A and B.T are loaded once per program; per row, T = A X[r] is an fp32 ``(M1P, N2P)`` tile in
    registers, narrowed to x's dtype for the second ``tl.dot`` (rows rescaled for fp16).

    FLOPs (tensor cores): 2*M*(M1P*N1P*N2P + M1P*N2P*M2P).
    Bytes: elt*(M*(N1*N2 + M1*M2) + cdiv(M, BM)*(M1*N1 + M2*N2)) (+ elt*M1*M2 bias per program).
    """
    pid = tl.program_id(0)
    out_ty = y_ptr.dtype.element_ty
    o1 = tl.arange(0, M1P)
    i1 = tl.arange(0, N1P)
    o2 = tl.arange(0, M2P)
    i2 = tl.arange(0, N2P)
    a = tl.load(a_ptr + o1[:, None] * stride_a0 + i1[None, :] * stride_a1,
                mask=(o1[:, None] < M1) & (i1[None, :] < N1), other=0.0)
    bt = tl.load(b_ptr + i2[:, None] * stride_b1 + o2[None, :] * stride_b0,
                 mask=(i2[:, None] < N2) & (o2[None, :] < M2), other=0.0)
    x_off = (i1[:, None] * N2 + i2[None, :]) * stride_xk
    x_mask = (i1[:, None] < N1) & (i2[None, :] < N2)
    y_idx = o1[:, None] * M2 + o2[None, :]
    y_mask = (o1[:, None] < M1) & (o2[None, :] < M2)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + y_idx, mask=y_mask, other=0.0).to(tl.float32)
    sxm, sym = tl.full((), stride_xm, tl.int64), tl.full((), stride_ym, tl.int64)  # rows past 2^31 elements
    row0 = pid * BM
    for r in range(row0, tl.minimum(row0 + BM, M)):
        xr = tl.load(x_ptr + r * sxm + x_off, mask=x_mask, other=0.0)
        t = tl.dot(a, xr, input_precision=PRECISION)
        th, inv = narrow(t, out_ty, 1)
        acc = tl.dot(th, bt, input_precision=PRECISION) * inv
        if HAS_BIAS:
            acc += bias
        tl.store(y_ptr + r * sym + y_idx * stride_yn, acc.to(out_ty), mask=y_mask)


@triton.autotune(
    configs=configs([{"SPLIT": s} for s in (32, 132, 264, 528)], interpret={"SPLIT": 2},
                    quick=[{"SPLIT": 264, "num_warps": 4, "num_stages": 3}]),
    key=["M_BUCKET", "M1", "N1", "M2", "N2"],
)
@triton.jit(do_not_specialize=["M"])
def _kron_grad_kernel(
    x_ptr, dy_ptr, a_ptr, b_ptr, da_ptr, db_ptr, dsum_ptr,
    M, M1, N1, M2, N2, M_BUCKET,
    stride_xm, stride_xk, stride_gm, stride_gn, stride_a0, stride_a1, stride_b0, stride_b1,
    M1P: tl.constexpr, N1P: tl.constexpr, M2P: tl.constexpr, N2P: tl.constexpr,
    PRECISION: tl.constexpr, SPLIT: tl.constexpr,
):
    """Partials over batch split s (rows s, s + n_split, ...): da[s] = sum_r (dY[r] B) X[r].T,
    db[s] = sum_r dY[r].T (A X[r]), dsum[s] = sum_r dY[r]. The fp32 per-row products dY[r] B
    and A X[r] are narrowed to x's dtype for the second dots (rescaled for fp16).

    x ``(M, N1*N2)``, dy ``(M, M1*M2)`` in one dtype; da ``(>= n_split, M1, N1)``, db
    ``(>= n_split, M2, N2)``, dsum ``(>= n_split, M1*M2)`` contiguous, fp32 (or the gradients'
    dtype where the host allocated one slot). The number of splits
    n_split is the grid size: the config's SPLIT capped by the partial slots the host allocated.

    FLOPs (tensor cores): 4*M*(M1P*N1P*N2P + M1P*M2P*N2P).
    Bytes: elt*M*(N1*N2 + M1*M2) + 4*n_split*(M1*N1 + M2*N2 + M1*M2) (+ factors once per program).
    """
    pid = tl.program_id(0)
    n_split = tl.num_programs(0)
    dt = x_ptr.dtype.element_ty
    o1 = tl.arange(0, M1P)
    i1 = tl.arange(0, N1P)
    o2 = tl.arange(0, M2P)
    i2 = tl.arange(0, N2P)
    a_mask = (o1[:, None] < M1) & (i1[None, :] < N1)
    b_mask = (o2[:, None] < M2) & (i2[None, :] < N2)
    a = tl.load(a_ptr + o1[:, None] * stride_a0 + i1[None, :] * stride_a1, mask=a_mask, other=0.0)
    b = tl.load(b_ptr + o2[:, None] * stride_b0 + i2[None, :] * stride_b1, mask=b_mask, other=0.0)
    x_off = (i1[:, None] * N2 + i2[None, :]) * stride_xk
    x_mask = (i1[:, None] < N1) & (i2[None, :] < N2)
    g_idx = o1[:, None] * M2 + o2[None, :]
    g_mask = (o1[:, None] < M1) & (o2[None, :] < M2)
    acc_a = tl.zeros((M1P, N1P), dtype=tl.float32)
    acc_b = tl.zeros((M2P, N2P), dtype=tl.float32)
    acc_s = tl.zeros((M1P, M2P), dtype=tl.float32)
    sxm, sgm = tl.full((), stride_xm, tl.int64), tl.full((), stride_gm, tl.int64)  # rows past 2^31 elements
    for r in range(pid, M, n_split):
        xr = tl.load(x_ptr + r * sxm + x_off, mask=x_mask, other=0.0)
        g = tl.load(dy_ptr + r * sgm + g_idx * stride_gn, mask=g_mask, other=0.0)
        t = tl.dot(a, xr, input_precision=PRECISION)
        th, inv_t = narrow(t, dt, 0)
        acc_b += tl.dot(tl.trans(g), th, input_precision=PRECISION) * inv_t
        u = tl.dot(g, b, input_precision=PRECISION)
        uh, inv_u = narrow(u, dt, 1)
        acc_a += tl.dot(uh, tl.trans(xr), input_precision=PRECISION) * inv_u
        acc_s += g.to(tl.float32)
    tl.store(da_ptr + pid * M1 * N1 + o1[:, None] * N1 + i1[None, :], acc_a.to(da_ptr.dtype.element_ty), mask=a_mask)
    tl.store(db_ptr + pid * M2 * N2 + o2[:, None] * N2 + i2[None, :], acc_b.to(db_ptr.dtype.element_ty), mask=b_mask)
    tl.store(dsum_ptr + pid * M1 * M2 + g_idx, acc_s.to(dsum_ptr.dtype.element_ty), mask=g_mask)


def kronecker_linear(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Launch the fused forward: x ``(*, n_1 n_2)``, a ``(m_1, n_1)``, b ``(m_2, n_2)``, bias
    ``(m_1 m_2,)`` -> y ``(*, m_1 m_2)`` in x's dtype. Factors are cast to x's dtype; shapes that
    do not ``fit`` run the reference."""
    check_inputs(x, a, b, bias)
    sizes = padded(*a.shape, *b.shape, x.dtype)
    if sizes is None:
        return ref.kronecker_linear(x, a, b, bias)
    return _forward(x, cast(a, x.dtype), cast(b, x.dtype), bias, sizes)


def _forward(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
             sizes: dict[str, int]) -> torch.Tensor:
    """``_kron_fwd_kernel`` on checked inputs, the factors in x's dtype, ``sizes`` their ``padded``."""
    x2 = flatten(x)
    m = x2.shape[0]
    (m1, n1), (m2, n2) = a.shape, b.shape
    # allocated in its final shape, contiguous: no view for the op to re-label
    y = torch.empty(*x.shape[:-1], m1 * m2, device=x.device, dtype=x.dtype)
    if m > 0:
        grid = lambda meta: (cdiv(m, meta["BM"]),)  # noqa: E731
        _kron_fwd_kernel[grid](
            x2, a, b, contiguous(bias) if bias is not None else y, y,
            m, m1, n1, m2, n2, m_bucket(m),
            x2.stride(0), x2.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1), m1 * m2, 1,
            HAS_BIAS=bias is not None, **sizes, PRECISION=dot_precision(x.dtype),
        )
    return y


def kronecker_grad_factors(
    x: torch.Tensor, dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum_r dY[r] B X[r].T ``(m_1, n_1)``, sum_r dY[r].T A X[r] ``(m_2, n_2)``, dy summed over
    rows ``(m_1 m_2,)``), accumulated in fp32 and returned in ``dtype``, for x ``(*, n_1 n_2)``,
    dy ``(*, m_1 m_2)``."""
    check_inputs(x, dy, a, b)
    sizes = padded(*a.shape, *b.shape, x.dtype)
    if sizes is None:
        return ref.kronecker_grad_factors(x, dy, a, b, dtype)
    dy, a, b = cast(dy, x.dtype), cast(a, x.dtype), cast(b, x.dtype)
    x2, g2 = flatten(x), flatten(dy)
    m = x2.shape[0]
    (m1, n1), (m2, n2) = a.shape, b.shape
    if m == 0:
        return x2.new_zeros(m1, n1, dtype=dtype), x2.new_zeros(m2, n2, dtype=dtype), x2.new_zeros(m1 * m2, dtype=dtype)
    # One partial slot per batch split of at least MIN_SPLIT_ROWS rows (fewer splits than rows: the
    # slots' bytes and their host sum stay a fraction of x's). Separate buffers: the outputs of a
    # custom op may not share storage.
    slots = SplitSlots(_kron_grad_kernel, lambda meta: min(meta["SPLIT"], cdiv(m, MIN_SPLIT_ROWS)), key=m)
    da, db, dsum = (slots.empty(*shape, device=x.device, dtype=dtype) for shape in ((m1, n1), (m2, n2), (m1 * m2,)))
    _kron_grad_kernel[lambda meta: (slots(meta),)](
        x2, g2, a, b, da, db, dsum,
        m, m1, n1, m2, n2, m_bucket(m),
        x2.stride(0), x2.stride(1), g2.stride(0), g2.stride(1),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        **sizes, PRECISION=dot_precision(x.dtype),
    )
    return slots.sum(da, dtype), slots.sum(db, dtype), slots.sum(dsum, dtype)


GATE_SPLIT_ROWS = 64  # up to this many rows the gate program sums x itself; past it, one partial slot per this many rows,
GATE_MAX_SPLITS = 32  # at most this many slots (the one gate program reads them all)
GATE_SUM_BLOCK = 1024  # columns per batch-sum program


@triton.jit
def _kron_batch_sum_kernel(x_ptr, part_ptr, M, N, stride_xm, stride_xk, BLOCK: tl.constexpr):
    """part[s, j] = sum of x[r, j] over rows r = s, s + n_split, ... (fp32); x ``(M, N)``, part
    ``(n_split, N)`` contiguous, n_split = the grid's first size, BLOCK columns per program.
    FLOPs: M*N. Bytes: elt*M*N + 4*n_split*N."""
    s = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    acc = tl.zeros((BLOCK,), tl.float32)
    sxm = tl.full((), stride_xm, tl.int64)  # rows past 2^31 elements
    for r in range(s, M, tl.num_programs(0)):
        acc += tl.load(x_ptr + r * sxm + cols * stride_xk, mask=mask, other=0.0).to(tl.float32)
    tl.store(part_ptr + s * N + cols, acc, mask=mask)


@triton.jit
def _gate_hidden(mu, w1_ptr, b1_ptr, N, H, NP: tl.constexpr, HP: tl.constexpr):
    """(w1 ``(HP, NP)`` fp32 zero-padded, u = w1 mu + b1 ``(HP,)``): a gate's first layer on the
    fibre mean mu ``(NP,)``; w1 ``(H, N)``, b1 ``(H,)`` contiguous."""
    j = tl.arange(0, HP)
    i = tl.arange(0, NP)
    w1 = tl.load(w1_ptr + j[:, None] * N + i[None, :], mask=(j[:, None] < H) & (i[None, :] < N), other=0.0)
    w1 = w1.to(tl.float32)
    return w1, tl.sum(w1 * mu[None, :], 1) + tl.load(b1_ptr + j, mask=j < H, other=0.0).to(tl.float32)


@triton.jit
def _gate(mu, w1_ptr, b1_ptr, w2_ptr, b2_ptr, N, H, NP: tl.constexpr, HP: tl.constexpr, HARD: tl.constexpr):
    """g = sigmoid(w2 relu(w1 mu + b1) + b2) (hard: 1 where that exceeds 0.5, else 0) for the fibre
    mean mu ``(NP,)``; w2 ``(1, H)``, b2 ``(1,)`` contiguous."""
    j = tl.arange(0, HP)
    _, u = _gate_hidden(mu, w1_ptr, b1_ptr, N, H, NP, HP)
    w2 = tl.load(w2_ptr + j, mask=j < H, other=0.0).to(tl.float32)
    # ReLU that keeps a NaN (tl.maximum's default is fmax: relu(NaN) would be 0, a finite gate the
    # reference, torch.relu, never computes)
    g = tl.sigmoid(tl.sum(tl.maximum(u, 0.0, propagate_nan=tl.PropagateNan.ALL) * w2, 0)
                   + tl.load(b2_ptr).to(tl.float32))
    if HARD:
        g = tl.where(g > 0.5, 1.0, 0.0)
    return g


@triton.jit
def _mixed(f_ptr, c_ptr, p_ptr, pc_ptr, g, M, N, MP: tl.constexpr, NP: tl.constexpr,
           GATED: tl.constexpr, PROJ: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Mode k's mixed factor g F + (1 - g) P ``(MP, NP)`` and bias g c + (1 - g) pc ``(MP,)`` in fp32,
    zero-padded; P the projection (PROJ) or the identity. Ungated: F and c. F, P ``(M, N)`` and
    c, pc ``(M,)`` contiguous; c is zero without HAS_BIAS."""
    o = tl.arange(0, MP)
    i = tl.arange(0, NP)
    mask = (o[:, None] < M) & (i[None, :] < N)
    f = tl.load(f_ptr + o[:, None] * N + i[None, :], mask=mask, other=0.0).to(tl.float32)
    c = tl.zeros((MP,), tl.float32)
    if HAS_BIAS:
        c = tl.load(c_ptr + o, mask=o < M, other=0.0).to(tl.float32)
    if GATED:
        if PROJ:
            p = tl.load(p_ptr + o[:, None] * N + i[None, :], mask=mask, other=0.0).to(tl.float32)
            pc = tl.load(pc_ptr + o, mask=o < M, other=0.0).to(tl.float32)
            c = g * c + (1 - g) * pc
        else:
            p = tl.where((o[:, None] == i[None, :]) & mask, 1.0, 0.0)
            c = g * c
        f = g * f + (1 - g) * p
    return f, c


@triton.jit
def _gated_forward(
    rows_ptr, n_rows, stride_r, stride_k, inv_m, a_ptr, b_ptr, bias_a_ptr, bias_b_ptr,
    w1a_ptr, b1a_ptr, w2a_ptr, b2a_ptr, pa_ptr, pba_ptr, w1b_ptr, b1b_ptr, w2b_ptr, b2b_ptr, pb_ptr, pbb_ptr,
    M1, N1, M2, N2, HA, HB,
    M1P: tl.constexpr, N1P: tl.constexpr, M2P: tl.constexpr, N2P: tl.constexpr, HP: tl.constexpr,
    GATED_A: tl.constexpr, GATED_B: tl.constexpr, PROJ_A: tl.constexpr, PROJ_B: tl.constexpr,
    BIAS_A: tl.constexpr, BIAS_B: tl.constexpr, HARD: tl.constexpr, OUTER: tl.constexpr,
):
    """(X, mu_a, g_a, A', c_a, mu_b, g_b, B', c_b) in fp32, zero-padded: the batch mean X = inv_m *
    (sum of the n_rows rows ``(N1*N2,)`` at rows_ptr: x's own rows, or the batch sum's fp32 slots)
    viewed ``(N1P, N2P)``, and per mode its fibre mean, gate (1 where ungated), mixed factor and
    bias. Modes in order (A first when OUTER): the first mode's gate reads X's fibre mean, the
    second's the mean of the first mode's output, e.g. for OUTER the column means of A' X + c_a 1.T,
    (1.T A' X + sum(c_a)) / M1. Parameters contiguous, any float dtype."""
    i1 = tl.arange(0, N1P)
    i2 = tl.arange(0, N2P)
    x_off = (i1[:, None] * N2 + i2[None, :]) * stride_k
    x_mask = (i1[:, None] < N1) & (i2[None, :] < N2)
    xm = tl.zeros((N1P, N2P), tl.float32)
    s_r = tl.full((), stride_r, tl.int64)
    for r in range(n_rows):
        xm += tl.load(rows_ptr + r * s_r + x_off, mask=x_mask, other=0.0).to(tl.float32)
    xm = xm * inv_m
    g_a = tl.full((), 1.0, tl.float32)
    g_b = tl.full((), 1.0, tl.float32)
    if OUTER:
        mu_a = tl.sum(xm, 1) / N2
        if GATED_A:
            g_a = _gate(mu_a, w1a_ptr, b1a_ptr, w2a_ptr, b2a_ptr, N1, HA, N1P, HP, HARD)
        fa, ca = _mixed(a_ptr, bias_a_ptr, pa_ptr, pba_ptr, g_a, M1, N1, M1P, N1P, GATED_A, PROJ_A, BIAS_A)
        mu_b = (tl.sum(tl.sum(fa, 0)[:, None] * xm, 0) + tl.sum(ca, 0)) / M1
        if GATED_B:
            g_b = _gate(mu_b, w1b_ptr, b1b_ptr, w2b_ptr, b2b_ptr, N2, HB, N2P, HP, HARD)
        fb, cb = _mixed(b_ptr, bias_b_ptr, pb_ptr, pbb_ptr, g_b, M2, N2, M2P, N2P, GATED_B, PROJ_B, BIAS_B)
    else:
        mu_b = tl.sum(xm, 0) / N1
        if GATED_B:
            g_b = _gate(mu_b, w1b_ptr, b1b_ptr, w2b_ptr, b2b_ptr, N2, HB, N2P, HP, HARD)
        fb, cb = _mixed(b_ptr, bias_b_ptr, pb_ptr, pbb_ptr, g_b, M2, N2, M2P, N2P, GATED_B, PROJ_B, BIAS_B)
        mu_a = (tl.sum(xm * tl.sum(fb, 0)[None, :], 1) + tl.sum(cb, 0)) / M2
        if GATED_A:
            g_a = _gate(mu_a, w1a_ptr, b1a_ptr, w2a_ptr, b2a_ptr, N1, HA, N1P, HP, HARD)
        fa, ca = _mixed(a_ptr, bias_a_ptr, pa_ptr, pba_ptr, g_a, M1, N1, M1P, N1P, GATED_A, PROJ_A, BIAS_A)
    return xm, mu_a, g_a, fa, ca, mu_b, g_b, fb, cb


@triton.jit
def _kron_gate_kernel(
    rows_ptr, a_ptr, b_ptr, bias_a_ptr, bias_b_ptr,
    w1a_ptr, b1a_ptr, w2a_ptr, b2a_ptr, pa_ptr, pba_ptr, w1b_ptr, b1b_ptr, w2b_ptr, b2b_ptr, pb_ptr, pbb_ptr,
    a_out_ptr, b_out_ptr, bias_out_ptr,
    n_rows, stride_r, stride_k, inv_m, M1, N1, M2, N2, HA, HB,
    M1P: tl.constexpr, N1P: tl.constexpr, M2P: tl.constexpr, N2P: tl.constexpr, HP: tl.constexpr,
    GATED_A: tl.constexpr, GATED_B: tl.constexpr, PROJ_A: tl.constexpr, PROJ_B: tl.constexpr,
    BIAS_A: tl.constexpr, BIAS_B: tl.constexpr, HARD: tl.constexpr, OUTER: tl.constexpr,
):
    """One program: the gated layer's A' ``(M1, N1)``, B' ``(M2, N2)`` and b_eff ``(M1*M2,)`` in the
    outputs' dtype (``_gated_forward``, then b_eff = c_a (x) B' 1 + 1 (x) c_b when OUTER, else
    A' 1 (x) c_b + c_a (x) 1). Computed in fp32.

    FLOPs: ~2*(n_rows*N1*N2 + (M1 + HA)*N1 + (M2 + HB)*N2) + N1*N2 per fibre mean, on the FMA units.
    Bytes: elt*n_rows*N1*N2 + elt*(2*(M1*N1 + M2*N2) + HA*N1 + HB*N2 + M1*M2) (parameters read once).
    """
    _, _, _, fa, ca, _, _, fb, cb = _gated_forward(
        rows_ptr, n_rows, stride_r, stride_k, inv_m, a_ptr, b_ptr, bias_a_ptr, bias_b_ptr,
        w1a_ptr, b1a_ptr, w2a_ptr, b2a_ptr, pa_ptr, pba_ptr, w1b_ptr, b1b_ptr, w2b_ptr, b2b_ptr, pb_ptr, pbb_ptr,
        M1, N1, M2, N2, HA, HB, M1P, N1P, M2P, N2P, HP, GATED_A, GATED_B, PROJ_A, PROJ_B, BIAS_A, BIAS_B, HARD, OUTER)
    if OUTER:
        bias = ca[:, None] * tl.sum(fb, 1)[None, :] + cb[None, :]
    else:
        bias = tl.sum(fa, 1)[:, None] * cb[None, :] + ca[:, None]
    o1 = tl.arange(0, M1P)
    i1 = tl.arange(0, N1P)
    o2 = tl.arange(0, M2P)
    i2 = tl.arange(0, N2P)
    out_ty = a_out_ptr.dtype.element_ty
    tl.store(a_out_ptr + o1[:, None] * N1 + i1[None, :], fa.to(out_ty), mask=(o1[:, None] < M1) & (i1[None, :] < N1))
    tl.store(b_out_ptr + o2[:, None] * N2 + i2[None, :], fb.to(out_ty), mask=(o2[:, None] < M2) & (i2[None, :] < N2))
    tl.store(bias_out_ptr + o1[:, None] * M2 + o2[None, :], bias.to(out_ty), mask=(o1[:, None] < M1) & (o2[None, :] < M2))


@triton.jit
def _mode_grad(
    df, dc, g, mu, f_ptr, c_ptr, p_ptr, pc_ptr, w1_ptr, b1_ptr, w2_ptr,
    gf_ptr, gc_ptr, gp_ptr, gpc_ptr, gw1_ptr, gb1_ptr, gw2_ptr, gb2_ptr, M, N, H,
    MP: tl.constexpr, NP: tl.constexpr, HP: tl.constexpr,
    GATED: tl.constexpr, PROJ: tl.constexpr, HAS_BIAS: tl.constexpr, HARD: tl.constexpr,
):
    """Store the gradients of mode k's factor, bias, projection and gate network from those of its
    mixed factor df ``(MP, NP)`` and bias dc ``(MP,)`` (fp32, zero-padded); return that of its
    fibre mean mu, dmu ``(NP,)``. With F' = g F + (1 - g) P: dF = g dF', dP = (1 - g) dF', and
    dg = <dF', F - P> + <dc', c - pc> through the gate's sigmoid, ReLU and two layers (hard
    gates: a step, no gradient). Each gradient is stored in its tensor's dtype."""
    o = tl.arange(0, MP)
    i = tl.arange(0, NP)
    mask = (o[:, None] < M) & (i[None, :] < N)
    idx = o[:, None] * N + i[None, :]
    dmu = tl.zeros((NP,), tl.float32)
    if not GATED:
        tl.store(gf_ptr + idx, df.to(gf_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            tl.store(gc_ptr + o, dc.to(gc_ptr.dtype.element_ty), mask=o < M)
    else:
        tl.store(gf_ptr + idx, (g * df).to(gf_ptr.dtype.element_ty), mask=mask)
        f = tl.load(f_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        c = tl.zeros((MP,), tl.float32)
        if HAS_BIAS:
            tl.store(gc_ptr + o, (g * dc).to(gc_ptr.dtype.element_ty), mask=o < M)
            c = tl.load(c_ptr + o, mask=o < M, other=0.0).to(tl.float32)
        if PROJ:
            tl.store(gp_ptr + idx, ((1 - g) * df).to(gp_ptr.dtype.element_ty), mask=mask)
            tl.store(gpc_ptr + o, ((1 - g) * dc).to(gpc_ptr.dtype.element_ty), mask=o < M)
            p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            pc = tl.load(pc_ptr + o, mask=o < M, other=0.0).to(tl.float32)
        else:
            p = tl.where((o[:, None] == i[None, :]) & mask, 1.0, 0.0)
            pc = tl.zeros((MP,), tl.float32)
        if not HARD:
            dg = tl.sum(tl.sum(df * (f - p), 1), 0) + tl.sum(dc * (c - pc), 0)
            j = tl.arange(0, HP)
            w1, u = _gate_hidden(mu, w1_ptr, b1_ptr, N, H, NP, HP)
            w2 = tl.load(w2_ptr + j, mask=j < H, other=0.0).to(tl.float32)
            dz = dg * g * (1 - g)
            du = tl.where(u <= 0, 0.0, dz * w2)  # as torch's ReLU backward: a NaN u passes the gradient
            relu = tl.maximum(u, 0.0, propagate_nan=tl.PropagateNan.ALL)
            tl.store(gw2_ptr + j, (dz * relu).to(gw2_ptr.dtype.element_ty), mask=j < H)
            tl.store(gb2_ptr, dz.to(gb2_ptr.dtype.element_ty))
            tl.store(gb1_ptr + j, du.to(gb1_ptr.dtype.element_ty), mask=j < H)
            tl.store(gw1_ptr + j[:, None] * N + i[None, :], (du[:, None] * mu[None, :]).to(gw1_ptr.dtype.element_ty),
                     mask=(j[:, None] < H) & (i[None, :] < N))
            dmu = tl.sum(w1 * du[:, None], 0)
    return dmu


@triton.jit
def _kron_gate_grad_kernel(
    rows_ptr, a_ptr, b_ptr, bias_a_ptr, bias_b_ptr,
    w1a_ptr, b1a_ptr, w2a_ptr, b2a_ptr, pa_ptr, pba_ptr, w1b_ptr, b1b_ptr, w2b_ptr, b2b_ptr, pb_ptr, pbb_ptr,
    da_ptr, db_ptr, dbias_ptr,
    ga_ptr, gb_ptr, gbias_a_ptr, gbias_b_ptr,
    gw1a_ptr, gb1a_ptr, gw2a_ptr, gb2a_ptr, gpa_ptr, gpba_ptr, gw1b_ptr, gb1b_ptr, gw2b_ptr, gb2b_ptr, gpb_ptr, gpbb_ptr,
    gx_ptr,
    n_rows, stride_r, stride_k, inv_m, M1, N1, M2, N2, HA, HB,
    M1P: tl.constexpr, N1P: tl.constexpr, M2P: tl.constexpr, N2P: tl.constexpr, HP: tl.constexpr,
    GATED_A: tl.constexpr, GATED_B: tl.constexpr, PROJ_A: tl.constexpr, PROJ_B: tl.constexpr,
    BIAS_A: tl.constexpr, BIAS_B: tl.constexpr, HARD: tl.constexpr, OUTER: tl.constexpr,
):
    """One program: ``_kron_gate_kernel``'s pullback. From the gradients of A' ``(M1, N1)``, B'
    ``(M2, N2)`` and b_eff ``(M1*M2,)`` (fp32, contiguous) it stores every parameter's gradient
    (``_mode_grad``) and gx ``(N1*N2,)``, the gradient of x's batch mean / M (each row's share).
    The forward is recomputed (``_gated_forward``); then in reverse order, e.g. for OUTER with
    b_eff = c_a (x) B' 1 + 1 (x) c_b and mu_b = (1.T A' X + sum(c_a)) / M1:
    dc_a = dBm B' 1, dB' += (dBm.T c_a) 1.T, dc_b = dBm.T 1; mode b; dA' += 1 (X dmu_b).T / M1,
    dX = (A'.T 1) dmu_b.T / M1, dc_a += sum(dmu_b) / M1; mode a; dX += dmu_a 1.T / N2.

    FLOPs: ~3x ``_kron_gate_kernel``'s. Bytes: its bytes + 4*(M1*N1 + M2*N2 + M1*M2) + the gradients.
    """
    xm, mu_a, g_a, fa, ca, mu_b, g_b, fb, cb = _gated_forward(
        rows_ptr, n_rows, stride_r, stride_k, inv_m, a_ptr, b_ptr, bias_a_ptr, bias_b_ptr,
        w1a_ptr, b1a_ptr, w2a_ptr, b2a_ptr, pa_ptr, pba_ptr, w1b_ptr, b1b_ptr, w2b_ptr, b2b_ptr, pb_ptr, pbb_ptr,
        M1, N1, M2, N2, HA, HB, M1P, N1P, M2P, N2P, HP, GATED_A, GATED_B, PROJ_A, PROJ_B, BIAS_A, BIAS_B, HARD, OUTER)
    o1 = tl.arange(0, M1P)
    i1 = tl.arange(0, N1P)
    o2 = tl.arange(0, M2P)
    i2 = tl.arange(0, N2P)
    mask_a = (o1[:, None] < M1) & (i1[None, :] < N1)
    mask_b = (o2[:, None] < M2) & (i2[None, :] < N2)
    x_mask = (i1[:, None] < N1) & (i2[None, :] < N2)
    dfa = tl.load(da_ptr + o1[:, None] * N1 + i1[None, :], mask=mask_a, other=0.0)
    dfb = tl.load(db_ptr + o2[:, None] * N2 + i2[None, :], mask=mask_b, other=0.0)
    dbm = tl.load(dbias_ptr + o1[:, None] * M2 + o2[None, :], mask=(o1[:, None] < M1) & (o2[None, :] < M2), other=0.0)
    if OUTER:
        dca = tl.sum(dbm * tl.sum(fb, 1)[None, :], 1)
        dcb = tl.sum(dbm, 0)
        dfb += tl.where(mask_b, tl.sum(dbm * ca[:, None], 0)[:, None], 0.0)
        dmu_b = _mode_grad(dfb, dcb, g_b, mu_b, b_ptr, bias_b_ptr, pb_ptr, pbb_ptr, w1b_ptr, b1b_ptr, w2b_ptr,
                           gb_ptr, gbias_b_ptr, gpb_ptr, gpbb_ptr, gw1b_ptr, gb1b_ptr, gw2b_ptr, gb2b_ptr,
                           M2, N2, HB, M2P, N2P, HP, GATED_B, PROJ_B, BIAS_B, HARD)
        dfa += tl.where(mask_a, (tl.sum(xm * dmu_b[None, :], 1) / M1)[None, :], 0.0)
        dxm = tl.sum(fa, 0)[:, None] * dmu_b[None, :] / M1
        dca += tl.where(o1 < M1, tl.sum(dmu_b, 0) / M1, 0.0)
        dmu_a = _mode_grad(dfa, dca, g_a, mu_a, a_ptr, bias_a_ptr, pa_ptr, pba_ptr, w1a_ptr, b1a_ptr, w2a_ptr,
                           ga_ptr, gbias_a_ptr, gpa_ptr, gpba_ptr, gw1a_ptr, gb1a_ptr, gw2a_ptr, gb2a_ptr,
                           M1, N1, HA, M1P, N1P, HP, GATED_A, PROJ_A, BIAS_A, HARD)
        dxm += dmu_a[:, None] / N2
    else:
        dcb = tl.sum(dbm * tl.sum(fa, 1)[:, None], 0)
        dca = tl.sum(dbm, 1)
        dfa += tl.where(mask_a, tl.sum(dbm * cb[None, :], 1)[:, None], 0.0)
        dmu_a = _mode_grad(dfa, dca, g_a, mu_a, a_ptr, bias_a_ptr, pa_ptr, pba_ptr, w1a_ptr, b1a_ptr, w2a_ptr,
                           ga_ptr, gbias_a_ptr, gpa_ptr, gpba_ptr, gw1a_ptr, gb1a_ptr, gw2a_ptr, gb2a_ptr,
                           M1, N1, HA, M1P, N1P, HP, GATED_A, PROJ_A, BIAS_A, HARD)
        dfb += tl.where(mask_b, (tl.sum(xm * dmu_a[:, None], 0) / M2)[None, :], 0.0)
        dxm = dmu_a[:, None] * tl.sum(fb, 0)[None, :] / M2
        dcb += tl.where(o2 < M2, tl.sum(dmu_a, 0) / M2, 0.0)
        dmu_b = _mode_grad(dfb, dcb, g_b, mu_b, b_ptr, bias_b_ptr, pb_ptr, pbb_ptr, w1b_ptr, b1b_ptr, w2b_ptr,
                           gb_ptr, gbias_b_ptr, gpb_ptr, gpbb_ptr, gw1b_ptr, gb1b_ptr, gw2b_ptr, gb2b_ptr,
                           M2, N2, HB, M2P, N2P, HP, GATED_B, PROJ_B, BIAS_B, HARD)
        dxm += dmu_b[None, :] / N1
    tl.store(gx_ptr + i1[:, None] * N2 + i2[None, :], (dxm * inv_m).to(gx_ptr.dtype.element_ty), mask=x_mask)


@functools.cache
def _gate_sizes(m1: int, n1: int, m2: int, n2: int, hidden: int, dtype: torch.dtype) -> tuple[dict, dict] | None:
    """(the gate kernels' padded sizes and warps, the fused forward's ``padded`` sizes) for modes
    ``(m_1, n_1)``, ``(m_2, n_2)`` and the larger gate hidden size, or None where a padded size
    passes ``max_tile(dtype)``. 8 warps past 32: the pullback holds ~10 tiles (64 x 64: ~230
    registers a thread, no spills on sm_90)."""
    sizes = padded(m1, n1, m2, n2, dtype)
    if sizes is None or dot_dim(hidden) > max_tile(dtype):
        return None
    return {**sizes, "HP": dot_dim(hidden), "num_warps": 4 if max(*sizes.values(), dot_dim(hidden)) <= 32 else 8}, sizes


def gated_linear(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias_a: torch.Tensor | None,
                 bias_b: torch.Tensor | None, *modes_and_flags) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the two-mode gated layer (``reference.kronecker.kronecker_gated_linear``, same
    arguments): its maps (``gated_maps``), then the fused forward on them; (y ``(*, m_1 m_2)``, A',
    B') in x's dtype. Shapes whose padded modes or gate hidden size pass ``max_tile`` run the reference."""
    maps = gated_maps(x, a, b, bias_a, bias_b, *modes_and_flags)
    if maps is None:
        return ref.kronecker_gated_linear(x, a, b, bias_a, bias_b, *modes_and_flags)
    return _forward(x, *maps), maps[0], maps[1]


def gated_maps(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias_a: torch.Tensor | None,
               bias_b: torch.Tensor | None, *modes_and_flags) -> tuple | None:
    """The gated layer's (A', B', b_eff) in x's dtype (``reference.kronecker.gated_maps``, same
    arguments) and the fused forward's padded sizes, by one or two launches; None for shapes
    past ``max_tile``."""
    plan = _gate_plan(x, a, b, bias_a, bias_b, modes_and_flags)
    return None if plan is None else _launch_maps(plan, x, a, b)


def _launch_maps(plan: tuple, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple:
    """``_kron_gate_kernel`` on a ``_gate_plan``: (A', B', b_eff, the fused forward's sizes)."""
    rows, params, scalars, constexprs, forward_sizes = plan
    (m1, n1), (m2, n2) = a.shape, b.shape
    a_out = torch.empty(m1, n1, device=x.device, dtype=x.dtype)
    b_out = torch.empty(m2, n2, device=x.device, dtype=x.dtype)
    bias = torch.empty(m1 * m2, device=x.device, dtype=x.dtype)
    _kron_gate_kernel[(1,)](rows, *params, a_out, b_out, bias, *scalars, **constexprs)
    return a_out, b_out, bias, forward_sizes


def gated_grads(x: torch.Tensor, dy: torch.Tensor, a_mixed: torch.Tensor, b_mixed: torch.Tensor, a: torch.Tensor,
                b: torch.Tensor, bias_a: torch.Tensor | None, bias_b: torch.Tensor | None, *modes_and_flags
                ) -> tuple | None:
    """The gated layer's backward but for dx's fused-op term, from the forward's mixed factors
    A', B' (x's dtype) and one plan (checks and batch sum once): the maps' gradients
    (``kronecker_grad_factors``) and the gate pullback. Returns (gx ``(n_1 n_2,)`` in x's dtype:
    every row's share in the gradient of x's batch mean, the gradients of a, b, bias_a, bias_b and
    the per-mode tensors, each in its tensor's dtype, None where that is None or a hard gate's
    network). None for shapes past ``max_tile``."""
    plan = _gate_plan(x, a, b, bias_a, bias_b, modes_and_flags)
    if plan is None:
        return None
    da, db, dbias = kronecker_grad_factors(x, dy, a_mixed, b_mixed, torch.float32)
    rows, params, scalars, constexprs, _ = plan
    hard = modes_and_flags[-2]  # a step: the gate networks get no gradient (and none is written)
    inputs = (a, b, bias_a, bias_b, *modes_and_flags[:-2])
    grads = [None if t is None or (hard and k in _GATE_NETWORKS) else torch.empty(t.shape, device=t.device, dtype=t.dtype)
             for k, t in enumerate(inputs)]
    gx = torch.empty(a.shape[1] * b.shape[1], device=x.device, dtype=x.dtype)
    _kron_gate_grad_kernel[(1,)](rows, *params, da, db, dbias, *(gx if g is None else g for g in grads), gx,
                                 *scalars, **constexprs)
    return gx, grads


_GATE_NETWORKS = frozenset((4, 5, 6, 7, 10, 11, 12, 13))  # gated_grads' inputs that are gate networks' tensors


def _gate_plan(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias_a: torch.Tensor | None,
               bias_b: torch.Tensor | None, modes_and_flags: tuple) -> tuple | None:
    """What both gate kernels take around their own pointers: (rows, the 16 parameter pointers,
    the scalars, the constexprs, the fused forward's padded sizes); x's rows first summed into
    fp32 slots past ``GATE_SPLIT_ROWS`` rows. None for shapes past ``max_tile``."""
    *tensors, hard, outer = modes_and_flags
    (gate_a, gate_b), (proj_a, proj_b) = ref.gate_paths(*tensors)
    check_inputs(x, a, b, bias_a, bias_b, *tensors)
    (m1, n1), (m2, n2) = a.shape, b.shape
    h_a = 0 if gate_a is None else gate_a[0].shape[0]
    h_b = 0 if gate_b is None else gate_b[0].shape[0]
    sizes = _gate_sizes(m1, n1, m2, n2, max(h_a, h_b), x.dtype)
    if sizes is None:
        return None
    sizes, forward_sizes = sizes
    rows = flatten(x)
    m = rows.shape[0]
    n_rows = min(cdiv(m, GATE_SPLIT_ROWS), GATE_MAX_SPLITS)
    if n_rows > 1:  # partial sums first: the gate program then reads n_rows fp32 slots
        part = torch.empty(n_rows, n1 * n2, device=x.device, dtype=torch.float32)
        _kron_batch_sum_kernel[(n_rows, cdiv(n1 * n2, GATE_SUM_BLOCK))](
            rows, part, m, n1 * n2, rows.stride(0), rows.stride(1), BLOCK=GATE_SUM_BLOCK, num_warps=4)
        rows = part
    else:
        n_rows = m
    params = [a if t is None else contiguous(t) for t in (a, b, bias_a, bias_b, *tensors)]
    scalars = (n_rows, rows.stride(0), rows.stride(1), 1.0 / max(m, 1), m1, n1, m2, n2, h_a, h_b)
    constexprs = dict(sizes, GATED_A=gate_a is not None, GATED_B=gate_b is not None,
                      PROJ_A=proj_a is not None, PROJ_B=proj_b is not None,
                      BIAS_A=bias_a is not None, BIAS_B=bias_b is not None, HARD=hard, OUTER=outer)
    return rows, params, scalars, constexprs, forward_sizes
