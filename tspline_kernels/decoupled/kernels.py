"""Triton kernels and launchers for DecoupledSplineMLP. Reference: ``reference/decoupled.py``.

y = g(x @ V) @ W.T + bias, x ``(M, m)``, V ``(m, r)``, W ``(n, r)``, unit i's activation g_i a
clamped uniform cubic B-spline with K basis functions on [lo_i, hi_i], linear beyond (v = (z - lo)
(K - 3) / (hi - lo) in span units, v_c = clamp(v, 0, K - 3): g = sum_j c_j (B_j(v_c) + B_j'(v_c)
(v - v_c))). Both directions loop over rank blocks of BR units: z = x @ V[:, block] on the tensor
cores (fp32 accumulation), the spline in registers (``basis_taps``: four nonzero cubic values per
scalar, coefficients gathered from the ``r x K`` table in L1/L2), then a second ``tl.dot`` into an
fp32 output tile. Intermediates become tensor-core operands in the input dtype through
``_rescale.narrow`` (fp16 rows scaled by a power of two: fp32's range, as in the reference).

Forward, ``_decoupled_fwd_kernel``: program (i, j) owns rows block i and output tile j (BN
columns of y); the rank-r activations never leave the chip. Trade-off: z is recomputed for each
of the cdiv(n, BN) output tiles (BN up to 256 makes that once for n <= 256), which keeps any rank
on chip with a (BM, BN) accumulator; keeping the whole (BM, r) activation tile instead bounds r
by registers (the low-rank kernels stop at 256), and a split over r would need partial y sums.

Backward, ``_decoupled_bwd_kernel``: with u = dy @ W, dz = u * g'(z), program (s, j) runs row
blocks s, s + S, ... (S row splits) and dx tile j: per rank block z and u (two tensor-core
projections), the spline's values and slopes (``_slopes``: the quadratic Cox-de Boor step that
gives B_j'), dz, then dx_tile += dz @ V[tile, block].T; dz never goes through global memory
for dx. Programs j == 0 also store G = g(z) and dz (fp32 ``(M, r)``: the factor gradients
dV = x.T @ dz and dW = dy.T @ G contract over the batch, so ``lowrank_grad_factors`` reads them
back) and add the coefficient gradient dcoef[i, k] = sum_rows u_i (B_k(v_c) + B_k'(v_c)(v - v_c))
into their split's partial slot (``SplitSlots``, deterministic, summed on the host).
What is materialised: G and dz (8 M r bytes), S partial (r, K) tables; never an (m, n) matrix.

Cost against the minimum (elt = bytes per input element, T_n = cdiv(n, BN), T_m = cdiv(m, BN)):
  forward   useful 2 M r (m + n) FLOPs + ~30 M r for the splines; kernel 2 M r (m T_n + n);
            minimal bytes elt (M m + M n + r (m + n)); kernel adds (T_n - 1) elt M m of x re-reads.
  backward  useful 2 M r (3 m + 2 n) (z, u, dx, dV, dW) + ~80 M r splines + ~10 M r K for dcoef
            (a K-step select-and-sum per rank block); kernel 2 M r (m + n) T_m + 2 M r m, then the
            factor kernel's 2 M r (m + n); minimal bytes elt (2 M m + M n + 2 r (m + n)); kernels add
            (T_m - 1) elt M (m + n) of re-reads, 16 M r for G and dz (written, read back) and
            elt M (m + n) for the factor kernel's second pass over x and dy.
"""

from __future__ import annotations

import torch

from .._basis import BSPLINE_KIND, basis_taps, clamp
from .._layers import cast
from .._rescale import narrow
from .._triton import (SplitSlots, cdiv, check_inputs, configs, contiguous, dot_precision, flatten, m_bucket, next_pow2,
                       tl, triton)


