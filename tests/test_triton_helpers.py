"""Shared Triton helpers in ``tspline_kernels/_triton.py``, run under the interpreter."""

import pytest
import torch

import tspline_kernels  # noqa: F401  (sets TRITON_INTERPRET on CPU-only torch)
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
