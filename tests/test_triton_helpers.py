"""Shared Triton helpers in ``tspline_kernels/_triton.py``, run under the interpreter."""

import math

import pytest
import torch

import tspline_kernels  # noqa: F401  (sets TRITON_INTERPRET on CPU-only torch)
from tspline_kernels import _triton
from tspline_kernels._triton import grouped_pid, tl, triton


@triton.jit
def _pids_kernel(out_ptr, num_m, num_n, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_pid(pid, num_m, num_n, GROUP_M)
    tl.store(out_ptr + 2 * pid, pid_m)
    tl.store(out_ptr + 2 * pid + 1, pid_n)


@pytest.mark.parametrize("num_m, num_n, group", [(1, 1, 8), (5, 3, 2), (7, 4, 8), (16, 2, 4)])
def test_grouped_pid_visits_every_tile_once_in_row_groups(num_m, num_n, group):
    out = torch.empty(num_m * num_n, 2, dtype=torch.int32)
    _pids_kernel[(num_m * num_n,)](out, num_m, num_n, GROUP_M=group)
    tiles = [tuple(t) for t in out.tolist()]
    assert sorted(tiles) == [(m, n) for m in range(num_m) for n in range(num_n)]
    # consecutive programs stay within one group of GROUP_M row blocks until it is exhausted
    groups = [m // group for m, _ in tiles]
    assert groups == sorted(groups)


def _tune_in_sequence(monkeypatch, tuner, blocks: list[dict], winner: int) -> None:
    """Make ``tuner`` autotune ``blocks`` in order (each run once, as on a GPU) and pick ``winner``."""
    from tspline_kernels._triton import triton as tr

    monkeypatch.setattr(tuner, "configs", [tr.Config(b, num_warps=1, num_stages=1) for b in blocks])
    monkeypatch.setattr(tuner, "cache", {})
    timings = iter([0.0 if i == winner else 1.0 for i in range(len(blocks))])
    monkeypatch.setitem(tuner.__dict__, "do_bench", lambda call, quantiles=None: (call(), [next(timings)] * 3)[1])


@pytest.mark.parametrize("family", ["spline", "lowrank", "kronecker"])
def test_partial_sums_ignore_slots_of_configs_tried_while_autotuning(monkeypatch, family):
    """Autotuning runs a many-slot config first and picks a few-slot one: the sum must not read
    the stale slots the first one left (the separable dC summed them in, issue 9)."""
    import tspline_kernels as tk
    from tspline_kernels.kronecker import kernels as kron
    from tspline_kernels.lowrank import kernels as lowrank
    from tspline_kernels.spline import kernels as spline
    from tspline_kernels.testing import assert_backends_agree

    if family == "spline":
        layer, n_in = tk.SplineLinear(20, 12, grid=(6, 7)), 20
        _tune_in_sequence(monkeypatch, spline._separable_dc_kernel, [{"BM": 16}, {"BM": 64}], 1)
    elif family == "lowrank":
        layer, n_in = tk.LowRankLinear(20, 12, rank=3), 20
        _tune_in_sequence(monkeypatch, lowrank._lowrank_grad_kernel,
                          [{"BM": 16, "BF": 32, "SPLIT": 4}, {"BM": 16, "BF": 32, "SPLIT": 1}], 1)
    else:
        layer, n_in = tk.KroneckerLinear((4, 5), (3, 4)), 20
        _tune_in_sequence(monkeypatch, kron._kron_grad_kernel, [{"SPLIT": 8}, {"SPLIT": 2}], 1)
    x = torch.randn(100, n_in)
    assert_backends_agree(layer, x, torch.randn(100, layer.out_features), torch.float32)


def test_split_slots_sum_only_what_the_last_launch_wrote():
    from tspline_kernels._triton import SplitSlots

    class Tuner:
        configs = [triton.Config({"SPLIT": s}) for s in (1, 4, 16)]

    slots = SplitSlots(Tuner, lambda meta: min(meta["SPLIT"], 6))
    assert slots.slots == 6
    part = torch.arange(6.0)[:, None].expand(6, 2).contiguous()
    assert slots({"SPLIT": 16}) == 6 and slots({"SPLIT": 4}) == 4
    assert slots.sum(part).tolist() == [6.0, 6.0]
    assert slots({"SPLIT": 1}) == 1 and slots.sum(part).tolist() == [0.0, 0.0]


def test_split_slots_keep_the_most_programs_per_key_while_the_configs_stay():
    """With a ``key``, the configs are asked once per key; a new config list (the every-config
    check swaps it) asks them again."""
    from tspline_kernels._triton import SplitSlots

    class Tuner:
        configs = [triton.Config({"SPLIT": s}) for s in (1, 4)]

    asked = []

    def programs(meta):
        asked.append(meta["SPLIT"])
        return meta["SPLIT"]

    assert SplitSlots(Tuner, programs, key="k").slots == 4 and asked == [1, 4]
    assert SplitSlots(Tuner, programs, key="k").slots == 4 and asked == [1, 4]  # kept
    assert SplitSlots(Tuner, lambda meta: 2 * meta["SPLIT"], key="other").slots == 8
    Tuner.configs = [triton.Config({"SPLIT": 16})]
    assert SplitSlots(Tuner, programs, key="k").slots == 16 and asked == [1, 4, 16]
    assert SplitSlots(Tuner, programs).slots == 16 and asked == [1, 4, 16, 16]  # no key: asked every time


def test_split_slots_one_slot_is_the_result():
    """Where every config launches one program, the buffer is the result itself, in the dtype asked
    for (no slot dimension, nothing launched or indexed by ``sum``), unless the launch did not run
    (zeros) or the buffer was allocated in another dtype (one slot-sum launch casts it)."""
    from tspline_kernels._triton import SplitSlots

    class Tuner:
        configs = [triton.Config({"BM": bm}) for bm in (16, 64)]

    slots = SplitSlots(Tuner, lambda meta: 1)
    part = slots.empty(3, 4, device="cpu", dtype=torch.bfloat16)
    assert slots.slots == 1 and part.shape == (3, 4) and part.dtype == torch.bfloat16
    part.copy_(torch.randn(3, 4))
    assert slots.sum(part, torch.bfloat16).tolist() == [[0.0] * 4] * 3  # not launched: no slot written
    slots({"BM": 16})
    assert slots.sum(part, torch.bfloat16) is part
    assert slots.zeros(5, device="cpu").shape == (5,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, used", [((3, 5, 7), 3), ((1, 2500), 1), ((4, 1), 2), ((2, 0, 3), 2), ((3,), 2)])
def test_split_slots_sum_kernel_adds_the_used_slots_in_order_and_casts(kernel_device, dtype, shape, used):
    """The slot-sum kernel: the first ``used`` slots of a larger buffer, odd, empty and scalar
    sizes, more than one program (2500 elements), its result cast to ``dtype`` once, fp32 added in
    slot order."""
    from tspline_kernels._triton import SplitSlots

    class Tuner:
        configs = [triton.Config({"SPLIT": s}) for s in (1, shape[0])]

    slots = SplitSlots(Tuner, lambda meta: meta["SPLIT"])
    part = slots.empty(*shape[1:], device=kernel_device)
    part.copy_(torch.randn(part.shape) * 100)
    slots({"SPLIT": used})
    each = part if slots.slots > 1 else part[None]  # one slot: the buffer is the result's shape
    expected = each[0].clone()
    for s in range(1, used):
        expected += each[s]
    got = slots.sum(part, dtype)
    assert got.dtype == dtype and got.shape == shape[1:]
    if dtype == torch.bfloat16 and kernel_device == "cpu":  # the interpreter truncates to bf16 (a GPU rounds)
        torch.testing.assert_close(got.float(), expected, rtol=2**-7, atol=0)
    else:
        assert torch.equal(got, expected.to(dtype))


@pytest.mark.parametrize("shape, padded", [((2, 5, 3, 4), (3, 6, 5, 4)), ((1, 3, 1, 2), (4, 3, 8, 2)), ((7,), (9,)),
                                           ((2, 3), (2, 3))], ids=["4d", "4d-modes-of-1", "1d", "uncut"])
def test_slot_sum_cuts_the_padding_in_the_same_pass(kernel_device, shape, padded):
    """``slot_sum`` with ``padded`` slots keeps each slot's leading ``shape`` corner: the TT gradient
    chain kernel's padded partial cores summed and cut in one launch, in slot order."""
    part = torch.randn(3 * math.prod(padded) + 5, device=kernel_device)  # three slots, then unused entries
    got = _triton.slot_sum(part, 3, shape, padded)
    slots = part[:3 * math.prod(padded)].view(3, *padded)
    expected = slots[0] + slots[1] + slots[2]
    assert got.shape == shape and got.is_contiguous()
    assert torch.equal(got, expected[tuple(slice(0, n) for n in shape)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_slot_sums_sum_every_region_in_one_launch(kernel_device, dtype):
    """``slot_sums``: regions of one flat buffer, each its own slot count, padding and offset (a gap
    between them, a region without elements), summed in one launch into separate tensors, each the
    slots in order."""
    regions = ((0, 3, (2, 5, 3, 4), (3, 6, 5, 4)), (1100, 1, (7,), None), (1120, 5, (2, 3), (4, 3)), (1200, 2, (0, 3), None))
    part = torch.randn(1210, device=kernel_device)
    launch = _triton.slot_sums(regions)
    assert launch.programs == 3  # BLOCK-element programs: one per region with elements
    outs = launch(part, dtype)
    for out, (offset, slots, shape, padded) in zip(outs, regions):
        size = math.prod(padded or shape)
        each = part[offset:offset + slots * size].view(slots, *(padded or shape))
        expected = sum(each[s] for s in range(slots))[tuple(slice(0, n) for n in shape)]
        assert out.shape == shape and out.dtype == dtype and out.is_contiguous()
        if dtype == torch.bfloat16 and kernel_device == "cpu":  # the interpreter truncates to bf16 (a GPU rounds)
            torch.testing.assert_close(out.float(), expected, rtol=2**-7, atol=0)
        else:
            assert torch.equal(out, expected.to(dtype))
    assert len({o.untyped_storage().data_ptr() for o in outs if o.numel()}) == 3


def test_check_inputs_skips_none_and_names_the_devices():
    """An absent bias (None) is skipped; tensors on different devices are refused by name, with the
    None left out of the message; fp64 is refused."""
    x = torch.randn(3, 4)
    _triton.check_inputs(x, None, torch.randn(4))
    with pytest.raises(ValueError, match=r"different devices: \['cpu', 'meta'\]"):
        _triton.check_inputs(x, None, torch.randn(4, device="meta"))
    with pytest.raises(TypeError, match="fp32, fp16 or bf16"):
        _triton.check_inputs(x, None, torch.randn(4, dtype=torch.float64))
