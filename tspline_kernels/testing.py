"""Comparison helpers shared by the test suite (and usable by anyone checking a kernel).

``assert_close`` compares in fp64 with two criteria from one per-dtype table:
  * relative RMS error ||a - e|| / ||e|| <= rms;
  * every element |a - e| <= atol * max|e| + rtol * |e| (atol scaled to the tensor's magnitude).
The failure message names the worst element.
"""

from __future__ import annotations

import torch

# dtype -> (rms, atol, rtol). fp32 covers fp32 accumulation over a few thousand terms; the half
# types cover operands rounded to 11 (fp16) or 8 (bf16) significant bits before the fp32 dot.
TOLERANCES: dict[torch.dtype, tuple[float, float, float]] = {
    torch.float64: (1e-10, 1e-10, 1e-8),
    torch.float32: (2e-5, 2e-5, 1e-4),
    torch.float16: (3e-3, 5e-3, 1e-2),
    torch.bfloat16: (2e-2, 4e-2, 5e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, name: str = "") -> None:
    """Assert ``actual`` matches ``expected`` within the tolerances of ``dtype`` (default: actual's)."""
    rms_tol, atol, rtol = TOLERANCES[dtype or actual.dtype]
    label = f"{name}: " if name else ""
    if actual.shape != expected.shape:
        raise AssertionError(f"{label}shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if not torch.isfinite(e).all():
        raise AssertionError(f"{label}non-finite values in the expected tensor: nothing to compare against")
    if not torch.isfinite(a).all():
        raise AssertionError(f"{label}non-finite values in result")
    if e.numel() == 0:
        return
    diff = (a - e).abs()
    scale = e.abs().max().item()
    rms = (diff.norm() / max(e.norm().item(), 1e-300)).item()
    bound = atol * scale + rtol * e.abs()
    worst = int(torch.argmax(diff - bound))
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), e.shape))
    if rms > rms_tol or bool((diff > bound).any()):
        raise AssertionError(
            f"{label}relative RMS error {rms:.3e} (limit {rms_tol:.1e}); worst element {idx}: "
            f"got {a[idx].item():.6g}, expected {e[idx].item():.6g} "
            f"(|diff| {diff[idx].item():.3e}, allowed {bound[idx].item():.3e})"
        )


def assert_compiles_like_eager(model: torch.nn.Module, x: torch.Tensor, backends=("reference", "triton")) -> None:
    """``torch.compile(model, fullgraph=True)`` matches eager in output and in the gradients of ``x``
    and every parameter, with each backend forced (the op picks its backend at run time, inside the
    compiled graph). Dynamo's caches are reset first: the entries other models compiled earlier in
    the process left on the same code objects (``nn.Sequential.forward``) count against its
    recompile limit, which under ``fullgraph=True`` is an error."""
    from ._backend import backend

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    params = [x, *model.parameters()]
    y_eager = model(x)
    g_eager = torch.autograd.grad(y_eager.sum(), params)
    names = ["dx"] + [f"d{n}" for n, _ in model.named_parameters()]
    for which in backends:
        with backend(which):
            y_comp = compiled(x)
            g_comp = torch.autograd.grad(y_comp.sum(), params)
        assert_close(y_comp, y_eager, torch.float32, name=f"{which} y")
        for name, a, b in zip(names, g_comp, g_eager):
            assert_close(a, b, torch.float32, name=f"{which} {name}")


def assert_learns(model: torch.nn.Module, target: torch.nn.Module, x: torch.Tensor, steps: int = 300,
                  lr: float = 0.03, factor: float = 1e-3) -> None:
    """Adam on the MSE to ``target(x)`` cuts ``model``'s loss below ``factor`` times its start."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    y = target(x).detach()
    first = loss = None
    for _ in range(steps):
        loss = (model(x) - y).pow(2).mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < factor * first, f"loss {loss.item():.3e} did not fall below {factor} x {first:.3e}"


def assert_backends_agree(layer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, dtype: torch.dtype,
                          x_grad: bool = True) -> None:
    """The Triton kernels match the reference: output, dx (if ``x_grad``) and the gradient of every
    parameter that requires grad (frozen ones are left out, so each backward branch can be
    checked) for the output gradient ``g``, in value (``dtype``'s tolerances) and in dtype. A
    gradient the reference leaves as None (a path not taken) must be None from the kernels too."""
    from ._backend import backend

    params = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    results = {}
    for which in ("triton", "reference"):
        with backend(which):
            xi = x.detach().clone().requires_grad_(x_grad)
            y = layer(xi)
            wrt = [xi] * x_grad + [p for _, p in params]
            results[which] = (y, *torch.autograd.grad(y, wrt, g, allow_unused=True))
    names = ["y"] + ["dx"] * x_grad + [f"d{n}" for n, _ in params]
    for name, got, want in zip(names, results["triton"], results["reference"]):
        if want is None:
            assert got is None, f"{name}: the reference gives no gradient, the kernels do"
            continue
        assert got is not None and got.dtype == want.dtype, f"{name}: {getattr(got, 'dtype', None)} != {want.dtype}"
        assert_close(got, want, dtype, name=name)


def cuda_step_peak_bytes(layer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> int:
    """Peak CUDA memory allocated by one ``layer(x).backward(g)`` beyond what was live before it,
    measured after a warm-up step (autotuning allocates scratch on the first call)."""
    layer(x).backward(g)
    x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    layer(x).backward(g)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base
