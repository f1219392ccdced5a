"""Raw-tensor alignment: bring a torch tensor stored in one dim order into another.

Used by op kernels at run time; all decisions are taken once, when the aligner
is built during tracing, so the returned function does at most one permute and
one indexing (which inserts size-1 axes for dims the source lacks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from .dims import Dim

__all__ = ["aligner", "identity", "broadcast_shapes"]


def identity(x):
    return x


def aligner(src: Sequence[Dim], dst: Sequence[Dim]) -> Callable:
    """A function mapping a raw tensor over `src` to one over `dst` (size 1 where `src` lacks a dim).

    Every dim of `src` must be in `dst`. A source with no dims (a Python number or
    a 0-d tensor) is returned unchanged: it broadcasts as it is.
    """
    src, dst = tuple(src), tuple(dst)
    if not src or src == dst:
        return identity
    order = [d for d in dst if d in src]
    perm = tuple(src.index(d) for d in order)
    needs_perm = perm != tuple(range(len(src)))
    if len(order) == len(dst):
        return (lambda x: x.permute(perm)) if needs_perm else identity
    index = tuple(slice(None) if d in src else None for d in dst)
    if needs_perm:
        return lambda x: x.permute(perm)[index]
    return lambda x: x[index]


def broadcast_shapes(*shapes: Sequence[int]) -> tuple[int, ...]:
    """The broadcast of `shapes` (as ``torch.broadcast_shapes``, for kernels run every loop step: that one
    costs tens of microseconds a call). Raises ValueError for shapes that do not broadcast. While a program is
    captured for ``Program.to_fx`` (:func:`capturing`): torch's own, which takes a size known only at run time
    to be other than 1."""
    if _capturing:
        return tuple(torch.broadcast_shapes(*shapes))
    n = max([len(s) for s in shapes]) if shapes else 0
    out = [1] * n
    for s in shapes:
        for i, size in enumerate(s, n - len(s)):
            if size != 1:
                if out[i] != 1 and out[i] != size:
                    raise ValueError(f"shapes {[tuple(x) for x in shapes]} do not broadcast")
                out[i] = size
    return tuple(out)


_capturing = False


@contextlib.contextmanager
def capturing():
    """While a program is captured as a graph with sizes known only at run time (``Program.to_fx``)."""
    global _capturing
    was, _capturing = _capturing, True
    try:
        yield
    finally:
        _capturing = was
