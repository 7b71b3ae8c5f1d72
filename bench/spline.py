"""SplineLinear benchmarks: every spline kernel, fwd and fwd+bwd, against dense F.linear.

FLOP and byte counts follow the kernel docstrings in ``tspline_kernels/spline/kernels.py``.
"""

from __future__ import annotations

import itertools
import sys

import torch

from tspline_kernels import HierarchicalSplineLinear, SplineLinear, backend
from tspline_kernels._triton import dot_dim
from tspline_kernels.reference import spline as ref

from .harness import Case, Step, cpu_peak_mb, forward_backward, layer_case, layer_goals, module_call, peer, speedup, target

GRID = 64  # B-spline grid per axis
N_FIELD = 16  # control points of the global field bases (tensor-spline's default)
N_LOCAL = 64  # control points of the local-support variants

LAYERS = {
    "spline.bspline": lambda n: SplineLinear(n, n, grid=(GRID, GRID)),
    "spline.bicubic": lambda n: SplineLinear(n, n, basis="bicubic", n_control_points=N_FIELD),
    "spline.gaussian": lambda n: SplineLinear(n, n, basis="gaussian", n_control_points=N_FIELD),
    "spline.eisenstein": lambda n: SplineLinear(n, n, basis="eisenstein", n_control_points=N_FIELD),
    "spline.gaussian-local": lambda n: SplineLinear(n, n, basis="gaussian", n_control_points=N_LOCAL, support="local"),
    "spline.eisenstein-local": lambda n: SplineLinear(n, n, basis="eisenstein", n_control_points=N_LOCAL, support="local"),
    "spline.hierarchical": lambda n: HierarchicalSplineLinear(n, n, coarse_grid=(16, 16), fine_grid=(GRID, GRID)),
}


GEN_BM = 128  # nominal row block of the field kernels: W tiles are generated once per row block


def _separable_executed(m: int, n_in: int, n_out: int, g_out: int, g_in: int, kind: int, elt: int) -> float:
    """Tensor-core FLOPs of the separable forward's two passes, as their docstrings count them:
    input pass 2*P*m*S*chunk*W (x times each chunk's window of Bi, in P = 2 parts for 16-bit
    inputs, ``elt`` == 2), output pass 2*m*T*PW*(GIP + BN) (per output tile, the windowed middle
    then the output dot)."""
    from tspline_kernels.spline import kernels

    cpu = torch.device("cpu")
    chunk = kernels.in_chunk(m)
    bi = kernels.basis_windows(n_in, g_in, kind, chunk, torch.bfloat16 if elt == 2 else torch.float32, cpu)
    bo = kernels.basis_windows(n_out, g_out, kind, kernels.OUT_TILE, torch.float32, cpu)
    parts, slots, tiles = 2 if bi.split else 1, bi.chunks, bo.chunks
    return 2.0 * m * (parts * slots * chunk * bi.width + tiles * bo.width * (dot_dim(g_in) + kernels.OUT_TILE))


