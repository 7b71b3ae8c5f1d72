"""Shared Triton plumbing: interpreter set-up, autotune configs, launch helpers.

Only the ``kernels`` modules import this, and ``ops`` imports those lazily on the first
Triton launch, so importing ``tspline_kernels`` neither imports Triton nor touches the GPU.
Without CUDA the kernels are built for the Triton interpreter (``TRITON_INTERPRET=1``); the
choice is made once, here, before any ``@triton.jit`` runs.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple
from collections.abc import Callable

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

if INTERPRET and isinstance(tl.zeros, JITFunction):
    raise ImportError(
        "tspline_kernels needs the Triton interpreter here (no CUDA device), but triton was imported "
        "before TRITON_INTERPRET=1 was set. Set TRITON_INTERPRET=1 in the environment before starting Python."
    )

__all__ = ["INTERPRET", "triton", "tl", "configs", "autotune_mode", "flatten", "contiguous", "m_bucket", "cdiv",
           "next_pow2", "dot_precision", "check_inputs", "grouped_pid", "SplitSlots"]


def _patch_interpreter_bf16_dot() -> None:
    """Make the interpreter's ``tl.dot`` read bfloat16 operands as numbers.

    The interpreter stores bfloat16 as raw ``uint16`` and multiplies the bit patterns
    (triton-lang/triton#11584, unsupported upstream). Widening bf16 -> fp32 is exact and is
    what the tensor cores do before accumulating in fp32. ``tests/test_backend.py``
    checks the patched result.
    """
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    if getattr(builder.create_dot, "_tspline_bf16", False):
        return
    original = builder.create_dot

    def widen(h):
        if h.dtype.scalar == tl.bfloat16:
            bits = h.data.astype(np.uint32) << np.uint32(16)
            return interp.TensorHandle(bits.view(np.float32), tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot._tspline_bf16 = True
    builder.create_dot = create_dot


def _patch_interpreter_index() -> None:
    """Make the interpreter's scalars usable as Python ints (``range(0, K, BK)``) with NumPy >= 2.4.

    The interpreter holds a scalar as a 1-element array; Triton 3.6's ``tensor.__index__`` calls
    ``int()`` on it, which NumPy 2.4 rejects ("only 0-dimensional arrays can be converted to Python
    scalars"). Triton 3.9 squeezes the array first; this does the same on older versions.
    """
    from triton.runtime import interpreter as interp

    original = interp._patch_lang_tensor
    if getattr(original, "_tspline_index", False):
        return

    def patch_lang_tensor(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._tspline_index = True
    interp._patch_lang_tensor = patch_lang_tensor


if INTERPRET:
    _patch_interpreter_bf16_dot()
    _patch_interpreter_index()


AUTOTUNE_MODES = ("full", "quick")


def autotune_mode() -> str:
    """``TSPLINE_AUTOTUNE``: ``full`` (default, every GPU config) or ``quick`` (1-2 per kernel and
    shape bucket, for short GPU checks)."""
    mode = os.environ.get("TSPLINE_AUTOTUNE", "full")
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"TSPLINE_AUTOTUNE={mode!r}; expected one of {AUTOTUNE_MODES}")
    return mode


class Configs(list):
    """The configs an autotuner tries, with the whole GPU space kept as ``full`` (for the
    every-config check, ``bench/every_config.py``) and the quick picks as ``quick``."""

    def __init__(self, tried: list[triton.Config], full: list[triton.Config], quick: list[triton.Config]):
        super().__init__(tried)
        self.full = full
        self.quick = quick


def configs(space: list[dict], *, interpret: dict, quick: list[dict], warps=(4, 8), stages=(3, 4)) -> Configs:
    """Autotune configs. The GPU space is every block-size dict in ``space`` x warps x stages; a GPU
    tries all of it (``TSPLINE_AUTOTUNE=full``) or only the ``quick`` entries (block sizes plus
    ``num_warps`` and ``num_stages``, each one of the space); the interpreter runs just ``interpret``
    (small blocks, no tuning runs). ``.full`` is the GPU space in every case."""
    full = [triton.Config(dict(s), num_warps=w, num_stages=n) for s in space for w in warps for n in stages]

    def find(q: dict) -> triton.Config:
        blocks = {k: v for k, v in q.items() if k not in ("num_warps", "num_stages")}
        for c in full:
            if (c.kwargs, c.num_warps, c.num_stages) == (blocks, q["num_warps"], q["num_stages"]):
                return c
        raise ValueError(f"quick config {q} is not in the autotune space")

    picked, mode = [find(q) for q in quick], autotune_mode()
    if INTERPRET:
        tried = [triton.Config(interpret, num_warps=1, num_stages=1)]
    else:
        tried = picked if mode == "quick" else full
    return Configs(tried, full, picked)


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for host code: ceil(a / b) of ints (``triton.cdiv`` is a constexpr function,
    ~2.5 us per call from Python, paid on every launch that calls it)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """``triton.next_power_of_2`` for host code: the smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def dot_dim(n: int) -> int:
    """A size as a ``tl.dot`` operand dimension carries it: a power of two >= 16 (zero-padded)."""
    return max(16, next_pow2(n))


def m_bucket(m: int) -> int:
    """Autotune key for a batch-like size: its power-of-two bucket, so a new M rarely re-tunes."""
    return min(next_pow2(m), 16384)


def flatten(x: torch.Tensor) -> torch.Tensor:
    """View ``(*, K)`` as ``(M, K)`` without copying when the strides allow it (2-D ``x`` as is)."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t.contiguous()`` without the dispatch when ``t`` already is."""
    return t if t.is_contiguous() else t.contiguous()


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision matching torch's matmul setting for fp32 operands."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


_KERNEL_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16))  # a hash lookup, not 3 comparisons


