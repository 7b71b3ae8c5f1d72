"""Tensor-train (TT-matrix) layers: TTLinear, TT-SVD conversion, mode suggestions, kernel strategy."""

from .cost import pick_strategy
from .module import TTLinear, TTModes, suggest_modes, tt_svd

__all__ = ["TTLinear", "TTModes", "suggest_modes", "tt_svd", "pick_strategy"]
