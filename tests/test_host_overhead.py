"""The launch stub of ``bench/host_overhead.py``: it records every Triton launch with its grid, runs
no kernel body, restores Triton afterwards, and the benchmark's rows count launches per call. And
what cut the overhead computes the same: an op's eager path (``EagerOp``) against its custom op,
and the layers' outputs after parameter updates.
Timings are benchmarks, never tests: nothing here checks one."""

import contextlib
import json

import pytest
import torch
from torch._library.custom_ops import CustomOpDef
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction, KernelInterface

import tspline_kernels as tk
from tspline_kernels._backend import EagerOp, register_autograd
from tspline_kernels import _triton
from tspline_kernels._triton import cdiv, tl, triton
from tspline_kernels.bench import host_overhead
from tspline_kernels.bench.host_overhead import Launch, stubbed_launches
from tspline_kernels.lowrank import kernels as lowrank_kernels
from tspline_kernels.lowrank import ops as lowrank_ops
from tspline_kernels.spline import ops as spline_ops
from tspline_kernels.testing import assert_close


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
    "kronecker no bias": (lambda: tk.KroneckerLinear((5, 8), (4, 6), bias=False), 1, 3),
    # the gate program, then the forward; + factor grads on the forward's maps, the gates'
    # pullback, dx; with biases the layer runs the gated op without gates: its kernels find the
    # closed-form bias
    "kronecker": (lambda: tk.KroneckerLinear((5, 8), (4, 6)), 2, 5),
    "kronecker gated": (lambda: tk.KroneckerLinear((5, 8), (4, 6), gated=True), 2, 5),
    # + dx, d(params) and the sum of the gradient's partial slots (one per output x input tile)
    "gaussian": (lambda: tk.SplineLinear(40, 24, basis="gaussian", n_control_points=7), 1, 4),
    "eisenstein local": (lambda: tk.SplineLinear(40, 24, basis="eisenstein", n_control_points=20, support="local"),
                         1, 4),
    "decoupled": (lambda: tk.DecoupledSplineMLP(40, 24, rank=5, n_basis=6), 1, 3),  # + fused backward + factor grads
    # input and output pass; + the input pass on dy (which sums the bias gradient too) for both dx's
    # output pass and dC, the input pass on x, dC's product
    "bspline": (lambda: tk.SplineLinear(40, 24, grid=(6, 9)), 2, 6),
    # one input pass for both grids, an output pass per grid; + the same for dy (both grids' output
    # bases) and x, dx's output pass and dC's product per grid
    "hierarchical": (lambda: tk.HierarchicalSplineLinear(40, 24, coarse_grid=(4, 5), fine_grid=(6, 9)), 3, 9),
    # chain and slot sum; + both for dx, the gradient chain, the sum of its slots, the projection
    # onto the controls
    "spline-tt": (lambda: tk.SplineTTLinear((4, 5, 2), (3, 4, 2), 2, (4, 4)), 2, 7),
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
            with stubbed_launches() as launches, torch.set_grad_enabled(host_overhead.GRAD_MODE[mode]):
                calls[mode]()
            assert len(launches) == expected, f"{mode}: {launches}"
            assert all(g >= 1 for launch in launches for g in launch.grid), launches


@pytest.mark.parametrize("build, levels", [
    (lambda: tk.SplineLinear(40, 24, grid=(6, 9)), 1),
    (lambda: tk.HierarchicalSplineLinear(40, 24, coarse_grid=(4, 5), fine_grid=(6, 9)), 2),
])
def test_training_forward_of_many_rows_keeps_x_projection(build, levels, monkeypatch):
    """From ``KEEP_U_MIN_ROWS`` rows a training forward's output passes keep x @ Bi, and the backward
    runs no input pass on x (one pass for every level): one launch fewer."""
    _forbid_kernel_bodies(monkeypatch)
    monkeypatch.setattr(spline_ops, "KEEP_U_MIN_ROWS", 15)
    layer = build()
    launches_per_call = {}
    for rows in (14, 15):
        with tk.backend("triton"), stubbed_launches() as launches:
            host_overhead.calls(layer, torch.randn(rows, 40))["fwd+bwd"]()
        launches_per_call[rows] = [launch.kernel for launch in launches]
    assert launches_per_call[14].count("_separable_in_kernel") == 3
    assert launches_per_call[15].count("_separable_in_kernel") == 2
    assert len(launches_per_call[15]) == len(launches_per_call[14]) - 1
    assert launches_per_call[14].count("_separable_out_kernel") == 2 * levels  # y's and dx's, per level


