"""Kernel corners a review found: NaN inputs give NaN exactly where the reference does, in the output
and in the gradients (a NaN must neither vanish into a finite value nor spread where the reference has
none); non-contiguous parameters work as their contiguous copies."""

import pytest
import torch

import tspline_kernels as tk


def _outputs(layer, x, which):
    with tk.backend(which):
        xi = x.detach().clone().requires_grad_(True)
        y = layer(xi)
        grads = torch.autograd.grad(y, [xi, *layer.parameters()], torch.ones_like(y), allow_unused=True)
    return [y.detach(), *grads]


def _assert_same_nan_pattern(layer, x):
    names = ["y", "dx"] + [f"d{n}" for n, _ in layer.named_parameters()]
    got, want = _outputs(layer, x, "triton"), _outputs(layer, x, "reference")
    for name, a, e in zip(names, got, want):
        assert (a is None) == (e is None), name
        if a is None:  # hard gates: no gradient for the gate networks on either backend
            continue
        assert torch.equal(a.isnan(), e.isnan()), f"{name}: NaN at {a.isnan().sum()}, reference {e.isnan().sum()}"


def test_decoupled_nan_row_has_nan_input_gradient(kernel_device):
    """The backward kernel's slopes at a NaN z are NaN (the span index alone is made valid)."""
    layer = tk.DecoupledSplineMLP(15, 9, 5, n_basis=6, device=kernel_device)
    x = torch.randn(4, 15, device=kernel_device)
    x[2, 3] = float("nan")
    _assert_same_nan_pattern(layer, x)
    dx = _outputs(layer, x, "triton")[1]
    assert dx[2].isnan().all() and dx[[0, 1, 3]].isfinite().all()


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_gated_kronecker_nan_in_the_batch_mean(mode, kernel_device):
    """A NaN in the batch reaches every gate as in torch: relu(NaN) is NaN, so soft gating gives NaN
    everywhere and hard gating fails g > 0.5 (the identity path) as the reference does."""
    layer = tk.KroneckerLinear((3, 5), (3, 3), gated=True, gating_mode=mode, device=kernel_device)
    with torch.no_grad():
        for gate in layer.gates:
            gate[2].bias.fill_(1.0)  # sigmoid(b2) > 0.5: a dropped NaN would pick the transform path
    x = torch.randn(6, 15, device=kernel_device)
    x[2, 3] = float("nan")
    _assert_same_nan_pattern(layer, x)
    with torch.no_grad():
        with tk.backend("triton"):
            got = layer(x)
        with tk.backend("reference"):
            want = layer(x)
    torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("which", ["reference", "triton"])
def test_kronecker_three_modes_non_contiguous_factor(which, kernel_device):
    """More than two modes group the factors by Kronecker products: a transposed (non-contiguous)
    factor gives the same output and gradients as its contiguous copy (torch.kron raised a view error)."""
    layer = tk.KroneckerLinear((3, 1, 5), (3, 2, 3), device=kernel_device)
    x = torch.randn(4, 15, device=kernel_device)
    with tk.backend(which):
        want = _outputs(layer, x, which)
        with torch.no_grad():
            for k, f in enumerate(layer.factors):
                layer.factors[k] = torch.nn.Parameter(f.detach().T.contiguous().T)
        got = _outputs(layer, x, which)
    assert not layer.factors[2].is_contiguous()
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


def test_decoupled_nan_output_gradient_stays_in_its_coefficients(kernel_device):
    """A NaN in one row of dy reaches only the four coefficients of each unit that row's spline
    touches (the reference's index_add), not every coefficient through u * 0."""
    layer = tk.DecoupledSplineMLP(15, 9, 5, n_basis=8, device=kernel_device)
    x = torch.randn(7, 15, device=kernel_device)
    dy = torch.randn(7, 9, device=kernel_device)
    dy[3, 1] = float("nan")
    grads = {}
    for which in ("reference", "triton"):
        with tk.backend(which):
            y = layer(x)
            grads[which] = torch.autograd.grad(y, layer.coef, dy)[0]
    assert grads["reference"].isnan().sum() == 4 * 5
    assert torch.equal(grads["triton"].isnan(), grads["reference"].isnan())
