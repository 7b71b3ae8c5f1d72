import os
import zlib

import pytest
import torch

# Kernels run compiled on CUDA and under the Triton interpreter elsewhere; the switch must be set
# before anything imports triton (the package sets it itself for CPU-only torch builds).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# No compiled graph is reused from an earlier run: Inductor's on-disk cache key does not cover a
# custom op's fake implementation, so after an edit to one a cached graph asserts the old shapes.
# (Imported after the switch above: Inductor's config imports triton.)
import torch._functorch.config  # noqa: E402
import torch._inductor.config  # noqa: E402

torch._inductor.config.fx_graph_cache = False
torch._functorch.config.enable_autograd_cache = False

# Under pytest-xdist (the README's `pytest -n auto`) the workers share the cores: each gets its
# share of torch's intra-op threads instead of all of them.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# The device the Triton kernels are checked on: compiled on a GPU, interpreted on the CPU.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    """A different, reproducible seed per test (derived from its id)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def kernel_device() -> str:
    return KERNEL_DEVICE


@pytest.fixture
def spy(monkeypatch):
    """``spy(module, *names)`` wraps those functions of ``module`` (calls go through) and returns
    the list that each call appends its function's name to."""
    def wrap(module, *names: str) -> list[str]:
        calls: list[str] = []
        for name in names:
            real = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
        return calls
    return wrap
