"""Masking along a dim: ``compress`` (T -> T', the frames where a mask is True) and ``unmask`` (T' -> T).

``T' = T.masked(mask)`` is a dynamic dim derived from ``T`` that carries the
mask: its length per entry is the number of True frames. ``unmask`` fills the
frames of ``T`` from ``T'`` by repeating the last True frame ("left" filling;
`initial` before the first one), which is exactly what a value computed under a
:class:`looplift.MaskedComputation` looks like from outside the block. A ``T'``
tensor meeting a ``T`` tensor in an elementwise op is unmasked automatically.

The cost of work over ``T'`` is proportional to the number of True frames,
not to ``T``: this is how a masked computation moved out of its loop runs.
"""

from __future__ import annotations

import torch

from .. import trace as _trace
from .._align import aligner
from ..dims import Dim
from ..errors import DimError, DTypeError
from ..source import user_source_line
from ..tensor import Tensor
from ._core import as_tensor, broadcast_dims, check_has, emit
from .index import meet_beams

__all__ = ["compress", "unmask"]


def _valid_mask(env, mask_al, m, axis: Dim, layout: tuple[Dim, ...]) -> torch.Tensor:
    """The raw mask over `layout` (its lengths dims, then `axis`), False in the padding of `axis`."""
    m = mask_al(torch.as_tensor(m, device=env.device))
    m = m.expand(*[env.size(d) for d in layout])
    if axis.is_dynamic:
        m = m & env.mask([axis], layout)
    return m


def masked_length_dims(mask: Tensor, axis: Dim) -> tuple[Dim, ...]:
    """The dims the lengths of ``axis.masked(mask)`` run over: the mask's other dims, and those of `axis`'s
    lengths (an entry's frames beyond its length are never kept)."""
    dims = [d for d in mask.dims if d is not axis]
    return tuple(dims + [d for d in _trace.length_dims(axis) if d not in dims])


def compress(x, mask, *, axis: Dim, out_dim: Dim | None = None) -> Tensor:
    """The frames of `x` along `axis` where the bool `mask` is True, over ``T' = axis.masked(mask)``.

    `mask` has `axis` and may have batch dims (each entry keeps its own frames);
    frames in the padding of `axis` are never kept. The result has `x`'s dims
    and the mask's, with `axis` replaced by ``T'`` (or by `out_dim`, a dim made
    by ``axis.masked(mask)``). Running it gives ``T'`` its size and lengths.
    """
    x, mask = as_tensor(x), as_tensor(mask)
    here = user_source_line()
    if not isinstance(axis, Dim):
        raise DimError(f"compress takes a single Dim as axis, got {axis!r} (at {here})")
    axis = axis.canonical()
    check_has(x, (axis,), "compress")
    if mask.dtype != torch.bool:
        raise DTypeError(f"compress needs a bool mask, got the {mask.describe()} (at {here})")
    check_has(mask, (axis,), "compress (the mask)")
    ldims = masked_length_dims(mask, axis)
    new = out_dim if out_dim is not None else axis.masked(mask, ldims)
    if new.masked_from is None or new.masked_from[0] != axis:
        raise DimError(f"compress: out_dim {new!r} is not a dim made by {axis.name}.masked(mask) (at {here})")
    rest = tuple(d for d in broadcast_dims("compress", x.dims, mask.dims) if d is not axis and d not in ldims)
    # raw layout of the work: lengths dims, the axis, then the rest
    work = (*ldims, axis, *rest)
    x_al = aligner(x.dims, work)
    m_layout = (*ldims, axis)
    m_al = aligner(mask.dims, m_layout)
    out_dims = tuple(new if d is axis else d for d in x.dims) + tuple(d for d in ldims if d not in x.dims) \
        + tuple(d for d in rest if d not in x.dims)
    to_out = aligner(tuple(new if d is axis else d for d in work), out_dims)
    n_l = len(ldims)

    def kernel(env, v, m):
        m = _valid_mask(env, m_al, m, axis, m_layout)
        counts = m.sum(-1)
        size = int(counts.max()) if counts.numel() else 0
        env.sizes[new] = size
        env.lengths_of[new] = counts
        # the True frames first, in order (a stable sort of "not kept")
        order = torch.argsort((~m).to(torch.uint8), dim=-1, stable=True)[..., :size]
        v = x_al(v)
        v = v.expand(*m.shape, *[env.size(d) for d in rest])
        index = order.reshape(*order.shape, *[1] * len(rest)).expand(*order.shape, *v.shape[n_l + 1:])
        return to_out(torch.gather(v, n_l, index))

    return emit("compress", (x, mask), kernel, out_dims, x.dtype, sparse_dim=x.sparse_dim,
                attrs={"axis": axis.name}, makes_dims=(new,))


