"""TTLinear / SplineTTLinear benchmarks: every TT kernel strategy, fwd and fwd+bwd, against dense
F.linear and (TTLinear) tltorch's FactorizedLinear(factorization="blocktt") on the same device.

FLOP and byte counts come from ``tspline_kernels/tt/cost.py`` (the kernel docstrings' counts) for
the strategy the layer actually runs. On CPU every layer runs the pure-PyTorch reference, so only
"auto" rows are timed there.
"""

from __future__ import annotations

import itertools
import math

import torch

from tspline_kernels.reference import tt as tt_ref
from tspline_kernels.spline_tt import SplineTTLinear
from tspline_kernels.tt import TTLinear
from tspline_kernels.tt import cost

from .harness import Case, layer_case, layer_goals, module_call, peer, speedup, target

N = 4096
CONFIGS = {  # name -> (modes of both sides, rank, spline grid per core)
    "16x16x16-r16": ((16, 16, 16), 16, (8, 8)),
    "8x8x8x8-r8": ((8, 8, 8, 8), 8, (4, 4)),
}
TINY = {"16x16x16-r16": ((4, 4, 4), 4, (4, 4)), "8x8x8x8-r8": ((2, 2, 2, 2), 2, (4, 4))}  # smoke-test stand-ins


def spec(config: str, tiny: bool = False) -> tuple[tuple[int, ...], int, tuple[int, int]]:
    """(modes, rank, spline grid) of a named config, or of its tiny stand-in."""
    return (TINY if tiny else CONFIGS)[config]


def make(kernel: str, config: str, strategy: str, tiny: bool = False):
    modes, rank, grid = spec(config, tiny)
    if kernel == "tt":
        return TTLinear(modes, modes, rank, strategy=strategy)
    return SplineTTLinear(modes, modes, rank, grid, strategy=strategy)


def useful_flops(m: int, ins, outs, ranks) -> float:
    """The cheapest forward contraction of m rows with the TT matrix among: core-by-core sequential
    contraction from either end, the two merged halves at every cut (sum over the cut rank of
    A_a X B_a.T, either product first; what the Kronecker-sum kernel runs), and the dense product.
    Unpadded; the M-independent merging of cores is left out."""
    ins, outs, ranks = tuple(ins), tuple(outs), tuple(ranks)
    candidates = [cost.steps_cost(m, ins, outs, ranks).flops,
                  cost.steps_cost(m, ins[::-1], outs[::-1], ranks[::-1]).flops,
                  2.0 * m * math.prod(ins) * math.prod(outs)]
    for c in range(1, len(ins)):
        o_a, i_a, o_b, i_b = math.prod(outs[:c]), math.prod(ins[:c]), math.prod(outs[c:]), math.prod(ins[c:])
        candidates.append(2.0 * m * ranks[c] * min(i_a * i_b * o_b + o_b * i_a * o_a, o_a * i_a * i_b + o_a * i_b * o_b))
    return min(candidates)


def costs(layer, m: int, dtype: torch.dtype, mode: str, device: str) -> tuple[float, float, float, str]:
    """(useful FLOPs, executed FLOPs, bytes, strategies run: "forward" or "forward/backward") of
    one call. Useful: ``useful_flops`` (the cheapest of sequential contraction, two merged halves
    and a dense product, unpadded), 3x for fwd+bwd; executed and bytes: ``tt/cost.py``'s counts for
    the strategies picked (the reference on CPU counts as the step kernels, "contract")."""
    ins, outs, ranks = layer.in_modes, layer.out_modes, layer.ranks
    elt = torch.finfo(dtype).bits // 8
    state_elt = cost.state_dtype(dtype).itemsize  # fp16 layers keep fp32 states
    useful = useful_flops(m, ins, outs, ranks)
    if device == "cuda":
        picked = layer.picked_strategy(m, dtype)
        total = cost.forward_cost(picked, m, ins, outs, ranks, elt, state_elt)
    else:  # the reference keeps its states in memory, like the step kernels, on its merged modes
        ins, outs, ranks = tt_ref.merged_modes(ins, outs, ranks)
        picked, total = "contract", cost.steps_cost(m, ins, outs, ranks, elt, state_elt)
    if mode != "fwd":
        back = layer.picked_strategy(m, dtype, backward=True) if device == "cuda" else "contract"
        total = total + cost.grad_cost(back, m, ins, outs, ranks, elt, state_elt)
        picked = f"{picked}/{back}"
    return (useful if mode == "fwd" else 3 * useful), total.flops, total.bytes, picked


