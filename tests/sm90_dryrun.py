"""Compile every Triton kernel for an H100/H200 (sm_90) on a machine without a GPU, and read the SASS.

The interpreter accepts code the compiler rejects, so CPU-only CI would not notice a kernel that
fails to build for the GPU. This script swaps Triton's active driver for one that reports an sm_90
device, compiles through the full pipeline (Triton -> PTX -> cubin with the ptxas bundled in the
triton wheel, H100 shared-memory limit enforced) but never launches. It then runs every layer's
forward and backward through the real launchers (CPU tensors only provide shapes, strides and
dtypes), so argument binding, specialisation, constexprs and autotune pruning are all exercised.

    python tests/sm90_dryrun.py --quick        # one config per kernel, fp32 and bf16 (+ fp16 low-rank, Kronecker, decoupled) (CI)
    python tests/sm90_dryrun.py               # first and last autotune config, every dtype (minutes)
    python tests/sm90_dryrun.py --all-configs  # every config (tens of minutes)
    python tests/sm90_dryrun.py --bench        # the benchmarks' goal rows, every config their autotuner
                                               # tries (TSPLINE_AUTOTUNE=quick|full, as on the GPU)

``--report FILE`` writes JSON: per compiled kernel variant (the case that built it, constexprs
with the config's block sizes, warps, stages) what ``ptxas`` made of it: registers and local memory
(spill) bytes per thread (Triton's ``n_spills`` on a GPU is that size / 4), shared memory, each
``tl.dot`` of the TritonGPU IR (tile, types, precision, tensor cores or FMAs), the HMMA/HGMMA
instructions and the global loads by width in the SASS (``cuobjdump`` from the triton wheel on the
cubin); plus ``findings``: a kernel that spills, a 16-bit (or tf32) ``tl.dot`` that does not run
on tensor cores, or (``--bench``: aligned goal shapes) a kernel streaming x without 128-bit loads
(also printed as ``FINDING`` lines).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402

torch.cuda.is_available = lambda: True  # kernels are built for the (fake) GPU, not the interpreter

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import CompiledKernel  # noqa: E402
from triton.runtime import driver as driver_mod  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

H100_SHARED_MEM = 232448  # bytes per block (227 KiB), the same on an H200
TENSOR_CORE_OPS = ("HGMMA", "HMMA")  # sm_90 warp-group and warp-level matrix multiply-accumulate
_DOT_OP = re.compile(r"= (tt\.dot|ttng\.warp_group_dot) ")
_OPERAND = re.compile(r"(?:tensor|memdesc)<([\dx]+)x(\w+)[,>]")
_RESULT = re.compile(r"tensor<([\dx]+)x(\w+), (#\w+)")


class _Utils:
    @staticmethod
    def get_device_properties(device):
        return {"max_shared_mem": H100_SHARED_MEM, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    @staticmethod
    def load_binary(name, kernel, shared, device):
        # a module handle that is not None, so that Triton loads ("initialises") each kernel once
        return "compile-only", None, 0, 0, 1024

    @staticmethod
    def unload_module(module):
        pass


class CompileOnlyDriver:
    """Reports an sm_90 device, compiles for it, launches nothing."""

    utils = _Utils()

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_benchmarker(self):
        def bench(fn, quantiles=None, **kwargs):
            fn()
            return [1.0, 1.0, 1.0] if quantiles else 1.0
        return bench

    def launcher_cls(self, src, metadata):
        return lambda *args, **kwargs: None

    def is_active(self):
        return True


def _tool(name: str, *args: str) -> str:
    path = getattr(triton.knobs.nvidia, name).path  # the binaries bundled in the triton wheel
    return subprocess.run([path, *args], capture_output=True, text=True, check=True).stdout


def cubin_resources(cubin: bytes) -> dict:
    """Registers and local memory (spill) bytes per thread, and the tensor-core instructions by
    opcode, of a one-kernel cubin (``cuobjdump -res-usage`` and ``-sass``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage, sass = _tool("cuobjdump", "-res-usage", f.name), _tool("cuobjdump", "-sass", f.name)
    regs, local = (int(re.search(rf"\b{key}:(\d+)", usage)[1]) for key in ("REG", "LOCAL"))
    opcodes = Counter(m[1] for m in re.finditer(rf"\b({'|'.join(TENSOR_CORE_OPS)})\.", sass))
    return {"registers": regs, "local_bytes": local, "n_spills": local // 4,
            "tensor_core_instructions": {op: opcodes[op] for op in TENSOR_CORE_OPS},
            "global_loads": global_loads(sass)}


_GLOBAL_LOAD = re.compile(r"\b(LDGSTS|LDG)((?:\.[A-Z0-9_]+)*)(?=\s)")  # not LDGDEPBAR


def global_loads(sass: str) -> dict[str, int]:
    """Global-memory load instructions of a kernel's SASS by width in bits (``LDG`` and the
    ``LDGSTS`` of cp.async; no width suffix: 32), and ``tma``: ``UTMALDG`` tensor-memory copies."""
    widths = Counter()
    for m in _GLOBAL_LOAD.finditer(sass):
        suffixes = m[2].split(".")
        bits = next((int(w.removeprefix("U").removeprefix("S")) for w in suffixes
                     if w.removeprefix("U").removeprefix("S") in ("8", "16", "64", "128")), 32)
        widths[str(bits)] += 1
    return {**{w: widths[w] for w in ("128", "64", "32", "16", "8")}, "tma": len(re.findall(r"\bUTMALDG\b", sass))}


def ir_dots(ttgir: str) -> list[dict]:
    """The ``tl.dot`` operations of a kernel's TritonGPU IR (after Triton picked each dot's
    lowering): tile (M, N, K), operand and result types, input precision, and whether it runs on
    tensor cores (result in an ``#mma`` layout: HMMA, or HGMMA for ``warp_group_dot``) or as FMAs."""
    dots = []
    for line in ttgir.splitlines():
        op = _DOT_OP.search(line)
        if not op:
            continue
        lhs, _, result = line.partition(" -> ")
        a, b = _OPERAND.findall(lhs.split(" : ", 1)[1])[:2]
        out_shape, out_type, layout = _RESULT.search(result).groups()
        precision = re.search(r"inputPrecision = (\w+)", lhs)
        dots.append({"op": op[1], "mnk": [*map(int, out_shape.split("x")[-2:]), int(a[0].split("x")[-1])],
                     "a": a[1], "b": b[1], "out": out_type,
                     "precision": precision[1] if precision else "ieee" if a[1] == "f32" else None,
                     "tensor_cores": layout.startswith("#mma")})
    return dots


# kernels that stream x (or dy) as row-major tiles: at the goal rows' shapes (rows 16-byte
# aligned) their SASS must hold 128-bit global loads (LDG/LDGSTS .128) or TMA copies
X_STREAMING = {"_lowrank_fwd_kernel", "_lowrank_grad_kernel", "_kron_fwd_kernel", "_kron_grad_kernel",
               "_separable_in_kernel", "_field_matmul_kernel", "_rebuild_kernel", "_rebuild_grad_kernel",
               "_chain_kernel", "_chain_grad_kernel", "_decoupled_fwd_kernel", "_decoupled_bwd_kernel"}


def findings(rec: dict, aligned: bool = False) -> list[str]:
    """What to fix or explain in one compiled kernel: spills; a ``tl.dot`` that could run on tensor
    cores (16-bit operands, or fp32 as tf32) but was lowered to FMAs; tensor-core dots with no
    HMMA/HGMMA in the SASS; with ``aligned`` (the goal rows' shapes), an x-streaming kernel
    without 128-bit or TMA global loads."""
    out = []
    loads = rec["global_loads"]
    if aligned and rec["kernel"] in X_STREAMING and not loads["128"] + loads["tma"]:
        out.append(f"streams x without 128-bit global loads (loads by width: {loads})")
    if rec["local_bytes"]:
        out.append(f"spills: {rec['local_bytes']} bytes of local memory per thread ({rec['registers']} registers)")
    for d in rec["dots"]:
        if not d["tensor_cores"] and (d["a"] in ("bf16", "f16") or d["precision"] in ("tf32", "tf32x3")):
            out.append(f"tl.dot {d['a']} x {d['b']} (tile M,N,K={d['mnk']}) runs on FMAs, not tensor cores")
    if any(d["tensor_cores"] for d in rec["dots"]) and not sum(rec["tensor_core_instructions"].values()):
        out.append("tensor-core dots in the IR, but no HMMA/HGMMA in the SASS")
    return out


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (bool, int, float, str)) or value is None else str(value)


