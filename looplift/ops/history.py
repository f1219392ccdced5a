"""``cum_concat``: inside a loop, the history of a value up to the current step.

At step t of a loop over `T`, ``cum_concat(x)`` is x of steps 0..t stacked
along the history dim ``T.history()``, whose length is t + 1. Self-attention
over the past, written step by step::

    keys = ll.cum_concat(k_t)                     # {T_history, batch, key}
    weights = ll.softmax(ll.dot(q_t, keys, reduce=key), axis=keys_dim)

Over a whole sequence (its sequence rule, used when the loop optimizer moves
it out, or when called outside the loop with ``axis=T``), the result is x
itself with `T` renamed to the history dim, for every frame of `T`: frame t
sees a history of length t + 1, so reductions and softmax over the history
dim are causal. Nothing is copied: it is a broadcast.
"""

from __future__ import annotations

import torch

from .. import graph as _graph
from ..dims import Dim
from ..errors import DimError, TraceError
from ..tensor import Tensor
from ._core import as_tensor, emit
from .shape import expand, replace_dim

__all__ = ["cum_concat"]


def cum_concat(x, *, axis: Dim | None = None) -> Tensor:
    """The history of `x` along the history dim of the loop over `axis` (default: the innermost loop)."""
    x = as_tensor(x)
    ctx = _graph.current()
    if axis is None:
        if not ctx.loops:
            raise TraceError(f"cum_concat without axis= is used inside a loop (at {_graph.user_source_line()})")
        axis = ctx.loops[-1].axis
    axis = axis.canonical()
    _graph.resolve_call("cum_concat", axis=axis)
    history = axis.history()
    if history in x.dims:
        raise DimError(f"cum_concat: the {x.describe()} already has the history dim {history.name!r} "
                       f"(at {_graph.user_source_line()})")
    if axis in ctx.stepped_dims:
        if axis in x.dims:
            raise DimError(f"cum_concat inside the loop over {axis.name!r}: the {x.describe()} has the loop's "
                           f"dim (use a frame, e.g. loop.unstack(x)) (at {_graph.user_source_line()})")
        key = object()  # this node's history in the loop run's memory

        def kernel(env, v):
            frames = env.scratch.setdefault(key, [])
            frames.append(v)
            return torch.stack(frames, 0)

        return emit("cum_concat", (x,), kernel, (history,) + x.dims, x.dtype, sparse_dim=x.sparse_dim,
                    attrs={"axis": axis.name})
    if axis not in x.dims:
        x = expand(x, [axis])
    return expand(replace_dim(x, axis, history), [axis])


cum_concat = _graph.replayable(cum_concat)
cum_concat.sequence_rule = "cum_concat as the whole sequence with a causal history dim"
