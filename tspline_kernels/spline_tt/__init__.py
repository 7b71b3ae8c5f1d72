"""SplineTTLinear: tensor-train layers with cubic B-spline cores."""

from .module import SplineTTLinear

__all__ = ["SplineTTLinear"]
