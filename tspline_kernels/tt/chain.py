"""The fused "contract" kernels: the whole chain of TT steps in one launch, states on chip
(``_chain_kernel``: y = x @ W.T and dx; ``_chain_grad_kernel``: every core gradient), with their
autotune configs, pruning and padded tile sizes (``cost.chain_plan``). Launched by ``kernels.py``."""

from __future__ import annotations

from .._triton import configs, tl, triton
from . import cost
from .tiles import core_tile, state_elt


def config_key(config) -> tuple[int, int, int, int]:
    """(BM, BO1, BO2, CD) of a chain kernel config."""
    return tuple(config.kwargs[k] for k in ("BM", "BO1", "BO2", "CD"))


_KEYS: dict[str, tuple[list, tuple]] = {}


def config_keys(kernel) -> tuple[tuple[int, int, int, int], ...]:
    """``config_key`` of every config of an autotuned chain kernel, computed once per config list
    (a harness that swaps ``kernel.configs`` gets the new list's)."""
    cfgs = kernel.configs
    hit = _KEYS.get(kernel.base_fn.__name__)
    if hit is None or hit[0] is not cfgs:
        hit = _KEYS[kernel.base_fn.__name__] = (cfgs, tuple(config_key(c) for c in cfgs))
    return hit[1]


def tiles(plan: cost.ChainPlan) -> dict[str, tuple[int, ...]]:
    """The chain kernels' padded tile sizes (constexpr tuples NI, NO, RP, X) of a plan."""
    return {"NI": plan.ni, "NO": plan.no, "RP": plan.rp, "X": plan.x}


_TILED: dict[tuple, triton.Config] = {}


def _tiled(config, plan: cost.ChainPlan) -> triton.Config:
    """``config`` with ``plan``'s tile sizes among its constexprs: one object per (config, plan),
    so a harness that tells configs apart by identity sees the same one on every launch."""
    key = (config_key(config), config.num_warps, config.num_stages, plan)
    if key not in _TILED:
        _TILED[key] = triton.Config({**config.kwargs, **tiles(plan)}, num_warps=config.num_warps,
                                    num_stages=config.num_stages)
    return _TILED[key]


