"""Ops that change dims: expand, concat, split, slice, pad, split/merge dims,
and creating tensors over dims (full, zeros, ones, range_over_dim, length).

Along a dynamic dim, concatenation and padding keep the valid frames packed at
the front: ``concat`` of a length-3 and a length-2 sequence is a length-5
sequence whose frames are the 3 then the 2, whatever the padding in between.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from .. import rules as _rules
from .. import trace as _trace
from .._align import aligner, broadcast_shapes
from ..dims import Dim
from ..errors import DimError, DTypeError
from ..tensor import Tensor
from ._core import (
    as_tensor,
    broadcast_dims,
    check_has,
    dim_list,
    dims_str,
    emit,
    emit_many,
    masker,
    nonfinite_padding,
    to_dtype,
)

__all__ = ["expand", "concat", "split", "slice", "pad", "split_dims", "merge_dims", "full", "zeros", "ones",
           "range_over_dim", "length", "replace_dim", "shift_right"]


def expand_for_masks(x: Tensor, masked: Iterable[Dim]) -> Tensor:
    """Broadcast `x` to the dims its masks need (the lengths dims of the masked dims)."""
    missing: list[Dim] = []
    for d in masked:
        for ld in _trace.length_dims(d):
            if ld not in x.dims and ld not in missing:
                missing.append(ld)
    if not missing:
        return x
    return expand(x, missing)


def _sizes(env, dims: Sequence[Dim]) -> list[int]:
    return [env.size(d) for d in dims]


def expand(x, dims: Sequence[Dim]) -> Tensor:
    """`x` broadcast to have the extra `dims` as well (values repeated along them)."""
    x = as_tensor(x)
    new = tuple(d for d in dim_list(dims, "dims") if d not in x.dims)
    if not new:
        return x
    out_dims = x.dims + new
    al = aligner(x.dims, out_dims)
    n = len(x.dims)
    dtype = x.dtype

    def kernel(env, v):
        if not isinstance(v, torch.Tensor):
            v = torch.as_tensor(v, dtype=dtype, device=env.device)
        v = al(v)
        return v.expand(*v.shape[:n], *_sizes(env, new))

    return emit("expand", (x,), kernel, out_dims, x.dtype, sparse_dim=x.sparse_dim,
                attrs={"dims": [d.name for d in new]}, nonfinite_padding=nonfinite_padding(x, dims=out_dims))


def to_layout(x, dims: Sequence[Dim]) -> Tensor:
    """`x` broadcast to `dims` and stored in that order (after any dims of `x` not in `dims`, kept in front).

    For values whose storage order matters: loop states, whose raw value must
    have the same layout at every step. (Run over a whole sequence, the
    sequence's dim is such an extra dim in front.)
    """
    x = expand(x, [d for d in dims if d not in x.dims])
    dims = tuple(d.canonical() for d in dims)
    layout = tuple(d for d in x.dims if d not in dims) + dims
    if x.dims == layout:
        return x
    perm = tuple(x.dims.index(d) for d in layout)
    return emit("transpose", (x,), lambda env, v: v.permute(perm), layout, x.dtype, sparse_dim=x.sparse_dim,
                attrs={"dims": [d.name for d in layout]}, nonfinite_padding=nonfinite_padding(x, dims=layout))


def replace_dim(x, axis: Dim, new: Dim) -> Tensor:
    """The same values with the dim `axis` renamed to `new` (which must have the same size)."""
    x = as_tensor(x)
    check_has(x, (axis,), "replace_dim")
    if new.is_static and axis.is_static and new.size != axis.size:
        raise DimError(f"replace_dim: {axis!r} and {new!r} differ in size")
    if new.is_dynamic != axis.is_dynamic:
        raise DimError(f"replace_dim: {axis!r} and {new!r} are of different kinds")
    dims = tuple(new if d is axis.canonical() else d for d in x.dims)
    broadcast_dims("replace_dim", dims)
    return emit("replace_dim", (x,), lambda env, v: v, dims, x.dtype, sparse_dim=x.sparse_dim,
                attrs={"axis": axis.name, "new": new.name},
                nonfinite_padding=nonfinite_padding(x, dims=dims, renamed={axis: (new,)}))


def concat(*xs, axis: Dim | Sequence[Dim] | None = None, out_dim: Dim | None = None) -> Tensor:
    """Concatenate tensors along a dim each.

    Args:
        xs: the tensors.
        axis: one Dim all tensors share, one Dim per tensor, or None: then each
            tensor's dim is the one that is not in all the others (there must be
            exactly one), e.g. ``concat(emb, ctx)`` over their feature dims.
        out_dim: the result's dim; by default the sum dim ``d1 + d2 + ...``
            (the same object wherever it is created, e.g. in a module's
            ``__init__``).
    """
    if len(xs) == 1 and isinstance(xs[0], (list, tuple)):
        xs = tuple(xs[0])
    xs = tuple(as_tensor(x) for x in xs)
    if len(xs) < 1:
        raise DimError("concat needs at least one tensor")
    if axis is None:
        axes = []
        for i, x in enumerate(xs):
            own = [d for d in x.dims if not all(d in y.dims for j, y in enumerate(xs) if j != i)]
            if len(own) != 1 or len(xs) == 1:
                raise DimError(
                    f"concat: cannot tell which dim of the {x.describe()} to concatenate along "
                    f"(dims not shared by all inputs: {dims_str(own)}); pass axis=...")
            axes.append(own[0])
    elif isinstance(axis, Dim):
        axes = [axis.canonical()] * len(xs)
    else:
        axes = [d.canonical() for d in axis]
        if len(axes) != len(xs):
            raise DimError(f"concat: got {len(xs)} tensors but {len(axes)} axes")
    for x, d in zip(xs, axes):
        check_has(x, (d,), "concat")
    result = out_dim.canonical() if out_dim is not None else sum(axes[1:], axes[0]) if len(axes) > 1 else axes[0]
    _trace.resolve_call(concat, axis=list(axes), out_dim=result)
    if len(xs) == 1:
        return replace_dim(xs[0], axes[0], result) if result is not axes[0] else xs[0]
    if all(d.is_static for d in axes) and result.is_static and result.size != sum(d.size for d in axes):
        raise DimError(f"concat: out_dim {result!r} does not have size {sum(d.size for d in axes)}, the sum of the "
                       f"axes {' + '.join(f'{d.name} ({d.size})' for d in axes)}")
    common = broadcast_dims("concat", *(tuple(e for e in x.dims if e is not d) for x, d in zip(xs, axes)))
    out_dims = common + (result,)
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    aligners = [aligner(tuple(e if e is not d else result for e in x.dims), out_dims) for x, d in zip(xs, axes)]
    pos = len(out_dims) - 1
    n_common = len(common)
    dynamic = [d for d in axes if d.is_dynamic]

    def gathered(env, parts):
        lead = parts[0].shape[:n_common]
        if all(p.shape[:n_common] == lead and p.dtype == dtype for p in parts):
            return torch.cat(parts, dim=pos)   # (nothing to broadcast or cast)
        shape = list(broadcast_shapes(*(p.shape[:n_common] for p in parts)))
        parts = [p.expand(*shape, p.shape[-1]).to(dtype) for p in parts]
        return torch.cat(parts, dim=pos)

    if not dynamic:
        def kernel(env, *vs):
            return gathered(env, [al(v) for al, v in zip(aligners, vs)])
    else:
        length_dims: list[Dim] = []
        for d in dynamic:
            length_dims += [e for e in _trace.length_dims(d) if e not in length_dims]
        missing = [e for e in length_dims if e not in common]
        if missing:
            raise DimError(f"concat along dynamic dims needs the dims their lengths run over "
                           f"({dims_str(missing)}) in every input")
        len_al = aligner(length_dims, out_dims[:-1])

        def kernel(env, *vs):
            parts = [al(v) for al, v in zip(aligners, vs)]
            cat = gathered(env, parts)
            # For each output position p: which part holds frame p, and where in `cat`.
            lens = [len_al(_lengths_over(env, d, length_dims)) for d in axes]
            padded = [p.shape[-1] for p in parts]
            out_len = cat.shape[-1]
            p = torch.arange(out_len, device=cat.device)
            index = torch.zeros_like(p).expand(*broadcast_shapes(*(x.shape for x in lens)), out_len).clone()
            start_valid = torch.zeros_like(lens[0])
            start_padded = 0
            for n, size in zip(lens, padded):
                inside = (p >= start_valid[..., None]) & (p < (start_valid + n)[..., None])
                index = torch.where(inside, p - start_valid[..., None] + start_padded, index)
                start_valid = start_valid + n
                start_padded += size
            index = index.expand(*cat.shape[:-1], out_len)
            return torch.gather(cat, pos, index)

    # Labels stay labels (e.g. a BOS label prepended to a label sequence).
    sparse = xs[0].sparse_dim if all(x.sparse_dim is xs[0].sparse_dim for x in xs) else None
    # (along a dynamic dim, frames move: what may be non-finite in the padding of one is not known after it)
    finite = None if any(d.is_dynamic for d in axes) else nonfinite_padding(*xs, dims=out_dims)
    return emit("concat", xs, kernel, out_dims, dtype, sparse_dim=sparse,
                attrs={"axis": [d.name for d in axes], "out_dim": result.name}, nonfinite_padding=finite)


def _lengths_over(env, d: Dim, dims: Sequence[Dim]):
    """Lengths of `d` (or its size, for a static dim) as a raw tensor over `dims`."""
    if d.is_dynamic:
        return aligner(env.length_dims(d), dims)(env.lengths(d))
    return torch.full([1] * len(dims), env.size(d), dtype=torch.int64, device=env.device)


def split(x, axis: Dim, parts: Sequence[Dim] | None = None) -> tuple[Tensor, ...]:
    """Split `x` along the static dim `axis` into pieces over the dims `parts`.

    Without `parts`, `axis` must be a concatenation dim ``a + b + ...`` and is
    split into its operands.
    """
    x = as_tensor(x)
    check_has(x, (axis,), "split")
    axis = axis.canonical()
    if parts is None:
        if axis.origin is None or axis.origin[0] != "concat":
            raise DimError(f"split: {axis!r} is not a concatenation of dims; pass parts=[...]")
        parts = axis.origin[1]
    parts = tuple(d.canonical() for d in parts)
    if not axis.is_static or not all(p.is_static for p in parts):
        raise DimError(f"split works along static dims only; {dims_str((axis, *parts))}")
    if sum(p.size for p in parts) != axis.size:
        raise DimError(f"split: the parts {dims_str(parts)} have total size {sum(p.size for p in parts)}, "
                       f"but {axis!r} has size {axis.size}")
    pos = x.dims.index(axis)
    sizes = [p.size for p in parts]
    outputs = [(tuple(p if d is axis else d for d in x.dims), x.dtype, x.sparse_dim) for p in parts]
    return tuple(emit_many("split", (x,), lambda env, v: tuple(torch.split(v, sizes, dim=pos)), outputs,
                           attrs={"axis": axis.name, "parts": [p.name for p in parts]},
                           nonfinite_padding=nonfinite_padding(x, dims=x.dims)))   # (a static axis: no padding)


def slice(x, axis: Dim, start: int = 0, end: int | None = None) -> Tensor:  # noqa: A001
    """Frames ``start:end`` of `x` along `axis`.

    Along a static dim, Python slice semantics (negative values count from the
    end). Along a dynamic dim, ``start >= 0`` and ``end`` is None or negative
    (counting from each sequence's own end); the result dim is derived from
    `axis` (``T - k``).
    """
    x = as_tensor(x)
    check_has(x, (axis,), "slice")
    axis = axis.canonical()
    pos = x.dims.index(axis)
    if axis.is_static:
        lo, hi, _ = builtins_slice(start, end).indices(axis.size)
        hi = max(hi, lo)
        new = axis.derived(("slice", lo, hi), lambda: _static_slice_dim(axis, lo, hi))
        index = (builtins_slice(None),) * pos + (builtins_slice(lo, hi),)
        return emit("slice", (x,), lambda env, v: v[index], _swap(x.dims, axis, new), x.dtype,
                    sparse_dim=x.sparse_dim, attrs={"axis": axis.name, "start": lo, "end": hi},
                    nonfinite_padding=nonfinite_padding(x, dims=x.dims))
    if start < 0 or (end is not None and end >= 0):
        raise DimError(f"slice along the dynamic dim {axis.name!r} takes start >= 0 and end None or < 0 "
                       f"(per sequence from its end), got start={start}, end={end}")
    cut = start + (-end if end is not None else 0)
    new = axis - cut
    index = (builtins_slice(None),) * pos + (builtins_slice(start, None),)

    def kernel(env, v):
        v = v[index]
        size = env.size(new)
        if v.shape[pos] > size:
            v = v.narrow(pos, 0, size)
        return v

    return emit("slice", (x,), kernel, _swap(x.dims, axis, new), x.dtype, sparse_dim=x.sparse_dim,
                attrs={"axis": axis.name, "start": start, "end": end})


builtins_slice = __builtins__["slice"] if isinstance(__builtins__, dict) else __builtins__.slice


def _static_slice_dim(axis: Dim, lo: int, hi: int) -> Dim:
    d = Dim(f"{axis.name}[{lo}:{hi}]", hi - lo)
    d.origin = ("slice", (axis, lo, hi))
    return d


def _swap(dims, old, new):
    return tuple(new if d is old else d for d in dims)


def pad(x, axis: Dim, left: int = 0, right: int = 0, value: float = 0.0) -> Tensor:
    """`x` with `left` frames of `value` before and `right` after, along `axis`.

    Along a dynamic dim the right padding follows each sequence's own last
    frame. The result dim is ``axis + (left + right)``.
    """
    x = as_tensor(x)
    check_has(x, (axis,), "pad")
    axis = axis.canonical()
    if left < 0 or right < 0:
        raise DimError(f"pad: left and right must be >= 0 (frames added to {axis.name!r}), got {left}, {right}")
    new = axis + (left + right)
    pos = x.dims.index(axis)
    after = len(x.dims) - 1 - pos
    dims = _swap(x.dims, axis, new)

    def padded(v):
        return F.pad(v.movedim(pos, -1), (left, right), value=value).movedim(-1, pos)

    if not axis.is_dynamic or right == 0:
        return emit("pad", (x,), lambda env, v: padded(v), dims, x.dtype, sparse_dim=x.sparse_dim,
                    attrs={"axis": axis.name, "left": left, "right": right})
    for ld in _trace.length_dims(axis):
        check_has(x, (ld,), "pad", "lengths dim")
    len_al = aligner(_trace.length_dims(axis), tuple(d for d in dims if d is not new))

    def kernel(env, v):
        out = padded(v)
        n = len_al(env.lengths(axis)).unsqueeze(pos)
        p = torch.arange(out.shape[pos], device=out.device).view(-1, *([1] * after))
        tail = (p >= n + left) & (p < n + left + right)
        return out.masked_fill(tail, value)

    return emit("pad", (x,), kernel, dims, x.dtype, sparse_dim=x.sparse_dim,
                attrs={"axis": axis.name, "left": left, "right": right})


def split_dims(x, axis: Dim, dims: Sequence[Dim | None]) -> Tensor:
    """Split the dim `axis` into several dims (outer first), as a reshape.

    All parts but the first must be static. The first may be None: it is then
    derived (``axis.ceildiv(inner size)``). Along a dynamic `axis` the first
    part is dynamic and the last, partial frame is completed with zeros.
    """
    x = as_tensor(x)
    check_has(x, (axis,), "split_dims")
    axis = axis.canonical()
    x = expand_for_masks(x, (axis,) if axis.is_dynamic else ())  # the zeros completing the last frame
    inner = [d.canonical() for d in dims[1:]]
    if not all(isinstance(d, Dim) and d.is_static for d in inner):
        raise DimError(f"split_dims: all parts after the first must be static dims, got {list(dims)}")
    k = math.prod(d.size for d in inner)
    outer = dims[0].canonical() if dims[0] is not None else axis.ceildiv(k)
    if axis.is_static:
        if outer.size is None or outer.size * k != axis.size:
            raise DimError(f"split_dims: {axis!r} cannot be split into {dims_str([outer, *inner])} "
                           f"(sizes do not multiply to {axis.size})")
    elif outer is not axis.ceildiv(k):
        raise DimError(f"split_dims of the dynamic {axis!r}: the first part must be None or "
                       f"{axis.name}.ceildiv({k})")
    pos = x.dims.index(axis)
    out_dims = x.dims[:pos] + (outer, *inner) + x.dims[pos + 1:]
    inner_sizes = [d.size for d in inner]
    zero_pad = masker(x.dims, (axis,) if axis.is_dynamic else (), 0)

    def kernel(env, v):
        v = zero_pad(env, v)
        size = v.shape[pos]
        n_outer = -(-size // k)
        if n_outer * k != size:
            v = F.pad(v.movedim(pos, -1), (0, n_outer * k - size)).movedim(-1, pos)
        return v.reshape(*v.shape[:pos], n_outer, *inner_sizes, *v.shape[pos + 1:])

    return emit("split_dims", (x,), kernel, out_dims, x.dtype, sparse_dim=x.sparse_dim,
                attrs={"axis": axis.name, "dims": [d.name for d in (outer, *inner)]},
                nonfinite_padding=nonfinite_padding(x, dims=out_dims, cleared=(axis,)))   # (its padding: zeros)


def merge_dims(x, dims: Sequence[Dim], out_dim: Dim | None = None) -> Tensor:
    """Merge `dims` (outer first) into one dim, as a reshape.

    All but the first must be static (or batch-like); the result is
    ``dims[0] * dims[1] * ...`` unless `out_dim` is given.
    """
    x = as_tensor(x)
    dims = dim_list(dims, "dims")
    check_has(x, dims, "merge_dims")
    x = expand_for_masks(x, dims[:1] if dims[0].is_dynamic else ())  # the padding to zero differs per batch entry
    if any(d.is_dynamic for d in dims[1:]):
        raise DimError(f"merge_dims: only the first (outer) dim may be dynamic, got {dims_str(dims)}")
    result = out_dim.canonical() if out_dim is not None else math.prod(dims[1:], start=dims[0])
    if all(d.is_static for d in dims) and result.size != math.prod(d.size for d in dims):
        raise DimError(f"merge_dims: out_dim {result!r} does not have size {math.prod(d.size for d in dims)}")
    rest = tuple(d for d in x.dims if d not in dims)
    out_dims = rest + (result,)
    perm = tuple(x.dims.index(d) for d in rest + dims)
    n = len(rest)
    zero_pad = masker(x.dims, (dims[0],) if dims[0].is_dynamic else (), 0)

    def kernel(env, v):
        v = zero_pad(env, v).permute(perm)
        return v.reshape(*v.shape[:n], -1)

    return emit("merge_dims", (x,), kernel, out_dims, x.dtype, sparse_dim=x.sparse_dim,
                attrs={"dims": [d.name for d in dims], "out_dim": result.name},
                nonfinite_padding=nonfinite_padding(x, dims=out_dims, cleared=dims))   # (its padding: zeros)


def full(value, dims: Sequence[Dim] = (), *, dtype: str | torch.dtype | None = None,
         sparse_dim: Dim | None = None) -> Tensor:
    """A tensor over `dims` filled with `value`.

    The dtype defaults to bool, int64 or the program's float dtype (that of
    its model's parameters, else of its first float input), by the type of
    `value`; ``sparse_dim`` marks label indices (e.g. a BOS label).
    """
    dims = dim_list(dims, "dims")
    if dtype is None:
        if isinstance(value, bool):
            dt = torch.bool
        elif isinstance(value, int):
            dt = torch.int64
        else:
            dt = _trace.current(f"full over {dims_str(dims)}").float_dtype
    else:
        dt = to_dtype(dtype)
    if sparse_dim is not None and (dt.is_floating_point or dt == torch.bool):
        raise DTypeError(f"full: sparse_dim needs an integer dtype, got {dt}")
    if sparse_dim is not None and sparse_dim.is_static and not 0 <= value < sparse_dim.size:
        raise DimError(f"full: the label {value} is not in its sparse_dim {sparse_dim.name!r} "
                       f"(0..{sparse_dim.size - 1})")
    return emit("full", (), lambda env: torch.full(_sizes(env, dims), value, dtype=dt, device=env.device),
                dims, dt, sparse_dim=sparse_dim, attrs={"value": value},
                nonfinite_padding=() if math.isfinite(value) else None)


def zeros(dims: Sequence[Dim] = (), *, dtype: str | torch.dtype | None = None) -> Tensor:
    """A tensor of zeros over `dims` (float by default)."""
    return full(0.0 if dtype is None else 0, dims, dtype=dtype)


def ones(dims: Sequence[Dim] = (), *, dtype: str | torch.dtype | None = None) -> Tensor:
    """A tensor of ones over `dims` (float by default)."""
    return full(1.0 if dtype is None else 1, dims, dtype=dtype)


def shift_right(x, *, axis: Dim, initial) -> Tensor:
    """`x` delayed by one frame along `axis`: frame 0 is `initial`, frame t is frame t - 1 of `x`.

    The dim stays `axis`. This is what "the value of the previous step" is over
    a whole sequence; `initial` has the dims of a frame (or fewer: broadcast).
    """
    x, initial = as_tensor(x), as_tensor(initial)
    check_has(x, (axis,), "shift_right")
    axis = axis.canonical()
    if axis in initial.dims:
        raise DimError(f"shift_right: the initial value {initial.describe()} must not have {axis.name!r}")
    dims = broadcast_dims("shift_right", x.dims, initial.dims)
    x = expand(x, [d for d in dims if d not in x.dims])
    pos = x.dims.index(axis)
    init_al = aligner(initial.dims, tuple(d for d in x.dims if d is not axis))
    dtype = x.dtype

    def kernel(env, v, i):
        shape = list(v.shape)
        shape[pos] = 1
        i = torch.as_tensor(i, dtype=dtype, device=v.device)
        first = (init_al(i).unsqueeze(pos) if i.dim() else i).expand(shape)   # (a 0-d initial broadcasts as it is)
        return torch.cat([first, v.narrow(pos, 0, max(v.shape[pos] - 1, 0))], pos).narrow(pos, 0, v.shape[pos])

    return emit("shift_right", (x, initial), kernel, x.dims, x.dtype, sparse_dim=x.sparse_dim,
                attrs={"axis": axis.name}, nonfinite_padding=nonfinite_padding(x, initial, dims=x.dims))


def range_over_dim(axis: Dim, *, dtype: str | torch.dtype = torch.int64) -> Tensor:
    """``0, 1, ..., size - 1`` over `axis`; its ``sparse_dim`` is `axis`."""
    axis = dim_list(axis)[0]
    dt = to_dtype(dtype)
    return emit("range_over_dim", (), lambda env: torch.arange(env.size(axis), dtype=dt, device=env.device),
                (axis,), dt, sparse_dim=axis if not dt.is_floating_point else None, attrs={"axis": axis.name})


def length(axis: Dim) -> Tensor:
    """The length of `axis` per batch entry (int64 over its lengths dims).

    For a static dim, its size; for a batch-like dim, the size of the batch.
    """
    axis = dim_list(axis)[0]
    if axis.is_static:
        size = axis.size
        return emit("length", (), lambda env: size, (), torch.int64, attrs={"axis": axis.name})
    if not axis.is_dynamic:
        return emit("length", (), lambda env: torch.tensor(env.size(axis), device=env.device), (), torch.int64,
                    attrs={"axis": axis.name})
    ldims = _trace.length_dims(axis)

    def kernel(env):
        n = env.lengths(axis)
        return n.expand(*_sizes(env, ldims)) if ldims else n

    return emit("length", (), kernel, ldims, torch.int64, attrs={"axis": axis.name})


for _name in __all__:  # every public op records its calls, so passes can replay them
    globals()[_name] = _trace.replayable(globals()[_name])
to_layout = _trace.replayable(to_layout)
_rules.layout_only(to_layout)
