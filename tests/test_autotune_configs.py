"""``TSPLINE_AUTOTUNE=quick|full``: which autotune configs a GPU tries, checked without a GPU."""

import pytest

from tspline_kernels import _triton
from tspline_kernels.bench import every_config as ec
from triton.runtime.autotuner import Autotuner

SPACE = [{"BM": bm, "BK": 64} for bm in (16, 64, 128)]
QUICK = [{"BM": 16, "BK": 64, "num_warps": 4, "num_stages": 3}, {"BM": 128, "BK": 64, "num_warps": 8, "num_stages": 4}]


def _key(c):
    return c.kwargs, c.num_warps, c.num_stages


@pytest.fixture
def on_gpu(monkeypatch):
    """configs() as it runs on a GPU (the interpreter switch off)."""
    monkeypatch.setattr(_triton, "INTERPRET", False)
    return monkeypatch


@pytest.mark.parametrize("mode", [None, "full"])
def test_full_mode_tries_the_whole_space(on_gpu, mode):
    if mode is None:
        on_gpu.delenv("TSPLINE_AUTOTUNE", raising=False)
    else:
        on_gpu.setenv("TSPLINE_AUTOTUNE", mode)
    got = _triton.configs(SPACE, interpret={"BM": 16, "BK": 32}, quick=QUICK)
    assert len(got) == len(SPACE) * 2 * 2 == len(got.full)
    assert [_key(c) for c in got] == [_key(c) for c in got.full]


def test_quick_mode_tries_only_the_quick_configs_and_keeps_the_full_space(on_gpu):
    on_gpu.setenv("TSPLINE_AUTOTUNE", "quick")
    got = _triton.configs(SPACE, interpret={"BM": 16, "BK": 32}, quick=QUICK)
    assert [_key(c) for c in got] == [({"BM": 16, "BK": 64}, 4, 3), ({"BM": 128, "BK": 64}, 8, 4)]
    assert len(got.full) == 12 and all(any(c is f for f in got.full) for c in got)


def test_interpreter_runs_its_one_small_config_in_either_mode(monkeypatch):
    monkeypatch.setattr(_triton, "INTERPRET", True)
    for mode in _triton.AUTOTUNE_MODES:
        monkeypatch.setenv("TSPLINE_AUTOTUNE", mode)
        got = _triton.configs(SPACE, interpret={"BM": 16, "BK": 32}, quick=QUICK)
        assert [_key(c) for c in got] == [({"BM": 16, "BK": 32}, 1, 1)]
        assert len(got.full) == 12


def test_quick_config_outside_the_space_is_an_error(on_gpu):
    with pytest.raises(ValueError, match="not in the autotune space"):
        _triton.configs(SPACE, interpret={"BM": 16}, quick=[{"BM": 32, "BK": 64, "num_warps": 4, "num_stages": 3}])


def test_unknown_mode_is_an_error(monkeypatch):
    monkeypatch.setenv("TSPLINE_AUTOTUNE", "fast")
    with pytest.raises(ValueError, match="TSPLINE_AUTOTUNE='fast'"):
        _triton.configs(SPACE, interpret={"BM": 16}, quick=QUICK)


def test_every_kernel_has_one_or_two_quick_configs_inside_its_full_space():
    assert all(any(isinstance(t, Autotuner) for t in vars(m).values()) for m in ec.KERNEL_MODULES)
    tuners = list(ec.autotuners().values())  # every family's kernel modules, decoupled included
    for t in tuners:
        name, quick, full = t.base_fn.__name__, t.configs.quick, t.configs.full
        assert 1 <= len(quick) <= 2 and len(full) >= 4, name
        assert all(any(q is c for c in full) for q in quick), name
