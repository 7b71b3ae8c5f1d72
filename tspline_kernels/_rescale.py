"""Narrowing an fp32 intermediate to a tensor-core operand type without fp16's range limit.

A fused kernel keeps an inner product (A X for Kronecker, x V for low rank) in fp32 and casts it
to the input dtype for the next ``tl.dot``. For bf16 that cast keeps fp32's exponent range; for
fp16 it overflows to inf past 65504 (and loses its bits below 6e-5) where the reference, which
keeps intermediates in fp32, is finite and exact. ``narrow`` scales every slice that the next
dot does not contract by a power of two first, so the fp16 operand has fp16's 11-bit precision
and fp32's range: the scale is exact and the dot's fp32 result is multiplied back exactly.
"""

from __future__ import annotations

from ._triton import tl, triton


@triton.jit
def narrow(t, DTYPE: tl.constexpr, AXIS: tl.constexpr):
    """(operand, inv): fp32 ``t`` as a ``DTYPE`` tl.dot operand, and the factor that restores the
    dot's result: ``tl.dot(operand, b) * inv`` equals ``tl.dot(t, b)`` when ``AXIS`` is the axis
    the dot contracts (1 for the left operand, 0 for the right one).

    fp16: each slice of t along ``AXIS`` is scaled by s = 2^k with its largest |value| in
    [2^14, 2^15) (k from the fp32 exponent bits; zero slices get s = 2^126), and inv = 1/s with
    the other axis kept (size 1). Other types: a plain cast and inv = 1.
    """
    if DTYPE == tl.float16:
        amax = tl.max(tl.abs(t), axis=AXIS, keep_dims=True)
        exponent = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased: 127 + floor(log2 amax)
        # biased exponent of s = 2^(14 - floor(log2 amax)), capped so that 1/s stays normal
        k = tl.minimum(268 - exponent, 253)
        operand = (t * (k << 23).to(tl.float32, bitcast=True)).to(DTYPE)
        inv = ((254 - k) << 23).to(tl.float32, bitcast=True)
    else:
        operand = t.to(DTYPE)
        inv = 1.0
    return operand, inv
