"""Triton kernels and launchers for LowRankLinear. Reference: ``reference/lowrank.py``.

Forward and input gradient are one fused kernel, ``_lowrank_fwd_kernel``:
(y, t) = ((x @ a) @ b.T + bias, x @ a), with the rank-r projection t kept on chip in fp32
between the two products and also stored (``M x r``, tiny) for the backward. The layer runs it
with (a, b) = (V, U) for y and with (a, b) = (U, V) on dy for dx, which yields q = dy @ U too.

The factor gradients dV = x.T @ q and dU = dy.T @ p (p = x @ V saved by the forward) are two
skinny products reduced over the batch; ``_lowrank_grad_kernel`` computes both, and the bias
gradient, in one launch tiled over features with the batch as the reduction axis (optionally
split over the batch, partials summed on the host). No ``(n_out, n_in)`` tensor is ever
formed. The rank is zero-padded to RP = max(16, next_pow2(r)) inside the kernels (``tl.dot``
needs every dimension >= 16). The kernels hold (rows x RP) tiles on chip, so they take RP up to
``MAX_RANK`` = 256 (sm_90 dry run: at RP = 512 no fp32 forward config fits a block's shared
memory, 295 KB for the smallest; at RP = 1024 none in fp16 either, 297 KB); larger ranks run the
reference (two GEMMs, t in global memory, where fusion gains little): ``fits`` tells which path
a rank takes.

Intermediates. The projections t = x @ a (forward), p and q (factor gradients) are fp32, as in
the reference, and become tensor-core operands in the input dtype: bf16 keeps fp32's range, and
for fp16 ``narrow`` first scales each row of t (each column of p, q over a row block) by a power
of two, so a large-magnitude fp16 input whose projection passes 65504 still gives the
reference's finite result (fp16 precision, fp32 range; see ``_rescale.py``). Keeping them fp32
with tf32 dots would double the operand tiles (BN x RP of b) for the same 11-bit precision.
"""

from __future__ import annotations

import torch

from .._layers import cast
from .._rescale import narrow
from .._triton import (SplitSlots, cdiv, check_inputs, configs, contiguous, dot_dim, dot_precision, flatten, m_bucket,
                       tl, triton)
from ..reference import lowrank as ref


def pad_rank(r: int) -> int:
    """The rank as the kernels carry it: a power of two >= 16 (zero-padded columns)."""
    return dot_dim(r)


MAX_RANK = 256  # largest padded rank the fused kernels keep on chip


def fits(r: int) -> bool:
    """Whether rank ``r`` runs in the fused kernels (else the reference)."""
    return pad_rank(r) <= MAX_RANK


_ACC_LIMIT = 8192  # largest fp32 (rows x RP) accumulator tile a config may hold in registers


def _fwd_prune(cfgs, named_args, **kwargs):
    """Keep row blocks no taller than the batch bucket, output splits no larger than the number of
    output tiles, and accumulators that fit the padded rank; never return nothing."""
    rp, n, bucket = kwargs["RP"], named_args["N"], named_args["M_BUCKET"]
    kept = [c for c in cfgs
            if c.kwargs["BM"] <= max(16, bucket)
            and c.kwargs["N_SPLIT"] <= max(cdiv(n, c.kwargs["BN"]), 1)
            and c.kwargs["BM"] * rp <= _ACC_LIMIT]
    return kept or [min(cfgs, key=lambda c: (c.kwargs["BM"], c.kwargs["N_SPLIT"], c.kwargs["BK"]))]


