"""Shared machinery of the op families: turning values into symbolic tensors,
emitting nodes, broadcasting by dim identity, masking and dim checks."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from .. import trace as _trace
from ..dims import Dim
from ..errors import ArgumentError, DimError, DimMismatchError, DTypeError, TraceError
from ..graph import Op
from ..source import user_source_line
from ..tensor import Tensor

__all__ = ["indexes_with", "as_tensor", "emit", "emit_many", "broadcast_dims", "dims_str", "dim_list", "check_has",
           "dims_to_mask", "masker", "result_dtype", "require_float",
           "require_int", "constant", "to_dtype"]


def dims_str(dims: Iterable[Dim]) -> str:
    return "{" + ", ".join(d.name for d in dims) + "}"


def dim_list(axis: Dim | Sequence[Dim], what: str = "axis") -> tuple[Dim, ...]:
    """Normalize an ``axis=``/``reduce=`` argument to a tuple of canonical dims."""
    if isinstance(axis, Dim):
        dims = (axis,)
    elif isinstance(axis, (list, tuple, set, frozenset)):
        dims = tuple(axis)
    else:
        raise ArgumentError(f"{what} must be a Dim or a sequence of Dims, got {axis!r} (looplift names dims, not "
                            f"positions)")
    for d in dims:
        if not isinstance(d, Dim):
            raise DimError(f"{what} must be a Dim or a sequence of Dims, got {d!r}")
    canon = tuple(d.canonical() for d in dims)
    if len(set(canon)) != len(canon):
        raise DimError(f"{what} names a dim twice: {dims_str(canon)}")
    return canon


def check_has(x: Tensor, dims: Iterable[Dim], op: str, what: str = "axis") -> None:
    for d in dims:
        if d not in x.dims:
            same_name = [e for e in x.dims if e.name == d.name]
            hint = (f"; it has a different dim also named {d.name!r}: dims are matched by identity, "
                    "use the same Dim object (or Dim.declare_same_as)") if same_name else ""
            error = DimMismatchError if same_name else DimError
            raise error(f"{op}: {what} {d.name!r} is not a dim of the {x.describe()}{hint}")


def constant(value, dtype: torch.dtype | None = None) -> Tensor:
    """A Python number as a symbolic 0-d tensor (its kernel returns the number itself)."""
    if isinstance(value, bool):
        dt = torch.bool
    elif isinstance(value, numbers.Integral):
        dt = torch.int64
    elif isinstance(value, numbers.Real):
        dt = _trace.current().float_dtype
    else:
        raise DTypeError(f"cannot use {value!r} as a looplift value")
    dt = dtype or dt
    value = bool(value) if dt == torch.bool else (float(value) if dt.is_floating_point else int(value))
    return emit(Op.CONSTANT, (), lambda env: value, (), dt, value=value,
                nonfinite_padding=() if math.isfinite(value) else None)


def as_tensor(value: Any, *, dtype: torch.dtype | None = None) -> Tensor:
    """A symbolic tensor from a Tensor, a Python number or a 0-d torch tensor."""
    if isinstance(value, Tensor):
        ctx = _trace.current(value.describe())
        graph = value.node.graph if value.node is not None else None
        if graph is None or not ctx.graph.encloses(graph):
            raise TraceError(_foreign_value_message(value, graph, ctx.graph))
        block = value.node.masked_block
        if block is not None:  # a value of a MaskedComputation used after it: held where the mask is False
            return block.outside(value)
        return value
    if isinstance(value, (bool, numbers.Number)) and not isinstance(value, complex):
        return constant(value, dtype)
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 and not value.requires_grad:
            return constant(value.item(), dtype or value.dtype)
        raise TraceError(
            f"a torch.Tensor of shape {tuple(value.shape)} has no dims: pass it to the program as "
            f"looplift.Named(tensor, dims), or create parameters with looplift.Parameter(dims)")
    if isinstance(value, Dim):
        raise TraceError(f"got the dim {value!r} where a tensor was expected; "
                         f"use looplift.length(dim) for its length")
    raise TraceError(f"cannot use {type(value).__name__} {value!r} as a looplift tensor")


def _foreign_value_message(value: Tensor, graph, here) -> str:
    at = user_source_line()
    if graph is None:
        return (f"the {value.describe()} is the result of loop.stack(...), which exists only after the loop; "
                f"inside the loop use the value itself (at {at})")
    if graph.is_inside(_root(here)) and not here.encloses(graph):
        return (f"the {value.describe()} was computed inside a loop or Cond and is used outside of it; "
                f"get it out with loop.stack(...), loop.last(...), a loop state or the Cond result (at {at})")
    return (f"the {value.describe()} belongs to another traced program; values cannot be shared between programs "
            f"(at {at})")


def _root(graph):
    while graph.parent is not None:
        graph = graph.parent
    return graph


def emit(op: str, inputs: tuple[Tensor, ...], kernel: Callable, dims: Sequence[Dim], dtype: torch.dtype,
         *, sparse_dim: Dim | None = None, attrs: dict | None = None, **fields) -> Tensor:
    """Add a node with one output to the current graph and return that output (`fields`: typed
    :class:`looplift.graph.Node` fields, e.g. ``random=True``)."""
    _check_distinct(op, dims)
    ctx = _trace.current(f"{op} over {dims_str(dims)}")
    node = ctx.graph.add(op, inputs, kernel, [(tuple(dims), dtype, sparse_dim)], attrs, **fields)
    _trace.record(ctx, node)
    return node.outputs[0]


def emit_many(op: str, inputs: tuple[Tensor, ...], kernel: Callable,
              outputs: Sequence[tuple[Sequence[Dim], torch.dtype, Dim | None]],
              *, attrs: dict | None = None, **fields) -> list[Tensor]:
    """Add a node with several outputs (the kernel returns a tuple)."""
    for d, _, _ in outputs:
        _check_distinct(op, d)
    ctx = _trace.current(f"{op} into {', '.join(dims_str(d) for d, _, _ in outputs)}")
    node = ctx.graph.add(op, inputs, kernel, [(tuple(d), t, s) for d, t, s in outputs], attrs, **fields)
    _trace.record(ctx, node)
    return node.outputs


def _check_distinct(op: str, dims) -> None:
    if len(set(dims)) != len(dims):
        raise DimError(f"{op}: the result would have a dim twice: {dims_str(dims)}")


def broadcast_dims(op: str, *operands: Tensor | Sequence[Dim]) -> tuple[Dim, ...]:
    """The union of the dims of `operands` (tensors or dim sequences), in first-seen order.

    Two distinct dims with the same name are an error: they are almost always
    one axis created twice by mistake.
    """
    dim_seqs = [t.dims if isinstance(t, Tensor) else tuple(t) for t in operands]
    out: list[Dim] = []
    for dims in dim_seqs:
        for d in dims:
            if d not in out:
                out.append(d)
    by_name: dict[str, Dim] = {}
    for d in out:
        other = by_name.setdefault(d.name, d)
        if other is not d:
            owners = [t.describe() if isinstance(t, Tensor) else dims_str(dims)
                      for t, dims in zip(operands, dim_seqs) if d in dims or other in dims]
            raise DimMismatchError(
                f"{op}: two different dims are both named {d.name!r} ({other!r} and {d!r}); dims are "
                f"matched by identity, so they would broadcast against each other. Use the same Dim "
                f"object, Dim.declare_same_as, or different names. Operands: {'; '.join(owners)}")
    return tuple(out)


def _dtype_sample(t: Tensor):
    if t.node is not None and t.node.op == Op.CONSTANT:
        return t.node.value
    return torch.empty((1,) if t.dims else (), dtype=t.dtype)


def result_dtype(a: Tensor, b: Tensor) -> torch.dtype:
    """The dtype torch gives a binary op of `a` and `b` at run time.

    Python-number constants and tensors without dims promote like torch scalars.
    """
    sa, sb = _dtype_sample(a), _dtype_sample(b)
    if not isinstance(sa, torch.Tensor) and not isinstance(sb, torch.Tensor):
        return torch.promote_types(a.dtype, b.dtype)   # two constants: their dtypes (floats: the program's)
    return torch.result_type(sa, sb)


_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "int32": torch.int32, "int64": torch.int64, "bool": torch.bool,
           "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16}


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype, or its name (``"int32"``), as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise DTypeError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def require_float(x: Tensor, op: str) -> None:
    if not x.dtype.is_floating_point:
        raise DTypeError(f"{op} needs a floating-point tensor, got the {x.describe()}; "
                         f"use looplift.cast(x, 'float32')")


def require_int(x: Tensor, op: str) -> None:
    if x.dtype.is_floating_point or x.dtype == torch.bool or x.dtype.is_complex:
        raise DTypeError(f"{op} needs an integer tensor of indices, got the {x.describe()}")


# -- masking over dynamic dims -------------------------------------------------------------

def nonfinite_padding(*inputs: Tensor, dims: Sequence[Dim], cleared: Iterable[Dim] = (),
                      renamed: Mapping[Dim, Sequence[Dim]] | None = None) -> tuple[Dim, ...] | None:
    """The ``nonfinite_padding`` of a result over `dims` computed from `inputs` position by position, by an op
    that gives finite numbers for finite ones (not ``exp``, not a division): the dims in whose padding an
    input may be non-finite, but those the op clears (`cleared`: zero or finite there) and those the
    result lacks (the op masks the dims it reduces); `renamed`: an input's dim that is other dims in the
    result. None where an input's is not known."""
    renamed = renamed or {}
    dirty: set[Dim] = set()
    for t in inputs:
        if not (t.dtype.is_floating_point or t.dtype.is_complex):
            continue
        if t.node is None or t.node.nonfinite_padding is None:
            return None
        for d in t.node.nonfinite_padding:
            dirty.update(renamed.get(d, (d,)))
    dirty.difference_update(cleared)
    return tuple(d for d in dims if d in dirty)


