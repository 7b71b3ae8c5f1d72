from .module import LowRankLinear

__all__ = ["LowRankLinear"]