class Recorder:
    """Hooks Triton's kernel loading: one record per compiled kernel variant, with the layer case
    that first built it, its constexprs (the config's block sizes among them), warps, stages and
    what ``ptxas`` made of it (``cubin_resources``, ``ir_dots``) when ``inspect`` is set."""

    def __init__(self, inspect: bool, aligned: bool = False):
        self.inspect, self.aligned = inspect, aligned
        self.case = ""
        self.records: list[dict] = []
        real = CompiledKernel._init_handles

        def init_handles(kernel):
            if kernel.module is None:
                real(kernel)
                self.records.append(self.record(kernel))

        CompiledKernel._init_handles = init_handles

    def record(self, kernel) -> dict:
        names = kernel.src.fn.arg_names
        constexprs = {names[k[0]] if isinstance(k, tuple) else k: _jsonable(v) for k, v in kernel.src.constants.items()}
        rec = {"kernel": kernel.name, "case": self.case, "num_warps": kernel.metadata.num_warps,
               "num_stages": kernel.metadata.num_stages, "constexprs": constexprs, "shared_bytes": kernel.metadata.shared}
        if self.inspect:
            rec.update(cubin_resources(kernel.asm["cubin"]), dots=ir_dots(kernel.asm["ttgir"]))
            rec["findings"] = findings(rec, aligned=self.aligned)
        return rec