def test_measure_layer_row(monkeypatch):
    _forbid_kernel_bodies(monkeypatch)
    with tk.backend("triton"):
        row = host_overhead.measure_layer("lowrank", tk.LowRankLinear(40, 24, 3), "cpu", torch.float32, 1.5, 0.01)
    assert (row["fwd_launches"], row["fwd+bwd_launches"]) == (1, 3)
    assert row["fwd_kernels"] == ["_lowrank_fwd_kernel"]
    assert row["fwd+bwd_kernels"] == ["_lowrank_fwd_kernel", "_lowrank_grad_kernel"]
    assert row["fwd_us"] > 0 and row["fwd+bwd_us"] > 0
    for mode, goal in (("fwd", host_overhead.GOAL_FWD_US), ("fwd+bwd", host_overhead.GOAL_FWD_BWD_US)):
        # the host time is the measured time less the stub's 1.5 us per stubbed launch, and the goal is on it
        assert row[f"{mode}_host_us"] == pytest.approx(row[f"{mode}_us"] - 1.5 * row[f"{mode}_launches"])
        assert row[f"{mode}_goal_met"] == (row[f"{mode}_host_us"] <= goal)


@pytest.mark.skipif(not _triton.INTERPRET, reason="on a GPU the autotuners carry the GPU's configs already")
def test_gpu_configs_put_the_gpu_paths_under_the_stub(monkeypatch):
    """Without a GPU the benchmark measures the paths the GPU's configs choose: TT 8^4 rank 8 takes
    the chain kernel (no chain config fits it under the interpreter's small blocks: per-step
    kernels); every autotuner gets its configs back afterwards."""
    _forbid_kernel_bodies(monkeypatch)
    from tspline_kernels.bench.every_config import autotuners

    before = {name: t.configs for name, t in autotuners().items()}
    layer = tk.TTLinear((8,) * 4, (8,) * 4, 8, strategy="contract")
    x = torch.randn(16, 4096)
    kernels = {}
    for gpu in (False, True):
        with tk.backend("triton"), torch.no_grad(), stubbed_launches() as launches, \
                host_overhead.gpu_configs() if gpu else contextlib.nullcontext():
            layer(x)
        kernels[gpu] = [launch.kernel for launch in launches]
    assert kernels == {False: ["_step_kernel"] * 4, True: ["_chain_kernel", "_slot_sum_kernel"]}
    assert all(t.configs is before[name] for name, t in autotuners().items())


def test_stub_cost_is_measured_on_a_stubbed_launch(monkeypatch):
    _forbid_kernel_bodies(monkeypatch)
    assert 0 < host_overhead.stub_us(0.01) < 1000


def test_torch_kernels_counts_arithmetic_not_views():
    a = torch.randn(8, 8)
    count = host_overhead.torch_kernels(lambda: (a.view(64).reshape(8, 8).t(), torch.empty(3), a.to(a.dtype), a + 1,
                                                 a.sum(), a.to(torch.float64), torch.ones_like(a)))
    assert count == 4  # the add, the sum, the cast's copy and the ones' fill


# ------------------------------------------------------------------------------ eager op path
def _lowrank_args(dtype=torch.float32):
    torch.manual_seed(1)
    shapes = ((2, 3, 19), (19, 4), (13, 4), (13,))
    return [torch.randn(*s, dtype=dtype, requires_grad=True) for s in shapes]


@pytest.mark.parametrize("which", ["reference", "triton"])
def test_eager_op_matches_the_custom_op(which):
    """The eager path (an autograd.Function) and the custom op's dispatch give the same outputs and
    gradients, and the eager path is the one a plain call takes."""
    assert isinstance(lowrank_ops.lowrank_linear, EagerOp)
    results = []
    for call in (lowrank_ops.lowrank_linear, torch.ops.tspline.lowrank_linear.default):
        args = _lowrank_args()
        with tk.backend(which):
            y, t = call(*args)
            (y.square().sum() + t.sum()).backward()  # both outputs reach the loss
        results.append((y.grad_fn, [y, t, *(a.grad for a in args)]))
    (eager_fn, eager), (op_fn, op) = results
    assert "eager" in type(eager_fn).__name__ and "eager" not in type(op_fn).__name__
    for name, a, b in zip(["y", "t", "dx", "da", "db", "dbias"], eager, op):
        assert_close(a, b, name=name)


def test_eager_op_double_backward():
    args = [a.detach().double().requires_grad_() for a in _lowrank_args()]
    with tk.backend("reference"):
        assert torch.autograd.gradgradcheck(lambda *a: lowrank_ops.lowrank_linear(*a)[0], args)


def test_eager_op_without_autograd_is_a_plain_call():
    args = _lowrank_args()
    with torch.no_grad(), tk.backend("reference"):
        y, _ = lowrank_ops.lowrank_linear(*args)
    assert y.grad_fn is None and not y._is_view()


