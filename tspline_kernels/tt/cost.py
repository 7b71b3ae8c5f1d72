"""FLOP / byte model of the two TT kernel strategies, and the rule that picks one.

Pure Python (no Triton, no GPU query), so modules, ops and benchmarks can import it anywhere.
Notation: d cores ``(r_{k-1}, O_k, I_k, r_k)``, ``O = prod O_k``, ``I = prod I_k``, ``M`` rows of x,
``elt`` bytes per element of x. The counts match the kernel docstrings in ``tt/kernels.py``.

* ``contract``: d launches of one batched-GEMM step kernel; step k reads the state
  ``(M O_<k, r_{k-1} I_k, I_>k)`` and writes ``(M O_<k, O_k r_k, I_>k)`` to global memory.
  FLOPs ``sum_k 2 M O_<=k r_{k-1} r_k I_>=k``.
* ``rebuild``: one launch; every ``(BN, BK)`` tile of W is rebuilt on chip from the head product
  L ``(O/O_d, I/I_d, r_{d-1})`` and the last core, then fed to ``tl.dot``.
  FLOPs ``2 M O I + 2 r_{d-1} O I cdiv(M, BM)``.

The time estimate is, per launch, ``launch overhead + max(FLOPs / peak, bytes / bandwidth)`` with
H100 SXM datasheet numbers (dense bf16 tensor cores, HBM3). It only has to rank the two
strategies; it is not a performance prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PEAK_FLOPS = 989e12  # H100 SXM dense bf16 tensor-core FLOP/s
HBM_BYTES = 3.35e12  # H100 SXM HBM3 bytes/s
SMS = 132  # H100 SXM streaming multiprocessors
LAUNCH_S = 4e-6  # per kernel launch (and per small host-side torch op of the rebuild set-up)
TILE = 128  # nominal output tile (BN, BP) of the tuned kernels
MAX_LAST_TILE = 1024  # rebuild needs next_pow2(O_d) * next_pow2(I_d) <= this (register tile of the last core)
STRATEGIES = ("auto", "contract", "rebuild")


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


def _launch(flops: float, nbytes: float, programs: int, launches: int = 1) -> Cost:
    """One kernel: overhead + roofline time, slowed down when it has fewer programs than SMs."""
    occupancy = min(1.0, programs / SMS)
    return Cost(flops, nbytes, launches, launches * LAUNCH_S + max(flops / PEAK_FLOPS, nbytes / HBM_BYTES) / occupancy)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def row_block(m: int) -> int:
    """Nominal BM for ``m`` rows: the tuned kernels use 16..128."""
    return min(TILE, max(16, _next_pow2(m)))


def rebuild_feasible(in_modes, out_modes) -> bool:
    """Whether the last core's (padded) ``O_d x I_d`` slice fits the rebuild kernel's register tile."""
    return _next_pow2(out_modes[-1]) * _next_pow2(in_modes[-1]) <= MAX_LAST_TILE


def contract_cost(m: int, in_modes, out_modes, ranks, elt: int = 2) -> Cost:
    """Forward (or, with the modes swapped, dx) by sequential contraction, one launch per core.

    Step k reads the state ``(M O_<k, r_{k-1} I_k, I_>k)`` once and writes ``(M O_<k, O_k r_k, I_>k)``.
    """
    total = Cost(0.0, 0.0, 0, 0.0)
    for k in range(len(in_modes)):
        b = m * math.prod(out_modes[:k])
        j = ranks[k] * in_modes[k]
        p = out_modes[k] * ranks[k + 1]
        c = math.prod(in_modes[k + 1:])
        programs = math.ceil(p / TILE) * math.ceil(b * c / TILE)
        total = total + _launch(2.0 * p * j * b * c, float(elt * (b * j * c + b * p * c + p * j)), programs)
    return total


def head_size(in_modes, out_modes, ranks) -> int:
    """Elements of the head product L ``(O/O_d, I/I_d, r_{d-1})``."""
    return math.prod(out_modes[:-1]) * math.prod(in_modes[:-1]) * ranks[-2]


def rebuild_cost(m: int, in_modes, out_modes, ranks, elt: int = 2) -> Cost:
    """Forward (or dx) by on-chip tile rebuild: the host-side head product, then one kernel.

    Bytes assume x tiles are reused from L2 across a group of column blocks (grouped launch order).
    """
    n_out, n_in = math.prod(out_modes), math.prod(in_modes)
    bm = row_block(m)
    row_blocks = math.ceil(m / bm)
    flops = 2.0 * m * n_out * n_in + 2.0 * ranks[-2] * n_out * n_in * row_blocks
    nbytes = elt * (m * n_in + m * n_out + head_size(in_modes, out_modes, ranks) * row_blocks)
    return _head_cost(in_modes, out_modes, ranks, elt) + _launch(flops, nbytes, row_blocks * math.ceil(n_out / TILE))


def _head_cost(in_modes, out_modes, ranks, elt: int) -> Cost:
    """Host-side head product L = G_1 ... G_{d-1} (d - 2 small einsums), read and written once each."""
    d = len(in_modes)
    flops = sum(2.0 * math.prod(out_modes[:k + 1]) * math.prod(in_modes[:k + 1]) * ranks[k] * ranks[k + 1]
                for k in range(1, d - 1))
    return _launch(flops, 3.0 * elt * head_size(in_modes, out_modes, ranks), SMS, launches=max(d - 2, 0))


def forward_cost(strategy: str, m: int, in_modes, out_modes, ranks, elt: int = 2) -> Cost:
    """Cost of y = x @ W.T with ``strategy`` ("contract" or "rebuild")."""
    fn = {"contract": contract_cost, "rebuild": rebuild_cost}[strategy]
    return fn(m, in_modes, out_modes, ranks, elt)


def grad_cores_cost(strategy: str, m: int, in_modes, out_modes, ranks, elt: int = 2) -> Cost:
    """Cost of every d(core) from (dy, x).

    contract: recompute the forward states U_1..U_{d-1}, run the dy sweep V_d..V_2, and one
    reduction per core (each as costly as its step): at most 3x the forward, counted as 3x.
    rebuild: G = dy.T @ x tile by tile on chip (2 M O I FLOPs, never stored), reduced against L and
    the last core (4 r O I FLOPs); dL -> d(cores 1..d-1) on the host.
    """
    n_out, n_in, d = math.prod(out_modes), math.prod(in_modes), len(in_modes)
    if strategy == "rebuild":
        head = head_size(in_modes, out_modes, ranks)
        tiles = math.ceil(n_out / TILE) * math.ceil(n_in / TILE)
        kernel = _launch(2.0 * m * n_out * n_in + 4.0 * ranks[-2] * n_out * n_in,
                         elt * m * (n_in + n_out) + 4.0 * head, tiles)
        return kernel + _head_cost(in_modes, out_modes, ranks, elt) + _head_cost(in_modes, out_modes, ranks, elt)
    fwd = contract_cost(m, in_modes, out_modes, ranks, elt)
    return Cost(3 * fwd.flops, 3 * fwd.bytes, 3 * d - 2, 3 * fwd.seconds)


def pick_strategy(m: int, in_modes, out_modes, ranks, elt: int = 2) -> str:
    """The strategy with the lower estimated time for y = x @ W.T on ``m`` rows."""
    if not rebuild_feasible(in_modes, out_modes):
        return "contract"
    a = contract_cost(m, in_modes, out_modes, ranks, elt).seconds
    b = rebuild_cost(m, in_modes, out_modes, ranks, elt).seconds
    return "contract" if a <= b else "rebuild"


def check_strategy(strategy: str, in_modes, out_modes) -> str:
    """``strategy`` if it is known and, for "rebuild", feasible for these modes; else a ValueError."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown TT strategy {strategy!r}; expected one of {STRATEGIES}")
    if strategy == "rebuild" and not rebuild_feasible(in_modes, out_modes):
        raise ValueError(
            f"strategy='rebuild' needs next_pow2(O_d) * next_pow2(I_d) <= {MAX_LAST_TILE} for the last core, "
            f"got O_d={out_modes[-1]}, I_d={in_modes[-1]}; use 'contract' or put smaller modes last"
        )
    return strategy


def resolve(strategy: str, m: int, in_modes, out_modes, ranks, elt: int = 2) -> str:
    """``strategy`` with "auto" resolved; a clear error for unknown or infeasible choices."""
    if check_strategy(strategy, in_modes, out_modes) == "auto":
        return pick_strategy(m, in_modes, out_modes, ranks, elt)
    return strategy
