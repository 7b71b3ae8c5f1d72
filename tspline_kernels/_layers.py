"""What every compressed layer shares: nn.Linear's contract, input checks, autocast, reporting."""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ._fit import check_gram, output_error


@dataclass(frozen=True)
class FitReport:
    """How well a compressed layer reproduces the dense weight it was fitted to.

    ``relative_error`` is ||W - W_hat||_F / ||W||_F over the whole weight (the bias is copied
    exactly, but for ``KroneckerLinear``, whose per-mode biases fit it by least squares: its
    ``details["bias_error"]``, which the compression report shows beside the structure);
    ``output_error`` is ||(W - W_hat) X^T||_F / ||W X^T||_F on the calibration inputs X, computed from
    their Gram X^T X (None when the fit had no ``input_gram``).
    """

    method: str
    relative_error: float
    dense_params: int
    params: int
    details: dict = field(default_factory=dict)
    output_error: float | None = None

    def __str__(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.details.items())
        calibrated = "" if self.output_error is None else f", output error {self.output_error:.3e}"
        return (f"{self.method}: relative error {self.relative_error:.3e}{calibrated}, params {self.params} "
                f"(dense {self.dense_params}, {self.dense_params / max(self.params, 1):.1f}x fewer){extra}")


def fit_report(method: str, dense: torch.Tensor, layer: CompressedLinear, input_gram: torch.Tensor | None = None,
               **details) -> FitReport:
    """Compare ``layer.materialize()`` with the ``dense`` weight ``(out, in)`` it was fitted to; with
    ``input_gram`` ``(in, in)`` also on the calibration inputs (``output_error``)."""
    with torch.no_grad():
        w = dense.double()
        w_hat = layer.materialize().double().to(w.device)
        err = (w_hat - w).norm() / w.norm().clamp_min(1e-300)
        out = None if input_gram is None else output_error(w, w_hat, check_gram(input_gram, w.shape[1]))
    overflow = [name for name, p in layer.named_parameters() if not torch.isfinite(p).all()]
    if overflow:
        raise ValueError(f"{method}: the fitted {', '.join(overflow)} do not fit in {dense.dtype} (the Linear's "
                         "weight does, the fit's factors overflow): fit a float32 copy of the Linear")
    return FitReport(method, err.item(), layer.dense_parameters(), layer.num_parameters(), details, out)


def full_value(t: torch.Tensor) -> torch.Tensor:
    """``t``, or the whole value of a sharded ``DTensor`` (FSDP2's parameters: an all-gather, so
    every rank must call it). Initialisers that scale by a statistic of the whole weight read it
    here: DTensor refuses to mix with the plain basis tensors, and a shard's statistic differs per rank."""
    full = getattr(t, "full_tensor", None)
    return t if full is None else full()


