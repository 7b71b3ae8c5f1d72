"""The launch stub of ``bench/host_overhead.py``: it records every Triton launch with its grid, runs
no kernel body, restores Triton afterwards, and the benchmark's rows count launches per call.
Timings are benchmarks, never tests: nothing here checks one."""

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction, KernelInterface

import tspline_kernels as tk
from tspline_kernels import cli
from tspline_kernels._triton import cdiv, tl, triton
from tspline_kernels.bench import host_overhead
from tspline_kernels.bench.host_overhead import Launch, stubbed_launches
from tspline_kernels.lowrank import kernels as lowrank_kernels


@triton.jit
def _fill_ones(out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, 1.0, mask=offs < n)


def _forbid_kernel_bodies(monkeypatch) -> None:
    """Make the innermost launch (the interpreter's, a compiled kernel's) fail the test if reached."""
    def never(self, *args, **kwargs):
        raise AssertionError(f"a kernel body ran: {self}")
    monkeypatch.setattr(InterpretedFunction, "run", never)
    monkeypatch.setattr(JITFunction, "run", never)


def test_stub_records_the_launch_and_runs_no_body():
    out = torch.zeros(37)
    with stubbed_launches() as launches:
        _fill_ones[lambda meta: (cdiv(37, meta["BLOCK"]),)](out, 37, BLOCK=16)
        _fill_ones[(2,)](out, 37, BLOCK=32)
    assert launches == [Launch("_fill_ones", (3,)), Launch("_fill_ones", (2,))]
    assert not out.any(), "the stubbed launch wrote its output"
    _fill_ones[(3,)](out, 37, BLOCK=16)  # unstubbed, the same launch does write: the check above can fail
    torch.testing.assert_close(out, torch.ones(37))


def test_stub_is_removed_after_the_block_even_on_error():
    original = KernelInterface.__dict__["__getitem__"]
    with pytest.raises(RuntimeError, match="inside"), stubbed_launches():
        assert KernelInterface.__dict__["__getitem__"] is not original
        raise RuntimeError("inside")
    assert KernelInterface.__dict__["__getitem__"] is original


def test_autotuned_grid_sees_the_config_the_launch_would_run(monkeypatch):
    _forbid_kernel_bodies(monkeypatch)
    m, k, n, r = 37, 40, 24, 3
    x, a, b = torch.randn(m, k), torch.randn(k, r), torch.randn(n, r)
    config = lowrank_kernels._lowrank_fwd_kernel.configs[0].kwargs
    with tk.backend("triton"), stubbed_launches() as launches:
        lowrank_kernels.lowrank_linear(x, a, b, None)
    assert launches == [Launch("_lowrank_fwd_kernel", (cdiv(m, config["BM"]), config["N_SPLIT"]))]


# tiny stand-ins of the benchmark's layers; the launches each call makes per family
FAMILIES = {
    "lowrank": (lambda: tk.LowRankLinear(40, 24, 3), 1, 3),  # fwd; + dx (same kernel) + factor grads
    "kronecker": (lambda: tk.KroneckerLinear((5, 8), (4, 6)), 1, 3),
    "kronecker gated": (lambda: tk.KroneckerLinear((5, 8), (4, 6), gated=True), 1, 3),
    "gaussian": (lambda: tk.SplineLinear(40, 24, basis="gaussian", n_control_points=7), 1, 3),  # + dx, d(params)
    "eisenstein local": (lambda: tk.SplineLinear(40, 24, basis="eisenstein", n_control_points=20, support="local"),
                         1, 3),
    "decoupled": (lambda: tk.DecoupledSplineMLP(40, 24, rank=5, n_basis=6), 1, 3),  # + fused backward + factor grads
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_stubbed_layer_calls_record_each_launch_and_run_no_kernel(family, monkeypatch):
    _forbid_kernel_bodies(monkeypatch)
    build, fwd_launches, fwd_bwd_launches = FAMILIES[family]
    torch.manual_seed(0)
    layer = build()
    x = torch.randn(3, 5, layer.in_features)
    with tk.backend("triton"):
        calls = host_overhead.calls(layer, x)
        for mode, expected in (("fwd", fwd_launches), ("fwd+bwd", fwd_bwd_launches)):
            with stubbed_launches() as launches:
                calls[mode]()
            assert len(launches) == expected, f"{mode}: {launches}"
            assert all(g >= 1 for launch in launches for g in launch.grid), launches


def test_measure_layer_row(monkeypatch):
    _forbid_kernel_bodies(monkeypatch)
    with tk.backend("triton"):
        row = host_overhead.measure_layer("lowrank", tk.LowRankLinear(40, 24, 3), "cpu", torch.float32, True, 0.01)
    assert (row["fwd_launches"], row["fwd+bwd_launches"]) == (1, 3)
    assert row["fwd_kernels"] == ["_lowrank_fwd_kernel"]
    assert row["fwd+bwd_kernels"] == ["_lowrank_fwd_kernel", "_lowrank_grad_kernel"]
    assert row["fwd_us"] > 0 and row["fwd+bwd_us"] > 0 and row["fwd_goal_met"] in (True, False)


def test_torch_kernels_counts_arithmetic_not_views():
    a = torch.randn(8, 8)
    count, _ = host_overhead.torch_kernels(lambda: (a.view(64).reshape(8, 8).t(), torch.empty(3), a + 1, a.sum()))
    assert count == 2  # the add and the sum


def test_bench_only_host_overhead_runs_the_benchmark(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(host_overhead, "main", lambda quick, out: calls.append((quick, out)) or out)
    cli.main(["bench", "--only", "host_overhead", "--quick", "--out", str(tmp_path / "h.json")])
    assert calls == [(True, str(tmp_path / "h.json"))]
    with pytest.raises(SystemExit, match="runs alone"):
        cli.main(["bench", "--only", "host_overhead", "lowrank"])
