"""Triton kernels and launchers for SplineLinear. Reference: ``reference/spline.py``.

Separable bases (``BSPLINE``, ``BICUBIC``): y = ((x @ Bi) @ C.T) @ Bo.T in two streaming passes
on the tensor cores. The input pass reads x once, split over K, and writes u = x @ Bi as fp32
partials, each only over the narrow window of grid columns its chunk of x touches (Bi is
four-banded); the output pass sums u from them and writes y tile by tile through the window of
C and Bo each tile touches. Bi and Bo are read from per-shape cached tables (``basis_windows``).
A hierarchical layer's grids share one input pass: their windows side by side (``level_windows``).
dC (backward) runs the input pass on x and dy and multiplies the gathered results.
Field bases (``IDW``, ``GAUSSIAN``): y = x @ W.T without W in memory. For few rows every W tile
is generated from the lattice points in registers and fed to ``tl.dot`` (on the fly); for many
rows, where that would regenerate each tile once per row block, W is generated once, slice by
slice, into an L2-sized workspace that cuBLAS multiplies (``field_slice_rows``).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .._triton import (SplitSlots, cdiv, check_inputs, configs, contiguous, dot_dim, dot_precision, flatten, grouped_pid,
                       m_bucket, next_pow2, sliced_gemm, tl, triton)
from ..reference import spline as ref
from ..reference.common import bias_grad
from ..reference.spline import EXP_FLOOR, GAUSSIAN, GAUSSIAN_EPS, IDW, IDW_EPS, SIGMA_MIN


_IDW_EPS = tl.constexpr(IDW_EPS)
_GAUSSIAN_EPS = tl.constexpr(GAUSSIAN_EPS)
_EXP_FLOOR = tl.constexpr(EXP_FLOOR)
_SIGMA_MIN = tl.constexpr(SIGMA_MIN)
_IDW = tl.constexpr(IDW)  # the field basis codes, as the kernels' BASIS
_GAUSSIAN = tl.constexpr(GAUSSIAN)
_BIAS_OF_U = tl.constexpr(1)  # _field_grad_kernel's DBIAS: the bias gradient is u's row sum,
_BIAS_OF_V = tl.constexpr(2)  # v's, or (0) not wanted


# ----------------------------------------------------------------------------------------------
# Separable forward: an input pass and an output pass, both on tensor cores
# ----------------------------------------------------------------------------------------------
OUT_TILE = 64  # output columns per tile of the output pass: the row chunk of the output basis table


class BasisWindows(NamedTuple):
    """One axis's basis B ``(n, G)`` cut into chunks of ``chunk`` rows, each kept only over the
    ``width`` grid columns its rows touch (B is four-banded and monotone, so that is a narrow
    window): ``table[p, s, b, w]`` is part p of ``B[s*chunk + b, start[s] + w]``, zero past n or
    G, ``(P, S, chunk, width)``; ``start`` ``(S,)`` int32. ``width`` is a power of two >= 16
    (``tl.dot``'s minimum). For fp16/bf16 P = 2: B rounded to the dtype and its rounding residual,
    whose sum holds B to ~16 bits where one 16-bit value holds 8 or 11 (cancelling sums of large
    inputs lost up to 10x the reference's accuracy to a rounded basis); P = 1 otherwise. ``chunks``
    is S and ``split`` whether P = 2, kept as ints so that launches need not ask the tensors."""

    table: torch.Tensor
    start: torch.Tensor
    width: int
    chunks: int
    split: bool


@functools.lru_cache(maxsize=64)
def basis_windows(n: int, g: int, kind: int, chunk: int, dtype: torch.dtype, device: torch.device) -> BasisWindows:
    """The windowed basis table of one axis, built once per shape from the reference's float64
    basis (it depends on the shape only, never on parameters) and cached on ``device``."""
    s = max(cdiv(n, chunk), 1)
    rows = torch.zeros(s * chunk, g, dtype=torch.float64)
    rows[:n] = ref.basis_matrix(n, g, kind, torch.float64)
    touched = (rows != 0).reshape(s, chunk, g).any(1)
    cols = torch.arange(g)
    start = torch.where(touched, cols, g).min(1).values.clamp(max=g - 1)
    last = torch.where(touched, cols, -1).max(1).values
    width = max(16, next_pow2(int((last - start).max()) + 1))
    padded = torch.cat([rows, rows.new_zeros(s * chunk, width)], 1).reshape(s, chunk, g + width)
    table = padded.gather(2, (start[:, None] + torch.arange(width))[:, None, :].expand(s, chunk, width))
    parts = [table.to(dtype)]
    if dtype in (torch.float16, torch.bfloat16):
        parts.append((table - parts[0].double()).to(dtype))
    return BasisWindows(torch.stack(parts).to(device), start.to(device=device, dtype=torch.int32), width, s,
                        len(parts) == 2)


class LevelWindows(NamedTuple):
    """Several grids' ``BasisWindows`` of one axis side by side (a hierarchical layer's levels), so
    that one input pass multiplies each chunk of x by all of them: ``table`` ``(P, S, chunk,
    width)``, level k's window in columns ``offsets[k]`` on (zero columns pad ``width`` to a power
    of two); the pass's partials ``(S, M, width)`` hold level k's from column ``offsets[k]``, rows
    ``width`` apart. One level: its own table."""

    table: torch.Tensor
    width: int
    chunks: int
    split: bool
    levels: tuple[BasisWindows, ...]
    offsets: tuple[int, ...]


@functools.lru_cache(maxsize=64)
def level_windows(n: int, grids: tuple[int, ...], kind: int, chunk: int, dtype: torch.dtype,
                  device: torch.device) -> LevelWindows:
    """The ``LevelWindows`` of ``n`` rows for the grids ``grids`` (points on this axis, coarse to
    fine), cached like ``basis_windows``."""
    levels = tuple(basis_windows(n, g, kind, chunk, dtype, device) for g in grids)
    first = levels[0]
    if len(levels) == 1:
        return LevelWindows(first.table, first.width, first.chunks, first.split, levels, (0,))
    widths = [w.width for w in levels]
    width = next_pow2(sum(widths))
    table = torch.cat([w.table for w in levels], -1)
    table = torch.nn.functional.pad(table, (0, width - table.shape[-1])).contiguous()
    offsets = tuple(itertools.accumulate(widths[:-1], initial=0))
    return LevelWindows(table, width, first.chunks, first.split, levels, offsets)


@triton.autotune(
    configs=configs(
        [{"BM": bm, "BK": bk} for bm in (16, 32, 64, 128) for bk in (64, 128)],
        interpret={"BM": 16, "BK": 64},
        quick=[{"BM": 16, "BK": 128, "num_warps": 4, "num_stages": 3},
               {"BM": 64, "BK": 128, "num_warps": 4, "num_stages": 4}],
    ),
    key=["M_BUCKET", "N_IN", "CHUNK", "W"],
)
@triton.jit
def _separable_in_kernel(
    x_ptr, tab_ptr, part_ptr, colsum_ptr,
    M, N_IN, M_BUCKET, stride_xm, stride_xk,
    CHUNK: tl.constexpr, W: tl.constexpr, SPLIT: tl.constexpr, COLSUM: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr,
):
    """Input pass, split over K: part[s, rows] = x[rows, chunk s] @ Bi[chunk s, start[s]:start[s]+W].

    x ``(M, N_IN)``, the windowed table of Bi ``(P, S, CHUNK, W)`` (``BasisWindows``, or several
    grids' side by side: ``LevelWindows``), part ``(S, M, W)`` fp32. Program (i, s) streams its
    ``BM x CHUNK`` block of x once; every (s, row) slot is written whatever the config, so no slot
    is ever stale. Products of x's dtype on the tensor cores, fp32 accumulation; with ``SPLIT``
    (fp16/bf16, P = 2) x multiplies both parts of the table, so the basis is not rounded to x's
    dtype (x itself is exact). The partials stay fp32.
    With ``COLSUM`` (x is dy: the bias gradient) the program also sums its block's columns over its
    rows into slot i of colsum ``(row blocks, N_IN)`` (fp32, or the result's dtype for one block).
    FLOPs: 2*P*M*S*CHUNK*W (useful: 8*M*N_IN per grid). Bytes: elt*M*N_IN + 4*S*M*W, plus the table (L2).
    """
    pid_m = tl.program_id(0)
    s = tl.program_id(1)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)  # row offsets past 2^31 elements
    m_mask = rm < M
    rw = tl.arange(0, W)
    acc = tl.zeros((BM, W), dtype=tl.float32)
    for k0 in range(0, CHUNK, BK):
        rb = s * CHUNK + k0 + tl.arange(0, BK)
        a = tl.load(x_ptr + rm[:, None] * stride_xm + rb[None, :] * stride_xk,
                    mask=m_mask[:, None] & (rb < N_IN)[None, :], other=0.0)
        tab = tab_ptr + rb[:, None] * W + rw[None, :]  # rows past N_IN are zero
        acc = tl.dot(a, tl.load(tab), acc, input_precision=PRECISION)
        if COLSUM:
            colsum = tl.sum(a.to(tl.float32), axis=0).to(colsum_ptr.dtype.element_ty)
            tl.store(colsum_ptr + pid_m.to(tl.int64) * N_IN + rb, colsum, mask=rb < N_IN)
        if SPLIT:
            acc = tl.dot(a, tl.load(tab + tl.num_programs(1) * CHUNK * W), acc, input_precision=PRECISION)
    tl.store(part_ptr + (s.to(tl.int64) * M + rm)[:, None] * W + rw[None, :], acc, mask=m_mask[:, None])


@triton.jit
def _gather_windows(part_ptr, start_ptr, rm, m_mask, M, S, GP: tl.constexpr, W: tl.constexpr, BM: tl.constexpr,
                    PS: tl.constexpr):
    """u[rm, g] = sum over slots s of part[s, rm, g - start[s]] where that lies in the window of
    width W (part's rows ``PS`` apart: W, or a ``LevelWindows`` width): ``(BM, GP)`` fp32, summed
    in slot order (deterministic). Each load gathers
    ceil(8192 / (BM*GP)) slots at once: an (slots, BM, GP) tile of ~8192 elements. (The expression
    is written out twice: assigned to a name, the interpreter no longer takes it as a constexpr.)"""
    rg = tl.arange(0, GP)
    u = tl.zeros((BM, GP), dtype=tl.float32)
    for s0 in range(0, S, (8192 + BM * GP - 1) // (BM * GP)):
        rs = s0 + tl.arange(0, (8192 + BM * GP - 1) // (BM * GP))
        w = rg[None, None, :] - tl.load(start_ptr + rs, mask=rs < S, other=0)[:, None, None]
        ok = (rs < S)[:, None, None] & m_mask[None, :, None] & (w >= 0) & (w < W)
        rows = rs.to(tl.int64)[:, None, None] * M + rm[None, :, None]
        u += tl.sum(tl.load(part_ptr + rows * PS + w, mask=ok, other=0.0), axis=0)
    return u


def _split_prune(cfgs, named_args, **kwargs):
    """Drop output splits larger than the number of output tiles."""
    tiles = cdiv(named_args["N_OUT"], kwargs["BN"])
    kept = [c for c in cfgs if c.kwargs["N_SPLIT"] <= max(tiles, 1)]
    return kept or cfgs[:1]


@triton.autotune(
    configs=configs(
        [{"BM": bm, "N_SPLIT": n} for bm in (16, 32, 64, 128) for n in (1, 2, 4, 8, 64)],
        interpret={"BM": 16, "N_SPLIT": 2},
        # M=16: one output tile per program; M=8192: 4 programs per row block, ~3 resident per SM
        quick=[{"BM": 16, "N_SPLIT": 64, "num_warps": 4, "num_stages": 3},
               {"BM": 64, "N_SPLIT": 4, "num_warps": 4, "num_stages": 3}],
    ),
    key=["M_BUCKET", "N_OUT", "G_IN", "G_OUT", "S"],
    prune_configs_by={"early_config_prune": _split_prune},
)
@triton.jit
def _separable_out_kernel(
    part_ptr, start_in_ptr, c_ptr, tab_ptr, start_out_ptr, bias_ptr, res_ptr, y_ptr, u_ptr,
    M, S, N_OUT, G_IN, G_OUT, M_BUCKET,
    stride_co, stride_ci, stride_rm, stride_rn, stride_ym, stride_yn, stride_um,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STORE_U: tl.constexpr,
    GIP: tl.constexpr, W_IN: tl.constexpr, PS_IN: tl.constexpr, BN: tl.constexpr, PW: tl.constexpr,
    PRECISION: tl.constexpr, BM: tl.constexpr, N_SPLIT: tl.constexpr,
):
    """Output pass: y = (u @ C.T) @ Bo.T + bias + residual with u = x @ Bi summed from the input
    pass's slots.

    part ``(S, M, W_IN)`` fp32, C ``(G_OUT, G_IN)``, the fp32 windowed table of Bo ``(1, T, BN, PW)``
    (``BasisWindows``, T = cdiv(N_OUT, BN)), residual (with ``HAS_RESIDUAL``) and y ``(M, N_OUT)``.
    The sum is rounded once, at the store. Program (i, j) gathers u for its
    ``BM`` rows once, then for every ``N_SPLIT``-th output tile t from j: z = u @ C[win_t].T over
    the ``PW`` grid rows tile t touches (Bo is four-banded), y tile = z @ Bo_t.T. With ``STORE_U``
    the programs of column 0 also store u ``(M, G_IN)`` (rows ``stride_um`` apart, in u's dtype)
    for the backward's dC. u, z and the
    fp32 table of Bo stay fp32: ``PRECISION`` "tf32" for fp16/bf16 layers (tensor cores, fp32's
    range, 10-bit mantissas): rounded to fp16, u and z overflowed where y does not (inf * 0 in the
    banded tile then spread NaN over whole rows), and rounded to bf16 they cost cancelling outputs
    several times the reference's error; fp32 layers use torch's matmul precision.
    FLOPs: 2*M*T*PW*(GIP + BN) (useful: 2*M*(G_IN*G_OUT + 4*N_OUT)).
    Bytes: elt*M*N_OUT (twice with a residual) + 4*S*M*W_IN*N_SPLIT (partials, L2-resident)
    + elt*G_OUT*G_IN (+ 4*M*G_IN with ``STORE_U``).
    Minimal bytes of the whole forward (both passes): elt*(M*(N_IN + N_OUT) + G_OUT*G_IN).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)  # row offsets past 2^31 elements
    m_mask = rm < M
    u = _gather_windows(part_ptr, start_in_ptr, rm, m_mask, M, S, GIP, W_IN, BM, PS_IN)
    rq = tl.arange(0, GIP)
    if STORE_U:
        if pid_n == 0:
            tl.store(u_ptr + rm[:, None] * stride_um + rq[None, :], u.to(u_ptr.dtype.element_ty),
                     mask=m_mask[:, None] & (rq < G_IN)[None, :])
    rw = tl.arange(0, PW)
    for t in range(pid_n, tl.cdiv(N_OUT, BN), N_SPLIT):
        rp = tl.load(start_out_ptr + t) + rw
        ct = tl.load(c_ptr + rp[None, :] * stride_co + rq[:, None] * stride_ci,
                     mask=(rp < G_OUT)[None, :] & (rq < G_IN)[:, None], other=0.0)
        z = tl.dot(u, ct.to(tl.float32), input_precision=PRECISION)
        rn = t * BN + tl.arange(0, BN)
        bo_t = tl.load(tab_ptr + rn[None, :] * PW + rw[:, None])  # (PW, BN): Bo's window, transposed
        acc = tl.dot(z, bo_t, input_precision=PRECISION)
        mask = m_mask[:, None] & (rn < N_OUT)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N_OUT, other=0.0).to(tl.float32)[None, :]
        if HAS_RESIDUAL:
            res = tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :] * stride_rn, mask=mask, other=0.0)
            acc += res.to(tl.float32)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=mask)


