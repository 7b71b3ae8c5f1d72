"""Backend selection, routing of ops, torch.compile(fullgraph=True) and Triton set-up."""

import os
import threading
from unittest import mock

import pytest
import torch

import tspline_kernels as tk
from tspline_kernels import backend, get_backend
from tspline_kernels.spline import kernels
from tspline_kernels.testing import assert_close, assert_compiles_like_eager


def test_default_env_and_context(monkeypatch):
    monkeypatch.delenv("TSPLINE_BACKEND", raising=False)
    assert get_backend() == "auto"
    monkeypatch.setenv("TSPLINE_BACKEND", "reference")
    assert get_backend() == "reference"
    with backend("triton"):
        assert get_backend() == "triton"
        with backend("auto"):
            assert get_backend() == "auto"
        assert get_backend() == "triton"
    assert get_backend() == "reference"
    monkeypatch.setenv("TSPLINE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        get_backend()
    with pytest.raises(ValueError, match="unknown backend"):
        with backend("fast"):
            pass


def test_environment_read_as_os_environ_has_it(monkeypatch):
    """The variable as ``os.environ`` gives it, after any way of setting it: monkeypatch,
    ``mock.patch.dict``, ``os.environ`` assigned, ``os.putenv`` alone (not seen, as by
    ``os.environ``)."""
    monkeypatch.delenv("TSPLINE_BACKEND", raising=False)
    with mock.patch.dict(os.environ, {"TSPLINE_BACKEND": "reference"}):
        assert get_backend() == "reference" == os.environ["TSPLINE_BACKEND"]
    assert get_backend() == "auto"
    os.environ["TSPLINE_BACKEND"] = "triton"
    try:
        assert get_backend() == "triton"
    finally:
        del os.environ["TSPLINE_BACKEND"]
    os.putenv("TSPLINE_BACKEND", "reference")
    try:
        assert get_backend() == "auto" and "TSPLINE_BACKEND" not in os.environ
    finally:
        os.unsetenv("TSPLINE_BACKEND")


def test_routing(spy):
    """auto sends CPU tensors to the reference; triton forces the launcher."""
    calls = spy(kernels, "separable_levels")
    layer = tk.SplineLinear(9, 5)
    x = torch.randn(2, 9)
    with backend("auto"):
        layer(x)
    assert calls == []
    with backend("triton"):
        layer(x)
    assert calls == ["separable_levels"]


def test_override_is_per_thread():
    """Each thread has its own override stack: one thread's exit never pops another's entry."""
    barrier = threading.Barrier(2)
    seen = {}

    def run(name, other):
        with backend(name):
            barrier.wait()  # both threads are inside their blocks
            with backend(other):
                barrier.wait()
                seen[name, "inner"] = get_backend()
            barrier.wait()  # the other thread has left its inner block
            seen[name, "outer"] = get_backend()
        seen[name, "after"] = get_backend()

    threads = [threading.Thread(target=run, args=args) for args in (("triton", "reference"), ("reference", "auto"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {("triton", "inner"): "reference", ("triton", "outer"): "triton", ("triton", "after"): "auto",
                    ("reference", "inner"): "auto", ("reference", "outer"): "reference",
                    ("reference", "after"): "auto"}


@pytest.mark.parametrize("forward_backend", ["triton", "reference"])
def test_backward_follows_the_forward_backend(spy, forward_backend):
    """A backward run on another thread, under another override, still uses the forward's backend."""
    calls = spy(kernels, "separable_backward")
    layer = tk.SplineLinear(9, 5)
    x = torch.randn(3, 9, requires_grad=True)
    with backend(forward_backend):
        y = layer(x)
    grads = []

    def run_backward():
        with backend("reference" if forward_backend == "triton" else "triton"):
            grads.extend(torch.autograd.grad(y.sum(), [x, layer.control]))

    thread = threading.Thread(target=run_backward)
    thread.start()
    thread.join()
    assert calls == (["separable_backward"] if forward_backend == "triton" else [])
    with backend("reference"):
        want = torch.autograd.grad(layer(x).sum(), [x, layer.control])
    for a, b in zip(grads, want):
        assert_close(a, b, torch.float32)


@pytest.mark.compile
@pytest.mark.parametrize("basis", ["bspline", "bicubic", "gaussian"])
def test_torch_compile_fullgraph(basis):
    model = torch.nn.Sequential(tk.SplineLinear(24, 16, basis=basis), torch.nn.GELU(), torch.nn.Linear(16, 3))
    assert_compiles_like_eager(model, torch.randn(5, 24, requires_grad=True))


def test_fake_tensor_shapes():
    """The fake (meta) implementations give the right shapes without running anything."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = tk.SplineLinear(9, 5, basis="gaussian")
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = layer(torch.randn(2, 4, 9))
        assert y.shape == (2, 4, 5)


def test_kernel_launch_input_checks():
    x = torch.randn(3, 9, dtype=torch.float64)
    with backend("triton"), pytest.raises(TypeError, match="fp32, fp16 or bf16"):
        tk.SplineLinear(9, 5, dtype=torch.float64)(x)


def test_interpreter_bf16_dot_is_exact():
    """Our shim for the interpreter's bf16 tl.dot (triton-lang/triton#11584)."""
    from tspline_kernels._triton import INTERPRET, tl, triton

    if not INTERPRET:
        pytest.skip("compiled kernels, no interpreter")

    @triton.jit
    def dot(a_ptr, b_ptr, c_ptr):
        r = tl.arange(0, 16)
        a = tl.load(a_ptr + r[:, None] * 16 + r[None, :])
        b = tl.load(b_ptr + r[:, None] * 16 + r[None, :])
        tl.store(c_ptr + r[:, None] * 16 + r[None, :], tl.dot(a, b))

    a = torch.randn(16, 16).bfloat16()
    b = torch.randn(16, 16).bfloat16()
    c = torch.empty(16, 16)
    dot[(1,)](a, b, c)
    assert_close(c, a.float() @ b.float(), torch.float32)


def test_grad_dtype_is_the_parameters_common_dtype():
    from tspline_kernels.reference.common import grad_dtype

    bf16, fp32 = torch.bfloat16, torch.float32
    assert grad_dtype(fp32, torch.ones(2, dtype=bf16), None, bf16) == bf16
    assert grad_dtype(fp32, torch.ones(2, dtype=bf16), torch.ones(2, dtype=torch.float16)) == fp32


@pytest.mark.parametrize("transform", ["jvp", "jacfwd"])
def test_forward_mode_transforms_raise_instead_of_zero_tangents(transform):
    """The ops define a backward formula only: forward-mode ``torch.func`` transforms raise rather
    than give zero tangents silently; reverse mode by autograd is unaffected."""
    import tspline_kernels as tk

    layer, x = tk.LowRankLinear(8, 4, 2), torch.randn(8)
    run = {"jvp": lambda: torch.func.jvp(layer, (x,), (x,)), "jacfwd": lambda: torch.func.jacfwd(layer)(x)}[transform]
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        run()
    jac = torch.autograd.functional.jacobian(layer, x)
    torch.testing.assert_close(jac, layer.materialize().detach())