@triton.autotune(
    configs=configs(
        [{"BM": bm, "BK": bk, "BN": bn, "N_SPLIT": s}
         for bm in (16, 32, 64, 128) for bk, bn in ((64, 64), (128, 128)) for s in (1, 4, 16, 64)],
        interpret={"BM": 16, "BK": 32, "BN": 32, "N_SPLIT": 2},
        quick=[{"BM": 16, "BK": 64, "BN": 64, "N_SPLIT": 64, "num_warps": 4, "num_stages": 3},
               {"BM": 64, "BK": 128, "BN": 128, "N_SPLIT": 1, "num_warps": 4, "num_stages": 3}],
    ),
    key=["M_BUCKET", "K", "N", "R"],
    prune_configs_by={"early_config_prune": _fwd_prune},
)
@triton.jit(do_not_specialize=["M"])
def _lowrank_fwd_kernel(
    x_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, t_ptr,
    M, K, N, R, M_BUCKET,
    stride_xm, stride_xk, stride_ak, stride_ar, stride_bn, stride_br, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, RP: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, N_SPLIT: tl.constexpr,
):
    """y = (x @ a) @ b.T + bias and t = x @ a; x ``(M, K)``, a ``(K, R)``, b ``(N, R)``,
    y ``(M, N)``, t ``(M, R)`` fp32 contiguous.

    Program (i, j) owns rows ``[i*BM, (i+1)*BM)`` and every ``N_SPLIT``-th output tile from j.
    Stage 1 streams its x rows once: t = x @ a, an fp32 ``(BM, RP)`` tile in registers (program
    j == 0 also stores it). Stage 2 per output tile: y = t @ b_tile.T (+ bias), t narrowed to x's
    dtype for the tensor cores (rows rescaled for fp16). a and b (``r * (K + N)`` elements) stay
    L2-resident.

    FLOPs (tensor cores): 2*M*K*RP*N_SPLIT + 2*M*N*RP.
    Bytes: elt*(M*K*N_SPLIT + M*N) + 4*M*R (t) + elt*R*(K + N)*cdiv(M, BM) from L2 (+ elt*N bias).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)  # row offsets past 2^31 elements
    m_mask = rm < M
    rr = tl.arange(0, RP)
    r_mask = rr < R
    out_ty = y_ptr.dtype.element_ty

    t = tl.zeros((BM, RP), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_mask = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        a = tl.load(a_ptr + rk[:, None] * stride_ak + rr[None, :] * stride_ar,
                    mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        t = tl.dot(x, a, t, input_precision=PRECISION)
    if pid_n == 0:
        tl.store(t_ptr + rm[:, None] * R + rr[None, :], t, mask=m_mask[:, None] & r_mask[None, :])

    tc, inv = narrow(t, out_ty, 1)
    for n0 in range(pid_n * BN, N, BN * N_SPLIT):
        rn = n0 + tl.arange(0, BN)
        n_mask = rn < N
        bt = tl.load(b_ptr + rn[None, :] * stride_bn + rr[:, None] * stride_br,
                     mask=n_mask[None, :] & r_mask[:, None], other=0.0)
        acc = tl.dot(tc, bt, input_precision=PRECISION) * inv
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(out_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


def _grad_prune(cfgs, named_args, **kwargs):
    """Keep batch splits that give every split at least one row block; never return nothing."""
    m = named_args["M"]
    kept = [c for c in cfgs if c.kwargs["SPLIT"] <= max(cdiv(m, c.kwargs["BM"]), 1)]
    return kept or cfgs[:1]


@triton.jit
def _strip_product(a_ptr, s_ptr, out_ptr, sum_ptr, f0, F, M, R, stride_am, stride_af, stride_sm, stride_sr,
                   pid_s, n_split, RP: tl.constexpr, PRECISION: tl.constexpr, BF: tl.constexpr, BM: tl.constexpr,
                   COLSUM: tl.constexpr):
    """out[f0:f0+BF, :R] = a[rows, f0:f0+BF].T @ s[rows, :R] over this split's row blocks
    (blocks pid_s, pid_s + n_split, ...); a ``(M, F)`` in the input dtype, s ``(M, R)`` fp32,
    narrowed to a's dtype per block (columns rescaled for fp16).
    With ``COLSUM`` also sum_ptr[f0:f0+BF] = column sums of a over the same rows."""
    rf = f0 + tl.arange(0, BF)
    f_mask = rf < F
    rr = tl.arange(0, RP)
    r_mask = rr < R
    acc = tl.zeros((BF, RP), dtype=tl.float32)
    colsum = tl.zeros((BF,), dtype=tl.float32)
    for m0 in range(pid_s * BM, M, BM * n_split):
        rm = (m0 + tl.arange(0, BM)).to(tl.int64)  # row offsets past 2^31 elements
        m_mask = rm < M
        at = tl.load(a_ptr + rf[:, None] * stride_af + rm[None, :] * stride_am,
                     mask=f_mask[:, None] & m_mask[None, :], other=0.0)
        s = tl.load(s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr,
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        sh, inv = narrow(s, at.dtype, 0)
        acc += tl.dot(at, sh, input_precision=PRECISION) * inv
        if COLSUM:
            colsum += tl.sum(at.to(tl.float32), axis=1)
    tl.store(out_ptr + rf[:, None] * R + rr[None, :], acc.to(out_ptr.dtype.element_ty), mask=f_mask[:, None] & r_mask[None, :])
    if COLSUM:
        tl.store(sum_ptr + rf, colsum.to(sum_ptr.dtype.element_ty), mask=f_mask)


@triton.autotune(
    configs=configs(
        [{"BF": bf, "BM": bm, "SPLIT": s} for bf in (32, 64, 128) for bm in (64, 128) for s in (1, 4, 16)],
        interpret={"BF": 32, "BM": 16, "SPLIT": 2},
        quick=[{"BF": 32, "BM": 64, "SPLIT": 1, "num_warps": 4, "num_stages": 3},
               {"BF": 64, "BM": 64, "SPLIT": 4, "num_warps": 4, "num_stages": 3}],
    ),
    key=["M_BUCKET", "K", "N", "R"],
    prune_configs_by={"early_config_prune": _grad_prune},
)
@triton.jit(do_not_specialize=["M"])
def _lowrank_grad_kernel(
    x_ptr, dy_ptr, p_ptr, q_ptr, da_ptr, db_ptr, dsum_ptr,
    M, K, N, R, M_BUCKET,
    stride_xm, stride_xk, stride_gm, stride_gn, stride_pm, stride_pr, stride_qm, stride_qr,
    RP: tl.constexpr, PRECISION: tl.constexpr, BF: tl.constexpr, BM: tl.constexpr, SPLIT: tl.constexpr,
):
    """Partial gradients over batch split s: da_part[s] = x.T @ q, db_part[s] = dy.T @ p and
    dsum_part[s] = column sums of dy (the bias gradient, read from the dy tiles already loaded).

    x ``(M, K)``, dy ``(M, N)``, p and q ``(M, R)`` fp32; da_part ``(>= n_split, K, R)``, db_part
    ``(>= n_split, N, R)`` and dsum_part ``(>= n_split, N)`` contiguous, fp32 (or the gradients'
    dtype where the host allocated one slot). Program (f, s):
    feature tile f of x (f < cdiv(K, BF)) or of dy (the rest), rows of split s. The number of
    splits n_split is the grid's second axis: the config's SPLIT capped by the partial slots the
    host allocated (SPLIT itself only shapes the grid). The host sums the partials (deterministic,
    no atomics; no sum at all if n_split == 1).

    FLOPs (tensor cores): 2*M*(K + N)*RP. Bytes: elt*M*(K + N) + 4*M*R*(cdiv(K, BF) + cdiv(N, BF))
    from L2 + 4*n_split*((K + N)*R + N).
    """
    pid_f = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    tiles_k = tl.cdiv(K, BF)
    if pid_f < tiles_k:
        _strip_product(x_ptr, q_ptr, da_ptr + pid_s * K * R, dsum_ptr, pid_f * BF, K, M, R,
                       stride_xm, stride_xk, stride_qm, stride_qr, pid_s, n_split, RP, PRECISION, BF, BM, False)
    else:
        _strip_product(dy_ptr, p_ptr, db_ptr + pid_s * N * R, dsum_ptr + pid_s * N, (pid_f - tiles_k) * BF, N, M, R,
                       stride_gm, stride_gn, stride_pm, stride_pr, pid_s, n_split, RP, PRECISION, BF, BM, True)


def lowrank_linear(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused forward: x ``(*, k)``, a ``(k, r)``, b ``(n, r)``, bias ``(n,)`` ->
    y ``(*, n)`` in x's dtype and t = x @ a ``(*, r)`` fp32. Factors are cast to x's dtype; ranks
    that do not ``fit`` run the reference."""
    check_inputs(x, a, b, bias)
    if not fits(a.shape[1]):
        return ref.lowrank_linear(x, a, b, bias)
    a, b = cast(a, x.dtype), cast(b, x.dtype)
    x2 = flatten(x)
    m, k = x2.shape
    n, r = b.shape
    # allocated in their final shape, contiguous (rows m * n apart): no view for the op to re-label
    y = torch.empty(*x.shape[:-1], n, device=x.device, dtype=x.dtype)
    t = torch.empty(*x.shape[:-1], r, device=x.device, dtype=torch.float32)
    if m > 0:
        grid = lambda meta: (cdiv(m, meta["BM"]), meta["N_SPLIT"])  # noqa: E731
        _lowrank_fwd_kernel[grid](
            x2, a, b, contiguous(bias) if bias is not None else y, y, t,
            m, k, n, r, m_bucket(m),
            x2.stride(0), x2.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1), n, 1,
            HAS_BIAS=bias is not None, RP=pad_rank(r), PRECISION=dot_precision(x.dtype),
        )
    return y, t


