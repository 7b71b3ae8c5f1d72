"""The every-config check (``bench/every_config.py``) under the interpreter: its sequence mode
exposes results left behind by configs tried while autotuning, and a CI slice of the real
kernels passes through their first and last GPU configs. The full check runs on a GPU
(``bench/gpu_check.sh``)."""

import pytest
import torch

from tspline_kernels import _triton
from tspline_kernels._triton import tl, triton
from tspline_kernels.bench import every_config as ec


@triton.autotune(configs=_triton.configs([{"BM": 16}, {"BM": 64}], interpret={"BM": 16},
                                         quick=[{"BM": 64, "num_warps": 4, "num_stages": 3}]), key=["M"])
@triton.jit
def _row_block_sums(x_ptr, part_ptr, M, BM: tl.constexpr):
    """part[pid] = sum of rows [pid*BM, (pid+1)*BM) of x ``(M,)``."""
    pid = tl.program_id(0)
    r = pid * BM + tl.arange(0, BM)
    tl.store(part_ptr + pid, tl.sum(tl.load(x_ptr + r, mask=r < M, other=0.0), axis=0))


def _stale_sum(x: torch.Tensor) -> torch.Tensor:
    """The old separable-dC scheme: slots for the smallest BM, zeroed once, all of them summed."""
    part = torch.zeros(triton.cdiv(x.numel(), 16), device=x.device, dtype=torch.float32)
    _row_block_sums[lambda meta: (triton.cdiv(x.numel(), meta["BM"]),)](x, part, x.numel())
    return part.sum()


def _slot_sum(x: torch.Tensor) -> torch.Tensor:
    """The shared scheme: sum only the slots the counting launch wrote."""
    slots = _triton.SplitSlots(_row_block_sums, lambda meta: triton.cdiv(x.numel(), meta["BM"]))
    part = slots.empty(device=x.device)
    _row_block_sums[lambda meta: (slots(meta),)](x, part, x.numel())
    return slots.sum(part)


@pytest.mark.parametrize("launcher, stale", [(_stale_sum, True), (_slot_sum, False)], ids=["stale-slots", "split-slots"])
def test_sequence_mode_exposes_slots_left_by_configs_tried_before_the_winner(launcher, stale, kernel_device):
    """Autotuning order small BM, then large BM (the winner): the stale scheme sums the small-BM
    slots the winner never overwrote; isolated runs of either config cannot show it."""
    x = torch.randn(100, device=kernel_device)
    tuners = {"_row_block_sums": _row_block_sums}
    configs = ec.space(_row_block_sums)
    small, large = configs[0], configs[-1]
    assert (small.kwargs["BM"], large.kwargs["BM"]) == (16, 64)
    for config in (small, large):
        with ec.Pins(ec.pin("_row_block_sums", config, "isolated"), tuners).active():
            torch.testing.assert_close(launcher(x), x.sum())
    pins = ec.Pins(ec.pin("_row_block_sums", large, "sequence"), tuners)
    with pins.active():
        got = launcher(x)
    bms = [c.kwargs["BM"] for c in pins.launched["_row_block_sums"]]  # one per config: warps x stages on a GPU
    assert bms == sorted(bms) and set(bms) == {16, 64}
    if stale:
        assert not torch.allclose(got, x.sum()), "the sequence replay did not expose the stale slots"
    else:
        torch.testing.assert_close(got, x.sum())


def test_pins_restore_every_autotuner(monkeypatch):
    tuners = ec.autotuners()
    cached = next(iter(tuners.values()))
    bench = lambda call, quantiles=None: [1.0] * 3  # noqa: E731
    monkeypatch.setitem(cached.__dict__, "do_bench", bench)  # where Triton 3.6 caches it after tuning
    before = {name: (t.configs, dict(t.__dict__)) for name, t in tuners.items()}
    with ec.Pins(ec._first).active():
        assert all(t.configs is not before[n][0] for n, t in tuners.items())
    for name, t in tuners.items():
        assert t.configs is before[name][0]
        assert set(t.__dict__) == set(before[name][1]), name
    assert cached.__dict__["do_bench"] is bench


def test_select_spreads_configs_over_the_list():
    assert ec.select(list(range(10)), None) == list(range(10))
    assert ec.select(list(range(10)), 2) == [0, 9]
    assert ec.select(list(range(10)), 3) == [0, 4, 9]
    assert ec.select([7], 3) == [7]


# the partial-sum and split kernels of every family but TT contract (chain kernels: slow under the
# interpreter, run on the GPU); 40 rows: several row blocks for BM 16 and 32, one for BM >= 64
CI_CASES = ["spline.bspline", "spline.gaussian", "lowrank", "tt.rebuild", "kronecker", "decoupled"]


@pytest.mark.parametrize("case", CI_CASES)
def test_every_kernel_of_the_case_agrees_with_the_reference_on_its_first_and_last_gpu_config(case, kernel_device):
    outcomes = ec.run(dtypes=(torch.float32,), modes=("sequence",), cases=[case], limit=2, rows=40,
                      device=kernel_device, progress=lambda line: None)
    assert len(outcomes) >= 4
    failures = [f"{o.kernel} [{o.config}]: {o.error}" for o in outcomes if o.error]
    assert not failures, "\n".join(failures)


def test_unknown_case_is_an_error():
    with pytest.raises(ValueError, match="unknown cases"):
        ec.run(cases=["nope"])