def in_chunk(m: int) -> int:
    """Columns of x per input-pass program: short chunks (split-K: more programs) for few rows,
    long ones (fewer partial slots to write and gather) for many."""
    return 256 if m < 2048 else 512


def _fp32_operand_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision for fp32 intermediates of a ``dtype`` layer: tf32 for fp16/bf16 (no
    less precise than the input type), torch's matmul setting for fp32."""
    return dot_precision(dtype) if dtype == torch.float32 else "tf32"


def _chunk(m: int, chunk: int | None) -> int:
    """The input pass's chunk: ``in_chunk(m)`` unless given; a power of two the BK configs divide."""
    chunk = in_chunk(m) if chunk is None else chunk
    if chunk < 128 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 128 (the input pass's largest BK), got {chunk}")
    return chunk


def _input_pass(a2: torch.Tensor, win: BasisWindows | LevelWindows, chunk: int, bucket: int,
                sum_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch ``_separable_in_kernel`` on a2 ``(M, n)`` (M > 0, ``bucket`` = ``m_bucket(M)``) over the
    windows ``win`` (of n rows in chunks of ``chunk``): the fp32 windowed partials of a2 @ B ``(S,
    M, win.width)``, and a2's column sums ``(n,)`` in ``sum_dtype`` (None for None: none summed)."""
    m, n = a2.shape
    part = torch.empty(win.chunks, m, win.width, device=a2.device, dtype=torch.float32)
    if sum_dtype is None:
        slots, colsum, blocks = None, part, lambda meta: cdiv(m, meta["BM"])
    else:  # a slot of column sums per row block
        slots = blocks = SplitSlots(_separable_in_kernel, lambda meta: cdiv(m, meta["BM"]), key=m)
        colsum = slots.empty(n, device=a2.device, dtype=sum_dtype)
    _separable_in_kernel[lambda meta: (blocks(meta), win.chunks)](
        a2, win.table, part, colsum, m, n, bucket, *a2.stride(),
        CHUNK=chunk, W=win.width, SPLIT=win.split, COLSUM=slots is not None, PRECISION=dot_precision(a2.dtype),
    )
    return part, None if slots is None else slots.sum(colsum, sum_dtype)


def separable_levels(
    x: torch.Tensor, controls: list[torch.Tensor], bias: torch.Tensor | None, out_features: int, kind: int,
    *, chunk: int | None = None, u: torch.Tensor | None = None,
) -> torch.Tensor:
    """The op ``separable_linear``: one input pass over x for every level (control grid, coarse to
    fine; ``level_windows``), then per level the output pass, level k's output (x's dtype) added
    into level k + 1's output pass as its residual, the bias into the last's: 1 + levels launches,
    the inputs checked and the row geometry found once. x ``(*, n_in)``, controls ``[(G_out_k,
    G_in_k)]`` -> ``(*, out_features)``; ``chunk``: columns of x per input-pass program (default
    ``in_chunk(M)``), a power of two >= 128; ``u``: where given, ``(*, sum G_in_k)`` contiguous,
    the output passes also store each level's x @ Bi in it."""
    check_inputs(x, *controls, bias)
    if not controls:
        raise ValueError("separable_levels needs at least one control grid")
    x2 = flatten(x)
    m = x2.shape[0]
    chunk = _chunk(m, chunk)
    shape = (*x.shape[:-1], out_features)
    if m == 0 or out_features == 0:
        if u is not None and m:  # no output pass to store x's projections
            torch.cat([ref.input_projection(x, c.shape[1], kind) for c in controls], -1, out=u)
        return x.new_empty(shape)
    bucket = m_bucket(m)
    us = _levels_of(u, m, controls)
    win = level_windows(x2.shape[1], tuple([c.shape[1] for c in controls]), kind, chunk, x2.dtype, x2.device)
    part, _ = _input_pass(x2, win, chunk, bucket)
    y2 = None
    for k, control in enumerate(controls):
        r2, y2 = y2, x2.new_empty(m, out_features)
        _output_pass(_level_part(part, win, k), win.levels[k], win.width, control,
                     bias if k == len(controls) - 1 else None, kind, r2, y2, bucket, us[k])
    return y2 if x.dim() == 2 else y2.reshape(shape)  # a view: the op's owned() re-labels it


def _level_part(part: torch.Tensor, win: LevelWindows, k: int) -> torch.Tensor:
    """Level k's partials within an input pass's ``part`` over ``win``: from its column on."""
    return part if k == 0 else part[:, :, win.offsets[k]:]


def _levels_of(u: torch.Tensor | None, m: int, controls: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Each level's columns of u ``(*, sum G_in_k)`` as ``(M, G_in_k)`` views; Nones without u."""
    if u is None:
        return [None] * len(controls)
    u2 = flatten(u)
    if len(controls) == 1:
        return [u2]
    ends = list(itertools.accumulate(c.shape[1] for c in controls))
    return [u2[:, end - c.shape[1]:end] for c, end in zip(controls, ends)]


def _output_pass(part: torch.Tensor, bi: BasisWindows, stride: int, control: torch.Tensor, bias: torch.Tensor | None,
                 kind: int, r2: torch.Tensor | None, y2: torch.Tensor, bucket: int,
                 u: torch.Tensor | None = None) -> None:
    """y2 ``(M, n_out)`` = (x2 @ Bi) @ C.T @ Bo.T + bias + r2 from x2's input-pass partials ``part``
    over the basis windows ``bi``, rows ``stride`` apart (M > 0, ``bucket`` = ``m_bucket(M)``): one
    ``_separable_out_kernel`` launch, which also stores x2 @ Bi in u ``(M, G_in)`` (unit column
    stride) where given."""
    m, out_features = y2.shape
    g_out, g_in = control.shape
    bo = basis_windows(out_features, g_out, kind, OUT_TILE, torch.float32, y2.device)
    res = y2 if r2 is None else r2
    _separable_out_kernel[lambda meta: (cdiv(m, meta["BM"]), meta["N_SPLIT"])](
        part, bi.start, control, bo.table, bo.start, contiguous(bias) if bias is not None else y2, res, y2,
        y2 if u is None else u,
        m, bi.chunks, out_features, g_in, g_out, bucket, *control.stride(), *res.stride(), *y2.stride(),
        0 if u is None else u.stride(0),
        HAS_BIAS=bias is not None, HAS_RESIDUAL=r2 is not None, STORE_U=u is not None,
        GIP=dot_dim(g_in), W_IN=bi.width, PS_IN=stride, BN=OUT_TILE, PW=bo.width,
        PRECISION=_fp32_operand_precision(y2.dtype),
    )


@triton.autotune(
    configs=configs([{"BM": bm} for bm in (32, 64, 128)], interpret={"BM": 16},
                    quick=[{"BM": 32, "num_warps": 4, "num_stages": 3},
                           {"BM": 128, "num_warps": 8, "num_stages": 3}]),
    key=["M_BUCKET", "G_OUT", "G_IN", "S_OUT", "S_IN"],
)
@triton.jit
def _separable_dc_kernel(
    pout_ptr, start_out_ptr, pin_ptr, start_in_ptr, part_ptr,
    M, S_OUT, S_IN, G_OUT, G_IN, M_BUCKET, stride_um,
    GOP: tl.constexpr, GIP: tl.constexpr, W_OUT: tl.constexpr, W_IN: tl.constexpr, PS_OUT: tl.constexpr,
    PS_IN: tl.constexpr, DENSE_IN: tl.constexpr, BM: tl.constexpr,
):
    """Partial dC for one block of rows: part[pid] = (dy @ Bo).T @ (x @ Bi), ``(G_OUT, G_IN)`` fp32, or
    dC itself in its dtype where the host allocated one slot (computed on the ``(GOP, GIP)`` padded
    grid, stored without the padding).

    dy @ Bo is gathered from the input pass's windowed partials (window W_OUT, rows PS_OUT apart) fp32;
    x @ Bi likewise (W_IN, PS_IN), or with ``DENSE_IN`` loaded from the forward's u ``(M, G_IN)``
    (rows ``stride_um`` apart; ``start_in_ptr``, S_IN and W_IN unused). The host sums the
    ``cdiv(M, BM)`` partials (deterministic, no atomics). Their product runs in fp32 ("ieee"):
    nothing is rounded to the input dtype, as in the reference.
    FLOPs: 2*M*GOP*GIP (plus the input passes). Bytes: 4*M*(S_OUT*W_OUT + S_IN*W_IN) (DENSE_IN:
    4*M*(S_OUT*W_OUT + G_IN)) + 4*cdiv(M,BM)*G_OUT*G_IN.
    """
    pid = tl.program_id(0)
    rm = (pid * BM + tl.arange(0, BM)).to(tl.int64)  # row offsets past 2^31 elements
    m_mask = rm < M
    rp = tl.arange(0, GOP)
    rq = tl.arange(0, GIP)
    du = _gather_windows(pout_ptr, start_out_ptr, rm, m_mask, M, S_OUT, GOP, W_OUT, BM, PS_OUT)
    if DENSE_IN:
        t = tl.load(pin_ptr + rm[:, None] * stride_um + rq[None, :], mask=m_mask[:, None] & (rq < G_IN)[None, :],
                    other=0.0).to(tl.float32)
    else:
        t = _gather_windows(pin_ptr, start_in_ptr, rm, m_mask, M, S_IN, GIP, W_IN, BM, PS_IN)
    part = tl.dot(tl.trans(du), t, input_precision="ieee")
    tl.store(part_ptr + pid.to(tl.int64) * G_OUT * G_IN + rp[:, None] * G_IN + rq[None, :], part.to(part_ptr.dtype.element_ty),
             mask=(rp < G_OUT)[:, None] & (rq < G_IN)[None, :])


def _grad_control(pout: torch.Tensor, wout: BasisWindows, out_stride: int, g_out: int, pin: torch.Tensor,
                  win: BasisWindows | None, in_stride: int, g_in: int, bucket: int, dtype: torch.dtype) -> torch.Tensor:
    """dC ``(g_out, g_in)`` in ``dtype`` by ``_separable_dc_kernel`` from dy's input-pass partials
    ``pout`` over the windows ``wout`` of its ``g_out``-point basis (rows ``out_stride`` apart) and
    x's projections: its input-pass partials ``pin`` over ``win`` (rows ``in_stride`` apart), or,
    ``win`` None, the forward's x @ Bi ``(M, g_in)`` (unit column stride)."""
    m = pout.shape[1]
    slots = SplitSlots(_separable_dc_kernel, lambda meta: cdiv(m, meta["BM"]), key=m)
    part = slots.empty(g_out, g_in, device=pout.device, dtype=dtype)
    dense = win is None
    _separable_dc_kernel[lambda meta: (slots(meta),)](
        pout, wout.start, pin, pin if dense else win.start, part, m, wout.chunks, 0 if dense else win.chunks,
        g_out, g_in, bucket, pin.stride(0) if dense else 0,
        GOP=dot_dim(g_out), GIP=dot_dim(g_in), W_OUT=wout.width, W_IN=1 if dense else win.width, PS_OUT=out_stride,
        PS_IN=1 if dense else in_stride, DENSE_IN=dense,
    )
    return slots.sum(part, dtype)


def separable_backward(
    dy: torch.Tensor, x: torch.Tensor, controls: list[torch.Tensor], kind: int, need_dx: bool,
    need_controls: list[bool], bias_dtype: torch.dtype | None, *, chunk: int | None = None,
    u: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, list[torch.Tensor | None], torch.Tensor | None]:
    """The op ``separable_backward``: (dx like x, [dC_k in control k's dtype], d_bias ``(n_out,)`` in
    ``bias_dtype``; None where not wanted) of ``separable_levels(x, controls, bias)`` for the output
    gradient dy ``(*, n_out)``. One input pass on dy over every level's output basis (dy @ Bo_k,
    ``level_windows``), which also sums d_bias, serves both dx's output passes (with C_k: dx =
    sum_k ((dy @ Bo_k) @ C_k) @ Bi_k.T, level k added into level k + 1's as its residual) and dC_k's
    product with x's projections; those come from one input pass on x over every level's input
    basis, or from u, the forward's ``(*, sum G_in_k)`` (``separable_levels``' ``u``). Launches:
    1 + (1 without u) + per level dx's and dC's. ``chunk`` as in ``separable_levels``."""
    check_inputs(dy, x, *controls)
    dy2, x2 = flatten(dy), flatten(x)
    m, n_in = x2.shape
    if m == 0:
        return (x.new_zeros(x.shape) if need_dx else None,
                [c.new_zeros(c.shape) if need else None for c, need in zip(controls, need_controls)],
                None if bias_dtype is None else dy2.new_zeros(dy2.shape[1], dtype=bias_dtype))
    chunk = _chunk(m, chunk)
    bucket = m_bucket(m)
    wout = level_windows(dy2.shape[1], tuple([c.shape[0] for c in controls]), kind, chunk, dy2.dtype, dy2.device)
    pout, d_bias = _input_pass(dy2, wout, chunk, bucket, bias_dtype)
    win = pin = None
    if u is None and any(need_controls):
        win = level_windows(n_in, tuple([c.shape[1] for c in controls]), kind, chunk, x2.dtype, x2.device)
        pin, _ = _input_pass(x2, win, chunk, bucket)
    us = _levels_of(u, m, controls)
    dx2 = None
    d_controls: list[torch.Tensor | None] = []
    for k, (control, need) in enumerate(zip(controls, need_controls)):
        g_out, g_in = control.shape
        pout_k = _level_part(pout, wout, k)
        if need_dx:
            r2, dx2 = dx2, x2.new_empty(m, n_in)
            _output_pass(pout_k, wout.levels[k], wout.width, control.mT, None, kind, r2, dx2, bucket)
        if not need:
            d_controls.append(None)
        elif win is None:
            d_controls.append(_grad_control(pout_k, wout.levels[k], wout.width, g_out, us[k], None, 0, g_in, bucket,
                                            control.dtype))
        else:
            d_controls.append(_grad_control(pout_k, wout.levels[k], wout.width, g_out, _level_part(pin, win, k),
                                            win.levels[k], win.width, g_in, bucket, control.dtype))
    dx = None if dx2 is None else dx2 if x.dim() == 2 else dx2.reshape(x.shape)
    return dx, d_controls, d_bias


# ----------------------------------------------------------------------------------------------
# Field bases (IDW / Gaussian on a lattice): weight tiles generated in registers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _phi(d2, inv_two_s2, rho2, BASIS: tl.constexpr, LOCAL: tl.constexpr):
    if BASIS == _IDW:
        phi = 1.0 / (d2 + _IDW_EPS)
    else:
        phi = tl.exp(tl.maximum(-d2 * inv_two_s2, _EXP_FLOOR))
    if LOCAL:
        taper = tl.maximum(1.0 - d2 / rho2, 0.0)
        phi = phi * taper * taper
    return phi


@triton.jit
def _reaches(lat_ptr, k, box, rho2):
    """Whether lattice point k lies within rho of the box (xlo, xhi, ylo, yhi)."""
    lx = tl.load(lat_ptr + 2 * k)
    ly = tl.load(lat_ptr + 2 * k + 1)
    dx = tl.maximum(tl.maximum(box[0] - lx, lx - box[1]), 0.0)
    dy = tl.maximum(tl.maximum(box[2] - ly, ly - box[3]), 0.0)
    return dx * dx + dy * dy < rho2


@triton.jit
def _point_phi(lat_ptr, k, x2, y2, inv_two_s2, rho2, BASIS: tl.constexpr, LOCAL: tl.constexpr):
    """phi_k and d_k^2 over the broadcast of positions x2, y2."""
    dx = x2 - tl.load(lat_ptr + 2 * k)
    dy = y2 - tl.load(lat_ptr + 2 * k + 1)
    d2 = dx * dx + dy * dy
    return _phi(d2, inv_two_s2, rho2, BASIS, LOCAL), d2


@triton.jit
def _accumulate(num, den, mom, ctrl_ptr, lat_ptr, k, x2, y2, inv_two_s2, rho2,
                BASIS: tl.constexpr, LOCAL: tl.constexpr, MOMENT: tl.constexpr):
    phi, d2 = _point_phi(lat_ptr, k, x2, y2, inv_two_s2, rho2, BASIS, LOCAL)
    c = tl.load(ctrl_ptr + k).to(tl.float32)
    if MOMENT:
        mom += phi * d2
    return num + c * phi, den + phi, mom


@triton.jit
def _field_tile(ro, ri, step_out, step_in, ctrl_ptr, lat_ptr, n_pts, inv_two_s2, rho2,
                BASIS: tl.constexpr, LOCAL: tl.constexpr, O_ON_ROWS: tl.constexpr, MOMENT: tl.constexpr = False):
    """Numerator, denominator and (with ``MOMENT``) second moment sum_k phi_k d_k^2 of W over the
    tile of output rows ``ro`` x input columns ``ri``; without ``MOMENT`` the moment is zeros.

    Laid out ``(len(ro), len(ri))`` if ``O_ON_ROWS`` else ``(len(ri), len(ro))``; W = num / den
    (plus the Gaussian's epsilon). With ``LOCAL`` the loop skips lattice points farther than rho
    from the tile's bounding box: they contribute exactly zero.
    """
    py = ro.to(tl.float32) * step_out - 1.0
    px = ri.to(tl.float32) * step_in - 1.0
    if O_ON_ROWS:
        y2 = py[:, None]
        x2 = px[None, :]
        num = tl.zeros((ro.shape[0], ri.shape[0]), dtype=tl.float32)
    else:
        y2 = py[None, :]
        x2 = px[:, None]
        num = tl.zeros((ri.shape[0], ro.shape[0]), dtype=tl.float32)
    den = num
    mom = num
    box = (tl.min(px, axis=0), tl.max(px, axis=0), tl.min(py, axis=0), tl.max(py, axis=0))
    for k in range(0, n_pts):
        if LOCAL:
            if _reaches(lat_ptr, k, box, rho2):
                num, den, mom = _accumulate(num, den, mom, ctrl_ptr, lat_ptr, k, x2, y2, inv_two_s2, rho2,
                                            BASIS, LOCAL, MOMENT)
        else:
            num, den, mom = _accumulate(num, den, mom, ctrl_ptr, lat_ptr, k, x2, y2, inv_two_s2, rho2,
                                        BASIS, LOCAL, MOMENT)
    return num, den, mom, box


@triton.jit
def _width(lbw_ptr):
    """The Gaussian's (e, sigma): e = exp(log_bandwidth) and sigma = max(e, SIGMA_MIN), in fp32
    (``reference.spline.gaussian_width``)."""
    e = tl.exp(tl.load(lbw_ptr).to(tl.float32))
    return e, tl.maximum(e, _SIGMA_MIN)


@triton.jit
def _inv_two_s2(lbw_ptr, BASIS: tl.constexpr):
    if BASIS == _GAUSSIAN:
        _, s = _width(lbw_ptr)
        return 0.5 / (s * s)
    else:
        return 0.0


@triton.jit
def _normalise(num, den, BASIS: tl.constexpr):
    if BASIS == _GAUSSIAN:
        return num / (den + _GAUSSIAN_EPS)
    else:
        return num / den


@triton.autotune(
    configs=configs(
        [{"BM": bm, "BN": bn, "BK": bk} for bm, bn, bk in ((64, 64, 32), (128, 64, 32), (128, 128, 32), (64, 128, 64))],
        interpret={"BM": 16, "BN": 32, "BK": 32},
        quick=[{"BM": 64, "BN": 64, "BK": 32, "num_warps": 4, "num_stages": 3},
               {"BM": 128, "BN": 128, "BK": 32, "num_warps": 8, "num_stages": 3}],
    ),
    key=["M_BUCKET", "N", "K", "N_PTS"],
)
@triton.jit
def _field_matmul_kernel(
    a_ptr, ctrl_ptr, lat_ptr, lbw_ptr, bias_ptr, out_ptr,
    M, N, K, N_PTS, M_BUCKET, step_out, step_in, rho2,
    stride_am, stride_ak, stride_om, stride_on,
    BASIS: tl.constexpr, LOCAL: tl.constexpr, TRANSPOSE: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr = 8,
):
    """out = a @ W.T + bias (a ``(M, n_in)``), or a @ W + bias with ``TRANSPOSE`` (a ``(M, n_out)``).

    Each (BK, BN) tile of W.T (or W) is generated in registers from the N_PTS lattice points and
    fed to ``tl.dot``; programs are grouped along M for L2 reuse of ``a``.
    Precision: W is built in fp32 and rounded to a's dtype for the dot; that cannot overflow,
    since each weight is a convex combination of the control values (phi >= 0), which are
    already in that dtype. Products accumulate in fp32; only the output is rounded.
    FLOPs: 2*M*N*K (tensor cores) + ~6*N_PTS*N*K*cdiv(M, BM) (generation; LOCAL skips far points).
    Bytes: elt*(M*K*cdiv(N, BN) + M*N) + 12*N_PTS (lattice and control).
    """
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_pid(pid, tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)  # row offsets past 2^31 elements
    rn = pid_n * BN + tl.arange(0, BN)
    inv_two_s2 = _inv_two_s2(lbw_ptr, BASIS)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                    mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0)
        if TRANSPOSE:  # tile of W: rows are outputs o = rk, columns inputs i = rn
            num, den, _, _ = _field_tile(rk, rn, step_out, step_in, ctrl_ptr, lat_ptr, N_PTS, inv_two_s2, rho2,
                                   BASIS, LOCAL, True)
        else:  # tile of W.T: rows are inputs i = rk, columns outputs o = rn
            num, den, _, _ = _field_tile(rn, rk, step_out, step_in, ctrl_ptr, lat_ptr, N_PTS, inv_two_s2, rho2,
                                   BASIS, LOCAL, False)
        w = tl.where((rk < K)[:, None], _normalise(num, den, BASIS), 0.0)
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.autotune(
    configs=configs([{"BJ": bj, "BK": bk} for bj in (32, 64, 128) for bk in (64, 128)], stages=(1,),
                    interpret={"BJ": 16, "BK": 32},
                    quick=[{"BJ": 64, "BK": 128, "num_warps": 8, "num_stages": 1}]),
    key=["K", "N_PTS"],
)
@triton.jit
def _field_slice_kernel(
    ctrl_ptr, lat_ptr, lbw_ptr, ws_ptr,
    J0, J, K, N_PTS, step_out, step_in, rho2,
    BASIS: tl.constexpr, LOCAL: tl.constexpr, TRANSPOSE: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr,
):
    """One slice of the field matmul's operand: ws[j, k] = W[J0 + j, k], or W[k, J0 + j] with
    ``TRANSPOSE``, for j < J, k < K: the rows J0..J0+J-1 of B.T where out = a @ B (B = W.T, or W),
    so that out[:, J0:J0+J] = a @ ws.T.

    ws ``(J, K)`` contiguous, in a's dtype: the same fp32 values, normalised and rounded the same
    way, as ``_field_matmul_kernel`` feeds to ``tl.dot``. Elementwise (no dot, one stage).
    FLOPs: ~6*N_PTS*J*K (LOCAL skips far points), plus one division per weight.
    Bytes: elt*J*K written (L2-resident for the GEMM that follows) + 12*N_PTS.
    """
    pid_j = tl.program_id(0)
    pid_k = tl.program_id(1)
    rj = J0 + pid_j * BJ + tl.arange(0, BJ)
    rk = pid_k * BK + tl.arange(0, BK)
    inv_two_s2 = _inv_two_s2(lbw_ptr, BASIS)
    if TRANSPOSE:  # rows are inputs i = rj, columns outputs o = rk
        num, den, _, _ = _field_tile(rk, rj, step_out, step_in, ctrl_ptr, lat_ptr, N_PTS, inv_two_s2, rho2,
                                     BASIS, LOCAL, False)
    else:  # rows are outputs o = rj, columns inputs i = rk
        num, den, _, _ = _field_tile(rj, rk, step_out, step_in, ctrl_ptr, lat_ptr, N_PTS, inv_two_s2, rho2,
                                     BASIS, LOCAL, True)
    rows = rj - J0
    tl.store(ws_ptr + rows.to(tl.int64)[:, None] * K + rk[None, :],
             _normalise(num, den, BASIS).to(ws_ptr.dtype.element_ty), mask=(rows < J)[:, None] & (rk < K)[None, :])


@triton.autotune(
    configs=configs([{"BO": 64, "BI": 64, "BM": bm} for bm in (32, 64)], interpret={"BO": 16, "BI": 32, "BM": 16},
                    quick=[{"BO": 64, "BI": 64, "BM": 64, "num_warps": 4, "num_stages": 3}]),
    key=["M_BUCKET", "N_OUT", "N_IN", "N_PTS"],
)
@triton.jit
def _field_grad_kernel(
    u_ptr, v_ptr, ctrl_ptr, lat_ptr, lbw_ptr, dparams_ptr, dbias_ptr,
    M, N_OUT, N_IN, N_PTS, M_BUCKET, step_out, step_in, rho2,
    stride_um, stride_un, stride_vm, stride_vk,
    BASIS: tl.constexpr, LOCAL: tl.constexpr, DBIAS: tl.constexpr, PRECISION: tl.constexpr,
    BO: tl.constexpr, BI: tl.constexpr, BM: tl.constexpr,
):
    """Per-tile partial gradients of sum(G * W), G = u.T @ v, never storing G or W; and the bias
    gradient, the row sum of u (``DBIAS == _BIAS_OF_U``) or of v (``_BIAS_OF_V``), from the tiles
    already loaded: the programs of the first column (row) of tiles sum their u (v) tiles over M and
    store it, once, in dbias's dtype.

    u ``(M, N_OUT)``, v ``(M, N_IN)``, dparams ``(tiles, N_PTS + 1)`` fp32. The tile's G is reduced
    over M on chip; then, with H = G / S: dparams[tile, k] = sum H * phi_k (the control values) and
    dparams[tile, N_PTS] = sum H * sum_k (c_k - W) phi_k d_k^2 / sigma^3 * d sigma / d log_bandwidth
    (the Gaussian's log_bandwidth; 0 for IDW). That sum cancels (sum_k phi_k (c_k - W) = W eps ~ 0),
    so it is computed centred, as sum_k phi_k (c_k - W)(d_k^2 - D) + W eps D with
    D = sum_k phi_k d_k^2 / S (a covariance: the fuzz sweep's case 52 lost 10x the reference's
    accuracy to the plain form); D takes a third accumulator in the pass that builds W. Every
    entry of the tile's slot is written (points a local tile does not reach get 0), so the slots
    need no zero-fill; the host sums them.
    Precision: G accumulates in fp32 from the fp16/bf16 operands, and H, W and the sums stay
    fp32 (as in the reference); no intermediate is rounded to the input dtype.
    FLOPs: 2*M*N_OUT*N_IN + ~16*N_PTS*N_OUT*N_IN. Bytes: elt*M*(N_IN*cdiv(N_OUT,BO) + N_OUT*cdiv(N_IN,BI)).
    """
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    tile = pid_o * tl.num_programs(1) + pid_i
    ro = pid_o * BO + tl.arange(0, BO)
    ri = pid_i * BI + tl.arange(0, BI)
    g = tl.zeros((BO, BI), dtype=tl.float32)
    sum_u = tl.zeros((BO,), dtype=tl.float32)
    sum_v = tl.zeros((BI,), dtype=tl.float32)
    for m0 in range(0, M, BM):
        rm = (m0 + tl.arange(0, BM)).to(tl.int64)  # row offsets past 2^31 elements
        ut = tl.load(u_ptr + ro[:, None] * stride_un + rm[None, :] * stride_um,
                     mask=(ro < N_OUT)[:, None] & (rm < M)[None, :], other=0.0)
        vv = tl.load(v_ptr + rm[:, None] * stride_vm + ri[None, :] * stride_vk,
                     mask=(rm < M)[:, None] & (ri < N_IN)[None, :], other=0.0)
        g = tl.dot(ut, vv, g, input_precision=PRECISION)
        if DBIAS == _BIAS_OF_U:
            if pid_i == 0:
                sum_u += tl.sum(ut.to(tl.float32), axis=1)
        if DBIAS == _BIAS_OF_V:
            if pid_o == 0:
                sum_v += tl.sum(vv.to(tl.float32), axis=0)
    if DBIAS == _BIAS_OF_U:
        if pid_i == 0:
            tl.store(dbias_ptr + ro, sum_u.to(dbias_ptr.dtype.element_ty), mask=ro < N_OUT)
    if DBIAS == _BIAS_OF_V:
        if pid_o == 0:
            tl.store(dbias_ptr + ri, sum_v.to(dbias_ptr.dtype.element_ty), mask=ri < N_IN)
    inv_two_s2 = _inv_two_s2(lbw_ptr, BASIS)
    num, den, mom, box = _field_tile(ro, ri, step_out, step_in, ctrl_ptr, lat_ptr, N_PTS, inv_two_s2, rho2,
                                     BASIS, LOCAL, True, BASIS == _GAUSSIAN)
    valid = (ro < N_OUT)[:, None] & (ri < N_IN)[None, :]
    w = _normalise(num, den, BASIS)
    h = tl.where(valid, _normalise(g, den, BASIS), 0.0)
    dmean = _normalise(mom, den, BASIS)  # D = sum_k phi_k d_k^2 / S (Gaussian only)
    y2 = (ro.to(tl.float32) * step_out - 1.0)[:, None]
    x2 = (ri.to(tl.float32) * step_in - 1.0)[None, :]
    slot = dparams_ptr + tile * (N_PTS + 1)
    dsig = 0.0
    for k in range(0, N_PTS):
        if LOCAL:
            if _reaches(lat_ptr, k, box, rho2):
                dsig = _grad_point(h, w, dmean, dsig, slot, ctrl_ptr, lat_ptr, k, x2, y2, inv_two_s2, rho2,
                                   BASIS, LOCAL)
            else:
                tl.store(slot + k, 0.0)
        else:
            dsig = _grad_point(h, w, dmean, dsig, slot, ctrl_ptr, lat_ptr, k, x2, y2, inv_two_s2, rho2, BASIS, LOCAL)
    if BASIS == _GAUSSIAN:
        # the centring's exact remainder: sum_k phi_k (c_k - W) = num - W den = W eps
        dsig += tl.sum(tl.sum(h * dmean * w, axis=1), axis=0) * _GAUSSIAN_EPS
        # d sigma, then d log_bandwidth: times e where sigma = e (the clamp's gradient)
        e, s = _width(lbw_ptr)
        dsig = dsig / (s * s * s) * tl.where(e >= _SIGMA_MIN, e, 0.0)
    tl.store(slot + N_PTS, dsig)


@triton.jit
def _grad_point(h, w, dmean, dsig, dctrl_ptr, ctrl_ptr, lat_ptr, k, x2, y2, inv_two_s2, rho2,
                BASIS: tl.constexpr, LOCAL: tl.constexpr):
    """Store sum(H * phi_k) at dctrl_ptr[k]; return dsig plus point k's Gaussian-width term
    sum(H * phi_k (c_k - W)(d_k^2 - D)) (centred: see ``_field_grad_kernel``)."""
    phi, d2 = _point_phi(lat_ptr, k, x2, y2, inv_two_s2, rho2, BASIS, LOCAL)
    hphi = h * phi
    tl.store(dctrl_ptr + k, tl.sum(tl.sum(hphi, axis=1), axis=0))
    if BASIS == _GAUSSIAN:
        c = tl.load(ctrl_ptr + k).to(tl.float32)
        dsig += tl.sum(tl.sum(hphi * (c - w) * (d2 - dmean), axis=1), axis=0)
    return dsig


@dataclass(frozen=True)
class Field:
    """A field weight W ``(n_out, n_in)`` as the field launchers see it: interpolated from
    ``control`` ``(n,)`` at the ``lattice`` points ``(n, 2)`` fp32 with ``basis`` (``ref.IDW``, or
    ``ref.GAUSSIAN`` of width ``ref.gaussian_width(log_bandwidth)``, ``log_bandwidth`` ``(1,)`` and
    None for IDW), only the points within ``rho`` of a weight contributing when ``rho > 0``
    (``reference.spline.field_weight``)."""

    control: torch.Tensor
    lattice: torch.Tensor
    log_bandwidth: torch.Tensor | None
    n_out: int
    n_in: int
    basis: int
    rho: float

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kernels' (control, lattice, log_bandwidth) pointers, contiguous (the kernels read them
        so); the lattice stands in for an absent log_bandwidth (never read: only the Gaussian loads it)."""
        lattice = contiguous(self.lattice)
        return (contiguous(self.control), lattice,
                lattice if self.log_bandwidth is None else contiguous(self.log_bandwidth))

    def geometry(self) -> tuple[int, float, float, float]:
        """The kernels' (N_PTS, step_out, step_in, rho2): lattice size, weight spacing along each
        axis of [-1, 1] (``reference.spline.positions``), squared support radius."""
        return (self.lattice.shape[0], 2.0 / max(self.n_out - 1, 1), 2.0 / max(self.n_in - 1, 1),
                self.rho * self.rho)


# On the fly, each W tile is generated once per row block of BM <= 128 rows: above 256 rows that is
# 3 or more times, while the sliced path generates it once and pays only the workspace's round trip
# through L2 and two launches per slice (bench/NOTES.md, "field bases generated once").
FIELD_ON_THE_FLY_MAX_ROWS = 256
# The workspace of the sliced path: 8 MiB (1024 rows of a 4096-wide bf16 W) stays in the H200's
# 50 MB L2 (25 MB per partition) between the kernel that writes it and the GEMM that reads it, beside
# the GEMM's own a and output tiles; a 4096 x 1024 x 4096 GEMM still fills the 132 SMs (128 tiles of
# 128 x 256).
FIELD_SLICE_BYTES = 8 << 20


def field_slice_rows(n: int, k: int, elt: int) -> int:
    """Rows of the sliced path's workspace ``(rows, k)`` of ``elt``-byte elements for an output of
    ``n`` columns: as many as ``FIELD_SLICE_BYTES`` holds (at least 1), a multiple of 128 (the GEMM's
    tile) above that, at most n."""
    rows = max(FIELD_SLICE_BYTES // max(k * elt, 1), 1)
    return min(rows - rows % 128 if rows > 128 else rows, n)


def field_linear(a: torch.Tensor, field: Field, bias: torch.Tensor | None, transpose: bool) -> torch.Tensor:
    """Launch ``a @ W.T + bias`` for a ``(*, n_in)``, or ``a @ W + bias`` for a ``(*, n_out)`` when
    ``transpose``, W never whole in memory: generated on chip for at most
    ``FIELD_ON_THE_FLY_MAX_ROWS`` rows of a, else in slices (``_field_sliced``)."""
    check_inputs(a, field.control, field.log_bandwidth, bias)
    return _field_matmul(a, field, bias, transpose)


def _field_matmul(a: torch.Tensor, field: Field, bias: torch.Tensor | None, transpose: bool) -> torch.Tensor:
    """``field_linear`` on checked inputs."""
    a2 = flatten(a)
    m, k = a2.shape
    n = field.n_in if transpose else field.n_out
    out = torch.empty(*a.shape[:-1], n, device=a.device, dtype=a.dtype)  # final shape: nothing to re-label
    if m > FIELD_ON_THE_FLY_MAX_ROWS and n > 0:
        _field_sliced(a2, field, bias, transpose, flatten(out))
    elif m > 0 and n > 0:
        out2 = flatten(out)
        n_pts, step_out, step_in, rho2 = field.geometry()
        grid = lambda meta: (cdiv(m, meta["BM"]) * cdiv(n, meta["BN"]),)  # noqa: E731
        _field_matmul_kernel[grid](
            a2, *field.tensors(), contiguous(bias) if bias is not None else out2, out2,
            m, n, k, n_pts, m_bucket(m), step_out, step_in, rho2, *a2.stride(), *out2.stride(),
            BASIS=field.basis, LOCAL=field.rho > 0, TRANSPOSE=transpose, HAS_BIAS=bias is not None,
            PRECISION=dot_precision(a.dtype),
        )
    return out


def _field_sliced(a2: torch.Tensor, field: Field, bias: torch.Tensor | None, transpose: bool,
                  out2: torch.Tensor) -> None:
    """out2 ``(M, n)`` = a2 ``(M, k)`` @ B + bias, B = W.T (or W with ``transpose``), in slices of
    ``field_slice_rows`` output columns (``sliced_gemm``): ``_field_slice_kernel`` writes the
    slice's rows of B.T into one reused workspace with ``_field_matmul_kernel``'s values and
    rounding, then cuBLAS multiplies. The goal shapes' GEMMs are not split-K.
    FLOPs: 2*M*n*k (cuBLAS) + ~6*N_PTS*n*k (generation, once). Bytes: elt*(M*k*slices + M*n)
    (+ 2*elt*M*n with a bias), plus elt*n*k written and read through L2.
    """
    k, n = a2.shape[1], out2.shape[1]
    rows = field_slice_rows(n, k, a2.element_size())
    ws = torch.empty(rows, k, device=a2.device, dtype=a2.dtype)

    def write(j0: int, j: int) -> torch.Tensor:
        _generate(ws, field, j0, j, transpose)
        return ws[:j]

    sliced_gemm(a2, out2, bias, rows, write)


def _generate(ws: torch.Tensor, field: Field, j0: int, j: int, transpose: bool) -> None:
    """ws[:j] = rows j0..j0+j-1 of W (of W.T with ``transpose``), by ``_field_slice_kernel``; ws
    ``(>= j, k)`` contiguous."""
    n_pts, step_out, step_in, rho2 = field.geometry()
    k = ws.shape[1]
    _field_slice_kernel[lambda meta: (cdiv(j, meta["BJ"]), cdiv(k, meta["BK"]))](
        *field.tensors(), ws, j0, j, k, n_pts, step_out, step_in, rho2,
        BASIS=field.basis, LOCAL=field.rho > 0, TRANSPOSE=transpose,
    )


def field_weight(field: Field, dtype: torch.dtype) -> torch.Tensor:
    """W ``(n_out, n_in)`` whole in ``dtype``, written by the sliced path's generation kernel: the
    benchmarks' materialise + cuBLAS baseline (the same work per entry as the layer's own
    generation) and tests. The layers never form W."""
    check_inputs(field.control, field.lattice, field.log_bandwidth)
    w = torch.empty(field.n_out, field.n_in, device=field.control.device, dtype=dtype)
    if w.numel():
        _generate(w, field, 0, field.n_out, False)
    return w


def field_linear_backward(
    dy: torch.Tensor, a: torch.Tensor, field: Field, transpose: bool, need_input: bool, need_params: bool,
    bias_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``field_linear``: (da like a, d_params ``(n + 1,)`` in the control values' dtype:
    their gradients, then log_bandwidth's, d_bias ``(n,)`` in ``bias_dtype``) from the transposed
    on-the-fly matmul and the tile reduction kernel, which sums the bias gradient from the dy tiles it
    loads (torch sums it without ``need_params``); unrequested results (d_bias: ``bias_dtype`` None)
    are empty tensors."""
    check_inputs(dy, a, field.control, *([] if field.log_bandwidth is None else [field.log_bandwidth]))
    da = _field_matmul(dy, field, None, not transpose) if need_input else a.new_empty(0)
    if not need_params:
        return da, field.control.new_empty(0), dy.new_empty(0) if bias_dtype is None else bias_grad(dy, bias_dtype)
    u, v = (a, dy) if transpose else (dy, a)
    return da, *_field_grad_params(u, v, field, bias_dtype, _BIAS_OF_V if transpose else _BIAS_OF_U)


