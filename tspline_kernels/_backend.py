"""Backend selection shared by every op: Triton kernels or the pure-PyTorch reference.

``auto`` (default) sends CUDA tensors to Triton and everything else to the reference.
``triton`` forces the kernels (on CPU tensors they run under the Triton interpreter) and
``reference`` forces the reference. The choice comes from, in order: the innermost
``tspline_kernels.backend(name)`` block of the current thread (or asyncio task), the
``TSPLINE_BACKEND`` environment variable, ``auto``.

Autograd may run a backward on another thread (CUDA's device threads), where the caller's
override is not in force; every op therefore records the backend at forward time and its
backward runs under that same backend (``register_autograd``).

``register_autograd`` also gives each op a cheap eager path (:class:`EagerOp`): torch.library's
Python dispatch of a custom op costs ~15 us per call without autograd and ~35-55 us with it (its
generated ``autograd.Function`` binds the arguments with ``inspect.signature`` on every call), more
than the host time of the launch it wraps.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from collections.abc import Callable, Iterator
from types import ModuleType

import torch
from torch import nn
from torch._library.custom_ops import CustomOpDef

BACKENDS = ("auto", "triton", "reference")
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("tspline_backend", default=None)


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    return name


def get_backend() -> str:
    """The backend in force now, in this thread: ``"auto"``, ``"triton"`` or ``"reference"``."""
    name = _override.get()
    return name if name is not None else _checked(_environment_backend())


_ENV = "TSPLINE_BACKEND"
_ENV_KEY = os.environ.encodekey(_ENV) if hasattr(os.environ, "encodekey") else None


def _environment_backend() -> str:
    """``TSPLINE_BACKEND``, or ``"auto"`` where unset. Read from ``os.environ``'s own mapping where
    CPython has one: ``os.environ.get`` of an unset variable raises and catches a KeyError inside
    (~1 us, paid by every op call outside a ``backend(...)`` block)."""
    env = os.environ
    data = getattr(env, "_data", None)
    if _ENV_KEY is None or type(data) is not dict:
        return env.get(_ENV, "auto")
    value = data.get(_ENV_KEY)
    return "auto" if value is None else env.decodevalue(value)


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force ``name`` (``auto``, ``triton`` or ``reference``) for every op inside the block, in the
    current thread (or asyncio task) only; blocks nest."""
    token = _override.set(_checked(name))
    try:
        yield
    finally:
        _override.reset(token)


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on tensor ``t`` runs the Triton kernels under the current backend."""
    name = get_backend()
    return t.is_cuda if name == "auto" else name == "triton"


def kernels_of(package: str) -> Callable[[], ModuleType]:
    """A loader of ``<package>.kernels``, the family's Triton launchers: imported on the first
    Triton call (importing the package imports no Triton), then a cached lookup instead of an
    import statement per call (~1.5 us)."""
    return functools.cache(lambda: importlib.import_module(f"{package}.kernels"))


def autocast_off(args: tuple) -> contextlib.AbstractContextManager:
    """Autocast switched off on the device of the first tensor in ``args``. An op computes in the
    dtypes it is given (the layers pass autocast's) and keeps its own intermediates: under autocast
    the reference's fp32 products would run in fp16 and overflow where the kernels do not."""
    device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
    return torch.autocast(device, enabled=False)


def register_autograd(op: CustomOpDef, backward: Callable, setup_context: Callable) -> None:
    """``op.register_autograd(backward, setup_context=...)``, with the backend in force at forward
    time recorded in ``ctx`` and forced again while ``backward`` runs, whatever thread runs it (and
    autocast off, as for the forward: :meth:`EagerOp.__call__`); and ``op`` made an
    :class:`EagerOp` running the same forward, setup and backward in eager mode."""
    def setup(ctx, inputs, output) -> None:
        ctx.tspline_backend = get_backend()
        setup_context(ctx, inputs, output)

    def replay(ctx, *grads):
        token = _override.set(ctx.tspline_backend)  # backend(...) without a context manager's cost
        try:
            if torch._C._is_any_autocast_enabled():
                with autocast_off(grads):
                    return backward(ctx, *grads)
            return backward(ctx, *grads)
        finally:
            _override.reset(token)

    op.register_autograd(replay, setup_context=setup)
    EagerOp.install(op, setup, replay)


def _forward_mode() -> bool:
    """Whether a forward-mode ``torch.func`` transform (``jvp``, ``jacfwd``) is active: a custom op
    with only a backward formula would give it zero tangents without a word."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters())


_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)
_SCALARS = (bool, int, float, str)


def eager_mode(args: tuple) -> str | None:
    """How a call with ``args`` runs in plain eager PyTorch: ``"autograd"`` when autograd records it,
    ``"direct"`` when not; None when it is not plain eager (a compile, export or jit trace, a
    functorch transform, a torch function or dispatch mode, a tensor subclass: DTensor, FakeTensor, ...)."""
    if (torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None
            or torch._C._are_functorch_transforms_active()
            or torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack()):
        return None
    grad = False
    for a in args:  # exact-type tests first, no generators or tuples: this runs on every op call
        kind = type(a)
        if kind in _PLAIN_TENSORS:
            grad = grad or a.requires_grad
        elif kind is list:
            for t in a:
                if type(t) in _PLAIN_TENSORS:
                    grad = grad or t.requires_grad
                elif isinstance(t, torch.Tensor):  # a subclass
                    return None
        elif a is not None and kind not in _SCALARS and isinstance(a, torch.Tensor):  # a subclass
            return None
    return "autograd" if grad and torch.is_grad_enabled() else "direct"


def _is_tensor_list(t: torch.Type) -> bool:
    return isinstance(t, torch.ListType) and t.getElementType().isSubtypeOf(torch.TensorType.get())


def _grouped(spec: tuple[int | None, ...], flat) -> list:
    """``flat`` regrouped as the op's arguments: entry k is a list of the next ``spec[k]`` items
    where ``spec[k]`` is a length, else the next item."""
    args, k = [], 0
    for length in spec:
        if length is None:
            args.append(flat[k])
            k += 1
        else:
            args.append(list(flat[k:k + length]))
            k += length
    return args


class EagerOp(CustomOpDef):
    """A custom op whose plain eager calls (:func:`eager_mode`, every argument given
    positionally) skip torch.library's dispatch: without autograd they call the op's function
    directly, with it they go through a classic ``autograd.Function`` (~5 us) running the op's
    function, ``setup_context`` and registered backward. Anything else (``torch.compile``,
    ``torch.export``, ``opcheck``, vmap, fake or DTensor inputs, keyword arguments) calls the
    custom op itself, so traces, fake implementations and schema checks see it as before.
    A Function only tracks top-level tensors, so an op taking tensor lists (TT cores) gets them
    flattened into its Function's arguments, after a spec of the list lengths, and regrouped for
    its function, ``setup_context`` (``ctx.needs_input_grad`` too: a list of flags per list, as
    torch.library gives it) and backward; an op returning a tensor list takes the direct path only."""

    _eager_function: type[torch.autograd.Function] | None
    _eager_apply: Callable
    _eager_arity: int
    _eager_lists: bool

    @classmethod
    def install(cls, op: CustomOpDef, setup: Callable, backward: Callable) -> None:
        """Give ``op`` (the ``torch.library.custom_op`` object, so every caller gets it) the eager
        path; calls with autograd only where it returns no tensor list."""
        schema = op._opoverload._schema
        op.__class__ = cls
        op._eager_function, op._eager_arity = None, len(schema.arguments)
        op._eager_lists = any(_is_tensor_list(a.type) for a in schema.arguments)
        if any(_is_tensor_list(r.type) for r in schema.returns):
            return
        fn = op._init_fn
        if op._eager_lists:
            def forward(ctx, spec, *flat):
                args = _grouped(spec, flat)
                ctx.eager_spec = spec
                ctx.needs_input_grad = tuple(_grouped(spec, ctx.needs_input_grad[1:]))
                out = fn(*args)
                setup(ctx, args, out)
                return out

            def flat_backward(ctx, *grads):
                flat: list = [None]  # the spec's
                for length, g in zip(ctx.eager_spec, backward(ctx, *grads)):
                    if length is None:
                        flat.append(g)
                    else:
                        flat.extend([None] * length if g is None else g)
                return tuple(flat)
        else:
            def forward(ctx, *args):
                out = fn(*args)
                setup(ctx, args, out)
                return out

            flat_backward = backward
        # built by name so that its graph nodes read "<op>_eagerBackward"
        op._eager_function = type(f"{op._name}_eager", (torch.autograd.Function,),
                                  {"forward": staticmethod(forward), "backward": staticmethod(flat_backward)})
        # Function.apply's C implementation, bound to the class: Function.apply's Python wrapper only
        # binds setup_context arguments (there is none) and, outside functorch transforms (eager_mode
        # rules those out), unwraps tensors escaped from one, as the direct path does not either (~1.5 us)
        op._eager_apply = super(torch.autograd.Function, op._eager_function).apply

    def __call__(self, *args, **kwargs):
        """The op on ``args``, with autocast off (:func:`autocast_off`) where it is on."""
        if torch._C._is_any_autocast_enabled():
            with autocast_off(args):
                return self._call(*args, **kwargs)
        return self._call(*args, **kwargs)

    def _call(self, *args, **kwargs):
        mode = None if kwargs or len(args) != self._eager_arity else eager_mode(args)
        if mode is None or (mode == "autograd" and self._eager_function is None):
            if torch._C._are_functorch_transforms_active() and _forward_mode():
                raise NotImplementedError(f"{self._name}: forward-mode AD (torch.func.jvp, jacfwd) is not supported: "
                                          "the ops define a backward formula for torch.autograd only")
            return super().__call__(*args, **kwargs)
        if mode == "direct":
            return self._init_fn(*args)
        if not self._eager_lists:
            return self._eager_apply(*args)
        flat = []
        for a in args:
            if type(a) is list:
                flat.extend(a)
            else:
                flat.append(a)
        return self._eager_apply(tuple(len(a) if type(a) is list else None for a in args), *flat)


_UNSAFE_VIEW = torch.ops.aten._unsafe_view.default


def owned(out):
    """A forward op's result (a tensor or a tuple of tensors) with every view of the op's own
    scratch (the launchers and references reshape a 2-D result back to ``(*, n)``) re-labelled as
    a plain tensor (``aten._unsafe_view``: no copy). Autograd forbids in-place ops on a view
    returned by a custom Function, so without this ``nn.ReLU(inplace=True)`` or ``y += r`` after
    the layer raise, where they work after ``nn.Linear`` (FSDP2 also warns about view outputs)."""
    if isinstance(out, tuple):
        return tuple(owned(t) for t in out)
    return _UNSAFE_VIEW(out, out.shape) if out._is_view() else out
