"""FLOP / byte / launch model of the two TT kernel strategies, and the rule that picks one.

Pure Python (no Triton, no GPU query), so modules, ops and benchmarks can import it anywhere.
Notation: d cores ``(r_{k-1}, O_k, I_k, r_k)``, ``O = prod O_k``, ``I = prod I_k``, ``M`` rows of x,
``elt`` bytes per element of x, ``state_elt`` bytes per element of the states and of rebuild's head
product (``state_dtype``; default ``elt``). The FLOP and byte counts match the kernel docstrings
(``tt/chain.py``, ``steps.py``, ``rebuild.py``); the launches are those ``tt/kernels.py`` makes, host-side
torch ops included (each one launch on a GPU), which a test counts.

* ``contract``: sequential contraction of x with the cores. The forward (and dx) is one launch of
  the fused chain kernel, states on chip, when one of ``CHAIN_CONFIGS`` fits ``CHAIN_MAX_TILE``
  (``chain_cost``); otherwise d launches of one batched-GEMM step kernel, step k reading the state
  ``(M O_<k, r_{k-1} I_k, I_>k)`` and writing ``(M O_<k, O_k r_k, I_>k)`` to global memory
  (``steps_cost``). FLOPs ``sum_k 2 M O_<=k r_{k-1} r_k I_>=k`` (plus padding and, in the chain
  kernel, step 1 once per block of O_2).
* ``rebuild``: one launch; every ``(BN, BK)`` tile of W is rebuilt on chip from the head product
  L ``(O/O_d, I/I_d, r_{d-1})`` and the last core, then fed to ``tl.dot``.
  FLOPs ``2 M O I + 2 r_{d-1} O I cdiv(M, BM)``.

The time estimate is, per launch, ``launch overhead + max(FLOPs / peak, bytes / bandwidth)`` with
H100 SXM datasheet numbers (dense bf16 tensor cores, HBM3; the chain kernel's L2 re-reads at an
estimated L2 bandwidth). It only has to rank the two
strategies; it is not a performance prediction.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .._layers import check_count

PEAK_FLOPS = 989e12  # H100 SXM dense bf16 tensor-core FLOP/s
HBM_BYTES = 3.35e12  # H100 SXM HBM3 bytes/s
L2_BYTES = 10e12  # H100 L2 bytes/s, an estimate (not on the datasheet)
SMS = 132  # H100 SXM streaming multiprocessors
LAUNCH_S = 4e-6  # per kernel launch (and per host-side torch op: each is a launch on a GPU)
TILE = 128  # nominal output tile (BN, BP) of the tuned kernels
MAX_LAST_TILE = 1024  # rebuild needs next_pow2(O_d) * next_pow2(I_d) <= this (register tile of the last core)
STRATEGIES = ("auto", "contract", "rebuild")
CHAIN_MAX_TILE = 16384  # elements of the largest register tile (state or core tile) of the chain kernel
# (BM, BO1, BO2, CD) of the chain kernel: rows, O_1 and O_2 per program, I_d per loop step
CHAIN_CONFIGS = tuple((bm, bo1, bo2, cd) for bm in (16, 64) for bo1 in (1, 4, 16) for bo2 in (4, 16) for cd in (1, 4))
# the gradient chain kernel's configs: few, because each variant compiles slowly (d unrolled
# forward and backward steps with large register tiles)
CHAIN_GRAD_CONFIGS = ((16, 1, 4, 1), (16, 4, 4, 1), (64, 1, 4, 1), (16, 1, 16, 1))
# the gradient chain kernel's fp32 partial slots (``grad_split``): at most this many bytes where
# one chunk group and one row split per O block allow it, and programs enough to fill the GPU twice
CHAIN_GRAD_PART_BYTES = 4 << 20
CHAIN_GRAD_PROGRAMS = 2 * SMS
# the forward chain kernel's split-K (``chain_split``): programs it aims at, and at most this many
# bytes of fp32 partial y slots
CHAIN_PROGRAMS = 2 * SMS
CHAIN_PART_BYTES = 4 << 20


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the kernels' intermediates (states, rebuild's head product) for ``dtype`` inputs:
    fp32 for fp16, whose range (65504) the states of a finite product can exceed (the reference
    keeps them in fp32); the input dtype otherwise (bf16 has fp32's range)."""
    return torch.float32 if dtype == torch.float16 else dtype


@dataclass(frozen=True)
class Cost:
    """Work of one call: useful FLOPs, minimal global-memory bytes, kernel launches and the
    estimated H100 time (seconds)."""

    flops: float
    bytes: float
    launches: int
    seconds: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes, self.launches + other.launches,
                    self.seconds + other.seconds)


def _launch(flops: float, nbytes: float, programs: int, launches: int = 1, l2_bytes: float = 0.0) -> Cost:
    """One kernel: overhead + roofline time (HBM ``nbytes``, L2 hits ``l2_bytes``), slowed down when
    it has fewer programs than SMs (an empty launch counts as one program)."""
    occupancy = min(1.0, max(programs, 1) / SMS)
    roof = max(flops / PEAK_FLOPS, nbytes / HBM_BYTES, l2_bytes / L2_BYTES)
    return Cost(flops, nbytes, launches, launches * LAUNCH_S + roof / occupancy)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def row_block(m: int) -> int:
    """Nominal BM for ``m`` rows: the tuned kernels use 16..128."""
    return min(TILE, max(16, _next_pow2(m)))


def rebuild_feasible(in_modes, out_modes) -> bool:
    """Whether the last core's (padded) ``O_d x I_d`` slice fits the rebuild kernel's register tile."""
    return _next_pow2(out_modes[-1]) * _next_pow2(in_modes[-1]) <= MAX_LAST_TILE


