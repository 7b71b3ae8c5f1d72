"""The oldest supported Triton (3.6, the GPU image's) runs the kernels as the pinned one does.

CI runs the Triton-path tests a second time in a Triton 3.6 venv (``.ci/run``); this file holds
the direct checks of the version shims in ``tspline_kernels/_triton.py``.
"""

import torch

from tspline_kernels._triton import tl, triton


@triton.jit
def _blocked_sum_kernel(x_ptr, out_ptr, K, BK: tl.constexpr):
    """out[0] = sum(x[:K]), looping over K (a runtime scalar) in blocks of BK."""
    acc = tl.zeros((BK,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        acc += tl.load(x_ptr + rk, mask=rk < K, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


def test_runtime_scalar_as_loop_bound(kernel_device):
    # Triton 3.6's interpreter turned K into an index with int() of a 1-element array, which
    # NumPy >= 2.4 rejects: every kernel with such a loop failed before _patch_interpreter_index
    x = torch.randn(37, device=kernel_device)
    out = torch.empty(1, device=kernel_device)
    _blocked_sum_kernel[(1,)](x, out, x.numel(), BK=16)
    torch.testing.assert_close(out[0], x.sum())
