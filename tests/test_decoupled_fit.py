"""DecoupledSplineMLP.fit / from_mlp: recovery of a known decoupled function, a never-increasing
objective, implicit MLP Jacobians equal to explicit ones, and an exact initialisation at r = h."""

import pytest
import torch
from torch import nn

from tspline_kernels.bench.decoupling import block_params, compress_block, ranks
from tspline_kernels.decoupled import DecoupledSplineMLP
from tspline_kernels.decoupled import fit as fitting
from tspline_kernels.reference import decoupled as ref
from tspline_kernels.testing import assert_close

F64 = torch.float64


def _block(m: int, h: int, n: int) -> tuple[nn.Linear, nn.Linear]:
    return nn.Linear(m, h).double(), nn.Linear(h, n).double()


def _cubic(t: torch.Tensor) -> torch.Tensor:
    """An activation that is itself a cubic polynomial, so every g_i = s(a z + b) is a cubic spline
    on any knots: the r = h initialisation must then reproduce the block to rounding."""
    return t ** 3 / 6 - t ** 2 / 2 + t


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _non_increasing(history: list[float]) -> bool:
    return all(b <= a for a, b in zip(history, history[1:]))


def test_recovers_a_known_decoupled_function():
    """f = W g(V^T x) + b with unit-norm V and 6-function splines on the samples' range of each z_i:
    the fit's knots (K = 12, spans 9 = 3 x 3) then contain the true ones once V is found, so f is
    exactly representable and the held-out error measures the ALS alone."""
    gen = torch.Generator().manual_seed(1)
    m, n, r = 5, 4, 2
    v = torch.linalg.qr(torch.randn(m, r, dtype=F64, generator=gen))[0]
    w = torch.randn(n, r, dtype=F64, generator=gen)
    b = torch.randn(n, dtype=F64, generator=gen)
    coef = torch.randn(r, 6, dtype=F64, generator=gen)
    x = torch.randn(400, m, dtype=F64, generator=gen)
    lo, hi = (x @ v).min(0).values, (x @ v).max(0).values

    def f(x):
        return ref.spline_activation(x @ v, coef, lo, hi) @ w.T + b

    layer = DecoupledSplineMLP.fit(f, x, r, iters=100, holdout=0.0, progress=False)
    fresh = 1.2 * torch.randn(300, m, dtype=F64, generator=gen)  # some beyond the fitted range
    with torch.no_grad():
        assert _relative(layer(fresh), f(fresh)) < 1e-3
    assert _non_increasing(layer.fit_objective)
    assert layer.fit_objective[-1] < 1e-4 * layer.fit_objective[0]
    report = layer.fit_report
    assert report.relative_error < 1e-3 and report.output_error < 1e-3  # Jacobians and values
    assert report.details["iterations"] == len(layer.fit_objective) - 1
    assert layer.V.dtype == F64 and layer.rank == r and layer.n_basis == 12


@pytest.mark.parametrize("c_update", ["exact", "branch"])
def test_objective_never_increases_and_improves_the_start(c_update):
    fc1, fc2 = _block(6, 12, 5)
    x = torch.randn(250, 6, dtype=F64)
    layer = DecoupledSplineMLP.from_mlp(fc1, nn.GELU(), fc2, x, 4, iters=8, c_update=c_update, progress=False)
    start = DecoupledSplineMLP.from_mlp(fc1, nn.GELU(), fc2, x, 4, iters=0, progress=False)
    history = layer.fit_objective
    assert len(history) == 9 and _non_increasing(history)
    assert history[-1] < 0.8 * history[0]
    assert layer.fit_report.output_error < start.fit_report.output_error  # on the held-out samples
    assert start.fit_objective == pytest.approx(history[:1], rel=1e-12)


def test_implicit_mlp_jacobians_equal_explicit():
    fc1, fc2 = _block(5, 9, 4)
    x = torch.randn(30, 5, dtype=F64)
    pre = (x @ fc1.weight.T + fc1.bias).detach().requires_grad_()
    (slope,) = torch.autograd.grad(torch.tanh(pre).sum(), pre)
    implicit = fitting.MLPJacobians(fc1.weight.detach(), fc2.weight.detach(), slope)
    jac = torch.func.vmap(torch.func.jacrev(lambda x: fc2(torch.tanh(fc1(x)))))(x).detach()
    explicit = fitting.ExplicitJacobians(jac)
    v, w, h = torch.randn(5, 3, dtype=F64), torch.randn(4, 3, dtype=F64), torch.randn(30, 3, dtype=F64)
    assert_close(implicit.norm2(), explicit.norm2(), name="norm")
    assert_close(implicit.m1(v, h), explicit.m1(v, h), name="M1")
    assert_close(implicit.m2(w, h), explicit.m2(w, h), name="M2")
    assert_close(implicit.m3(w, v), explicit.m3(w, v), name="M3")