def check_inputs(*tensors: torch.Tensor | None) -> None:
    """Fail clearly where a Triton launch cannot work: fp64 or integer data, CPU tensors without
    the interpreter, tensors on different devices. The first must be a tensor; None (an absent
    bias) is skipped."""
    device = tensors[0].device
    for t in tensors:  # one pass, no generators: this runs on every launch
        if t is None:
            continue
        if t.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"Triton kernels take fp32, fp16 or bf16 tensors, got {t.dtype} (use the reference backend)")
        if t.device != device:
            raise ValueError(f"tensors are on different devices: {sorted({str(u.device) for u in tensors if u is not None})}")
    if device.type != "cuda" and not INTERPRET:
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before Python starts")


def sliced_gemm(a2: torch.Tensor, out2: torch.Tensor, bias: torch.Tensor | None, width: int,
                write: Callable[[int, int], torch.Tensor]) -> None:
    """out2 ``(M, n)`` = a2 ``(M, k)`` @ B + bias with B ``(k, n)`` never whole: per slice of ``width``
    output columns, ``write(j0, j)`` returns rows j0..j0+j-1 of B.T ``(j, k)`` (written into a reused,
    bounded workspace), then one cuBLAS GEMM writes columns j0..j0+j-1 of out2 in place (strided
    columns, leading dimension n: no copy). The GEMM accumulates in fp32 and rounds once (fp32
    inputs: TF32 exactly when torch's matmul setting, which ``dot_precision`` follows, allows it;
    like ``F.linear``, cuBLAS may reduce split-K partials of fp16/bf16 GEMMs in that type where
    torch allows it). With a bias, torch fills the columns with it and the GEMM adds onto them
    (beta = 1: cuBLAS's fused-bias epilogue needs a contiguous output)."""
    if 1 not in a2.stride():  # else cuBLAS would take a copy per slice
        a2 = a2.contiguous()
    bias = None if bias is None else bias.to(a2.dtype)
    n = out2.shape[1]
    for j0 in range(0, n, width):
        j = min(width, n - j0)
        bt, cols = write(j0, j), out2[:, j0:j0 + j]
        if bias is None:
            torch.mm(a2, bt.T, out=cols)
        else:
            torch.addmm(bias[j0:j0 + j], a2, bt.T, out=cols)