def _tltorch_call(config: str, m: int, dtype: torch.dtype, device: str, mode: str, tiny: bool = False):
    import tltorch

    modes, rank, _ = spec(config, tiny)
    theirs = tltorch.FactorizedLinear(in_tensorized_features=modes, out_tensorized_features=modes,
                                      factorization="blocktt", rank=rank)
    with torch.no_grad():
        for f in theirs.weight.factors:
            f.normal_(0, 0.3)
    theirs = theirs.to(device=device, dtype=dtype)
    x = torch.randn(m, math.prod(modes), device=device, dtype=dtype, requires_grad=mode != "fwd")
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


def goal_cases(device: str, tiny: bool = False):
    """The rows the GPU targets read ("auto" strategy, bf16): 16^3 r16 and 8^4 r8, fwd and fwd+bwd
    at M in {16, 8192} (tltorch blocktt in the same run where installed). ``tiny``: 4^3 r4 and
    2^4 r2 stand-ins, M in {16, 64}."""
    small, large = (16, 64) if tiny else (16, 8192)
    for config, mode, m in itertools.product(("16x16x16-r16", "8x8x8x8-r8"), ("fwd", "fwd+bwd"), (small, large)):
        yield _case("tt", config, "auto", m, torch.bfloat16, device, mode, tiny)


def _case(kernel: str, config: str, strategy: str, m: int, dtype: torch.dtype, device: str, mode: str,
          tiny: bool = False) -> Case:
    layer = make(kernel, config, strategy, tiny)
    useful, executed, nbytes, picked = costs(layer, m, dtype, mode, device)
    n = layer.in_features
    shape = {"M": m, "in": n, "out": layer.out_features, "config": config, "strategy": strategy, "picked": picked}
    if tiny:
        shape["modes"] = list(spec(config, tiny)[0])
    if kernel == "spline_tt":
        shape["grid"] = spec(config, tiny)[2]
    others = {}
    if kernel == "tt" and strategy == "auto":
        others["tltorch blocktt"] = peer(_tltorch_call, config, m, dtype, device, mode, tiny)
    return layer_case(f"{kernel}.{config}", layer, m, dtype, device, mode, useful, nbytes, executed, shape, others)


# the H200 predictions (bench/NOTES.md, "Predictions", revised in "TT at M=8192: the strategies
# picked now", for 8^4 at M=8192 in "Kronecker-sum forward", its roofline fractions in "Floors
# corrected") for each layer's goals
PREDICTED = {
    "16x16x16-r16": {"fwd small": 2.3, "fwd large": 1.18, "fwd+bwd small": 0.45, "fwd+bwd large": 0.99,
                     "roofline fwd": 0.84, "roofline fwd+bwd": 0.83},
    "8x8x8x8-r8": {"fwd small": 2.3, "fwd large": 3.0, "fwd+bwd small": 0.45, "fwd+bwd large": 0.75,
                   "roofline fwd": 0.72, "roofline fwd+bwd": 0.51},
}


def targets(rows: list[dict], device: str, quick: bool) -> list[dict]:
    """The GPU goals (``layer_goals`` of 16^3 r16 and 8^4 r8 at M = 16 and 8192, and the
    fwd+bwd comparison with tltorch), or on CPU the reference against tltorch; None where not
    measured here."""
    def ratio(config, mode, dtype, other=None, **shape):
        return speedup(rows, f"tt.{config}", mode, dtype, other, strategy="auto", **{"in": N}, **shape)

    big, small = "16x16x16-r16", "8x8x8x8-r8"
    if device != "cuda" and any(r["dtype"] == "float32" for r in rows):  # a CPU run of the reference backend
        return [target(f"CPU TT reference {mode} vs tltorch blocktt, 4096^2, {config}, M={m} (tltorch ms / ours)",
                       ratio(config, mode, "float32", "tltorch blocktt", M=m), 1.0)
                for config, mode, m in itertools.product((big, small), ("fwd", "fwd+bwd"), (16, 256))]
    at = {"in": N, "strategy": "auto"}
    out = layer_goals(rows, device, f"tt.{big}", "TT 16^3 r16 4096^2", {"M": 16, **at}, {"M": 8192, **at},
                      PREDICTED[big], large_time_at_most=1.1)
    out += layer_goals(rows, device, f"tt.{small}", "TT 8^4 r8 4096^2", {"M": 16, **at}, {"M": 8192, **at},
                       PREDICTED[small], large_ratio=2.5)
    for m, guess in ((16, 1.5), (8192, 1.2)):
        measured = ratio(big, "fwd+bwd", "bfloat16", "tltorch blocktt", M=m) if device == "cuda" else None
        out.append(target(f"GPU bf16 TT 16^3 r16 fwd+bwd vs tltorch blocktt, 4096^2, M={m} (x faster)", measured, 4,
                          predicted=guess))
    return out
