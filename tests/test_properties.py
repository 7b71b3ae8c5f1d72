"""Property tests (hypothesis) of the maths every family relies on, on the references: random
sizes rather than hand-picked ones. Small example counts keep CI fast."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tspline_kernels as tk
from tspline_kernels.reference import kronecker as kref
from tspline_kernels.reference import spline as sref
from tspline_kernels.testing import assert_close

FAST = settings(max_examples=25, deadline=None)
small = st.integers(1, 6)


@FAST
@given(n=st.integers(1, 300), g=st.integers(4, 70))
def test_bspline_basis_is_a_banded_partition_of_unity(n, g):
    b = sref.basis_matrix(n, g, sref.BSPLINE, torch.float64)
    assert b.shape == (n, g) and (b >= 0).all()
    assert torch.allclose(b.sum(1), torch.ones(n, dtype=torch.float64))
    assert ((b != 0).sum(1) <= 4).all()


@FAST
@given(n_in=st.integers(4, 40), n_out=st.integers(4, 40), gi=st.integers(4, 12), go=st.integers(4, 12),
       m=st.integers(0, 5), basis=st.sampled_from(["bspline", "bicubic", "gaussian", "eisenstein"]))
def test_spline_layer_is_x_times_its_materialized_weight(n_in, n_out, gi, go, m, basis):
    kw = {"grid": (go, gi)} if basis == "bspline" else {"n_control_points": gi}
    layer = tk.SplineLinear(n_in, n_out, basis=basis, dtype=torch.float64, **kw)
    x = torch.randn(m, n_in, dtype=torch.float64)
    assert_close(layer(x), x @ layer.materialize().T + layer.bias)


@FAST
@given(in_modes=st.lists(small, min_size=2, max_size=3), out_seed=st.integers(0, 10**6),
       eps=st.floats(0.01, 0.6))
def test_tt_svd_meets_eps(in_modes, out_seed, eps):
    g = torch.Generator().manual_seed(out_seed)
    out_modes = [int(torch.randint(1, 6, (1,), generator=g)) for _ in in_modes]
    linear = torch.nn.Linear(math.prod(in_modes), math.prod(out_modes), dtype=torch.float64)
    tt = tk.TTLinear.from_linear(linear, in_modes, out_modes, eps=eps)
    assert tt.fit_report.relative_error <= eps + 1e-12


@FAST
@given(dims=st.lists(small, min_size=4, max_size=4))
def test_nearest_kronecker_residual_is_the_optimal_tail(dims):
    m1, m2, n1, n2 = dims
    w = torch.randn(m1 * m2, n1 * n2, dtype=torch.float64)
    a, b, s = kref.nearest_kronecker(w, (m1, m2), (n1, n2))
    residual = (w - torch.kron(a, b)).norm()
    assert torch.isclose(residual, s[1:].norm(), rtol=1e-9, atol=1e-12)
    # no rank-1 perturbation of the optimum does better
    worse = (w - torch.kron(a + 1e-3 * torch.randn_like(a), b)).norm()
    assert worse >= residual - 1e-12


@FAST
@given(out_f=st.integers(1, 5000), in_f=st.integers(1, 5000), d=st.integers(2, 6))
def test_suggest_modes_factorises_exactly(out_f, in_f, d):
    modes = tk.suggest_modes(out_f, in_f, d)
    assert len(modes.in_modes) == len(modes.out_modes) == d
    assert math.prod(modes.in_modes) == in_f and math.prod(modes.out_modes) == out_f
