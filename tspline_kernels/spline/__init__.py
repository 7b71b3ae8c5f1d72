from .module import HierarchicalSplineLinear, SplineLinear

__all__ = ["SplineLinear", "HierarchicalSplineLinear"]
