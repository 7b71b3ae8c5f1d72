"""Compile every Triton kernel for an H100 (sm_90) on a machine without a GPU.

The interpreter accepts code the compiler rejects, so CPU-only CI would not notice a kernel that
fails to build for the GPU. This script swaps Triton's active driver for one that reports an sm_90
device, compiles through the full pipeline (Triton -> PTX -> cubin with the ptxas bundled in the
triton wheel, H100 shared-memory limit enforced) but never launches. It then runs every layer's
forward and backward through the real launchers (CPU tensors only provide shapes, strides and
dtypes), so argument binding, specialisation, constexprs and autotune pruning are all exercised.

    python tests/sm90_dryrun.py --quick        # one config per kernel, fp32 and bf16 (CI, via test_sm90_compile.py)
    python tests/sm90_dryrun.py               # first and last autotune config, every dtype (minutes)
    python tests/sm90_dryrun.py --all-configs  # every config (tens of minutes)
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402

torch.cuda.is_available = lambda: True  # kernels are built for the (fake) GPU, not the interpreter

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as driver_mod  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

H100_SHARED_MEM = 232448  # bytes per block (227 KiB)


class _Utils:
    @staticmethod
    def get_device_properties(device):
        return {"max_shared_mem": H100_SHARED_MEM, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    @staticmethod
    def load_binary(name, kernel, shared, device):
        return None, None, 0, 0, 1024

    @staticmethod
    def unload_module(module):
        pass


class CompileOnlyDriver:
    """Reports an sm_90 device, compiles for it, launches nothing."""

    utils = _Utils()
    compiled: list[str] = []

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
        CompileOnlyDriver.compiled.append(f"{src.fn.__name__} warps={metadata.num_warps} shared={metadata.shared}")
        return lambda *args, **kwargs: None

    def is_active(self):
        return True


def layers(dtypes):
    """(name, layer, dtype) for every layer family, with odd shapes."""
    import tspline_kernels as tk

    cases = []
    for dtype in dtypes:
        for kw in (dict(basis="bspline", grid=(6, 9)), dict(basis="bspline", grid=(40, 70)),
                   dict(basis="bicubic", n_control_points=10), dict(basis="gaussian"), dict(basis="eisenstein"),
                   dict(basis="gaussian", n_control_points=40, support="local"),
                   dict(basis="eisenstein", n_control_points=40, support="local")):
            cases.append((f"SplineLinear{kw}", tk.SplineLinear(67, 45, **kw), dtype))
        cases.append(("HierarchicalSplineLinear", tk.HierarchicalSplineLinear(67, 45), dtype))
        cases.append(("LowRankLinear", tk.LowRankLinear(67, 45, rank=5), dtype))
        for s in ("contract", "rebuild"):
            cases.append((f"TTLinear[{s}]", tk.TTLinear((3, 2, 5), (2, 3, 4), (1, 2, 3, 1), strategy=s), dtype))
            cases.append((f"SplineTTLinear[{s}]", tk.SplineTTLinear((5, 4, 7), (6, 5, 4), 2, (4, 4), strategy=s), dtype))
        # a middle core too large for the chain kernels' registers: the per-step kernels
        cases.append(("TTLinear[contract, step kernels]", tk.TTLinear((4, 64, 4), (4, 64, 4), 16, strategy="contract"), dtype))
        cases.append(("KroneckerLinear(3,5)->(4,7)", tk.KroneckerLinear((3, 5), (4, 7)), dtype))
        cases.append(("KroneckerLinear(64,64)", tk.KroneckerLinear((64, 64), (64, 64)), dtype))
        cases.append(("KroneckerLinear(128,96)->(100,128)", tk.KroneckerLinear((128, 96), (100, 128)), dtype))
        cases.append(("KroneckerLinear gated 3 modes", tk.KroneckerLinear((3, 5, 2), (4, 3, 3), gated=True), dtype))
    return cases


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--all-configs", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    driver_mod.set_active(CompileOnlyDriver())

    import importlib
    import pkgutil

    import tspline_kernels as tk

    for info in pkgutil.iter_modules(tk.__path__):
        try:
            mod = importlib.import_module(f"tspline_kernels.{info.name}.kernels")
        except ModuleNotFoundError:
            continue
        mod.check_inputs = lambda *tensors: None  # CPU tensors stand in for device memory here
        for obj in vars(mod).values():
            if isinstance(obj, Autotuner) and not args.all_configs:
                obj.configs = obj.configs[:1] if args.quick else obj.configs[::max(1, len(obj.configs) - 1)]  # first (and last)
    failures = 0
    dtypes = (torch.float32, torch.bfloat16) if args.quick else (torch.float32, torch.bfloat16, torch.float16)
    for name, layer, dtype in layers(dtypes):
        layer = layer.to(dtype)
        x = torch.randn(5, layer.in_features, dtype=dtype, requires_grad=True)
        try:
            with tk.backend("triton"):
                layer(x).sum().backward()
        except Exception as e:  # report every failure, not just the first
            failures += 1
            print(f"FAILED {name} {dtype}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    print(f"compiled {len(CompileOnlyDriver.compiled)} kernel variants for sm_90; {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
