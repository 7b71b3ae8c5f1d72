"""The benchmark harness's honesty rules, checked on CPU: gradients cleared every repetition, the
roofline from useful FLOPs against measured peaks, results never overwritten, the autotune config
of every kernel recorded; the CUDA-only branches of ``measure`` run with stand-in timers."""

import importlib
import types

import pytest
import torch

import tspline_kernels as tk
from tspline_kernels import cli
from tspline_kernels.bench import harness, kronecker, lowrank, run, spline, tt


def test_fwd_bwd_timing_clears_gradients_every_repetition():
    """Before: each repetition added into .grad, so the dense baseline paid an extra W.grad +=."""
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    step = harness.forward_backward(layer, x)
    assert step.grads[0] is x and len(step.grads) == 3
    harness.time_ms(step, "cpu")
    expected = torch.ones(3, 4) @ layer.weight
    torch.testing.assert_close(x.grad, expected)
    torch.testing.assert_close(layer.bias.grad, torch.full((4,), 3.0))


def test_dense_baseline_step_lists_all_its_gradients():
    x = torch.randn(5, 6, requires_grad=True)
    step = harness.dense_call(x, 7, "fwd+bwd")
    assert [tuple(t.shape) for t in step.grads] == [(5, 6), (7, 6), (7,)]
    assert harness.dense_call(x.detach(), 7, "fwd").grads == []


def test_results_are_never_overwritten(tmp_path):
    first = tmp_path / "run.json"
    assert harness.free_path(first) == first
    first.write_text("{}")
    assert harness.free_path(first) == tmp_path / "run-2.json"
    (tmp_path / "run-2.json").write_text("{}")
    assert harness.free_path(first) == tmp_path / "run-3.json"


def test_roofline_uses_useful_flops_and_measured_peaks():
    case = harness.Case("k", "fwd", {"M": 1}, torch.bfloat16, harness.Step(lambda: None), harness.Step(lambda: None),
                        flops=2e12, bytes=1e9, executed_flops=8e12)
    peaks = {"bfloat16": 1e15, "bytes_per_s": 1e12}
    # floor max(2e12 / 1e15, 1e9 / 1e12) = 2 ms; 4 ms measured -> 0.5 (executed FLOPs not counted)
    assert harness.roofline_fraction(case, 4.0, peaks) == pytest.approx(0.5)
    assert harness.roofline_fraction(case, 4.0, {"float32": 1e15, "bytes_per_s": 1e12}) is None


def test_cpu_peaks_are_measured():
    peaks = harness.measure_peaks("cpu", tiny=True)
    assert peaks["float32"] > 1e6 and peaks["bytes_per_s"] > 1e6


def test_autotune_configs_records_each_kernel_config():
    layer = tk.LowRankLinear(20, 24, rank=3)
    x = torch.randn(5, 20, requires_grad=True)
    with tk.backend("triton"):
        configs = harness.autotune_configs(harness.forward_backward(layer, x))
    assert set(configs) == {"_lowrank_fwd_kernel", "_lowrank_grad_kernel"}
    assert all("BM=" in c for c in configs.values())


def test_empty_kernel_launches():
    harness.empty_launch("cpu")()  # the interpreter runs it; on CUDA launch_floor times it