def layers(dtypes) -> list[tuple[str, object]]:
    """(name, run) for every layer family with odd shapes, M=5: ``run()`` is a forward and backward."""
    import tspline_kernels as tk
    from tspline_kernels.kronecker import kernels as kron_kernels
    from tspline_kernels.tt import cost as tt_cost

    cases = []
    for dtype in dtypes:
        for kw in (dict(basis="bspline", grid=(6, 9)), dict(basis="bspline", grid=(40, 70)),
                   dict(basis="bicubic", n_control_points=10), dict(basis="gaussian"), dict(basis="eisenstein"),
                   dict(basis="gaussian", n_control_points=40, support="local"),
                   dict(basis="eisenstein", n_control_points=40, support="local")):
            cases.append((f"SplineLinear{kw}", tk.SplineLinear(67, 45, **kw), dtype))
        cases.append(("HierarchicalSplineLinear", tk.HierarchicalSplineLinear(67, 45), dtype))
        # more rows than the field kernels generate W on the fly for: W in slices (_field_slice_kernel)
        cases.append(("SplineLinear gaussian, 257 rows", tk.SplineLinear(67, 45, basis="gaussian"), dtype, 257))
        cases.append(("LowRankLinear", tk.LowRankLinear(67, 45, rank=5), dtype))
        for s in ("contract", "rebuild"):
            cases.append((f"TTLinear[{s}]", tk.TTLinear((3, 2, 5), (2, 3, 4), (1, 2, 3, 1), strategy=s), dtype))
            cases.append((f"SplineTTLinear[{s}]", tk.SplineTTLinear((5, 4, 7), (6, 5, 4), 2, (4, 4), strategy=s), dtype))
        # more rows than the fused rebuild kernels take: W (and G) in slices (_rebuild_slice_kernel)
        rows = tt_cost.REBUILD_FUSED_MAX_ROWS + 1
        cases.append((f"TTLinear[rebuild], {rows} rows",
                      tk.TTLinear((3, 2, 5), (2, 3, 4), (1, 2, 3, 1), strategy="rebuild"), dtype, rows))
        # 8^4 rank 8 on enough rows that the cost model runs the Kronecker-sum kernels (64 x 64 halves):
        # the forward, and from ~1000 rows the core gradients and dx too
        for rows in (tt_cost.KRONSUM_MIN_ROWS, 1024):
            cases.append((f"TTLinear 8^4 r8, {rows} rows", tk.TTLinear((8,) * 4, (8,) * 4, 8), dtype, rows))
        # a middle core too large for the chain kernels' registers: the per-step kernels
        cases.append(("TTLinear[contract, step kernels]", tk.TTLinear((4, 64, 4), (4, 64, 4), 16, strategy="contract"), dtype))
        cases.append(("KroneckerLinear(3,5)->(4,7)", tk.KroneckerLinear((3, 5), (4, 7)), dtype))
        cases.append(("KroneckerLinear(64,64)", tk.KroneckerLinear((64, 64), (64, 64)), dtype))
        cases.append(("KroneckerLinear(128,96)->(100,128)", tk.KroneckerLinear((128, 96), (100, 128)), dtype))
        cases.append(("KroneckerLinear gated 3 modes", tk.KroneckerLinear((3, 5, 2), (4, 3, 3), gated=True), dtype))
        # two modes: the gate program, at an odd and the goal rows' size; past GATE_SPLIT_ROWS rows
        # the batch sum into partial slots first
        cases.append(("KroneckerLinear gated (3,5)->(4,5)", tk.KroneckerLinear((3, 5), (4, 5), gated=True), dtype))
        rows = kron_kernels.GATE_SPLIT_ROWS + 1
        cases.append((f"KroneckerLinear gated (3,5)->(4,5), hard, {rows} rows",
                      tk.KroneckerLinear((3, 5), (4, 5), gated=True, gating_mode="hard"), dtype, rows))
        cases.append(("KroneckerLinear gated (64,64) reversed",
                      tk.KroneckerLinear((64, 64), (64, 64), gated=True, transform_outer=False), dtype))
        cases.append(("DecoupledSplineMLP rank 5", tk.DecoupledSplineMLP(67, 45, rank=5), dtype))
        cases.append(("DecoupledSplineMLP rank 150", tk.DecoupledSplineMLP(67, 300, rank=150, n_basis=4), dtype))

    def run(layer, dtype, rows=5):
        layer = layer.to(dtype)
        x = torch.randn(rows, layer.in_features, dtype=dtype, requires_grad=True)
        return lambda: layer(x).sum().backward()

    def second_order(layer, dtype):  # the separable dC kernel on input passes of x (the forward keeps u for the first)
        layer = layer.to(dtype)
        x = torch.randn(5, layer.in_features, dtype=dtype, requires_grad=True)
        params = [x, *layer.parameters()]
        return lambda: sum(g.sum() for g in torch.autograd.grad(layer(x).square().sum(), params, create_graph=True)
                           ).backward()
    return [(f"{name} {str(dtype).removeprefix('torch.')}", run(layer, dtype, *rows)) for name, layer, dtype, *rows in cases
            ] + [(f"SplineLinear bspline (6, 9) second order {str(dtype).removeprefix('torch.')}",
                  second_order(tk.SplineLinear(67, 45, grid=(6, 9)), dtype)) for dtype in dtypes]


