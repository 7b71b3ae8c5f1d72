"""ONNX export of a model holding compressed layers, each layer as its factored graph.

Every compressed layer runs a ``torch.ops.tspline.*`` custom op, opaque to ``torch.export``. While
the model is traced, each op call is replaced by its pure-PyTorch reference (the maths of
``reference/<family>.py``, the ops' own CPU path), so the exported graph is the factored
computation itself and holds only the compressed parameters:

* low rank: two MatMuls (x @ V, then @ U.T);
* TT and spline TT: the reshape / MatMul (Einsum for short trailing modes) chain of
  ``reference.tt``; spline-TT cores are built in the graph from their control grids;
* Kronecker: two MatMuls with reshapes (more than two modes are grouped into two factors, each
  the Kronecker product of its group's modes, built in the graph; so is the effective bias);
* separable splines (bspline, bicubic, hierarchical): three MatMuls x @ Bi, @ C.T, @ Bo.T;
* field bases (gaussian, eisenstein, local support): W generated in the graph from the control
  values, the bandwidth and the lattice (``(n, 2)``, the only extra constant), then one MatMul.
  The reference builds W in row blocks of 2^18 values, each block unrolled into the graph (~13
  nodes): a 1536 x 384 layer with 64 points has 154 blocks (2.6k nodes, 0.15 MB of graph; its
  export took 3.5 min on a loaded 2-core machine);
* ``DecoupledSplineMLP``: x @ V, the per-unit spline activation (Floor, Gather), @ W.T.

Basis matrices, grouped Kronecker factors, spline cores and field weights are written as the few
ops that compute them from their defining integers and parameters, never as constants (for a
separable layer the bases alone are ``n_out G_out + n_in G_in`` values, several times the control
grid): constant folding keeps only folds that do not grow the data (``_keeps_size``). onnxruntime
folds those subgraphs once when the session is created, so at run time the graph is the
MatMul chain with constant bases. A B-spline basis recipe is ~70 nodes (~3 KB), shared by every
layer with the same (size, grid); bases smaller than that (spline TT's per-mode bases) would be
smaller as constants. Node metadata (stack traces, FX nodes) is dropped: it outweighs the
parameters of a small model.
"""

from __future__ import annotations

import functools

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .reference import decoupled, kronecker, lowrank, spline, spline_tt, tt

__all__ = ["export_onnx"]

_OPS = torch.ops.tspline
# Each forward op and its reference, called with the op's arguments (the TT ops' ``strategy``
# only picks Triton kernels).
_REFERENCES: dict[object, Callable] = {
    _OPS.lowrank_linear.default: lowrank.lowrank_linear,
    _OPS.tt_linear.default: lambda x, cores, bias, strategy: tt.tt_linear(x, cores, bias),
    _OPS.spline_tt_linear.default: lambda x, controls, bias, in_modes, out_modes, strategy:
        spline_tt.spline_tt_linear(x, controls, bias, in_modes, out_modes),
    _OPS.kronecker_linear.default: kronecker.kronecker_linear,
    _OPS.kronecker_gated_linear.default: kronecker.kronecker_gated_linear,
    _OPS.separable_linear.default: lambda x, control, bias, out_features, kind, fine=None:
        spline.separable_levels(x, [spline.control_grid(control)] + ([] if fine is None else [fine]), bias,
                                out_features, kind),
    # W in blocks of 4M elements: a few graph nodes per layer instead of one block per 256K
    _OPS.field_linear.default: functools.partial(spline.field_linear, budget=1 << 22),
    _OPS.decoupled_mlp.default: decoupled.decoupled_mlp,
}


