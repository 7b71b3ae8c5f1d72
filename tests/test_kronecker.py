"""KroneckerLinear: reference against NdLinear and its own definition, the gated variant, gradchecks,
conversions (NdLinear, nearest Kronecker product), the nn.Linear contract, input validation and
torch.compile."""

import math

import ndlinear
import numpy as np
import pytest
import torch
from torch import nn

from tspline_kernels import backend
from tspline_kernels.kronecker import KroneckerLinear, ops
from tspline_kernels.reference import kronecker as ref
from tspline_kernels.testing import assert_close, assert_compiles_like_eager, assert_learns

# (in_dims, out_dims): odd sizes, one to three modes
DIMS = {"2-modes": ((3, 5), (4, 7)), "3-modes": ((3, 5, 2), (4, 7, 3)), "1-mode": ((13,), (9,))}


class GatedOracle(nn.Module):
    """NdLinearGated's forward written out literally (the ``ndlinear`` wheel does not ship it): per mode
    in application order, move the axis last, gate on the mean of all its fibres over the batch, mix
    the transform with the identity path (a projection where the sizes differ), move the axis back.
    Attribute names are NdLinearGated's, so ``from_ndlinear`` reads it like the real module."""

    def __init__(self, input_dims, hidden_size, transform_outer=True, gating_mode="soft", gating_hidden_dim=16,
                 gated_modes="all", topk_modes=None):
        super().__init__()
        self.input_dims, self.hidden_size = input_dims, hidden_size
        self.transform_outer, self.gating_mode, self.gating_hidden_dim = transform_outer, gating_mode, gating_hidden_dim
        self.gated_modes, self.topk_modes = gated_modes, topk_modes
        self.align_layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(input_dims, hidden_size))
        self.gate_networks = nn.ModuleList(
            nn.Sequential(nn.Linear(i, gating_hidden_dim), nn.ReLU(), nn.Linear(gating_hidden_dim, 1), nn.Sigmoid())
            for i in input_dims)
        self.identity_projections = nn.ModuleList(
            nn.Linear(i, o) if i != o else nn.Identity() for i, o in zip(input_dims, hidden_size))

    def forward(self, x):
        n = len(self.input_dims)
        for step in range(n):
            k = step if self.transform_outer else n - 1 - step
            gated = (self.gated_modes == "all" or (self.gated_modes == "first" and step == 0)
                     or (self.gated_modes == "topk" and k in self.topk_modes))
            moved = torch.transpose(x, k + 1, n)
            flat = moved.reshape(-1, moved.shape[-1])
            out = self.align_layers[k](flat)
            if gated:
                gate = self.gate_networks[k](flat.mean(0, keepdim=True))
                ident = self.identity_projections[k](flat)
                out = gate * out + (1 - gate) * ident if self.gating_mode == "soft" else torch.where(gate > 0.5, out, ident)
            x = torch.transpose(out.reshape(*moved.shape[:-1], -1), k + 1, n)
        return x


def _randomize(module):
    """Biases and gates away from their defaults, so every path carries weight."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "bias" in name or "biases" in name:
                p.normal_()
    return module


# ------------------------------------------------------------------------------ the definition
@pytest.mark.parametrize("outer", [True, False])
@pytest.mark.parametrize("dims", list(DIMS), ids=list(DIMS))
def test_reference_matches_ndlinear(dims, outer):
    ins, outs = DIMS[dims]
    theirs = _randomize(ndlinear.NdLinear(ins, outs, transform_outer=outer)).double()
    x = torch.randn(4, *ins, dtype=torch.float64)
    factors = [m.weight for m in theirs.align_layers]
    biases = [m.bias for m in theirs.align_layers]
    assert_close(ref.ndlinear_forward(x, factors, biases, outer), theirs(x))
    # affine: the dense Kronecker weight plus the effective bias (the output at x = 0)
    dense = x.reshape(4, -1) @ ref.kronecker_weight(factors).T + ref.kronecker_bias(factors, biases, outer)
    assert_close(dense.reshape(4, *outs), theirs(x))


def test_effective_bias_formula():
    """b_eff = b_1 (x) A_2 1 + 1 (x) b_2 for the order 1, 2, and A_1 1 (x) b_2 + b_1 (x) 1 reversed."""
    a1, a2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    b1, b2 = torch.randn(4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    ones = torch.ones(5, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    assert_close(ref.kronecker_bias([a1, a2], [b1, b2]), torch.kron(b1, a2.sum(1)) + torch.kron(ones[1], b2))
    assert_close(ref.kronecker_bias([a1, a2], [b1, b2], False), torch.kron(a1.sum(1), b2) + torch.kron(b1, ones[0]))


@pytest.mark.parametrize("transform_outer", [True, False])
@pytest.mark.parametrize("dims", [((5,), (3,)), ((3, 5), (4, 2)), ((2, 3, 4), (3, 1, 2)), ((1, 3, 2, 2), (2, 2, 1, 3))],
                         ids=["1-mode", "2-modes", "3-modes", "4-modes"])
def test_effective_bias_closed_form(dims, transform_outer):
    """``effective_bias``, the closed form the layers run, is ``kronecker_bias``, NdLinear's chain on x = 0."""
    torch.manual_seed(5)
    factors = [torch.randn(o, i, dtype=torch.float64) for i, o in zip(*dims)]
    biases = [torch.randn(o, dtype=torch.float64) for o in dims[1]]
    assert_close(ref.effective_bias(factors, biases, transform_outer), ref.kronecker_bias(factors, biases, transform_outer))


