"""DecoupledSplineMLP: an MLP block replaced by y = W g(V^T x) + b with learnable cubic B-spline activations."""

from __future__ import annotations

import math

import torch
from torch import nn

from .._layers import CompressedLinear, assign_, cast, check_count, check_flag
from . import fit as _fit
from . import ops

INIT_RANGE = 3.0  # a fresh layer's activations are GELU on [-3, 3], linear beyond


class DecoupledSplineMLP(CompressedLinear):
    """y = g(x @ V) @ W.T + bias for x ``(*, in_features)``: ``V`` ``(in_features, rank)``, ``W``
    ``(out_features, rank)``, and one activation per hidden unit, g_i(z) = sum_j coef[i, j] B_j(z), a
    clamped uniform cubic B-spline with ``n_basis`` basis functions on [lo_i, hi_i] (buffers ``lo``,
    ``hi`` ``(rank,)``, saved with the state dict), continued linearly outside that range.

    It replaces a whole block fc2(sigma(fc1 x)) (``from_mlp``) or any map R^m -> R^n (``fit``), not
    a single Linear: it is nonlinear in x, so it has no weight matrix (``materialize`` raises), and
    the ratio in its ``repr`` is against a dense Linear of the same shape; ``fit_report`` compares
    with the replaced block. Parameters: rank * (in + out + n_basis) (+ out bias).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, n_basis: int = 12, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, check_flag("bias", bias), device, dtype)
        self.rank = check_count("rank", rank, 1)
        self.n_basis = check_count("n_basis", n_basis, 4, " (a cubic B-spline needs at least 4 basis functions)")
        factory = {"device": device, "dtype": dtype}
        self.V = nn.Parameter(torch.empty(in_features, self.rank, **factory))
        self.W = nn.Parameter(torch.empty(out_features, self.rank, **factory))
        self.coef = nn.Parameter(torch.empty(self.rank, self.n_basis, **factory))
        self.register_buffer("lo", torch.full((self.rank,), -INIT_RANGE, **factory))
        self.register_buffer("hi", torch.full((self.rank,), INIT_RANGE, **factory))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """V like nn.Linear(in, rank)'s weight, W like nn.Linear(rank, out)'s, every g_i the spline
        nearest GELU on [-3, 3], the bias nn.Linear(in, out)'s (nothing to do on the meta device)."""
        if self.V.is_meta:
            return
        nn.init.uniform_(self.V, -1 / math.sqrt(self.in_features), 1 / math.sqrt(self.in_features))
        nn.init.uniform_(self.W, -1 / math.sqrt(self.rank), 1 / math.sqrt(self.rank))
        self.lo.fill_(-INIT_RANGE)
        self.hi.fill_(INIT_RANGE)
        lo, hi = self.lo.double(), self.hi.double()
        assign_(self.coef, _fit.spline_coefficients(nn.functional.gelu, lo, hi, self.n_basis))
        self.reset_bias()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._prepare(x)
        return ops.decoupled_mlp(cast(x, dtype), cast(self.V, dtype), cast(self.W, dtype), cast(self.coef, dtype),
                                 self.lo, self.hi, cast(self.bias, dtype))

    def materialize(self) -> torch.Tensor:
        raise NotImplementedError(
            "DecoupledSplineMLP is nonlinear in its input (W g(V^T x) + b): there is no dense weight to "
            "materialize; its Jacobian at x is W diag(g'(V^T x)) V^T"
        )

    def _structure(self) -> str:
        return f"rank={self.rank}, n_basis={self.n_basis}"

    # ---- fitting ------------------------------------------------------------------------------
    @classmethod
    def fit(cls, f, samples: torch.Tensor, rank: int, n_basis: int = 12, iters: int = 100,
            **options) -> DecoupledSplineMLP:
        """Fit W g(V^T x) + b to a callable ``f`` mapping ``(N, m)`` to ``(N, n)`` from its values and
        Jacobians (autograd, batched) at ``samples`` ``(N, m)``; see :func:`fit.fit` for ``options``.
        The layer has the samples' dtype and device; ``layer.fit_report`` (:class:`FitReport`) and
        ``layer.fit_objective`` (the objective before and after each iteration) describe the fit."""
        return _fit.fit(cls, f, samples, rank, n_basis, iters, **options)

    @classmethod
    def from_mlp(cls, fc1: nn.Linear, activation, fc2: nn.Linear, samples: torch.Tensor, rank: int,
                 n_basis: int = 12, iters: int = 100, **options) -> DecoupledSplineMLP:
        """Compress the block fc2(activation(fc1 x)) (``activation`` elementwise) to ``rank`` hidden
        units from its values and Jacobians at ``samples`` ``(N, in)``, without forming the Jacobian
        tensor; starts from the ``rank`` most important hidden units. Options as for :meth:`fit`; the
        layer has fc1's dtype and device."""
        return _fit.from_mlp(cls, fc1, activation, fc2, samples, rank, n_basis, iters, **options)
