"""Triton TT and spline-TT kernels against the reference: forward, dx, every core / control gradient
and the bias gradient, with each strategy forced ("contract" and "rebuild") and "auto".

On CPU the kernels run under the Triton interpreter, on CUDA compiled; modes are deliberately odd
(non powers of two) so every padded and masked lane is exercised. Tolerances:
``tspline_kernels.testing.TOLERANCES`` for the input dtype.
"""

import math
from collections import OrderedDict

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tspline_kernels import backend
from tspline_kernels._triton import triton
from tspline_kernels.bench.host_overhead import stubbed_launches
from tspline_kernels.reference import tt as ref
from tspline_kernels.spline_tt import SplineTTLinear
from tspline_kernels.testing import assert_backends_agree, assert_close, cuda_step_peak_bytes
from tspline_kernels.tt import TTLinear, suggest_modes
from tspline_kernels.tt import chain, kernels

# (in_modes, out_modes, ranks)
TT = {
    "d2-3x5-7x2-r3": ((3, 5), (7, 2), (1, 3, 1)),
    "d2-rank1": ((3, 5), (7, 2), (1, 1, 1)),
    "d3-3x2x5-r23": ((3, 2, 5), (2, 3, 4), (1, 2, 3, 1)),
    "d3-rank1": ((3, 2, 5), (5, 1, 3), (1, 1, 1, 1)),
    "d2-wide-head-37x3": ((37, 3), (5, 2), (1, 3, 1)),  # several K blocks and grad splits per program
    "d4-2x3x2x3-r213": ((2, 3, 2, 3), (3, 2, 2, 2), (1, 2, 1, 3, 1)),  # two middle steps in the chain kernel
}
STRATEGIES = ["contract", "rebuild"]


def inputs(layer, lead, device, dtype):
    x = torch.randn(*lead, layer.in_features, device=device, dtype=dtype)
    g = torch.randn(*lead, layer.out_features, device=device, dtype=dtype)
    return x, g


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", list(TT), ids=list(TT))
def test_tt_fp32(name, strategy, kernel_device):
    layer = TTLinear(*TT[name], strategy=strategy).to(kernel_device)
    assert_backends_agree(layer, *inputs(layer, (2, 3), kernel_device, torch.float32), torch.float32)  # 3-D input


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", ["d2-3x5-7x2-r3", "d3-3x2x5-r23"])
def test_tt_half(name, strategy, dtype, kernel_device):
    layer = TTLinear(*TT[name], strategy=strategy).to(kernel_device, dtype)
    assert_backends_agree(layer, *inputs(layer, (9,), kernel_device, dtype), dtype)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tt_many_rows(strategy, kernel_device):
    """More rows than one block: several M blocks (rebuild) and column splits (contract grads)."""
    layer = TTLinear(*TT["d3-3x2x5-r23"], strategy=strategy).to(kernel_device)
    assert_backends_agree(layer, *inputs(layer, (50,), kernel_device, torch.float32), torch.float32)


def check_empty_batch(layer, device: str, which: str) -> None:
    """No rows, as ``(0, in)`` and ``(2, 0, in)``: output and dx are empty, every parameter gradient
    exists and is zero (not None, not NaN)."""
    for lead in ((0,), (2, 0)):
        layer.zero_grad(set_to_none=True)
        x = torch.randn(*lead, layer.in_features, device=device, requires_grad=True)
        with backend(which):
            y = layer(x)
            y.sum().backward()
        assert y.shape == (*lead, layer.out_features) and x.grad.shape == x.shape
        assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in layer.parameters())


@pytest.mark.parametrize("which", ["triton", "reference"])
@pytest.mark.parametrize("strategy", ["auto", *STRATEGIES])
def test_tt_empty_batch(strategy, which, kernel_device):
    layer = TTLinear(*TT["d3-3x2x5-r23"], strategy=strategy).to(kernel_device)
    assert (layer.in_features, layer.out_features) == (30, 24)
    check_empty_batch(layer, kernel_device, which)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tt_non_contiguous_and_partial_grads(strategy, kernel_device):
    """Strided inputs; only the cores need grad (frozen input); only the input needs grad (frozen cores)."""
    layer = TTLinear(*TT["d3-3x2x5-r23"], strategy=strategy).to(kernel_device)
    x = torch.randn(30, 6, device=kernel_device).T  # transposed: neither stride is 1 along a row
    g = torch.randn(6, 24, device=kernel_device)
    assert_backends_agree(layer, x, g, torch.float32)
    assert_backends_agree(layer, x, g, torch.float32, x_grad=False)
    layer.requires_grad_(False)
    assert_backends_agree(layer, x, g, torch.float32)


def test_tt_auto_runs_the_picked_strategy(spy, kernel_device):
    calls = spy(kernels, "contract_linear", "rebuild_linear")
    layer = TTLinear(*TT["d2-3x5-7x2-r3"]).to(kernel_device)
    x = torch.randn(5, 15, device=kernel_device)
    with backend("triton"), torch.no_grad():
        y = layer(x)
    assert calls == [f"{layer.picked_strategy(5)}_linear"]
    assert_close(y, torch.nn.functional.linear(x, layer.materialize(), layer.bias))


def test_tt_auto_backward_runs_its_own_pick(spy, monkeypatch, kernel_device):
    """The core gradients (and dx) run the strategy picked for the backward: here rebuild, after a
    contract forward (register tiles that fit the chain kernel but not the gradient chain)."""
    calls = spy(kernels, "contract_grad", "rebuild_grad")
    monkeypatch.setattr(kernels.cost, "CHAIN_MAX_TILE", 2048)
    layer = TTLinear(*TT["d3-3x2x5-r23"]).to(kernel_device)
    x = torch.randn(5, 30, device=kernel_device)
    assert layer.picked_strategy(5) == "contract" and layer.picked_strategy(5, backward=True) == "rebuild"
    with backend("triton"):
        layer(x).sum().backward()
    assert calls == ["rebuild_grad"]