def unmask(x, *, axis: Dim, initial=0.0) -> Tensor:
    """`x` over ``T' = T.masked(mask)`` brought back to ``T``: frame t is the last True frame up to t.

    Before the first True frame of an entry, the value is `initial` (which has
    the dims of a frame, or fewer). The result has `axis` replaced by ``T``.
    """
    x = as_tensor(x)
    here = user_source_line()
    origin = axis.masked_from if isinstance(axis, Dim) else None
    if origin is None:
        raise DimError(f"unmask: {axis!r} is not a masked dim (made by T.masked(mask), e.g. by compress) "
                       f"(at {here})")
    axis = axis.canonical()
    check_has(x, (axis,), "unmask")
    base, mask = origin
    mask = as_tensor(mask)
    initial = as_tensor(initial)
    if axis in initial.dims or base in initial.dims:
        raise DimError(f"unmask: the initial value {initial.describe()} must not have {axis.name!r} or "
                       f"{base.name!r} (at {here})")
    ldims = masked_length_dims(mask, base)
    m_layout = (*ldims, base)
    m_al = aligner(mask.dims, m_layout)
    rest = tuple(d for d in broadcast_dims("unmask", x.dims, initial.dims) if d is not axis and d not in ldims)
    out_dims = tuple(base if d is axis else d for d in x.dims) + tuple(d for d in ldims if d not in x.dims) \
        + tuple(d for d in rest if d not in x.dims)
    work_in = (*ldims, axis, *rest)
    x_al = aligner(x.dims, work_in)
    init_al = aligner(initial.dims, (*ldims, base, *rest))
    to_out = aligner((*ldims, base, *rest), out_dims)
    n_l = len(ldims)
    dtype = x.dtype

    def kernel(env, v, m, i):
        m = _valid_mask(env, m_al, m, base, m_layout)
        count = torch.cumsum(m.to(torch.int64), -1)
        v = x_al(v)
        v = v.expand(*m.shape[:-1], v.shape[n_l], *[env.size(d) for d in rest])
        if v.shape[n_l] == 0:
            picked = v.new_zeros(*m.shape, *v.shape[n_l + 1:])
        else:
            index = (count - 1).clamp(min=0)
            index = index.reshape(*index.shape, *[1] * len(rest)).expand(*index.shape, *v.shape[n_l + 1:])
            picked = torch.gather(v, n_l, index)
        first = init_al(torch.as_tensor(i, dtype=dtype, device=env.device))
        started = (count > 0).reshape(*count.shape, *[1] * len(rest))
        return to_out(torch.where(started, picked, first))

    return emit("unmask", (x, mask, initial), kernel, out_dims, dtype, sparse_dim=x.sparse_dim,
                attrs={"axis": axis.name})


def meet_masked(*operands: Tensor) -> tuple[Tensor, ...]:
    """`operands` with every ``T'`` tensor unmasked where another operand has ``T``, and every tensor over a
    search's beam gathered onto the pruned beam where another has that (for elementwise ops)."""
    operands = meet_beams(*operands)
    if not any(d.masked_from is not None for t in operands for d in t.dims):
        return operands
    out = list(operands)
    for k, t in enumerate(operands):
        for d in t.dims:
            origin = d.masked_from
            if origin is not None and any(origin[0] in o.dims for j, o in enumerate(operands) if j != k):
                out[k] = unmask(out[k], axis=d)
    return tuple(out)


for _name in __all__:  # every public op records its calls, so passes can replay them
    globals()[_name] = _trace.replayable(globals()[_name])