def costs(kernel: str, layer, m: int, elt: int, mode: str) -> tuple[float, float, float]:
    """(useful FLOPs, executed FLOPs, bytes) of one call.

    Useful: separable bases multiply by 4-banded basis matrices (4 taps per row), so per grid
    2*m*(4*n_in + g_in*g_out + 4*n_out); field bases do the dense matmul 2*m*n_in*n_out (generating
    W is extra work). Executed, as the kernel docstrings count it: the separable passes' windowed
    tensor-core dots (``_separable_executed``); for the field kernels the matmul plus ~6 FLOPs per
    lattice point per W entry, once per row block of ``GEN_BM`` rows on the fly and once in all
    above ``FIELD_ON_THE_FLY_MAX_ROWS`` rows (W in slices; an estimate; local support skips far
    points). Bytes: the minimal traffic of the forward, x read and y written once (a hierarchical
    layer's grids share one input pass; its residual round trip is the kernels' cost, not the
    structure's). fwd+bwd of separable bases: the forward, dx (the same work on W.T's grids) and per
    grid dC = (dy @ Bo).T @ (x @ Bi), 2*m*g_out*g_in FLOPs (dy @ Bo is dx's first stage, x @ Bi the
    forward's); bytes: the forward's, dy read once (its projection serves dx and dC) and dx written,
    plus x's projections (fp32) written by the forward and read back from ``KEEP_U_MIN_ROWS`` rows on
    (``ops.keeps_u``), x read again below. Field bases, fwd+bwd: 3x (dx and the parameter gradient
    each cost about one forward; the gradient kernel reads x and dy again)."""
    n_in, n_out = layer.in_features, layer.out_features
    act = elt * m * (n_in + n_out)
    if kernel in ("spline.bspline", "spline.bicubic", "spline.hierarchical"):
        grids = [layer.coarse_grid, layer.fine_grid] if kernel == "spline.hierarchical" else [layer._grid_control().shape]
        kind = ref.BICUBIC if kernel == "spline.bicubic" else ref.BSPLINE
        from tspline_kernels.spline import ops

        useful = executed = 0.0
        for g_out, g_in in grids:
            useful += 2 * m * (4 * n_in + g_in * g_out + 4 * n_out)
            executed += _separable_executed(m, n_in, n_out, g_out, g_in, kind, elt)
        if mode == "fwd":
            return useful, executed, act
        d_grids = sum(2.0 * m * g_out * g_in for g_out, g_in in grids)
        kept = m >= ops.KEEP_U_MIN_ROWS
        x_again = 8.0 * m * sum(g_in for _, g_in in grids) if kept else elt * m * n_in
        return 2 * useful + d_grids, 3 * executed, 2 * act + x_again
    else:
        from tspline_kernels.spline import kernels

        useful = 2.0 * m * n_in * n_out
        generations = -(-m // GEN_BM) if m <= kernels.FIELD_ON_THE_FLY_MAX_ROWS else 1
        executed = useful + 6.0 * layer.n_control_points * n_in * n_out * generations
    if mode == "fwd":
        return useful, executed, act
    return 3 * useful, 3 * executed, 3 * act


def _tensor_spline_call(basis: str, n: int, m: int, mode: str, device: str):
    import tensor_spline

    theirs = tensor_spline.SplineLinear(n, n, N_FIELD, {"bicubic": "bspline"}.get(basis, basis)).to(device)
    x = torch.randn(m, n, device=device, requires_grad=mode != "fwd")
    return module_call(theirs, x, mode)


def _materialize_then_dense(layer, m: int, dtype: torch.dtype, device: str):
    """Baseline for on-the-fly generation: W written whole in ``dtype`` by one fused generation
    kernel (the sliced path's: the same work per entry as ours, so the comparison is of the designs,
    not of two generators), then cuBLAS ``F.linear`` with the bias. (A compiled
    ``reference.field_weight`` unrolls its loop of row blocks: minutes to compile, launch-bound.)"""
    from tspline_kernels.spline import kernels

    gaussian = layer.basis == "gaussian"
    field = kernels.Field(layer.control.detach().to(dtype), layer.lattice,
                          layer.log_bandwidth.detach().to(dtype) if gaussian else None, layer.out_features,
                          layer.in_features, ref.GAUSSIAN if gaussian else ref.IDW, layer.rho)
    bias = None if layer.bias is None else layer.bias.detach().to(dtype)
    x = torch.randn(m, layer.in_features, device=device, dtype=dtype)
    return Step(lambda: torch.nn.functional.linear(x, kernels.field_weight(field, dtype), bias))


def cases(device: str, quick: bool):
    """CUDA: n in {1024, 4096, 8192}, M in {16, 256, 8192} (+ 4096 for field bases), fp32/fp16/bf16.
    CPU: the reference fallback at n in {1024, 4096}, M in {16, 256}, fp32, plus the target shapes
    (8192-wide layers and M=8192 take minutes per dense call on two cores)."""
    if device == "cuda":
        sizes, ms, dtypes = ((4096,), (16, 8192), (torch.bfloat16,)) if quick else ((1024, 4096, 8192), (16, 256, 8192), (torch.float32, torch.float16, torch.bfloat16))
    else:
        sizes, ms, dtypes = ((1024,), (16, 256), (torch.float32,)) if quick else ((1024, 4096), (16, 256), (torch.float32,))
    extra_m = {"spline.gaussian": 4096, "spline.eisenstein": 4096} if device == "cuda" else {}
    for kernel, make in LAYERS.items():
        for n, dtype, mode in itertools.product(sizes, dtypes, ("fwd", "fwd+bwd")):
            for m in sorted(set(ms) | ({extra_m[kernel]} if kernel in extra_m and n == 4096 else set())):
                yield _case(kernel, make(n), m, dtype, device, mode)
    if device == "cpu":  # the CPU targets' shapes, with tensor-spline in the same run
        yield _case("spline.bicubic", LAYERS["spline.bicubic"](1024), 64, torch.float32, device, "fwd+bwd")
        yield _case("spline.eisenstein", LAYERS["spline.eisenstein"](1024), 64, torch.float32, device, "fwd+bwd")
        if not quick:
            yield _case("spline.bspline", LAYERS["spline.bspline"](4096), 256, torch.float32, device, "fwd")


def goal_cases(device: str, tiny: bool = False):
    """The rows the GPU targets read (bf16): bspline at n=4096, fwd and fwd+bwd at M in {16, 8192};
    gaussian and eisenstein fwd at n=4096, M=4096 against materialize+F.linear. ``tiny``: n=64,
    M in {16, 64} and 32."""
    n, m_small, m_large, m_field = (64, 16, 64, 32) if tiny else (4096, 16, 8192, 4096)
    for mode, m in itertools.product(("fwd", "fwd+bwd"), (m_small, m_large)):
        yield _case("spline.bspline", LAYERS["spline.bspline"](n), m, torch.bfloat16, device, mode)
    for kernel in ("spline.gaussian", "spline.eisenstein"):
        yield _case(kernel, LAYERS[kernel](n), m_field, torch.bfloat16, device, "fwd", materialize=True)


def _case(kernel: str, layer, m: int, dtype: torch.dtype, device: str, mode: str, materialize: bool | None = None) -> Case:
    """One row; ``materialize`` (default: on CUDA) adds the materialize+F.linear baseline to
    forward rows of global field bases."""
    elt = torch.finfo(dtype).bits // 8
    useful, executed, nbytes = costs(kernel, layer, m, elt, mode)
    n = layer.in_features
    shape = {"M": m, "in": n, "out": layer.out_features}
    shape.update({"grid": GRID} if "bspline" in kernel or "hier" in kernel else {"n_control_points": getattr(layer, "n_control_points", None)})
    others = {}
    basis = getattr(layer, "basis", None)
    if device == "cpu" and basis in ("bicubic", "gaussian", "eisenstein") and layer.support == "global" and n <= 1024:
        others["tensor-spline"] = peer(_tensor_spline_call, basis, n, m, mode, device)
    if (device == "cuda" if materialize is None else materialize) and mode == "fwd" and basis in ("gaussian", "eisenstein") and layer.support == "global":
        others["materialize+F.linear"] = _materialize_then_dense(layer.to(device), m, dtype, device)
    if device == "cuda" and mode == "fwd+bwd" and kernel == "spline.bspline":
        others[OTHER_KEEP_U] = _other_keep_u(layer, m, dtype, device)
    return layer_case(kernel, layer, m, dtype, device, mode, useful, nbytes, executed, shape, others)


OTHER_KEEP_U = "the other keep_u choice"


def _other_keep_u(layer, m: int, dtype: torch.dtype, device: str) -> Step:
    """fwd+bwd of ``layer`` with the choice ``ops.keeps_u`` does not make at this M (keep x @ Bi
    for dC below ``KEEP_U_MIN_ROWS`` rows, project x again from there): the rows' ratios against
    it place that threshold (bench/NOTES-separable.md)."""
    from tspline_kernels.spline import ops

    layer = layer.to(device=device, dtype=dtype)
    x = torch.randn(m, layer.in_features, device=device, dtype=dtype, requires_grad=True)
    step = forward_backward(layer, x)
    flipped = 0 if m < ops.KEEP_U_MIN_ROWS else sys.maxsize

    def run():
        kept, ops.KEEP_U_MIN_ROWS = ops.KEEP_U_MIN_ROWS, flipped
        try:
            step()
        finally:
            ops.KEEP_U_MIN_ROWS = kept
    return Step(run, step.grads)


def eisenstein_step(impl: str, n: int, m: int):
    """Builder for the memory probe (runs in a fresh process): one fwd+bwd of ours or tensor-spline's."""
    if impl == "tensor-spline":
        return _tensor_spline_call("eisenstein", n, m, "fwd+bwd", "cpu")
    layer = SplineLinear(n, n, basis="eisenstein", n_control_points=N_FIELD)
    x = torch.randn(m, n, requires_grad=True)
    step = forward_backward(layer, x)

    def run():
        with backend("reference"):
            step()
    return run


def targets(rows: list[dict], device: str, quick: bool) -> list[dict]:
    """The issues' stated targets, evaluated on this run's rows (None where not measured here): the
    separable B-spline's GPU goals (``layer_goals``, with their labelled predictions), the CPU
    targets, and the field bases' on-the-fly goals."""
    # predictions: bench/NOTES-separable.md, "Predictions"; the fwd+bwd roofline fraction as
    # corrected in bench/NOTES.md, "Floors corrected"
    predicted = {"fwd small": 4.0, "fwd large": 8.0, "fwd+bwd small": 0.8, "fwd+bwd large": 1.0,
                 "roofline fwd": 0.72, "roofline fwd+bwd": 0.5}
    at = {"in": 4096, "grid": GRID}
    out = layer_goals(rows, device, "spline.bspline", "separable B-spline 4096^2 grid 64^2",
                      {"M": 16, **at}, {"M": 8192, **at}, predicted, large_ratio=8)
    if device == "cpu" and any(r["dtype"] == "float32" for r in rows):  # a CPU run of the reference backend
        out.append(target("CPU bicubic fwd+bwd vs tensor-spline, 1024^2, n=16, M=64 (x faster)",
                          speedup(rows, "spline.bicubic", "fwd+bwd", "float32", "tensor-spline", M=64, **{"in": 1024}), 50))
        out.append(target("CPU eisenstein fwd+bwd vs tensor-spline, 1024^2, n=16, M=64 (x faster)",
                          speedup(rows, "spline.eisenstein", "fwd+bwd", "float32", "tensor-spline", M=64, **{"in": 1024}), 3))
        ours, theirs = (cpu_peak_mb(eisenstein_step, (impl, 1024, 64), (impl, 64, 8)) for impl in ("ours", "tensor-spline"))
        mem = target("CPU eisenstein fwd+bwd peak memory vs tensor-spline, 1024^2, M=64 (ours / theirs)",
                     ours / theirs if theirs > 0 else None, 1.0, higher_is_better=False)
        mem.update(ours_mb=ours, tensor_spline_mb=theirs)
        out.append(mem)
        out.append(target("CPU separable bspline fwd vs dense nn.Linear, 4096^2, grid 64x64, M=256 (x faster)",
                          speedup(rows, "spline.bspline", "fwd", "float32", M=256, **{"in": 4096}), 10))
        return out
    gpu = device == "cuda"
    # predicted: bench/NOTES.md, "field bases generated once (sliced path)": generation once (~75 us)
    # + four 4096x1024x4096 GEMMs (~200 us) against the same generation + cast + one GEMM
    for basis in ("gaussian", "eisenstein"):
        out.append(target(f"GPU bf16 {basis} on-the-fly fwd vs materialize+cuBLAS, 4096^2, M=4096 (x faster)",
                          speedup(rows, f"spline.{basis}", "fwd", "bfloat16", "materialize+F.linear", M=4096,
                                  **{"in": 4096}) if gpu else None, 1.0, predicted=1.0))
    # predicted: bench/NOTES-separable.md, "the forward keeps x @ Bi": host-bound at M=16 (the
    # kept op costs the host more than the launch it saves), ~108 -> ~91 us per backward at M=8192
    for m, predicted_ratio in ((16, 1.05), (8192, 1.1)):
        out.append(target(f"GPU bf16 bspline fwd+bwd vs {OTHER_KEEP_U}, 4096^2, M={m} (x faster; "
                          f"KEEP_U_MIN_ROWS on the right side)",
                          speedup(rows, "spline.bspline", "fwd+bwd", "bfloat16", OTHER_KEEP_U, M=m, **at)
                          if gpu else None, 1.0, predicted=predicted_ratio))
    spline_rows = [r for r in rows if gpu and r["kernel"].startswith("spline.") and r["shape"]["M"] >= 4096
                   and r["roofline_fraction"] is not None]
    worst = min(spline_rows, key=lambda r: r["roofline_fraction"]) if spline_rows else None
    # predicted: bench/NOTES.md, "field bases generated once (sliced path)": a field row, ~0.5
    t = target("GPU every spline kernel >= 70% of its roofline floor (minimum over rows with M >= 4096)",
               worst and worst["roofline_fraction"], 0.7, predicted=0.5)
    if worst:
        t["worst_row"] = {k: worst[k] for k in ("kernel", "mode", "shape", "dtype")}
    out.append(t)
    return out