@dataclass(frozen=True)
class ChainPlan:
    """Register tiles of the chain kernel for one config. Per step k (0-based): ``ni[k]`` input
    indices (padded I_k; the chunk CD of I_d for the last step), ``no[k]`` output indices (the
    blocks BO1, BO2 of O_1, O_2, then padded O_k), ``x[k]`` state rows; ``rp[k]`` padded ranks
    (k = 0..d), raised so that every ``tl.dot`` side is at least 16 (padding is zero)."""

    bm: int
    ni: tuple[int, ...]
    no: tuple[int, ...]
    rp: tuple[int, ...]
    x: tuple[int, ...]

    def largest_tile(self) -> int:
        """Elements of the largest state (rows x K or rows x N) or core (K x N) tile."""
        sizes = []
        for k, (ni, no, x) in enumerate(zip(self.ni, self.no, self.x)):
            kk, nn = self.rp[k] * ni, no * self.rp[k + 1]
            sizes += [x * kk, x * nn, kk * nn]
        return max(sizes)

    def core_tiles(self) -> tuple[int, ...]:
        """Elements of each core tile ``B_k`` (``rp[k] ni[k] x no[k] rp[k+1]``): the gradient
        kernel's accumulator per core."""
        return tuple(self.rp[k] * ni * no * self.rp[k + 1] for k, (ni, no) in enumerate(zip(self.ni, self.no)))

    def grad_fits(self, elt: int = 2) -> bool:
        """Whether the gradient kernel fits: its d core accumulators (``sum_k K_k N_k`` fp32, held
        across its row loop) at most twice ``CHAIN_MAX_TILE``, and for 4-byte states every tile at
        most half of it (fp32 8^4 rank 8 needed 258 KiB of shared memory with full tiles)."""
        return sum(self.core_tiles()) <= 2 * CHAIN_MAX_TILE and self.largest_tile() * elt <= 2 * CHAIN_MAX_TILE

    def programs(self, m: int, out_modes) -> int:
        """Grid size: row blocks x blocks of O_1 x blocks of O_2."""
        return math.ceil(m / self.bm) * math.ceil(out_modes[0] / self.no[0]) * math.ceil(out_modes[1] / self.no[1])


def chain_plan(in_modes, out_modes, ranks, bm: int, bo1: int, bo2: int, cd: int) -> ChainPlan:
    """The tiles of config (BM, BO1, BO2, CD); blocks larger than their padded mode are clamped."""
    return _chain_plan(tuple(in_modes), tuple(out_modes), tuple(ranks), bm, bo1, bo2, cd)