def _chain_pruner(grad: bool):
    """Autotune pruning for a chain kernel: one config per distinct plan (and warps, stages) among
    those ``cost.chain_plans`` keeps, each with its plan's tile sizes (``_tiled``: the autotuner
    launches the config it keeps with them, no per-launch heuristics). Never empty: where no plan
    fits (the launchers route such cores to the step kernels, so only a direct launch gets here)
    the config with the smallest register tiles. (An autotuner with one config skips pruning:
    the launchers pass that config's tiles, ``launch_tiles``.)"""
    def prune(cfgs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        shape = (args["IN"], args["OUT"], args["RANK"])
        fits = set(cost.chain_plans(*shape, [config_key(c) for c in cfgs], grad, state_elt(args["x_ptr"].dtype)))
        seen, kept = set(), []
        for c in cfgs:
            p = cost.chain_plan(*shape, *config_key(c))
            if p in fits and (p, c.num_warps, c.num_stages) not in seen:
                seen.add((p, c.num_warps, c.num_stages))
                kept.append(_tiled(c, p))
        if kept:
            return kept
        c = min(cfgs, key=lambda c: cost.chain_plan(*shape, *config_key(c)).largest_tile())
        return [_tiled(c, cost.chain_plan(*shape, *config_key(c)))]
    return prune


def launch_tiles(keys: tuple, modes: tuple) -> dict[str, tuple[int, ...]]:
    """The tile-size constexprs a launch of a chain kernel whose configs have the keys ``keys``
    (``config_keys``) on cores of ``modes`` must pass: those of its config where the autotuner holds
    one (it then runs it without pruning), else none (the pruner adds them to the configs it keeps)."""
    if len(keys) != 1:
        return {}
    return tiles(cost.chain_plan(*modes, *keys[0]))


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
def _chain_core(g_ptrs, k: tl.constexpr, d0, starts, D: tl.constexpr, IN: tl.constexpr, OUT: tl.constexpr,
                RANK: tl.constexpr, STRIDES: tl.constexpr, AXES: tl.constexpr,
                SPLINE: tl.constexpr, NI: tl.constexpr, NO: tl.constexpr, RP: tl.constexpr):
    """``B_k[(a, i), (o, b)] = G_k[a, o, i, b]`` ``(RP[k] NI[k], NO[k] RP[k+1])`` (``_chain_core_index``),
    zero outside the core; G_k's (a, o, i, b) element strides are ``STRIDES[k]`` from ``g_ptrs[k]``."""
    a, i, o, b = _chain_core_index(k, d0, starts, D, NI, NO, RP)
    return tl.trans(core_tile(
        g_ptrs[k], o, b, a, i, (o < OUT[k]) & (b < RANK[k + 1]), (a < RANK[k]) & (i < IN[k]),
        STRIDES[k][0], STRIDES[k][1], STRIDES[k][2], STRIDES[k][3],
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
@triton.jit
def _chain_kernel(
    x_ptr, g_ptrs, bias_ptr, y_ptr,
    M, M_BUCKET, stride_xm, stride_xk, stride_ys, stride_ym, stride_yn,
    D: tl.constexpr, IN: tl.constexpr, OUT: tl.constexpr, RANK: tl.constexpr,
    STRIDES: tl.constexpr, AXES: tl.constexpr,
    SPLINE: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, STATE: tl.constexpr,
    BM: tl.constexpr, BO1: tl.constexpr, BO2: tl.constexpr, CD: tl.constexpr,
    NI: tl.constexpr, NO: tl.constexpr, RP: tl.constexpr, X: tl.constexpr,
):
    """y = x @ W.T + bias for a TT matrix, the d contraction steps chained on chip; the states and
    core tiles enter each ``tl.dot`` as ``STATE`` (``cost.state_dtype``, see ``kernels.py``'s docstring).

    Program (m block, O_1 block, O_2 block x split s) owns y[BM rows, o_1 in its block, o_2 in its
    block, all o_3..o_d] and loops over split s's run of chunks of NI[D-1] indices of i_d: with S
    splits (``num_programs(2) / O_2 blocks``, ``cost.chain_split``), chunks ``s cdiv(C, S) ..`` of
    the C chunks (none past the last: such a split stores zeros). It stores its tile at
    ``y_ptr + s stride_ys``: y itself (S = 1) or the fp32 partial slot s the host sums (split-K,
    for grids with fewer programs than SMs); split 0 adds the bias. Per chunk the state S_k, rows
    ``(i_k+1..i_d-1, i_d in chunk, m, o_1..o_k-1)`` and columns ``(a_k-1, i_k)``, goes through
    ``S_k @ B_k``, ``B_k[(a, i), (o, b)] = G_k[a, o, i, b]`` (``(r_k-1 I_k, O_k r_k)``, loaded from
    core k at ``g_ptrs[k]`` with strides ``STRIDES[k]`` (W's cores serve W.T's too), or
    generated from spline control points with ``SPLINE``), and a
    register reshape/permute moves (o_k, a_k) to (rows, columns) for step k + 1; the last step sums
    the chunk's share of y into an fp32 accumulator. No state leaves the registers; padded sizes
    (``cost.ChainPlan``: NI, NO, RP, X) are zero-filled so every ``tl.dot`` side is >= 16.
    FLOPs ``2 sum_k X[k] RP[k] NI[k] NO[k] RP[k+1]`` per program and chunk (the useful part is
    ``sum_k 2 M O_<=k r_k-1 r_k I_>=k``, step 1 repeated once per O_2 block; splits add none).
    Bytes ``elt M I * O_1 blocks * O_2 blocks`` for x (re-reads mostly from L2), ``elt M O`` for y
    (S = 1) or ``4 S M O`` for the slots, plus the core tiles once per program and chunk (L2).
    """
    pid_m = tl.program_id(0)
    n_o2: tl.constexpr = (OUT[1] + NO[1] - 1) // NO[1]
    chunks: tl.constexpr = (IN[D - 1] + NI[D - 1] - 1) // NI[D - 1]
    split = tl.program_id(2) // n_o2
    per_split = tl.cdiv(chunks, tl.num_programs(2) // n_o2)
    starts = (tl.program_id(1) * NO[0], (tl.program_id(2) % n_o2) * NO[1])
    rm, c, row_ok, row_off, col_ok, col_off = _chain_in_index(BM, D, IN, NI, RP, X)
    rm += pid_m * BM
    row_ok &= rm < M
    x_rows = x_ptr + rm.to(tl.int64) * stride_xm + row_off.to(tl.int64) * stride_xk
    x_cols = col_off.to(tl.int64) * stride_xk
    # tl.full, not tl.zeros: Triton 3.6 cannot pass a shape of entries of a constexpr tuple to a
    # @jit function (tl.zeros is one there)
    acc = tl.full((X[D - 1], NO[D - 1]), 0.0, tl.float32)
    for d0 in range(split * per_split * NI[D - 1], tl.minimum(split * per_split + per_split, chunks) * NI[D - 1],
                    NI[D - 1]):
        s = tl.load((x_rows + (d0 + c).to(tl.int64) * stride_xk)[:, None] + x_cols[None, :],
                    mask=(row_ok & (d0 + c < IN[D - 1]))[:, None] & col_ok[None, :], other=0.0)
        for k in tl.static_range(D):
            if k > 0:
                s = _chain_next(s, k, NI, RP, X)
            g = _chain_core(g_ptrs, k, d0, starts, D, IN, OUT, RANK, STRIDES, AXES, SPLINE, NI, NO, RP)
            s = tl.dot(s.to(STATE), g.to(STATE), input_precision=PRECISION)
        acc += tl.sum(tl.reshape(s, (X[D - 1], NO[D - 1], RP[D])), axis=2)  # only b = 0 is nonzero
    rm, out_ok, out_off, od = _chain_out_index(starts, D, OUT, NO, X)
    rm += pid_m * BM
    off = out_off[:, None] + od[None, :]
    mask = (out_ok & (rm < M))[:, None] & (od < OUT[D - 1])[None, :]
    if HAS_BIAS:
        if split == 0:
            acc += tl.load(bias_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + split.to(tl.int64) * stride_ys + rm.to(tl.int64)[:, None] * stride_ym + off * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _chain_store_grad(part_ptr, acc, k: tl.constexpr, blocks, chunk, groups, splits, per_group,
                      D: tl.constexpr, OUT: tl.constexpr, NI: tl.constexpr, NO: tl.constexpr, RP: tl.constexpr):
    """Store core k's accumulator ``(RP[k] NI[k], NO[k] RP[k+1])`` (padding included) for program
    (O_1 block, O_2 block, chunk group, row split) ``blocks`` x (``groups``, ``splits``) and I_d
    chunk ``chunk`` (core d) in core k's region of ``part_ptr``: ``(n, RP[k], nb NO[k], nc NI[k],
    RP[k+1])`` contiguous, where the tile lands at the block and chunk it covers (``nb`` blocks of
    O_k for k < 2, ``nc = groups x per_group`` chunks for core d, else 1) and ``n`` runs over the
    programs that share them (those partials the host sums). The regions follow one another in
    core order, each ``programs x`` its tile (core d: ``x per_group``)."""
    n_b1: tl.constexpr = (OUT[0] + NO[0] - 1) // NO[0]
    n_b2: tl.constexpr = (OUT[1] + NO[1] - 1) // NO[1]
    programs = n_b1 * n_b2 * groups * splits
    base = programs.to(tl.int64) * 0
    for j in tl.static_range(k):  # the regions of cores 1..k (before the last)
        base += programs * (RP[j] * NI[j] * NO[j] * RP[j + 1])
    # (kept block, their number), (kept chunk, their number), and the index of the partial
    b1, b2, g, s = blocks[0], blocks[1], blocks[2], blocks[3]
    n = 0
    if k != 0:
        n = b1
    if k != 1:
        n = n * n_b2 + b2
    if k != D - 1:
        n = n * groups + g
    n = n * splits + s
    kb = 0
    nb = 1
    if k == 0:
        kb = b1
        nb = n_b1
    if k == 1:
        kb = b2
        nb = n_b2
    kc = 0
    nc = 1
    if k == D - 1:
        kc = chunk
        nc = groups * per_group
    v = tl.arange(0, RP[k] * NI[k])
    u = tl.arange(0, NO[k] * RP[k + 1])
    row = (v // NI[k]) * (nb * NO[k] * nc * NI[k]) + kc * NI[k] + v % NI[k]
    col = (kb * NO[k] + u // RP[k + 1]) * (nc * NI[k]) * RP[k + 1] + u % RP[k + 1]
    padded = RP[k] * nb * NO[k] * nc * NI[k] * RP[k + 1]
    tl.store(part_ptr + base + n.to(tl.int64) * padded + (row[:, None] * RP[k + 1] + col[None, :]), acc)


@triton.autotune(
    configs=_chain_configs(cost.CHAIN_GRAD_CONFIGS, warps=(8,),
                           quick=[{"BM": 16, "BO1": 1, "BO2": 4, "CD": 1, "num_warps": 8, "num_stages": 2},
                                  {"BM": 64, "BO1": 1, "BO2": 4, "CD": 1, "num_warps": 8, "num_stages": 2}]),
    key=["M_BUCKET", "IN", "OUT", "RANK", "SPLINE"],
    prune_configs_by={"early_config_prune": _chain_pruner(grad=True)},
)
@triton.jit
def _chain_grad_kernel(
    x_ptr, dy_ptr, g_ptrs, part_ptr,
    M, M_BUCKET, stride_xm, stride_xk, stride_dm, stride_dn,
    D: tl.constexpr, IN: tl.constexpr, OUT: tl.constexpr, RANK: tl.constexpr,
    STRIDES: tl.constexpr, AXES: tl.constexpr,
    SPLINE: tl.constexpr, PRECISION: tl.constexpr, STATE: tl.constexpr,
    BM: tl.constexpr, BO1: tl.constexpr, BO2: tl.constexpr, CD: tl.constexpr,
    NI: tl.constexpr, NO: tl.constexpr, RP: tl.constexpr, X: tl.constexpr,
):
    """Partial sums of every dG_k of sum(dy * (x @ W.T)), the chain of ``_chain_kernel`` and its
    reverse on chip (operands of every ``tl.dot`` in ``STATE``, as there); ``cost.GradSplit``
    describes the grid and the slots, the host sums them.

    Program (O_1 block x O_2 block, chunk group g, row split s) runs the I_d chunks of group g
    (``cdiv(chunks, num_programs(1))`` each), and per chunk every ``num_programs(2)``-th block of BM
    rows. Per row block it runs the forward chain keeping each step's input P_k (registers), then
    the reverse: dQ_d is the dy tile, ``dB_k += P_k.T @ dQ_k`` (fp32 accumulators) and
    ``dQ_k-1 = unpermute(dQ_k @ B_k.T)``. It stores (``_chain_store_grad``, fp32, every tile whole,
    padding included, so the launch writes every element of its ``GradSplit.elements``) each
    chunk's dB_d tile after the chunk and the dB_1..dB_d-1 tiles (summed over its chunks) at the
    end, each at its place in a padded core behind the other programs' partials of it: the host
    sums core k's region over its first axis. Neither the states nor W or dW touch global memory.
    FLOPs ``3 x`` the forward chain's (one forward, two dots per step backward, step 1's forward
    repeated per O_2 block). Bytes ``elt (M I + M O) x`` (O_1 O_2 blocks x I_d chunks) re-reads
    (mostly L2), plus ``4 GradSplit.elements`` of slots.
    """
    pid_o = tl.program_id(0)
    n_o2 = tl.cdiv(OUT[1], NO[1])
    starts = ((pid_o // n_o2) * NO[0], (pid_o % n_o2) * NO[1])
    per_group = tl.cdiv(tl.cdiv(IN[D - 1], NI[D - 1]), tl.num_programs(1))
    me = (pid_o // n_o2, pid_o % n_o2, tl.program_id(1), tl.program_id(2))  # O_1, O_2 block, group, split
    rm_in, c, row_ok_in, row_off, col_ok, col_off = _chain_in_index(BM, D, IN, NI, RP, X)
    x_cols = col_off.to(tl.int64) * stride_xk
    rm_out, out_ok, out_off, _ = _chain_out_index(starts, D, OUT, NO, X)
    u = tl.arange(0, NO[D - 1] * RP[D])  # dQ_d columns (o_d, b): dy at b = 0, zero padding beside it
    od = u // RP[D] + (starts[1] if D == 2 else 0)
    dy_cols = (out_off[:, None] + od[None, :]).to(tl.int64)
    dy_ok = out_ok[:, None] & ((od < OUT[D - 1]) & (u % RP[D] == 0))[None, :]
    heads = ()  # cores 1..d-1: their tiles and accumulators do not depend on the chunk
    accs = ()
    for k in tl.static_range(D - 1):
        heads = heads + (_chain_core(g_ptrs, k, 0, starts, D, IN, OUT, RANK, STRIDES, AXES, SPLINE, NI, NO, RP).to(STATE),)
        accs = accs + (tl.full((RP[k] * NI[k], NO[k] * RP[k + 1]), 0.0, tl.float32),)  # as in _chain_kernel
    for j in range(per_group):
        d0 = (tl.program_id(1) * per_group + j) * NI[D - 1]
        row_ok = row_ok_in & (d0 + c < IN[D - 1])
        x_rows = x_ptr + (row_off + d0 + c).to(tl.int64) * stride_xk
        gs = heads + (_chain_core(g_ptrs, D - 1, d0, starts, D, IN, OUT, RANK, STRIDES, AXES, SPLINE,
                                  NI, NO, RP).to(STATE),)
        accs = accs + (tl.full((RP[D - 1] * NI[D - 1], NO[D - 1] * RP[D]), 0.0, tl.float32),)
        # a chunk past I_d (the last group's tail) runs no row block: its dB_d tile stays zero
        for mb in range(tl.program_id(2), tl.where(d0 < IN[D - 1], tl.cdiv(M, BM), 0), tl.num_programs(2)):
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
        _chain_store_grad(part_ptr, accs[D - 1], D - 1, me, tl.program_id(1) * per_group + j, tl.num_programs(1),
                          tl.num_programs(2), per_group, D, OUT, NI, NO, RP)
        done = ()
        for k in tl.static_range(D - 1):
            done = done + (accs[k],)
        accs = done
    for k in tl.static_range(D - 1):
        _chain_store_grad(part_ptr, accs[k], k, me, 0, tl.num_programs(1), tl.num_programs(2), per_group,
                          D, OUT, NI, NO, RP)
