"""TTLinear / SplineTTLinear benchmarks: every TT kernel strategy, fwd and fwd+bwd, against dense
F.linear and (TTLinear) tltorch's FactorizedLinear(factorization="blocktt") on the same device.

FLOP and byte counts come from ``tspline_kernels/tt/cost.py`` (the kernel docstrings' counts) for
the strategy the layer actually runs. On CPU every layer runs the pure-PyTorch reference, so only
"auto" rows are timed there.
"""

from __future__ import annotations

import itertools

import torch

from tspline_kernels.reference import tt as tt_ref
from tspline_kernels.spline_tt import SplineTTLinear
from tspline_kernels.tt import TTLinear
from tspline_kernels.tt import cost

from .harness import Case, find, layer_case, module_call, speedup, target

N = 4096
CONFIGS = {  # name -> (modes of both sides, rank, spline grid per core)
    "16x16x16-r16": ((16, 16, 16), 16, (8, 8)),
    "8x8x8x8-r8": ((8, 8, 8, 8), 8, (4, 4)),
}


def make(kernel: str, config: str, strategy: str):
    modes, rank, grid = CONFIGS[config]
    if kernel == "tt":
        return TTLinear(modes, modes, rank, strategy=strategy)
    return SplineTTLinear(modes, modes, rank, grid, strategy=strategy)


def costs(layer, m: int, dtype: torch.dtype, mode: str, device: str) -> tuple[float, float, str]:
    """(FLOPs, bytes, strategies run: "forward" or "forward/backward") of one call; the reference on
    CPU counts as the step kernels ("contract")."""
    ins, outs, ranks = layer.in_modes, layer.out_modes, layer.ranks
    elt = torch.finfo(dtype).bits // 8
    if device == "cuda":
        picked = layer.picked_strategy(m, dtype)
        total = cost.forward_cost(picked, m, ins, outs, ranks, elt)
    else:  # the reference keeps its states in memory, like the step kernels, on its merged modes
        outs, ins, ranks = tt_ref.merged_modes(outs, ins, ranks)
        picked, total = "contract", cost.steps_cost(m, ins, outs, ranks, elt)
    if mode != "fwd":
        back = layer.picked_strategy(m, dtype, backward=True) if device == "cuda" else "contract"
        total = total + cost.grad_cost(back, m, ins, outs, ranks, elt)
        picked = f"{picked}/{back}"
    return total.flops, total.bytes, picked


def _tltorch_call(config: str, m: int, dtype: torch.dtype, device: str, mode: str):
    import tltorch

    modes, rank, _ = CONFIGS[config]
    theirs = tltorch.FactorizedLinear(in_tensorized_features=modes, out_tensorized_features=modes,
                                      factorization="blocktt", rank=rank)
    with torch.no_grad():
        for f in theirs.weight.factors:
            f.normal_(0, 0.3)
    theirs = theirs.to(device=device, dtype=dtype)
    x = torch.randn(m, N, device=device, dtype=dtype, requires_grad=mode != "fwd")
    return module_call(theirs, x, mode)


def cases(device: str, quick: bool):
    """CUDA: 4096^2 with cores 16^3 rank 16 and 8^4 rank 8, M in {16, 8192} (+256 in full), bf16
    (+fp32, fp16 in full), strategies auto / contract / rebuild for both layers.
    CPU: the reference fallback, fp32, M in {16, 256}, "auto" only (the strategy does not apply)."""
    if device == "cuda":
        ms, dtypes = ((16, 8192), (torch.bfloat16,)) if quick else ((16, 256, 8192), (torch.float32, torch.float16, torch.bfloat16))
        strategies = ("auto", "contract", "rebuild")
    else:
        ms, dtypes, strategies = (16, 256), (torch.float32,), ("auto",)
    for kernel, config, strategy in itertools.product(("tt", "spline_tt"), CONFIGS, strategies):
        for m, dtype, mode in itertools.product(ms, dtypes, ("fwd", "fwd+bwd")):
            yield _case(kernel, config, strategy, m, dtype, device, mode)


def _case(kernel: str, config: str, strategy: str, m: int, dtype: torch.dtype, device: str, mode: str) -> Case:
    layer = make(kernel, config, strategy)
    flops, nbytes, picked = costs(layer, m, dtype, mode, device)
    shape = {"M": m, "in": N, "out": N, "config": config, "strategy": strategy, "picked": picked}
    if kernel == "spline_tt":
        shape["grid"] = CONFIGS[config][2]
    others = {}
    if kernel == "tt" and strategy == "auto":
        others["tltorch blocktt"] = _tltorch_call(config, m, dtype, device, mode)
    return layer_case(f"{kernel}.{config}", layer, m, dtype, device, mode, flops, nbytes, shape, others)


def targets(rows: list[dict], device: str, quick: bool) -> list[dict]:
    """The stated targets, evaluated on this run's rows (None where not measured here)."""
    def row(config, mode, dtype, **shape):
        return find(rows, f"tt.{config}", mode, dtype, strategy="auto", **shape)

    def ratio(config, mode, dtype, other=None, **shape):
        return speedup(rows, f"tt.{config}", mode, dtype, other, strategy="auto", **shape)

    out = []
    big, small = "16x16x16-r16", "8x8x8x8-r8"
    if device == "cuda":
        out.append(target("H100 bf16 TT 16^3 r16 fwd vs cuBLAS, 4096^2, M=16 (x faster)",
                          ratio(big, "fwd", "bfloat16", M=16), 5))
        r = row(big, "fwd", "bfloat16", M=8192)
        out.append(target("H100 bf16 TT 16^3 r16 fwd time / cuBLAS time, 4096^2, M=8192",
                          None if r is None else r["ms"] / r["baseline_ms"], 1.1, higher_is_better=False))
        for m in (16, 8192):
            out.append(target(f"H100 bf16 TT 16^3 r16 fwd+bwd vs tltorch blocktt, 4096^2, M={m} (x faster)",
                              ratio(big, "fwd+bwd", "bfloat16", "tltorch blocktt", M=m), 4))
        out.append(target("H100 bf16 TT 8^4 r8 fwd vs cuBLAS, 4096^2, M=8192 (x faster)",
                          ratio(small, "fwd", "bfloat16", M=8192), 2.5))
    else:
        for config, mode, m in itertools.product((big, small), ("fwd", "fwd+bwd"), (16, 256)):
            out.append(target(f"CPU TT reference {mode} vs tltorch blocktt, 4096^2, {config}, M={m} (tltorch ms / ours)",
                              ratio(config, mode, "float32", "tltorch blocktt", M=m), 1.0))
    return out

