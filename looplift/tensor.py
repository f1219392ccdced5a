"""The symbolic Tensor: what user code handles while a program is traced.

A Tensor has a set of dims (its storage order ``dims`` is an implementation
detail, never part of its meaning), a torch dtype and optionally a
``sparse_dim``: for integer label tensors, the vocabulary dim the values index.
It records the graph node that produced it; it holds no data.

Operators (``+``, ``*``, ``==``, ``&``, ...) broadcast by dim identity; they are
installed by :mod:`looplift.ops.math`, so this module stays free of op logic.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from .dims import Dim
from .errors import SymbolicAttributeError, SymbolicTensorError, TraceError

__all__ = ["Tensor"]


class Tensor:
    """A symbolic tensor over named dims. Created by ops, never by hand."""

    __slots__ = ("dims", "dtype", "sparse_dim", "node", "index", "__weakref__")

    def __init__(self, dims: tuple[Dim, ...], dtype: torch.dtype, *, sparse_dim: Dim | None = None,
                 node: Any = None, index: int = 0):
        self.dims = tuple(d.canonical() for d in dims)
        self.dtype = dtype
        self.sparse_dim = sparse_dim.canonical() if sparse_dim is not None else None
        #: the :class:`looplift.graph.Node` that computes this tensor (its output `index`), None before it is made
        self.node = node
        self.index = index

    @property
    def dim_set(self) -> frozenset[Dim]:
        return frozenset(self.dims)

    @property
    def source(self) -> str:
        """The user source line that created this tensor."""
        return self.node.source if self.node is not None else "<unknown>"

    @property
    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def describe(self) -> str:
        """One line for error messages: dims, dtype and where it was created."""
        sparse = f", sparse_dim={self.sparse_dim.name}" if self.sparse_dim is not None else ""
        dims = ", ".join(d.name for d in self.dims)
        return f"tensor {{{dims}}} {str(self.dtype).removeprefix('torch.')}{sparse} (created at {self.source})"

    def __repr__(self) -> str:
        return f"<looplift.Tensor {self.describe()}>"

    __hash__ = object.__hash__

    def __bool__(self):
        raise TraceError(
            f"the truth value of a symbolic {self.describe()} is not known while tracing; "
            f"use looplift.where(...) for values, or looplift.Cond for control flow")

    def __iter__(self):
        raise TraceError(f"a symbolic {self.describe()} cannot be iterated; "
                         f"ops name the dim they work on instead")

    def __len__(self):
        raise TraceError(f"len() of a symbolic {self.describe()} is not defined; "
                         f"use looplift.length(dim) for the length of a dim")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        tensor = next((a for a in _flat(args, kwargs) if isinstance(a, Tensor)), None)
        what = f"the symbolic {tensor.describe()}" if tensor is not None else "a symbolic looplift tensor"
        raise SymbolicTensorError(f"torch.{name} cannot be applied to {what}: it holds no data while looplift "
                                  f"traces; {_instead(name)}")

    def __getattr__(self, name: str):
        if name.startswith("__") or not hasattr(torch.Tensor, name):
            raise AttributeError(f"'looplift.Tensor' object has no attribute {name!r}")
        raise SymbolicAttributeError(f"the symbolic {self.describe()} has no .{name}: it is not a torch.Tensor; "
                                     f"{_instead(name)}")

    def __getitem__(self, index):
        raise SymbolicTensorError(f"a symbolic {self.describe()} cannot be indexed by position; "
                                  f"{_instead('__getitem__')}")

    def __setitem__(self, index, value):
        raise SymbolicTensorError(f"a symbolic {self.describe()} cannot be assigned to (looplift values are never "
                                  f"changed in place); use looplift.where(mask, value, x) for a new value")

    def __matmul__(self, other):
        raise SymbolicTensorError(f"@ is not defined for the symbolic {self.describe()}: it does not say which "
                                  f"dim to reduce; use looplift.dot(a, b, reduce=dim) or looplift.matmul")

    __rmatmul__ = __matmul__

    def _no_value(self, *_):
        raise SymbolicTensorError(f"the symbolic {self.describe()} has no value while looplift traces; compute "
                                  f"with looplift ops, and read values from the program's outputs")

    __float__ = __int__ = __index__ = __complex__ = __array__ = _no_value


#: what to use instead of a torch function or ``torch.Tensor`` attribute (by name), where it is not the
#: looplift op of the same name
_INSTEAD = {
    "shape": "its dims are x.dims (Dims in no particular order); use dim.size for a static size and "
             "looplift.length(dim) for the lengths of a dynamic dim",
    "__getitem__": "use looplift.gather (by index), looplift.slice (a range of a dim) or loop.unstack (a frame)",
    "cat": "use looplift.concat(*xs, axis=...)",
    "stack": "use looplift.concat over dims, or loop.stack inside a loop",
    "view": "use looplift.split_dims / looplift.merge_dims",
    "reshape": "use looplift.split_dims / looplift.merge_dims",
    "permute": "dims have no order in looplift: ops name the dims they work on",
    "transpose": "dims have no order in looplift: ops name the dims they work on",
    "t": "dims have no order in looplift: ops name the dims they work on",
    "unsqueeze": "use looplift.expand(x, dims) to add a dim",
    "squeeze": "a looplift tensor has no size-1 axes to drop: ops name the dims they work on",
    "to": "use looplift.cast(x, dtype) for a dtype; a program runs on the device of its inputs",
    "float": "use looplift.cast(x, 'float32')",
    "long": "use looplift.cast(x, 'int64')",
    "int": "use looplift.cast(x, 'int32')",
    "bool": "use a comparison (x != 0) or looplift.cast(x, 'bool')",
    "masked_fill": "use looplift.where(mask, value, x)",
    "bmm": "use looplift.matmul or looplift.dot, naming the reduced dim",
    "einsum": "use looplift.dot(a, b, reduce=...) naming the reduced dims",
    "size": "use dim.size for a static dim and looplift.length(dim) for a dynamic one",
    "dim": "its dims are x.dims",
    "numel": "use dim.size / looplift.length(dim)",
    "item": "read values from the program's outputs",
    "tolist": "read values from the program's outputs",
    "numpy": "read values from the program's outputs",
    "detach": "a program's inputs carry no graph; use looplift ops throughout",
    "sum": "use looplift.sum(x, axis=...)",
    "mean": "use looplift.mean(x, axis=...)",
    "softmax": "use looplift.softmax(x, axis=...)",
    "log_softmax": "use looplift.log_softmax(x, axis=...)",
    "max": "use looplift.max(x, axis=...) or looplift.maximum(a, b)",
    "min": "use looplift.min(x, axis=...) or looplift.minimum(a, b)",
    "argmax": "use looplift.argmax(x, axis=...)",
    "matmul": "use looplift.matmul(a, b, reduce=...) or looplift.dot",
    "linear": "use looplift.nn.Linear or looplift.linear",
    "embedding": "use looplift.nn.Embedding or looplift.embedding",
    "dropout": "use looplift.dropout(x, p, axis=...) or looplift.nn.Dropout",
    "layer_norm": "use looplift.layer_norm or looplift.nn.LayerNorm",
    "cross_entropy": "use looplift.cross_entropy(logits, labels, axis=...)",
    "ctc_loss": "use looplift.ctc_loss",
    "where": "use looplift.where(cond, a, b)",
    "clamp": "use looplift.clip(x, lo, hi)",
}


def _instead(name: str) -> str:
    if name in _INSTEAD:
        return _INSTEAD[name]
    package = sys.modules.get(__package__)
    if name in getattr(package, "__all__", ()):
        return f"use looplift.{name}, which names the dims it works on"
    return ("use the looplift ops (looplift.__all__), which name the dims they work on, or compute on the "
            "program's outputs")


def _flat(args, kwargs):
    for a in (*args, *(kwargs or {}).values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a