@triton.jit
def grouped_pid(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` on a ``num_m x num_n`` tile grid, launched in groups of
    GROUP_M row blocks so that consecutive programs share row tiles in L2 (Triton tutorial 03)."""
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % group) % size_m, (pid % group) // size_m


_BLOCK_SIZES: dict[int, tuple[list, int, list[dict]]] = {}


def _block_sizes(kernel) -> list[dict]:
    """The distinct block-size dicts of an autotuner's configs (a GPU's space repeats each for
    every warps x stages pair), cached per kernel while its config list is the same object of the
    same length (the every-config check swaps it)."""
    configs = kernel.configs
    cached = _BLOCK_SIZES.get(id(kernel))
    if cached is None or cached[0] is not configs or cached[1] != len(configs):
        distinct = {tuple(sorted(c.kwargs.items())): None for c in configs}
        cached = _BLOCK_SIZES[id(kernel)] = (configs, len(configs), [dict(k) for k in distinct])
    return cached[2]


_MOST: dict[tuple, tuple[list, int]] = {}
_MOST_SIZE = 4096


def _most(kernel, programs: Callable[[dict], int], key) -> int:
    """The largest ``programs`` over the distinct block sizes of ``kernel``'s configs, kept per
    (kernel, ``key``) while the configs are the same (``_block_sizes``' list), unless ``key`` is None."""
    sizes = _block_sizes(kernel)
    if key is None:
        return max(map(programs, sizes))
    hit = _MOST.get((id(kernel), key))
    if hit is None or hit[0] is not sizes:
        if len(_MOST) >= _MOST_SIZE:
            _MOST.clear()
        hit = _MOST[id(kernel), key] = (sizes, max(map(programs, sizes)))
    return hit[1]


class SplitSlots:
    """Partial results of an autotuned kernel whose number of programs along a split axis depends
    on its config (row block size, split count): program s writes slot s, the host sums the slots.

    Use an instance as (part of) the launch grid. Slots are allocated for the most programs any of
    the autotuner's configs launches; Triton calls the grid for every launch, the last time for
    the launch that counts (after any autotuning runs), so ``sum`` adds exactly the slots that
    launch wrote and never a stale slot left by a config tried while autotuning. Deterministic,
    no atomics. ``programs(meta)`` must be >= 1, and each of those programs must write its slot.
    """

    def __init__(self, kernel, programs: Callable[[dict], int], most: int | None = None, key=None) -> None:
        """``most``: the largest ``programs`` over the autotuner's configs, where the caller keeps
        it; else every config is asked, once per ``key`` where one is given (a hashable value that,
        with the configs, determines ``programs``: a row count, a shape), else on each construction."""
        self.programs = programs
        self.slots = _most(kernel, programs, key) if most is None else most
        self.used = 0

    def __call__(self, meta: dict) -> int:
        self.used = self.programs(meta)
        return self.used

    def empty(self, *shape: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A ``(slots, *shape)`` fp32 buffer of partials for results wanted in ``dtype``; where every
        config launches one program, the result itself: ``shape`` in ``dtype`` (the kernel's store,
        cast to the buffer's type, rounds once; :meth:`sum` returns it, launching nothing and
        indexing nothing). Only slots the launch wrote are read."""
        if self.slots == 1:
            return torch.empty(shape, device=device, dtype=dtype)
        return torch.empty(self.slots, *shape, device=device, dtype=torch.float32)

    def zeros(self, *shape: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """As :meth:`empty`, zero-filled: for kernels that leave parts of their slot unwritten."""
        if self.slots == 1:
            return torch.zeros(shape, device=device, dtype=dtype)
        return torch.zeros(self.slots, *shape, device=device, dtype=torch.float32)

    def sum(self, part: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The sum of the slots of ``part`` (an :meth:`empty` or :meth:`zeros` buffer) the last
        launch wrote, in ``dtype``: ``part`` itself where it is the one slot, written, in ``dtype``,
        else one ``_slot_sum_kernel`` launch."""
        if self.slots == 1:
            return part if self.used == 1 and part.dtype == dtype else slot_sum(part, self.used, part.shape, dtype=dtype)
        return slot_sum(part, self.used, part.shape[1:], dtype=dtype)


SLOT_SUM_BLOCK = 1024


def slot_sum(part: torch.Tensor, slots: int, shape: tuple[int, ...], padded: tuple[int, ...] | None = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``part[:slots].sum(0)`` in ``dtype``, contiguous ``shape``, by one ``_slot_sum_kernel``
    launch: ``part`` holds ``slots`` fp32 slots one after the other, each contiguous ``padded``
    (default ``shape``; at most 4 dims, each at least ``shape``'s), of which the leading ``shape``
    corner is kept (the padding cut in the same pass)."""
    return slot_sums(((0, slots, shape, padded),))(part, dtype)[0]


class SlotSums(NamedTuple):
    """One ``_slot_sum_kernel`` launch that sums regions of a flat fp32 buffer (``slot_sums``)."""

    programs: int
    regions: tuple[tuple[int, ...], ...]  # per region (first program, n, offset, slots, slot_size, d1, d2, d3, s0, s1, s2)
    shapes: tuple[tuple[int, ...], ...]

    def __call__(self, part: torch.Tensor, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """Each region's sum of ``part``'s slots in ``dtype``: separate contiguous tensors."""
        outs = [torch.empty(shape, device=part.device, dtype=dtype) for shape in self.shapes]
        if self.programs:
            _slot_sum_kernel[(self.programs,)](part, tuple(outs), self.regions, BLOCK=SLOT_SUM_BLOCK, num_warps=4)
        return outs


@functools.lru_cache(maxsize=256)
def slot_sums(regions: tuple[tuple[int, int, tuple[int, ...], tuple[int, ...] | None], ...]) -> SlotSums:
    """The launch that sums, for each ``(offset, slots, shape, padded)`` of ``regions``, the
    ``slots`` fp32 slots that follow one another from element ``offset`` of a flat buffer, each a
    contiguous ``padded`` (None: ``shape``; at most 4 dims, each at least ``shape``'s), into the
    leading ``shape`` corner (the padding cut in the same pass); a region without elements takes
    no program."""
    first, geometry = 0, []
    for offset, slots, shape, padded in regions:
        padded = shape if padded is None else padded
        d = (1,) * (4 - len(shape)) + tuple(shape)
        p = (1,) * (4 - len(padded)) + tuple(padded)
        n = math.prod(d)
        geometry.append((first, n, offset, slots, math.prod(p), d[1], d[2], d[3], p[1] * p[2] * p[3], p[2] * p[3], p[3]))
        first += cdiv(n, SLOT_SUM_BLOCK)
    return SlotSums(first, tuple(geometry), tuple(tuple(shape) for _, _, shape, _ in regions))


@triton.jit
def _slot_sum_kernel(part_ptr, outs, regions, BLOCK: tl.constexpr):
    """For each region j, ``regions[j] = (first, n, offset, slots, slot_size, d1, d2, d3, s0, s1,
    s2)``: out[a, b, c, e] = sum over s < slots of part[offset + s slot_size + (a, b, c, e)] (fp32,
    s in order: deterministic), cast to out's dtype, by programs first .. first + cdiv(n, BLOCK) - 1;
    ``outs[j]`` contiguous ``(d0, d1, d2, d3)`` (n elements), each slot strided ``(s0, s1, s2, 1)``.
    FLOPs: slots * n. Bytes: 4 * slots * n + elt * n per region."""
    pid = tl.program_id(0)
    for j in tl.static_range(len(outs)):
        first, n, offset, slots, slot_size, d1, d2, d3, s0, s1, s2 = regions[j]
        if (pid >= first) & (pid < first + tl.cdiv(n, BLOCK)):
            offs = (pid - first).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            e = offs % d3
            c = offs // d3 % d2
            b = offs // (d3 * d2) % d1
            a = offs // (d3 * d2 * d1)
            src = part_ptr + offset + a * s0 + b * s1 + c * s2 + e
            acc = tl.zeros((BLOCK,), tl.float32)
            for s in range(slots):
                acc += tl.load(src + tl.full((), s, tl.int64) * slot_size, mask=mask, other=0.0).to(tl.float32)
            tl.store(outs[j] + offs, acc.to(outs[j].dtype.element_ty), mask=mask)
