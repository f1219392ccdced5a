"""``Cond``: run one of two branches, chosen by a scalar predicate.

::

    with looplift.Cond(looplift.length(time) > 100) as cond:
        cond.true = expensive(x)      # traced into the true branch
        cond.false = cheap(x)         # traced into the false branch
    y = cond.result

Everything computed in the block before ``cond.true`` is assigned belongs to
the true branch; everything after it, to the false branch. Exactly one branch
runs. Both branches return values of the same structure (tensors, or nested
tuples, dicts, dataclasses of them) whose tensors have the same dims.

Why a scalar predicate: a per-entry choice is ``looplift.where`` (both sides
computed); a Cond skips the work of the branch not taken, which is only
possible when the whole batch takes the same branch.
"""

from __future__ import annotations

import torch

from . import trace as _trace
from ._tree import flatten, unflatten
from .errors import DimMismatchError, DTypeError, TraceError, entry_methods
from .graph import Graph, Op
from .ops._core import as_tensor, dims_str
from .ops.shape import to_layout
from .regions import CondSpec
from .source import user_source_line
from .tensor import Tensor

__all__ = ["Cond"]


def _is_tensor(v) -> bool:
    return isinstance(v, Tensor)


class Cond:
    """Choose between two branches by the bool scalar `pred` (a tensor without dims)."""

    def __init__(self, pred):
        ctx = _trace.current("Cond")
        self._ctx = ctx
        self.source = user_source_line()
        self.pred = as_tensor(pred)
        if self.pred.dtype != torch.bool or self.pred.dims:
            raise TraceError(f"Cond needs a bool scalar (no dims) predicate, got the {self.pred.describe()}; "
                             f"for a choice per entry use looplift.where (at {self.source})")
        self._parent = ctx.graph
        self._branches = {True: Graph(parent=ctx.graph), False: Graph(parent=ctx.graph)}
        self._values: dict[bool, tuple[list, object]] = {}
        self._phase = "before"
        self._result = None

    def __enter__(self) -> Cond:
        if self._phase != "before":
            raise TraceError(f"a Cond is entered once (at {self.source})")
        self._phase = "true"
        self._ctx.graph = self._branches[True]
        return self

    @property
    def true(self):
        raise TraceError(f"cond.true is set, not read; use cond.result after the block (at {self.source})")

    @true.setter
    def true(self, value) -> None:
        if self._phase != "true":
            raise TraceError(f"cond.true is set once, first, inside the Cond block (Cond at {self.source}, "
                             f"at {user_source_line()})")
        self._values[True] = self._convert(value)
        self._phase = "false"
        self._ctx.graph = self._branches[False]

    @property
    def false(self):
        raise TraceError(f"cond.false is set, not read; use cond.result after the block (at {self.source})")

    @false.setter
    def false(self, value) -> None:
        if self._phase != "false" or False in self._values:
            raise TraceError(f"cond.false is set once, after cond.true, inside the Cond block (Cond at "
                             f"{self.source}, at {user_source_line()})")
        self._values[False] = self._convert(value)

    def _convert(self, value):
        leaves, spec = flatten(value, _is_tensor)
        return [as_tensor(v) if isinstance(v, (Tensor, int, float, bool)) else v for v in leaves], spec

    def __exit__(self, exc_type, exc, tb) -> None:
        self._ctx.graph = self._parent
        if exc_type is not None:
            return
        if set(self._values) != {True, False}:
            raise TraceError(f"a Cond block sets both cond.true and cond.false (Cond at {self.source})")
        (t_leaves, t_spec), (f_leaves, f_spec) = self._values[True], self._values[False]
        if t_spec != f_spec:
            raise TraceError(f"the branches of the Cond return values of different structure (at {self.source})")
        tensor_idx = [i for i, v in enumerate(t_leaves) if isinstance(v, Tensor)]
        for a, b in zip(t_leaves, f_leaves):
            if isinstance(a, Tensor) != isinstance(b, Tensor) or (not isinstance(a, Tensor) and a != b):
                raise TraceError(f"the branches of the Cond return different values {a!r} and {b!r} "
                                 f"(at {self.source})")
            if isinstance(a, Tensor):
                if a.dim_set != b.dim_set:
                    raise DimMismatchError(
                        f"the branches of the Cond return tensors with different dims: {dims_str(a.dims)} "
                        f"(created at {a.source}) and {dims_str(b.dims)} (created at {b.source}) "
                        f"(Cond at {self.source})")
                if a.dtype != b.dtype:
                    raise DTypeError(f"the branches of the Cond return tensors of different dtypes: {a.describe()} "
                                     f"and {b.describe()} (Cond at {self.source})")
        outs = {True: [], False: []}
        for branch, leaves in ((True, t_leaves), (False, f_leaves)):
            with self._ctx.inside(self._branches[branch]):
                outs[branch] = [to_layout(leaves[i], t_leaves[i].dims) for i in tensor_idx]
        captured = []
        for branch, g in self._branches.items():
            for t in g.captured(outs[branch]):
                if not any(t is c for c in captured):
                    captured.append(t)
        specs = [(t_leaves[i].dims, t_leaves[i].dtype, t_leaves[i].sparse_dim) for i in tensor_idx]
        region = CondSpec(self._branches, captured, outs)
        node = self._parent.add(Op.COND, (self.pred, *captured), None, specs, source=self.source,
                                region=region) if tensor_idx else None
        leaves = list(t_leaves)
        for k, i in enumerate(tensor_idx):
            leaves[i] = node.outputs[k]
        self._result = unflatten(t_spec, leaves)
        self._phase = "after"

    @property
    def result(self):
        """The value of the branch taken (after the block)."""
        if self._phase != "after":
            raise TraceError(f"cond.result is available after the Cond block (Cond at {self.source})")
        return self._result


entry_methods(Cond, "__init__", "__enter__", "__exit__", "true", "false", "result", public="looplift.Cond")