@pytest.mark.parametrize("family", [spline, lowrank, tt, kronecker], ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_goal_rows_count_useful_work_below_executed_work(family):
    cases = list(family.goal_cases("cpu", tiny=True))
    assert cases and all(c.dtype == torch.bfloat16 for c in cases)
    for c in cases:
        assert 0 < c.flops <= c.executed_flops and c.bytes > 0, (c.kernel, c.shape)


def test_goal_layer_costs_at_target_sizes():
    """Useful FLOPs at the real goal shapes: low rank 2*M*r*(in+out), padding only in executed."""
    layer = tk.LowRankLinear(4096, 4096, 16)
    useful, executed, _ = lowrank.costs(layer, 8192, 2, "fwd")
    assert useful == executed == 2.0 * 8192 * 16 * 8192
    useful, executed, _ = lowrank.costs(tk.LowRankLinear(4096, 4096, 5), 8192, 2, "fwd")
    assert executed == useful * 16 / 5
    useful, executed, _ = kronecker.costs(tk.KroneckerLinear((64, 64), (64, 64)), 8192, 2, "fwd")
    assert useful == executed == 2.0 * 8192 * 2 * 64**3
    useful, executed, _ = spline.costs("spline.bspline", spline.LAYERS["spline.bspline"](4096), 16, 2, "fwd")
    assert useful == 2 * 16 * (4 * 4096 + 64 * 64 + 4 * 4096) < executed


def test_the_other_keep_u_choice_flips_it_for_its_own_calls_only(monkeypatch):
    """The bspline fwd+bwd rows' baseline that places ``KEEP_U_MIN_ROWS``: the layer with the
    choice ``keeps_u`` does not make at that M, the threshold restored after each call."""
    from tspline_kernels.spline import ops

    real, seen = ops.keeps_u, []
    monkeypatch.setattr(ops, "keeps_u", lambda *a: seen.append(real(*a)) or seen[-1])
    layer = spline.LAYERS["spline.bspline"](64)
    for m, kept in ((8, True), (ops.KEEP_U_MIN_ROWS, False)):
        step = spline._other_keep_u(layer, m, torch.float32, "cpu")
        step()
        assert seen[-1] is kept and ops.KEEP_U_MIN_ROWS == 4096
        assert len(step.grads) == 3 and all(t.grad is not None for t in step.grads)


def test_measure_runs_its_cuda_branches_with_stand_in_timers(monkeypatch):
    """No GPU here: CUDA-only calls (do_bench, CUDA graphs, memory stats, device properties) are
    replaced, so a typo in the lines around them fails here and not on the first GPU run."""
    monkeypatch.setattr(harness, "time_ms", lambda step, device: (step(), (2.0, 1.9, 2.1))[1])
    monkeypatch.setattr(harness, "graph_ms", lambda step: (step(), 1.5)[1])
    monkeypatch.setattr(harness, "cuda_peak_mb", lambda fn: (fn(), 3.0)[1])
    cpu_launch = harness.empty_launch
    monkeypatch.setattr(harness, "empty_launch", lambda device: cpu_launch("cpu"))
    monkeypatch.setattr(harness, "device_name", lambda device: "stand-in GPU")
    props = types.SimpleNamespace(multi_processor_count=132, total_memory=141e9, major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    floor = harness.launch_floor("cuda")
    assert floor == {"launch_ms": 2.0, "launch_graph_ms": 1.5}
    meta = harness.metadata("cuda")
    assert meta["sm_count"] == 132 and meta["capability"] == "9.0"
    with tk.backend("triton"):
        rows = harness.measure([next(lowrank.goal_cases("cpu", tiny=True))], "cuda", progress=lambda line: None,
                               peaks={"bfloat16": 1e12, "bytes_per_s": 1e11}, floor=floor)
    (row,) = rows
    assert row["ms"] == 2.0 and row["peak_mem_mb"] == 3.0 and row["roofline_fraction"] > 0
    assert (row["graph_ms"], row["baseline_graph_ms"], row["launch_floor_ms"]) == (1.5, 1.5, 2.0)  # M=16: small
    assert set(row["configs"]) == {"_lowrank_fwd_kernel"}


def test_large_rows_get_no_graph_timing(monkeypatch):
    monkeypatch.setattr(harness, "time_ms", lambda step, device: (2.0, 1.9, 2.1))
    monkeypatch.setattr(harness, "graph_ms", lambda step: 1.5)
    monkeypatch.setattr(harness, "cuda_peak_mb", lambda fn: (fn(), 3.0)[1])
    monkeypatch.setattr(harness, "metadata", lambda device: {"device": "stand-in GPU", "torch": "t", "triton": "t",
                                                             "commit": "c", "dirty": False})
    case = next(lowrank.goal_cases("cpu", tiny=True))
    case.shape["M"] = harness.SMALL_M + 1
    (row,) = harness.measure([case], "cuda", progress=lambda line: None, floor={"launch_ms": 0.004})
    assert (row["graph_ms"], row["baseline_graph_ms"], row["launch_floor_ms"]) == (None, None, None)


def test_a_call_that_cannot_be_captured_is_recorded_not_fatal(monkeypatch):
    def refuse(step):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(harness, "graph_ms", refuse)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    case = next(lowrank.goal_cases("cpu", tiny=True))
    times = harness.graph_times(case)
    assert times["graph_ms"] is None and "not permitted" in times["graph_error"]


def _row(mode: str, m: int, ms: float, dense_ms: float, graph: tuple | None = None, roofline: float = 0.5) -> dict:
    return {"kernel": "lowrank", "mode": mode, "dtype": "bfloat16", "shape": {"M": m, "in": 4096, "rank": 16},
            "ms": ms, "baseline_ms": dense_ms, "others_ms": {lowrank.UNFUSED: 2 * ms},
            "graph_ms": graph and graph[0], "baseline_graph_ms": graph and graph[1], "roofline_fraction": roofline}


def test_layer_goals_read_graph_times_for_small_rows_and_relate_fwd_bwd_to_fwd():
    rows = [_row("fwd", 16, 9.0, 9.0, graph=(1.0, 4.0)), _row("fwd+bwd", 16, 9.0, 9.0, graph=(2.0, 6.0)),
            _row("fwd", 8192, 1.0, 8.0, roofline=0.8), _row("fwd+bwd", 8192, 2.0, 12.0, roofline=0.6)]
    got = {t["target"]: t for t in lowrank.targets(rows, "cuda", quick=False)}
    measured = [round(t["measured"], 6) for t in got.values()]
    assert measured == [4.0, 8.0, 0.75, 0.75, 0.8, 0.6, 2.0]  # 3/4 / 4, 6/8: fwd+bwd relative to fwd
    assert [t["met"] for t in got.values()] == [True, True, True, True, True, False, True]
    assert all(t["predicted"] is not None for t in got.values())
    on_cpu = lowrank.targets(rows, "cpu", quick=False)
    assert all(t["measured"] is None and t["met"] is None and t["predicted"] is not None for t in on_cpu)


def test_layer_goals_need_a_prediction_for_every_goal():
    with pytest.raises(ValueError, match="predicted must give exactly"):
        harness.layer_goals([], "cpu", "lowrank", "x", {"M": 16}, {"M": 8192}, {"fwd small": 1.0}, large_ratio=2)


@pytest.mark.parametrize("name", run.STANDALONE)
def test_bench_only_runs_a_standalone_benchmark_alone(monkeypatch, tmp_path, name):
    module = importlib.import_module(f"tspline_kernels.bench.{name}")
    calls = []
    monkeypatch.setattr(module, "main", lambda quick, out: calls.append((quick, out)) or out)
    cli.main(["bench", "--only", name, "--quick", "--out", str(tmp_path / "b.json")])
    assert calls == [(True, str(tmp_path / "b.json"))]
    with pytest.raises(SystemExit, match="runs alone"):
        cli.main(["bench", "--only", name, "lowrank"])


def test_tt_useful_flops_are_no_more_than_the_kernels_picked_on_a_gpu():
    """8^4 r8 at M=8192 runs the Kronecker-sum kernel, 2*M*8*2*64^3 = 68.7 GFLOP: useful FLOPs
    counted as sequential contraction (77.3 GFLOP) exceeded the executed ones and raised the floor."""
    layer = tt.make("tt", "8x8x8x8-r8", "auto")
    for mode, factor in (("fwd", 1), ("fwd+bwd", 3)):
        useful, executed, _, picked = tt.costs(layer, 8192, torch.bfloat16, mode, "cuda")
        assert useful == factor * 2.0 * 8192 * 8 * 2 * 64**3 <= executed, picked
    assert tt.useful_flops(8192, (16,) * 3, (16,) * 3, (1, 16, 16, 1)) == 2.0 * 8192 * 4096**2  # dense is cheapest


def test_separable_fwd_bwd_bytes_count_the_passes_the_backward_makes():
    """The backward reads dy once (its projection serves dx and dC) and writes dx; from
    KEEP_U_MIN_ROWS rows x's projections come from the forward (fp32), below x is read again."""
    from tspline_kernels.spline import ops

    layer = spline.LAYERS["spline.bspline"](4096)
    act = 2 * 8192 * (4096 + 4096)
    _, _, fwd = spline.costs("spline.bspline", layer, 8192, 2, "fwd")
    useful, executed, both = spline.costs("spline.bspline", layer, 8192, 2, "fwd+bwd")
    assert fwd == act and both == 2 * act + 8 * 8192 * 64
    assert useful == 2 * (2 * 8192 * (4 * 4096 + 64 * 64 + 4 * 4096)) + 2 * 8192 * 64 * 64 <= executed
    m = ops.KEEP_U_MIN_ROWS - 1
    assert spline.costs("spline.bspline", layer, m, 2, "fwd+bwd")[2] == 2 * 2 * m * 8192 + 2 * m * 4096
    hier = spline.LAYERS["spline.hierarchical"](4096)
    assert spline.costs("spline.hierarchical", hier, 8192, 2, "fwd")[2] == act  # one input pass, y once


def test_fwd_bwd_seed_gradient_is_made_once_not_per_repetition():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    made = []
    real = torch.ones_like
    for step in (harness.forward_backward(layer, x), harness.dense_call(x, 4, "fwd+bwd")):
        made.clear()
        torch.ones_like = lambda t, **kw: (made.append(1), real(t, **kw))[1]
        try:
            for _ in range(3):
                for t in step.grads:
                    t.grad = None
                step()
        finally:
            torch.ones_like = real
        assert len(made) == 1
        torch.testing.assert_close(step.grads[-1].grad, torch.full((4,), 3.0))
