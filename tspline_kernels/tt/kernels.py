"""Launchers of the tensor-train kernels, and the strategy choice per call. Reference: ``reference/tt.py``.

The kernels live by kind: ``chain.py`` (fused contract), ``steps.py`` (unfused contract),
``rebuild.py`` (W tiles on chip), with the core tiles and ``Core`` in ``tiles.py``. What the
launchers plan from the cores' structure (paths, launch constants) is kept per structure
(``plans_of``); nothing derived from their values is kept between calls (an optimizer step need
not tell: fused optimizers and writes through ``.data`` leave no trace a cache could check), so the
chain kernels read the cores where they are, each through its own pointer.

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
    re-reads per output block and core-tile re-reads per chunk (L2). Where the grid has fewer
    programs than the GPU takes (small M, ``cost.chain_split``), S programs per tile split its
    chunks (split-K) and write fp32 partial y slots, summed into y by one more launch (``4 S M O``
    bytes within ``cost.CHAIN_PART_BYTES``).
  - Core gradients (``_chain_grad_kernel``, 1 launch, plus a ``_chain_kernel`` launch on the cores
    of W.T for dx): program (O_1 block x O_2 block, group of I_d chunks, row split) reruns the
    forward chain per chunk and row block, keeping every step's input in registers, and walks it
    back (``dB_k += P_k.T dQ_k``, ``dQ_k-1 = unpermute(dQ_k B_k.T)``); fp32 accumulators written
    to the program's own partial slot, every core's summed by one more launch (``slot_sums``:
    deterministic, no atomics). Groups and splits aim at 2 programs per SM while the slots stay within
    ``cost.CHAIN_GRAD_PART_BYTES`` (``cost.grad_split``) or, where one group and split per O block
    already exceed it, take that least split: 3.5-5.1 MiB for 16^3 rank 16 and 2.1-3.2 MiB for 8^4
    rank 8 (bf16, per config, at any M). About 3x the forward chain's FLOPs.
  - Forward on many rows where the cores split into two halves with small merged modes (8^4),
    the Kronecker-sum kernel instead (``kronsum.py``, 1 launch, ``cost.contract_path``): the halves
    merged on the host (core-sized, cached per parameter version), W = sum_a A_a (x) B_a with rows
    in the MMA M dimension; 2 M R (I_a I_b O_b + O_b I_a O_a) FLOPs (0.4x the chain's for 8^4 r8).
    rebuild's dx runs it too where the cost model prefers it (``cost.rebuild_dx_cost``).
  - Both chain kernels are used where one of ``cost.CHAIN_CONFIGS`` fits ``cost.CHAIN_MAX_TILE`` register
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
  ``elt (M I + M O + |L| cdiv(M, BM))`` with x re-reads served from L2. Above
  ``cost.REBUILD_FUSED_MAX_ROWS`` rows the product runs in slices of W instead (``_rebuild_sliced``:
  ``_rebuild_slice_kernel`` writes at most ``cost.REBUILD_SLICE_BYTES`` of W's rows, L2-resident,
  then one cuBLAS GEMM per slice), so the main product runs at cuBLAS's efficiency. Backward
  (``_rebuild_grad_kernel``): each tile of G = dy.T @ x is accumulated over M on chip and reduced
  against T (-> dL, each entry owned by one tile) and L (-> dT partials summed on the host); above
  the same row count G is formed in fp32 slices by cuBLAS and reduced by torch matmuls instead
  (``_rebuild_grad_sliced``);
  dL -> d(G_1..G_{d-1}) by a small host VJP (``reference.tt.head_product_grad``); dx is a second
  ``_rebuild_kernel`` launch on the cores of W.T.

Neither strategy writes W or dW whole to global memory.

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

import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import NamedTuple

import torch

from .._layers import cast
from .._triton import (INTERPRET, SplitSlots, cdiv, check_inputs, contiguous, dot_precision, flatten, m_bucket,
                       sliced_gemm, SlotSums, slot_sum, slot_sums)
from ..reference import tt as ref
from . import cost
from .chain import _chain_grad_kernel, _chain_kernel, config_keys, launch_tiles
from .kronsum import _kronsum_grad_kernel, _kronsum_kernel
from .rebuild import _rebuild_grad_kernel, _rebuild_kernel, _rebuild_slice_kernel, rebuild_tiles
from .steps import _grad_step_kernel, _step_kernel
from .tiles import Core, core_modes, state_args, state_elt

# ----------------------------------------------------------------------------------------------
# Strategy "contract": the chain kernels, or d step launches where they do not fit
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1024)
def _chain_meta(layout: tuple) -> dict:
    """The chain kernels' constexpr description of cores given as ``(shape, strides, o, i, spline)``
    each (``_chain_layout``)."""
    cores = [Core(torch.empty_strided(shape, strides, device="meta"), o, i, spline) for shape, strides, o, i, spline in layout]
    ins, outs, ranks = core_modes(cores)
    return dict(D=len(cores), IN=ins, OUT=outs, RANK=ranks, STRIDES=tuple(strides for _, strides, *_ in layout),
                AXES=tuple(c.axes() for c in cores), SPLINE=cores[0].spline)


def _chain_layout(cores: list[Core]) -> tuple:
    """Each core's (or spline control tensor's) ``(shape, strides, o, i, spline)`` as it is in memory:
    the chain kernels read every core through its own pointer and strides (W.T's cores are W's,
    read with the o and i strides swapped), so nothing is packed or copied. The key of ``_chain_meta``."""
    return tuple((tuple(c.t.shape), c.t.stride(), c.o, c.i, c.spline) for c in cores)


CHAIN_SPLIT: int | None = None  # the forward chain kernel's split-K count for every config (tests); None: cost.chain_split


class ChainLaunch(NamedTuple):
    """What a forward chain launch passes besides its tensors and strides, for one layout of cores,
    row count and dtype (``_chain_launch``)."""

    consts: dict  # every constexpr but the config's: the cores' description, HAS_BIAS, STATE, PRECISION, tiles
    table: dict  # config key (``chain.config_key``) -> (plan, split-K count)
    most: int  # the largest split-K count, which sizes ``SplitSlots``
    out_modes: tuple
    n_out: int  # O, the product of out_modes


@functools.lru_cache(maxsize=1024)
def _chain_launch(layout: tuple, m: int, dtype: torch.dtype, has_bias: bool, keys: tuple, forced: int | None
                  ) -> ChainLaunch:
    """The forward chain launch on ``m`` rows of cores laid out as ``layout`` (``_chain_layout``), for
    the kernel's configs ``keys``; split-K counts ``forced`` or else ``cost.chain_split``'s. Cached:
    all of it is the same on every call of a layer at a row count."""
    meta = _chain_meta(layout)
    modes = meta["IN"], meta["OUT"], meta["RANK"]
    plans = {key: cost.chain_plan(*modes, *key) for key in keys}
    table = {key: (plan, forced or cost.chain_split(plan, m, *modes)) for key, plan in plans.items()}
    return ChainLaunch({**meta, "HAS_BIAS": has_bias, **state_args(dtype), **launch_tiles(keys, modes)}, table,
                       max(splits for _, splits in table.values()), modes[1], math.prod(modes[1]))


def chain_linear(x2: torch.Tensor, cores: list[Core], bias: torch.Tensor | None,
                 launch: ChainLaunch | None = None) -> torch.Tensor:
    """y = x2 @ W.T + bias by one ``_chain_kernel`` launch; x2 ``(M, I)`` -> ``(M, O)``; ``launch``:
    the ``_chain_launch`` where the caller has it. The launch holds the cores' layout (shapes and
    strides), so with one the cores give only their pointers: W's cores with the launch of W.T's
    layout compute dy2 @ W.

    Where the grid is small (``cost.chain_split``: split-K, the same for every config) the I_d
    chunks are split S ways: split s writes an fp32 partial y ``(M, O)`` to slot s of a
    ``SplitSlots`` buffer (``4 S M O`` bytes, within ``cost.CHAIN_PART_BYTES``), split 0 with the
    bias, and one more launch sums the slots the launch wrote into y in x's dtype
    (``SplitSlots.sum``). Otherwise the kernel writes y."""
    m = x2.shape[0]
    if m == 0:
        n_out = math.prod(c.o for c in cores) if launch is None else launch.n_out
        return torch.empty(m, n_out, device=x2.device, dtype=x2.dtype)
    if launch is None:
        launch = _chain_launch(_chain_layout(cores), m, x2.dtype, bias is not None, config_keys(_chain_kernel),
                               CHAIN_SPLIT)
    table, out_modes, n_out = launch.table, launch.out_modes, launch.n_out
    if launch.most == 1:  # split-K for every config or for none
        out, slots = torch.empty(m, n_out, device=x2.device, dtype=x2.dtype), None
    else:
        slots = SplitSlots(_chain_kernel, lambda meta: table[meta["BM"], meta["BO1"], meta["BO2"], meta["CD"]][1],
                           launch.most)
        out = slots.empty(m, n_out, device=x2.device)

    def grid(meta):
        plan, splits = table[meta["BM"], meta["BO1"], meta["BO2"], meta["CD"]]
        if slots is not None:
            slots(meta)
        return cdiv(m, meta["BM"]), cdiv(out_modes[0], plan.no[0]), cdiv(out_modes[1], plan.no[1]) * splits

    out_strides = out.stride()
    _chain_kernel[grid](
        x2, tuple(c.t for c in cores), contiguous(bias) if bias is not None else out, out,
        m, m_bucket(m), *x2.stride(), 0 if slots is None else out_strides[0], *out_strides[-2:], **launch.consts,
    )
    return out if slots is None else slots.sum(out, x2.dtype)


GRAD_PROGRAMS = 2 if INTERPRET else cost.CHAIN_GRAD_PROGRAMS  # programs the gradient chain kernel's split aims at


class GradLaunch(NamedTuple):
    """What a gradient chain launch passes besides its tensors and strides, for one layout of cores,
    row count and dtype (``_grad_launch``)."""

    consts: dict  # every constexpr but the config's: the cores' description, STATE, PRECISION, tiles
    table: dict  # config key -> (GradSplit, the SlotSums launch of its partials)
    most: int  # the most fp32 slot elements of any config, which sizes ``SplitSlots``


def _slot_sums(plan: cost.ChainPlan, split: cost.GradSplit, layout: tuple) -> SlotSums:
    """The launch that sums each core's partials in the slots of a launch that takes ``split``:
    core k's region is ``(n, RP, nb NO, nc NI, RP1)``, each of the n partials a padded core with its
    O_1 / O_2 blocks (k < 2) and its chunks (core d) in place, cut to ``(r0, O, I, r1)``."""
    d, programs = len(layout), math.prod(split.grid)
    tiles = plan.core_tiles()
    regions, off = [], 0
    for k, (shape, _, o, i, _) in enumerate(layout):
        nb = split.blocks[k] if k < 2 else 1
        nc = split.groups * split.per_group if k == d - 1 else 1
        size = programs * tiles[k] * (split.per_group if k == d - 1 else 1)
        padded = (plan.rp[k], nb * plan.no[k], nc * plan.ni[k], plan.rp[k + 1])
        regions.append((off, size // math.prod(padded), (shape[0], o, i, shape[3]), padded))
        off += size
    return slot_sums(tuple(regions))


@functools.lru_cache(maxsize=1024)
def _grad_launch(layout: tuple, m: int, dtype: torch.dtype, keys: tuple, programs: int, budget: int) -> GradLaunch:
    """The gradient chain launch on ``m`` rows of cores laid out as ``layout`` (``_chain_layout``), for
    the kernel's configs ``keys``, splits towards ``programs`` programs within ``budget`` bytes of
    slots (``cost.grad_split``). Cached: all of it is the same on every call of a layer at a row count."""
    meta = _chain_meta(layout)
    modes = meta["IN"], meta["OUT"], meta["RANK"]
    table = {}
    for key in keys:
        plan = cost.chain_plan(*modes, *key)
        split = cost.grad_split(plan, m, modes[0], modes[1], programs, budget)
        table[key] = split, _slot_sums(plan, split, layout)
    return GradLaunch({**meta, **state_args(dtype), **launch_tiles(keys, modes)}, table,
                      max(split.elements for split, _ in table.values()))


def chain_grad(dy2: torch.Tensor, x2: torch.Tensor, cores: list[Core], dtype: torch.dtype = torch.float32,
               launch: GradLaunch | None = None) -> list[torch.Tensor]:
    """``[dG_k]`` (``(r0, O, I, r1)``, contiguous, in ``dtype``) of sum(dy2 * (x2 @ W.T)) by one
    ``_chain_grad_kernel`` launch, its fp32 partial slots (``cost.grad_split``: chunk groups and row
    splits towards ``GRAD_PROGRAMS`` programs within ``cost.CHAIN_GRAD_PART_BYTES``) summed into
    ``dtype`` by one more launch (``slot_sums``); ``launch``: the ``_grad_launch`` where the caller
    has it."""
    m = x2.shape[0]
    if m == 0:
        return [torch.zeros(c.r0, c.o, c.i, c.r1, device=x2.device, dtype=dtype) for c in cores]
    if launch is None:
        launch = _grad_launch(_chain_layout(cores), m, x2.dtype, config_keys(_chain_grad_kernel), GRAD_PROGRAMS,
                              cost.CHAIN_GRAD_PART_BYTES)
    table = launch.table
    slots = SplitSlots(_chain_grad_kernel, lambda meta: table[meta["BM"], meta["BO1"], meta["BO2"], meta["CD"]][0].elements,
                       launch.most)  # a slot per fp32 element
    part = torch.empty(slots.slots, device=x2.device, dtype=torch.float32)
    launched = []

    def grid(meta):
        slots(meta)
        launched.append(table[meta["BM"], meta["BO1"], meta["BO2"], meta["CD"]])  # the last counts (after any autotuning)
        return launched[-1][0].grid

    _chain_grad_kernel[grid](
        x2, dy2, tuple(c.t for c in cores), part,
        m, m_bucket(m), *x2.stride(), *dy2.stride(), **launch.consts,
    )
    return launched[-1][1](part, dtype)


class State(NamedTuple):
    """A state of the step path as the step kernels read it: element (b, j, c) of ``t`` at
    ``b * batch_stride + (j * C + c) * stride``, C the ``cols`` of the step that reads it.
    (Immutable records of the step launchers, named tuples like ``Core``: a frozen dataclass
    costs ~4x as much to build, on every step of every call.)"""

    t: torch.Tensor
    batch_stride: int
    stride: int = 1


class Step(NamedTuple):
    """One step of the step path on a layer with ``dtype`` inputs: ``A_k`` (``A_k.T`` if
    ``transposed``, the dy sweep) applied to the ``batch * cols`` columns ``n = b * cols + c`` of a
    state (``batch = M O_<k``, ``cols = I_>k``), ``A_k[(o, b), (a, i)] = G_k[a, o, i, b]``."""

    core: Core
    batch: int
    cols: int
    dtype: torch.dtype
    transposed: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """(P, J): the rows and columns of the step's matrix."""
        r0, _, _, r1 = self.core.t.shape
        p, j = self.core.o * r1, r0 * self.core.i
        return (j, p) if self.transposed else (p, j)


