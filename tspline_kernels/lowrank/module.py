"""LowRankLinear: an nn.Linear replacement whose weight is a rank-r product W = U @ V.T."""

from __future__ import annotations

import math

import torch
from torch import nn

from .._fit import fit_inputs, whitened_svd
from .._layers import CompressedLinear, FitReport, cast, check_count, check_flag, fit_report
from ..reference import lowrank as ref
from . import ops


def _check_rank(rank, in_features: int, out_features: int) -> int:
    rank = check_count("rank", rank, 1)
    limit = min(in_features, out_features)
    if rank > limit:
        raise ValueError(
            f"rank={rank} exceeds min(in_features, out_features)={limit}: a rank-{limit} product already "
            f"represents every ({out_features} x {in_features}) weight, extra rank only adds parameters"
        )
    return rank


def _split_svd(weight: torch.Tensor, rank: int, gram: torch.Tensor | None = None, damping: float = 1e-6
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U ``(n_out, rank)``, V ``(n_in, rank)``, singular values) in fp64 from the SVD W S = P D Q.T of
    ``weight`` ``(n_out, n_in)`` (whitened by S, see :func:`whitened_svd`; S = I without ``gram``),
    U V.T = P_r D_r Q_r.T S^{-1}, the best rank-``rank`` weight for ||(W - U V.T) S||_F. Each term
    d_i p_i (S^{-1} q_i).T is split evenly, ||U[:, i]|| = ||V[:, i]|| = sqrt(d_i ||S^{-1} q_i||)
    (sqrt(d_i) without a Gram), so the factors do not depend on the Gram's scale."""
    p, s, q, s_inv = whitened_svd(weight, gram, damping)
    v = q[:, :rank] if s_inv is None else s_inv @ q[:, :rank]
    length = v.norm(dim=0)
    return p[:, :rank] * (s[:rank] * length).sqrt(), v * (s[:rank] / length).sqrt(), s


