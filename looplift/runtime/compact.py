"""Leaving the entries that ended out of a loop's steps.

A loop that ends per entry (``loop.end``: a search, greedy decoding) runs
until its last entry ends; an entry that ended keeps its states frozen and
its frames past its end are padding, so computing it further changes nothing.
:class:`Rows` drops such entries from the steps once enough of them ended:
the states and the captured values are cut down to the entries still running
(one ``index_select`` along the batch dim), the steps run in an environment
whose batch dim has that size (and whose dims measured per entry have those
entries' lengths), and the frames and final states are put back in place for
the whole batch (the frames of the entries left out are padding: zeros).

That is exact when every step computes each entry from that entry alone, which
:func:`plan` checks on the body before the first run: no node reduces over the
batch dim or names it, draws random numbers (their stream would change), runs
a region, makes a dim or keeps a history (``cum_concat``); the loop tracks no
``loop.last`` and its beam does not change its size per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..dims import Dim
from ..errors import ExecutionError
from ..graph import Graph
from ..ops.history import SOURCES
from ..regions import LoopSpec, mixes_entries
from ..tensor import Tensor
from .env import Env

__all__ = ["Plan", "Rows", "plan"]

#: the steps leave the ended entries out once at least this share of the rows they run has ended
MIN_ENDED_SHARE = 0.125


@dataclass(frozen=True)
class Plan:
    """Where the batch dim `dim` is in the loop's values (None: a value without it)."""

    dim: Dim
    captured: tuple[int | None, ...]
    states: tuple[int | None, ...]
    stacks: tuple[int | None, ...]
    #: the dynamic dims the body meets whose lengths run over `dim`
    measured: tuple[Dim, ...]


def plan(spec: LoopSpec) -> Plan | None:
    """The plan for leaving ended entries out of `spec`'s steps, or None where that could change a result."""
    if not spec.own_dim or spec.end is None or spec.lasts or spec.beam is not None or len(spec.length_dims) != 1:
        return None
    (dim,) = spec.length_dims
    if dim.is_dynamic or not _entrywise(spec.body, dim):
        return None
    seen: dict[Dim, None] = {}
    for t in [*spec.captured, *spec.placeholders, *(t for n in spec.body.nodes for t in (*n.inputs, *n.outputs))]:
        for d in t.dims:
            _collect(d, seen)
    measured = tuple(d for d in seen if d.is_dynamic and dim in d.length_dims)

    def pos(values: Sequence[Tensor]) -> tuple[int | None, ...]:
        return tuple(v.dims.index(dim) if dim in v.dims else None for v in values)

    return Plan(dim, pos(spec.captured), pos(spec.placeholders), pos(spec.stacks), measured)


def _entrywise(body: Graph, dim: Dim) -> bool:
    """Whether every node of `body` computes each entry along `dim` from that entry alone (as far as its dims
    and attributes show), the same whichever entries run beside it."""
    if mixes_entries(body, dim):
        return False
    return not any(node.random or node.region is not None or node.makes_dims or node.op == "cum_concat"
                   for node in body.nodes)


def _collect(d: Dim, seen: dict) -> None:
    if d in seen:
        return
    seen[d] = None
    for operand in (d.operands or ()) if d.origin is not None else ():
        if isinstance(operand, Dim):
            _collect(operand, seen)


class Rows:
    """The rows of one loop run's steps: all entries at first, later only those not ended (never fewer
    without a `plan`: then every method leaves its value as it is)."""

    def __init__(self, plan: Plan | None, env: Env):
        self.plan = plan
        self.env = env                 # (the run's)
        self.step_env = env            # where the steps run: `env`, or one with the batch cut down
        self.full = env.size(plan.dim) if plan is not None else None
        self.index: torch.Tensor | None = None   # the entries the rows are (None: all, in order)
        self.finals: list | None = None          # the states over the whole batch, of the entries left out

    @property
    def size(self) -> int:
        return self.full if self.index is None else len(self.index)

    def worth_cutting(self, alive: torch.Tensor | None, scratch: dict, inner: dict) -> bool:
        """Whether to leave out the rows not `alive` now: enough of them ended, and the run's memory holds no
        more than a search's sources (no history over the rows) and no dim was made per step."""
        if self.plan is None or alive is None or inner or scratch.keys() - {SOURCES}:
            return False
        ended = self.size - int(alive.sum())
        return 0 < ended < self.size and ended >= MIN_ENDED_SHARE * self.size

    def cut(self, alive: torch.Tensor, states: list, captured: list) -> tuple[torch.Tensor, list, list]:
        """Leave out the rows not `alive`: ``(alive, states, captured)`` of the rows kept."""
        keep = alive.nonzero()[:, 0]
        self.finals = self.put_back(states)
        states = [_select(v, p, keep) for v, p in zip(states, self.plan.states)]
        captured = [_select(v, p, keep) for v, p in zip(captured, self.plan.captured)]
        self.index = keep if self.index is None else self.index[keep]
        self.step_env = self._env()
        return alive[keep], states, captured

    def per_entry(self, value):
        """A per-entry value over the whole batch (a loop's max_seq_len per entry) for the rows run."""
        if self.index is None or not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != self.full:
            return value   # (the same for every entry)
        return value.index_select(0, self.index)

    def widen_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Per-entry counts of the rows run as counts over the whole batch (zero for the entries left out)."""
        if self.index is None:
            return counts
        return counts.new_zeros(self.full).index_copy(0, self.index, counts)

    def widen_frame(self, k: int, frame):
        """Stacked frame `k` of the rows run over the whole batch (zeros, padding, for the entries left out)."""
        return frame if self.index is None else _into(None, self.plan.stacks[k], self.index, frame, self.full)

    def put_back(self, states: list) -> list:
        """The states over the whole batch: those of the rows run, the final ones of the entries left out."""
        if self.index is None:
            return list(states)
        return [_into(f, p, self.index, v, self.full) for v, f, p in zip(states, self.finals, self.plan.states)]

    def _env(self) -> Env:
        env, dim = self.env, self.plan.dim
        sub = Env(env.device, {dim: len(self.index)}, {}, parent=env, steps=dict(env.steps))
        for d in self.plan.measured:
            try:
                lengths = env.lengths(d)
            except ExecutionError:
                continue   # (made in the body, per step)
            over = env.length_dims(d)
            if isinstance(lengths, torch.Tensor) and dim in over and lengths.dim() == len(over):
                sub.lengths_of[d] = lengths.index_select(over.index(dim), self.index)
        return sub


def _into(whole, pos: int | None, index: torch.Tensor, v, size: int):
    """`whole` (a raw over the whole batch, of `size` at `pos`; None: zeros) with the entries `index` replaced
    by the rows of `v`; `v` itself if it has no batch dim."""
    if pos is None or not isinstance(v, torch.Tensor) or v.dim() <= pos:
        return v
    if v.shape[pos] != len(index):   # (a raw of size 1 there: the same for every row)
        v = v.expand(*v.shape[:pos], len(index), *v.shape[pos + 1:])
    if whole is None or not isinstance(whole, torch.Tensor) or whole.dim() != v.dim():
        whole = v.new_zeros(*v.shape[:pos], size, *v.shape[pos + 1:])
    elif whole.shape[pos] != size:
        whole = whole.expand(*whole.shape[:pos], size, *whole.shape[pos + 1:])
    return whole.index_copy(pos, index, v)


def _select(v, pos: int | None, keep: torch.Tensor):
    return v.index_select(pos, keep) if pos is not None and isinstance(v, torch.Tensor) and v.dim() > pos and \
        v.shape[pos] != 1 else v