def assign_(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``param.copy_(value)`` for a whole ``value`` the same on every rank; a sharded ``DTensor``
    parameter takes its own shard of it."""
    mesh = getattr(param, "device_mesh", None)
    if mesh is None:
        return param.copy_(value)
    from torch.distributed.tensor import distribute_tensor
    return param.copy_(distribute_tensor(value.to(device=param.device, dtype=param.dtype), mesh, param.placements))


def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t.to(dtype)`` (None stays None) without the dispatch when ``t`` already has ``dtype``
    (``.to`` then returns ``t`` itself too, after ~1 us)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def check_count(name: str, value, minimum: int, why: str = "") -> int:
    """``value`` as an int >= ``minimum``; floats, strings and bools are refused, not truncated."""
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})") from None
    if n < minimum:
        raise ValueError(f"{name} must be >= {minimum}{why}, got {n}")
    return n


def check_grid(grid, name: str = "grid") -> tuple[int, int]:
    """A cubic B-spline grid ``(G_out, G_in)``: two ints >= 4 (a TypeError for what is not a
    sequence, a ValueError for a sequence of another length)."""
    if isinstance(grid, (str, bytes)) or not hasattr(grid, "__len__"):
        raise TypeError(f"{name} must be a pair (G_out, G_in), got {grid!r} ({type(grid).__name__})")
    if len(grid) != 2:
        raise ValueError(f"{name} must be a pair (G_out, G_in), got {grid!r}")
    why = " (a cubic B-spline needs at least 4 control points per axis)"
    return tuple(check_count(f"{name}[{axis}]", g, 4, why) for axis, g in enumerate(grid))


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


class SavedSettings:
    """Settings that change the function without changing a parameter's shape (basis, support,
    radius, feature counts) travel in the state dict as ``_extra_state``, a float64 tensor so that
    safetensors can store it, and loading into a layer built with other settings raises."""

    def _settings(self) -> dict[str, float]:
        """Name -> value of every such setting, in a fixed order."""
        raise NotImplementedError

    def _describe(self, name: str, value: float) -> str:
        return repr(int(value)) if float(value).is_integer() else f"{value:.6g}"

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(list(self._settings().values()), dtype=torch.float64, device="cpu")

    def set_extra_state(self, state: torch.Tensor) -> None:
        mine = self._settings()
        saved = torch.as_tensor(state).detach().double().reshape(-1).tolist()
        name = type(self).__name__
        if len(saved) != len(mine):
            raise ValueError(f"{name}: the state dict holds {len(saved)} settings, this layer has {len(mine)} "
                             f"({', '.join(mine)}); it was not saved from a {name}")
        wrong = [f"{k}={self._describe(k, s)} in the state dict but {self._describe(k, v)} in this layer"
                 for (k, v), s in zip(mine.items(), saved) if not math.isclose(s, v, rel_tol=1e-9)]
        if wrong:
            raise ValueError(f"{name}: the state dict was saved from a differently configured layer: "
                             + "; ".join(wrong) + ". Build the layer with the saved settings before loading.")


def check_ints(name: str, values, minimum: int) -> tuple[int, ...]:
    """``values`` (a list, tuple, torch.Size, array or 1-D tensor of ints) as ints >= ``minimum``;
    strings, mappings, sets, floats and bools are refused, not converted."""
    try:
        if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__getitem__"):
            raise TypeError
        items = list(values)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints, got {values!r}") from None
    return tuple(check_count(f"{name}[{k}]", v, minimum) for k, v in enumerate(items))


def _plain(value):
    """``value`` as JSON-ready data (ints, floats, strings, bools, None; sequences, tensors and
    arrays as tuples), or unchanged when it has no such form (``save_compressed`` refuses it)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor) or type(value).__module__ == "numpy":
        value = value.tolist()
        if not isinstance(value, list):
            return _plain(value)
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _recording(init):
    """Wrap a subclass's ``__init__`` so that the outermost call (the class being built) stores its
    arguments, defaults applied and ``device``/``dtype`` left out (of ``**kwargs`` too), as
    ``self.init_args``: parameter name -> value (``*args`` a tuple, ``**kwargs`` a dict)."""
    signature = inspect.signature(init)
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if type(self).__init__ is wrapper:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            arguments = {k: v for k, v in list(bound.arguments.items())[1:] if k not in ("device", "dtype")}
            if var_keyword in arguments:
                arguments[var_keyword] = {k: v for k, v in arguments[var_keyword].items()
                                          if k not in ("device", "dtype")}
            self.init_args = {k: _plain(v) for k, v in arguments.items()}

    return wrapper


class CompressedLinear(nn.Module):
    """Base of the drop-in ``nn.Linear`` replacements: y = x @ W.T + b for x ``(*, in_features)``,
    with W ``(out_features, in_features)`` never stored. Subclasses define ``forward``,
    ``materialize`` and ``_structure``.

    Every instance records the arguments its class was built with as ``init_args`` (a dict of
    JSON-ready values, ``device`` and ``dtype`` left out): ``type(layer)(**layer.init_args)`` builds
    a layer computing the same function once the state dict is loaded (what ``tk.save_compressed``
    records; ``tk.load_compressed`` also rebuilds subclasses whose ``__init__`` takes ``*args``)."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _recording(cls.__init__)

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features = check_count("in_features", in_features, 1)
        self.out_features = check_count("out_features", out_features, 1)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        if check_flag("bias", bias):
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
            self.reset_bias()
        else:
            self.register_parameter("bias", None)

    def reset_bias(self) -> None:
        """nn.Linear's bias initialisation, U(-1/sqrt(in), 1/sqrt(in)) (after ``to_empty`` too)."""
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    # ---- input handling ---------------------------------------------------------------------
    def _param_ref(self) -> torch.Tensor:
        """The first parameter, ``next(self.parameters())``, looked up directly among the layer's own
        parameters, then its first submodule's (a ParameterList), before that generator's ~2.5 us."""
        for p in self._parameters.values():
            if p is not None:
                return p
        first = next((m for m in self._modules.values() if m is not None), None)
        for p in () if first is None else first._parameters.values():
            if p is not None:
                return p
        return next(self.parameters())

    def _prepare(self, x: torch.Tensor) -> torch.dtype:
        """Validate ``x`` and return the dtype the op runs in (autocast's when it is on)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a tensor, got {type(x).__name__}")
        dtype = x.dtype
        if not dtype.is_floating_point:
            raise TypeError(f"{type(self).__name__} expects a floating-point input, got {dtype}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects the last dimension to be in_features={self.in_features}, "
                f"got input of shape {tuple(x.shape)}"
            )
        p = self._param_ref()
        if x.device != p.device:
            raise ValueError(f"input is on {x.device} but {type(self).__name__}'s parameters are on {p.device}")
        if torch._C._is_any_autocast_enabled():
            kind = x.device.type
            if kind != "meta" and torch.is_autocast_enabled(kind):
                return torch.get_autocast_dtype(kind)
        if dtype != p.dtype:
            raise TypeError(
                f"input dtype {dtype} does not match {type(self).__name__}'s parameter dtype {p.dtype} "
                "(cast one of them, or run under torch.autocast)"
            )
        return dtype

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
