"""Cubic basis taps shared by the kernels that generate spline bases on chip (the separable
spline kernels and the spline-TT cores). Reference: ``reference/spline.py``."""

from __future__ import annotations

from ._triton import tl, triton
from .reference.spline import BICUBIC, BSPLINE, KEYS_A

_KEYS_A = tl.constexpr(KEYS_A)
# ``basis_taps``' KIND: a clamped cubic B-spline, or Keys' bicubic convolution (``reference/spline.py``)
BSPLINE_KIND = tl.constexpr(BSPLINE)
BICUBIC_KIND = tl.constexpr(BICUBIC)


def axis(n: int, g: int, kind: int) -> tuple[float, float]:
    """(scale, top) of one axis: grid coordinate = index * scale, last span/grid index = top."""
    top = g - 3 if kind == BSPLINE else g - 1
    return top / max(n - 1, 1), float(top)


@triton.jit
def clamp(v, lo, hi):
    return tl.minimum(tl.maximum(v, lo), hi)


@triton.jit
def basis_taps(idx, scale, top, KIND: tl.constexpr):
    """Column of each of the four nonzero basis values at positions ``idx`` and the values.

    ``v = idx * scale`` is the position in grid units; ``top`` is the last span start
    (``G - 3``, B-spline) or the last grid index (``K - 1``, bicubic); ``KIND`` is ``BSPLINE_KIND``
    or ``BICUBIC_KIND``.
    """
    v = idx.to(tl.float32) * scale
    if KIND == BSPLINE_KIND:
        # Cox-de Boor (degree 3); in span units the clamped knots are U[j] = clamp(j - 3, 0, top).
        s = clamp(tl.floor(v), 0.0, top - 1.0)
        l1 = v - clamp(s, 0.0, top)
        l2 = v - clamp(s - 1.0, 0.0, top)
        l3 = v - clamp(s - 2.0, 0.0, top)
        r1 = clamp(s + 1.0, 0.0, top) - v
        r2 = clamp(s + 2.0, 0.0, top) - v
        r3 = clamp(s + 3.0, 0.0, top) - v
        # degree 1
        tmp = 1.0 / (r1 + l1)
        n0 = r1 * tmp
        n1 = l1 * tmp
        # degree 2
        tmp = n0 / (r1 + l2)
        n0 = r1 * tmp
        saved = l2 * tmp
        tmp = n1 / (r2 + l1)
        n1 = saved + r2 * tmp
        n2 = l1 * tmp
        # degree 3
        tmp = n0 / (r1 + l3)
        n0 = r1 * tmp
        saved = l3 * tmp
        tmp = n1 / (r2 + l2)
        n1 = saved + r2 * tmp
        saved = l2 * tmp
        tmp = n2 / (r3 + l1)
        n2 = saved + r3 * tmp
        n3 = l1 * tmp
        c0 = s.to(tl.int32)
        return c0, c0 + 1, c0 + 2, c0 + 3, n0, n1, n2, n3
    else:
        # Keys cubic convolution, taps clamped to the grid (grid_sample's border padding).
        f = tl.floor(v)
        t = v - f
        A = _KEYS_A
        u = t + 1.0
        w0 = ((A * u - 5.0 * A) * u + 8.0 * A) * u - 4.0 * A
        w1 = ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0
        u = 1.0 - t
        w2 = ((A + 2.0) * u - (A + 3.0)) * u * u + 1.0
        u = 2.0 - t
        w3 = ((A * u - 5.0 * A) * u + 8.0 * A) * u - 4.0 * A
        c0 = clamp(f - 1.0, 0.0, top).to(tl.int32)
        c1 = clamp(f, 0.0, top).to(tl.int32)
        c2 = clamp(f + 1.0, 0.0, top).to(tl.int32)
        c3 = clamp(f + 2.0, 0.0, top).to(tl.int32)
        return c0, c1, c2, c3, w0, w1, w2, w3
