from .module import KroneckerLinear

__all__ = ["KroneckerLinear"]
