"""The symbolic Tensor: what user code handles while a program is traced.

A Tensor has a set of dims (its storage order ``dims`` is an implementation
detail, never part of its meaning), a torch dtype and optionally a
``sparse_dim``: for integer label tensors, the vocabulary dim the values index.
It records the graph node that produced it; it holds no data.

Operators (``+``, ``*``, ``==``, ``&``, ...) broadcast by dim identity; they are
installed by :mod:`looplift.ops.math`, so this module stays free of op logic.
"""

from __future__ import annotations

from typing import Any

import torch

from .dims import Dim
from .errors import TraceError
from .source import user_source_line

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
            f"use looplift.where(...) for values, or looplift.Cond for control flow (at {user_source_line()})")

    def __iter__(self):
        raise TraceError(f"a symbolic {self.describe()} cannot be iterated; "
                         f"ops name the dim they work on instead (at {user_source_line()})")

    def __len__(self):
        raise TraceError(f"len() of a symbolic {self.describe()} is not defined; "
                         f"use looplift.length(dim) for the length of a dim (at {user_source_line()})")

