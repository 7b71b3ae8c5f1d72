"""TTLinear: nn.Linear contract, validation, TT-SVD conversion maths, mode suggestions, strategy choice."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from tspline_kernels import backend
from tspline_kernels.reference import tt as ref
from tspline_kernels.testing import assert_close, assert_compiles_like_eager, assert_learns
from tspline_kernels.tt import TTLinear, cost, pick_strategy, suggest_modes, tt_svd


def test_forward_is_linear_in_materialized_weight():
    layer = TTLinear((3, 2, 5), (2, 3, 4), (1, 2, 3, 1))
    x = torch.randn(2, 3, 30)
    assert layer(x).shape == (2, 3, 24) and layer.materialize().shape == (24, 30)
    assert_close(layer(x), nn.functional.linear(x, layer.materialize(), layer.bias))


def test_parameters_repr_and_counts():
    layer = TTLinear((4, 6), (3, 5), 2)
    assert layer.ranks == (1, 2, 1)
    assert [n for n, _ in layer.named_parameters()] == ["bias", "cores.0", "cores.1"]
    assert [tuple(c.shape) for c in layer.cores] == [(1, 3, 4, 2), (2, 5, 6, 1)]
    assert layer.num_parameters() == 24 + 60 + 15
    assert layer.dense_parameters() == 24 * 15 + 15
    assert "ranks=(1, 2, 1)" in repr(layer) and "strategy='auto'" in repr(layer)


@pytest.mark.parametrize("modes, ranks", [(((16, 16), (8, 32)), 8), (((4, 4, 4, 4), (4, 4, 4, 4)), [1, 3, 5, 2, 1])])
def test_init_matches_nn_linear_scale(modes, ranks):
    layer = TTLinear(*modes, ranks)
    mean_sq = layer.materialize().double().pow(2).mean().item()
    assert mean_sq == pytest.approx(1 / (3 * layer.in_features), rel=1e-6)


def test_state_dict_round_trip_and_dtype_device_kwargs():
    a = TTLinear((3, 5), (7, 2), 3, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 for p in a.parameters())
    b = TTLinear((3, 5), (7, 2), 3, dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 15, dtype=torch.float64)
    assert torch.equal(a(x), b(x))


def test_autocast_runs_in_autocast_dtype():
    layer = TTLinear((4, 4), (2, 4), 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(3, 16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(c.grad.dtype == torch.float32 for c in layer.cores)


@pytest.mark.parametrize(
    "args, error, match",
    [
        (((3, 5), (7,), 2), ValueError, "same number of modes"),
        (((3,), (7,), 2), ValueError, "2 to 6 cores"),
        (((2,) * 7, (2,) * 7, 2), ValueError, "2 to 6 cores"),
        (((3, 0), (7, 2), 2), ValueError, "in_modes\\[1\\] must be >= 1"),
        (((3, 5), (7, -2), 2), ValueError, "out_modes\\[1\\] must be >= 1"),
        (((4.7, 5), (7, 2), 2), TypeError, "in_modes\\[0\\] must be an int, got 4.7"),
        (((4.0, 5), (7, 2), 2), TypeError, "in_modes\\[0\\] must be an int"),
        ((("3", "5"), (7, 2), 2), TypeError, "in_modes\\[0\\] must be an int, got '3'"),
        (("35", (7, 2), 2), TypeError, "in_modes must be a sequence of ints"),
        (((True, 5), (7, 2), 2), TypeError, "in_modes\\[0\\] must be an int, got True"),
        (({3, 5}, (7, 2), 2), TypeError, "in_modes must be a sequence"),  # unordered
        (({3: 1, 5: 1}, (7, 2), 2), TypeError, "in_modes must be a sequence"),
        ((15, (7, 2), 2), TypeError, "in_modes must be a sequence"),
        ((None, (7, 2), 2), TypeError, "in_modes must be a sequence"),
        (((3, 5), (7, 2), 0), ValueError, "ranks must be >= 1"),
        (((3, 5), (7, 2), 2.5), TypeError, "ranks must be an int, got 2.5"),
        (((3, 5), (7, 2), True), TypeError, "ranks must be an int, got True"),
        (((3, 5), (7, 2), None), TypeError, "ranks must be an int"),
        (((3, 5), (7, 2), (1, 0, 1)), ValueError, "ranks\\[1\\] must be >= 1"),
        (((3, 5), (7, 2), (1, 2.0, 1)), TypeError, "ranks\\[1\\] must be an int"),
        (((3, 5), (7, 2), (2, 3, 1)), ValueError, "boundary ranks must be 1"),
        (((3, 5), (7, 2), (1, 3, 2)), ValueError, "boundary ranks must be 1"),
        (((3, 5), (7, 2), (1, 3)), ValueError, "d \\+ 1 = 3 entries"),
        (((3, 5), (7, 2), "3"), TypeError, "ranks must be a sequence of ints"),
    ],
)
def test_bad_structure(args, error, match):
    with pytest.raises(error, match=match):
        TTLinear(*args)


def test_int_likes_are_accepted_and_stored_as_ints():
    """numpy and torch ints (e.g. from a config file or a shape) work like Python ints."""
    layer = TTLinear(np.array([3, 5]), (torch.tensor(7), np.int64(2)), np.int64(3))
    assert layer.in_modes == (3, 5) and layer.out_modes == (7, 2) and layer.ranks == (1, 3, 1)
    assert all(type(m) is int for m in layer.in_modes + layer.out_modes + layer.ranks)
    assert TTLinear((3, 5), (7, 2), np.array([1, 2, 1])).ranks == (1, 2, 1)


@pytest.mark.parametrize("bias", ["no", None, 1])
def test_bias_must_be_a_bool(bias):
    with pytest.raises(TypeError, match="bias must be True or False"):
        TTLinear((3, 5), (7, 2), 2, bias=bias)


def test_meta_device_then_to_empty():
    """``device="meta"`` builds without values (as nn.Linear does, for large-model loading); after
    ``to_empty`` a state dict loads into it, or ``reset_parameters`` initialises it."""
    source = TTLinear((3, 2, 5), (2, 3, 4), (1, 2, 3, 1))
    layer = TTLinear((3, 2, 5), (2, 3, 4), (1, 2, 3, 1), device="meta")
    assert all(p.is_meta for p in layer.parameters()) and "ranks=(1, 2, 3, 1)" in repr(layer)
    layer.to_empty(device="cpu")
    layer.load_state_dict(source.state_dict())
    x = torch.randn(4, 30)
    assert torch.equal(layer(x), source(x))
    layer.reset_parameters()
    assert layer.materialize().double().pow(2).mean().item() == pytest.approx(1 / 90, rel=1e-5)
    bound = 1 / math.sqrt(30)
    assert layer.bias.abs().max() <= bound and torch.isfinite(layer(x)).all()


def test_bad_strategy():
    with pytest.raises(ValueError, match="unknown TT strategy"):
        TTLinear((3, 5), (7, 2), 2, strategy="fast")
    with pytest.raises(ValueError, match="strategy='rebuild' needs"):
        TTLinear((2, 64), (2, 64), 2, strategy="rebuild")  # last core 64 x 64: too big a register tile
    layer = TTLinear((2, 64), (2, 64), 2)
    assert layer.picked_strategy(10_000) == "contract"


def test_bad_inputs():
    layer = TTLinear((3, 5), (7, 2), 2)
    with pytest.raises(ValueError, match="in_features=15"):
        layer(torch.randn(3, 14))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(3, 15, dtype=torch.float64))


def test_suggest_modes():
    assert suggest_modes(4096, 4096, 3) == ((16, 16, 16), (16, 16, 16))
    assert suggest_modes(4096, 4096, 4).in_modes == (8, 8, 8, 8)
    modes = suggest_modes(1000, 768, 3)
    assert modes.out_modes == (10, 10, 10) and math.prod(modes.in_modes) == 768
    assert max(modes.in_modes) / min(modes.in_modes) <= 1.5
    assert suggest_modes(13, 12, 2) == ((4, 3), (13, 1))  # a prime stays whole
    layer = TTLinear(*suggest_modes(24, 30, 2), 3)
    assert (layer.out_features, layer.in_features) == (24, 30)
    for d in (1, 7, True, 3.0):
        with pytest.raises(ValueError, match="2 to 6 cores"):
            suggest_modes(64, 64, d)
    with pytest.raises(TypeError, match="out_features must be an int"):
        suggest_modes(True, 64, 2)
    with pytest.raises(ValueError, match="in_features must be >= 1"):
        suggest_modes(64, 0, 2)


def test_strategy_cost_model():
    modes16, modes8 = (16, 16, 16), (8, 8, 8, 8)
    # bf16: equal-FLOP 16^3 rank 16 rebuilds weight tiles at large M; the 0.28x-FLOP 8^4 rank 8 chain
    # contracts; few rows always contract (one chain launch, no head product)
    assert pick_strategy(8192, modes16, modes16, (1, 16, 16, 1)) == "rebuild"
    assert pick_strategy(16, modes16, modes16, (1, 16, 16, 1)) == "contract"
    assert pick_strategy(8192, modes8, modes8, (1, 8, 8, 8, 1)) == "contract"
    assert pick_strategy(16, modes8, modes8, (1, 8, 8, 8, 1)) == "contract"
    # the backward is picked on its own costs (the gradient chain kernel reruns the forward, 8^4's
    # Kronecker-sum gradients on many rows do half a dense dW's FLOPs; rebuild runs ~20 host-side ops
    # for 16^3, which few rows do not repay)
    assert pick_strategy(8192, modes8, modes8, (1, 8, 8, 8, 1), backward=True) == "contract"
    assert pick_strategy(1024, modes16, modes16, (1, 16, 16, 1), backward=True) == "rebuild"
    assert pick_strategy(16, modes16, modes16, (1, 16, 16, 1), backward=True) == "contract"
    assert pick_strategy(256, modes8, modes8, (1, 8, 8, 8, 1), backward=True) == "contract"
    layer = TTLinear(modes16, modes16, 16, strategy="contract")
    assert layer.picked_strategy(8192, torch.bfloat16) == "contract"
    layer.strategy = "auto"
    assert layer.picked_strategy(8192, torch.bfloat16) == "rebuild" and layer.picked_strategy(16) == "contract"


def test_strategy_pick_on_an_empty_batch():
    """m = 0 rows (an empty batch) has a pick, forward and backward, for every cost function."""
    modes = ((3, 2, 5), (2, 3, 4), (1, 2, 3, 1))
    for backward in (False, True):
        assert pick_strategy(0, *modes, backward=backward) in ("contract", "rebuild")
    for fn in (cost.forward_cost, cost.grad_cost):
        for strategy in ("contract", "rebuild"):
            assert math.isfinite(fn(strategy, 0, *modes).seconds)
    assert TTLinear(*modes).picked_strategy(0) in ("contract", "rebuild")
    with pytest.raises(ValueError, match="m must be >= 0"):
        pick_strategy(-1, *modes)
    for m in (2.0, True, "2"):
        with pytest.raises(TypeError, match="m must be an int"):
            pick_strategy(m, *modes)
    assert pick_strategy(np.int64(5), *modes) == pick_strategy(5, *modes)


# ------------------------------------------------------------------------------------ TT-SVD
def _linear_with_weight(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


@pytest.mark.parametrize("eps", [0.5, 0.2, 0.05])
def test_tt_svd_meets_eps(eps):
    torch.manual_seed(1)
    # a weight with decaying structure, so different eps give different ranks
    w = torch.randn(40, 36, dtype=torch.float64) @ torch.diag(0.8 ** torch.arange(36.0, dtype=torch.float64))
    layer = TTLinear.from_linear(_linear_with_weight(w), (3, 4, 3), (2, 5, 4), eps=eps)
    rel = ((layer.materialize() - w).norm() / w.norm()).item()
    assert rel <= eps
    assert layer.fit_report.relative_error == pytest.approx(rel, rel=1e-9)
    assert layer.fit_report.details["ranks"] == layer.ranks
    assert layer.fit_report.params == layer.num_parameters()


def test_tt_svd_error_bound_is_not_loose():
    """Smaller eps keeps more ranks and lowers the error; eps=0 is exact."""
    w = torch.randn(24, 30, dtype=torch.float64)
    errors, sizes = [], []
    for eps in (0.6, 0.3, 0.0):
        layer = TTLinear.from_linear(_linear_with_weight(w), (3, 2, 5), (2, 3, 4), eps=eps)
        errors.append(layer.fit_report.relative_error)
        sizes.append(sum(layer.ranks))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-12
    assert sizes[0] < sizes[1] < sizes[2]


def test_tt_svd_max_rank_caps_every_rank():
    w = torch.randn(24, 30, dtype=torch.float64)
    for cap in (1, 2, 3):
        layer = TTLinear.from_linear(_linear_with_weight(w), (3, 2, 5), (2, 3, 4), eps=1e-3, max_rank=cap)
        assert max(layer.ranks) <= cap and layer.ranks[1:-1] == (cap,) * 2
    exact = TTLinear.from_linear(_linear_with_weight(w), (3, 2, 5), (2, 3, 4))
    assert exact.fit_report.relative_error < 1e-12


def test_tt_svd_recovers_an_exact_low_rank_tt():
    torch.manual_seed(2)
    ranks = (1, 2, 3, 2, 1)
    truth = TTLinear((3, 2, 2, 3), (2, 3, 2, 2), ranks, dtype=torch.float64)
    w = truth.materialize().detach()
    layer = TTLinear.from_linear(_linear_with_weight(w), truth.in_modes, truth.out_modes, eps=1e-10)
    assert layer.ranks == ranks
    assert layer.fit_report.relative_error < 1e-12
    assert_close(layer.materialize(), w)
    x = torch.randn(5, 36, dtype=torch.float64)
    assert_close(layer(x) - layer.bias, truth(x) - truth.bias)


def test_tt_svd_function_matches_module():
    w = torch.randn(10, 12, dtype=torch.float64)
    cores = tt_svd(w, (3, 4), (2, 5), None, None)
    assert_close(ref.tt_weight(cores), w)


def test_from_linear_validation():
    lin = nn.Linear(30, 24)
    with pytest.raises(ValueError, match="in modes \\(3, 2, 4\\) multiply to 24"):
        TTLinear.from_linear(lin, (3, 2, 4), (2, 3, 4))
    with pytest.raises(ValueError, match="out modes"):
        TTLinear.from_linear(lin, (3, 2, 5), (2, 3, 5))
    with pytest.raises(ValueError, match="max_rank"):
        TTLinear.from_linear(lin, (3, 2, 5), (2, 3, 4), max_rank=0)
    with pytest.raises(TypeError, match="max_rank must be an int"):
        TTLinear.from_linear(lin, (3, 2, 5), (2, 3, 4), max_rank=2.5)
    with pytest.raises(ValueError, match="eps"):
        TTLinear.from_linear(lin, (3, 2, 5), (2, 3, 4), eps=-1.0)
    with pytest.raises(ValueError, match="eps"):
        TTLinear.from_linear(lin, (3, 2, 5), (2, 3, 4), eps=float("nan"))
    with pytest.raises(TypeError, match="eps must be a real number"):
        TTLinear.from_linear(lin, (3, 2, 5), (2, 3, 4), eps="0.1")
    with pytest.raises(TypeError, match="expected an nn.Linear"):
        TTLinear.from_linear(TTLinear((3, 2, 5), (2, 3, 4), 2), (3, 2, 5), (2, 3, 4))
    with pytest.raises(ValueError, match="meta device"):
        TTLinear.from_linear(nn.Linear(30, 24, device="meta"), (3, 2, 5), (2, 3, 4))
    converted = TTLinear.from_linear(lin, (3, 2, 5), (2, 3, 4), max_rank=2)
    assert converted.cores[0].dtype == torch.float32 and torch.equal(converted.bias, lin.bias)


def test_trains_like_a_linear_layer():
    torch.manual_seed(0)
    target = TTLinear((4, 5), (2, 5), 3)
    model = TTLinear((4, 5), (2, 5), 3)
    assert_learns(model, target, torch.randn(256, 20), steps=300, lr=0.05)


@pytest.mark.compile
def test_torch_compile_fullgraph():
    model = nn.Sequential(TTLinear((4, 6), (4, 4), 3), nn.GELU(), TTLinear((4, 4), (3, 2), 2))
    assert_compiles_like_eager(model, torch.randn(5, 24, requires_grad=True))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = TTLinear((3, 5), (7, 2), 3)
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert layer(torch.randn(2, 4, 15)).shape == (2, 4, 14)


def test_reference_backend_is_used_for_cpu_auto(monkeypatch):
    from tspline_kernels.tt import kernels

    calls = []
    monkeypatch.setattr(kernels, "tt_linear", lambda *a: calls.append(1))
    layer = TTLinear((3, 5), (7, 2), 3)
    with backend("auto"):
        layer(torch.randn(2, 15))
    assert calls == []


def test_tt_svd_without_eps_keeps_no_rounding_noise():
    """``eps=None`` keeps the numerically nonzero singular values: a Kronecker product is a rank-1
    TT matrix, and a TT matrix of ranks (2, 3) comes back at those ranks, not at ranks padded
    with rounding noise (more parameters than the dense layer)."""
    torch.manual_seed(0)
    kron = torch.kron(torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64))
    assert TTLinear.from_linear(_linear_with_weight(kron), (8, 8), (8, 8)).ranks == (1, 1, 1)
    truth = TTLinear((3, 4, 2), (2, 5, 3), (1, 2, 3, 1), dtype=torch.float64)
    layer = TTLinear.from_linear(_linear_with_weight(truth.materialize().detach()), (3, 4, 2), (2, 5, 3))
    assert layer.ranks == (1, 2, 3, 1) and layer.fit_report.relative_error < 1e-12


def test_tt_cores_share_the_norm_so_fp16_fits_do_not_overflow():
    """TT-SVD leaves ||W|| in its last core; the fit shares it evenly, so a large fp16 weight (every
    entry 4000, exactly rank 1) gives finite cores and an exact layer."""
    linear = nn.Linear(64, 64, dtype=torch.float16)
    with torch.no_grad():
        linear.weight.fill_(4000.0)
    layer = TTLinear.from_linear(linear, (32, 2), (32, 2), max_rank=1)
    norms = [c.double().norm().item() for c in layer.cores]
    assert max(norms) / min(norms) < 1.01 and layer.fit_report.relative_error < 1e-3


def test_tt_from_linear_takes_the_gram_sixth_and_checks_strategy_first():
    """The README's order (linear, in_modes, out_modes, eps, max_rank, input_gram); ``strategy`` is
    keyword-only and checked before the fit (a TypeError for a non-str)."""
    torch.manual_seed(1)
    linear = nn.Linear(12, 6)
    x = torch.randn(40, 12)
    layer = TTLinear.from_linear(linear, (3, 4), (2, 3), None, 2, x.T @ x, sweeps=1)
    assert layer.fit_report.output_error is not None
    with pytest.raises(TypeError, match="strategy must be a str"):
        TTLinear.from_linear(linear, (3, 4), (2, 3), strategy=x.T @ x)
