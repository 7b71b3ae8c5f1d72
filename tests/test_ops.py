"""``torch.library.opcheck`` on every custom op, with the arguments real layers pass to it.

opcheck checks the schema, that the fake (meta) implementation gives the real output's shapes,
strides and dtypes, the autograd registration, and AOT dispatch (what ``torch.compile`` relies
on), under each backend. The calls are recorded from each layer's forward and backward.
"""

from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tspline_kernels as tk
from tspline_kernels import backend
from tspline_kernels.spline import ops as spline_ops

LAYERS = {
    "bspline": lambda: tk.SplineLinear(19, 13, grid=(5, 6)),
    "gaussian": lambda: tk.SplineLinear(19, 13, basis="gaussian", n_control_points=7),
    "bicubic": lambda: tk.SplineLinear(19, 13, basis="bicubic", n_control_points=7),  # a padded 3 x 3 grid
    "lowrank": lambda: tk.LowRankLinear(19, 13, 3),
    "tt": lambda: tk.TTLinear((3, 2, 2), (2, 3, 2), 2),
    "spline_tt": lambda: tk.SplineTTLinear((4, 5), (5, 4), 2, (4, 4)),
    "kronecker": lambda: tk.KroneckerLinear((3, 5, 2), (4, 3, 2)),
    "kronecker_gated": lambda: tk.KroneckerLinear((3, 5), (4, 5), gated=True, gating_hidden_dim=4),
    "decoupled": lambda: tk.DecoupledSplineMLP(19, 13, 3),
    # a training forward of KEEP_U_MIN_ROWS rows or more (lowered for the call): separable_linear_kept
    "hierarchical_kept": lambda: tk.HierarchicalSplineLinear(19, 13, coarse_grid=(4, 4), fine_grid=(5, 6)),
}


class _Record(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "tspline":
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _fresh(a):
    """A new leaf with the same values, so opcheck's own backward passes are independent."""
    if isinstance(a, torch.Tensor):
        return a.detach().clone().requires_grad_(a.requires_grad and a.is_floating_point())
    if isinstance(a, (list, tuple)):
        return type(a)(_fresh(b) for b in a)
    return a


def _recorded_calls(name: str):
    torch.manual_seed(0)
    layer = LAYERS[name]()
    x = torch.randn(2, 3, layer.in_features, requires_grad=True)
    with _Record() as rec, mock.patch.object(spline_ops, "KEEP_U_MIN_ROWS", 6 if name.endswith("_kept") else 7):
        layer(x).sum().backward()
    return rec.calls


@pytest.mark.parametrize("which", ["reference", "triton"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_opcheck(name, which):
    calls = _recorded_calls(name)
    assert calls, f"{name} called no tspline op"
    for op, args, kwargs in calls:
        with backend(which):
            torch.library.opcheck(op, _fresh(args), _fresh(kwargs))


def test_every_registered_op_is_checked():
    seen = {op._opname for name in LAYERS for op, _, _ in _recorded_calls(name)}
    registered = {n for n in dir(torch.ops.tspline) if not n.startswith("_") and n != "name"}
    assert registered <= seen, f"ops not exercised by test_opcheck: {sorted(registered - seen)}"
