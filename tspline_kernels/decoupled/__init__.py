from .module import DecoupledSplineMLP

__all__ = ["DecoupledSplineMLP"]
