"""What every compressed layer shares: nn.Linear's contract, input checks, autocast, reporting."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class FitReport:
    """How well a compressed layer reproduces the dense weight it was fitted to.

    ``relative_error`` is ||W - W_hat||_F / ||W||_F over the whole weight (bias copied exactly).
    """

    method: str
    relative_error: float
    dense_params: int
    params: int
    details: dict = field(default_factory=dict)

    def __str__(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.details.items())
        return (f"{self.method}: relative error {self.relative_error:.3e}, params {self.params} "
                f"(dense {self.dense_params}, {self.dense_params / max(self.params, 1):.1f}x fewer){extra}")


def fit_report(method: str, dense: torch.Tensor, layer: CompressedLinear, **details) -> FitReport:
    """Compare ``layer.materialize()`` with the ``dense`` weight it was fitted to."""
    with torch.no_grad():
        w = dense.double()
        err = (layer.materialize().double().to(w.device) - w).norm() / w.norm().clamp_min(1e-300)
    return FitReport(method, err.item(), layer.dense_parameters(), layer.num_parameters(), details)


def check_features(**sizes: int) -> None:
    for name, n in sizes.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")


class CompressedLinear(nn.Module):
    """Base of the drop-in ``nn.Linear`` replacements: y = x @ W.T + b for x ``(*, in_features)``,
    with W ``(out_features, in_features)`` never stored. Subclasses define ``forward``,
    ``materialize`` and ``_structure``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=None) -> None:
        super().__init__()
        check_features(in_features=in_features, out_features=out_features)
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point type, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
            bound = 1 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        else:
            self.register_parameter("bias", None)

    # ---- input handling ---------------------------------------------------------------------
    def _param_ref(self) -> torch.Tensor:
        return next(self.parameters())

    def _prepare(self, x: torch.Tensor) -> torch.dtype:
        """Validate ``x`` and return the dtype the op runs in (autocast's when it is on)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{type(self).__name__} expects a floating-point input, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects the last dimension to be in_features={self.in_features}, "
                f"got input of shape {tuple(x.shape)}"
            )
        p = self._param_ref()
        if x.device != p.device:
            raise ValueError(f"input is on {x.device} but {type(self).__name__}'s parameters are on {p.device}")
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        if x.dtype != p.dtype:
            raise TypeError(
                f"input dtype {x.dtype} does not match {type(self).__name__}'s parameter dtype {p.dtype} "
                "(cast one of them, or run under torch.autocast)"
            )
        return x.dtype

    # ---- reporting ----------------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def dense_parameters(self) -> int:
        """Parameters of the ``nn.Linear`` this layer replaces."""
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def compression_ratio(self) -> float:
        return self.dense_parameters() / max(self.num_parameters(), 1)

    def _structure(self) -> str:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self._structure()}, "
            f"bias={self.bias is not None}, params={self.num_parameters()} "
            f"({self.compression_ratio():.1f}x fewer than dense)"
        )

    def materialize(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight, for tests and export only."""
        raise NotImplementedError
