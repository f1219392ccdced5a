"""What the move-out pass did with one loop, or why it left the loop as it was.

A :class:`LoopReport` per loop is what :meth:`looplift.Program.explain` prints
and :meth:`looplift.Program.to_dot` draws.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import LoopliftError
from ..regions import LoopSpec

__all__ = ["LoopReport", "CannotMove"]


@dataclass
class LoopReport:
    """What the pass did with one loop (see :meth:`looplift.Program.explain`)."""

    source: str
    axis: str
    hoisted: list[str] = field(default_factory=list)         # computed once, before the loop
    before_loop: list[str] = field(default_factory=list)     # over the whole sequence, before the loop
    after_loop: list[str] = field(default_factory=list)      # over the stacked sequences, after the loop
    moved_states: list[str] = field(default_factory=list)    # states whose values are shifted sequences
    sequence_forms: list[str] = field(default_factory=list)  # replaced by an op's sequence-level form
    stayed: list[tuple[str, list[str]]] = field(default_factory=list)  # (call, the chain that keeps it)
    masked: list[str] = field(default_factory=list)          # MaskedComputation blocks run over T'
    loop_removed: bool = False
    not_optimized: str | None = None
    #: when the rewrite holds only where no entry ends (loop.end) before its axis length: what happens then
    checked_end: str | None = None
    #: per body node (by id): "invariant", "sequence", "core", "after" or "masked" (for pictures)
    node_place: dict[int, str] = field(default_factory=dict)
    #: the descriptions of calls that only change the storage order (a state's layout): bookkeeping, which
    #: ``explain`` leaves out
    layout_only: set[str] = field(default_factory=set)
    spec: LoopSpec | None = None


class CannotMove(LoopliftError):
    """A part of the loop cannot be computed where the plan puts it. Where that part is one op call (`part`:
    the id of its first node) or one MaskedComputation block (`block`: the id of the block), it stays in the
    loop and the rest is planned again; otherwise the loop is left as it was traced (always correct).
    ``explain`` says why, in the message's words."""

    def __init__(self, message: str, *, part: int | None = None, block: int | None = None):
        super().__init__(message, where="")   # (the plan's own words: no user line to name)
        self.part, self.block = part, block