def _field_grad_params(u: torch.Tensor, v: torch.Tensor, field: Field, bias_dtype: torch.dtype | None,
                       bias_of: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_params ``(n + 1,)`` (control values, then log_bandwidth), summed in fp32 and rounded once
    to the control values' dtype, for G = u.T @ v, u ``(*, n_out)``, v ``(*, n_in)``; the row sum of
    u (``bias_of`` ``_BIAS_OF_U``) or v ``_BIAS_OF_V`` in ``bias_dtype``, empty for None), on checked inputs."""
    u2, v2 = flatten(u), flatten(v)
    m = u2.shape[0]
    n_out, n_in = field.n_out, field.n_in
    n_pts, step_out, step_in, rho2 = field.geometry()
    # one partial slot per (BO, BI) tile, every entry written by the kernel
    slots = SplitSlots(_field_grad_kernel, lambda meta: cdiv(n_out, meta["BO"]) * cdiv(n_in, meta["BI"]), key=(n_out, n_in))
    part = slots.empty(n_pts + 1, device=u.device)
    dy = v2 if bias_of == _BIAS_OF_V else u2
    dbias = (dy.new_empty if m > 0 else dy.new_zeros)(0 if bias_dtype is None else dy.shape[1],
                                                      dtype=bias_dtype or dy.dtype)
    if m > 0:  # else no launch and no slot used: the sum is zero
        grid = lambda meta: (cdiv(n_out, meta["BO"]), slots(meta) // cdiv(n_out, meta["BO"]))  # noqa: E731
        _field_grad_kernel[grid](
            u2, v2, *field.tensors(), part, dbias,
            m, n_out, n_in, n_pts, m_bucket(m), step_out, step_in, rho2, *u2.stride(), *v2.stride(),
            BASIS=field.basis, LOCAL=field.rho > 0, DBIAS=0 if bias_dtype is None else bias_of,
            PRECISION=dot_precision(u.dtype),
        )
    return slots.sum(part, field.control.dtype), dbias