def bench_cases() -> list[tuple[str, object]]:
    """(name, run) of the benchmarks' goal rows (``bench/<family>.goal_cases``: the layers, M, dtype
    and fwd or fwd+bwd that the GPU check times), with CPU tensors standing in for the GPU's."""
    return [(f"{case.kernel} {case.mode} {str(case.dtype).removeprefix('torch.')} {case.shape}", case.run)
            for family in ("spline", "lowrank", "kronecker", "tt")
            for case in importlib.import_module(f"tspline_kernels.bench.{family}").goal_cases("cpu")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all-configs", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--bench", action="store_true", help="the benchmarks' goal rows, every config their autotuner tries")
    parser.add_argument("--report", type=Path, help="write per-kernel registers, spills, shared memory and tensor-core counts (JSON)")
    args = parser.parse_args()
    driver_mod.set_active(CompileOnlyDriver())
    recorder = Recorder(inspect=args.report is not None, aligned=args.bench)

    import tspline_kernels as tk

    for info in pkgutil.iter_modules(tk.__path__):
        try:
            mod = importlib.import_module(f"tspline_kernels.{info.name}.kernels")
        except ModuleNotFoundError:
            continue
        mod.check_inputs = lambda *tensors: None  # CPU tensors stand in for device memory here
        for obj in vars(mod).values():
            if isinstance(obj, Autotuner) and not (args.all_configs or args.bench):
                obj.configs = obj.configs[:1] if args.quick else obj.configs[::max(1, len(obj.configs) - 1)]  # first (and last)
    failures = 0
    if args.bench:
        cases = bench_cases()
    elif args.quick:  # fp16 only where it has its own code path (_rescale.narrow's rescaled operands)
        cases = layers((torch.float32, torch.bfloat16)) + [
            c for c in layers((torch.float16,)) if c[0].startswith(("LowRankLinear", "KroneckerLinear", "DecoupledSplineMLP"))]
    else:
        cases = layers((torch.float32, torch.bfloat16, torch.float16))
    for name, run in cases:
        recorder.case = name
        try:
            with tk.backend("triton"):
                run()
        except Exception as e:  # report every failure, not just the first
            failures += 1
            print(f"FAILED {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    found = [f"{r['kernel']} [{r['case']}] warps={r['num_warps']}: {f}" for r in recorder.records for f in r.get("findings", [])]
    for f in found:
        print(f"FINDING {f}")
    if args.report:
        report = {"target": "sm_90", "triton": triton.__version__, "torch": torch.__version__,
                  "ptxas": _tool("ptxas", "--version").strip().splitlines()[-1],
                  "mode": "bench" if args.bench else "all-configs" if args.all_configs else "quick" if args.quick else "first-last",
                  "autotune": os.environ.get("TSPLINE_AUTOTUNE", "full"), "failures": failures,
                  "kernels": recorder.records, "findings": found}
        args.report.write_text(json.dumps(report, indent=1))
    print(f"compiled {len(recorder.records)} kernel variants for sm_90; {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
