"""Activation-aware fitting maths shared by every ``from_linear(..., input_gram=)``.

A layer y = x @ W.T sees inputs X ``(N, in)``; fitting W_hat to minimise the output error
||(W - W_hat) X^T||_F needs only the Gram G = X^T X ``(in, in)``:
||(W - W_hat) X^T||_F^2 = tr(E G E^T), E = W - W_hat. With the whitening S = G^{1/2} (S S^T = G)
it is ||E S||_F^2, a plain Frobenius norm. G is often rank-deficient (N < in, dead features), so
``whiten`` adds a small damping lambda = damping * mean(diag G) to its eigenvalues: fits then
minimise tr(E G E^T) + lambda ||E||_F^2, which keeps S invertible and, among the fits that are
equally good on the calibration inputs, picks the one nearest to W in the directions G never saw.
All maths runs in float64.
"""

from __future__ import annotations

import torch


def check_gram(input_gram, in_features: int) -> torch.Tensor:
    """``input_gram`` ``(in_features, in_features)`` validated (a real floating-point tensor, finite,
    symmetric up to rounding, non-negative diagonal, not all zero) and returned as a symmetrised
    float64 tensor on its own device."""
    if not isinstance(input_gram, torch.Tensor):
        raise TypeError(f"input_gram must be a torch.Tensor (the input Gram X^T X), got {type(input_gram).__name__}")
    if not input_gram.dtype.is_floating_point:
        raise TypeError(f"input_gram must be a real floating-point tensor, got dtype {input_gram.dtype}")
    if tuple(input_gram.shape) != (in_features, in_features):
        raise ValueError(f"input_gram must have shape (in_features, in_features) = ({in_features}, {in_features}), "
                         f"got {tuple(input_gram.shape)}")
    if input_gram.is_meta:
        raise ValueError("input_gram is on the meta device and has no values")
    g = input_gram.detach().double()
    if not torch.isfinite(g).all():
        raise ValueError("input_gram has non-finite values (inf or NaN): the calibration activations overflowed")
    scale = g.abs().max().item()
    if scale == 0:
        raise ValueError("input_gram is all zeros: the layer saw no (non-zero) calibration input")
    asym = (g - g.T).abs().max().item()
    if asym > 1e-6 * scale:
        raise ValueError(f"input_gram must be symmetric (X^T X), but |G - G^T| reaches {asym:.3e} "
                         f"(largest entry {scale:.3e})")
    if (g.diagonal() < 0).any():
        raise ValueError("input_gram has a negative diagonal entry: it is not a Gram matrix X^T X")
    return (g + g.T) / 2


def whiten(gram: torch.Tensor, damping: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S_inv), both symmetric float64 ``(in, in)``: S = (G + lambda I)^{1/2} and its inverse,
    lambda = ``damping`` * mean(diag G), by an eigendecomposition of G (rounding's negative
    eigenvalues clamped to 0). ``gram`` as returned by :func:`check_gram`."""
    if not isinstance(damping, (int, float)) or isinstance(damping, bool) or not damping >= 0:
        raise ValueError(f"damping must be a float >= 0, got {damping!r}")
    g = gram.double()
    lam = damping * g.diagonal().mean()
    evals, evecs = torch.linalg.eigh(g)
    evals = evals.clamp_min(0) + lam
    if evals.min() <= 0:
        raise ValueError("input_gram is singular (rank-deficient) and damping=0 cannot whiten it: use damping > 0")
    root = evals.sqrt()
    return (evecs * root) @ evecs.T, (evecs / root) @ evecs.T


def weighted_energy(weight: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """tr(W G W^T) = ||W X^T||_F^2 for W ``(out, in)``, as a float64 scalar tensor (>= 0)."""
    w = weight.double()
    return ((w @ gram.double()) * w).sum().clamp_min(0)


def output_error(dense: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """||(W - W_hat) X^T||_F / ||W X^T||_F = sqrt(tr(E G E^T) / tr(W G W^T)), E = W - W_hat, for
    ``dense`` W and ``approx`` W_hat ``(out, in)`` and the (undamped) Gram G ``(in, in)``."""
    w = dense.double()
    g = gram.double().to(w.device)
    err = weighted_energy(approx.double().to(w.device) - w, g)
    return (err / weighted_energy(w, g).clamp_min(1e-300)).sqrt().item()
