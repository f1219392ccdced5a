"""``Module`` and ``Parameter``: PyTorch modules whose parameters have dims.

A :class:`Module` is a ``torch.nn.Module``. Its parameters are created in
``__init__`` with explicit dims (``Parameter((in_dim, out_dim))``), so the model
has its full ``state_dict()`` before anything is traced, and saves, loads,
moves between devices and plugs into optimizers exactly as any PyTorch module.

While a program is traced, reading a parameter attribute (``self.weight``)
gives a symbolic tensor over its dims; outside of tracing it gives the torch
parameter. Parameter names are PyTorch's: the attribute chain from the root
module (the one compiled or saved); a parameter reachable by two paths has the
name of the first; calling a module twice uses the same parameters.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from numbers import Real

import torch

from . import graph as _graph
from . import trace as _trace
from .dims import Dim
from .errors import ArgumentError, ConfigError, DimError, TraceError, at_entry, entry_point
from .tensor import Tensor

__all__ = ["Module", "Parameter", "static_dims", "check_setting", "is_positive_int", "is_probability"]

Init = Callable[[torch.Tensor], None] | Real | str


@entry_point(name="looplift.Parameter")
def Parameter(dims: Sequence[Dim], *, init: Init = "fan_in_uniform", dtype: torch.dtype | None = None,
              requires_grad: bool = True) -> torch.nn.Parameter:
    """A new torch parameter over `dims` (storage order as given), to assign to a :class:`Module` attribute.

    Args:
        dims: static dims; the parameter's shape is their sizes.
        init: ``"fan_in_uniform"`` (uniform in +-1/sqrt(fan in), fan in being the
            product of all dims but the last, as ``torch.nn.Linear``),
            ``"normal"`` (standard normal), a number (constant), or a function
            filling a torch tensor in place.
        dtype: default ``torch.get_default_dtype()``.
    """
    dims = tuple(dims)
    for d in dims:
        if not isinstance(d, Dim) or not d.is_static:
            raise DimError(f"Parameter dims must be static Dims, got {d!r} among "
                           f"{[str(x) for x in dims]}")
    data = torch.empty([d.size for d in dims], dtype=dtype or torch.get_default_dtype())
    with torch.no_grad():
        if isinstance(init, Real):
            data.fill_(float(init))
        elif init == "fan_in_uniform":
            fan_in = math.prod(d.size for d in dims[:-1]) if len(dims) > 1 else dims[0].size
            bound = 1.0 / math.sqrt(max(fan_in, 1))
            data.uniform_(-bound, bound)
        elif init == "normal":
            data.normal_()
        elif callable(init):
            init(data)
        else:
            raise ConfigError(f"Parameter: unknown init {init!r}; use 'fan_in_uniform', 'normal', a number or "
                              f"a function filling a torch tensor in place")
    param = torch.nn.Parameter(data, requires_grad=requires_grad)
    param._looplift_dims = dims  # picked up (and removed) by Module.__setattr__
    return param


class Module(torch.nn.Module):
    """Base class of looplift models: a ``torch.nn.Module`` with dim-annotated parameters.

    Subclasses create parameters with :func:`Parameter` and define
    ``__call__`` (or ``forward``) on symbolic tensors.
    """

    def __setattr__(self, name: str, value) -> None:
        if "_parameters" not in self.__dict__ and isinstance(value, (torch.nn.Parameter, torch.nn.Module)):
            raise ArgumentError(f"{type(self).__name__}.{name} is set before the module is initialised: call "
                                f"super().__init__() first in {type(self).__name__}.__init__")
        if isinstance(value, torch.nn.Parameter):
            dims = value.__dict__.pop("_looplift_dims", None)
            if dims is not None:
                if "_param_dims" not in self.__dict__:
                    object.__setattr__(self, "_param_dims", {})
                self._param_dims[name] = dims
        super().__setattr__(name, value)

    def __getattr__(self, name: str):
        value = super().__getattr__(name)
        if isinstance(value, torch.nn.Parameter):
            ctx = _trace.tracing()
            if ctx is not None:
                return param_tensor(ctx.graph, self, name)
        return value

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except Exception as e:   # an entry point (see looplift.errors.entry_point), named after the module's class
            cls = type(self)
            placed = at_entry(e, sys._getframe(1), f"looplift.nn.{cls.__name__}" if cls.__module__.startswith(
                "looplift.nn.") else f"{cls.__qualname__} (a looplift.Module)")
            if placed is None:
                raise
            raise placed from e

    def param_dims(self, name: str) -> tuple[Dim, ...]:
        """The dims of the parameter `name` of this module."""
        return self.__dict__.get("_param_dims", {})[name]


def param_tensor(graph: _graph.Graph, module: Module, name: str) -> Tensor:
    """The symbolic tensor of ``module.<name>`` in `graph` (one node per parameter)."""
    key = (id(module), name)
    tensor = graph.params.get(key)
    if tensor is not None:
        return tensor
    dims = module.__dict__.get("_param_dims", {}).get(name)
    if dims is None:
        raise TraceError(f"the parameter {type(module).__name__}.{name} has no dims; create it with "
                         f"looplift.Parameter(dims)")
    raw = module._parameters[name]
    if tuple(raw.shape) != tuple(d.size for d in dims):
        raise TraceError(f"the parameter {type(module).__name__}.{name} has shape {tuple(raw.shape)}, but its "
                         f"dims {[repr(d) for d in dims]} say {tuple(d.size for d in dims)}")
    params = module._parameters
    # Parameters live in the program's top graph (first, as they need nothing), even when first used in a loop.
    root = graph
    while root.parent is not None:
        root = root.parent
    node = root.add("param", (), lambda env: params[name], [(dims, raw.dtype, None)],
                    attrs={"module": module, "name": name}, source=f"{type(module).__name__}.{name}",
                    nonfinite_padding=())
    first_other = next((i for i, n in enumerate(root.nodes) if n.op != "param"), len(root.nodes) - 1)
    root.nodes.insert(first_other, root.nodes.pop())
    tensor = graph.params[key] = node.outputs[0]
    return tensor


def static_dims(module: str, **dims) -> None:
    """Check a module's constructor arguments that must be static Dims (named by keyword)."""
    for name, d in dims.items():
        if not isinstance(d, Dim):
            example = f" (e.g. looplift.Dim({name!r}, {d}))" if isinstance(d, int) else ""
            raise ArgumentError(f"{module}: {name} must be a looplift.Dim, got {d!r}{example}")
        if not d.is_static:
            raise DimError(f"{module}: {name} must be a static dim (its size fixes the parameters), got {d!r}")


def check_setting(module: str, name: str, value, ok: bool, wanted: str) -> None:
    """A module's setting `name` is `value`; unless `ok`, a ConfigError saying it must be `wanted`."""
    if not ok:
        raise ConfigError(f"{module}: {name} must be {wanted}, got {value!r}")


def is_positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def is_probability(v) -> bool:
    """A dropout probability: a number in [0, 1)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1
