"""Core tiles shared by the TT chain and step kernels (``chain.py``, ``steps.py``): ``Core``, one
core as the launchers see it (plain, or spline control points), ``core_tile``, which loads a tile of
it or generates one from the control points, and the dtype of the kernels' intermediates."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._basis import BSPLINE_KIND, axis, basis_taps
from .._triton import dot_precision, tl, triton
from ..reference import spline_tt as spline_ref
from ..reference.spline import BSPLINE
from . import cost


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
def core_tile(core_ptr, o, b, a, i, mask_ob, mask_ai, s_a, s_o, s_i, s_b,
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
        p0, p1, p2, p3, wo0, wo1, wo2, wo3 = basis_taps(o, scale_o, top_o, BSPLINE_KIND)
        q0, q1, q2, q3, wi0, wi1, wi2, wi3 = basis_taps(i, scale_i, top_i, BSPLINE_KIND)
        tile = _taps_row(base, p0, wo0, q0, q1, q2, q3, wi0, wi1, wi2, wi3, s_o, s_i, mask)
        tile += _taps_row(base, p1, wo1, q0, q1, q2, q3, wi0, wi1, wi2, wi3, s_o, s_i, mask)
        tile += _taps_row(base, p2, wo2, q0, q1, q2, q3, wi0, wi1, wi2, wi3, s_o, s_i, mask)
        tile += _taps_row(base, p3, wo3, q0, q1, q2, q3, wi0, wi1, wi2, wi3, s_o, s_i, mask)
        return tile
    else:
        return tl.load(base + o[:, None] * s_o + i[None, :] * s_i, mask=mask, other=0.0)



class Core(NamedTuple):
    """One core as the step kernel sees it: ``t`` is the core ``(r0, O, I, r1)`` (any strides), or
    with ``spline`` the control points ``(r0, Go, Gi, r1)`` of a core with mode sizes ``(o, i)``.
    Immutable (a named tuple: built for every core on every call, ~4x cheaper than a frozen dataclass)."""

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


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def state_elt(dtype: torch.dtype) -> int:
    """Bytes per element of the states for ``dtype`` inputs."""
    return cost.state_dtype(dtype).itemsize


def state_args(dtype: torch.dtype) -> dict:
    """``STATE`` (the tl dtype of the intermediates) and ``PRECISION`` of their ``tl.dot`` for
    ``dtype`` inputs: tf32 for fp16's fp32 states (see ``kernels.py``'s docstring), else ``dot_precision``."""
    state = cost.state_dtype(dtype)
    return dict(STATE=_TL_DTYPES[state], PRECISION="tf32" if state != dtype else dot_precision(dtype))


def core_modes(cores: list[Core]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(in_modes, out_modes, ranks)`` of the cores."""
    return (tuple(c.i for c in cores), tuple(c.o for c in cores),
            (cores[0].t.shape[0], *(c.t.shape[3] for c in cores)))