def test_from_mlp_equals_fit_on_the_same_block_and_samples():
    fc1, fc2 = _block(6, 10, 5)
    x = torch.randn(200, 6, dtype=F64)
    start = DecoupledSplineMLP.from_mlp(fc1, nn.GELU(), fc2, x, 4, iters=0, progress=False)
    a = DecoupledSplineMLP.from_mlp(fc1, nn.GELU(), fc2, x, 4, iters=4, progress=False)
    b = DecoupledSplineMLP.fit(lambda x: fc2(nn.functional.gelu(fc1(x))), x, 4, iters=4, init=start, progress=False)
    for name in ("V", "W", "coef", "lo", "hi", "bias"):
        assert_close(getattr(b, name), getattr(a, name), name=name)
    assert_close(torch.tensor(b.fit_objective), torch.tensor(a.fit_objective), name="objective")
    assert b.fit_report.output_error == pytest.approx(a.fit_report.output_error, rel=1e-8)
    assert b.fit_report.relative_error == pytest.approx(a.fit_report.relative_error, rel=1e-6)


def test_initialisation_reproduces_the_block_at_full_rank():
    fc1, fc2 = _block(4, 7, 3)
    x = torch.randn(120, 4, dtype=F64)
    # holdout=0: the report then measures the fitted samples, all inside the knot ranges (beyond
    # them g_i continues linearly, the cubic does not)
    layer = DecoupledSplineMLP.from_mlp(fc1, _cubic, fc2, x, 7, n_basis=5, iters=0, holdout=0.0, progress=False)
    fresh = torch.randn(50, 4, dtype=F64)
    inside = ((fresh @ layer.V >= layer.lo) & (fresh @ layer.V <= layer.hi)).all(1)
    assert inside.sum() > 10
    with torch.no_grad():
        assert _relative(layer(fresh[inside]), fc2(_cubic(fc1(fresh[inside])))) < 1e-12
    # the Jacobian error comes from ||J||^2 - 2<J, J_hat> + ||J_hat||^2: cancellation limits it to ~1e-8
    assert layer.fit_report.output_error < 1e-12 and layer.fit_report.relative_error < 1e-6


def test_progress_bar_shows_the_objective(capsys):
    pytest.importorskip("tqdm")
    fc1, fc2 = _block(3, 5, 2)
    DecoupledSplineMLP.from_mlp(fc1, torch.tanh, fc2, torch.randn(40, 3, dtype=F64), 2, iters=2, progress=True)
    assert "objective=" in capsys.readouterr().err


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"rank": 11}, ValueError, "hidden size"),
    ({"rank": 0}, ValueError, "rank"),
    ({"samples": torch.randn(20, 5, dtype=F64)}, ValueError, "samples"),
    ({"samples": torch.ones(20, 4, dtype=torch.int64)}, TypeError, "samples"),
    ({"c_update": "cg"}, ValueError, "c_update"),
    ({"holdout": 1.0}, ValueError, "holdout"),
    ({"fc1": nn.Conv1d(4, 10, 1)}, TypeError, "fc1"),
    ({"n_basis": 3}, ValueError, "n_basis"),
])
def test_bad_arguments(kwargs, error, match):
    fc1, fc2 = _block(4, 10, 3)
    args = {"fc1": fc1, "activation": torch.tanh, "fc2": fc2, "samples": torch.randn(20, 4, dtype=F64), "rank": 3,
            "progress": False, **kwargs}
    with pytest.raises(error, match=match):
        DecoupledSplineMLP.from_mlp(**args)


def test_fit_rejects_bad_arguments():
    x = torch.randn(10, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"\(N, n\)"):
        DecoupledSplineMLP.fit(lambda x: x.sum(), x, 2, progress=False)
    with pytest.raises(TypeError, match="init"):
        DecoupledSplineMLP.fit(torch.sin, x, 2, init=nn.Linear(3, 3), progress=False)
    with pytest.raises(ValueError, match="out_features"):
        DecoupledSplineMLP.fit(torch.sin, x, 2, init=DecoupledSplineMLP(3, 4, 2, dtype=F64), progress=False)
    with pytest.raises(TypeError, match="callable"):
        DecoupledSplineMLP.fit("sin", x, 2, progress=False)


# ------------------------------------------------------------------------ the benchmark's blocks
class _Layer(nn.Module):
    """The parts of a BERT layer that bench/decoupling.py replaces."""

    def __init__(self, m: int, h: int, n: int) -> None:
        super().__init__()
        self.intermediate = nn.Module()
        self.intermediate.dense, self.intermediate.intermediate_act_fn = nn.Linear(m, h), nn.GELU()
        self.output = nn.Module()
        self.output.dense = nn.Linear(h, n)

    def forward(self, x):
        return self.output.dense(self.intermediate.intermediate_act_fn(self.intermediate.dense(x)))


@pytest.mark.parametrize("method", ["decoupled", "lowrank", "keep_units"])
def test_benchmark_methods_fit_the_budget(method):
    m, h, n = 6, 16, 5
    width = ranks(0.5, m, h, n)[method]
    layer = _Layer(m, h, n)
    x = torch.randn(64, m)
    fit = compress_block(layer, method, width, x, iters=1, progress=False)
    params = sum(p.numel() for p in layer.parameters())
    assert fit["params"] == params <= 0.5 * block_params(m, h, n)
    assert layer(x).shape == (64, n)


def test_keeping_every_unit_is_exact():
    layer = _Layer(5, 8, 4)
    x = torch.randn(40, 5)
    expected = layer(x).detach()
    compress_block(layer, "keep_units", 8, x, iters=0, progress=False)
    assert_close(layer(x), expected, torch.float32)
