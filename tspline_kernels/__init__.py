"""tspline-kernels: fused Triton kernels for compressed linear layers."""

import os as _os

import torch as _torch

if _torch.version.cuda is None and _torch.version.hip is None:
    # A CPU-only torch build can only run Triton kernels in the interpreter, and the switch must be
    # set before anything (torch itself included) imports triton. No GPU is queried here.
    _os.environ.setdefault("TRITON_INTERPRET", "1")

from ._backend import backend, get_backend
from ._layers import CompressedLinear, FitReport
from .decoupled import DecoupledSplineMLP
from .kronecker import KroneckerLinear
from .lowrank import LowRankLinear
from .spline import HierarchicalSplineLinear, SplineLinear
from .spline_tt import SplineTTLinear
from .tt import TTLinear, suggest_modes

# model-level work: surgery, calibration, compression, healing, files, export
from .surgery import Replacement, replace_linear
from .calibration import Calibration, LayerStats, calibrate
from .compress import (Auto, CompressionReport, Decoupled, Kronecker, LowRank, Spline, TensorTrain, compress_,
                       recommend, sensitivity)
from .heal import HealReport, heal
from .files import CompressedFile, IntegrityError, load_compressed, open_compressed, save_compressed
from .export import export_onnx

__all__ = [
    # backends
    "backend", "get_backend",
    # layers
    "CompressedLinear", "FitReport", "SplineLinear", "HierarchicalSplineLinear", "LowRankLinear", "TTLinear",
    "KroneckerLinear", "SplineTTLinear", "DecoupledSplineMLP", "suggest_modes",
    # compressing a model
    "replace_linear", "Replacement", "calibrate", "Calibration", "LayerStats", "compress_", "CompressionReport",
    "recommend", "sensitivity", "LowRank", "TensorTrain", "Kronecker", "Spline", "Auto", "Decoupled", "heal", "HealReport",
    # files and export
    "save_compressed", "load_compressed", "open_compressed", "CompressedFile", "IntegrityError", "export_onnx",
]
__version__ = "0.1.0"