class _TraceReferences(TorchFunctionMode):
    """Runs the reference of every tspline op called inside the block (the trace then records
    its aten ops); any other call is left alone."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return _REFERENCES.get(func, func)(*args, **(kwargs or {}))


def _check_path(path: str | os.PathLike) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if isinstance(path, bytes):
        raise TypeError("path must be a str or os.PathLike of str, got bytes")
    if os.path.isdir(path):
        raise IsADirectoryError(f"path {path!r} is a directory; give a file name such as model.onnx")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"path {path!r}: the directory {folder!r} does not exist")
    return path


def _leading_dims_dynamic(example_inputs: tuple) -> tuple:
    """Every dimension but the last of each tensor input dynamic (None for non-tensors)."""
    specs = []
    for k, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor):
            specs.append(None)
            continue
        small = [d for d in range(t.dim() - 1) if t.shape[d] < 2]
        if small:
            raise ValueError(f"example_inputs[{k}] has shape {tuple(t.shape)}: its leading dimensions are exported "
                             f"as dynamic and need a size of at least 2 in the example (torch.export specialises "
                             f"sizes 0 and 1); dimension(s) {small} are smaller")
        specs.append({d: torch.export.Dim.DYNAMIC for d in range(t.dim() - 1)})
    return tuple(specs)


def _keeps_size(node) -> bool | None:
    """Constant-folding rule: never fold a node that reads an initializer (each parameter and buffer
    stays one tensor under its module path, as in the state dict), nor one whose outputs hold more
    values than its inputs (a basis stays a recipe); else the default rules."""
    if any(v is not None and v.is_initializer() for v in node.inputs):
        return False
    shapes = [v.shape for v in node.outputs]
    if any(s is None or not s.is_static() for s in shapes):
        return None
    inputs = sum(v.const_value.size for v in node.inputs if v is not None and v.const_value is not None)
    return None if sum(math.prod(s.numpy()) for s in shapes) <= inputs else False


def _trace(model: nn.Module, example_inputs: tuple, dynamic_shapes) -> torch.export.ExportedProgram:
    """``torch.export`` with every tspline op traced as its reference (whose basis matrices are then
    built in the graph, not read from its cache)."""
    with _TraceReferences():
        program = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes)
    left = sorted({str(n.target) for n in program.graph.nodes
                   if n.op == "call_function" and str(n.target).startswith("tspline.")})
    if left:
        raise NotImplementedError(f"no ONNX export for the custom op(s) {left}: add each to "
                                  "tspline_kernels.export._REFERENCES with its reference")
    return program


def _strip(graph) -> None:
    """Drop what outweighs a small model's parameters and onnxruntime does not read: node names and
    metadata (stack traces, FX nodes) and the shapes of intermediate values (value_info)."""
    outputs = set(graph.outputs)
    for node in graph:
        node.name = None
        node.metadata_props.clear()
        for value in node.outputs:
            value.metadata_props.clear()
            if value not in outputs:
                value.type, value.shape = None, None


def export_onnx(model: nn.Module, example_inputs: torch.Tensor | Sequence[Any], path: str | os.PathLike, *,
                dynamic_shapes: dict[str, Any] | Sequence[Any] | None = None) -> None:
    """Write ``model`` as an ONNX file at ``path``, every compressed layer as its factored graph.

    ``example_inputs``: one tensor or a tuple of the forward's positional arguments, e.g. x
    ``(batch, in_features)``. By default every dimension but the last of each tensor input is
    dynamic (batch, and e.g. sequence length for ``(batch, seq, features)``), so the example needs
    sizes >= 2 there; ``dynamic_shapes`` (``torch.export``'s format) overrides that. Needs the
    ``onnx`` extra (onnx, onnxscript; onnxruntime to run the file). The model is traced as it is
    (put it in ``eval()`` mode first); its parameters are not changed. A model whose parameters
    exceed ONNX's 2 GB protobuf limit gets its tensors in an external data file beside ``path``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise TypeError("example_inputs must be a tensor or a non-empty tuple of the forward's arguments, "
                        f"got {example_inputs!r:.80}")
    example_inputs = tuple(example_inputs)
    path = _check_path(path)
    try:
        import onnxscript.optimizer
    except ImportError as e:
        raise ImportError("export_onnx needs onnx and onnxscript: pip install 'tspline-kernels[onnx]'") from e
    if dynamic_shapes is None:
        dynamic_shapes = _leading_dims_dynamic(example_inputs)
    program = torch.onnx.export(_trace(model, example_inputs, dynamic_shapes), dynamo=True, optimize=False,
                                verbose=False)
    onnxscript.optimizer.optimize_ir(program.model, should_fold=_keeps_size)
    _strip(program.model.graph)
    program.save(path)
