"""LowRankLinear benchmarks: the fused kernels, fwd and fwd+bwd, against dense F.linear and the
unfused two-matmul path F.linear(x @ V, U, bias) (plus tensor-spline's LowRankLinear on CPU).

FLOP and byte counts follow the kernel docstrings in ``tspline_kernels/lowrank/kernels.py``.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from tspline_kernels.lowrank import LowRankLinear
from tspline_kernels.lowrank.kernels import pad_rank

from .harness import Case, Step, layer_case, layer_goals, module_call, peer, seed_gradient, speedup, target

RANK = 16
KERNEL = "lowrank"
UNFUSED = "x @ V @ U.T (unfused)"


def costs(layer: LowRankLinear, m: int, elt: int, mode: str) -> tuple[float, float, float]:
    """(useful FLOPs, executed FLOPs, bytes) of one call with the best configs (no output or batch
    splits).

    fwd: useful 2*m*r*(in + out), executed with the rank padded to RP (``pad_rank``); x read once,
    y written once, t (fp32) stored, factors and bias read once. fwd+bwd adds the dx kernel (the
    same costs on dy) and the factor-gradient kernel (x, dy, p, q read once; dU, dV, d bias
    written): 3x the FLOPs.
    """
    n_in, n_out, r = layer.in_features, layer.out_features, layer.rank
    useful, executed = 2.0 * m * r * (n_in + n_out), 2.0 * m * pad_rank(r) * (n_in + n_out)
    params = elt * (r * (n_in + n_out) + n_out)
    one_pass = elt * m * (n_in + n_out) + 4 * m * r + params
    if mode == "fwd":
        return useful, executed, one_pass
    grads = elt * m * (n_in + n_out) + 2 * 4 * m * r + 4 * (r * (n_in + n_out) + n_out)
    return 3 * useful, 3 * executed, 2 * one_pass + grads


def _unfused_call(layer: LowRankLinear, m: int, dtype: torch.dtype, device: str, mode: str):
    """The same factors as two torch matmuls: F.linear(x @ V, U, bias) (bias in the GEMM epilogue)."""
    grad = mode != "fwd"
    u, v, b = (p.detach().to(device=device, dtype=dtype).requires_grad_(grad) for p in (layer.U, layer.V, layer.bias))
    x = torch.randn(m, layer.in_features, device=device, dtype=dtype, requires_grad=grad)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return F.linear(x @ v, u, b)
        return Step(run)

    cache: dict = {}

    def step():
        y = F.linear(x @ v, u, b)
        y.backward(seed_gradient(cache, y))
    return Step(step, [x, u, v, b])


def _tensor_spline_call(n: int, m: int, mode: str, device: str):
    import tensor_spline

    theirs = tensor_spline.LowRankLinear(n, n, rank=RANK).to(device)
    x = torch.randn(m, n, device=device, requires_grad=mode != "fwd")
    return module_call(theirs, x, mode)


def cases(device: str, quick: bool):
    """CUDA: in = out in {1024, 4096, 8192}, M in {16, 256, 8192}, fp32/fp16/bf16 (quick: 4096,
    M in {16, 8192}, bf16). CPU (the reference fallback, i.e. two torch matmuls): 1024 (and 4096),
    M in {16, 256}, fp32, with tensor-spline's LowRankLinear in the same run."""
    if device == "cuda":
        sizes, ms, dtypes = (((4096,), (16, 8192), (torch.bfloat16,)) if quick
                             else ((1024, 4096, 8192), (16, 256, 8192), (torch.float32, torch.float16, torch.bfloat16)))
    else:
        sizes, ms, dtypes = ((1024,) if quick else (1024, 4096)), (16, 256), (torch.float32,)
    for n, dtype, mode, m in itertools.product(sizes, dtypes, ("fwd", "fwd+bwd"), ms):
        yield _case(n, m, dtype, device, mode)


def goal_cases(device: str, tiny: bool = False):
    """The rows the GPU targets read: bf16 4096^2, rank 16, fwd and fwd+bwd at M in {16, 8192}
    (``tiny``: 64^2, M in {16, 64})."""
    n, ms = (64, (16, 64)) if tiny else (4096, (16, 8192))
    for mode, m in itertools.product(("fwd", "fwd+bwd"), ms):
        yield _case(n, m, torch.bfloat16, device, mode)


def _case(n: int, m: int, dtype: torch.dtype, device: str, mode: str) -> Case:
    layer = LowRankLinear(n, n, RANK).to(device=device, dtype=dtype)
    useful, executed, nbytes = costs(layer, m, torch.finfo(dtype).bits // 8, mode)
    others = {UNFUSED: _unfused_call(layer, m, dtype, device, mode)}
    if device == "cpu" and dtype == torch.float32:
        others["tensor-spline"] = peer(_tensor_spline_call, n, m, mode, device)
    shape = {"M": m, "in": n, "out": n, "rank": RANK}
    return layer_case(KERNEL, layer, m, dtype, device, mode, useful, nbytes, executed, shape, others)


def targets(rows: list[dict], device: str, quick: bool) -> list[dict]:
    """The GPU goals (bf16, 4096^2, rank 16: ``layer_goals`` at M = 16 and 8192, and 1.2x the
    unfused two-matmul path at M = 8192), evaluated on this run's rows; None where not measured."""
    at = {"in": 4096, "rank": RANK}
    unfused = speedup(rows, KERNEL, "fwd", "bfloat16", UNFUSED, M=8192, **at) if device == "cuda" else None
    # predictions: bench/NOTES.md, "Predictions"
    predicted = {"fwd small": 4.0, "fwd large": 6.5, "fwd+bwd small": 0.8, "fwd+bwd large": 1.0,
                 "roofline fwd": 0.6, "roofline fwd+bwd": 0.55}
    return layer_goals(rows, device, KERNEL, "low-rank 4096^2 r16", {"M": 16, **at}, {"M": 8192, **at},
                       predicted, large_ratio=7) + [
        target("GPU bf16 low-rank 4096^2 r16 fwd vs unfused x @ V @ U.T, M=8192 (x faster)", unfused, 1.2,
               predicted=0.95)]