def lowrank_grad_factors(
    x: torch.Tensor, dy: torch.Tensor, p: torch.Tensor, q: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x.T @ q ``(k, r)``, dy.T @ p ``(n, r)``, dy summed over rows ``(n,)``), accumulated in fp32
    and returned in ``dtype``, for x ``(*, k)``, dy ``(*, n)``, p and q ``(*, r)``; ranks that do
    not ``fit`` run the reference."""
    check_inputs(x, dy, p, q)
    if not fits(p.shape[-1]):
        return ref.lowrank_grad_factors(x, dy, p, q, dtype)
    x2, g2 = flatten(x), flatten(cast(dy, x.dtype))
    p2, q2 = flatten(cast(p, torch.float32)), flatten(cast(q, torch.float32))
    m, k = x2.shape
    n = g2.shape[1]
    r = p2.shape[1]
    if m == 0:
        return x2.new_zeros(k, r, dtype=dtype), x2.new_zeros(n, r, dtype=dtype), x2.new_zeros(n, dtype=dtype)
    # One partial slot per batch split, never more splits than row blocks. Separate buffers: the
    # outputs of a custom op may not share storage.
    slots = SplitSlots(_lowrank_grad_kernel, lambda meta: min(meta["SPLIT"], cdiv(m, meta["BM"])), key=m)
    da, db, dsum = (slots.empty(*shape, device=x.device, dtype=dtype) for shape in ((k, r), (n, r), (n,)))
    grid = lambda meta: (cdiv(k, meta["BF"]) + cdiv(n, meta["BF"]), slots(meta))  # noqa: E731
    _lowrank_grad_kernel[grid](
        x2, g2, p2, q2, da, db, dsum,
        m, k, n, r, m_bucket(m),
        x2.stride(0), x2.stride(1), g2.stride(0), g2.stride(1),
        p2.stride(0), p2.stride(1), q2.stride(0), q2.stride(1),
        RP=pad_rank(r), PRECISION=dot_precision(x.dtype),
    )
    return slots.sum(da, dtype), slots.sum(db, dtype), slots.sum(dsum, dtype)