def finite_in(x: Tensor, dims: Iterable[Dim]) -> bool:
    """Whether `x` is known to be finite in the padding of the dims `dims` (see ``Node.nonfinite_padding``)."""
    return x.node is not None and x.node.nonfinite_padding is not None and not set(dims) & set(x.node.nonfinite_padding)


def dims_to_mask(x: Tensor, reduced: Iterable[Dim]) -> tuple[Dim, ...]:
    """Dynamic dims of `x` whose padding would leak into a reduction over `reduced`.

    That is every dynamic dim being reduced, and every dynamic dim whose lengths
    vary along a reduced dim (summing over the batch mixes entries of different length).
    """
    reduced = set(reduced)
    return tuple(d for d in x.dims if d.is_dynamic and (d in reduced or reduced.intersection(_trace.length_dims(d))))


def masker(dims: tuple[Dim, ...], masked: tuple[Dim, ...], fill) -> Callable:
    """A run-time function replacing the padding of the `masked` dims of a raw tensor over `dims` by `fill`."""
    if not masked:
        return lambda env, raw: raw

    def apply(env, raw):
        return raw.masked_fill(env.padding(masked, dims), fill)

    return apply


def neutral(dtype: torch.dtype, kind: str):
    """The neutral element of a reduction for a dtype (what padding is replaced by)."""
    if kind == "sum":
        return False if dtype == torch.bool else 0
    big = float("inf") if dtype.is_floating_point else (True if dtype == torch.bool else torch.iinfo(dtype).max)
    if kind == "min":
        return big
    if dtype == torch.bool:
        return False
    return -big if dtype.is_floating_point else torch.iinfo(dtype).min


def indexes_with(index: Tensor, vocab: Dim, op: str) -> None:
    """`op` indexes the static dim `vocab` with the integer tensor `index`, which it would clamp into range: a
    constant index must lie in it; a program input without a sparse_dim is checked at every call, as one with
    ``sparse_dim=vocab`` is (see looplift.program)."""
    node = index.node
    vocab = vocab.canonical()
    if node is None or not vocab.is_static:
        return
    if node.op == Op.CONSTANT and not 0 <= node.value < vocab.size:
        raise DimError(f"{op}: the index {node.value} is not in {vocab.name!r} (0..{vocab.size - 1})")
    if node.op == Op.INPUT and index.sparse_dim is None:
        _trace.current().label_inputs.setdefault(node.attrs["index"], (vocab, op))