@functools.lru_cache(maxsize=4096)
def _chain_plan(in_modes, out_modes, ranks, bm: int, bo1: int, bo2: int, cd: int) -> ChainPlan:
    """``chain_plan``, cached: the launchers (grids, split) and the pruners ask on every launch."""
    d = len(in_modes)
    ip, op = [_next_pow2(i) for i in in_modes], [_next_pow2(o) for o in out_modes]
    ni = tuple(ip[:-1]) + (min(cd, ip[-1]),)
    no = (min(bo1, op[0]), min(bo2, op[1])) + tuple(op[2:])
    rp = [max(1, 16 // ni[0])]
    rp += [max(_next_pow2(ranks[k]), 16 // no[k - 1], 16 // ni[k]) for k in range(1, d)]
    rp.append(max(1, 16 // no[-1]))
    x = tuple(bm * math.prod(no[:k]) * math.prod(ni[k + 1:]) for k in range(d))
    return ChainPlan(bm, ni, no, tuple(rp), x)


def chain_plans(in_modes, out_modes, ranks, configs=None, grad: bool = False, elt: int = 2) -> list[ChainPlan]:
    """Distinct plans of ``configs`` (default ``CHAIN_CONFIGS``, or ``CHAIN_GRAD_CONFIGS`` with
    ``grad``) whose tiles fit ``CHAIN_MAX_TILE`` (with ``grad``, ``ChainPlan.grad_fits`` for
    ``elt``-byte states too); empty: use the step kernels."""
    configs = tuple(configs or (CHAIN_GRAD_CONFIGS if grad else CHAIN_CONFIGS))
    return list(_fitting_plans(tuple(in_modes), tuple(out_modes), tuple(ranks), configs, grad, elt, CHAIN_MAX_TILE))


@functools.lru_cache(maxsize=1024)
def _fitting_plans(in_modes, out_modes, ranks, configs, grad: bool, elt: int, limit: int) -> tuple[ChainPlan, ...]:
    """``chain_plans``, cached: the launchers and the strategy pick ask on every call (``limit``,
    the current ``CHAIN_MAX_TILE``, is part of the key)."""
    plans = {chain_plan(in_modes, out_modes, ranks, *c) for c in configs}
    fits = (p for p in plans if p.largest_tile() <= limit and (not grad or p.grad_fits(elt)))
    return tuple(sorted(fits, key=lambda p: (p.bm, p.no, p.ni)))


@dataclass(frozen=True)
class GradSplit:
    """How ``_chain_grad_kernel`` divides its work, grid ``(blocks, groups, splits)``: program
    (O_1 x O_2 block, chunk group g, row split s) runs I_d chunks ``g * per_group ..`` (``per_group``
    of them; past the last chunk its tiles are zero) on row blocks ``s, s + splits, ..``, and writes
    ``slot`` fp32 elements of partial core gradients: a tile of each of cores 1..d-1 (``head``
    elements in all, summed over its chunks) and one tile of core d per chunk (``last`` elements
    each), each into its core's region (``chain._chain_store_grad``). The host sums each region
    over the programs that share its entries (deterministic, no atomics)."""

    blocks: tuple[int, int]
    groups: int
    per_group: int
    splits: int
    head: int
    last: int

    @property
    def slot(self) -> int:
        return self.head + self.per_group * self.last

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.blocks[0] * self.blocks[1], self.groups, self.splits

    @property
    def elements(self) -> int:
        """fp32 elements of all the launch's slots."""
        return math.prod(self.grid) * self.slot


def grad_split(plan: ChainPlan, m: int, in_modes, out_modes, programs: int | None = None,
               budget: int | None = None) -> GradSplit:
    """The gradient chain kernel's split for ``plan`` on ``m`` rows: as many chunk groups and then
    row splits as fill ``programs`` (default ``CHAIN_GRAD_PROGRAMS``) while the slots stay within
    ``budget`` bytes (default ``CHAIN_GRAD_PART_BYTES``); at least one group and split per O block,
    so one chunk group of all the chunks where even that exceeds the budget (a lower bound:
    ``blocks x (head + chunks x last)`` elements)."""
    programs = CHAIN_GRAD_PROGRAMS if programs is None else programs
    budget = CHAIN_GRAD_PART_BYTES if budget is None else budget
    return _grad_split(plan, min(math.ceil(m / plan.bm), programs), in_modes[-1], tuple(out_modes[:2]),
                       programs, budget)


@functools.lru_cache(maxsize=1024)
def _grad_split(plan: ChainPlan, row_blocks: int, i_last: int, out_head: tuple[int, int], programs: int,
                budget: int) -> GradSplit:
    """``grad_split``, cached (every gradient launch asks once per config)."""
    blocks = (math.ceil(out_head[0] / plan.no[0]), math.ceil(out_head[1] / plan.no[1]))
    chunks = math.ceil(i_last / plan.ni[-1])
    tiles = plan.core_tiles()

    def split(groups: int, splits: int) -> GradSplit:
        per_group = math.ceil(chunks / groups)  # then as few groups as cover the chunks: none empty
        return GradSplit(blocks, math.ceil(chunks / per_group), per_group, splits, sum(tiles[:-1]), tiles[-1])

    best = split(max(1, min(chunks, programs // (blocks[0] * blocks[1]))), 1)
    while best.groups > 1 and 4 * best.elements > budget:
        best = split(best.groups - 1, 1)
    splits = min(row_blocks, programs // math.prod(best.grid), budget // (4 * best.elements))
    return split(best.groups, max(1, splits))


def chain_split(plan: ChainPlan, m: int, in_modes, out_modes, ranks, programs: int | None = None,
                budget: int | None = None) -> int:
    """Split-K count S of the forward chain kernel with ``plan`` on ``m`` rows: split s of S runs
    I_d chunks ``s cdiv(C, S) ..`` of the C chunks and writes an fp32 partial y ``(m, O)`` to slot
    s, which the host sums (bias added by split 0); S = 1 writes y directly (no slot, no sum).

    Split-K is on, for every config alike (so the launches made do not depend on the one the
    autotuner picks), where even the plan with the most programs (``ChainPlan.programs``) among
    ``chain_plans`` and ``plan`` has at most half of ``programs`` (default ``CHAIN_PROGRAMS``) and
    two slots fit ``budget`` bytes (default ``CHAIN_PART_BYTES``). Then S is ``cdiv(programs,
    plan's programs)``, at most C and what the budget holds, lowered to the fewest splits that
    keep the same chunks per split (none left empty), and at least 2 (where C = 1 the second
    split has no chunk and writes zeros)."""
    programs = CHAIN_PROGRAMS if programs is None else programs
    budget = CHAIN_PART_BYTES if budget is None else budget
    return _chain_split(plan, m, tuple(in_modes), tuple(out_modes), tuple(ranks), programs, budget)


@functools.lru_cache(maxsize=4096)
def _chain_split(plan: ChainPlan, m: int, in_modes, out_modes, ranks, programs: int, budget: int) -> int:
    """``chain_split``, cached (the launcher asks once per config and call)."""
    if m == 0:  # nothing to split (the launcher returns at once)
        return 1
    slots = budget // (4 * m * math.prod(out_modes))
    most = max([plan.programs(m, out_modes)] + [p.programs(m, out_modes) for p in chain_plans(in_modes, out_modes, ranks)])
    if slots < 2 or 2 * most > programs:
        return 1
    chunks = math.ceil(in_modes[-1] / plan.ni[-1])
    per_split = math.ceil(chunks / min(chunks, slots, math.ceil(programs / plan.programs(m, out_modes))))
    return max(2, math.ceil(chunks / per_split))  # as few splits as take per_split chunks: none empty


def chain_cost(m: int, in_modes, out_modes, ranks, elt: int = 2, grad: bool = False,
               state_elt: int | None = None) -> Cost | None:
    """Forward (or dx) by the fused chain kernel with its cheapest plan; None when no plan fits.

    Per program and I_d chunk, step k is a ``(x[k], rp[k] ni[k]) @ (rp[k] ni[k], no[k] rp[k+1])``
    ``tl.dot`` (padded sizes: the tensor cores do the zeros too). HBM bytes: x, y and the cores once;
    L2 bytes: x once per block column (O_1, O_2 blocks) and the core tiles once per program and chunk.
    The forward with S > 1 splits (``chain_split``; not ``grad``, whose plans serve the gradient
    kernel) runs S times the programs, writes ``4 S M O`` bytes of slots instead of y, and one
    more launch sums them into y (``(4 S + elt) M O`` bytes, ``SplitSlots.sum``).
    """
    best = None
    n_out = math.prod(out_modes)
    for p in chain_plans(in_modes, out_modes, ranks, grad=grad, elt=state_elt or elt):
        programs, chunks = p.programs(m, out_modes), math.ceil(in_modes[-1] / p.ni[-1])
        splits = 1 if grad else chain_split(p, m, in_modes, out_modes, ranks)
        step = sum(2.0 * x * p.rp[k] * ni * no * p.rp[k + 1] for k, (ni, no, x) in enumerate(zip(p.ni, p.no, p.x)))
        tiles = sum(p.core_tiles())
        columns = math.ceil(out_modes[0] / p.no[0]) * math.ceil(out_modes[1] / p.no[1])
        cores = sum(ranks[k] * o * i * ranks[k + 1] for k, (o, i) in enumerate(zip(out_modes, in_modes)))
        y_bytes = elt * m * n_out if splits == 1 else 4 * splits * m * n_out
        nbytes = elt * (m * math.prod(in_modes) + cores) + y_bytes
        l2 = elt * (m * math.prod(in_modes) * columns + tiles * programs * chunks)
        c = _launch(programs * chunks * step, float(nbytes), programs * splits, l2_bytes=float(l2))
        if splits > 1:
            c = c + _launch(0.0, (4.0 * splits + elt) * m * n_out, SMS)
        best = c if best is None or c.seconds < best.seconds else best
    return best


# the Kronecker-sum kernel (``tt/kronsum.py``): its largest fp32 register tile, and the row blocks
# (of 2 rows) it needs to fill the GPU; below that the chain kernel's split-K serves few rows better
KRONSUM_ACC_LIMIT = 8192
KRONSUM_MIN_ROWS = 2 * SMS


@dataclass(frozen=True)
class KronsumPlan:
    """Cores 1..cut and cut+1..d merged into A ``(1, O_a, I_a, R)`` and B ``(R, O_b, I_b, 1)``;
    ``sizes`` = (R, O_a, I_a, O_b, I_b) and ``padded`` their padded mode sizes."""

    cut: int
    sizes: tuple[int, int, int, int, int]
    padded: tuple[int, int, int, int]


def kronsum_plan(in_modes, out_modes, ranks) -> KronsumPlan | None:
    """The Kronecker-sum kernel's cut with the fewest executed FLOPs among those whose merged,
    padded modes fit its register tiles (``KRONSUM_ACC_LIMIT``: 64 x 64 halves at most, or
    128 x 32 ones); None if none does (or d = 1)."""
    best = None
    for c in range(1, len(in_modes)):
        o_a, i_a, o_b, i_b = (math.prod(out_modes[:c]), math.prod(in_modes[:c]), math.prod(out_modes[c:]),
                              math.prod(in_modes[c:]))
        m1p, n1p, m2p, n2p = (max(16, _next_pow2(n)) for n in (o_a, i_a, o_b, i_b))
        # fp32 V and accumulator tiles; the 16-bit x, A_a and B_a tiles at most twice as many elements
        if max(n1p, m1p) * m2p > KRONSUM_ACC_LIMIT or max(n1p * n2p, n2p * m2p, n1p * m1p) > 2 * KRONSUM_ACC_LIMIT:
            continue
        plan = KronsumPlan(c, (ranks[c], o_a, i_a, o_b, i_b), (m1p, n1p, m2p, n2p))
        if best is None or kronsum_flops(plan, 1) < kronsum_flops(best, 1):
            best = plan
    return best


def kronsum_flops(plan: KronsumPlan, m: int) -> float:
    """Executed FLOPs of the Kronecker-sum kernel on m rows (padded sizes)."""
    m1p, n1p, m2p, n2p = plan.padded
    return 2.0 * m * plan.sizes[0] * (n1p * n2p * m2p + m2p * n1p * m1p)


def merge_ops(d: int) -> int:
    """Host torch ops that merge ``d`` plain cores (in the input dtype) into the Kronecker-sum
    kernels' two halves, every call (``kernels._halves``): per merge an einsum (a layout copy and a
    batched GEMM)."""
    return 2 * (d - 2)


def kronsum_cost(m: int, in_modes, out_modes, ranks, elt: int = 2, state_elt: int | None = None) -> Cost | None:
    """Forward by the Kronecker-sum kernel on the cores merged into two halves (``merge_ops``);
    None where no cut fits, below ``KRONSUM_MIN_ROWS``, or
    where the states need more range than the input dtype (fp16, ``state_dtype``): the kernel's
    merged cores and intermediates are in the input dtype."""
    plan = kronsum_plan(in_modes, out_modes, ranks)
    if plan is None or m < KRONSUM_MIN_ROWS or (state_elt or elt) != elt:
        return None
    r, o_a, i_a, o_b, i_b = plan.sizes
    programs = math.ceil(m / 2)
    merged = r * (o_a * i_a + o_b * i_b)
    return _launch(kronsum_flops(plan, m), float(elt * (m * (i_a * i_b + o_a * o_b) + merged)), programs,
                   launches=1 + merge_ops(len(in_modes)), l2_bytes=float(elt * merged * programs))


def kronsum_grad_splits(plan: KronsumPlan, m: int, programs: int | None = None) -> int:
    """Row splits of the Kronecker-sum gradient kernel (R programs each): towards ``programs``
    (``CHAIN_GRAD_PROGRAMS``) programs, at most one per row, and within
    ``CHAIN_GRAD_PART_BYTES`` of fp32 partial slots (each R (O_a I_a + O_b I_b) floats)."""
    r, o_a, i_a, o_b, i_b = plan.sizes
    slot = 4 * r * (o_a * i_a + o_b * i_b)
    return max(1, min(m, (programs or CHAIN_GRAD_PROGRAMS) // r, CHAIN_GRAD_PART_BYTES // slot))


# host ops of the cores' gradients from the merged halves' (``merge_cores_grad``): per core an einsum
# (a layout copy and a batched GEMM, and sometimes one more copy or a copy to a contiguous result:
# counted as 3, at most one too many) and, for 16-bit cores, their cast to fp32 and the gradient's
# cast back to the cores' dtype (``tt_grad``'s)
MERGE_GRAD_OPS = 3


def kronsum_grad_cost(m: int, in_modes, out_modes, ranks, elt: int = 2, state_elt: int | None = None) -> Cost | None:
    """Every d(core) by the Kronecker-sum gradient kernel (twice the forward's FLOPs; x and dy read
    once from HBM, the R programs of a row block sharing them in L2; fp32 partial slots), the sum of
    its slots, the host ops of the merge (``merge_ops``) and of ``merge_cores_grad``; None where
    ``kronsum_cost`` is."""
    if kronsum_cost(m, in_modes, out_modes, ranks, elt, state_elt) is None:
        return None
    plan = kronsum_plan(in_modes, out_modes, ranks)
    r, o_a, i_a, o_b, i_b = plan.sizes
    splits = kronsum_grad_splits(plan, m)
    merged = r * (o_a * i_a + o_b * i_b)
    kernel = _launch(2 * kronsum_flops(plan, m), float(elt * m * (i_a * i_b + o_a * o_b) + 4 * splits * merged),
                     splits * r, l2_bytes=float(elt * merged * splits))
    host = len(in_modes) * (MERGE_GRAD_OPS + 2 * (elt < 4)) + merge_ops(len(in_modes))
    sums = _launch(float(splits * merged), 4.0 * (splits + 1) * merged, SMS, launches=1 + host)
    return kernel + sums


def contract_path(m: int, in_modes, out_modes, ranks, elt: int = 2, state_elt: int | None = None) -> str:
    """Which kernel the contract forward runs (by the model's time): "kronsum", "chain" or "steps"."""
    chain = chain_cost(m, in_modes, out_modes, ranks, elt, state_elt=state_elt)
    kron = kronsum_cost(m, in_modes, out_modes, ranks, elt, state_elt)
    if kron is not None and (chain is None or kron.seconds < chain.seconds):
        return "kronsum"
    return "steps" if chain is None else "chain"


def contract_cost(m: int, in_modes, out_modes, ranks, elt: int = 2, state_elt: int | None = None,
                  kronsum: bool = True) -> Cost:
    """Forward (or, with the modes swapped and ``kronsum`` off, dx) by sequential contraction: the
    Kronecker-sum kernel where it fits and is faster (``contract_path``), else the chain kernel
    where it fits, else the step kernels."""
    path = contract_path(m, in_modes, out_modes, ranks, elt, state_elt) if kronsum else "chain"
    if path == "kronsum":
        return kronsum_cost(m, in_modes, out_modes, ranks, elt, state_elt)
    return (chain_cost(m, in_modes, out_modes, ranks, elt, state_elt=state_elt)
            or steps_cost(m, in_modes, out_modes, ranks, elt, state_elt))


def steps_cost(m: int, in_modes, out_modes, ranks, elt: int = 2, state_elt: int | None = None) -> Cost:
    """Forward (or dx) by sequential contraction, one step-kernel launch per core.

    Step k reads the state ``(M O_<k, r_{k-1} I_k, I_>k)`` once and writes ``(M O_<k, O_k r_k, I_>k)``
    (x and y in ``elt`` bytes, the states between in ``state_elt``).
    """
    d = len(in_modes)
    total = Cost(0.0, 0.0, 0, 0.0)
    for k in range(d):
        b = m * math.prod(out_modes[:k])
        j = ranks[k] * in_modes[k]
        p = out_modes[k] * ranks[k + 1]
        c = math.prod(in_modes[k + 1:])
        read, write = (elt if k == 0 else state_elt or elt), (elt if k == d - 1 else state_elt or elt)
        programs = math.ceil(p / TILE) * math.ceil(b * c / TILE)
        total = total + _launch(2.0 * p * j * b * c, float(read * b * j * c + write * b * p * c + elt * p * j), programs)
    return total


def head_size(in_modes, out_modes, ranks) -> int:
    """Elements of the head product L ``(O/O_d, I/I_d, r_{d-1})``."""
    return math.prod(out_modes[:-1]) * math.prod(in_modes[:-1]) * ranks[-2]


# Above this many rows the rebuild forward and dx write W in slices and multiply them with cuBLAS
# (``kernels._rebuild_sliced``), and the core gradients form G = dy.T @ x in slices with cuBLAS
# (``kernels._rebuild_grad_sliced``), instead of the fused kernels, whose main dot reaches ~65% of the
# bf16 peak where cuBLAS reaches ~99% of its measured 798 TFLOP/s (bench/NOTES.md). Above 2048 rows a
# 1024-column slice of a 4096-wide output has more than 16 x 8 = 128 GEMM tiles of 128 x 128: a full
# wave on 132 SMs, so each slice's GEMM runs at the whole GEMM's efficiency. At fewer rows a slice is
# part of a wave and its launches weigh on a ~100 us call: the fused kernel's single launch is the
# better bet.
REBUILD_FUSED_MAX_ROWS = 2048
# The sliced path's workspace: at most 8 MiB of W (1024 rows of a 4096-wide bf16 W), which stays in
# the H200's L2 (25 MB per partition) between the kernel that writes it and the GEMM that reads it,
# as the field bases' slices (``spline.kernels.FIELD_SLICE_BYTES``).
REBUILD_SLICE_BYTES = 8 << 20
# cuBLAS's GEMM rate relative to the rate the model gives the Triton kernels (PEAK_FLOPS, for all of
# them alike): ~99% of the measured bf16 peak against the fused kernels' expected ~65%.
CUBLAS_SPEEDUP = 1.5


def rebuild_slice_heads(o_h: int, o_d: int, n_in: int, elt: int) -> int:
    """Head output indices per slice of the sliced path (``o_d`` rows of W each, ``n_in`` columns of
    ``elt`` bytes): as many as ``REBUILD_SLICE_BYTES`` holds, at least 1, at most ``o_h``."""
    return max(1, min(o_h, REBUILD_SLICE_BYTES // max(o_d * n_in * elt, 1)))


def rebuild_cost(m: int, in_modes, out_modes, ranks, elt: int = 2, state_elt: int | None = None) -> Cost:
    """Forward (or dx) by rebuild: the host-side head product, then one fused kernel or, above
    ``REBUILD_FUSED_MAX_ROWS`` rows, the sliced path (``_rebuild_product_cost``)."""
    return _head_cost(in_modes, out_modes, ranks, elt, state_elt or elt) + _rebuild_product_cost(m, in_modes, out_modes,
                                                                                                 ranks, elt, state_elt)


def _rebuild_product_cost(m: int, in_modes, out_modes, ranks, elt: int, state_elt: int | None) -> Cost:
    """y = x @ W.T from the head product and the last core: the fused kernel up to
    ``REBUILD_FUSED_MAX_ROWS`` rows, else per slice of ``rebuild_slice_heads`` head indices one
    generation launch (2 r_{d-1} O_slice I FLOPs, the slice written to L2, the head rows read) and one
    cuBLAS GEMM (2 M O_slice I FLOPs at ``CUBLAS_SPEEDUP`` times the Triton rate, x read again per
    slice, its columns of y written; its 128 x 128 tiles set the occupancy), launches queued."""
    if m <= REBUILD_FUSED_MAX_ROWS:
        return _rebuild_kernel_cost(m, in_modes, out_modes, ranks, elt, state_elt)
    n_out, n_in, r = math.prod(out_modes), math.prod(in_modes), ranks[-2]
    o_d, i_d = out_modes[-1], in_modes[-1]
    o_h = n_out // o_d
    heads = rebuild_slice_heads(o_h, o_d, n_in, elt)
    total = Cost(0.0, 0.0, 0, 0.0)
    for h0 in range(0, o_h, heads):
        rows = min(heads, o_h - h0) * o_d
        head_bytes = (state_elt or elt) * rows * n_in * r / (o_d * i_d)
        gen = _launch(2.0 * r * rows * n_in, head_bytes, math.ceil(rows / 64) * math.ceil(n_in / 64),
                      l2_bytes=elt * rows * n_in)
        gemm = _cublas(2.0 * m * rows * n_in, elt * (m * n_in + m * rows), math.ceil(m / TILE) * math.ceil(rows / TILE),
                       l2_bytes=elt * rows * n_in)
        total = total + gen + gemm
    return _queued(total)


def _cublas(flops: float, nbytes: float, programs: int, l2_bytes: float) -> Cost:
    """One cuBLAS GEMM: ``_launch`` at ``CUBLAS_SPEEDUP`` times the Triton kernels' FLOP rate."""
    c = _launch(flops / CUBLAS_SPEEDUP, nbytes, programs, l2_bytes=l2_bytes)
    return Cost(flops, c.bytes, c.launches, c.seconds)


def _queued(c: Cost) -> Cost:
    """``c``, a sequence of launches that each run long, with its launch overheads hidden: the host
    queues launch k + 1 while launch k runs, so only the first one's is exposed (unless the host is
    the slower side)."""
    roof = c.seconds - c.launches * LAUNCH_S
    return Cost(c.flops, c.bytes, c.launches, max(roof + LAUNCH_S, c.launches * LAUNCH_S))


def _rebuild_grad_sliced_cost(m: int, in_modes, out_modes, ranks, elt: int, state_elt: int) -> Cost:
    """dL and dT in slices of G (``kernels._rebuild_grad_sliced``), beyond what ``_head_grad_cost``
    counts for the fused kernel (its zeroed dL and its sum of dT partials are not made): L and T cast
    to fp32 (16-bit states), then per slice of ``rebuild_slice_heads`` head indices (fp32 rows of G)
    a cuBLAS GEMM (``_cublas``; dy's columns and x read, G written to L2), G permuted (a copy, unless
    O_d or I_h is 1) and two fp32 matmuls (dL rows, dT accumulated), launches queued."""
    n_out, n_in, r = math.prod(out_modes), math.prod(in_modes), ranks[-2]
    o_d, i_h = out_modes[-1], n_in // in_modes[-1]
    o_h = n_out // o_d
    heads = rebuild_slice_heads(o_h, o_d, n_in, 4)
    casts = 2 * int(state_elt < 4)
    total = Cost(0.0, 0.0, casts - 2, (casts - 2) * LAUNCH_S)
    for h0 in range(0, o_h, heads):
        rows = min(heads, o_h - h0) * o_d
        gemm = _cublas(2.0 * m * rows * n_in, elt * m * (n_in + rows), math.ceil(rows / TILE) * math.ceil(n_in / TILE),
                       l2_bytes=4.0 * rows * n_in)
        copy = _launch(0.0, 0.0, SMS, launches=int(o_d > 1 and i_h > 1), l2_bytes=8.0 * rows * n_in)
        reduce = _launch(4.0 * r * rows * n_in, 8.0 * rows // o_d * i_h * r, SMS, launches=2, l2_bytes=8.0 * rows * n_in)
        total = total + gemm + copy + reduce
    return _queued(total)


def _rebuild_kernel_cost(m: int, in_modes, out_modes, ranks, elt: int, state_elt: int | None) -> Cost:
    """One rebuild kernel launch. Bytes assume x tiles are reused from L2 across a group of column
    blocks (grouped launch order)."""
    n_out, n_in = math.prod(out_modes), math.prod(in_modes)
    row_blocks = math.ceil(m / row_block(m))
    flops = 2.0 * m * n_out * n_in + 2.0 * ranks[-2] * n_out * n_in * row_blocks
    nbytes = elt * (m * n_in + m * n_out) + (state_elt or elt) * head_size(in_modes, out_modes, ranks) * row_blocks
    return _launch(flops, nbytes, row_blocks * math.ceil(n_out / TILE))


# Launches of the host-side torch ops (each one launch on a GPU), as ``kernels.py`` and
# ``reference/tt.py`` run them on contiguous cores and as torch runs an einsum there: a step of the
# head product is a bmm and a permuting copy, a step of its gradient two bmm and three copies.
HEAD_STEP_LAUNCHES = 2
HEAD_GRAD_STEP_LAUNCHES = 5


def head_launches(d: int, elt: int, state_elt: int) -> int:
    """Launches of ``kernels._head_and_last`` for ``elt``-byte cores: the cores cast to fp32 (16-bit
    cores), d - 2 head-product steps, L cast to the state dtype (16-bit states) and the last core
    cast to it (where the state dtype is not the cores')."""
    cast = int(elt < 4)
    return cast + (d - 2) * (cast + HEAD_STEP_LAUNCHES) + int(state_elt < 4) + int(state_elt != elt)


def _head_cost(in_modes, out_modes, ranks, elt: int, state_elt: int) -> Cost:
    """Host-side head product L = G_1 ... G_{d-1} (d - 2 small einsums, ``head_launches``), read
    and written once each."""
    d = len(in_modes)
    flops = sum(2.0 * math.prod(out_modes[:k + 1]) * math.prod(in_modes[:k + 1]) * ranks[k] * ranks[k + 1]
                for k in range(1, d - 1))
    return _launch(flops, 3.0 * state_elt * head_size(in_modes, out_modes, ranks), SMS,
                   launches=head_launches(d, elt, state_elt))


def _head_grad_cost(in_modes, out_modes, ranks, elt: int) -> Cost:
    """dL -> d(G_1..G_{d-1}) on the host (``reference.tt.head_product_grad`` in fp32 on the cores
    cast to fp32): the zeroed dL and dT partials, the sum of the dT partials, the casts, the
    partial products L_1..L_{d-2} and per core two einsums; FLOPs and bytes as for the head product."""
    d = len(in_modes)
    launches = 3 + d * int(elt < 4) + HEAD_STEP_LAUNCHES * max(d - 3, 0) + HEAD_GRAD_STEP_LAUNCHES * (d - 2)
    head = _head_cost(in_modes, out_modes, ranks, 4, 4)
    return Cost(2 * head.flops, 2 * head.bytes, launches, 2 * (head.seconds - head.launches * LAUNCH_S)
                + launches * LAUNCH_S)


def forward_cost(strategy: str, m: int, in_modes, out_modes, ranks, elt: int = 2, state_elt: int | None = None) -> Cost:
    """Cost of y = x @ W.T with ``strategy`` ("contract" or "rebuild")."""
    fn = {"contract": contract_cost, "rebuild": rebuild_cost}[strategy]
    return fn(m, in_modes, out_modes, ranks, elt, state_elt)


def _times(c: Cost, factor: float, launches: int, nbytes: float | None = None) -> Cost:
    """``factor`` times the work of ``c`` (FLOPs, bytes unless given, roofline time) in ``launches`` launches."""
    roof = c.seconds - c.launches * LAUNCH_S
    return Cost(factor * c.flops, c.bytes * factor if nbytes is None else nbytes, launches,
                factor * roof + launches * LAUNCH_S)


def grad_cores_cost(strategy: str, m: int, in_modes, out_modes, ranks, elt: int = 2,
                    state_elt: int | None = None) -> Cost:
    """Cost of every d(core) from (dy, x), launches counted as ``kernels.cores_grad`` makes them.

    contract (``contract_grad_path``): the Kronecker-sum gradient kernel (``kronsum_grad_cost``);
    or, where the gradient chain kernel fits, one launch that reruns the forward chain and its
    reverse on chip (3x the chain's FLOPs and time), plus one launch that sums every core's partial
    slots into the unpadded cores; otherwise recompute the forward states U_1..U_{d-1}, run the dy
    sweep V_d..V_2, and one reduction per core (each as costly as its step, plus the sum of its
    partials and a permuting copy), all with the step kernels: at most 3x their forward, counted as 3x.
    rebuild: G = dy.T @ x tile by tile on chip (2 M O I FLOPs, never stored), reduced against L and
    the last core (4 r O I FLOPs); dL -> d(cores 1..d-1) on the host (``_head_grad_cost``).
    """
    n_out, n_in = math.prod(out_modes), math.prod(in_modes)
    se = state_elt or elt
    if strategy == "rebuild":
        head = head_size(in_modes, out_modes, ranks)
        host = _head_cost(in_modes, out_modes, ranks, elt, se) + _head_grad_cost(in_modes, out_modes, ranks, elt)
        if m > REBUILD_FUSED_MAX_ROWS:
            return host + _rebuild_grad_sliced_cost(m, in_modes, out_modes, ranks, elt, se)
        tiles = math.ceil(n_out / TILE) * math.ceil(n_in / TILE)
        kernel = _launch(2.0 * m * n_out * n_in + 4.0 * ranks[-2] * n_out * n_in,
                         elt * m * (n_in + n_out) + 4.0 * head, tiles)
        return kernel + host
    if contract_grad_path(m, in_modes, out_modes, ranks, elt, state_elt) == "kronsum":
        return kronsum_grad_cost(m, in_modes, out_modes, ranks, elt, state_elt)
    return _chain_grad_costs(m, in_modes, out_modes, ranks, elt, state_elt)[0]


def _chain_grad_costs(m: int, in_modes, out_modes, ranks, elt: int, state_elt: int | None) -> tuple[Cost, Cost]:
    """(every d(core), dx) of the contract backward by the chain kernels, or the step kernels
    where the gradient chain kernel does not fit (their dy sweep ends in dx: one more step, its
    work within the 3x)."""
    d = len(in_modes)
    chain = chain_cost(m, in_modes, out_modes, ranks, elt, grad=True, state_elt=state_elt)
    if chain is not None:
        return (_times(chain, 3, 2, chain.bytes),
                contract_cost(m, out_modes, in_modes, ranks, elt, state_elt, kronsum=False))
    return _times(steps_cost(m, in_modes, out_modes, ranks, elt, state_elt), 3, 5 * d - 2), Cost(0.0, 0.0, 1, LAUNCH_S)


def contract_grad_path(m: int, in_modes, out_modes, ranks, elt: int = 2, state_elt: int | None = None) -> str:
    """Which kernels the contract backward runs (by the model's time for the core gradients and
    dx): "kronsum" (``kronsum_grad_cost``, dx by the Kronecker-sum kernel on W.T's halves; where
    both W's and W.T's halves fit) or "chain" (the chain kernels or the step kernels)."""
    kron = kronsum_grad_cost(m, in_modes, out_modes, ranks, elt, state_elt)
    kron_dx = kronsum_cost(m, out_modes, in_modes, ranks, elt, state_elt)
    if kron is None or kron_dx is None:
        return "chain"
    cores, dx = _chain_grad_costs(m, in_modes, out_modes, ranks, elt, state_elt)
    return "kronsum" if (kron + kron_dx).seconds < (cores + dx).seconds else "chain"


def rebuild_dx_cost(m: int, in_modes, out_modes, ranks, elt: int, state_elt: int) -> tuple[str, Cost]:
    """dx = dy @ W in rebuild's backward: ("kronsum", its cost) by the Kronecker-sum kernel on W's
    merged halves read transposed (W.T's TT swaps the modes) where it fits and is faster, else
    ("rebuild", copies of L and the last core transposed plus the product with W.T)."""
    copies = _launch(0.0, 2.0 * state_elt * (head_size(in_modes, out_modes, ranks) + ranks[-2] * in_modes[-1] * out_modes[-1]),
                     SMS, launches=2)
    rebuild = copies + _rebuild_product_cost(m, out_modes, in_modes, ranks, elt, state_elt)
    kron = kronsum_cost(m, out_modes, in_modes, ranks, elt, state_elt)
    return ("kronsum", kron) if kron is not None and kron.seconds < rebuild.seconds else ("rebuild", rebuild)


def grad_cost(strategy: str, m: int, in_modes, out_modes, ranks, elt: int = 2, state_elt: int | None = None) -> Cost:
    """Cost of the backward with every d(core) and dx: rebuild adds dx by ``rebuild_dx_cost`` (the
    product with W.T, or the Kronecker-sum kernel); contract dx by the Kronecker-sum kernel on W.T's
    halves with its core gradients, else a chain launch on W.T's cores where the gradient chain
    kernel runs, else one more step (``_chain_grad_costs``)."""
    total = grad_cores_cost(strategy, m, in_modes, out_modes, ranks, elt, state_elt)
    if strategy == "rebuild":
        return total + rebuild_dx_cost(m, in_modes, out_modes, ranks, elt, state_elt or elt)[1]
    if contract_grad_path(m, in_modes, out_modes, ranks, elt, state_elt) == "kronsum":
        return total + kronsum_cost(m, out_modes, in_modes, ranks, elt, state_elt)
    return total + _chain_grad_costs(m, in_modes, out_modes, ranks, elt, state_elt)[1]


def pick_strategy(m: int, in_modes, out_modes, ranks, elt: int = 2, backward: bool = False,
                  state_elt: int | None = None) -> str:
    """The strategy with the lower estimated time on ``m`` rows for y = x @ W.T, or with
    ``backward`` for the core gradients and dx (``grad_cost``). ``m = 0`` (an empty batch) is valid."""
    m = check_count("the number of rows m", m, 0)
    return _pick(m, tuple(in_modes), tuple(out_modes), tuple(ranks), elt, state_elt or elt, backward, CHAIN_MAX_TILE)


@functools.lru_cache(maxsize=4096)
def _pick(m: int, in_modes, out_modes, ranks, elt: int, state_elt: int, backward: bool, limit: int) -> str:
    """``pick_strategy``, cached: "auto" layers ask on every call, and the model is pure (``limit``,
    the current ``CHAIN_MAX_TILE``, is part of the key)."""
    if not rebuild_feasible(in_modes, out_modes):
        return "contract"
    fn = grad_cost if backward else forward_cost
    a = fn("contract", m, in_modes, out_modes, ranks, elt, state_elt).seconds
    b = fn("rebuild", m, in_modes, out_modes, ranks, elt, state_elt).seconds
    return "contract" if a <= b else "rebuild"


def check_strategy(strategy: str, in_modes, out_modes) -> str:
    """``strategy`` if it is known and, for "rebuild", feasible for these modes; else a TypeError (not
    a str) or ValueError."""
    if not isinstance(strategy, str):
        raise TypeError(f"strategy must be a str, one of {STRATEGIES}; got a {type(strategy).__name__}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown TT strategy {strategy!r}; expected one of {STRATEGIES}")
    if strategy == "rebuild" and not rebuild_feasible(in_modes, out_modes):
        raise ValueError(
            f"strategy='rebuild' needs next_pow2(O_d) * next_pow2(I_d) <= {MAX_LAST_TILE} for the last core, "
            f"got O_d={out_modes[-1]}, I_d={in_modes[-1]}; use 'contract' or put smaller modes last"
        )
    return strategy


def resolve(strategy: str, m: int, in_modes, out_modes, ranks, elt: int = 2, backward: bool = False,
            state_elt: int | None = None) -> str:
    """``strategy`` with "auto" resolved (for the forward, or the backward with ``backward``); a
    clear error for unknown or infeasible choices."""
    if check_strategy(strategy, in_modes, out_modes) == "auto":
        return pick_strategy(m, in_modes, out_modes, ranks, elt, backward, state_elt)
    return strategy