def test_contract_never_writes_a_state(monkeypatch, kernel_device):
    """Where the chain kernels fit, contract's forward, dx and core gradients never run a step
    kernel (so no state reaches global memory): one chain launch forward, one gradient-chain
    launch and one chain launch on the cores of W.T backward."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a per-step launch wrote a state to global memory")

    monkeypatch.setattr(kernels, "_step", forbidden)
    monkeypatch.setattr(kernels, "_grad_step", forbidden)
    d6 = ((2, 1, 3, 2, 1, 2), (1, 2, 2, 1, 3, 2), (1, 2, 3, 1, 2, 2, 1))  # the most cores a layer takes
    for shape in (TT["d2-3x5-7x2-r3"], TT["d3-3x2x5-r23"], TT["d4-2x3x2x3-r213"], d6):
        layer = TTLinear(*shape, strategy="contract").to(kernel_device)
        x, g = inputs(layer, (6,), kernel_device, torch.float32)
        assert_backends_agree(layer, x, g, torch.float32)
        layer.requires_grad_(False)  # dx alone: a chain launch on the cores of W.T
        assert_backends_agree(layer, x, g, torch.float32)


@pytest.mark.parametrize("name", ["d2-3x5-7x2-r3", "d3-3x2x5-r23"])
def test_contract_falls_back_to_step_kernels(name, monkeypatch, kernel_device):
    """Cores whose chain tiles do not fit run the per-step kernels (forward and backward), with
    the same results."""
    monkeypatch.setattr(kernels.cost, "CHAIN_MAX_TILE", 8)
    layer = TTLinear(*TT[name], strategy="contract").to(kernel_device)
    cores = kernels.plain_cores(list(layer.cores))
    modes = kernels.core_modes(cores)
    assert not kernels.chain_fits(modes) and not kernels.chain_fits(modes, grad=True)
    assert_backends_agree(layer, *inputs(layer, (2, 3), kernel_device, torch.float32), torch.float32)


def test_chain_plans_are_valid_dot_shapes():
    """Every chain plan has power-of-two tiles with each tl.dot side >= 16, within the tile limit;
    the benchmark shapes (16^3 rank 16, 8^4 rank 8) fit, forward and gradient, an oversized middle
    core does not."""
    shapes = [((3, 2, 5), (2, 3, 4), (1, 2, 3, 1)), ((16, 16, 16), (16, 16, 16), (1, 16, 16, 1)),
              ((8,) * 4, (8,) * 4, (1, 8, 8, 8, 1)), ((37, 3), (5, 2), (1, 3, 1)), ((1, 1), (1, 1), (1, 1, 1))]
    for ins, outs, ranks in shapes:
        plans = kernels.cost.chain_plans(ins, outs, ranks)
        assert plans, ins
        for p in plans:
            assert p.largest_tile() <= kernels.cost.CHAIN_MAX_TILE
            for k in range(len(ins)):
                for n in (p.x[k], p.rp[k] * p.ni[k], p.no[k] * p.rp[k + 1]):
                    assert n >= 16 and n & (n - 1) == 0, (ins, p)
                assert p.rp[k + 1] >= ranks[k + 1] and p.no[k] * math.ceil(outs[k] / p.no[k]) >= outs[k]
        assert kernels.cost.chain_plans(ins, outs, ranks, grad=True), ins
    assert not kernels.cost.chain_plans((16, 256, 16), (16, 256, 16), (1, 32, 32, 1))
    # fp32 gradients need half-size tiles (shared memory): 8^4 rank 8 takes the step kernels there
    assert not kernels.cost.chain_plans((8,) * 4, (8,) * 4, (1, 8, 8, 8, 1), grad=True, elt=4)


@pytest.mark.parametrize("grad", [False, True], ids=["chain", "grad-chain"])
def test_chain_pruner_never_empty(grad):
    """The chain pruner over the GPU config space keeps one config per fitting plan, and where no
    plan fits (a direct launch; the launchers take the step kernels there) the config with the
    smallest tiles instead of an empty list."""
    space = kernels.cost.CHAIN_GRAD_CONFIGS if grad else kernels.cost.CHAIN_CONFIGS
    cfgs = [triton.Config(dict(zip(("BM", "BO1", "BO2", "CD"), c)), num_warps=4, num_stages=2) for c in space]
    prune = chain._chain_pruner(grad)
    x = torch.empty(0, dtype=torch.bfloat16)
    small = ((3, 2, 5), (2, 3, 4), (1, 2, 3, 1))
    kept = prune(cfgs, dict(zip(("IN", "OUT", "RANK"), small), x_ptr=x))
    plans = [kernels.cost.chain_plan(*small, *chain.config_key(c)) for c in kept]
    assert kept and len(set(plans)) == len(plans) and set(plans) <= set(kernels.cost.chain_plans(*small, space, grad))
    big = ((16, 256, 16), (16, 256, 16), (1, 32, 32, 1))
    assert not kernels.cost.chain_plans(*big, space, grad)
    kept = prune(cfgs, dict(zip(("IN", "OUT", "RANK"), big), x_ptr=x))
    tiles = [kernels.cost.chain_plan(*big, *chain.config_key(c)).largest_tile() for c in cfgs]
    assert len(kept) == 1 and kernels.cost.chain_plan(*big, *chain.config_key(kept[0])).largest_tile() == min(tiles)


def _spy_grad_splits(monkeypatch) -> list:
    """Record every ``cost.grad_split`` the gradient chain launcher asks for (its grid's choices)."""
    seen = []

    def spy(*args, **kwargs):
        seen.append(split(*args, **kwargs))
        return seen[-1]

    split = kernels.cost.grad_split
    monkeypatch.setattr(kernels.cost, "grad_split", spy)
    kernels._grad_launch.cache_clear()  # launches are planned once per layout and row count
    return seen


# (shape, rows, programs aimed at, slot budget in bytes) -> the (groups, per_group, splits) the grid
# must take under the interpreter's config (BM 16, BO 2 x 2, CD 2: I_d = 5 is 3 chunks)
GRAD_SPLITS = {
    "d3-groups-with-a-tail": ("d3-3x2x5-r23", 9, 4, 1 << 20, (2, 2, 1)),  # chunk 4 of 4 past I_d: zero tile
    "d3-groups-and-row-splits": ("d3-3x2x5-r23", 40, 16, 1 << 20, (3, 1, 2)),
    "d3-over-budget": ("d3-3x2x5-r23", 40, 16, 1, (1, 3, 1)),  # the least: one group, one split
    "d2-groups-and-row-splits": ("d2-3x5-7x2-r3", 40, 32, 1 << 20, (3, 1, 2)),  # core 2 has O_2 blocks and chunks
    "d4-row-splits": ("d4-2x3x2x3-r213", 50, 64, 1 << 20, (2, 1, 4)),
}


@pytest.mark.parametrize("case", list(GRAD_SPLITS), ids=list(GRAD_SPLITS))
def test_chain_grad_splits(case, monkeypatch, kernel_device):
    """The gradient chain kernel with chunk groups (a last group past I_d included), row splits and
    a budget that allows neither: the core gradients match the reference, the grid took the
    expected split, and the partial slots hold no more than the budget (or, over it, the least the
    O blocks need: one group of all the chunks, one row split)."""
    name, rows, programs, budget, expected = GRAD_SPLITS[case]
    monkeypatch.setattr(kernels, "GRAD_PROGRAMS", programs)
    monkeypatch.setattr(kernels.cost, "CHAIN_GRAD_PART_BYTES", budget)
    forbid(monkeypatch, *PATHS["chain"])
    seen = _spy_grad_splits(monkeypatch)
    layer = TTLinear(*TT[name], strategy="contract").to(kernel_device)
    assert_backends_agree(layer, *inputs(layer, (rows,), kernel_device, torch.float32), torch.float32)
    split = seen[-1]
    assert (split.groups, split.per_group, split.splits) == expected
    assert 4 * split.elements <= budget or (split.groups, split.splits) == (1, 1)


def test_chain_grad_is_deterministic(monkeypatch, kernel_device):
    """Two gradient chain launches on the same inputs give bitwise-equal core gradients (slots
    summed on the host in a fixed order, no atomics), with several programs per core entry."""
    monkeypatch.setattr(kernels, "GRAD_PROGRAMS", 16)
    seen = _spy_grad_splits(monkeypatch)
    layer = TTLinear(*TT["d3-3x2x5-r23"], strategy="contract").to(kernel_device)
    cores = kernels.plain_cores([c.detach() for c in layer.cores])
    x, g = inputs(layer, (40,), kernel_device, torch.float32)
    first, second = kernels.chain_grad(g, x, cores), kernels.chain_grad(g, x, cores)
    assert seen[-1].groups * seen[-1].splits > 1
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(t.is_contiguous() for t in first)


def test_chain_grad_partial_slots_are_bounded():
    """For the benchmark shapes (16^3 rank 16, 8^4 rank 8) at M = 16 and 8192 on the GPU's program
    target, every gradient config that fits keeps its partial slots within the budget, or, where
    one group and split per O block exceed it, takes exactly that least split; never more than
    a sixth of W (4096 x 4096 bf16)."""
    cost = kernels.cost
    for ins, outs, ranks in [((16,) * 3, (16,) * 3, (1, 16, 16, 1)), ((8,) * 4, (8,) * 4, (1, 8, 8, 8, 1))]:
        for plan in cost.chain_plans(ins, outs, ranks, grad=True):
            for m in (16, 8192):
                split = cost.grad_split(plan, m, ins, outs)
                nbytes = 4 * split.elements
                assert nbytes <= cost.CHAIN_GRAD_PART_BYTES or (split.groups, split.splits) == (1, 1), (plan, m)
                assert nbytes <= 4096 * 4096 * 2 / 6 and math.prod(split.grid) <= cost.CHAIN_GRAD_PROGRAMS


def test_rebuild_tiles_are_valid_dot_shapes():
    for o_d, i_d, r in [(1, 1, 1), (7, 2, 3), (5, 3, 17), (16, 16, 16), (8, 8, 8), (2, 64, 4)]:
        t = kernels.rebuild_tiles(o_d, i_d, r)
        assert t.odp >= o_d and t.idp >= i_d and t.rp >= max(r, 16)
        for n in (t.po * t.pi, t.odp * t.idp, t.po * t.odp, t.pi * t.idp):
            assert n >= 16 and n & (n - 1) == 0


# ------------------------------------------------------------------------------------ spline TT
SPLINE = {
    "d2-9x6-5x7": ((9, 6), (5, 7), (1, 3, 1), (4, 5)),
    "d3-odd": ((5, 4, 7), (6, 5, 4), (1, 2, 3, 1), [(4, 4), (5, 4), (4, 6)]),
    "d2-rank1-grid-over-mode": ((3, 5), (7, 2), (1, 1, 1), (4, 4)),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", list(SPLINE), ids=list(SPLINE))
def test_spline_tt_fp32(name, strategy, kernel_device):
    in_modes, out_modes, ranks, grid = SPLINE[name]
    layer = SplineTTLinear(in_modes, out_modes, ranks, grid, strategy=strategy).to(kernel_device)
    assert_backends_agree(layer, *inputs(layer, (2, 3), kernel_device, torch.float32), torch.float32)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_spline_tt_bf16(strategy, kernel_device):
    in_modes, out_modes, ranks, grid = SPLINE["d3-odd"]
    layer = SplineTTLinear(in_modes, out_modes, ranks, grid, strategy=strategy).to(kernel_device, torch.bfloat16)
    assert_backends_agree(layer, *inputs(layer, (7,), kernel_device, torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("which", ["triton", "reference"])
@pytest.mark.parametrize("strategy", ["auto", *STRATEGIES])
def test_spline_tt_empty_batch(strategy, which, kernel_device):
    layer = SplineTTLinear((5, 4), (6, 5), 2, (4, 4), strategy=strategy).to(kernel_device)
    assert (layer.in_features, layer.out_features) == (20, 30)
    check_empty_batch(layer, kernel_device, which)


def test_spline_contract_never_forms_cores(monkeypatch, kernel_device):
    """The contract path generates core tiles from the control points in the kernel."""
    from tspline_kernels.reference import spline_tt

    def forbidden(*args):
        raise AssertionError("spline cores formed on the host")

    layer = SplineTTLinear((5, 4, 7), (6, 5, 4), 2, (4, 4), strategy="contract").to(kernel_device)
    monkeypatch.setattr(spline_tt, "spline_cores", forbidden)
    x = torch.randn(3, layer.in_features, device=kernel_device, requires_grad=True)
    with backend("triton"):
        layer(x).sum().backward()
    assert x.grad is not None and all(c.grad is not None for c in layer.control)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_spline_projection_kernel(dtype, kernel_device):
    """dC = Bo.T dG Bi (each core gradient projected onto its controls), every core by one
    ``_project_kernel`` launch, against float64: output modes over several BLOCK_O steps (a
    partial last one), modes of 1, a grid larger than its mode, ranks of 1 to 3, a strided dG;
    fp32 throughout, rounded once to the control's dtype."""
    from tspline_kernels.reference import spline_tt as sref
    from tspline_kernels.spline_tt import kernels as skernels

    cases = [(70, 37, 9, 5, 2, 3), (1, 1, 4, 4, 3, 1), (3, 20, 17, 4, 1, 2)]  # o, i, go, gi, r0, r1
    d_cores = [torch.randn(r0, i, o, r1, device=kernel_device).transpose(1, 2) for o, i, _, _, r0, r1 in cases]
    controls = [torch.empty(r0, go, gi, r1, device=kernel_device, dtype=dtype) for _, _, go, gi, r0, r1 in cases]
    got = skernels.project_to_controls(d_cores, controls)
    for g, d_core, control in zip(got, d_cores, controls):
        want = sref.project_to_control(d_core.double(), control.double())
        assert g.dtype == dtype and g.shape == control.shape and g.is_contiguous()
        assert_close(g, want.to(dtype), dtype)


# ------------------------------------------------------------------------- degenerate mode patterns
# (in_modes, out_modes, ranks) where factored index maths breaks first: modes of 1 first, in the
# middle, last and everywhere, a single mode > 1, a mode > 128, d = 2..4 (d = 1 is rejected by the
# layers: one core is a dense matrix).
DEGENERATE = {
    "d3-last-in-1": ((1, 2, 1), (1, 2, 1), 1),  # last input mode 1 after a mode > 1: y was wrong
    "d3-last-out-1": ((2, 2, 2), (2, 2, 1), 1),  # last output mode 1: dx was wrong
    "d3-suggested-12x6": (*suggest_modes(12, 6, 3), 2),  # (3, 2, 1) in, (3, 2, 2) out
    "d2-first-1": ((1, 5), (5, 1), 2),
    "d2-all-1": ((1, 1), (1, 1), 2),
    "d3-all-1": ((1, 1, 1), (1, 1, 1), 2),
    "d3-first-1": ((1, 3, 2), (2, 1, 3), 3),
    "d3-middle-1": ((3, 1, 2), (2, 3, 1), 3),
    "d3-one-mode": ((1, 1, 5), (1, 1, 3), 2),
    "d4-alternating-1": ((2, 1, 3, 1), (1, 3, 1, 2), 2),
    "d2-mode-130": ((130, 2), (3, 2), 2),
}
# each path forbids the launchers of the others, so the test proves which kernels ran
PATHS = {
    "chain": ("_step", "_grad_step", "rebuild_linear", "rebuild_grad"),
    "steps": ("chain_linear", "chain_grad", "rebuild_linear", "rebuild_grad"),
    "rebuild": ("contract_linear", "contract_grad"),
}


def forbid(monkeypatch, *names: str) -> None:
    """Make ``kernels.<name>`` raise for each name."""
    def fail(*args, **kwargs):
        raise AssertionError("a forbidden launcher ran")

    for name in names:
        monkeypatch.setattr(kernels, name, fail)


def degenerate_layer(family: str, name: str, strategy: str, device: str):
    ins, outs, ranks = DEGENERATE[name]
    if family == "tt":
        return TTLinear(ins, outs, ranks, strategy=strategy).to(device)
    return SplineTTLinear(ins, outs, ranks, (4, 4), strategy=strategy).to(device)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("name", list(DEGENERATE), ids=list(DEGENERATE))
@pytest.mark.parametrize("family", ["tt", "spline"])
def test_degenerate_modes(family, name, path, monkeypatch, kernel_device):
    """y, dx and every core / control gradient against the reference, and y against x @ W.T, on
    each path: the chain kernels, the step kernels (no chain tile fits) and rebuild."""
    if path == "steps":
        monkeypatch.setattr(kernels.cost, "CHAIN_MAX_TILE", 8)
    layer = degenerate_layer(family, name, "rebuild" if path == "rebuild" else "contract", kernel_device)
    forbid(monkeypatch, *PATHS[path])
    x, g = inputs(layer, (3,), kernel_device, torch.float32)
    assert_backends_agree(layer, x, g, torch.float32)
    with backend("triton"), torch.no_grad():
        assert_close(layer(x), torch.nn.functional.linear(x, layer.materialize(), layer.bias), name="y vs x @ W.T")


def test_suggested_modes_auto_matches_dense(kernel_device):
    """The issue's report: ``suggest_modes(12, 6, 3)`` with strategy "auto" (which picks contract)."""
    layer = TTLinear(*suggest_modes(12, 6, 3), 2).to(kernel_device)
    assert layer.picked_strategy(4) == "contract" and layer.picked_strategy(4, backward=True) == "contract"
    x, g = inputs(layer, (4,), kernel_device, torch.float32)
    assert_backends_agree(layer, x, g, torch.float32)


# fp16 magnitudes (core scales, x, dy) whose products fit fp16 while the intermediates do not:
# "x": x ~ 1e3 through a large first core, states ~1e6; "dy": the same for the dy sweep towards dx;
# "cores": two large cores (rebuild's head product L ~1e5 and the states) before a small last one.
LARGE = {"x": ((1e3, 1, 1e-3), 1e3, 1e-3), "dy": ((1e-3, 1, 1e3), 1e-3, 1e3), "cores": ((450, 450, 1e-4), 1, 1e-3)}


@pytest.mark.parametrize("large", list(LARGE))
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("family", ["tt", "spline"])
def test_fp16_intermediates_beyond_fp16_range(family, path, large, monkeypatch, kernel_device):
    """y, dx and every gradient finite in the reference (fp32 intermediates) while states or
    rebuild's head product exceed fp16's 65504: the kernels keep them in fp32 too, instead of
    returning inf / NaN."""
    if path == "steps":
        monkeypatch.setattr(kernels.cost, "CHAIN_MAX_TILE", 8)
    scales, x_scale, g_scale = LARGE[large]
    layer = degenerate_layer(family, "d3-first-1", "rebuild" if path == "rebuild" else "contract", kernel_device)
    with torch.no_grad():
        for p, scale in zip(layer._factors(), scales):
            p.mul_(scale)
    layer.half()
    forbid(monkeypatch, *PATHS[path])
    x, g = inputs(layer, (4,), kernel_device, torch.float16)
    assert_backends_agree(layer, x * x_scale, g * g_scale, torch.float16)


CONFIG_SHAPE = ((3, 1, 2), (2, 3, 1), (1, 2, 3, 1))  # I_d = 1 forward, O_d = 1 for dx, both < CD = 4


def _distinct_chain_configs() -> list[tuple[int, int, int, int]]:
    """One chain config per distinct pair of plans (forward, W.T's) for ``CONFIG_SHAPE``."""
    ins, outs, ranks = CONFIG_SHAPE
    plans = {}
    for c in kernels.cost.CHAIN_CONFIGS:
        plans.setdefault((kernels.cost.chain_plan(ins, outs, ranks, *c), kernels.cost.chain_plan(outs, ins, ranks, *c)), c)
    return list(plans.values())


@pytest.mark.parametrize("config", _distinct_chain_configs(), ids=lambda c: "bm{}-bo{}x{}-cd{}".format(*c))
def test_chain_kernels_every_config(config, monkeypatch, kernel_device):
    """The chain and gradient-chain kernels with each (BM, BO1, BO2, CD) of ``cost.CHAIN_CONFIGS``
    forced (the interpreter otherwise runs one config): chunks of i_d clamped below CD, O blocks
    clamped to their modes."""
    for kernel in (kernels._chain_kernel, kernels._chain_grad_kernel):
        first = kernel.configs[0]
        forced = triton.Config(dict(zip(("BM", "BO1", "BO2", "CD"), config)),
                                       num_warps=first.num_warps, num_stages=first.num_stages)
        monkeypatch.setattr(kernel, "configs", [forced])
    forbid(monkeypatch, *PATHS["chain"])
    layer = TTLinear(*CONFIG_SHAPE, strategy="contract").to(kernel_device)
    assert_backends_agree(layer, *inputs(layer, (5,), kernel_device, torch.float32), torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_dense_weight_buffer_on_cuda(strategy):
    """Forward and backward never allocate an (out x in) buffer: peak memory stays far below W."""
    n, m = 4096, 16  # the contract backward keeps r-times-larger states: 2 MiB each at M=16
    layer = TTLinear((16, 16, 16), (16, 16, 16), 16, strategy=strategy).to("cuda", torch.bfloat16)
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    peak = cuda_step_peak_bytes(layer, x, g)
    assert peak < n * n * 2 / 2, f"peak {peak / 2**20:.1f} MiB vs dense weight {n * n * 2 / 2**20:.1f} MiB"


def test_chain_kernels_read_the_cores_in_place(kernel_device):
    """The chain kernels take each core through its own pointer and strides: W.T's cores are views of
    W's (o and i strides swapped), and a chain forward and backward run no torch op on the cores
    (nothing packed or copied), on any strides."""
    layer = TTLinear(*TT["d3-3x2x5-r23"], strategy="contract").to(kernel_device)
    cores = kernels.plain_cores([c.detach() for c in layer.cores])
    layout, layout_t = kernels._chain_layout(cores), kernels._chain_layout([c.transposed() for c in cores])
    assert kernels._chain_meta(layout_t)["STRIDES"] == tuple(c.t.transpose(1, 2).stride() for c in cores)
    assert kernels._chain_meta(layout)["STRIDES"] != kernels._chain_meta(layout_t)["STRIDES"]
    x = torch.randn(3, layer.in_features, device=kernel_device)
    dy = torch.randn(3, layer.out_features, device=kernel_device)
    with stubbed_launches() as launched, _TorchLaunches() as torch_ops:
        kernels.cores_linear(x, cores, None, "contract")
        kernels.cores_grad(dy, x, cores, "contract", True)
    assert torch_ops.count == 0 and {"_chain_kernel", "_chain_grad_kernel"} <= {k.kernel for k in launched}
    # cores in no memory order (every stride permuted): read as they are
    permuted = [torch.randn(c.r1, c.i, c.o, c.r0, device=kernel_device).permute(3, 2, 1, 0) for c in cores]
    with backend("triton"):
        assert_close(kernels.tt_linear(x, permuted, None, "contract"), ref.tt_linear(x, permuted, None),
                     torch.float32, name="permuted cores")


def test_forward_plan_checks_inputs_per_call(kernel_device):
    """The forward's plan (kept per structure of the cores) checks every input when it is built and
    keys on the inputs' dtypes and devices: a bias or x the kernels cannot take is refused on
    every call, also after a good call has cached the layer's plan."""
    layer = TTLinear(*TT["d3-3x2x5-r23"]).to(kernel_device)
    x = torch.randn(2, layer.in_features, device=kernel_device)
    cores, bias = list(layer.cores), layer.bias.detach()
    with backend("triton"):
        kernels.tt_linear(x, cores, bias, "contract")
        for _ in range(2):
            with pytest.raises(TypeError, match="fp32, fp16 or bf16"):
                kernels.tt_linear(x, cores, bias.double(), "contract")
            with pytest.raises(TypeError, match="fp32, fp16 or bf16"):
                kernels.tt_linear(x.double(), cores, bias, "contract")
            with pytest.raises(ValueError, match="different devices"):
                kernels.tt_linear(x, cores, bias.to("meta"), "contract")


def test_forward_plan_one_entry_per_structure(kernel_device, monkeypatch):
    """Row counts share the cores' plan entry (their paths are kept in it, at most
    ``KEPT_PATHS``), and so do other cores of the same structure; values never matter."""
    monkeypatch.setattr(kernels, "_plans", OrderedDict())
    layer = TTLinear(*TT["d3-3x2x5-r23"], strategy="contract").to(kernel_device)
    cores = list(layer.cores)
    with backend("triton"):
        for m in (1, 2, 5, 3):
            x = torch.randn(m, layer.in_features, device=kernel_device)
            assert_close(kernels.tt_linear(x, cores, None, "contract"), ref.tt_linear(x, cores, None), torch.float32)
        other = [torch.randn_like(c) for c in cores]
        assert_close(kernels.tt_linear(x, other, None, "contract"), ref.tt_linear(x, other, None), torch.float32)
    assert len(kernels._plans) == 1
    assert sorted(next(iter(kernels._plans.values())).paths) == [1, 2, 3, 5]


def test_backward_plan_one_entry_per_structure(kernel_device, monkeypatch):
    """The backward keeps one plan entry per structure too: its paths per (row count, dx wanted)
    and W.T's layout beside W's; an in-place update of a core keeps the plan, and the gradients
    follow the new values."""
    monkeypatch.setattr(kernels, "_plans", OrderedDict())
    layer = TTLinear(*TT["d3-3x2x5-r23"], strategy="contract").to(kernel_device)
    cores = [c.detach() for c in layer.cores]

    def plans() -> list:
        return [v for k, v in kernels._plans.items() if k[0][0] == "backward"]

    with backend("triton"):
        for m, need_dx in ((1, True), (2, False), (5, True), (2, True)):
            x = torch.randn(m, layer.in_features, device=kernel_device)
            dy = torch.randn(m, layer.out_features, device=kernel_device)
            got = kernels.tt_grad(dy, x, cores, "contract", need_dx, torch.float32)
            want = ref.tt_grad(dy, x, cores, need_dx)
            for g, w in zip(got, want):
                assert_close(g, w, torch.float32)
        assert len(plans()) == 1 and sorted(plans()[0].paths) == [(1, True), (2, False), (2, True), (5, True)]
        assert len(plans()[0].layouts) == 2  # W's and W.T's
        cores[1].data.mul_(2.0)  # no version bump: nothing may depend on one
        got = kernels.tt_grad(dy, x, cores, "contract", True, torch.float32)
        for g, w in zip(got, ref.tt_grad(dy, x, cores, True)):
            assert_close(g, w, torch.float32)
        assert len(plans()) == 1


class _TorchLaunches(TorchDispatchMode):
    """Counts the torch ops that run (each one launch on a GPU): views and allocations are free."""

    FREE = {"empty", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh", "_unsafe_view"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in self.FREE:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", ["chain", "steps", "rebuild"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [TT["d2-3x5-7x2-r3"], TT["d3-3x2x5-r23"], TT["d4-2x3x2x3-r213"]], ids=["d2", "d3", "d4"])
def test_cost_model_counts_the_launches_made(shape, dtype, path, monkeypatch):
    """``cost.forward_cost``, ``grad_cores_cost`` and ``grad_cost`` count exactly the launches that
    ``cores_linear`` and ``cores_grad`` (with and without dx) make: Triton kernels and host-side
    torch ops, each one launch on a GPU; on the GPU's config space, Triton launches stubbed out
    (their grids run)."""
    for kernel in (kernels._chain_kernel, kernels._chain_grad_kernel):
        monkeypatch.setattr(kernel, "configs", list(kernel.configs.full))
    if path == "steps":
        monkeypatch.setattr(kernels.cost, "CHAIN_MAX_TILE", 8)
    strategy = "rebuild" if path == "rebuild" else "contract"
    ins, outs, ranks = shape
    cores = kernels.plain_cores([torch.randn(ranks[k], o, i, ranks[k + 1], dtype=dtype)
                                 for k, (o, i) in enumerate(zip(outs, ins))])
    x = torch.randn(5, 4, math.prod(ins), dtype=dtype)
    dy = torch.randn(5, 4, math.prod(outs), dtype=dtype)
    with stubbed_launches():
        kernels.cores_linear(x, cores, None, strategy)  # plans

    def launches(fn) -> int:
        with stubbed_launches() as triton_launches, _TorchLaunches() as torch_ops:
            fn()
        return torch_ops.count + len(triton_launches)

    model = {fn: getattr(kernels.cost, fn)(strategy, 20, ins, outs, ranks, dtype.itemsize,
                                           state_elt=kernels.cost.state_dtype(dtype).itemsize).launches
             for fn in ("forward_cost", "grad_cores_cost", "grad_cost")}
    made = {"forward_cost": launches(lambda: kernels.cores_linear(x, cores, None, strategy)),
            "grad_cores_cost": launches(lambda: kernels.cores_grad(dy, x, cores, strategy, False)),
            "grad_cost": launches(lambda: kernels.cores_grad(dy, x, cores, strategy, True))}
    assert made == model


# ----------------------------------------------------------------------------------------------
# rebuild's sliced path (many rows): slices of W by _rebuild_slice_kernel, then cuBLAS per slice
# ----------------------------------------------------------------------------------------------
SLICED = TT["d3-3x2x5-r23"]  # O_h = 6 head indices of O_d = 4 rows each, I = 30


def force_sliced(monkeypatch, elt: int, heads: int = 4) -> int:
    """Run rebuild's product in slices from one row on, ``heads`` head indices (of ``SLICED``) per
    slice: a bound just short of ``heads + 1`` of them (4 does not divide O_h = 6); returns the bound."""
    row_bytes = SLICED[1][-1] * math.prod(SLICED[0]) * elt
    bound = (heads + 1) * row_bytes - 1
    monkeypatch.setattr(kernels.cost, "REBUILD_FUSED_MAX_ROWS", 0)
    monkeypatch.setattr(kernels.cost, "REBUILD_SLICE_BYTES", bound)
    return bound


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_rebuild_sliced_matches_reference(dtype, bias, spy, monkeypatch, kernel_device):
    """Forward, dx and every core (and bias) gradient with the products in slices of W (two slices,
    the second partial) and the core gradients in slices of G (fp32 rows: 4 + 2 head indices for
    fp32, 2 + 2 + 2 for 16-bit inputs), 3-D input."""
    force_sliced(monkeypatch, dtype.itemsize)
    calls = spy(kernels, "_rebuild_sliced", "_rebuild_grad_sliced")
    layer = TTLinear(*SLICED, bias=bias, strategy="rebuild").to(kernel_device, dtype)
    assert_backends_agree(layer, *inputs(layer, (2, 5), kernel_device, dtype), dtype)
    assert calls == ["_rebuild_sliced", "_rebuild_grad_sliced", "_rebuild_sliced"]


def test_rebuild_sliced_strided_input(monkeypatch, kernel_device):
    """An input with no unit stride (made contiguous once) and one slice per head index."""
    force_sliced(monkeypatch, 4, heads=1)
    layer = TTLinear(*SLICED, strategy="rebuild").to(kernel_device)
    x = torch.randn(30, 7, device=kernel_device).T
    assert_backends_agree(layer, x, torch.randn(7, 24, device=kernel_device), torch.float32)


def test_rebuild_sliced_empty_batch(monkeypatch, kernel_device):
    force_sliced(monkeypatch, 4)
    check_empty_batch(TTLinear(*SLICED, strategy="rebuild").to(kernel_device), kernel_device, "triton")


class _Outputs(TorchDispatchMode):
    """Records the bytes of every tensor the torch ops inside the block return."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.bytes += [t.numel() * t.element_size() for t in (out if isinstance(out, (tuple, list)) else [out])
                       if isinstance(t, torch.Tensor)]
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rebuild_sliced_workspace_bound(dtype, monkeypatch, kernel_device):
    """The only buffer besides y is one workspace of whole head indices within
    ``cost.REBUILD_SLICE_BYTES``; the core gradients' buffers stay within it too; the slice plan at
    the goal shape: 1024 rows of a 4096-wide bf16 W."""
    bound = force_sliced(monkeypatch, dtype.itemsize)
    allocated = []
    real_empty = torch.empty

    def empty(*shape, **kw):
        out = real_empty(*shape, **kw)
        allocated.append((tuple(out.shape), out.numel() * out.element_size()))
        return out
    ins, outs, ranks = SLICED
    cores = [torch.randn(ranks[k], o, i, ranks[k + 1], device=kernel_device, dtype=dtype)
             for k, (o, i) in enumerate(zip(outs, ins))]
    x = torch.randn(9, 30, device=kernel_device, dtype=dtype)
    head, last = kernels._head_and_last(cores, dtype)
    monkeypatch.setattr(torch, "empty", empty)
    y = kernels._rebuild(x, head, last, None)
    assert allocated[0][0] == (9, 24)
    assert [a[0] for a in allocated[1:]] == [(16, 30)] and allocated[1][1] <= bound
    assert_close(y, kernels.ref.tt_linear(x, cores, None), dtype, name="y")
    with _Outputs() as outputs:  # the core gradients: G's slice and its permuted copy, fp32
        d_head, d_last = kernels._rebuild_grad_sliced(torch.randn(9, 24, device=kernel_device, dtype=dtype), x, head, last)
    assert max(outputs.bytes) <= bound and d_head.shape == (6, 6, 3) and d_last.shape == (3, 4, 5)
    monkeypatch.undo()
    assert kernels.cost.rebuild_slice_heads(256, 16, 4096, 2) * 16 == 1024
    assert kernels.cost.rebuild_slice_heads(256, 16, 4096, 4) * 16 * 4096 * 4 == kernels.cost.REBUILD_SLICE_BYTES
    assert kernels.cost.rebuild_slice_heads(3, 16, 1 << 20, 4) == 1  # one head index over the bound
    assert kernels.cost.rebuild_slice_heads(3, 2, 5, 2) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_rebuild_sliced_cost_counts_the_launches_made(dtype, monkeypatch):
    """The sliced path's launches (per slice one generation kernel and one GEMM, after the head
    product; dx the same on W.T; the core gradients per slice of G a GEMM, a permuting copy and two
    matmuls) are those ``cost.forward_cost`` and ``grad_cost`` count (for CUDA: the CPU also casts
    16-bit slices to fp32)."""
    force_sliced(monkeypatch, dtype.itemsize)
    ins, outs, ranks = SLICED
    cores = kernels.plain_cores([torch.randn(ranks[k], o, i, ranks[k + 1], dtype=dtype)
                                 for k, (o, i) in enumerate(zip(outs, ins))])
    x = torch.randn(20, math.prod(ins), dtype=dtype)
    dy = torch.randn(20, math.prod(outs), dtype=dtype)

    def launches(fn) -> int:
        with stubbed_launches() as triton_launches, _TorchLaunches() as torch_ops:
            fn()
        return torch_ops.count + len(triton_launches)

    state_elt = kernels.cost.state_dtype(dtype).itemsize
    forward = kernels.cost.forward_cost("rebuild", 20, ins, outs, ranks, dtype.itemsize, state_elt)
    backward = kernels.cost.grad_cost("rebuild", 20, ins, outs, ranks, dtype.itemsize, state_elt)
    assert forward.launches == launches(lambda: kernels.cores_linear(x, cores, None, "rebuild"))
    grad_slices = math.ceil(6 / kernels.cost.rebuild_slice_heads(6, 4, 30, 4))  # fp32 rows of G per slice
    cpu_casts = 0 if dtype == torch.float32 else 2 * grad_slices  # the CPU has no 16-bit GEMM with fp32 output
    assert backward.launches + cpu_casts == launches(lambda: kernels.cores_grad(dy, x, cores, "rebuild", True))
    monkeypatch.setattr(kernels.cost, "REBUILD_FUSED_MAX_ROWS", 20)
    fused = kernels.cost.forward_cost("rebuild", 20, ins, outs, ranks, dtype.itemsize, state_elt)
    assert forward.launches == fused.launches + 2 * 2 - 1  # two slices of two launches for one fused kernel


def test_cost_model_picks_at_the_goal_rows():
    """bf16 4096^2 goal rows: 16^3 rank 16 runs rebuild at M = 8192 (forward in slices of 1024 rows
    of W, backward too) and contract at M = 16; 8^4 rank 8 runs contract at both M, forward and
    backward (at M = 8192 the Kronecker-sum kernels)."""
    cost = kernels.cost
    big = ((16, 16, 16), (16, 16, 16), (1, 16, 16, 1))
    small = ((8, 8, 8, 8), (8, 8, 8, 8), (1, 8, 8, 8, 1))
    assert 8192 > cost.REBUILD_FUSED_MAX_ROWS >= 16
    assert [cost.pick_strategy(8192, *big, backward=b) for b in (False, True)] == ["rebuild", "rebuild"]
    assert [cost.pick_strategy(16, *big, backward=b) for b in (False, True)] == ["contract", "contract"]
    assert [cost.pick_strategy(m, *small) for m in (16, 8192)] == ["contract", "contract"]
    assert [cost.pick_strategy(m, *small, backward=True) for m in (16, 8192)] == ["contract", "contract"]
    assert [cost.contract_grad_path(m, *small) for m in (16, 8192)] == ["chain", "kronsum"]
    sliced = cost.forward_cost("rebuild", 8192, *big)
    assert sliced.launches == cost.head_launches(3, 2, 2) + 2 * 4  # 4 slices of 1024 rows
    gemm, generation = 2.0 * 8192 * 4096 ** 2, 2.0 * 16 * 4096 ** 2  # generation once, not per row block
    assert sliced.flops == pytest.approx(gemm + generation + cost._head_cost(*big, 2, 2).flops)


# ----------------------------------------------------------------------------------------------
# The forward chain kernel's split-K (cost.chain_split): y and dx with forced split counts
# ----------------------------------------------------------------------------------------------
def _spy_forward_splits(monkeypatch, splits: int | None) -> list[int]:
    """Force ``splits`` (None: the cost model's) on every forward chain launch; the returned list
    receives the number of slots each split-K launch summed (a launch without slots adds none)."""
    monkeypatch.setattr(kernels, "CHAIN_SPLIT", splits)
    used = []

    class Recording(kernels.SplitSlots):
        def sum(self, part, dtype=torch.float32):
            used.append(self.used)
            return super().sum(part, dtype)

    monkeypatch.setattr(kernels, "SplitSlots", Recording)
    return used


# d3-3x2x5-r23 under the interpreter's config (CD = 2): 3 chunks of I_3 = 5 forward, 2 of I_3 = 4
# for dx; 2 splits do not divide 3 chunks, 4 splits leave a split without a chunk (it stores zeros)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("splits", [1, 2, 3, 4])
def test_chain_split_k_forward_and_dx(splits, dtype, bias, monkeypatch, kernel_device):
    used = _spy_forward_splits(monkeypatch, splits)
    layer = TTLinear(*TT["d3-3x2x5-r23"], bias=bias, strategy="contract").to(kernel_device, dtype)
    layer.requires_grad_(False)  # y and dx: two forward chain launches (W's cores, then W.T's)
    assert_backends_agree(layer, *inputs(layer, (2, 3), kernel_device, dtype), dtype)
    assert used == ([] if splits == 1 else [splits, splits])


@pytest.mark.parametrize("splits", [2, 3])
def test_spline_tt_chain_split_k(splits, monkeypatch, kernel_device):
    """Spline-TT cores generated in the kernel (SPLINE) with the I_d chunks split."""
    used = _spy_forward_splits(monkeypatch, splits)
    layer = SplineTTLinear((5, 4, 7), (6, 5, 4), 2, (4, 4), strategy="contract").to(kernel_device)
    layer.requires_grad_(False)
    assert_backends_agree(layer, *inputs(layer, (2, 5), kernel_device, torch.float32), torch.float32)
    assert used == [splits, splits]


def test_chain_split_k_empty_batch(monkeypatch, kernel_device):
    _spy_forward_splits(monkeypatch, 3)
    check_empty_batch(TTLinear(*TT["d3-3x2x5-r23"], strategy="contract").to(kernel_device), kernel_device, "triton")


def test_chain_split_k_is_deterministic(monkeypatch, kernel_device):
    """Two split-K forward launches give bitwise-equal y (slots summed on the host in a fixed order)."""
    used = _spy_forward_splits(monkeypatch, 3)
    layer = TTLinear(*TT["d3-3x2x5-r23"], strategy="contract").to(kernel_device)
    cores = kernels.plain_cores([c.detach() for c in layer.cores])
    x = torch.randn(7, 30, device=kernel_device)
    first, second = kernels.chain_linear(x, cores, layer.bias), kernels.chain_linear(x, cores, layer.bias)
    assert used == [3, 3] and torch.equal(first, second)


def test_chain_split_policy_for_the_benchmark_shapes():
    """On the GPU's configs: 16^3 rank 16 and 8^4 rank 8 split every plan at M = 16 (at least 2,
    no split without a chunk, a program per SM or a chunk per split, slots within
    ``CHAIN_PART_BYTES``) and none at M = 8192; the cost model then counts the sum of the slots,
    cast in the same launch (2 launches, bf16 or fp32)."""
    cost = kernels.cost
    for ins, outs, ranks in [((16,) * 3, (16,) * 3, (1, 16, 16, 1)), ((8,) * 4, (8,) * 4, (1, 8, 8, 8, 1))]:
        for plan in cost.chain_plans(ins, outs, ranks):
            chunks = math.ceil(ins[-1] / plan.ni[-1])
            s = cost.chain_split(plan, 16, ins, outs, ranks)
            assert 2 <= s <= chunks and (s - 1) * math.ceil(chunks / s) < chunks, plan
            assert 4 * s * 16 * 4096 <= cost.CHAIN_PART_BYTES, plan
            assert plan.programs(16, outs) * s >= cost.SMS or s == chunks, plan  # else a chunk per split
            assert cost.chain_split(plan, 8192, ins, outs, ranks) == 1
        assert cost.chain_cost(16, ins, outs, ranks).launches == 2
        assert cost.chain_cost(16, ins, outs, ranks, elt=4).launches == 2
        assert cost.chain_cost(8192, ins, outs, ranks).launches == 1


# ----------------------------------------------------------------------------------------------
# the Kronecker-sum forward: cores merged into two halves, W = sum_a A_a (x) B_a, rows stacked in
# the MMA M dimension (forced here; the cost model picks it for 8^4 from a few hundred rows)
# ----------------------------------------------------------------------------------------------
KRONSUM = {"d2-3x5-7x2-r3": TT["d2-3x5-7x2-r3"], "d3-3x2x5-r23": TT["d3-3x2x5-r23"],
           "d4-2x3x2x3-r213": TT["d4-2x3x2x3-r213"], "d4-alternating-1": DEGENERATE["d4-alternating-1"],
           "d2-all-1": DEGENERATE["d2-all-1"], "d3-first-1": DEGENERATE["d3-first-1"]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lead", [(1,), (7,), (2, 3)], ids=["one-row", "7-rows", "3d"])
@pytest.mark.parametrize("name", list(KRONSUM), ids=list(KRONSUM))
def test_kronsum_forward(name, lead, dtype, spy, monkeypatch, kernel_device):
    monkeypatch.setattr(kernels, "KRONSUM", True)
    calls = spy(kernels, "kronsum_linear")
    forbid(monkeypatch, "chain_linear", "steps_linear", "rebuild_linear")
    layer = TTLinear(*KRONSUM[name], bias=lead != (7,), strategy="contract").to(kernel_device, dtype)
    assert_forward_agrees(layer, inputs(layer, lead, kernel_device, dtype)[0], dtype)
    assert calls == ["kronsum_linear"]


def test_kronsum_leaves_fp16_to_the_chain_kernel(spy, monkeypatch, kernel_device):
    """fp16 layers keep the chain kernel (fp32 states) even where the Kronecker-sum kernel is forced:
    its merged cores and intermediates would be fp16."""
    monkeypatch.setattr(kernels, "KRONSUM", True)
    calls = spy(kernels, "kronsum_linear", "chain_linear")
    layer = TTLinear(*TT["d3-3x2x5-r23"], strategy="contract").to(kernel_device, torch.float16)
    assert_forward_agrees(layer, inputs(layer, (4,), kernel_device, torch.float16)[0], torch.float16)
    assert calls == ["chain_linear"]


def assert_forward_agrees(layer, x, dtype) -> None:
    """y of the kernels against the reference's (inference: no backward runs), ``dtype``'s tolerances."""
    with torch.no_grad():
        with backend("triton"):
            y = layer(x)
        with backend("reference"):
            want = layer(x)
    assert y.dtype == want.dtype and y.shape == want.shape
    assert_close(y, want, dtype, name="y")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(KRONSUM), ids=list(KRONSUM))
def test_kronsum_backward(name, dtype, spy, monkeypatch, kernel_device):
    """The contract backward by the Kronecker-sum kernels: every core gradient from the merged
    halves' (``_kronsum_grad_kernel``, then ``merge_cores_grad``) and dx by the Kronecker-sum kernel
    on W.T's halves; nothing by the chain or step kernels."""
    monkeypatch.setattr(kernels, "KRONSUM", True)
    calls = spy(kernels, "kronsum_linear", "kronsum_grad")
    forbid(monkeypatch, "chain_linear", "chain_grad", "steps_linear", "steps_grad")
    layer = TTLinear(*KRONSUM[name], strategy="contract").to(kernel_device, dtype)
    assert_backends_agree(layer, *inputs(layer, (2, 3), kernel_device, dtype), dtype)
    assert calls == ["kronsum_linear", "kronsum_grad", "kronsum_linear"]


def test_kronsum_training_follows_in_place_updates(spy, monkeypatch, kernel_device):
    """Training through the Kronecker-sum kernels: the merged halves are rebuilt after an in-place
    update of one core, for the forward and the backward alike."""
    monkeypatch.setattr(kernels, "KRONSUM", True)
    calls = spy(kernels, "kronsum_linear", "kronsum_grad")
    layer = TTLinear(*TT["d4-2x3x2x3-r213"], strategy="contract").to(kernel_device)
    assert_backends_agree(layer, *inputs(layer, (5,), kernel_device, torch.float32), torch.float32)
    with torch.no_grad():
        layer.cores[3].mul_(-2)
    assert_backends_agree(layer, *inputs(layer, (4,), kernel_device, torch.float32), torch.float32)
    assert calls == ["kronsum_linear", "kronsum_grad", "kronsum_linear"] * 2


@pytest.mark.parametrize("programs, rows", [(6, 7), (64, 3)], ids=["splits-of-several-blocks", "splits-without-rows"])
def test_kronsum_grad_splits(programs, rows, monkeypatch, kernel_device):
    """Row splits of the gradient kernel (slots summed on the host): splits over several row
    blocks, and more splits than row blocks (those programs write zero slots)."""
    monkeypatch.setattr(kernels, "GRAD_PROGRAMS", programs)
    ins, outs, ranks = TT["d3-3x2x5-r23"]
    plan = kernels.cost.kronsum_plan(ins, outs, ranks)
    splits = kernels.cost.kronsum_grad_splits(plan, rows, programs)
    assert splits > 1 and (splits > rows / 2) == (rows == 3)  # the interpreter's BM is 2
    cores = [torch.randn(ranks[k], o, i, ranks[k + 1], device=kernel_device) for k, (o, i) in enumerate(zip(outs, ins))]
    x, dy = torch.randn(rows, math.prod(ins), device=kernel_device), torch.randn(rows, math.prod(outs), device=kernel_device)
    got = kernels.kronsum_grad(dy, x, kernels.plain_cores(cores), plan)
    for g, want in zip(got, ref.tt_grad(dy, x, cores, False)):
        assert g.dtype == torch.float32 and g.shape == want.shape
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-4)


def test_kronsum_empty_batch(monkeypatch, kernel_device):
    monkeypatch.setattr(kernels, "KRONSUM", True)
    check_empty_batch(TTLinear(*TT["d3-3x2x5-r23"], strategy="contract").to(kernel_device), kernel_device, "triton")


def test_kronsum_8x8x8x8_rank_8(monkeypatch, kernel_device):
    """The goal row's layer (64 x 64 halves, full tiles) on a few rows, bf16 and fp32."""
    monkeypatch.setattr(kernels, "KRONSUM", True)
    for dtype in (torch.float32, torch.bfloat16):
        layer = TTLinear((8,) * 4, (8,) * 4, 8, strategy="contract").to(kernel_device, dtype)
        assert_forward_agrees(layer, inputs(layer, (3,), kernel_device, dtype)[0], dtype)


def test_kronsum_policy_and_launches():
    """The cost model runs the Kronecker-sum kernel for 8^4 rank 8 from a couple of thousand rows on
    (where its time, the merge of the cores into halves included, beats the chain kernel's), never
    for 16^3 rank 16 (a 256 x 256 half does not fit); its cost counts the launch and the merge's
    torch ops the launcher makes on every call."""
    cost = kernels.cost
    e8, e16 = ((8,) * 4, (8,) * 4, (1, 8, 8, 8, 1)), ((16,) * 3, (16,) * 3, (1, 16, 16, 1))
    assert cost.kronsum_plan(*e8) == cost.KronsumPlan(2, (8, 64, 64, 64, 64), (64, 64, 64, 64))
    assert cost.kronsum_plan(*e16) is None
    assert [cost.contract_path(m, *e8) for m in (16, cost.KRONSUM_MIN_ROWS, 2048, 8192)] == [
        "chain", "chain", "kronsum", "kronsum"]
    assert cost.contract_path(8192, *e16) == "chain"
    assert cost.contract_path(8192, *e8, 2, 4) == "chain"  # fp16: 2-byte inputs, fp32 states
    assert cost.kronsum_flops(cost.kronsum_plan(*e8), 8192) == 2 * 8192 * 8 * 2 * 64 ** 3  # 68.7 GFLOP
    m = 2048
    layer = TTLinear(*e8[:2], 8, strategy="contract")
    cores = kernels.plain_cores([c.detach() for c in layer.cores])
    x = torch.randn(m, 4096)
    with stubbed_launches() as launches, _TorchLaunches() as torch_ops:
        kernels.cores_linear(x, cores, None, "contract")
    assert [launch.kernel for launch in launches] == ["_kronsum_kernel"]
    assert cost.forward_cost("contract", m, *e8, 4).launches == 1 + torch_ops.count == 1 + cost.merge_ops(4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["d3-3x2x5-r23", "d4-2x3x2x3-r213"])
def test_kronsum_dx_of_the_rebuild_backward(name, dtype, spy, monkeypatch, kernel_device):
    """rebuild's backward with dx by the Kronecker-sum kernel on W's merged halves read transposed
    (the product with W.T not launched); the core gradients by rebuild as before."""
    monkeypatch.setattr(kernels, "KRONSUM", True)
    calls = spy(kernels, "kronsum_linear", "rebuild_grad")
    layer = TTLinear(*TT[name], strategy="rebuild").to(kernel_device, dtype)
    assert_backends_agree(layer, *inputs(layer, (2, 3), kernel_device, dtype), dtype)
    assert calls == ["rebuild_grad", "kronsum_linear"]


def test_rebuild_dx_policy():
    """The cost model takes the Kronecker-sum dx for 8^4 rank 8 at 8192 rows in rebuild's backward,
    never for 16^3, and the backward's launch count follows it."""
    cost = kernels.cost
    e8, e16 = ((8,) * 4, (8,) * 4, (1, 8, 8, 8, 1)), ((16,) * 3, (16,) * 3, (1, 16, 16, 1))
    assert cost.rebuild_dx_cost(8192, *e8, 2, 2)[0] == "kronsum"
    assert cost.rebuild_dx_cost(8192, *e16, 2, 2)[0] == "rebuild"
    m = cost.KRONSUM_MIN_ROWS
    layer = TTLinear(*e8[:2], 8, strategy="rebuild")
    cores = kernels.plain_cores([c.detach() for c in layer.cores])
    x, dy = torch.randn(m, 4096), torch.randn(m, 4096)
    assert cost.rebuild_dx_cost(m, *e8, 4, 4)[0] == "kronsum"  # fp32, as below
    with stubbed_launches():
        kernels.cores_grad(dy, x, cores, "rebuild", True)  # merges the cores
    with stubbed_launches() as launches, _TorchLaunches() as torch_ops:
        kernels.cores_grad(dy, x, cores, "rebuild", True)
    assert "_kronsum_kernel" in [launch.kernel for launch in launches]
    assert cost.grad_cost("rebuild", m, *e8, 4).launches == len(launches) + torch_ops.count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kronsum_backward_policy_and_launches(dtype, monkeypatch):
    """The contract backward of 8^4 rank 8 runs the Kronecker-sum kernels from about a thousand rows
    (the chain kernels below; never for 16^3 rank 16 or fp16), the backward then prefers contract to
    rebuild at 8192 rows, and the cost counts the launches and host ops ``cores_grad`` makes."""
    cost = kernels.cost
    e8, e16 = ((8,) * 4, (8,) * 4, (1, 8, 8, 8, 1)), ((16,) * 3, (16,) * 3, (1, 16, 16, 1))
    assert [cost.contract_grad_path(m, *e8) for m in (16, cost.KRONSUM_MIN_ROWS, 2048, 8192)] == [
        "chain", "chain", "kronsum", "kronsum"]
    assert cost.contract_grad_path(8192, *e16) == "chain" and cost.contract_grad_path(8192, *e8, 2, 4) == "chain"
    assert cost.pick_strategy(8192, *e8, backward=True) == "contract"
    assert cost.kronsum_grad_cost(8192, *e8).flops == pytest.approx(2 * cost.kronsum_flops(cost.kronsum_plan(*e8), 8192), rel=1e-3)
    m = 2048
    monkeypatch.setattr(kernels, "GRAD_PROGRAMS", cost.CHAIN_GRAD_PROGRAMS)  # the GPU's splits (slots summed)
    cores = kernels.plain_cores([torch.randn(r0, 8, 8, r1, dtype=dtype) for r0, r1 in zip(e8[2], e8[2][1:])])
    x, dy = torch.randn(m, 4096, dtype=dtype), torch.randn(m, 4096, dtype=dtype)
    with stubbed_launches():
        kernels.cores_grad(dy, x, cores, "contract", True)  # merges the cores
    with stubbed_launches() as launches, _TorchLaunches() as torch_ops:
        kernels.tt_grad(dy, x, [c.t for c in cores], "contract", True, dtype)
    assert [launch.kernel for launch in launches] == ["_kronsum_grad_kernel", "_slot_sum_kernel", "_kronsum_kernel"]
    # the host ops of merge_cores_grad are torch's einsum's (its layout copies vary): counted as
    # MERGE_GRAD_OPS per core (and a cast of 16-bit cores), at most one too many per core
    counted, made = cost.grad_cost("contract", m, *e8, dtype.itemsize).launches, len(launches) + torch_ops.count
    assert made <= counted <= made + 4

def test_step_kernel_grids_stay_within_cuda_limits():
    """The step kernel's columns (M x O_<k x I_>k, ~1000 x M) run on grid axis 0 (2^31 - 1
    programs); axes 1 and 2 stay within CUDA's 65535. Shapes only (meta tensors, launches
    stubbed): fp16 (8, 8, 64) rank 32 at 8192 rows takes the steps path and had put 65536 programs
    on axis 1."""
    cores = kernels.plain_cores([torch.empty(r0, o, i, r1, device="meta", dtype=torch.float16)
                                 for o, i, r0, r1 in zip((8, 8, 64), (8, 8, 64), (1, 32, 32), (32, 32, 1))])
    x = torch.empty(8192, 4096, device="meta", dtype=torch.float16)
    with stubbed_launches() as launches:
        kernels.steps_linear(x, cores, None)
    steps = [launch.grid for launch in launches if launch.kernel == "_step_kernel"]
    assert len(steps) == 3 and all(max(grid[1:]) <= 65535 for grid in steps)
    assert max(grid[0] for grid in steps) > 65535
