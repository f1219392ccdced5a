"""Indexing ops: ``gather`` (and ``embedding``, a gather from a table) and ``one_hot``.

Indices are clamped into range before use: padding positions of an index
tensor hold arbitrary values, and must not crash the valid positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import trace as _trace
from .._align import aligner, broadcast_shapes
from ..dims import Dim
from ..errors import DimError, DTypeError
from ..tensor import Tensor
from ._core import as_tensor, broadcast_dims, check_has, emit, indexes_with, nonfinite_padding, require_int, to_dtype

__all__ = ["gather", "embedding", "one_hot"]


def gather(x, *, index, axis: Dim) -> Tensor:
    """``x[..., index, ...]`` along `axis`: the dim `axis` is replaced by the dims of `index`.

    Dims that `x` and `index` share are batch dims (each entry picks from its
    own row). `index` must be an integer tensor; it is clamped into
    ``[0, size(axis) - 1]``.
    """
    x, index = as_tensor(x), as_tensor(index)
    if axis not in (d for nxt, (beam, _) in _trace.current().pruned.items() for d in (beam, nxt)):
        x, index = meet_beams(x, index)
    check_has(x, (axis,), "gather")
    require_int(index, "gather")
    axis = axis.canonical()
    if axis in index.dims:
        raise DimError(f"gather: the index {index.describe()} must not have the gathered dim {axis.name!r}")
    indexes_with(index, axis, "gather")
    rest = tuple(d for d in x.dims if d is not axis)
    broadcast_dims("gather", rest, index.dims)   # (two different dims named alike: an error)
    # Raw layout for torch.gather: x as (shared, axis, x only), the index as (shared, index only, x only);
    # x is never expanded over the index's own dims (its gradient would be as large as the result times axis)
    shared = tuple(d for d in rest if d in index.dims)
    x_only = tuple(d for d in rest if d not in index.dims)
    index_only = tuple(d for d in index.dims if d not in rest)
    out_dims = shared + index_only + x_only
    x_perm = tuple(x.dims.index(d) for d in shared + (axis,) + x_only)
    i_al = aligner(index.dims, shared + index_only)
    n_shared, n_x = len(shared), len(x_only)
    sparse = x.sparse_dim

    keep_order = x_perm == tuple(range(len(x_perm)))
    # x's own dims last where it is stored (a time-major encoder gathered per batch entry): its rows are picked
    # in place, by their offsets, where permuting it first would copy all of it at every call
    in_place = not keep_order and n_x > 0 and x.dims[len(x.dims) - n_x:] == x_only
    lead_pos, axis_pos = tuple(x.dims.index(d) for d in shared), x.dims.index(axis)

    def kernel(env, v, i):
        if not isinstance(i, torch.Tensor):
            i = torch.as_tensor(i, device=v.device)
        i = i_al(i)
        if in_place and v.is_contiguous() and v.shape[axis_pos] > 0:
            return _rows_in_place(v, i, lead_pos, axis_pos, n_x)
        if not keep_order:
            v = v.permute(x_perm)
        lead = tuple(broadcast_shapes(v.shape[:n_shared], i.shape[:n_shared]))   # (a size-1 raw: broadcast)
        if tuple(v.shape[:n_shared]) != lead:
            v = v.expand(*lead, *v.shape[n_shared:])
        picked = tuple(i.shape[n_shared:])
        out_shape = (*lead, *picked, *v.shape[n_shared + 1:])
        if v.shape[n_shared] == 0:  # an empty axis (all its entries of length 0): nothing to pick, only padding
            return v.new_zeros(out_shape)
        size = v.shape[n_shared]
        i = i.clamp(0, size - 1).long()   # (a new tensor: the flat index below is added into it)
        if tuple(i.shape) != lead + picked:
            i = i.expand(lead + picked)
        if not n_x:
            # one value per pick (a label's log-probability): torch.gather as it is, the index never expanded
            return torch.gather(v, n_shared, i.reshape(*lead, math.prod(picked))).reshape(out_shape)
        if v.stride()[:n_shared] == () or 0 not in v.stride()[:n_shared]:
            # rows of x flattened with the shared dims (one index_select: a row per pick, not an element; far
            # faster than torch.gather with the index expanded over x's own dims)
            if n_shared:
                offsets = _row_offsets(lead, len(picked), size, i.device)
                i = i.add_(offsets) if i.shape == lead + picked and i.is_contiguous() else i + offsets
            rows = v.reshape(-1, *v.shape[n_shared + 1:]) if n_shared else v
            return rows.index_select(0, i.reshape(-1)).reshape(out_shape)
        k = math.prod(picked)
        i = i.reshape(*lead, k, *[1] * n_x).expand(*lead, k, *v.shape[n_shared + 1:])
        return torch.gather(v, n_shared, i).reshape(out_shape)

    kernel.fresh = True   # (a new tensor: see looplift.graph.Kernel)
    # (the index may pick from the padding of `axis`: what may be non-finite there, anywhere in the result)
    known = x.node is not None and x.node.nonfinite_padding is not None and axis not in x.node.nonfinite_padding
    finite = nonfinite_padding(x, dims=out_dims) if known else None
    return emit("gather", (x, index), kernel, out_dims, x.dtype, sparse_dim=sparse, attrs={"axis": axis.name},
                nonfinite_padding=finite)


#: (lead shape, picked dims, axis size, device) -> the offset of each shared entry's first row (see _row_offsets)
_OFFSETS: dict = {}


def _row_offsets(lead: tuple[int, ...], n_picked: int, size: int, device) -> torch.Tensor:
    """``arange(prod(lead)) * size`` shaped ``(*lead, 1, ...)`` (`n_picked` ones): where each entry of the
    shared dims starts among the rows of a value flattened with them. Made once per shape (a search's states are
    all gathered at each step by the same backpointers, over the same dims); never written to."""
    key = (lead, n_picked, size, device)
    offsets = _OFFSETS.get(key)
    if offsets is None:
        if len(_OFFSETS) >= 256:
            _OFFSETS.clear()
        offsets = torch.arange(math.prod(lead), device=device).mul_(size).reshape(*lead, *[1] * n_picked)
        _OFFSETS[key] = offsets
    return offsets


def _rows_in_place(v: torch.Tensor, i: torch.Tensor, lead_pos: tuple[int, ...], axis_pos: int, n_x: int):
    """``gather``'s result from a contiguous `v` whose own dims are its last `n_x`: each pick is a row of `v`
    flattened in its stored order, at the offset of its shared dims' entries (`lead_pos`) and of its index
    (along `axis_pos`). `i` is laid out (shared..., picked...)."""
    n_shared = len(lead_pos)
    own = v.shape[v.dim() - n_x:]
    row = math.prod(own)
    lead = tuple(broadcast_shapes([v.shape[p] for p in lead_pos], i.shape[:n_shared]))
    picked = tuple(i.shape[n_shared:])
    offset = i.clamp(0, v.shape[axis_pos] - 1).long() * (v.stride(axis_pos) // row)
    for k, p in enumerate(lead_pos):
        if v.shape[p] != 1:   # (size 1: the same row for every entry of the dim)
            entries = torch.arange(lead[k], device=i.device) * (v.stride(p) // row)
            offset = offset + entries.view(*[1] * k, lead[k], *[1] * (n_shared - k - 1 + len(picked)))
    offset = offset.expand(*lead, *picked)
    return v.view(-1, *own).index_select(0, offset.reshape(-1)).view(*lead, *picked, *own)


def embedding(table, index) -> Tensor:
    """Rows of `table` picked by the label tensor `index` (its ``sparse_dim`` is the table's vocab dim)."""
    table, index = as_tensor(table), as_tensor(index)
    require_int(index, "embedding")
    if index.sparse_dim is None:
        raise DTypeError(f"embedding needs label indices with a sparse_dim (the vocabulary), got the "
                         f"{index.describe()}")
    check_has(table, (index.sparse_dim,), "embedding", "vocabulary dim")
    vocab = index.sparse_dim
    feat = tuple(d for d in table.dims if d is not vocab)
    if table.dims == (vocab,) + feat and len(feat) == 1 and not any(d in index.dims for d in feat):
        out_dims = index.dims + feat

        def kernel(env, w, i):
            if not isinstance(i, torch.Tensor):
                i = torch.as_tensor(i, device=w.device)
            return F.embedding(i.clamp(0, w.shape[0] - 1), w)

        kernel.fresh = True   # (a new tensor: see looplift.graph.Kernel)
        return emit("embedding", (table, index), kernel, out_dims, table.dtype, attrs={"vocab": vocab.name},
                    nonfinite_padding=nonfinite_padding(table, dims=out_dims))
    return gather(table, index=index, axis=vocab)


def one_hot(index, *, dtype: str | torch.dtype | None = None) -> Tensor:
    """A one-hot tensor over the label tensor's ``sparse_dim`` (float by default)."""
    index = as_tensor(index)
    require_int(index, "one_hot")
    if index.sparse_dim is None:
        raise DTypeError(f"one_hot needs label indices with a sparse_dim, got the {index.describe()}")
    vocab = index.sparse_dim
    dt = to_dtype(dtype) if dtype is not None else _trace.current().float_dtype
    n = vocab.size
    if n is None:
        raise DTypeError(f"one_hot needs a static sparse_dim, got {vocab!r}")

    def kernel(env, i):
        if not isinstance(i, torch.Tensor):
            i = torch.as_tensor(i, device=env.device)
        return F.one_hot(i.long().clamp(0, n - 1), n).to(dt)

    return emit("one_hot", (index,), kernel, index.dims + (vocab,), dt, attrs={"vocab": vocab.name})



def meet_beams(*operands: Tensor) -> tuple[Tensor, ...]:
    """`operands` with every tensor over a search's beam gathered onto the pruned beam where another operand
    has the pruned beam: a value of the previous hypotheses meeting one of the hypotheses they became (the
    search step being traced is in ``TraceContext.pruned``)."""
    ctx = _trace.tracing()
    if ctx is None or not ctx.pruned or len(operands) < 2:
        return operands
    out = list(operands)
    for nxt, (beam, src) in list(ctx.pruned.items()):
        if any(nxt in t.dims for t in operands):
            for k, t in enumerate(operands):
                if beam in t.dims and nxt not in t.dims:
                    out[k] = _gathered_by_sources(ctx, t, src, beam)
    return tuple(out)


def _gathered_by_sources(ctx, t: Tensor, src: Tensor, beam: Dim) -> Tensor:
    """``gather(t, index=src, axis=beam)`` as an op call of its own, which the op call being traced (if any)
    records as used in place of `t`: replayed after the loop on stacked sequences, outside the step that
    knows the pruned beam, the call then gets the gathered value (its sources followed), as in the loop."""
    call = ctx.call
    ctx.call = None
    try:
        with ctx.acting_for("the previous hypotheses' values taken onto the pruned ones"):
            gathered = gather(t, index=src, axis=beam)
    finally:
        ctx.call = call
    if call is not None:
        call.substitutions[id(t)] = gathered
    return gathered

for _name in __all__:  # every public op records its calls, so passes can replay them
    globals()[_name] = _trace.replayable(globals()[_name])