class _Record(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def test_eager_op_leaves_modes_and_keywords_to_the_custom_op():
    """Under a dispatch mode (fake tensors, tracing, opcheck's recorders) and with keyword arguments
    the call goes through the custom op, which the mode sees."""
    args = _lowrank_args()
    with tk.backend("reference"), _Record() as rec:
        lowrank_ops.lowrank_linear(*args)
    assert torch.ops.tspline.lowrank_linear.default in rec.ops
    with tk.backend("reference"):
        y, _ = lowrank_ops.lowrank_linear(*args[:3], bias=args[3])
    assert "eager" not in type(y.grad_fn).__name__


def test_ops_with_tensor_lists_take_the_eager_path_with_and_without_autograd(monkeypatch):
    """A tensor-list argument is flattened into the eager Function and regrouped for the op's
    function, setup and backward (``needs_input_grad`` with a list of flags for the list); the
    gradients match the custom op's; an op returning a tensor list keeps the custom op with autograd."""
    @torch.library.custom_op("tspline_test::scaled_sum", mutates_args=())
    def scaled_sum(x: torch.Tensor, xs: list[torch.Tensor], s: float) -> torch.Tensor:
        return (x + sum(xs)) * s

    def setup(ctx, inputs, output):
        ctx.n, ctx.s = len(inputs[1]), inputs[2]

    needs = []

    def backward(ctx, g):
        needs.append(ctx.needs_input_grad)
        return g * ctx.s, [g * ctx.s if need else None for need in ctx.needs_input_grad[1]], None

    register_autograd(scaled_sum, backward, setup)
    assert isinstance(scaled_sum, EagerOp) and scaled_sum._eager_function is not None
    dispatched = []
    custom_call = CustomOpDef.__call__
    monkeypatch.setattr(CustomOpDef, "__call__", lambda self, *a, **k: dispatched.append(1) or custom_call(self, *a, **k))
    x = torch.randn(3, requires_grad=True)
    xs = [torch.randn(3, requires_grad=True), torch.randn(3), torch.randn(3, requires_grad=True)]
    with torch.no_grad():
        torch.testing.assert_close(scaled_sum(x, xs, 2.0), (x + xs[0] + xs[1] + xs[2]) * 2)
    y = scaled_sum(x, xs, 3.0)
    assert dispatched == [] and "eager" in type(y.grad_fn).__name__
    eager = torch.autograd.grad(y, [x, xs[0], xs[2]], torch.arange(3.0))
    via_op = torch.autograd.grad(torch.ops.tspline_test.scaled_sum(x, xs, 3.0), [x, xs[0], xs[2]], torch.arange(3.0))
    assert needs == [(True, [True, False, True], False)] * 2
    for a, b in zip(eager, via_op):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, torch.arange(3.0) * 3)

    @torch.library.custom_op("tspline_test::split_two", mutates_args=())
    def split_two(x: torch.Tensor) -> list[torch.Tensor]:
        return [x * 1, x * 2]

    register_autograd(split_two, lambda ctx, gs: gs[0] + 2 * gs[1], lambda ctx, inputs, output: None)
    assert split_two._eager_function is None
    dispatched.clear()
    sum(split_two(x)).sum().backward()
    assert dispatched == [1] and torch.equal(x.grad, torch.full((3,), 3.0))


# ------------------------------------------------------------------------ values after updates
def _kron_reference(layer, x):
    with tk.backend("reference"):
        return torch.nn.functional.linear(x, layer.materialize(), layer.effective_bias())


@pytest.mark.parametrize("which", ["reference", "triton"])
def test_kronecker_inference_follows_every_parameter_update(which):
    torch.manual_seed(2)
    layer = tk.KroneckerLinear((3, 5, 2), (4, 3, 2))
    x = torch.randn(4, layer.in_features)
    with tk.backend(which), torch.no_grad():
        layer(x)
        layer.factors[1].mul_(-2.0)  # an optimizer-like in-place step
        assert_close(layer(x), _kron_reference(layer, x), name="in-place")
        layer.load_state_dict({k: v + 1 for k, v in layer.state_dict().items() if k != "_extra_state"},
                              strict=False)
        assert_close(layer(x), _kron_reference(layer, x), name="load_state_dict")
        dtype = torch.float64 if which == "reference" else torch.float16  # new storage through _apply
        layer.to(dtype)
        assert_close(layer(x.to(dtype)), _kron_reference(layer, x.to(dtype)), name=f".to({dtype})")


