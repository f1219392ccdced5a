"""``MaskedComputation``: a block of a loop body that only advances where a mask is True.

::

    with looplift.MaskedComputation(mask=loop.state.label != blank):
        slow, loop.state.slow = slow_rnn(label_emb, state=loop.state.slow)
    fast = fast_rnn(x_t, slow)     # `slow` from the last step where the mask was True

Semantics, per batch entry, at a step where the mask is False: every loop
state assigned in the block keeps its previous value, and every value computed
in the block and used after it equals its value from the last step where the
mask was True (zeros before the first such step). Where the mask is True the
block runs as written.

Why a block rather than ``where`` by hand: the block names the computation
that is conceptually on another time scale (a transducer's label-synchronous
prediction network inside a frame-synchronous loop); values leaving it are
held automatically, as its semantics demand, wherever they are used.
"""

from __future__ import annotations

import torch

from . import trace as _trace
from .errors import DimError, DTypeError, TraceError, entry_methods
from .ops._core import as_tensor
from .ops.math import where
from .ops.shape import zeros
from .source import user_source_line
from .tensor import Tensor

__all__ = ["MaskedComputation"]


class MaskedComputation:
    """Inside a loop: the block only advances at steps where the bool `mask` (per entry) is True."""

    def __init__(self, mask):
        ctx = _trace.current("MaskedComputation")
        self.source = user_source_line()
        if not ctx.loops or ctx.graph is not ctx.loops[-1].body:
            raise TraceError(f"MaskedComputation is used directly inside a loop's body (at {self.source})")
        self._ctx = ctx
        self.loop = ctx.loops[-1]
        self.mask = as_tensor(mask)
        if self.mask.dtype != torch.bool:
            raise DTypeError(f"MaskedComputation needs a bool mask, got the {self.mask.describe()} "
                             f"(at {self.source})")
        axis = self.loop.axis.canonical() if self.loop.axis is not None else None
        if axis is not None and axis in self.mask.dims:
            raise DimError(f"MaskedComputation: the mask {self.mask.describe()} has the loop's axis "
                           f"{axis.name!r}: it is one value per step; use loop.unstack(mask) for this step's "
                           f"(at {self.source})")
        self._open = False
        self._held: dict[int, Tensor] = {}
        self._holding = False
        #: for passes: (where result, value assigned in the block, value before it) per state leaf assigned
        self.state_wheres: list[tuple[Tensor, Tensor, Tensor]] = []
        #: for passes: (value, hidden state holding it, held value) per value used after the block
        self.holds: list[tuple[Tensor, Tensor, Tensor]] = []

    def __enter__(self) -> MaskedComputation:
        body = self.loop.body
        if self._ctx.graph is not body:
            raise TraceError(f"MaskedComputation is entered directly in the loop's body (at {self.source})")
        self._start = len(body.nodes)
        self._before = {name: list(slot.current) for name, slot in self.loop.slots.items()}
        self._open = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._open = False
        if exc_type is not None:
            return
        body = self.loop.body
        block = body.nodes[self._start:]
        # states assigned in the block keep their previous value where the mask is False
        with self._ctx.acting_for(f"the MaskedComputation at {self.source}"):
            for name, before in self._before.items():
                slot = self.loop.slots[name]
                for i in slot.tensor_leaves:
                    new = slot.current[i]
                    if new is not before[i]:
                        slot.current[i] = where(self.mask, new, before[i])
                        self.state_wheres.append((slot.current[i], new, before[i]))
        for node in block:
            node.masked_block = self

    def held_value(self, value: Tensor) -> Tensor | None:
        """The held value of `value` (computed in the block) once something after the block used it, else
        None."""
        return self._held.get(id(value))

    def outside(self, value: Tensor) -> Tensor:
        """`value` (computed in the block) as seen after it: held at steps where the mask is False."""
        ctx = _trace.tracing()
        if (self._open or self._holding or ctx is None or self.loop.phase != "inside"
                or not ctx.graph.is_inside(self.loop.body)):
            return value
        held = self._held.get(id(value))
        if held is None:
            self._holding = True
            try:   # (detached: not part of the op call that uses the value)
                with ctx.acting_for(f"the MaskedComputation at {self.source}"), \
                        ctx.inside(self.loop.parent, detached=True):
                    initial = zeros(value.dims, dtype=value.dtype)
                with ctx.acting_for(f"the MaskedComputation at {self.source}"), \
                        ctx.inside(self.loop.body, detached=True):
                    previous = self.loop.add_hidden_state(
                        f"<value {len(self.holds)} held by the MaskedComputation at {self.source}>", initial,
                        value.sparse_dim)
                    held = where(self.mask, value, previous)
                    self.loop.set_hidden_state(previous, held)
            finally:
                self._holding = False
            self._held[id(value)] = held
            self.holds.append((value, previous, held))
        ctx = _trace.tracing()
        if ctx.call is not None:
            ctx.call.substitutions[id(value)] = held
        return held


entry_methods(MaskedComputation, "__init__", "__enter__", "__exit__", public="looplift.MaskedComputation")