@triton.jit
def _project(a_ptr, b_ptr, rm, m_mask, rr, r_mask, K, stride_am, stride_ak, stride_bk, stride_br,
             PRECISION: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    """a[rm, :K] @ b[:K, rr] as an fp32 ``(BM, BR)`` tile (masked rows and columns are zero)."""
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_mask = rk < K
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + rk[:, None] * stride_bk + rr[None, :] * stride_br,
                    mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _slopes(v, top):
    """d/dv of the four nonzero cubic basis values at ``v`` in span units [0, top], in the columns
    ``basis_taps`` gives: B_j' = 3 N_j / (U[j+3] - U[j]) - 3 N_{j+1} / (U[j+4] - U[j+1]) with N the
    quadratic basis on the same clamped knots U[j] = clamp(j - 3, 0, top), nonzero here for
    j = s + 1 .. s + 3 (span s)."""
    s = clamp(tl.floor(v), 0.0, top - 1.0)
    l1 = v - s
    l2 = v - tl.maximum(s - 1.0, 0.0)
    l3 = v - tl.maximum(s - 2.0, 0.0)
    r1 = s + 1.0 - v
    r2 = tl.minimum(s + 2.0, top) - v
    r3 = tl.minimum(s + 3.0, top) - v
    # Cox-de Boor degree 2 from degree 1 (r1, l1): q0, q1, q2 = N_{s+1}, N_{s+2}, N_{s+3}
    t = r1 / (r1 + l2)
    q0 = r1 * t
    q1 = l2 * t
    t = l1 / (r2 + l1)
    q1 += r2 * t
    q2 = l1 * t
    a0 = 3.0 * q0 / (r1 + l3)
    a1 = 3.0 * q1 / (r2 + l2)
    a2 = 3.0 * q2 / (r3 + l1)
    return -a0, a0 - a1, a1 - a2, a2


@triton.jit
def _unit_block(x_ptr, v_ptr, coef_ptr, lo_ptr, hi_ptr, rm, m_mask, r0, K, R, KB,
                stride_xm, stride_xk, stride_vk, stride_vr, stride_cr, stride_ck,
                PRECISION: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    """Units r0 .. r0 + BR at rows rm: z = x[rm] @ v[:, units] and the splines' taps there.

    Returns (rr, r_mask, v_c, e, scale, c0, b0..b3, k0..k3): v_c = clamp(v, 0, K - 3) with v the
    span-unit position, e = v - v_c (nonzero beyond the range), scale = dv/dz per unit ``(BR,)``,
    c0 the first nonzero basis column, b the four basis values at v_c (columns c0 .. c0 + 3) and
    k the coefficients there (fp32, 0 for units past R); all ``(BM, BR)`` but scale.
    """
    rr = r0 + tl.arange(0, BR)
    r_mask = rr < R
    z = _project(x_ptr, v_ptr, rm, m_mask, rr, r_mask, K, stride_xm, stride_xk, stride_vk, stride_vr,
                 PRECISION, BM, BR, BK)
    top = (KB - 3).to(tl.float32)
    lo = tl.load(lo_ptr + rr, mask=r_mask, other=0.0).to(tl.float32)
    hi = tl.load(hi_ptr + rr, mask=r_mask, other=1.0).to(tl.float32)
    scale = top / (hi - lo)
    v = (z - lo[None, :]) * scale[None, :]
    vc = clamp(v, 0.0, top)
    vc = tl.where(vc == vc, vc, 0.0)  # a NaN z (a NaN input) takes span 0, a valid index; e = v - vc stays NaN
    c0, c1, c2, c3, b0, b1, b2, b3 = basis_taps(vc, 1.0, top, BSPLINE_KIND)
    row = coef_ptr + rr[None, :] * stride_cr
    k0 = tl.load(row + c0 * stride_ck, mask=r_mask[None, :], other=0.0).to(tl.float32)
    k1 = tl.load(row + c1 * stride_ck, mask=r_mask[None, :], other=0.0).to(tl.float32)
    k2 = tl.load(row + c2 * stride_ck, mask=r_mask[None, :], other=0.0).to(tl.float32)
    k3 = tl.load(row + c3 * stride_ck, mask=r_mask[None, :], other=0.0).to(tl.float32)
    return rr, r_mask, vc, v - vc, scale, c0, b0, b1, b2, b3, k0, k1, k2, k3


_MIN_SPLIT = 8  # the backward's smallest row split: kept for any batch (the launch caps it at the row blocks)


def _pruner(width: str):
    """Config pruning for a kernel whose output tiles span the argument ``width``: keep row blocks
    no taller than the batch bucket, output tiles and rank blocks no wider than needed, row splits
    no more than the row blocks; never return nothing."""
    def prune(cfgs, named_args, **kwargs):
        bucket, n, r = named_args["M_BUCKET"], named_args[width], named_args["R"]
        kept = [c for c in cfgs
                if c.kwargs["BM"] <= max(16, bucket)
                and c.kwargs["BN"] <= max(64, next_pow2(n))
                and c.kwargs["BR"] <= max(32, next_pow2(r))
                and c.kwargs.get("SPLIT", 1) <= max(cdiv(bucket, c.kwargs["BM"]), _MIN_SPLIT)]
        smallest = min(cfgs, key=lambda c: (c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BR"], c.kwargs.get("SPLIT", 1)))
        return kept or [smallest]
    return prune


@triton.autotune(
    configs=configs(
        [{"BM": bm, "BK": bk, "BR": br, "BN": bn}
         for bm in (16, 32, 64, 128) for bk, br in ((32, 32), (64, 64)) for bn in (64, 128, 256)
         if bm * br <= 4096 and bm * bn <= 16384],
        interpret={"BM": 16, "BK": 32, "BR": 16, "BN": 32},
        quick=[{"BM": 16, "BK": 64, "BR": 64, "BN": 128, "num_warps": 4, "num_stages": 3},
               {"BM": 64, "BK": 64, "BR": 64, "BN": 128, "num_warps": 8, "num_stages": 3}],
    ),
    key=["M_BUCKET", "K", "N_OUT", "R", "KB"],
    prune_configs_by={"early_config_prune": _pruner("N_OUT")},
)
@triton.jit(do_not_specialize=["M"])
def _decoupled_fwd_kernel(
    x_ptr, v_ptr, w_ptr, coef_ptr, lo_ptr, hi_ptr, bias_ptr, y_ptr,
    M, K, N_OUT, R, KB, M_BUCKET,
    stride_xm, stride_xk, stride_vk, stride_vr, stride_wn, stride_wr, stride_cr, stride_ck, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr,
):
    """y = g(x @ v) @ w.T + bias; x ``(M, K)``, v ``(K, R)``, w ``(N_OUT, R)`` in x's dtype,
    coef ``(R, KB)``, lo/hi ``(R,)``, y ``(M, N_OUT)``.

    FLOPs: 2*M*K*R*cdiv(N_OUT, BN) + 2*M*R*N_OUT on tensor cores, ~40*M*R*cdiv(N_OUT, BN) for the
    splines. Bytes: elt*(M*K*cdiv(N_OUT, BN) + M*N_OUT), V, W and coef from L2 once per row block.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)  # row offsets past 2^31 elements
    m_mask = rm < M
    rn = pid_n * BN + tl.arange(0, BN)
    n_mask = rn < N_OUT
    out_ty = y_ptr.dtype.element_ty
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, R, BR):
        rr, r_mask, _, e, _, _, b0, b1, b2, b3, k0, k1, k2, k3 = _unit_block(
            x_ptr, v_ptr, coef_ptr, lo_ptr, hi_ptr, rm, m_mask, r0, K, R, KB,
            stride_xm, stride_xk, stride_vk, stride_vr, stride_cr, stride_ck, PRECISION, BM, BR, BK)
        # linear beyond the range: the edge slopes of a clamped cubic, 3 (c1 - c0) and 3 (c_K-1 - c_K-2)
        edge = coef_ptr + rr * stride_cr
        c_lo0 = tl.load(edge, mask=r_mask, other=0.0).to(tl.float32)
        c_lo1 = tl.load(edge + stride_ck, mask=r_mask, other=0.0).to(tl.float32)
        c_hi0 = tl.load(edge + (KB - 2) * stride_ck, mask=r_mask, other=0.0).to(tl.float32)
        c_hi1 = tl.load(edge + (KB - 1) * stride_ck, mask=r_mask, other=0.0).to(tl.float32)
        g = k0 * b0 + k1 * b1 + k2 * b2 + k3 * b3
        g += e * tl.where(e < 0, 3.0 * (c_lo1 - c_lo0)[None, :], 3.0 * (c_hi1 - c_hi0)[None, :])
        gc, inv = narrow(g, out_ty, 1)
        wt = tl.load(w_ptr + rn[None, :] * stride_wn + rr[:, None] * stride_wr,
                     mask=n_mask[None, :] & r_mask[:, None], other=0.0)
        acc += tl.dot(gc, wt, input_precision=PRECISION) * inv
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(out_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.autotune(
    configs=configs(
        [{"BM": bm, "BK": bk, "BR": br, "BN": bn, "SPLIT": s}
         for bm in (16, 32, 64) for bk, br in ((32, 32), (64, 64)) for bn in (64, 128) for s in (_MIN_SPLIT, 64)
         if bm * br <= 2048],
        interpret={"BM": 16, "BK": 32, "BR": 16, "BN": 32, "SPLIT": 2},
        quick=[{"BM": 16, "BK": 64, "BR": 64, "BN": 64, "SPLIT": 64, "num_warps": 4, "num_stages": 3},
               {"BM": 32, "BK": 64, "BR": 64, "BN": 128, "SPLIT": 64, "num_warps": 8, "num_stages": 3}],
    ),
    key=["M_BUCKET", "K", "N_OUT", "R", "KB", "NEED_DX"],
    prune_configs_by={"early_config_prune": _pruner("K")},
)
@triton.jit(do_not_specialize=["M"])
def _decoupled_bwd_kernel(
    x_ptr, dy_ptr, v_ptr, w_ptr, coef_ptr, lo_ptr, hi_ptr, dx_ptr, g_ptr, dz_ptr, dcoef_ptr, dcoef_out_ptr,
    M, K, N_OUT, R, KB, M_BUCKET,
    stride_xm, stride_xk, stride_gm, stride_gn, stride_vk, stride_vr, stride_wn, stride_wr,
    stride_cr, stride_ck, stride_dxm, stride_dxk,
    NEED_DX: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr,
):
    """dx = dz @ v.T (if ``NEED_DX``), G = g(z) and dz = (dy @ w) * g'(z) (fp32 ``(M, R)``
    contiguous), and dcoef partials ``(>= S, R, KB)`` fp32, for z = x @ v; x ``(M, K)``, dy
    ``(M, N_OUT)``, v, w in x's dtype. S = the grid's first axis (the config's SPLIT capped by the
    row blocks; the host allocated the slots); each split's program j == 0 writes every entry of
    its slot (the first row block stores, later ones add), so no slot read is stale. With one split
    its last row block also stores the sum, rounded once, to dcoef_out ``(R, KB)`` (coef's dtype):
    the host then sums nothing and casts nothing.

    FLOPs: (2*M*(K + N_OUT)*R + ~80*M*R)*T + 2*M*K*R for dx (T = cdiv(K, BN) dx tiles, 1 without dx)
    + ~10*M*R*KB for dcoef. Bytes: elt*(M*(K + N_OUT)*T + M*K) + 8*M*R + 4*S*R*KB.
    """
    pid_s = tl.program_id(0)
    n_split = tl.num_programs(0)
    pid_n = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    n_mask = rn < K
    top = (KB - 3).to(tl.float32)
    for m0 in range(pid_s * BM, M, BM * n_split):
        rm = (m0 + tl.arange(0, BM)).to(tl.int64)  # row offsets past 2^31 elements
        m_mask = rm < M
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for r0 in range(0, R, BR):
            rr, r_mask, vc, e, scale, c0, b0, b1, b2, b3, k0, k1, k2, k3 = _unit_block(
                x_ptr, v_ptr, coef_ptr, lo_ptr, hi_ptr, rm, m_mask, r0, K, R, KB,
                stride_xm, stride_xk, stride_vk, stride_vr, stride_cr, stride_ck, PRECISION, BM, BR, BK)
            u = _project(dy_ptr, w_ptr, rm, m_mask, rr, r_mask, N_OUT, stride_gm, stride_gn, stride_wn, stride_wr,
                         PRECISION, BM, BR, BK)
            # slopes at v_c, NaN where z is NaN (e is NaN exactly there: vc took span 0 only for the index)
            d0, d1, d2, d3 = _slopes(tl.where(e == e, vc, e), top)
            # values with the linear extrapolation: B_j(v_c) + B_j'(v_c) (v - v_c)
            b0 += d0 * e
            b1 += d1 * e
            b2 += d2 * e
            b3 += d3 * e
            dz = u * (k0 * d0 + k1 * d1 + k2 * d2 + k3 * d3) * scale[None, :]
            if NEED_DX:
                dzc, inv = narrow(dz, x_ptr.dtype.element_ty, 1)
                vt = tl.load(v_ptr + rn[None, :] * stride_vk + rr[:, None] * stride_vr,
                             mask=n_mask[None, :] & r_mask[:, None], other=0.0)
                acc += tl.dot(dzc, vt, input_precision=PRECISION) * inv
            if pid_n == 0:
                mr_mask = m_mask[:, None] & r_mask[None, :]
                g = k0 * b0 + k1 * b1 + k2 * b2 + k3 * b3
                tl.store(g_ptr + rm[:, None] * R + rr[None, :], g, mask=mr_mask)
                tl.store(dz_ptr + rm[:, None] * R + rr[None, :], dz, mask=mr_mask)
                # dcoef[:, k] += column sums of u * (value of basis k); basis k is tap k - c0
                slot = dcoef_ptr + pid_s * R * KB + rr * KB
                added = r_mask & (rr * 0 + m0 > pid_s * BM)  # the split's first row block stores
                # one split: its last row block also stores the sum, rounded once, as the result
                final = r_mask & (rr * 0 + n_split == 1) & (rr * 0 + m0 + BM >= M)
                for k in range(0, KB):
                    tap = k - c0
                    hit = tl.where(tap == 0, b0, tl.where(tap == 1, b1, tl.where(tap == 2, b2, tl.where(tap == 3, b3, 0.0))))
                    # selected after the product: an inf / NaN u (from dy) reaches only the four
                    # columns its row touches, as the reference's index_add (u * 0 would be NaN in all)
                    hit = tl.where((tap >= 0) & (tap < 4), u * hit, 0.0)
                    total = tl.load(slot + k, mask=added, other=0.0) + tl.sum(hit, axis=0)
                    tl.store(slot + k, total, mask=r_mask)
                    tl.store(dcoef_out_ptr + rr * KB + k, total.to(dcoef_out_ptr.dtype.element_ty), mask=final)
        if NEED_DX:
            tl.store(dx_ptr + rm[:, None] * stride_dxm + rn[None, :] * stride_dxk, acc.to(dx_ptr.dtype.element_ty),
                     mask=m_mask[:, None] & n_mask[None, :])


def _check_ranges(v: torch.Tensor, w: torch.Tensor, coef: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
    r = v.shape[1]
    if w.shape[1] != r or coef.shape[0] != r or lo.shape != (r,) or hi.shape != (r,) or coef.shape[1] < 4:
        raise ValueError(f"decoupled MLP shapes disagree: V {tuple(v.shape)}, W {tuple(w.shape)}, coef "
                         f"{tuple(coef.shape)} (K >= 4), lo {tuple(lo.shape)}, hi {tuple(hi.shape)}")


def decoupled_mlp(x: torch.Tensor, v: torch.Tensor, w: torch.Tensor, coef: torch.Tensor, lo: torch.Tensor,
                  hi: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Launch the fused forward: x ``(*, m)``, v ``(m, r)``, w ``(n, r)``, coef ``(r, K)``, lo/hi
    ``(r,)``, bias ``(n,)`` or None -> y ``(*, n)`` in x's dtype (v, w cast to it)."""
    check_inputs(x, v, w, coef, lo, hi, bias)
    _check_ranges(v, w, coef, lo, hi)
    v, w = cast(v, x.dtype), cast(w, x.dtype)
    lo, hi = contiguous(lo), contiguous(hi)  # (r,) vectors: the kernels read them unit-strided
    bias = None if bias is None else contiguous(bias)
    x2 = flatten(x)
    m, k = x2.shape
    n, r = w.shape
    y = torch.empty(*x.shape[:-1], n, device=x.device, dtype=x.dtype)  # final shape: no view to re-label
    if m > 0 and n > 0:
        grid = lambda meta: (cdiv(m, meta["BM"]), cdiv(n, meta["BN"]))  # noqa: E731
        _decoupled_fwd_kernel[grid](
            x2, v, w, coef, lo, hi, bias if bias is not None else y, y,
            m, k, n, r, coef.shape[1], m_bucket(m),
            x2.stride(0), x2.stride(1), v.stride(0), v.stride(1), w.stride(0), w.stride(1),
            coef.stride(0), coef.stride(1), n, 1,
            HAS_BIAS=bias is not None, PRECISION=dot_precision(x.dtype),
        )
    return y


def decoupled_mlp_backward(
    dy: torch.Tensor, x: torch.Tensor, v: torch.Tensor, w: torch.Tensor, coef: torch.Tensor,
    lo: torch.Tensor, hi: torch.Tensor, need_input: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the fused backward: (dx like x, or empty without ``need_input``; G ``(*, r)``,
    dz ``(*, r)`` fp32, dcoef ``(r, K)`` in coef's dtype) for dy ``(*, n)`` and the forward's inputs."""
    check_inputs(dy, x, v, w, coef, lo, hi)
    _check_ranges(v, w, coef, lo, hi)
    v, w, dy = cast(v, x.dtype), cast(w, x.dtype), cast(dy, x.dtype)
    lo, hi = contiguous(lo), contiguous(hi)
    x2, g2 = flatten(x), flatten(dy)
    m, k = x2.shape
    n, r = w.shape
    kb = coef.shape[1]
    # final shapes, contiguous
    dx = torch.empty(*x.shape, device=x.device, dtype=x.dtype) if need_input else x.new_empty(0)
    g = torch.empty(*x.shape[:-1], r, device=x.device, dtype=torch.float32)
    dz = torch.empty(*x.shape[:-1], r, device=x.device, dtype=torch.float32)
    if m == 0:
        dcoef = torch.zeros(r, kb, device=x.device, dtype=coef.dtype)
    else:
        slots = SplitSlots(_decoupled_bwd_kernel, lambda meta: min(meta["SPLIT"], cdiv(m, meta["BM"])), key=m)
        part = slots.empty(r, kb, device=x.device)  # fp32 accumulators: a split adds each row block in
        dcoef = torch.empty(r, kb, device=x.device, dtype=coef.dtype)  # written by a single split
        grid = lambda meta: (slots(meta), cdiv(k, meta["BN"]) if need_input else 1)  # noqa: E731
        _decoupled_bwd_kernel[grid](
            x2, g2, v, w, coef, lo, hi, dx, g, dz, part, dcoef,
            m, k, n, r, kb, m_bucket(m),
            x2.stride(0), x2.stride(1), g2.stride(0), g2.stride(1), v.stride(0), v.stride(1),
            w.stride(0), w.stride(1), coef.stride(0), coef.stride(1),
            k if need_input else 0, 1 if need_input else 0,
            NEED_DX=need_input, PRECISION=dot_precision(x.dtype),
        )
        if slots.used > 1:
            dcoef = slots.sum(part, coef.dtype)
    return dx, g, dz, dcoef