def test_reference_ops_match_definition():
    x = torch.randn(2, 3, 15, dtype=torch.float64)
    a, b = torch.randn(4, 3, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    bias = torch.randn(28, dtype=torch.float64)
    y = ref.kronecker_linear(x, a, b, bias)
    assert_close(y, x @ torch.kron(a, b).T + bias)
    dy = torch.randn(2, 3, 28, dtype=torch.float64)
    a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
    want = torch.autograd.grad(((x @ torch.kron(a_, b_).T) * dy).sum(), [a_, b_])
    da, db, dsum = ref.kronecker_grad_factors(x, dy, a, b, torch.float64)
    assert_close(da, want[0])
    assert_close(db, want[1])
    assert_close(dsum, dy.reshape(6, 28).sum(0))


def test_reference_computes_half_types_in_fp32():
    x = torch.randn(4, 15).bfloat16()
    a, b = torch.randn(4, 3).bfloat16(), torch.randn(7, 5).bfloat16()
    y = ref.kronecker_linear(x, a, b, None)
    assert y.dtype == torch.bfloat16
    da32, _, _ = ref.kronecker_grad_factors(x, y, a, b, torch.float32)
    da, _, _ = ref.kronecker_grad_factors(x, y, a, b, torch.bfloat16)
    assert da32.dtype == torch.float32 and torch.equal(da, da32.bfloat16())  # rounded once, from fp32


@pytest.mark.parametrize("dims", list(DIMS), ids=list(DIMS))
def test_module_is_affine_with_the_kronecker_weight(dims):
    ins, outs = DIMS[dims]
    layer = _randomize(KroneckerLinear(ins, outs, dtype=torch.float64))
    x = torch.randn(3, 2, math.prod(ins), dtype=torch.float64)
    w = layer.materialize()
    assert w.shape == (math.prod(outs), math.prod(ins))
    assert_close(w, ref.kron_factors(list(layer.factors)))
    assert_close(layer(x), x @ w.T + layer.effective_bias())
    no_bias = KroneckerLinear(ins, outs, bias=False, dtype=torch.float64)
    assert no_bias.biases is None and no_bias.effective_bias() is None
    assert_close(no_bias(x), x @ no_bias.materialize().T)


# ------------------------------------------------------------------------------- from_ndlinear
def _same_as_peer(theirs: nn.Module, ours: KroneckerLinear, rows: int, ins, outs, rtol: float) -> None:
    """Run the peer on ``(rows, *ins)`` and ours on the flattened input, both backward with one
    random gradient; outputs agree to ``rtol`` (atol 1e-6) and dx to the fp32 tolerance."""
    x, g = torch.randn(rows, *ins), torch.randn(rows, *outs)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_theirs, y_ours = theirs(xa), ours(xb.reshape(rows, -1)).reshape(rows, *outs)
    assert torch.allclose(y_ours, y_theirs, rtol=rtol, atol=1e-6)
    y_theirs.backward(g)
    y_ours.backward(g)
    assert_close(xb.grad, xa.grad, torch.float32, name="dx")


@pytest.mark.parametrize("outer", [True, False])
@pytest.mark.parametrize("dims", list(DIMS), ids=list(DIMS))
def test_from_ndlinear_same_outputs_and_gradients(dims, outer):
    ins, outs = DIMS[dims]
    theirs = _randomize(ndlinear.NdLinear(ins, outs, transform_outer=outer))
    ours = KroneckerLinear.from_ndlinear(theirs)
    assert (ours.in_dims, ours.out_dims, ours.transform_outer) == (ins, outs, outer)
    _same_as_peer(theirs, ours, 5, ins, outs, rtol=1e-6)
    for k, m in enumerate(theirs.align_layers):
        assert_close(ours.factors[k].grad, m.weight.grad, torch.float32, name=f"dA_{k}")
        assert_close(ours.biases[k].grad, m.bias.grad, torch.float32, name=f"db_{k}")


@pytest.mark.parametrize("outer", [True, False])
@pytest.mark.parametrize("no_bias", [(1,), (0, 2), (0, 1, 2)], ids=["mode-1", "modes-0-2", "all"])
def test_from_ndlinear_with_bias_on_some_modes(no_bias, outer):
    """A real NdLinear whose Linears have no bias on some modes: those modes get a zero bias (no
    biases at all when none has one), with the same outputs and gradients."""
    ins, outs = DIMS["3-modes"]
    theirs = _randomize(ndlinear.NdLinear(ins, outs, transform_outer=outer))
    for k in no_bias:
        theirs.align_layers[k].bias = None
    ours = KroneckerLinear.from_ndlinear(theirs)
    _same_as_peer(theirs, ours, 5, ins, outs, rtol=1e-6)
    assert (ours.biases is None) == (len(no_bias) == 3)
    for k, m in enumerate(theirs.align_layers):
        assert_close(ours.factors[k].grad, m.weight.grad, torch.float32, name=f"dA_{k}")
        if m.bias is not None:
            assert_close(ours.biases[k].grad, m.bias.grad, torch.float32, name=f"db_{k}")
        elif ours.biases is not None:
            assert not ours.biases[k].any()


def test_from_ndlinear_rejects_other_modules():
    with pytest.raises(TypeError, match="NdLinear"):
        KroneckerLinear.from_ndlinear(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="first batch"):
        KroneckerLinear.from_ndlinear(GatedOracle((3, 5), (4, 7), gated_modes="topk"))
    swapped = ndlinear.NdLinear((3, 5), (4, 7))
    swapped.align_layers[1] = nn.Linear(5, 6)
    with pytest.raises(ValueError, match=r"shapes \[\(4, 3\), \(6, 5\)\].*\(3, 5\) and hidden_size \(4, 7\)"):
        KroneckerLinear.from_ndlinear(swapped)


# ------------------------------------------------------------------------------------- gated
GATED = {
    "soft-all": {},
    "soft-reversed": {"transform_outer": False},
    "hard-all": {"gating_mode": "hard"},
    "first": {"gated_modes": "first"},
    "first-reversed": {"gated_modes": "first", "transform_outer": False},
    "topk": {"gated_modes": "topk", "topk_modes": [0, 2]},
}


@pytest.mark.parametrize("modes", [2, 3], ids=["2-modes", "3-modes"])
@pytest.mark.parametrize("case", list(GATED), ids=list(GATED))
def test_gated_matches_ndlinear_gated(case, modes):
    """Same outputs and gradients as NdLinearGated's loop, with one square mode (identity path).
    Two modes run the gated op (``kronecker_gated_linear``), three the per-mode torch path."""
    ins, outs = ((3, 5, 2), (4, 5, 3)) if modes == 3 else ((3, 5), (4, 5))
    kwargs = dict(GATED[case])
    if modes == 2 and case == "topk":
        kwargs["topk_modes"] = [1]
    theirs = _randomize(GatedOracle(ins, outs, gating_hidden_dim=6, **kwargs))
    ours = KroneckerLinear.from_ndlinear(theirs)
    assert ours.gated and isinstance(ours.projections[1], nn.Identity)
    _same_as_peer(theirs, ours, 6, ins, outs, rtol=1e-5)
    pairs = [(ours.factors[k], m.weight) for k, m in enumerate(theirs.align_layers)]
    pairs += list(zip(ours.gates.parameters(), theirs.gate_networks.parameters()))
    pairs += list(zip(ours.projections.parameters(), theirs.identity_projections.parameters()))
    for i, (mine, other) in enumerate(pairs):
        if other.grad is None:  # a path the oracle never took (ungated mode, hard gate)
            assert mine.grad is None or not mine.grad.any()
        else:
            assert_close(mine.grad, other.grad, torch.float32, name=f"param {i}")



def test_gated_layer_has_no_fixed_weight():
    layer = KroneckerLinear((3, 5), (4, 7), gated=True)
    with pytest.raises(RuntimeError, match="gates depend on the input batch"):
        layer.materialize()
    with pytest.raises(RuntimeError, match="gates depend on the input batch"):
        layer.effective_bias()


# --------------------------------------------------------------------------------- gradchecks
def test_reference_gradchecks():
    """Every reference function, in float64."""
    f64 = {"dtype": torch.float64, "requires_grad": True}
    x = torch.randn(3, 15, **f64)
    a, b = torch.randn(4, 3, **f64), torch.randn(2, 5, **f64)
    bias, dy = torch.randn(8, **f64), torch.randn(3, 8, **f64)
    fs = [torch.randn(2, 3, **f64), torch.randn(3, 2, **f64), torch.randn(2, 2, **f64)]
    bs = [torch.randn(2, **f64), torch.randn(3, **f64), torch.randn(2, **f64)]
    xn = torch.randn(2, 3, 2, 2, **f64)
    assert torch.autograd.gradcheck(ref.kronecker_linear, (x, a, b, bias))
    assert torch.autograd.gradcheck(lambda *t: ref.kronecker_grad_factors(*t, torch.float64), (x, dy, a, b))
    assert torch.autograd.gradcheck(lambda *t: ref.kronecker_weight(t), tuple(fs))
    for outer in (True, False):
        assert torch.autograd.gradcheck(lambda x, *t, o=outer: ref.ndlinear_forward(x, t[:3], t[3:], o), (xn, *fs, *bs))
        assert torch.autograd.gradcheck(lambda *t, o=outer: ref.kronecker_bias(t[:3], t[3:], o), (*fs, *bs))
    gate0 = (torch.randn(4, 3, **f64), torch.randn(4, **f64), torch.randn(1, 4, **f64), torch.randn(1, **f64))
    gate2 = (torch.randn(4, 2, **f64), torch.randn(4, **f64), torch.randn(1, 4, **f64), torch.randn(1, **f64))
    proj = (torch.randn(2, 3, **f64), torch.randn(2, **f64))
    x_mean = torch.randn(3, 2, 2, **f64)

    def gated(x_mean, *t):
        mixed_f, mixed_b = ref.gated_modes(x_mean, t[:3], t[3:6], [t[6:10], None, t[10:14]], [t[14:], None, None],
                                           hard=False)
        return torch.cat([m.flatten() for m in mixed_f + mixed_b])

    assert torch.autograd.gradcheck(gated, (x_mean, *fs, *bs, *gate0, *gate2, *proj))


def _gated_args(dtype=torch.float64, gated=(True, True), hard=False, outer=True, bias=True):
    """``kronecker_gated_linear``'s arguments for x ``(3, 2, 15)``, modes (3 -> 4, projection) and
    (5 -> 5, identity), hidden size 4; leaves that require grad."""
    def r(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=True)

    modes = []
    for (n, m, proj), on in zip(((3, 4, True), (5, 5, False)), gated):
        gate = (r(4, n), r(4), r(1, 4), r(1)) if on else (None,) * 4
        modes += [*gate, *((r(m, n), r(m)) if on and proj else (None, None))]
    biases = (r(4), r(5)) if bias else (None, None)
    return (r(3, 2, 15), r(4, 3), r(5, 5), *biases, *modes, hard, outer)


@pytest.mark.parametrize("case", ["soft", "reversed", "first-only-no-bias", "second-only-reversed"])
def test_gated_op_gradchecks(case):
    """The two-mode gated op (reference backend) in float64, first and second order: its backward
    pulls the factor gradients back through the reference's maps under ``torch.func.vjp``."""
    args = _gated_args(gated=(case != "second-only-reversed", case != "first-only-no-bias"),
                       outer="reversed" not in case, bias="no-bias" not in case)
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    def f(*t):
        full = list(args)
        for i, v in zip(tensors, t):
            full[i] = v
        return ops.kronecker_gated_linear(*full)[0]

    with backend("reference"):
        inputs = tuple(args[i] for i in tensors)
        assert torch.autograd.gradcheck(f, inputs)
        assert torch.autograd.gradgradcheck(f, inputs)


def test_gated_op_is_the_gated_layer():
    """The gated op equals the per-mode torch path (``gated_modes``, the closed-form effective bias,
    the plain fused op), soft and hard, both orders; hard gates' networks get no gradient."""
    for hard in (False, True):
        for outer in (True, False):
            layer = KroneckerLinear((3, 5), (4, 5), gated=True, gating_hidden_dim=4, dtype=torch.float64,
                                    gating_mode="hard" if hard else "soft", transform_outer=outer)
            x = torch.randn(3, 15, dtype=torch.float64)
            assert_close(ops.kronecker_gated_linear(x, *layer._gated_arguments())[0],
                         ops.kronecker_linear(x, *layer._fused_maps(x)), torch.float64)
    args = _gated_args(hard=True)
    grads = torch.autograd.grad(ops.kronecker_gated_linear(*args)[0].sum(),
                                [a for a in args if isinstance(a, torch.Tensor)], allow_unused=True)
    assert [g is None for g in grads] == [False] * 5 + [True] * 4 + [False] * 2 + [True] * 4


def test_gated_op_returns_its_maps_for_the_backward():
    """The gated op's second and third outputs are the mixed factors A', B' (x's dtype) of
    ``reference.kronecker.gated_maps``: not differentiable, and never the factors themselves (a
    layer without gates, whose maps are its factors, gets copies: an op's outputs must not alias
    its inputs)."""
    args = _gated_args(dtype=torch.float32)
    y, a_mixed, b_mixed = ops.kronecker_gated_linear(*args)
    want = ref.gated_maps(*args)
    assert_close(a_mixed, want[0], torch.float32) and assert_close(b_mixed, want[1], torch.float32)
    assert y.requires_grad and not a_mixed.requires_grad and not b_mixed.requires_grad
    plain = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
    plain[5:17] = [None] * 12  # no gate networks, no projections: the maps are the factors
    _, a_mixed, b_mixed = ops.kronecker_gated_linear(*plain)
    assert torch.equal(a_mixed, plain[1]) and torch.equal(b_mixed, plain[2])
    assert a_mixed.data_ptr() != plain[1].data_ptr() and b_mixed.data_ptr() != plain[2].data_ptr()


def test_gated_op_rejects_half_given_paths():
    args = list(_gated_args())
    args[6] = None  # mode 0's gate without b1
    with pytest.raises(ValueError, match="mode 0's gate network .* needs all its tensors or none"):
        ops.kronecker_gated_linear(*args)
    args = list(_gated_args())
    args[10] = None  # mode 0's projection without its bias
    with pytest.raises(ValueError, match=r"mode 0's projection \(p, pb\) needs both tensors or none"):
        ops.kronecker_gated_linear(*args)


def test_op_gradchecks_first_and_second_order():
    x = torch.randn(3, 2, 15, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 2, 8, dtype=torch.float64, requires_grad=True)
    with backend("reference"):
        assert torch.autograd.gradcheck(ops.kronecker_linear, (x, a, b, bias))
        assert torch.autograd.gradgradcheck(ops.kronecker_linear, (x, a, b, bias))
        assert torch.autograd.gradcheck(lambda *t: ops.kronecker_grad_factors(*t, torch.float64), (x, dy, a, b))
        assert torch.autograd.gradcheck(
            lambda *t: torch.cat([o.flatten() for o in ops.kronecker_grad_factors(*t, torch.float64)]), (x, dy, a, b))


@pytest.mark.parametrize("kind", ["plain", "no-bias", "gated", "reversed-hard"])
def test_module_gradcheck(kind):
    gated = {"gated": True, "gating_hidden_dim": 4}
    kwargs = {"plain": {}, "no-bias": {"bias": False}, "gated": gated,
              "reversed-hard": {**gated, "gating_mode": "hard", "transform_outer": False}}[kind]
    layer = KroneckerLinear((3, 2, 2), (2, 3, 2), dtype=torch.float64, **kwargs)
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    with backend("reference"):
        assert torch.autograd.gradcheck(f, (x, *params))


# ---------------------------------------------------------------- from_linear (nearest Kronecker)
def test_rearrangement_turns_a_kronecker_product_into_rank_one():
    a, b = torch.randn(4, 3, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    r = ref.rearrange(torch.kron(a, b), (4, 2), (3, 5))
    assert_close(r, torch.outer(a.flatten(), b.flatten()))


def test_from_linear_residual_is_the_optimum():
    """The residual equals sqrt(sum_{i>=2} s_i^2) of R(W), with R(W) built entry by entry."""
    (m1, m2), (n1, n2) = (4, 3), (5, 2)
    linear = nn.Linear(n1 * n2, m1 * m2, dtype=torch.float64)
    w = linear.weight.detach()
    r = torch.empty(m1 * n1, m2 * n2, dtype=torch.float64)
    for o1 in range(m1):
        for o2 in range(m2):
            for i1 in range(n1):
                for i2 in range(n2):
                    r[o1 * n1 + i1, o2 * n2 + i2] = w[o1 * m2 + o2, i1 * n2 + i2]
    s = torch.linalg.svdvals(r)
    expected = s[1:].square().sum().sqrt().item()
    layer = KroneckerLinear.from_linear(linear, (n1, n2), (m1, m2))
    report = layer.fit_report
    assert report.method == "nearest Kronecker product"
    assert abs(report.details["residual"] - expected) < 1e-12
    assert abs((layer.materialize() - w).norm().item() - expected) < 1e-12
    assert abs(report.relative_error - expected / w.norm().item()) < 1e-12
    assert abs(report.details["optimal_error"] - report.relative_error) < 1e-12
    assert report.params == layer.num_parameters() == m1 * n1 + m2 * n2 + m1 + m2
    assert report.dense_params == m1 * m2 * n1 * n2 + m1 * m2
    for _ in range(5):  # perturbed factors are never better
        other = KroneckerLinear.from_linear(linear, (n1, n2), (m1, m2))
        with torch.no_grad():
            for f in other.factors:
                f.add_(1e-2 * torch.randn_like(f))
        assert (other.materialize() - w).norm().item() > expected


@pytest.mark.parametrize("outer_bias", [True, False])
def test_from_linear_recovers_a_kronecker_layer_exactly(outer_bias):
    """W = A (x) B and a bias the per-mode biases can express: zero residual, zero bias error."""
    source = _randomize(KroneckerLinear((3, 5), (4, 7), dtype=torch.float64, bias=outer_bias))
    linear = nn.Linear(15, 28, bias=outer_bias, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(source.materialize())
        if outer_bias:
            linear.bias.copy_(source.effective_bias())
    layer = KroneckerLinear.from_linear(linear, (3, 5), (4, 7))
    report = layer.fit_report
    assert report.details["residual"] < 1e-12 and report.relative_error < 1e-12
    assert "nearest Kronecker product" in str(report)
    x = torch.randn(6, 15, dtype=torch.float64)
    assert_close(layer(x), linear(x))
    if outer_bias:
        assert report.details["bias_error"] < 1e-12
    else:
        assert layer.biases is None and "bias_error" not in report.details


def test_from_linear_fits_a_general_bias_by_least_squares():
    linear = nn.Linear(6, 6, dtype=torch.float64)
    layer = KroneckerLinear.from_linear(linear, (2, 3), (3, 2))
    b, fitted = linear.bias.detach(), layer.effective_bias().detach()
    assert abs((fitted - b).norm().item() / b.norm().item() - layer.fit_report.details["bias_error"]) < 1e-12
    assert (fitted - b).dot(fitted).abs() < 1e-10  # the residual is orthogonal to the fit (least squares)


def test_from_linear_rejects_bad_arguments():
    with pytest.raises(TypeError, match="nn.Linear"):
        KroneckerLinear.from_linear(nn.Conv1d(3, 3, 1), (3,), (3,))
    with pytest.raises(ValueError, match="two modes"):
        KroneckerLinear.from_linear(nn.Linear(8, 8), (2, 2, 2), (2, 2, 2))
    with pytest.raises(ValueError, match="two modes"):
        KroneckerLinear.from_linear(nn.Linear(8, 8), (8,), (8,))
    with pytest.raises(ValueError, match=r"in_features, out_features\) = \(8, 6\)"):
        KroneckerLinear.from_linear(nn.Linear(8, 6), (2, 4), (2, 2))
    with pytest.raises(ValueError, match="meta device"):
        KroneckerLinear.from_linear(nn.Linear(6, 4, device="meta"), (2, 3), (2, 2))


# ----------------------------------------------------------------------------- module contract
def test_parameters_counts_and_repr():
    layer = KroneckerLinear((8, 4), (2, 16))
    shapes = [(n, tuple(p.shape)) for n, p in layer.named_parameters()]
    assert shapes == [("factors.0", (2, 8)), ("factors.1", (16, 4)), ("biases.0", (2,)), ("biases.1", (16,))]
    assert (layer.in_features, layer.out_features) == (32, 32)
    assert layer.num_parameters() == 16 + 64 + 18
    assert layer.dense_parameters() == 32 * 32 + 32
    text = repr(layer)
    assert "in_dims=(8, 4), out_dims=(2, 16)" in text and "bias=True" in text and "params=98" in text
    assert "bias=False" in repr(KroneckerLinear((8, 4), (2, 16), bias=False))
    gated = KroneckerLinear((3, 5), (4, 5), gated=True, gating_hidden_dim=2, gated_modes="first")
    assert gated.gated_modes == (0,) and "gated=soft on modes (0,)" in repr(gated)
    assert isinstance(gated.projections[0], nn.Linear) and isinstance(gated.projections[1], nn.Identity)


def test_init_matches_nn_linear_scale():
    layer = KroneckerLinear((16, 16), (8, 16))
    mean_sq = layer.materialize().pow(2).mean().item()
    assert 0.5 / (3 * 256) < mean_sq < 2.0 / (3 * 256)
    assert layer.biases[0].abs().max() <= 1 / 4


def test_device_dtype_state_dict_and_autocast():
    layer = KroneckerLinear((2, 5), (3, 2), device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    a, b = KroneckerLinear((3, 4), (7, 1), gated=True), KroneckerLinear((3, 4), (7, 1), gated=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 12)
    assert torch.equal(a(x), b(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = a(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in a.factors)


# (constructor arguments over in_dims=(3, 5), out_dims=(4, 7), error type, message)
BAD_CONSTRUCTION = [
    ({"in_dims": (), "out_dims": ()}, ValueError, "at least one mode"),
    ({"in_dims": (3, 5), "out_dims": (4,)}, ValueError, "same number of modes"),
    ({"in_dims": (3, 0), "out_dims": (4, 7)}, ValueError, r"in_dims\[1\] must be >= 1, got 0"),
    ({"in_dims": (3, 5), "out_dims": (4, -1)}, ValueError, r"out_dims\[1\] must be >= 1, got -1"),
    ({"in_dims": (3, 5.0), "out_dims": (4, 7)}, TypeError, r"in_dims\[1\] must be an int, got 5.0"),
    ({"in_dims": (True, 5), "out_dims": (4, 7)}, TypeError, r"in_dims\[0\] must be an int, got True"),
    ({"in_dims": ("3", 5), "out_dims": (4, 7)}, TypeError, r"in_dims\[0\] must be an int, got '3'"),
    ({"in_dims": 15, "out_dims": 28}, TypeError, "in_dims must be a sequence of ints, got 15"),
    ({"in_dims": "35", "out_dims": "47"}, TypeError, "in_dims must be a sequence of ints, got '35'"),
    ({"in_dims": {3: 1, 5: 1}, "out_dims": (4, 7)}, TypeError, "in_dims must be a sequence of ints"),
    ({"in_dims": {3, 5}, "out_dims": (4, 7)}, TypeError, "in_dims must be a sequence of ints"),
    ({"in_dims": None, "out_dims": (4, 7)}, TypeError, "in_dims must be a sequence of ints"),
    ({"bias": "no"}, TypeError, "bias must be True or False, got 'no'"),
    ({"bias": None}, TypeError, "bias must be True or False, got None"),
    ({"gated": 1}, TypeError, "gated must be True or False, got 1"),
    ({"transform_outer": 0}, TypeError, "transform_outer must be True or False, got 0"),
    ({"gated": True, "gating_mode": "sharp"}, ValueError, "gating_mode must be one of"),
    ({"gated": True, "gating_mode": None}, ValueError, "gating_mode must be one of"),
    ({"gated": True, "gated_modes": [2]}, ValueError, r"in \[0, 2\)"),
    ({"gated": True, "gated_modes": []}, ValueError, "at least one"),
    ({"gated": True, "gated_modes": "topk"}, ValueError, "gated_modes"),
    ({"gated": True, "gated_modes": 1}, TypeError, "gated_modes must be a sequence of ints, got 1"),
    ({"gated": True, "gated_modes": [1.0]}, TypeError, r"gated_modes\[0\] must be an int"),
    ({"gated": True, "gating_hidden_dim": 0}, ValueError, "gating_hidden_dim must be >= 1"),
    ({"gated": True, "gating_hidden_dim": 4.0}, TypeError, "gating_hidden_dim must be an int"),
    ({"gating_mode": "hard"}, ValueError, "only apply with gated=True"),
    ({"gating_hidden_dim": 4}, ValueError, "only apply with gated=True"),
    ({"gated_modes": "first"}, ValueError, "only apply with gated=True"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_CONSTRUCTION,
                         ids=[",".join(f"{k}={v!r}" for k, v in kw.items()) for kw, _, _ in BAD_CONSTRUCTION])
def test_bad_construction(kwargs, error, match):
    """Every argument is validated with a clear error: nothing is truncated, coerced or ignored."""
    with pytest.raises(error, match=match):
        KroneckerLinear(**{"in_dims": (3, 5), "out_dims": (4, 7), **kwargs})


def test_int_like_dims_are_accepted():
    """numpy ints, a torch.Size and an integer tensor are ints; the layer stores plain ints."""
    for ins, modes in (((np.int64(3), 5), [np.int64(1)]), (torch.Size([3, 5]), torch.tensor([1]))):
        layer = KroneckerLinear(ins, torch.tensor([4, 7]), gated=True, gated_modes=modes)
        assert layer.in_dims == (3, 5) and layer.out_dims == (4, 7) and layer.gated_modes == (1,)
        assert all(type(d) is int for d in (*layer.in_dims, *layer.out_dims, *layer.gated_modes))


@pytest.mark.parametrize("kwargs", [{}, {"gated": True, "transform_outer": False, "gating_hidden_dim": 4}],
                         ids=["plain", "gated"])
def test_meta_device_then_to_empty_and_load(kwargs):
    """Large-model loading: build on meta (no memory), to_empty, load_state_dict: equal to the original."""
    original = _randomize(KroneckerLinear((3, 5, 2), (4, 5, 3), **kwargs))
    meta = KroneckerLinear((3, 5, 2), (4, 5, 3), device="meta", **kwargs)
    assert all(p.is_meta for p in meta.parameters())
    loaded = meta.to_empty(device="cpu")
    loaded.load_state_dict(original.state_dict())
    x = torch.randn(4, 30)
    assert torch.equal(loaded(x), original(x))


def test_bad_inputs():
    layer = KroneckerLinear((3, 5), (4, 7))
    with pytest.raises(ValueError, match="in_features=15"):
        layer(torch.randn(2, 16))
    with pytest.raises(ValueError, match=r"flattened first: x.flatten\(-2\)"):
        layer(torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 15, dtype=torch.int64))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(2, 15, dtype=torch.float64))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = KroneckerLinear((3, 5, 2), (4, 7, 3))
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert layer(torch.randn(2, 4, 30)).shape == (2, 4, 84)
        da, db, dsum = ops.kronecker_grad_factors(torch.randn(6, 15), torch.randn(6, 28), torch.randn(4, 3),
                                                  torch.randn(7, 5), torch.bfloat16)
        assert da.shape == (4, 3) and db.shape == (7, 5) and dsum.shape == (28,)
        assert da.dtype == db.dtype == dsum.dtype == torch.bfloat16
        assert KroneckerLinear((3, 5), (4, 7), gated=True)(torch.randn(2, 4, 15)).shape == (2, 4, 28)
        assert [t.shape for t in ops.kronecker_gated_linear(*_gated_args(dtype=torch.float32))] == [(3, 2, 20), (4, 3),
                                                                                                 (5, 5)]


def test_trains_to_a_kronecker_target():
    target = KroneckerLinear((4, 5), (3, 4))
    model = KroneckerLinear((4, 5), (3, 4))
    assert_learns(model, target, torch.randn(256, 20), steps=300, lr=0.03)


@pytest.mark.compile
@pytest.mark.parametrize("dims", [((3, 5, 2), (4, 3, 2)), ((6, 5), (4, 6))], ids=["3-modes", "2-modes"])
@pytest.mark.parametrize("kwargs", [{}, {"gated": True, "gating_hidden_dim": 4}], ids=["plain", "gated"])
def test_torch_compile_fullgraph(kwargs, dims):
    """fullgraph tracing through the custom ops and their autograd formulas (the two-mode gated
    layer's op too); the compiled graph then runs the Triton kernels too (the backend is
    chosen inside the op at run time)."""
    model = nn.Sequential(KroneckerLinear(*dims, **kwargs), nn.GELU(), nn.Linear(24, 3))
    assert_compiles_like_eager(model, torch.randn(5, 30, requires_grad=True))


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_factor_written_in_place_before_backward_raises(mode):
    """As after nn.Linear, a factor changed in place between forward and backward is an autograd
    error, not a silently wrong gradient: with three or more modes the layer multiplies factors
    into its two Kronecker groups by torch ops, whose saved inputs must keep the version counter."""
    layer = KroneckerLinear((2, 3, 4), (2, 2, 4)).double()
    y = layer(torch.randn(5, 24, dtype=torch.float64))
    with torch.no_grad():
        layer.factors[mode].mul_(1.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y.square().sum(), list(layer.factors))


def test_gated_reset_parameters_after_to_empty():
    """``reset_parameters`` redraws a gated layer's gate networks and projections too (``to_empty``
    leaves them uninitialised), and keeps the construction's random stream."""
    layer = KroneckerLinear((4, 6), (4, 4), gated=True, device="meta").to_empty(device="cpu")
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(float("nan"))
    layer.reset_parameters()
    assert all(torch.isfinite(p).all() for p in layer.parameters())
    assert torch.isfinite(layer(torch.randn(3, 24))).all()
