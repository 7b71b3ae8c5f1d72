"""KroneckerLinear benchmarks: the fused kernels, fwd and fwd+bwd, against dense F.linear and the
peer, ``ndlinear.NdLinear`` (per-mode transposes, copies and GEMMs), on the same shapes in one run.

FLOP and byte counts follow the kernel docstrings in ``tspline_kernels/kronecker/kernels.py``.
"""

from __future__ import annotations

import itertools

import torch

from tspline_kernels._triton import dot_dim
from tspline_kernels.kronecker import KroneckerLinear

from .harness import Case, layer_case, module_call, peer, speedup, target

KERNEL = "kronecker"
PEER = "NdLinear"


def costs(layer: KroneckerLinear, m: int, elt: int, mode: str) -> tuple[float, float, float]:
    """(useful FLOPs, executed FLOPs, bytes) of one call on a two-mode layer with the best configs
    (one row block per program, every factor read once per program is left out: it stays in L2).

    fwd: 2*m*(m1*n1*n2 + m1*n2*m2) FLOPs, useful with the true mode sizes (in the cheaper of the
    two contraction orders), executed with the modes padded (``pad``); x read and y written once.
    fwd+bwd adds the dx kernel (the same products with the factors transposed, dy read and dx
    written once) and the factor-gradient kernel (4*m*(m1*n1*n2 + m1*m2*n2) FLOPs, x and dy read once).
    """
    def flops(n1: int, n2: int, m1: int, m2: int, best: bool) -> tuple[float, float, float]:
        """(fwd, dx, factor grads): the kernels' contraction order (A first), or the cheaper one."""
        order = min if best else (lambda first, _: first)
        fwd = 2.0 * m * order(m1 * n1 * n2 + m1 * n2 * m2, n1 * n2 * m2 + m1 * n1 * m2)
        dx = 2.0 * m * order(n1 * m1 * m2 + n1 * m2 * n2, m1 * m2 * n2 + n1 * m1 * n2)
        return fwd, dx, 4.0 * m * (m1 * n1 * n2 + m1 * m2 * n2)

    (n1, n2), (m1, m2) = layer.in_dims, layer.out_dims
    useful = flops(n1, n2, m1, m2, best=True)
    executed = flops(dot_dim(n1), dot_dim(n2), dot_dim(m1), dot_dim(m2), best=False)
    one_pass = elt * m * (layer.in_features + layer.out_features)
    params = elt * sum(f.numel() for f in layer.parameters())
    if mode == "fwd":
        return useful[0], executed[0], one_pass + params
    return sum(useful), sum(executed), 3 * one_pass + params + 4 * sum(f.numel() for f in layer.parameters())


def _peer_call(dims: tuple[int, int], m: int, dtype: torch.dtype, device: str, mode: str):
    """NdLinear on the same data as ``(m, *dims)``."""
    import ndlinear

    theirs = ndlinear.NdLinear(dims, dims).to(device=device, dtype=dtype)
    x = torch.randn(m, *dims, device=device, dtype=dtype, requires_grad=mode != "fwd")
    return module_call(theirs, x, mode)


def cases(device: str, quick: bool):
    """CUDA: in = out in {1024 = 32 x 32, 4096 = 64 x 64, 16384 = 128 x 128}, M in {16, 256, 8192},
    fp32/fp16/bf16 (quick: 4096, M in {16, 8192}, bf16). CPU (the reference fallback): 1024 (and
    4096), M in {16, 256}, fp32. NdLinear in the same run everywhere. fp32 128 x 128 modes exceed the
    fused kernels' on-chip limit (``max_tile``): those rows time the unfused fallback."""
    if device == "cuda":
        dims, ms, dtypes = (((64,), (16, 8192), (torch.bfloat16,)) if quick
                            else ((32, 64, 128), (16, 256, 8192), (torch.float32, torch.float16, torch.bfloat16)))
    else:
        dims, ms, dtypes = ((32,) if quick else (32, 64)), (16, 256), (torch.float32,)
    for d, dtype, mode, m in itertools.product(dims, dtypes, ("fwd", "fwd+bwd"), ms):
        yield _case((d, d), m, dtype, device, mode)


def goal_cases(device: str, tiny: bool = False):
    """The rows the GPU targets read: bf16, 4096^2 as 64 x 64, M=8192, fwd and fwd+bwd, NdLinear in
    the same run where installed (``tiny``: 8 x 8, M=32)."""
    d, m = (8, 32) if tiny else (64, 8192)
    for mode in ("fwd", "fwd+bwd"):
        yield _case((d, d), m, torch.bfloat16, device, mode)


def _case(dims: tuple[int, int], m: int, dtype: torch.dtype, device: str, mode: str) -> Case:
    layer = KroneckerLinear(dims, dims).to(device=device, dtype=dtype)
    useful, executed, nbytes = costs(layer, m, torch.finfo(dtype).bits // 8, mode)
    others = {PEER: peer(_peer_call, dims, m, dtype, device, mode)}
    shape = {"M": m, "in": layer.in_features, "out": layer.out_features, "dims": list(dims)}
    return layer_case(KERNEL, layer, m, dtype, device, mode, useful, nbytes, executed, shape, others)


def targets(rows: list[dict], device: str, quick: bool) -> list[dict]:
    """The stated targets (GPU, bf16, 4096^2 as 64 x 64 modes, M = 8192), evaluated on this run's
    rows; None where not measured here (on CPU, or when the shape was not run). Thresholds are
    estimates: the kernel moves the same bytes as dense F.linear's activations with ~32x fewer
    FLOPs, and NdLinear makes two extra copies of the activations per mode."""
    def ratio(mode, other=None, **shape):
        return speedup(rows, KERNEL, mode, "bfloat16", other, **shape) if device == "cuda" else None

    at = {"M": 8192, "in": 4096}
    # predictions: bench/NOTES.md, "Predictions"
    return [
        target("GPU bf16 Kronecker fwd vs cuBLAS, 4096^2 as 64x64, M=8192 (x faster)", ratio("fwd", **at), 3,
               predicted=6.0),
        target("GPU bf16 Kronecker fwd vs NdLinear, 4096^2 as 64x64, M=8192 (x faster)", ratio("fwd", PEER, **at), 2,
               predicted=2.5),
        target("GPU bf16 Kronecker fwd+bwd vs NdLinear, 4096^2 as 64x64, M=8192 (x faster)",
               ratio("fwd+bwd", PEER, **at), 1.5, predicted=2.0),
    ]