def test_kronecker_training_steps_build_a_fresh_graph_each_call():
    torch.manual_seed(3)
    layer = tk.KroneckerLinear((3, 5), (4, 3))
    x = torch.randn(4, layer.in_features)
    with tk.backend("reference"):
        with torch.no_grad():
            layer(x)  # an inference call first: its kept value must not leak into training
        for _ in range(2):  # a kept graph would fail the second backward
            layer.zero_grad()
            layer(x).square().sum().backward()
        grads = [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad()
        _kron_reference(layer, x).square().sum().backward()
    for g, p in zip(grads, layer.parameters()):
        assert_close(g, p.grad)


@pytest.mark.parametrize("basis", ["bicubic", "gaussian"])
def test_spline_inference_follows_parameter_updates(basis):
    torch.manual_seed(4)
    layer = tk.SplineLinear(11, 7, basis=basis, n_control_points=5)
    x = torch.randn(3, 11)
    with tk.backend("reference"), torch.no_grad():
        layer(x)
        for p in layer.parameters():
            p.mul_(0.5)
        expected = torch.nn.functional.linear(x, layer.materialize(), layer.bias)
        assert_close(layer(x), expected)


def test_host_compare_summarizes_minima_and_medians():
    """``bench.host_compare``'s table: per layer and mode each side's minimum and median over its
    runs, and the change of the minima (head less base)."""
    from tspline_kernels.bench.host_compare import summarize

    def run(fwd: float, both: float) -> dict:
        return {"lowrank r16": {"fwd": fwd, "fwd+bwd": both}}

    lines = summarize({"base": [run(14.0, 95.0), run(13.0, 99.0), run(15.0, 91.0)],
                       "head": [run(12.0, 90.0), run(12.5, 88.0), run(13.0, 89.0)]})
    assert len(lines) == 3
    assert lines[1].split()[-5:] == ["13.0", "14.0", "12.0", "12.5", "-1.0"]
    assert lines[2].split()[-5:] == ["91.0", "95.0", "88.0", "89.0", "-3.0"]


def test_instruction_rows_leave_out_the_stub_and_torch_arithmetic():
    """``--instructions``' rows: per call, all counted instructions less torch's kernel loops, and for a
    stubbed layer less the stub's per launch; the ratio is over nn.Linear 64's host count."""
    order = [["launch stub", "fwd", 1], ["nn.Linear 64 (dispatch only)", "fwd", 0],
             ["nn.Linear 64 (dispatch only)", "fwd+bwd", 0], ["lowrank r16", "fwd", 1], ["lowrank r16", "fwd+bwd", 3]]
    totals = [1_000, 60_000, 300_000, 150_000, 800_000]  # over 10 calls each
    arithmetic = [0, 2_000, 4_000, 0, 100_000]
    rows = {r["layer"]: r for r in host_overhead.instruction_rows(order, totals, arithmetic, 10)}
    lowrank, linear = rows["lowrank r16"], rows["nn.Linear 64 (dispatch only)"]
    assert (linear["fwd_instructions"], linear["fwd+bwd_instructions"]) == (5_800, 29_600)  # not stubbed
    assert (lowrank["fwd_instructions"], lowrank["fwd+bwd_instructions"]) == (15_000 - 100, 70_000 - 300)
    assert lowrank["fwd+bwd_arithmetic_instructions"] == 10_000 and lowrank["fwd+bwd_launches"] == 3
    assert lowrank["fwd+bwd_vs_linear64"] == pytest.approx(69_700 / 29_600)


def test_callgrind_child_marks_exactly_the_counted_calls(monkeypatch, tmp_path):
    """Under callgrind each ``os.getsid`` dumps the counts since the last: per row the child calls it
    once after the warm-up and once after the counted calls, so every second dump holds exactly
    ``calls`` calls of that row; the manifest lists the rows in that order with their launches."""
    _forbid_kernel_bodies(monkeypatch)
    events = []
    monkeypatch.setattr(host_overhead.os, "getsid", lambda pid: events.append("mark"))
    monkeypatch.setattr(host_overhead, "LAYERS", {"lowrank": lambda: tk.LowRankLinear(40, 24, 3)})
    real_calls = host_overhead.calls

    def counted_calls(layer, x):
        return {mode: (lambda fn=fn: (events.append("call"), fn())) for mode, fn in real_calls(layer, x).items()}

    monkeypatch.setattr(host_overhead, "calls", counted_calls)
    host_overhead._callgrind_child(["lowrank"], 3, str(tmp_path / "order.json"))
    order = json.loads((tmp_path / "order.json").read_text())
    assert [row[:2] for row in order[1:]] == [[name, mode] for name in (*host_overhead.COUNTED_BASELINES, "lowrank")
                                               for mode in ("fwd", "fwd+bwd")]
    assert order[-2][2] == 1 and order[-1][2] == 3  # lowrank's launches per fwd, fwd+bwd
    between = "".join("|" if e == "mark" else "c" for e in events).split("|")
    assert len(between) == 2 * len(order) + 1
    # dump 2k + 2 holds row k's counted calls (split segment 2k + 1): none of calls() for the stub's row
    assert between[1] == "" and between[3::2] == ["ccc"] * (len(order) - 1)