class LowRankLinear(CompressedLinear):
    """``nn.Linear`` with weight W = U @ V.T: ``U`` ``(out_features, rank)``, ``V`` ``(in_features, rank)``.

    y = (x @ V) @ U.T + bias for x ``(*, in_features)``; W keeps nn.Linear's ``(out, in)`` layout
    but is never formed: one fused kernel keeps the rank-r projection x @ V on chip. Parameters:
    rank * (in_features + out_features) (+ out_features bias). ``rank`` must lie in
    [1, min(in_features, out_features)]: a larger rank cannot represent more weights, so it raises
    (``from_tensor_spline`` recompresses a peer layer built with one to that rank exactly).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, check_flag("bias", bias), device, dtype)
        self.rank = _check_rank(rank, in_features, out_features)
        factory = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(out_features, self.rank, **factory))
        self.V = nn.Parameter(torch.empty(in_features, self.rank, **factory))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """V like nn.Linear(in, rank)'s weight (variance 1 / (3 in)), U with variance 1 / rank, so
        that E[W^2] = 1 / (3 in_features), nn.Linear's default, and activations keep its scale; the
        bias nn.Linear's."""
        nn.init.uniform_(self.V, -1 / math.sqrt(self.in_features), 1 / math.sqrt(self.in_features))
        bound = math.sqrt(3 / self.rank)
        nn.init.uniform_(self.U, -bound, bound)
        self.reset_bias()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._prepare(x)
        y, _ = ops.lowrank_linear(cast(x, dtype), cast(self.V, dtype), cast(self.U, dtype), cast(self.bias, dtype))
        return y

    def materialize(self) -> torch.Tensor:
        return ref.lowrank_weight(self.U, self.V).to(self.U.dtype)

    def _structure(self) -> str:
        return f"rank={self.rank}"

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, input_gram: torch.Tensor | None = None, *,
                    damping: float = 1e-6) -> LowRankLinear:
        """The best rank-``rank`` approximation of ``linear.weight`` W ``(out, in)``.

        Without ``input_gram``: in Frobenius (and spectral) norm, by truncated SVD (Eckart-Young):
        W = P D Q.T gives U = P_r sqrt(D_r), V = Q_r sqrt(D_r).

        With ``input_gram`` G = X^T X ``(in, in)`` of the layer's calibration inputs X ``(N, in)``
        (float64 ideally): on those inputs, minimising ||(W - U V.T) X^T||_F, by the whitened SVD
        of SVD-LLM: with S = (G + lambda I)^{1/2}, lambda = ``damping`` * mean(diag G), and
        W S = P D Q.T, U V.T = [W S]_r S^{-1} = P_r D_r (S^{-1} Q_r).T, each rank-one term split evenly
        between U and V (equal column norms, independent of the Gram's scale: fp16 factors neither
        overflow nor underflow for a Gram summed over many tokens).
        This minimises ||(W - W_hat) S||_F^2 = ||(W - W_hat) X^T||_F^2 + lambda ||W - W_hat||_F^2:
        for a full-rank G and small damping the optimum of the output error (up to a relative
        O(lambda / smallest eigenvalue of G) change); for a rank-deficient G (N < in) the output error
        alone has many optima and the damping picks the one nearest to W off the calibration inputs.
        ``lowrank_error_curve`` in ``tspline_kernels._fit`` gives the errors of every rank from one SVD.

        The bias is copied. ``layer.fit_report`` (a :class:`FitReport`) holds the weight's relative
        error, the ``output_error`` on the calibration inputs (None without a Gram) and, in
        ``details``, ``optimal_error`` = sqrt(sum_{i > rank} d_i^2) / sqrt(sum_i d_i^2), the smallest
        relative error any rank-``rank`` weight can reach in the fitted norm (||W - W_hat||_F, or
        ||(W - W_hat) S||_F with a Gram); the fitted error equals it up to rounding of the factors.
        """
        weight, gram = fit_inputs(linear, input_gram)
        new = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None,
                  device=weight.device, dtype=weight.dtype)
        u, v, s = _split_svd(weight, rank, gram, damping)
        tail = s[rank:].square().sum().sqrt() / s.square().sum().sqrt().clamp_min(1e-300)
        with torch.no_grad():
            new.U.copy_(u)
            new.V.copy_(v)
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        method = "truncated SVD" if gram is None else "whitened SVD"
        new.fit_report: FitReport = fit_report(method, weight, new, gram, rank=rank, optimal_error=tail.item())
        return new

    @classmethod
    def from_tensor_spline(cls, module: nn.Module) -> LowRankLinear:
        """Convert a ``tensor_spline.LowRankLinear`` (y = x @ U_ts @ V_ts + b, U_ts ``(in, r)``,
        V_ts ``(r, out)``): our V = U_ts and U = V_ts.T, so outputs are identical and gradients
        correspond (dV = dU_ts, dU = dV_ts.T). Parameters are copied; the two train independently.

        tensor-spline accepts r > min(in, out) (its default r = 16 on a layer with fewer than 16
        outputs); its weight then still has rank <= min(in, out), and the factors are recompressed
        exactly to that rank by an SVD of W = (U_ts V_ts).T: the same function up to rounding, with
        fewer parameters, but gradients no longer map one to one onto the peer's."""
        u_ts, v_ts = getattr(module, "U", None), getattr(module, "V", None)
        n_in, n_out, rank = (getattr(module, k, None) for k in ("in_features", "out_features", "rank"))
        if not (isinstance(u_ts, torch.Tensor) and isinstance(v_ts, torch.Tensor)
                and u_ts.shape == (n_in, rank) and v_ts.shape == (rank, n_out)):
            raise TypeError(f"expected a tensor_spline.LowRankLinear, got {type(module).__name__}")
        bias = getattr(module, "bias", None)
        kept = min(rank, n_in, n_out)
        new = cls(n_in, n_out, kept, bias=bias is not None, device=u_ts.device, dtype=u_ts.dtype)
        with torch.no_grad():
            if kept == rank:
                new.V.copy_(u_ts)
                new.U.copy_(v_ts.T)
            else:
                u, v, _ = _split_svd((u_ts.double() @ v_ts.double()).T, kept)
                new.U.copy_(u)
                new.V.copy_(v)
            if bias is not None:
                new.bias.copy_(bias)
        return new