def _step(state: State, step: Step, last: bool = False, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``step`` on ``state``; returns the contiguous output state (flat, ``(batch, P, cols)``), in
    ``cost.state_dtype(step.dtype)``, or in ``step.dtype`` for the ``last`` step (y or dx).
    ``bias`` ``(O,)`` (last step only) is indexed by the output offset modulo O."""
    p, j = step.shape
    n = step.batch * step.cols
    out = torch.empty(n * p, device=state.t.device, dtype=step.dtype if last else cost.state_dtype(step.dtype))
    if n == 0:
        return out
    core = step.core
    grid = lambda meta: (cdiv(n, meta["BN"]), cdiv(p, meta["BP"]))  # noqa: E731
    _step_kernel[grid](
        state.t, core.t, contiguous(bias) if bias is not None else out, out,
        n, step.cols, p, j, core.t.shape[3], core.i, 1 if bias is None else bias.shape[0], m_bucket(n),
        state.batch_stride, state.stride, *core.t.stride(), *core.axes(),
        SPLINE=core.spline, TRANSPOSED=step.transposed, HAS_BIAS=bias is not None,
        PRECISION=state_args(step.dtype)["PRECISION"],
    )
    return out


def _grad_step(v: State, u: State, step: Step) -> torch.Tensor:
    """``dA_k = sum_{b, c} V[b, :, c] U[b, :, c].T``, a ``(P, J)`` fp32 matrix, for ``step``'s output
    gradient ``v`` and its input ``u``."""
    p, j = step.shape
    n = step.batch * step.cols
    if n == 0:
        return torch.zeros(p, j, device=v.t.device, dtype=torch.float32)
    slots = SplitSlots(_grad_step_kernel, lambda meta: meta["N_SPLIT"], key=())
    part = slots.empty(p, j, device=v.t.device)
    grid = lambda meta: (cdiv(p, meta["BP"]), cdiv(j, meta["BJ"]), slots(meta))  # noqa: E731
    _grad_step_kernel[grid](v.t, u.t, part, n, step.cols, p, j, m_bucket(n),
                            v.batch_stride, v.stride, u.batch_stride, u.stride, **state_args(step.dtype))
    return slots.sum(part)


def chain_fits(modes: tuple, grad: bool = False, elt: int = 2) -> bool:
    """Whether one of the configs of the chain kernel (or, with ``grad``, the gradient chain
    kernel, for ``elt``-byte states) fits cores of ``modes`` (``core_modes``; ``cost.chain_plans``)."""
    return bool(cost.chain_plans(*modes, config_keys(_chain_grad_kernel if grad else _chain_kernel), grad, elt))


def contract_linear(x2: torch.Tensor, cores: list[Core], bias: torch.Tensor | None,
                    path: str | ChainLaunch | cost.KronsumPlan) -> torch.Tensor:
    """y = x2 @ W.T + bias by the path ``_forward_path`` found: the Kronecker-sum kernel (its plan),
    the chain kernel (its launch) or d step launches ("steps")."""
    if isinstance(path, cost.KronsumPlan):
        return kronsum_linear(x2, cores, bias, path)
    if path == "steps":
        return steps_linear(x2, cores, bias)
    return chain_linear(x2, cores, bias, path)


def kronsum_linear(x2: torch.Tensor, cores: list[Core], bias: torch.Tensor | None, plan: cost.KronsumPlan,
                   transpose: bool = False) -> torch.Tensor:
    """y = x2 @ W.T + bias, or with ``transpose`` x2 @ W (``plan`` then W.T's), by one
    ``_kronsum_kernel`` launch on the cores merged at ``plan.cut`` (plain cores; merged in fp32, in
    x's dtype, cached per parameter version: W.T's halves are W's read transposed); x2 ``(M, I)``."""
    a, b = _halves(cores, plan.cut, x2.dtype)
    if transpose:
        a, b = a.transpose(1, 2), b.transpose(1, 2)
    m = x2.shape[0]
    r, m1, n1, m2, n2 = plan.sizes
    y = torch.empty(m, m1 * m2, device=x2.device, dtype=x2.dtype)
    if m > 0:
        m1p, n1p, m2p, n2p = plan.padded
        _kronsum_kernel[lambda meta: (cdiv(m, meta["BM"]),)](
            x2, a, b, contiguous(bias) if bias is not None else y, y,
            m, r, m1, n1, m2, n2, m_bucket(m), x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
            a.stride(1), a.stride(2), a.stride(3), b.stride(0), b.stride(1), b.stride(2),
            HAS_BIAS=bias is not None, M1P=m1p, N1P=n1p, M2P=m2p, N2P=n2p, PRECISION=dot_precision(x2.dtype),
        )
    return y


def _halves(cores: list[Core], cut: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged halves A ``(1, O_a, I_a, R)`` and B ``(R, O_b, I_b, 1)`` of plain cores cut after
    core ``cut``, merged in ``dtype`` (fp32 or bf16: each merge's GEMM accumulates in fp32 and rounds
    once, so a half of two cores is the fp32 product rounded), core-sized, every call
    (``cost.merge_ops``)."""
    return (ref.merge_cores([cast(k.t, dtype) for k in cores[:cut]]),
            ref.merge_cores([cast(k.t, dtype) for k in cores[cut:]]))


def kronsum_grad(dy2: torch.Tensor, x2: torch.Tensor, cores: list[Core], plan: cost.KronsumPlan
                 ) -> list[torch.Tensor]:
    """``[dG_k]`` (fp32, ``(r0, O, I, r1)``) of sum(dy2 * (x2 @ W.T)) for plain cores: the merged
    halves' gradients by one ``_kronsum_grad_kernel`` launch (``cost.kronsum_grad_splits`` slots of
    partials, summed by one more), then each core's on the host (``ref.merge_cores_grad``,
    core-sized). x2 ``(M, I)``, dy2 ``(M, O)``, M > 0."""
    a, b = _halves(cores, plan.cut, x2.dtype)
    m = x2.shape[0]
    r, m1, n1, m2, n2 = plan.sizes
    m1p, n1p, m2p, n2p = plan.padded
    splits = cost.kronsum_grad_splits(plan, m, GRAD_PROGRAMS)
    slots = SplitSlots(_kronsum_grad_kernel, lambda meta: splits, splits)
    part = slots.empty(r, m1 * n1 + m2 * n2, device=x2.device)
    _kronsum_grad_kernel[lambda meta: (slots(meta) * r,)](
        x2, dy2, a, b, part,
        m, r, m1, n1, m2, n2, m_bucket(m), splits, x2.stride(0), x2.stride(1), dy2.stride(0), dy2.stride(1),
        a.stride(1), a.stride(2), a.stride(3), b.stride(0), b.stride(1), b.stride(2),
        M1P=m1p, N1P=n1p, M2P=m2p, N2P=n2p, PRECISION=dot_precision(x2.dtype),
    )
    total = slots.sum(part)  # (R, M1 N1 + M2 N2)
    da = total[:, :m1 * n1].view(r, m1, n1).permute(1, 2, 0).unsqueeze(0)  # A's (1, O_a, I_a, R)
    db = total[:, m1 * n1:].view(r, m2, n2, 1)
    c = plan.cut
    return ref.merge_cores_grad([k.t for k in cores[:c]], da) + ref.merge_cores_grad([k.t for k in cores[c:]], db)


def steps_linear(x2: torch.Tensor, cores: list[Core], bias: torch.Tensor | None) -> torch.Tensor:
    """y = x2 @ W.T + bias by d step launches; x2 ``(M, I)`` -> ``(M, O)``."""
    m = x2.shape[0]
    state = State(x2, x2.stride(0), x2.stride(1))  # step 1 batches over rows only: any strides
    o_done = 1
    for k, core in enumerate(cores):
        c = math.prod(g.i for g in cores[k + 1:])
        last = k == len(cores) - 1
        out = _step(state, Step(core, m * o_done, c, x2.dtype), last, bias if last else None)
        state = State(out, core.r1 * c)  # next step's batch (row, O_<=k) spans r_k I_>k elements
        o_done *= core.o
    return state.t.view(m, o_done)


def contract_grad(dy2: torch.Tensor, x2: torch.Tensor, cores: list[Core], need_dx: bool, path: BackwardPath,
                  dtype: torch.dtype = torch.float32
                  ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """(d(core) in the ``(r0, O, I, r1)`` layout for every core, dx ``(M, I)`` or None) by the
    contract path ``_backward_path`` found: the Kronecker-sum gradient kernel and dx by the
    Kronecker-sum kernel on W.T's halves (fp32 core gradients), the gradient chain kernel and a
    chain launch on W.T's cores for dx (core gradients summed into ``dtype``), or ``steps_grad`` (fp32)."""
    if path.kind == "kronsum":
        grads = kronsum_grad(dy2, x2, cores, path.grad)
        return grads, kronsum_linear(dy2, cores, None, path.dx, True) if need_dx else None  # transposed: W.T
    if path.kind == "steps":
        return steps_grad(dy2, x2, cores, need_dx)
    # W.T's cores are W's read with the o and i strides swapped: the dx launch, from W.T's layout,
    # holds those strides, so W's own tensors serve as its pointers (no transposed views per call)
    dx = chain_linear(dy2, cores, None, path.dx) if need_dx else None
    return chain_grad(dy2, x2, cores, dtype, path.grad), dx


def steps_grad(dy2: torch.Tensor, x2: torch.Tensor, cores: list[Core], need_dx: bool
               ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """``contract_grad`` by step launches: forward states U_1..U_d recomputed, then right to left
    dA_k = sum V_{k+1} U_k.T and V_k = A_k.T V_{k+1}; V_1 is dx."""
    m, d = x2.shape[0], len(cores)
    steps = [Step(core, m * math.prod(g.o for g in cores[:k]), math.prod(g.i for g in cores[k + 1:]), x2.dtype)
             for k, core in enumerate(cores)]
    states = [State(x2, x2.stride(0), x2.stride(1))]
    for step in steps[:-1]:
        states.append(State(_step(states[-1], step), step.core.r1 * step.cols))
    if dy2.stride(0) != dy2.shape[1] * dy2.stride(1):  # V_d batches over (row, O_<d): rows must be dense
        dy2 = dy2.contiguous()
    v = State(dy2, cores[-1].o * dy2.stride(1), dy2.stride(1))
    grads: list[torch.Tensor] = [None] * d  # type: ignore[list-item]
    dx = None
    for k in range(d - 1, -1, -1):
        core, step = cores[k], steps[k]
        da = _grad_step(v, states[k], step)
        grads[k] = da.view(core.o, core.r1, core.r0, core.i).permute(2, 0, 3, 1).contiguous()
        if k > 0:  # V_k, read by core k-1: its batch (row, O_<k-1) spans O_k-1 r_k-1 I_>=k elements
            v = State(_step(v, step._replace(transposed=True)), cores[k - 1].o * step.shape[1] * step.cols)
        elif need_dx:
            dx = _step(v, step._replace(transposed=True), last=True).view(m, -1)
    return grads, dx


# ----------------------------------------------------------------------------------------------
# Strategy "rebuild"
# ----------------------------------------------------------------------------------------------
def _head_and_last(cores: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(L ``(O_h, I_h, r)``, T ``(r, O_d, I_d)``), contiguous in ``cost.state_dtype(dtype)`` for
    ``dtype`` inputs; L accumulated in fp32."""
    state = cost.state_dtype(dtype)
    return ref.head_product(cores).to(state).contiguous(), cores[-1][..., 0].to(state).contiguous()


def _rebuild(x2: torch.Tensor, head: torch.Tensor, last: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x2 @ W.T + bias, W from its head product ``head`` ``(O_h, I_h, r)`` and last core ``last``
    ``(r, O_d, I_d)`` (both contiguous); x2 ``(M, I)``: one ``_rebuild_kernel`` launch up to
    ``cost.REBUILD_FUSED_MAX_ROWS`` rows, else in slices of W (``_rebuild_sliced``)."""
    r, o_d, i_d = last.shape
    o_h, i_h = head.shape[:2]
    m = x2.shape[0]
    y = torch.empty(m, o_h * o_d, device=x2.device, dtype=x2.dtype)
    if m == 0:
        return y
    if m > cost.REBUILD_FUSED_MAX_ROWS:
        _rebuild_sliced(x2, head, last, bias, y)
        return y
    tl_ = rebuild_tiles(o_d, i_d, r)
    grid = lambda meta: (cdiv(m, meta["BM"]) * cdiv(o_h, tl_.po),)  # noqa: E731
    _rebuild_kernel[grid](
        x2, head, last, contiguous(bias) if bias is not None else y, y,
        m, o_h, i_h, o_d, i_d, r, m_bucket(m),
        x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, PRECISION=state_args(x2.dtype)["PRECISION"],
        PO=tl_.po, PI=tl_.pi, ODP=tl_.odp, IDP=tl_.idp, RP=tl_.rp,
    )
    return y


def _rebuild_sliced(x2: torch.Tensor, head: torch.Tensor, last: torch.Tensor, bias: torch.Tensor | None,
                    y: torch.Tensor) -> None:
    """y ``(M, O)`` = x2 ``(M, I)`` @ W.T + bias with W never whole (``sliced_gemm``): per slice of
    ``cost.rebuild_slice_heads`` head indices (their O_d rows of W each), ``_rebuild_slice_kernel``
    writes the slice's rows of W into one reused workspace (at most ``cost.REBUILD_SLICE_BYTES``)
    in x's dtype, with the fused kernel's values and rounding; then cuBLAS multiplies.
    FLOPs 2 M O I (cuBLAS) + 2 r O I (generation, once: r / M of the GEMM's). Bytes
    elt (M I slices + M O) (+ 2 elt M O with a bias) + |L| once, plus elt O I written and read
    through L2."""
    r, o_d, i_d = last.shape
    o_h, i_h = head.shape[:2]
    heads = cost.rebuild_slice_heads(o_h, o_d, i_h * i_d, x2.element_size())
    ws = torch.empty(heads * o_d, i_h * i_d, device=x2.device, dtype=x2.dtype)
    tl_ = rebuild_tiles(o_d, i_d, r)

    def write(c0: int, c: int) -> torch.Tensor:  # slices hold whole heads: c0 and c are multiples of O_d
        h0, h = c0 // o_d, c // o_d
        _rebuild_slice_kernel[(cdiv(h, tl_.po), cdiv(i_h, tl_.pi))](
            head, last, ws, h0, h, i_h, o_d, i_d, r, ws.stride(0),
            PRECISION=state_args(x2.dtype)["PRECISION"], PO=tl_.po, PI=tl_.pi, ODP=tl_.odp, IDP=tl_.idp, RP=tl_.rp,
        )
        return ws[:c]

    sliced_gemm(x2, y, bias, heads * o_d, write)


def rebuild_linear(x2: torch.Tensor, cores: list[torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
    """y = x2 @ W.T + bias with W tiles rebuilt on chip; x2 ``(M, I)``, cores ``(r0, O, I, r1)``."""
    return _rebuild(x2, *_head_and_last(cores, x2.dtype), bias)


def rebuild_grad(dy2: torch.Tensor, x2: torch.Tensor, cores: list[torch.Tensor], need_dx: bool
                 ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """(d(core) (fp32) for every core, dx ``(M, I)`` or None): dL and dT (on chip up to
    ``cost.REBUILD_FUSED_MAX_ROWS`` rows, ``_rebuild_grad_fused``, else in slices of G,
    ``_rebuild_grad_sliced``), then dL -> d(G_1..G_{d-1}) on the host; dx by the product with
    W.T (``_rebuild``), whose head product and last core are W's transposed (two copies, no second
    head product)."""
    head, last = _head_and_last(cores, x2.dtype)
    grad = _rebuild_grad_sliced if x2.shape[0] > cost.REBUILD_FUSED_MAX_ROWS else _rebuild_grad_fused
    d_head, d_last = grad(dy2, x2, head, last)
    grads = ref.head_product_grad([c.float() for c in cores], d_head) + [d_last[..., None]]
    if not need_dx:
        return grads, None
    return grads, _rebuild(dy2, head.transpose(0, 1).contiguous(), last.transpose(1, 2).contiguous(), None)


def _rebuild_grad_fused(dy2: torch.Tensor, x2: torch.Tensor, head: torch.Tensor, last: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL ``(O_h, I_h, r)``, dT ``(r, O_d, I_d)``), fp32, of sum(G * W), G = dy2.T @ x2, by one
    ``_rebuild_grad_kernel`` launch (G tile by tile on chip) and the sum of its padded dT partials,
    cut to ``(r, O_d, I_d)`` in the same launch (``slot_sum``)."""
    r, o_d, i_d = last.shape
    o_h, i_h = head.shape[:2]
    tl_ = rebuild_tiles(o_d, i_d, r)
    k_blocks = cdiv(i_h, tl_.pi)
    grid = (cdiv(o_h, tl_.po), min(k_blocks, max(1, (2 if INTERPRET else 256) // cdiv(o_h, tl_.po))))
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
    return d_head, slot_sum(d_last, grid[0] * grid[1], (r, o_d, i_d), (tl_.rp, tl_.odp, tl_.idp))


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in fp32: cuBLAS's fp32 output of 16-bit inputs on CUDA (as
    a ``tl.dot`` accumulator, never rounded to 16 bits); the CPU, which has no such GEMM, upcasts."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _rebuild_grad_sliced(dy2: torch.Tensor, x2: torch.Tensor, head: torch.Tensor, last: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``_rebuild_grad_fused``'s (dL, dT) with G formed per slice of ``cost.rebuild_slice_heads``
    head indices (their O_d rows of G, fp32, at most ``cost.REBUILD_SLICE_BYTES``) by one cuBLAS
    GEMM accumulating and stored in fp32 (fp32 inputs: TF32 exactly when torch allows it, as
    ``dot_precision``), permuted to G' ``(h I_h, O_d I_d)`` (a second buffer of that size) and reduced
    by fp32 matmuls: dL[slice] = G' @ T.T (each dL row belongs to one slice), dT += L[slice].T @ G'.
    FLOPs 2 M O I (cuBLAS) + 4 r O I. Bytes elt M (O + I slices) + 4 (|L| + |dL|), G' through L2."""
    r, o_d, i_d = last.shape
    o_h, i_h = head.shape[:2]
    dy2, x2 = (t if 1 in t.stride() else t.contiguous() for t in (dy2, x2))  # else cuBLAS copies per slice
    heads = cost.rebuild_slice_heads(o_h, o_d, i_h * i_d, 4)
    t2, lf = last.float().view(r, o_d * i_d), head.float()
    d_head = torch.empty(o_h, i_h, r, device=x2.device, dtype=torch.float32)
    d_last = torch.zeros(r, o_d * i_d, device=x2.device, dtype=torch.float32)
    for h0 in range(0, o_h, heads):
        h = min(heads, o_h - h0)
        g = _mm_fp32(dy2[:, h0 * o_d:(h0 + h) * o_d].T, x2)
        g = g.view(h, o_d, i_h, i_d).transpose(1, 2).reshape(h * i_h, o_d * i_d)
        torch.mm(g, t2.T, out=d_head[h0:h0 + h].view(h * i_h, r))
        d_last.addmm_(lf[h0:h0 + h].view(h * i_h, r).T, g)
    return d_head, d_last.view(r, o_d, i_d)


def dense_cores(cores: list[Core]) -> list[torch.Tensor]:
    """The cores ``(r0, O, I, r1)`` rebuild takes: plain cores as they are, spline cores formed from
    their control points (fp32, core-sized, every call)."""
    return [c.dense() for c in cores]


# ----------------------------------------------------------------------------------------------
# Launchers used by the ops
# ----------------------------------------------------------------------------------------------
def _strategy(strategy: str, m: int, modes: tuple, dtype: torch.dtype, backward: bool = False) -> str:
    return cost.resolve(strategy, m, *modes, dtype.itemsize, backward, state_elt(dtype))


def _kronsum_dtype(dtype: torch.dtype) -> bool:
    """Whether the Kronecker-sum kernel takes ``dtype`` inputs: where the states are kept in it (not
    fp16, whose merged cores and intermediates could pass 65504; ``cost.kronsum_cost`` agrees)."""
    return cost.state_dtype(dtype) == dtype


# the Kronecker-sum kernel (forward, rebuild's dx) wherever it fits (True) or never (False), for tests;
# None: where the cost model prefers it
KRONSUM: bool | None = None


@functools.lru_cache(maxsize=1024)
def _forward_path(layout: tuple, m: int, dtype: torch.dtype, has_bias: bool, strategy: str, keys: tuple,
                  forced: int | None, limit: int, kronsum: bool | None) -> str | ChainLaunch | cost.KronsumPlan:
    """How the forward runs on ``m`` rows of cores laid out as ``layout`` (``_chain_layout``):
    "rebuild", the Kronecker-sum kernel's plan (plain cores, ``kronsum`` or else
    ``cost.contract_path``), "steps" or the chain kernel's ``ChainLaunch``. Cached, with everything
    it reads that tests change (the chain configs' ``keys``, the ``CHAIN_SPLIT`` count ``forced``,
    ``limit``, ``cost.CHAIN_MAX_TILE``, and ``KRONSUM``) in the key: a layer asks on every call."""
    meta = _chain_meta(layout)
    modes = meta["IN"], meta["OUT"], meta["RANK"]
    if _strategy(strategy, m, modes, dtype) == "rebuild":
        return "rebuild"
    plan = None if meta["SPLINE"] or not _kronsum_dtype(dtype) else cost.kronsum_plan(*modes)
    if plan is not None and (kronsum if kronsum is not None else
                             cost.contract_path(m, *modes, dtype.itemsize, state_elt(dtype)) == "kronsum"):
        return plan
    if not chain_fits(modes):
        return "steps"
    return _chain_launch(layout, m, dtype, has_bias, keys, forced)


KEPT_PATHS = 64  # row counts whose path a layer keeps (``_forward_plan``, ``_backward_plan``); more clear the table


class _Plans:
    """What ``_forward_plan`` and ``_backward_plan`` keep per structure of the cores (``plans_of``):
    the checked cores' ``_chain_layout`` keys (W's, and for the backward W.T's) and the path per
    row count (the backward's per row count and dx)."""

    __slots__ = ("layouts", "paths")

    def __init__(self, *layouts: tuple) -> None:
        self.layouts, self.paths = layouts, {}

    def path(self, key: Hashable, find: Callable[[], object]):
        """The path kept for ``key``, else ``find()``'s, kept (at most ``KEPT_PATHS``)."""
        path = self.paths.get(key)
        if path is None:
            if len(self.paths) >= KEPT_PATHS:
                self.paths.clear()
            path = self.paths[key] = find()
        return path


PLANS_SIZE = 256  # structures whose plans are kept at most (least recently used go first)
_plans: OrderedDict[tuple, _Plans] = OrderedDict()


def plans_of(kind: tuple, cores: list[Core], build: Callable[[], _Plans]) -> _Plans:
    """The :class:`_Plans` for ``kind`` (the other inputs' dtypes and devices, the settings) and
    cores of this structure (each one's shape, strides, dtype and device), ``build()`` (which checks
    the inputs) on the first call with them. A plan depends on the structure only, never on the
    values, so whatever updates the parameters (an optimizer, fused or not, a write through
    ``.data``) it stays valid; nothing derived from the values is kept between calls."""
    key = (kind, *[(c.t.shape, c.t.stride(), c.t.dtype, c.t.device) for c in cores])
    plans = _plans.get(key)
    if plans is None:
        plans = _plans[key] = build()
        if len(_plans) > PLANS_SIZE:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    return plans


def _forward_plan(x2: torch.Tensor, cores: list[Core], bias: torch.Tensor | None, strategy: str
                  ) -> str | ChainLaunch | cost.KronsumPlan:
    """``_forward_path``'s path for x2's row count for ``x2 @ W.T + bias``, with every input checked
    (``check_inputs``) when the plans of the cores' structure, the inputs' dtypes and devices and
    the module settings tests change are built (``plans_of``): a layer's call pays one lookup."""
    def build() -> _Plans:
        check_inputs(x2, *(c.t for c in cores), bias)
        return _Plans(_chain_layout(cores))

    keys = config_keys(_chain_kernel)
    kind = ("forward", tuple((c.o, c.i, c.spline) for c in cores), x2.device, x2.dtype,
            None if bias is None else (bias.device, bias.dtype), strategy, keys, CHAIN_SPLIT, cost.CHAIN_MAX_TILE,
            KRONSUM)
    plans = plans_of(kind, cores, build)
    m = x2.shape[0]
    return plans.path(m, lambda: _forward_path(plans.layouts[0], m, x2.dtype, bias is not None, strategy, keys,
                                               CHAIN_SPLIT, cost.CHAIN_MAX_TILE, KRONSUM))


def cores_linear(x: torch.Tensor, cores: list[Core], bias: torch.Tensor | None, strategy: str) -> torch.Tensor:
    """y = x @ W.T + bias for x ``(*, I)`` -> ``(*, O)`` with the strategy ``strategy`` resolves to;
    plain or spline cores (rebuild forms the core-sized spline cores first)."""
    x2 = flatten(x)
    path = _forward_plan(x2, cores, bias, strategy)  # checks the inputs
    if path == "rebuild":
        y = rebuild_linear(x2, dense_cores(cores), bias)
    else:
        y = contract_linear(x2, cores, bias, path)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[1])  # no view of y to re-label (ops' owned)


@functools.lru_cache(maxsize=1024)
def _dx_kronsum(m: int, modes: tuple, dtype: torch.dtype, kronsum: bool | None) -> cost.KronsumPlan | None:
    """The Kronecker-sum plan of W.T for rebuild's dx on ``m`` rows (``KRONSUM`` as ``kronsum``, else
    ``cost.rebuild_dx_cost``'s choice), or None: the product with W.T."""
    ins, outs, ranks = modes
    plan = cost.kronsum_plan(outs, ins, ranks) if _kronsum_dtype(dtype) else None
    use = kronsum if kronsum is not None else (
        cost.rebuild_dx_cost(m, ins, outs, ranks, dtype.itemsize, state_elt(dtype))[0] == "kronsum")
    return plan if use else None


class BackwardPath(NamedTuple):
    """How the core gradients and dx run on one row count (``_backward_path``):
    "rebuild" (``dx``: the Kronecker-sum plan of W.T for dx, or None: the product with W.T),
    "kronsum" (``grad`` W's and ``dx`` W.T's Kronecker-sum plans), "chain" (``grad`` the
    ``GradLaunch``, ``dx`` the chain launch on W.T's cores or None without dx) or "steps"."""

    kind: str
    grad: GradLaunch | cost.KronsumPlan | None = None
    dx: ChainLaunch | cost.KronsumPlan | None = None


@functools.lru_cache(maxsize=1024)
def _backward_path(layout: tuple, t_layout: tuple, m: int, dtype: torch.dtype, strategy: str, need_dx: bool,
                   keys: tuple, grad_keys: tuple, forced: int | None, limit: int, kronsum: bool | None,
                   programs: int, budget: int) -> BackwardPath:
    """How the backward runs on ``m`` rows of cores laid out as ``layout`` (W.T's as ``t_layout``,
    ``_chain_layout``). Rebuild where ``strategy`` resolves to it; else the Kronecker-sum kernels
    where the cost model prefers them (``_grad_kronsum``; plain cores), the chain kernels where
    theirs fit, else the step kernels. Cached, with everything it reads that tests change (the
    chain configs' ``keys`` and ``grad_keys``, the ``CHAIN_SPLIT`` count ``forced``, ``limit``,
    ``cost.CHAIN_MAX_TILE``, ``KRONSUM``, ``GRAD_PROGRAMS`` and ``cost.CHAIN_GRAD_PART_BYTES``)
    in the key."""
    meta = _chain_meta(layout)
    modes = ins, outs, ranks = meta["IN"], meta["OUT"], meta["RANK"]
    if _strategy(strategy, m, modes, dtype, backward=True) == "rebuild":
        return BackwardPath("rebuild", dx=_dx_kronsum(m, modes, dtype, kronsum) if need_dx and not meta["SPLINE"] else None)
    if (kron := None if meta["SPLINE"] else _grad_kronsum(m, modes, dtype, kronsum)) is not None:
        return BackwardPath("kronsum", *kron)
    if chain_fits(modes, grad=True, elt=state_elt(dtype)) and (not need_dx or chain_fits((outs, ins, ranks))):
        return BackwardPath("chain", _grad_launch(layout, m, dtype, grad_keys, programs, budget),
                            _chain_launch(t_layout, m, dtype, False, keys, forced) if need_dx else None)
    return BackwardPath("steps")


@functools.lru_cache(maxsize=1024)
def _grad_kronsum(m: int, modes: tuple, dtype: torch.dtype, kronsum: bool | None
                  ) -> tuple[cost.KronsumPlan, cost.KronsumPlan] | None:
    """The Kronecker-sum plans of W (core gradients) and W.T (dx) for the contract backward on ``m``
    rows of plain cores (``KRONSUM`` as ``kronsum``, else ``cost.contract_grad_path``'s choice;
    both must fit), or None: the chain or step kernels."""
    ins, outs, ranks = modes
    plans = (cost.kronsum_plan(ins, outs, ranks), cost.kronsum_plan(outs, ins, ranks))
    if not _kronsum_dtype(dtype) or None in plans:
        return None
    use = kronsum if kronsum is not None else (
        cost.contract_grad_path(m, ins, outs, ranks, dtype.itemsize, state_elt(dtype)) == "kronsum")
    return plans if use else None


def _backward_plan(dy2: torch.Tensor, x2: torch.Tensor, cores: list[Core], strategy: str, need_dx: bool
                   ) -> BackwardPath:
    """``_backward_path``'s path for x2's row count, with every input checked (``check_inputs``)
    when the plans are built (``plans_of``), as ``_forward_plan``'s."""
    def build() -> _Plans:
        check_inputs(dy2, x2, *(c.t for c in cores))
        return _Plans(_chain_layout(cores), _chain_layout([c.transposed() for c in cores]))

    keys, grad_keys = config_keys(_chain_kernel), config_keys(_chain_grad_kernel)
    settings = (strategy, keys, grad_keys, CHAIN_SPLIT, cost.CHAIN_MAX_TILE, KRONSUM, GRAD_PROGRAMS,
                cost.CHAIN_GRAD_PART_BYTES)
    kind = ("backward", tuple((c.o, c.i, c.spline) for c in cores), dy2.device, dy2.dtype, x2.device, x2.dtype,
            settings)
    plans = plans_of(kind, cores, build)
    m = x2.shape[0]
    return plans.path((m, need_dx), lambda: _backward_path(*plans.layouts, m, dy2.dtype, strategy, need_dx,
                                                           *settings[1:]))


def cores_grad(dy: torch.Tensor, x: torch.Tensor, cores: list[Core], strategy: str, need_dx: bool,
               dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """(``[dG_1 .. dG_d]`` in the ``(r0, O, I, r1)`` layout and in ``dtype``, dx in x's shape and
    dtype or None) of sum(dy * (x @ W.T)), accumulated in fp32: the chain kernel's slot sums write
    ``dtype``, the other paths' fp32 gradients are cast.

    rebuild: dL/dT from ``_rebuild_grad_kernel``; dx by ``_rebuild_kernel`` on W.T (``rebuild_grad``),
    or by the Kronecker-sum kernel on W's merged halves where the cost model prefers it
    (``_dx_kronsum``; plain cores). contract: ``contract_grad``.
    """
    dy2, x2 = flatten(dy), flatten(x)
    m = dy2.shape[0]
    if m == 0:
        check_inputs(dy, x, *(c.t for c in cores))
        shapes = [(c.r0, c.o, c.i, c.r1) for c in cores]
        return [torch.zeros(s, device=dy.device, dtype=dtype) for s in shapes], x.new_zeros(x.shape) if need_dx else None
    path = _backward_plan(dy2, x2, cores, strategy, need_dx)  # checks the inputs
    if path.kind == "rebuild":
        grads, dx = rebuild_grad(dy2, x2, dense_cores(cores), need_dx and path.dx is None)
        if path.dx is not None:
            dx = kronsum_linear(dy2, cores, None, path.dx, True)  # transposed: W.T
    else:
        grads, dx = contract_grad(dy2, x2, cores, need_dx, path, dtype)
    grads = [cast(g, dtype) for g in grads]
    return grads, None if dx is None else cast(dx if x.dim() == 2 else dx.reshape(x.shape), x.dtype)


def plain_cores(cores: list[torch.Tensor]) -> list[Core]:
    """Stored cores ``(r0, O_k, I_k, r1)`` (any strides) as the launchers take them."""
    return [Core(c, c.shape[1], c.shape[2]) for c in cores]


def tt_linear(x: torch.Tensor, cores: list[torch.Tensor], bias: torch.Tensor | None, strategy: str) -> torch.Tensor:
    """y = x @ W.T + bias for x ``(*, I)`` and cores ``(r0, O_k, I_k, r1)`` (any strides) -> ``(*, O)``."""
    return cores_linear(x, plain_cores(cores), bias, strategy)


def tt_grad(dy: torch.Tensor, x: torch.Tensor, cores: list[torch.Tensor], strategy: str, need_dx: bool,
            dtype: torch.dtype) -> list[torch.Tensor]:
    """``[dG_1 .. dG_d]`` (in ``dtype``) of sum(dy * (x @ W.T)), then dx = dy @ W if ``need_dx``."""
    grads, dx = cores_grad(dy, x, plain_cores(cores), strategy, need_dx, dtype)
    # contiguous, as the fake implementation promises (torch.compile checks strides)
    return [g.contiguous() for g in grads] + ([dx] if need_dx else [])