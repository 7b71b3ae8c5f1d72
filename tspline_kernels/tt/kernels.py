"""Triton kernels and launchers for the tensor-train layers. Reference: ``reference/tt.py``.

Two strategies for y = x @ W.T (and for dx = dy @ W, the same with the cores' o and i axes
swapped); ``tt/cost.py`` picks one per call (the forward and the backward separately) from the
FLOP / byte counts below unless it is forced.
Notation: d cores ``(r_{k-1}, O_k, I_k, r_k)``, ``O = prod O_k``, ``I = prod I_k``, M rows.

* ``contract``: sequential contraction of x with the cores. FLOPs ``sum_k 2 M O_<=k r_{k-1} r_k I_>=k``:
  1.12x dense for 4096^2 as 16^3 rank 16, 0.28x dense for 8^4 rank 8.
  - Forward and dx (``_chain_kernel``, 1 launch): program (row block, O_1 block, O_2 block) loops over
    chunks of i_d and runs all d steps on its tile, each a ``tl.dot`` of the state with a core tile
    (loaded, or generated from spline control points, ``SPLINE``) followed by a register
    reshape/permute; the states never leave the chip. Bytes ``elt (M I + M O)`` from HBM, plus x
    re-reads per output block and core-tile re-reads per chunk (L2).
  - Core gradients (``_chain_grad_kernel``, 1 launch, plus a ``_chain_kernel`` launch on the cores
    of W.T for dx): program (O_1 block x O_2 block, I_d chunk, row split) reruns the forward chain
    per row block, keeping every step's input in registers, and walks it back
    (``dB_k += P_k.T dQ_k``, ``dQ_k-1 = unpermute(dQ_k B_k.T)``); fp32 accumulators, one atomic add
    per core tile and program at the end (so the fp32 sums are not bitwise deterministic).
    About 3x the forward chain's FLOPs.
  - Both are used where one of ``cost.CHAIN_CONFIGS`` fits ``cost.CHAIN_MAX_TILE`` register
    elements (``chain_fits``; the gradient also needs its accumulators to fit): the benchmark
    shapes do; a middle core with ``r_{k-1} I_k`` and ``O_k r_k`` both in the thousands does not.
    Otherwise ``_step_kernel`` (d launches): step k is the batched product
    ``U_{k+1}[b, :, c] = A_k @ U_k[b, :, c]`` over the columns ``n = b * C + c`` (``B = M O_<k``,
    ``C = I_>k``), ``A_k[(o, b), (a, i)] = G_k[a, o, i, b]``. The states U_2..U_d live in global
    memory (each ``M O_<=k r_k I_>k`` elements, 16x resp. 8x the size of x for the two shapes
    above), so bytes ~ ``2 elt sum_k |U_k|`` dominate for large M. Backward (``steps_grad``): the
    states are recomputed, the dy sweep ``V_k = A_k.T V_{k+1}`` runs right to left with the same
    kernel (``TRANSPOSED``) and ends in dx, and ``_grad_step_kernel`` reduces each
    ``dA_k = sum V_{k+1} U_k.T``: about 3x the forward.
* ``rebuild`` (``_rebuild_kernel``, 1 launch). W = sum_r L[o_h, i_h, r] G_d[r, o_d, i_d] with the head
  product L ``(O/O_d, I/I_d, r_{d-1})`` built on the host from the cores (``r_{d-1}/(O_d I_d)`` times the
  size of W: 1/16 for 16^3 rank 16, 1/8 for 8^4 rank 8). Each ``(BK, BN)`` tile of W.T is
  ``L_sub (PO PI x r) @ T (r x O_d I_d)`` on tensor cores, permuted in registers and fed to the main
  ``tl.dot``. FLOPs ``2 M O I + 2 r O I cdiv(M, BM)`` (rebuild overhead r / BM); bytes
  ``elt (M I + M O + |L| cdiv(M, BM))`` with x re-reads served from L2. Backward
  (``_rebuild_grad_kernel``): each tile of G = dy.T @ x is accumulated over M on chip and reduced
  against T (-> dL, each entry owned by one tile) and L (-> dT partials summed on the host);
  dL -> d(G_1..G_{d-1}) by a small host VJP (``reference.tt.head_product_grad``); dx is a second
  ``_rebuild_kernel`` launch on the cores of W.T.

Neither strategy writes W or dW to global memory.

Precision: every ``tl.dot`` accumulates in fp32. Between the dots the intermediates (the states of
both contract paths, in registers or in global memory, and rebuild's head product L) are kept in
``cost.state_dtype``: the input dtype for fp32 and bf16 (bf16 has fp32's range), fp32 for fp16,
whose range (65504) the states of a finite product can exceed where the reference (fp32
intermediates) is finite. Their products run as tf32 dots: fp16 operands are exact in tf32 and the
states keep fp16's 10-bit mantissa, so the accuracy is fp16's and no state overflows, at half the
fp16 tensor-core rate and twice the register / shared-memory tile bytes (the gradient chain kernel
fits tiles as for fp32). rebuild's W tile is rounded to the input dtype for the main dot, so W
itself must lie within fp16's range.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from .._basis import axis, basis_taps
from .._triton import INTERPRET, SplitSlots, check_inputs, configs, dot_precision, flatten, grouped_pid, m_bucket, tl, triton
from ..reference import spline_tt as spline_ref
from ..reference import tt as ref
from ..reference.spline import BSPLINE
from . import cost


# ----------------------------------------------------------------------------------------------
# Core tiles
# ----------------------------------------------------------------------------------------------
@triton.jit
def _taps_row(base, po, wo, q0, q1, q2, q3, wi0, wi1, wi2, wi3, s_p, s_q, mask):
    """sum_t wo * wi_t * C[.., po, q_t, ..] over the four input taps (fp32)."""
    row = base + po[:, None] * s_p
    acc = wi0[None, :] * tl.load(row + q0[None, :] * s_q, mask=mask, other=0.0).to(tl.float32)
    acc += wi1[None, :] * tl.load(row + q1[None, :] * s_q, mask=mask, other=0.0).to(tl.float32)
    acc += wi2[None, :] * tl.load(row + q2[None, :] * s_q, mask=mask, other=0.0).to(tl.float32)
    acc += wi3[None, :] * tl.load(row + q3[None, :] * s_q, mask=mask, other=0.0).to(tl.float32)
    return wo[:, None] * acc


@triton.jit
def _core_tile(core_ptr, o, b, a, i, mask_ob, mask_ai, s_a, s_o, s_i, s_b,
               scale_o, top_o, scale_i, top_i, SPLINE: tl.constexpr):
    """Tile ``T[u, v] = G[a[v], o[u], i[v], b[u]]``: rows indexed by (o, b), columns by (a, i).

    Without ``SPLINE`` it is loaded from the core (any strides, native dtype). With ``SPLINE`` the
    pointer is the control tensor C ``(r0, Go, Gi, r1)`` and G[a, o, i, b] = sum_{p,q} Bo[o, p]
    C[a, p, q, b] Bi[i, q] is generated in fp32 from the four nonzero cubic B-spline taps of o
    and of i (``scale``/``top`` as in the spline kernels): 16 gathered loads per entry, no core in memory.
    """
    mask = mask_ob[:, None] & mask_ai[None, :]
    base = core_ptr + a[None, :] * s_a + b[:, None] * s_b
    if SPLINE:
        p0, p1, p2, p3, wo0, wo1, wo2, wo3 = basis_taps(o, scale_o, top_o, 0)
        q0, q1, q2, q3, wi0, wi1, wi2, wi3 = basis_taps(i, scale_i, top_i, 0)
        tile = _taps_row(base, p0, wo0, q0, q1, q2, q3, wi0, wi1, wi2, wi3, s_o, s_i, mask)
        tile += _taps_row(base, p1, wo1, q0, q1, q2, q3, wi0, wi1, wi2, wi3, s_o, s_i, mask)
        tile += _taps_row(base, p2, wo2, q0, q1, q2, q3, wi0, wi1, wi2, wi3, s_o, s_i, mask)
        tile += _taps_row(base, p3, wo3, q0, q1, q2, q3, wi0, wi1, wi2, wi3, s_o, s_i, mask)
        return tile
    else:
        return tl.load(base + o[:, None] * s_o + i[None, :] * s_i, mask=mask, other=0.0)


# ----------------------------------------------------------------------------------------------
# Strategy "contract", fused: the whole chain of steps in one kernel, states on chip
# ----------------------------------------------------------------------------------------------
def _config_key(config) -> tuple[int, int, int, int]:
    """(BM, BO1, BO2, CD) of a chain kernel config."""
    return tuple(config.kwargs[k] for k in ("BM", "BO1", "BO2", "CD"))


def _chain_pruner(grad: bool):
    """Autotune pruning for a chain kernel: one config per distinct plan (and warps, stages) among
    those ``cost.chain_plans`` keeps. Never empty: where no plan fits (the launchers route such
    cores to the step kernels, so only a direct launch gets here) the config with the smallest
    register tiles."""
    def prune(cfgs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        shape = (args["IN"], args["OUT"], args["RANK"])
        fits = set(cost.chain_plans(*shape, [_config_key(c) for c in cfgs], grad, _state_elt(args["x_ptr"].dtype)))
        seen, kept = set(), []
        for c in cfgs:
            p = cost.chain_plan(*shape, *_config_key(c))
            if p in fits and (p, c.num_warps, c.num_stages) not in seen:
                seen.add((p, c.num_warps, c.num_stages))
                kept.append(c)
        return kept or [min(cfgs, key=lambda c: cost.chain_plan(*shape, *_config_key(c)).largest_tile())]
    return prune


def _chain_tiles(args) -> cost.ChainPlan:
    return cost.chain_plan(args["IN"], args["OUT"], args["RANK"], args["BM"], args["BO1"], args["BO2"], args["CD"])


# the chain kernels' padded tile sizes (constexpr tuples), derived from the config and the modes
_with_chain_tiles = triton.heuristics({n: lambda a, n=n: getattr(_chain_tiles(a), n.lower()) for n in ("NI", "NO", "RP", "X")})


def _chain_configs(space, **kwargs) -> list:
    """Autotune configs of a chain kernel for the (BM, BO1, BO2, CD) tuples in ``space``."""
    return configs([dict(zip(("BM", "BO1", "BO2", "CD"), c)) for c in space],
                   interpret={"BM": 16, "BO1": 2, "BO2": 2, "CD": 2}, stages=(2,), **kwargs)


@triton.jit
def _chain_in_index(BM: tl.constexpr, D: tl.constexpr, IN: tl.constexpr,
                    NI: tl.constexpr, RP: tl.constexpr, X: tl.constexpr):
    """Index vectors of S_1, rows ``(i_2 .. i_d-1, i_d in chunk, m)`` (m fastest) and columns
    ``(a_0, i_1)`` (a_0 > 0 is padding): (row m, row chunk index, row ok, row element offset in x
    without m and chunk, column ok, column element offset). A chunk holds ``NI[D - 1]`` indices of
    i_d (the config's CD clamped to the padded I_d, so smaller than CD when I_d is)."""
    r = tl.arange(0, X[0])
    t = r // (BM * NI[D - 1])
    row_ok = r >= 0
    row_off = r * 0
    stride = IN[D - 1]
    for j in tl.static_range(D - 2, 0, -1):
        ij = t % NI[j]
        t = t // NI[j]
        row_ok &= ij < IN[j]
        row_off += ij * stride
        stride *= IN[j]
    col = tl.arange(0, RP[0] * NI[0])
    return r % BM, (r // BM) % NI[D - 1], row_ok, row_off, (col < NI[0]) & (col % NI[0] < IN[0]), (col % NI[0]) * stride


@triton.jit
def _chain_out_index(starts, D: tl.constexpr, OUT: tl.constexpr, NO: tl.constexpr, X: tl.constexpr):
    """Index vectors of the last step's rows ``(m, o_1 .. o_d-1)`` (o_d-1 fastest) and columns o_d:
    (row m, row ok, row element offset in y without m, column o_d)."""
    r = tl.arange(0, X[D - 1])
    ok = r >= 0
    off = r * 0
    stride = OUT[D - 1]
    for q in tl.static_range(D - 2, -1, -1):
        oq = r % NO[q] + (starts[q] if q < 2 else 0)
        r = r // NO[q]
        ok &= oq < OUT[q]
        off += oq * stride
        stride *= OUT[q]
    return r, ok, off, tl.arange(0, NO[D - 1]) + (starts[1] if D == 2 else 0)


@triton.jit
def _chain_core_index(k: tl.constexpr, d0, starts, D: tl.constexpr, NI: tl.constexpr, NO: tl.constexpr,
                      RP: tl.constexpr):
    """(a, i) of the rows and (o, b) of the columns of ``B_k`` for this program's O_1 / O_2 block
    (k < 2) and I_d chunk from ``d0`` (k = d - 1)."""
    v = tl.arange(0, RP[k] * NI[k])
    u = tl.arange(0, NO[k] * RP[k + 1])
    return v // NI[k], v % NI[k] + (d0 if k == D - 1 else 0), u // RP[k + 1] + (starts[k] if k < 2 else 0), u % RP[k + 1]


@triton.jit
def _chain_core(g_ptr, k: tl.constexpr, d0, starts, D: tl.constexpr, IN: tl.constexpr, OUT: tl.constexpr,
                RANK: tl.constexpr, GRID: tl.constexpr, AXES: tl.constexpr, OFFS: tl.constexpr,
                SPLINE: tl.constexpr, NI: tl.constexpr, NO: tl.constexpr, RP: tl.constexpr):
    """``B_k[(a, i), (o, b)] = G_k[a, o, i, b]`` ``(RP[k] NI[k], NO[k] RP[k+1])`` (``_chain_core_index``),
    zero outside the core."""
    a, i, o, b = _chain_core_index(k, d0, starts, D, NI, NO, RP)
    return tl.trans(_core_tile(
        g_ptr + OFFS[k], o, b, a, i, (o < OUT[k]) & (b < RANK[k + 1]), (a < RANK[k]) & (i < IN[k]),
        GRID[k][0] * GRID[k][1] * RANK[k + 1], GRID[k][1] * RANK[k + 1], RANK[k + 1], 1,
        AXES[k][0], AXES[k][1], AXES[k][2], AXES[k][3], SPLINE))


@triton.jit
def _chain_next(s, k: tl.constexpr, NI: tl.constexpr, RP: tl.constexpr, X: tl.constexpr):
    """Step k - 1's output, rows (i_k, rest) x columns (o_k-1, a_k-1), as step k's input, rows
    (rest, o_k-1) x columns (a_k-1, i_k): a register reshape/permute."""
    return tl.reshape(tl.permute(tl.reshape(s, (NI[k], X[k], RP[k])), (1, 2, 0)), (X[k], RP[k] * NI[k]))


@triton.jit
def _chain_prev(ds, k: tl.constexpr, NO: tl.constexpr, NI: tl.constexpr, RP: tl.constexpr, X: tl.constexpr):
    """The inverse of ``_chain_next``: a gradient w.r.t. step k's input as one w.r.t. step k - 1's output."""
    return tl.reshape(tl.permute(tl.reshape(ds, (X[k], RP[k], NI[k])), (2, 0, 1)), (X[k - 1], NO[k - 1] * RP[k]))


@triton.autotune(
    configs=_chain_configs(cost.CHAIN_CONFIGS, quick=[{"BM": 16, "BO1": 1, "BO2": 4, "CD": 1, "num_warps": 4, "num_stages": 2},
                                                      {"BM": 64, "BO1": 1, "BO2": 4, "CD": 1, "num_warps": 8, "num_stages": 2}]),
    key=["M_BUCKET", "IN", "OUT", "RANK", "SPLINE"],
    prune_configs_by={"early_config_prune": _chain_pruner(grad=False)},
)
@_with_chain_tiles
@triton.jit
def _chain_kernel(
    x_ptr, g_ptr, bias_ptr, y_ptr,
    M, M_BUCKET, stride_xm, stride_xk, stride_ym, stride_yn,
    D: tl.constexpr, IN: tl.constexpr, OUT: tl.constexpr, RANK: tl.constexpr,
    GRID: tl.constexpr, AXES: tl.constexpr, OFFS: tl.constexpr,
    SPLINE: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, STATE: tl.constexpr,
    BM: tl.constexpr, BO1: tl.constexpr, BO2: tl.constexpr, CD: tl.constexpr,
    NI: tl.constexpr, NO: tl.constexpr, RP: tl.constexpr, X: tl.constexpr,
):
    """y = x @ W.T + bias for a TT matrix, the d contraction steps chained on chip; the states and
    core tiles enter each ``tl.dot`` as ``STATE`` (``cost.state_dtype``, see the module docstring).

    Program (m block, O_1 block, O_2 block) owns y[BM rows, o_1 in its block, o_2 in its block, all
    o_3..o_d] and loops over chunks of NI[D-1] indices of i_d. Per chunk the state S_k, rows
    ``(i_k+1..i_d-1, i_d in chunk, m, o_1..o_k-1)`` and columns ``(a_k-1, i_k)``, goes through
    ``S_k @ B_k``, ``B_k[(a, i), (o, b)] = G_k[a, o, i, b]`` (``(r_k-1 I_k, O_k r_k)``, loaded from the
    packed cores ``g_ptr + OFFS[k]`` or generated from spline control points with ``SPLINE``), and a
    register reshape/permute moves (o_k, a_k) to (rows, columns) for step k + 1; the last step sums
    the chunk's share of y into an fp32 accumulator. No state leaves the registers; padded sizes
    (``cost.ChainPlan``: NI, NO, RP, X) are zero-filled so every ``tl.dot`` side is >= 16.
    FLOPs ``2 sum_k X[k] RP[k] NI[k] NO[k] RP[k+1]`` per program and chunk (the useful part is
    ``sum_k 2 M O_<=k r_k-1 r_k I_>=k``, step 1 repeated once per O_2 block).
    Bytes ``elt (M I * O_1 blocks * O_2 blocks + M O)`` for x (re-reads mostly from L2) and y, plus
    the core tiles once per program and chunk (L2).
    """
    pid_m = tl.program_id(0)
    starts = (tl.program_id(1) * NO[0], tl.program_id(2) * NO[1])
    rm, c, row_ok, row_off, col_ok, col_off = _chain_in_index(BM, D, IN, NI, RP, X)
    rm += pid_m * BM
    row_ok &= rm < M
    x_rows = x_ptr + rm.to(tl.int64) * stride_xm + row_off.to(tl.int64) * stride_xk
    x_cols = col_off.to(tl.int64) * stride_xk
    # tl.full, not tl.zeros: Triton 3.6 cannot pass a shape of entries of a constexpr tuple to a
    # @jit function (tl.zeros is one there)
    acc = tl.full((X[D - 1], NO[D - 1]), 0.0, tl.float32)
    for d0 in range(0, IN[D - 1], NI[D - 1]):
        s = tl.load((x_rows + (d0 + c).to(tl.int64) * stride_xk)[:, None] + x_cols[None, :],
                    mask=(row_ok & (d0 + c < IN[D - 1]))[:, None] & col_ok[None, :], other=0.0)
        for k in tl.static_range(D):
            if k > 0:
                s = _chain_next(s, k, NI, RP, X)
            g = _chain_core(g_ptr, k, d0, starts, D, IN, OUT, RANK, GRID, AXES, OFFS, SPLINE, NI, NO, RP)
            s = tl.dot(s.to(STATE), g.to(STATE), input_precision=PRECISION)
        acc += tl.sum(tl.reshape(s, (X[D - 1], NO[D - 1], RP[D])), axis=2)  # only b = 0 is nonzero
    rm, out_ok, out_off, od = _chain_out_index(starts, D, OUT, NO, X)
    rm += pid_m * BM
    off = out_off[:, None] + od[None, :]
    mask = (out_ok & (rm < M))[:, None] & (od < OUT[D - 1])[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * stride_ym + off * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(
    configs=_chain_configs(cost.CHAIN_GRAD_CONFIGS, warps=(8,),
                           quick=[{"BM": 16, "BO1": 1, "BO2": 4, "CD": 1, "num_warps": 8, "num_stages": 2},
                                  {"BM": 64, "BO1": 1, "BO2": 4, "CD": 1, "num_warps": 8, "num_stages": 2}]),
    key=["M_BUCKET", "IN", "OUT", "RANK", "SPLINE"],
    prune_configs_by={"early_config_prune": _chain_pruner(grad=True)},
    reset_to_zero=["dg_ptr"],
)
@_with_chain_tiles
@triton.jit
def _chain_grad_kernel(
    x_ptr, dy_ptr, g_ptr, dg_ptr,
    M, M_BUCKET, stride_xm, stride_xk, stride_dm, stride_dn,
    D: tl.constexpr, IN: tl.constexpr, OUT: tl.constexpr, RANK: tl.constexpr,
    GRID: tl.constexpr, AXES: tl.constexpr, OFFS: tl.constexpr, DOFFS: tl.constexpr,
    SPLINE: tl.constexpr, PRECISION: tl.constexpr, STATE: tl.constexpr,
    BM: tl.constexpr, BO1: tl.constexpr, BO2: tl.constexpr, CD: tl.constexpr,
    NI: tl.constexpr, NO: tl.constexpr, RP: tl.constexpr, X: tl.constexpr,
):
    """Every dG_k of sum(dy * (x @ W.T)), the chain of ``_chain_kernel`` and its reverse on chip
    (operands of every ``tl.dot`` in ``STATE``, as there).

    Program (O_1 block x O_2 block, I_d chunk, row split s) walks every ``num_programs(2)``-th block
    of BM rows. Per row block it runs the forward chain keeping each step's input P_k (registers),
    then the reverse: dQ_d is the dy tile, ``dB_k += P_k.T @ dQ_k`` (fp32 accumulators held across
    the row loop) and ``dQ_k-1 = unpermute(dQ_k @ B_k.T)``. At the end each program adds its dB_k to
    the fp32 core gradients (``dg_ptr + DOFFS[k]``, layout ``(r_k-1, O_k, I_k, r_k)``) with atomics.
    Neither the states nor W or dW touch global memory.
    FLOPs ``3 x`` the forward chain's (one forward, two dots per step backward, step 1's forward
    repeated per O_2 block). Bytes ``elt (M I + M O) x`` (O_1 O_2 blocks x I_d chunks) re-reads
    (mostly L2), plus ``4 sum_k |B_k|`` atomics per program.
    """
    pid_o = tl.program_id(0)
    n_o2 = tl.cdiv(OUT[1], NO[1])
    starts = ((pid_o // n_o2) * NO[0], (pid_o % n_o2) * NO[1])
    d0 = tl.program_id(1) * NI[D - 1]
    rm_in, c, row_ok, row_off, col_ok, col_off = _chain_in_index(BM, D, IN, NI, RP, X)
    row_ok &= d0 + c < IN[D - 1]
    x_rows = x_ptr + (row_off + d0 + c).to(tl.int64) * stride_xk
    x_cols = col_off.to(tl.int64) * stride_xk
    rm_out, out_ok, out_off, _ = _chain_out_index(starts, D, OUT, NO, X)
    u = tl.arange(0, NO[D - 1] * RP[D])  # dQ_d columns (o_d, b): dy at b = 0, zero padding beside it
    od = u // RP[D] + (starts[1] if D == 2 else 0)
    dy_cols = (out_off[:, None] + od[None, :]).to(tl.int64)
    dy_ok = out_ok[:, None] & ((od < OUT[D - 1]) & (u % RP[D] == 0))[None, :]
    gs = ()
    accs = ()
    for k in tl.static_range(D):
        gs = gs + (_chain_core(g_ptr, k, d0, starts, D, IN, OUT, RANK, GRID, AXES, OFFS, SPLINE, NI, NO, RP).to(STATE),)
        accs = accs + (tl.full((RP[k] * NI[k], NO[k] * RP[k + 1]), 0.0, tl.float32),)  # as in _chain_kernel
    for mb in range(tl.program_id(2), tl.cdiv(M, BM), tl.num_programs(2)):
        rm = mb * BM + rm_in
        s = tl.load((x_rows + rm.to(tl.int64) * stride_xm)[:, None] + x_cols[None, :],
                    mask=(row_ok & (rm < M))[:, None] & col_ok[None, :], other=0.0).to(STATE)
        ps = ()
        for k in tl.static_range(D):
            if k > 0:
                s = _chain_next(s, k, NI, RP, X).to(STATE)
            ps = ps + (s,)
            if k < D - 1:
                s = tl.dot(s, gs[k], input_precision=PRECISION)
        rm = mb * BM + rm_out
        dq = tl.load(dy_ptr + rm.to(tl.int64)[:, None] * stride_dm + dy_cols * stride_dn,
                     mask=dy_ok & (rm < M)[:, None], other=0.0)
        new = ()
        for k in tl.static_range(D - 1, -1, -1):
            new = (accs[k] + tl.dot(tl.trans(ps[k]), dq.to(STATE), input_precision=PRECISION),) + new
            if k > 0:
                dq = _chain_prev(tl.dot(dq.to(STATE), tl.trans(gs[k]), input_precision=PRECISION), k, NO, NI, RP, X)
        accs = new
    for k in tl.static_range(D):
        a, i, o, b = _chain_core_index(k, d0, starts, D, NI, NO, RP)
        off = ((a[:, None] * OUT[k] + o[None, :]) * IN[k] + i[:, None]) * RANK[k + 1] + b[None, :]
        mask = ((a < RANK[k]) & (i < IN[k]))[:, None] & ((o < OUT[k]) & (b < RANK[k + 1]))[None, :]
        tl.atomic_add(dg_ptr + DOFFS[k] + off, accs[k], mask=mask)


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _state_elt(dtype: torch.dtype) -> int:
    """Bytes per element of the states for ``dtype`` inputs."""
    return cost.state_dtype(dtype).itemsize


def _state_args(dtype: torch.dtype) -> dict:
    """``STATE`` (the tl dtype of the intermediates) and ``PRECISION`` of their ``tl.dot`` for
    ``dtype`` inputs: tf32 for fp16's fp32 states (see the module docstring), else ``dot_precision``."""
    state = cost.state_dtype(dtype)
    return dict(STATE=_TL_DTYPES[state], PRECISION="tf32" if state != dtype else dot_precision(dtype))


def _modes(cores: list[Core]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(in_modes, out_modes, ranks)`` of the cores."""
    return tuple(c.i for c in cores), tuple(c.o for c in cores), (cores[0].r0,) + tuple(c.r1 for c in cores)


def _chain_args(cores: list[Core]) -> tuple[torch.Tensor, dict]:
    """The cores (or spline control tensors) packed into one contiguous buffer (core-sized, not W),
    and the chain kernels' constexpr description of them."""
    ins, outs, ranks = _modes(cores)
    return torch.cat([c.t.reshape(-1) for c in cores]), dict(
        D=len(cores), IN=ins, OUT=outs, RANK=ranks, GRID=tuple(tuple(c.t.shape[1:3]) for c in cores),
        AXES=tuple(c.axes() for c in cores), OFFS=tuple(itertools.accumulate((c.t.numel() for c in cores[:-1]), initial=0)),
        SPLINE=cores[0].spline)


def chain_linear(x2: torch.Tensor, cores: list[Core], bias: torch.Tensor | None) -> torch.Tensor:
    """y = x2 @ W.T + bias by one ``_chain_kernel`` launch; x2 ``(M, I)`` -> ``(M, O)``."""
    m = x2.shape[0]
    y = torch.empty(m, math.prod(c.o for c in cores), device=x2.device, dtype=x2.dtype)
    if m == 0:
        return y
    packed, meta_args = _chain_args(cores)
    grid = lambda meta: (triton.cdiv(m, meta["BM"]), triton.cdiv(cores[0].o, meta["NO"][0]),  # noqa: E731
                         triton.cdiv(cores[1].o, meta["NO"][1]))
    _chain_kernel[grid](
        x2, packed, bias if bias is not None else y, y,
        m, m_bucket(m), x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
        **meta_args, HAS_BIAS=bias is not None, **_state_args(x2.dtype),
    )
    return y


def chain_grad(dy2: torch.Tensor, x2: torch.Tensor, cores: list[Core]) -> list[torch.Tensor]:
    """``[dG_k]`` (fp32, ``(r0, O, I, r1)``) of sum(dy2 * (x2 @ W.T)) by one ``_chain_grad_kernel``
    launch; row blocks are split over enough programs to fill the GPU (2 under the interpreter)."""
    m = x2.shape[0]
    sizes = [c.r0 * c.o * c.i * c.r1 for c in cores]
    dg = torch.zeros(sum(sizes), device=x2.device, dtype=torch.float32)
    packed, meta_args = _chain_args(cores)

    def grid(meta):
        blocks = triton.cdiv(cores[0].o, meta["NO"][0]) * triton.cdiv(cores[1].o, meta["NO"][1])
        chunks = triton.cdiv(cores[-1].i, meta["NI"][-1])
        want = 2 if INTERPRET else triton.cdiv(2 * cost.SMS, blocks * chunks)
        return blocks, chunks, max(1, min(triton.cdiv(m, meta["BM"]), want))

    if m > 0:
        _chain_grad_kernel[grid](
            x2, dy2, packed, dg,
            m, m_bucket(m), x2.stride(0), x2.stride(1), dy2.stride(0), dy2.stride(1),
            **meta_args, DOFFS=tuple(itertools.accumulate(sizes[:-1], initial=0)), **_state_args(x2.dtype),
        )
    # separate tensors: a custom op may not return outputs that alias each other
    return [t.view(c.r0, c.o, c.i, c.r1).clone() for t, c in zip(dg.split(sizes), cores)]


# ----------------------------------------------------------------------------------------------
# Strategy "contract", unfused: one batched-GEMM step per core (where the chain kernels do not fit)
# ----------------------------------------------------------------------------------------------
@triton.autotune(
    configs=configs(
        [{"BP": bp, "BJ": bj, "BN": bn} for bp in (32, 64, 128) for bj in (16, 32, 64) for bn in (64, 128)],
        interpret={"BP": 16, "BJ": 16, "BN": 32},
        quick=[{"BP": 64, "BJ": 32, "BN": 128, "num_warps": 4, "num_stages": 3}],
    ),
    key=["P", "J", "C", "N_BUCKET", "SPLINE"],
)
@triton.jit
def _step_kernel(
    in_ptr, core_ptr, bias_ptr, out_ptr,
    N, C, P, J, R1, IK, N_OUT, N_BUCKET,
    stride_ib, stride_ie, s_a, s_o, s_i, s_b,
    scale_o, top_o, scale_i, top_i,
    SPLINE: tl.constexpr, TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BP: tl.constexpr, BJ: tl.constexpr, BN: tl.constexpr,
):
    """out[b, p, c] = sum_j A[p, j] in[b, j, c] (+ bias), for columns n = b * C + c < N.

    ``in`` element (b, j, c) sits at ``b * stride_ib + (j * C + c) * stride_ie``; ``out`` is
    contiguous ``(N / C, P, C)``. A[(o, b), (a, i)] = G[a, o, i, b] (P = O_k r_k, J = r_{k-1} I_k), or
    its transpose A[(a, i), (o, b)] with ``TRANSPOSED`` (the dy sweep of the backward).
    FLOPs 2 P J N (tensor cores; + 32 P J cdiv(N, BN) tap FMAs with ``SPLINE``).
    Bytes elt * (J N cdiv(P, BP) + P N + P J cdiv(N, BN)).
    """
    pid_p = tl.program_id(0)
    pid_n = tl.program_id(1)
    rp = pid_p * BP + tl.arange(0, BP)
    rn = pid_n * BN + tl.arange(0, BN)
    n_mask = rn < N
    bb = (rn // C).to(tl.int64)
    cc = rn % C
    acc = tl.zeros((BP, BN), dtype=tl.float32)
    for j0 in range(0, J, BJ):
        rj = j0 + tl.arange(0, BJ)
        if TRANSPOSED:
            a = tl.trans(_core_tile(core_ptr, rj // R1, rj % R1, rp // IK, rp % IK, rj < J, rp < P,
                                    s_a, s_o, s_i, s_b, scale_o, top_o, scale_i, top_i, SPLINE))
        else:
            a = _core_tile(core_ptr, rp // R1, rp % R1, rj // IK, rj % IK, rp < P, rj < J,
                           s_a, s_o, s_i, s_b, scale_o, top_o, scale_i, top_i, SPLINE)
        v = tl.load(in_ptr + bb[None, :] * stride_ib + (rj[:, None] * C + cc[None, :]) * stride_ie,
                    mask=(rj < J)[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a.to(v.dtype), v, acc, input_precision=PRECISION)
    off = (bb[None, :] * P + rp[:, None]) * C + cc[None, :]
    mask = (rp < P)[:, None] & n_mask[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + off % N_OUT, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + off, acc.to(out_ptr.dtype.element_ty), mask=mask)


GRAD_SPLITS = 2 if INTERPRET else 8  # the most column splits any _grad_step_kernel config uses


@triton.autotune(
    configs=configs(
        [{"BP": bp, "BJ": bj, "BN": bn, "N_SPLIT": GRAD_SPLITS} for bp in (32, 64) for bj in (32, 64) for bn in (64, 128)],
        interpret={"BP": 16, "BJ": 16, "BN": 32, "N_SPLIT": 2},
        quick=[{"BP": 64, "BJ": 64, "BN": 128, "N_SPLIT": GRAD_SPLITS, "num_warps": 4, "num_stages": 3}],
    ),
    key=["P", "J", "C", "N_BUCKET"],
)
@triton.jit
def _grad_step_kernel(
    v_ptr, u_ptr, part_ptr,
    N, C, P, J, N_BUCKET,
    stride_vb, stride_ve, stride_ub, stride_ue,
    PRECISION: tl.constexpr, STATE: tl.constexpr, BP: tl.constexpr, BJ: tl.constexpr, BN: tl.constexpr,
    N_SPLIT: tl.constexpr,
):
    """part[s, p, j] = sum over columns n = b * C + c of split s of V[b, p, c] U[b, j, c] (fp32).

    V ``(N / C, P, C)`` is the gradient of a step's output, U ``(N / C, J, C)`` its input (strided as
    in ``_step_kernel``); the host sums the ``N_SPLIT`` partials (deterministic, no atomics).
    FLOPs 2 P J N. Bytes elt * N (P cdiv(J, BJ) + J cdiv(P, BP)) + 4 N_SPLIT P J.
    """
    pid_p = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_s = tl.program_id(2)
    rp = pid_p * BP + tl.arange(0, BP)
    rj = pid_j * BJ + tl.arange(0, BJ)
    acc = tl.zeros((BP, BJ), dtype=tl.float32)
    for n0 in range(pid_s * BN, N, BN * N_SPLIT):
        rn = n0 + tl.arange(0, BN)
        n_mask = rn < N
        bb = (rn // C).to(tl.int64)
        cc = rn % C
        v = tl.load(v_ptr + bb[None, :] * stride_vb + (rp[:, None] * C + cc[None, :]) * stride_ve,
                    mask=(rp < P)[:, None] & n_mask[None, :], other=0.0)
        u = tl.load(u_ptr + bb[:, None] * stride_ub + (rj[None, :] * C + cc[:, None]) * stride_ue,
                    mask=n_mask[:, None] & (rj < J)[None, :], other=0.0)
        acc = tl.dot(v.to(STATE), u.to(STATE), acc, input_precision=PRECISION)  # x, dy or a state
    tl.store(part_ptr + (pid_s * P + rp[:, None]) * J + rj[None, :], acc,
             mask=(rp < P)[:, None] & (rj < J)[None, :])


@dataclass(frozen=True)
class Core:
    """One core as the step kernel sees it: ``t`` is the core ``(r0, O, I, r1)`` (any strides), or
    with ``spline`` the control points ``(r0, Go, Gi, r1)`` of a core with mode sizes ``(o, i)``."""

    t: torch.Tensor
    o: int
    i: int
    spline: bool = False

    @property
    def r0(self) -> int:
        return self.t.shape[0]

    @property
    def r1(self) -> int:
        return self.t.shape[3]

    def dense(self) -> torch.Tensor:
        """The core ``(r0, O, I, r1)``; a spline core is formed from its control points (fp32, core-sized)."""
        return spline_ref.spline_cores([self.t], [self.i], [self.o])[0] if self.spline else self.t

    def transposed(self) -> Core:
        """The core of W.T (a view: o and i axes swapped, for spline cores in the control points)."""
        return Core(self.t.transpose(1, 2), self.i, self.o, self.spline)

    def axes(self) -> tuple[float, float, float, float]:
        """(scale_o, top_o, scale_i, top_i) of the B-spline taps (unused for plain cores)."""
        if not self.spline:
            return 0.0, 0.0, 0.0, 0.0
        return (*axis(self.o, self.t.shape[1], BSPLINE), *axis(self.i, self.t.shape[2], BSPLINE))


def _step(state: torch.Tensor, sb: int, se: int, core: Core, batch: int, c: int, transposed: bool,
          dtype: torch.dtype, last: bool, bias: torch.Tensor | None = None, n_out: int = 1) -> torch.Tensor:
    """One contraction step on ``batch * c`` columns of a layer with ``dtype`` inputs; returns the
    contiguous output state (flat), in ``cost.state_dtype(dtype)``, or in ``dtype`` for the ``last``
    step (y or dx). ``bias`` (last step only) is indexed by the output offset modulo ``n_out``
    (the layer's O)."""
    p, j = core.o * core.r1, core.r0 * core.i
    if transposed:
        p, j = j, p
    out = torch.empty(batch * p * c, device=state.device, dtype=dtype if last else cost.state_dtype(dtype))
    n = batch * c
    if n == 0:
        return out
    grid = lambda meta: (triton.cdiv(p, meta["BP"]), triton.cdiv(n, meta["BN"]))  # noqa: E731
    _step_kernel[grid](
        state, core.t, bias if bias is not None else out, out,
        n, c, p, j, core.r1, core.i, n_out, m_bucket(n),
        sb, se, *core.t.stride(), *core.axes(),
        SPLINE=core.spline, TRANSPOSED=transposed, HAS_BIAS=bias is not None,
        PRECISION=_state_args(dtype)["PRECISION"],
    )
    return out


def _grad_step(v: torch.Tensor, vs: tuple[int, int], u: torch.Tensor, us: tuple[int, int],
               batch: int, c: int, p: int, j: int, dtype: torch.dtype) -> torch.Tensor:
    """sum_{b, c} V[b, :, c] U[b, :, c].T as a ``(p, j)`` fp32 matrix (``dtype``: the layer's inputs)."""
    n = batch * c
    if n == 0:
        return torch.zeros(p, j, device=v.device, dtype=torch.float32)
    slots = SplitSlots(_grad_step_kernel, lambda meta: meta["N_SPLIT"])
    part = slots.empty(p, j, device=v.device)
    grid = lambda meta: (triton.cdiv(p, meta["BP"]), triton.cdiv(j, meta["BJ"]), slots(meta))  # noqa: E731
    _grad_step_kernel[grid](v, u, part, n, c, p, j, m_bucket(n), *vs, *us, **_state_args(dtype))
    return slots.sum(part)


def chain_fits(cores: list[Core], grad: bool = False, elt: int = 2) -> bool:
    """Whether one of the configs of the chain kernel (or, with ``grad``, the gradient chain
    kernel, for ``elt``-byte states) fits these cores (``cost.chain_plans``)."""
    kernel = _chain_grad_kernel if grad else _chain_kernel
    return bool(cost.chain_plans(*_modes(cores), [_config_key(c) for c in kernel.configs], grad, elt))


def contract_linear(x2: torch.Tensor, cores: list[Core], bias: torch.Tensor | None) -> torch.Tensor:
    """y = x2 @ W.T + bias by the chain kernel where it fits, else by d step launches."""
    return chain_linear(x2, cores, bias) if chain_fits(cores) else steps_linear(x2, cores, bias)


def steps_linear(x2: torch.Tensor, cores: list[Core], bias: torch.Tensor | None) -> torch.Tensor:
    """y = x2 @ W.T + bias by d step launches; x2 ``(M, I)`` -> ``(M, O)``."""
    m = x2.shape[0]
    n_out = math.prod(g.o for g in cores)
    state, sb, se = x2, x2.stride(0), x2.stride(1)  # step 1 batches over rows only: any strides
    o_done = 1
    for k, core in enumerate(cores):
        c = math.prod(g.i for g in cores[k + 1:])
        last = k == len(cores) - 1
        state = _step(state, sb, se, core, m * o_done, c, False, x2.dtype, last, bias if last else None, n_out)
        sb, se = core.r1 * c, 1  # next step's batch (row, O_<=k) spans r_k I_>k elements
        o_done *= core.o
    return state.view(m, o_done)


def contract_grad(dy2: torch.Tensor, x2: torch.Tensor, cores: list[Core], need_dx: bool
                  ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """(d(core) in the ``(r0, O, I, r1)`` layout (fp32) for every core, dx ``(M, I)`` or None): the
    gradient chain kernel (and a chain launch on W.T's cores for dx) where they fit, else
    ``steps_grad``."""
    transposed = [c.transposed() for c in cores]
    if chain_fits(cores, grad=True, elt=_state_elt(x2.dtype)) and (not need_dx or chain_fits(transposed)):
        return chain_grad(dy2, x2, cores), chain_linear(dy2, transposed, None) if need_dx else None
    return steps_grad(dy2, x2, cores, need_dx)


def steps_grad(dy2: torch.Tensor, x2: torch.Tensor, cores: list[Core], need_dx: bool
               ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """``contract_grad`` by step launches: forward states U_1..U_d recomputed, then right to left
    dA_k = sum V_{k+1} U_k.T and V_k = A_k.T V_{k+1}; V_1 is dx."""
    m, d = x2.shape[0], len(cores)
    states = [(x2, x2.stride(0), x2.stride(1))]
    o_done = 1
    for k, core in enumerate(cores[:-1]):
        c = math.prod(g.i for g in cores[k + 1:])
        states.append((_step(states[-1][0], *states[-1][1:], core, m * o_done, c, False, x2.dtype, False), core.r1 * c, 1))
        o_done *= core.o
    if dy2.stride(0) != dy2.shape[1] * dy2.stride(1):  # V_d batches over (row, O_<d): rows must be dense
        dy2 = dy2.contiguous()
    v, vs = dy2, (cores[-1].o * dy2.stride(1), dy2.stride(1))
    grads: list[torch.Tensor] = [None] * d  # type: ignore[list-item]
    for k in range(d - 1, -1, -1):
        core = cores[k]
        batch = m * math.prod(g.o for g in cores[:k])
        c = math.prod(g.i for g in cores[k + 1:])
        p, j = core.o * core.r1, core.r0 * core.i
        u, *us = states[k]
        da = _grad_step(v, vs, u, tuple(us), batch, c, p, j, x2.dtype)
        grads[k] = da.view(core.o, core.r1, core.r0, core.i).permute(2, 0, 3, 1).contiguous()
        if k > 0 or need_dx:
            v = _step(v, *vs, core, batch, c, True, x2.dtype, k == 0)
            vs = (cores[k - 1].o * j * c, 1) if k > 0 else None  # consumed by core k-1: batch (row, O_<k-1)
    return grads, v.view(m, -1) if need_dx else None


# ----------------------------------------------------------------------------------------------
# Strategy "rebuild": W tiles from the head product L and the last core, on chip
# ----------------------------------------------------------------------------------------------
@triton.jit
def _tile_index(pid, P: tl.constexpr, DP: tl.constexpr, D_LAST, H):
    """Columns of a tile covering head indices [pid*P, pid*P + P) x all (padded) last indices:
    tile position t = p * DP + e -> matrix index h * D_LAST + e, and its validity."""
    t = tl.arange(0, P * DP)
    h = pid * P + t // DP
    e = t % DP
    return h * D_LAST + e, (h < H) & (e < D_LAST)


@triton.jit
def _load_head(l_ptr, oh0, ih0, O_H, I_H, R, PO: tl.constexpr, PI: tl.constexpr, RP: tl.constexpr):
    """L[oh0 + po, ih0 + pi, r] as a ``(PO * PI, RP)`` tile, rows s = po * PI + pi."""
    s = tl.arange(0, PO * PI)
    oh = oh0 + s // PI
    ih = ih0 + s % PI
    rr = tl.arange(0, RP)
    return tl.load(l_ptr + ((oh * I_H + ih) * R)[:, None] + rr[None, :],
                   mask=((oh < O_H) & (ih < I_H))[:, None] & (rr < R)[None, :], other=0.0)


@triton.jit
def _load_last(t_ptr, O_D, I_D, R, ODP: tl.constexpr, IDP: tl.constexpr, RP: tl.constexpr):
    """The last core G_d[r, od, id, 0] as a ``(RP, ODP * IDP)`` tile, columns q = od * IDP + id."""
    rr = tl.arange(0, RP)
    q = tl.arange(0, ODP * IDP)
    od = q // IDP
    idd = q % IDP
    return tl.load(t_ptr + rr[:, None] * (O_D * I_D) + (od * I_D + idd)[None, :],
                   mask=(rr < R)[:, None] & ((od < O_D) & (idd < I_D))[None, :], other=0.0)


def _rebuild_prune(cfgs, named_args, **kwargs):
    """Drop row blocks much taller than M (they only add masked work)."""
    m = named_args["M"]
    kept = [c for c in cfgs if c.kwargs["BM"] <= max(16, triton.next_power_of_2(m))]
    return kept or cfgs[:1]


@triton.autotune(
    configs=configs([{"BM": bm} for bm in (16, 32, 64, 128, 256)], interpret={"BM": 16}, warps=(4, 8),
                    quick=[{"BM": 16, "num_warps": 4, "num_stages": 3}, {"BM": 128, "num_warps": 8, "num_stages": 3}]),
    key=["M_BUCKET", "O_H", "I_H", "O_D", "I_D", "R"],
    prune_configs_by={"early_config_prune": _rebuild_prune},
)
@triton.jit
def _rebuild_kernel(
    x_ptr, l_ptr, t_ptr, bias_ptr, y_ptr,
    M, O_H, I_H, O_D, I_D, R, M_BUCKET,
    stride_xm, stride_xk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    PO: tl.constexpr, PI: tl.constexpr, ODP: tl.constexpr, IDP: tl.constexpr, RP: tl.constexpr,
    BM: tl.constexpr, GROUP_M: tl.constexpr = 8,
):
    """y = x @ W.T + bias, x ``(M, I_H I_D)``, W = sum_r L[o_h, i_h, r] T[r, o_d, i_d], y ``(M, O_H O_D)``.

    Program (m block, n block) owns BM rows and the BN = PO * ODP output columns of head indices
    [n*PO, n*PO + PO); each K step rebuilds the (BK = PI * IDP, BN) tile of W.T as
    L_sub (PO PI x RP) @ T (RP x ODP IDP), permuted (po, pi, od, id) -> (pi, id) x (po, od), and
    feeds it to ``tl.dot``. Programs are grouped along M for L2 reuse of x.
    FLOPs 2 M O I (main) + 2 RP O I cdiv(M, BM) (rebuild), both tensor-core dots.
    Bytes elt * (M I + M O + |L| cdiv(M, BM)) when the re-reads of x across column blocks hit L2
    (at worst elt * M I cdiv(O, BN) for x).
    """
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_pid(pid, tl.cdiv(M, BM), tl.cdiv(O_H, PO), GROUP_M)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)  # row offsets past 2^31 elements
    m_mask = rm < M
    cols, col_ok = _tile_index(pid_n, PO, ODP, O_D, O_H)
    t = _load_last(t_ptr, O_D, I_D, R, ODP, IDP, RP)
    acc = tl.zeros((BM, PO * ODP), dtype=tl.float32)
    for k in range(0, tl.cdiv(I_H, PI)):
        w = tl.dot(_load_head(l_ptr, pid_n * PO, k * PI, O_H, I_H, R, PO, PI, RP), t, input_precision=PRECISION)
        w = tl.reshape(tl.permute(tl.reshape(w, (PO, PI, ODP, IDP)), (1, 3, 0, 2)), (PI * IDP, PO * ODP))
        ks, k_ok = _tile_index(k, PI, IDP, I_D, I_H)
        xt = tl.load(x_ptr + rm[:, None] * stride_xm + ks[None, :] * stride_xk,
                     mask=m_mask[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(xt, w.to(xt.dtype), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & col_ok[None, :])


@triton.autotune(
    configs=configs([{"BM": bm} for bm in (32, 64, 128)], interpret={"BM": 16},
                    quick=[{"BM": 64, "num_warps": 4, "num_stages": 3}]),
    key=["M_BUCKET", "O_H", "I_H", "O_D", "I_D", "R"],
)
@triton.jit
def _rebuild_grad_kernel(
    dy_ptr, x_ptr, l_ptr, t_ptr, dl_ptr, dt_ptr,
    M, O_H, I_H, O_D, I_D, R, M_BUCKET,
    stride_dm, stride_dn, stride_xm, stride_xk,
    PRECISION: tl.constexpr,
    PO: tl.constexpr, PI: tl.constexpr, ODP: tl.constexpr, IDP: tl.constexpr, RP: tl.constexpr,
    BM: tl.constexpr,
):
    """Gradients of sum(G * W), G = dy.T @ x, for W = sum_r L[o_h, i_h, r] T[r, o_d, i_d].

    Program (n, s) owns output head indices [n*PO, +PO) and every ``num_programs(1)``-th block of
    PI input head indices from s. For each W tile it accumulates that tile of G over M on chip
    (never stored), permutes it to G' ``(PO PI, ODP IDP)``, writes dL[tile] = G' @ T.T (each L entry
    belongs to exactly one tile) and adds L_sub.T @ G' to its dT partial (fp32, registers); the
    host sums the ``cdiv(O_H, PO) * num_programs(1)`` partials.
    FLOPs 2 M O I + 4 RP O I. Bytes elt * M (I cdiv(O, BN) + O cdiv(I, BK)) + 4 (|L| + partials RP ODP IDP).
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols, col_ok = _tile_index(pid_n, PO, ODP, O_D, O_H)
    t = _load_last(t_ptr, O_D, I_D, R, ODP, IDP, RP).to(tl.float32)
    s = tl.arange(0, PO * PI)
    rr = tl.arange(0, RP)
    oh = pid_n * PO + s // PI
    dt = tl.zeros((RP, ODP * IDP), dtype=tl.float32)
    for k in range(pid_s, tl.cdiv(I_H, PI), tl.num_programs(1)):
        ks, k_ok = _tile_index(k, PI, IDP, I_D, I_H)
        g = tl.zeros((PO * ODP, PI * IDP), dtype=tl.float32)
        for m0 in range(0, M, BM):
            rm = (m0 + tl.arange(0, BM)).to(tl.int64)  # row offsets past 2^31 elements
            m_mask = rm < M
            dyt = tl.load(dy_ptr + cols[:, None] * stride_dn + rm[None, :] * stride_dm,
                          mask=col_ok[:, None] & m_mask[None, :], other=0.0)
            xt = tl.load(x_ptr + rm[:, None] * stride_xm + ks[None, :] * stride_xk,
                         mask=m_mask[:, None] & k_ok[None, :], other=0.0)
            g = tl.dot(dyt, xt, g, input_precision=PRECISION)
        g = tl.reshape(tl.permute(tl.reshape(g, (PO, ODP, PI, IDP)), (0, 2, 1, 3)), (PO * PI, ODP * IDP))
        ih = k * PI + s % PI
        tl.store(dl_ptr + ((oh * I_H + ih) * R)[:, None] + rr[None, :], tl.dot(g, tl.trans(t), input_precision="ieee"),
                 mask=((oh < O_H) & (ih < I_H))[:, None] & (rr < R)[None, :])
        head = _load_head(l_ptr, pid_n * PO, k * PI, O_H, I_H, R, PO, PI, RP).to(tl.float32)
        dt = tl.dot(tl.trans(head), g, dt, input_precision="ieee")
    part = pid_n * tl.num_programs(1) + pid_s
    q = tl.arange(0, ODP * IDP)
    tl.store(dt_ptr + (part * RP + rr[:, None]) * (ODP * IDP) + q[None, :], dt)


@dataclass(frozen=True)
class RebuildTiles:
    """Padded last-core sizes (ODP, IDP), padded rank RP, and head indices per tile (PO, PI)."""

    odp: int
    idp: int
    rp: int
    po: int
    pi: int


def rebuild_tiles(o_d: int, i_d: int, r: int) -> RebuildTiles:
    """Tile shape of the rebuild kernels: every ``tl.dot`` dimension a power of two >= 16, output
    and K tiles of about ``target`` columns (32 under the interpreter, 64 on a GPU)."""
    odp, idp = triton.next_power_of_2(o_d), triton.next_power_of_2(i_d)
    while odp * idp < 16:
        if idp <= odp:
            idp *= 2
        else:
            odp *= 2
    target = 32 if INTERPRET else 64
    po, pi = max(1, target // odp), max(1, target // idp)
    while po * pi < 16 or po * odp < 16 or pi * idp < 16:
        if po * odp <= pi * idp:
            po *= 2
        else:
            pi *= 2
    return RebuildTiles(odp, idp, max(16, triton.next_power_of_2(r)), po, pi)


def _head_and_last(cores: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(L ``(O_h, I_h, r)``, T ``(r, O_d, I_d)``), contiguous in ``cost.state_dtype(dtype)`` for
    ``dtype`` inputs; L accumulated in fp32."""
    state = cost.state_dtype(dtype)
    return ref.head_product(cores).to(state).contiguous(), cores[-1][..., 0].to(state).contiguous()


def rebuild_linear(x2: torch.Tensor, cores: list[torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
    """y = x2 @ W.T + bias with W tiles rebuilt on chip; x2 ``(M, I)``, cores ``(r0, O, I, r1)``."""
    head, last = _head_and_last(cores, x2.dtype)
    r, o_d, i_d = last.shape
    o_h, i_h = head.shape[:2]
    m = x2.shape[0]
    y = torch.empty(m, o_h * o_d, device=x2.device, dtype=x2.dtype)
    if m == 0:
        return y
    tl_ = rebuild_tiles(o_d, i_d, r)
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(o_h, tl_.po),)  # noqa: E731
    _rebuild_kernel[grid](
        x2, head, last, bias if bias is not None else y, y,
        m, o_h, i_h, o_d, i_d, r, m_bucket(m),
        x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, PRECISION=_state_args(x2.dtype)["PRECISION"],
        PO=tl_.po, PI=tl_.pi, ODP=tl_.odp, IDP=tl_.idp, RP=tl_.rp,
    )
    return y


def rebuild_grad(dy2: torch.Tensor, x2: torch.Tensor, cores: list[torch.Tensor]) -> list[torch.Tensor]:
    """d(core) (fp32) for every core: dL and dT on chip, then dL -> d(G_1..G_{d-1}) on the host."""
    head, last = _head_and_last(cores, x2.dtype)
    r, o_d, i_d = last.shape
    o_h, i_h = head.shape[:2]
    tl_ = rebuild_tiles(o_d, i_d, r)
    k_blocks = triton.cdiv(i_h, tl_.pi)
    grid = (triton.cdiv(o_h, tl_.po), min(k_blocks, max(1, (2 if INTERPRET else 256) // triton.cdiv(o_h, tl_.po))))
    d_head = torch.zeros(o_h, i_h, r, device=x2.device, dtype=torch.float32)
    d_last = torch.zeros(grid[0] * grid[1], tl_.rp, tl_.odp, tl_.idp, device=x2.device, dtype=torch.float32)
    m = x2.shape[0]
    if m > 0:
        _rebuild_grad_kernel[grid](
            dy2, x2, head, last, d_head, d_last,
            m, o_h, i_h, o_d, i_d, r, m_bucket(m),
            dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1),
            PRECISION=dot_precision(x2.dtype), PO=tl_.po, PI=tl_.pi, ODP=tl_.odp, IDP=tl_.idp, RP=tl_.rp,
        )
    d_last = d_last.sum(0)[:r, :o_d, :i_d, None]
    return ref.head_product_grad([c.float() for c in cores], d_head) + [d_last]


def tt_transposed(cores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Cores of W.T (views)."""
    return [c.transpose(1, 2) for c in cores]


# ----------------------------------------------------------------------------------------------
# Launchers used by the ops
# ----------------------------------------------------------------------------------------------
def _strategy(strategy: str, m: int, cores: list[Core], dtype: torch.dtype, backward: bool = False) -> str:
    return cost.resolve(strategy, m, *_modes(cores), dtype.itemsize, backward, _state_elt(dtype))


def cores_linear(x: torch.Tensor, cores: list[Core], bias: torch.Tensor | None, strategy: str) -> torch.Tensor:
    """y = x @ W.T + bias for x ``(*, I)`` -> ``(*, O)`` with the strategy ``strategy`` resolves to;
    plain or spline cores (rebuild forms the core-sized spline cores first)."""
    check_inputs(x, *(c.t for c in cores), *([bias] if bias is not None else []))
    x2 = flatten(x)
    if _strategy(strategy, x2.shape[0], cores, x.dtype) == "rebuild":
        y = rebuild_linear(x2, [c.dense() for c in cores], bias)
    else:
        y = contract_linear(x2, cores, bias)
    return y.reshape(*x.shape[:-1], math.prod(c.o for c in cores))


def cores_grad(dy: torch.Tensor, x: torch.Tensor, cores: list[Core], strategy: str, need_dx: bool
               ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """(``[dG_1 .. dG_d]`` fp32 in the ``(r0, O, I, r1)`` layout, dx in x's shape and dtype or None)
    of sum(dy * (x @ W.T)).

    contract: the dy sweep that yields the core gradients ends in dx (one more step).
    rebuild: dL/dT from ``_rebuild_grad_kernel``; dx by ``_rebuild_kernel`` on the cores of W.T.
    """
    check_inputs(dy, x, *(c.t for c in cores))
    dy2, x2 = flatten(dy), flatten(x)
    m = dy2.shape[0]
    if m == 0:
        shapes = [(c.r0, c.o, c.i, c.r1) for c in cores]
        return [torch.zeros(s, device=dy.device, dtype=torch.float32) for s in shapes], x.new_zeros(x.shape) if need_dx else None
    if _strategy(strategy, m, cores, dy.dtype, backward=True) == "rebuild":
        dense = [c.dense() for c in cores]
        grads = rebuild_grad(dy2, x2, dense)
        dx = rebuild_linear(dy2, tt_transposed(dense), None) if need_dx else None
    else:
        grads, dx = contract_grad(dy2, x2, cores, need_dx)
    return grads, None if dx is None else dx.reshape(x.shape).to(x.dtype)


def plain_cores(cores: list[torch.Tensor]) -> list[Core]:
    """Stored cores ``(r0, O_k, I_k, r1)`` (any strides) as the launchers take them."""
    return [Core(c, c.shape[1], c.shape[2]) for c in cores]


def tt_linear(x: torch.Tensor, cores: list[torch.Tensor], bias: torch.Tensor | None, strategy: str) -> torch.Tensor:
    """y = x @ W.T + bias for x ``(*, I)`` and cores ``(r0, O_k, I_k, r1)`` (any strides) -> ``(*, O)``."""
    return cores_linear(x, plain_cores(cores), bias, strategy)


def tt_grad(dy: torch.Tensor, x: torch.Tensor, cores: list[torch.Tensor], strategy: str, need_dx: bool
            ) -> list[torch.Tensor]:
    """``[dG_1 .. dG_d]`` (fp32) of sum(dy * (x @ W.T)), then dx = dy @ W if ``need_dx``."""
    grads, dx = cores_grad(dy, x, plain_cores(cores), strategy, need_dx)
    # contiguous, as the fake implementation promises (torch.compile checks strides)
    return [g.contiguous() for g in grads] + ([dx] if need_dx else [])
