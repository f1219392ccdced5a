"""Tracing: the state that exists while a program is traced, and the mode it is traced in.

Tracing state lives in a :class:`TraceContext` that exists only while
:func:`looplift.compile` traces a function (or a pass rewrites a graph);
there is no global graph and no other module-level state. Ops find the graph
to add nodes to, the loops around them and the mode through :func:`current`.

A public op is wrapped by :func:`replayable`: its outermost call is recorded
as a :class:`looplift.graph.Call` on the nodes it emits, so passes can replay
it on other inputs (the whole sequence rather than one frame).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .dims import Dim
from .errors import ModeError, TraceError, at_entry
from .graph import Call, Graph, Node
from .source import user_source_line
from .tensor import Tensor

__all__ = ["TraceContext", "LoopHints", "Retrace", "current", "tracing", "enter", "leave", "mode",
           "is_training", "is_search", "replayable", "resolve_call", "length_dims", "record", "acting_for"]


@dataclass
class LoopHints:
    """What one attempt to trace a program learnt about one of its loops, for the next attempt.

    A loop is known by its position among the loops of the trace. A state
    whose new value gains dims its initial value lacks makes the program trace
    again, with the state given those dims from the start; a search's dims
    are made once and kept across attempts, so the retraced body sees the same
    dims.
    """

    #: dims every state gets: those along which entries end at different steps
    batch: list[Dim] = field(default_factory=list)
    #: (state name, leaf) -> dims the state's value needs beyond its initial value's
    state_dims: dict[tuple[str, int], list[Dim]] = field(default_factory=dict)
    #: a search: the loop's beam, its size, the pruned beam, and the dims of recombination and backtracking
    beam: Dim | None = None
    beam_size: int | None = None
    next_beam: Dim | None = None
    other_beam: Dim | None = None
    final_beam: Dim | None = None


class Retrace(BaseException):
    """Raised by a loop that found its states need more dims than their initial values have.

    The program catches it and traces again; the loop then gives its state
    placeholders those dims from the start. (A BaseException, so that user
    code catching ``Exception`` does not swallow it.)
    """


class TraceContext:
    """Everything that exists while one program is traced."""

    def __init__(self, mode: str, graph: Graph, float_dtype: torch.dtype | None = None,
                 loop_hints: dict[int, LoopHints] | None = None):
        self.mode = mode
        #: The graph new nodes go to.
        self.graph = graph
        #: The dtype of new floating-point values (that of the model's parameters).
        self.float_dtype = float_dtype or torch.get_default_dtype()
        #: The loops whose bodies are being traced, outermost first.
        self.loops: list = []
        #: Per loop (by creation order in the trace): what an earlier attempt of the same trace learnt.
        self.loop_hints: dict[int, LoopHints] = loop_hints if loop_hints is not None else {}
        self._loop_count = 0
        #: Program inputs (by argument position) without a sparse_dim that ops index a vocabulary with:
        #: (vocabulary dim, op), checked at each call like a sparse_dim (see looplift.ops._core.indexes_with)
        self.label_inputs: dict[int, tuple[Dim, str]] = {}
        #: The outermost op call being traced, if any, and the last one finished.
        self.call: Call | None = None
        self.last_call: Call | None = None
        #: The search step being traced: pruned beam -> (the beam it was pruned from, the source hypotheses).
        #: Elementwise ops bring a value over the beam onto the pruned beam where they meet (``ops.index``).
        self.pruned: dict[Dim, tuple[Dim, Tensor]] = {}
        #: The construct of the user's that the nodes traced now implement (see :meth:`acting_for`), or None.
        self.on_behalf_of: str | None = None

    def next_loop_hints(self) -> LoopHints:
        """The hints of the next loop created in this trace."""
        self._loop_count += 1
        return self.loop_hints.setdefault(self._loop_count - 1, LoopHints())

    @property
    def stepped_dims(self) -> tuple:
        """The dims the active loops step over: inside a body, these are not dims of any value."""
        return tuple(loop.axis for loop in self.loops)

    @contextlib.contextmanager
    def acting_for(self, construct: str) -> Iterator[None]:
        """Trace nodes on behalf of the user's `construct` (e.g. "looplift.choice"): reports name that, not the
        ops it is made of. The outermost construct wins (``choice`` calls ``prune``)."""
        saved = self.on_behalf_of
        if saved is None:
            self.on_behalf_of = construct
        try:
            yield
        finally:
            self.on_behalf_of = saved

    @contextlib.contextmanager
    def inside(self, graph: Graph, *, loops: list | None = None, detached: bool = False) -> Iterator[None]:
        """Trace into `graph` for a moment (the graph around a loop, a body made by a pass), with `loops`
        as the active loops if given; `detached`: the nodes are not part of the op call being traced."""
        saved = self.graph, list(self.loops), self.call
        self.graph = graph
        if loops is not None:
            self.loops[:] = loops
        if detached:
            self.call = None
        try:
            yield
        finally:
            self.graph, self.loops[:], self.call = saved[0], saved[1], saved[2]


def length_dims(dim: Dim) -> tuple:
    """The dims the lengths of `dim` run over, as seen in the region being traced.

    Inside a loop over `T`, a dim whose lengths vary along `T` has, per step,
    lengths over the remaining dims only.
    """
    ctx = _current.get()
    dims = dim.length_dims
    if ctx is None or not ctx.loops:
        return dims
    stepped = ctx.stepped_dims
    return tuple(d for d in dims if d not in stepped)


_current: contextvars.ContextVar[TraceContext | None] = contextvars.ContextVar("looplift_trace", default=None)


def current(what: str = "") -> TraceContext:
    """The active trace; outside of tracing, an error naming `what` was attempted (e.g. the op and its dims)."""
    ctx = _current.get()
    if ctx is None:
        what = f": {what}" if what else ""
        raise TraceError(
            f"looplift ops run only while a program is traced{what}; "
            "wrap the code in a function or Module and call looplift.compile(...)")
    return ctx


def tracing() -> TraceContext | None:
    """The active trace, or None."""
    return _current.get()


def enter(ctx: TraceContext) -> contextvars.Token:
    return _current.set(ctx)


def leave(token: contextvars.Token) -> None:
    _current.reset(token)


def record(ctx: TraceContext, node: Node) -> None:
    """Attach `node` to the op call being traced, if any, and to the construct it is traced on behalf of (ops
    call this for every node they emit)."""
    node.on_behalf_of = ctx.on_behalf_of
    if ctx.call is not None:
        node.call = ctx.call
        ctx.call.nodes.append(node)


def replayable(fn: Callable) -> Callable:
    """Mark a public op: its outermost calls are recorded as :class:`looplift.graph.Call`\\ s on the nodes they
    emit."""
    name = f"looplift.{fn.__name__}"

    @functools.wraps(fn)
    def op(*args, **kwargs):
        try:
            ctx = _current.get()
            if ctx is None or ctx.call is not None:
                return fn(*args, **kwargs)
            call = ctx.call = Call(op, args, dict(kwargs))
            try:
                call.outputs = fn(*args, **kwargs)
            finally:
                ctx.call = None
            ctx.last_call = call
            return call.outputs
        except Exception as e:   # the entry point of the public op (see looplift.errors.entry_point)
            placed = at_entry(e, sys._getframe(1), name)
            if placed is None:
                raise
            raise placed from e
    op.replayable = True
    return op


def acting_for(construct: str) -> Callable[[Callable], Callable]:
    """Decorate a user-facing construct (``choice``, ``search.prune``): the nodes it traces are reported as
    `construct` (see :meth:`TraceContext.acting_for`)."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def traced(*args, **kwargs):
            ctx = _current.get()
            if ctx is None:
                return fn(*args, **kwargs)
            with ctx.acting_for(construct):
                return fn(*args, **kwargs)
        return traced
    return wrap


def resolve_call(op: Callable, **kwargs) -> None:
    """Inside the public op `op`: record inferred arguments on its call, if it is the call being traced
    (not another op calling it); see :meth:`looplift.graph.Call.resolve`."""
    ctx = _current.get()
    if ctx is not None and ctx.call is not None and ctx.call.fn is op:
        ctx.call.resolve(**kwargs)


def _mode() -> str:
    ctx = _current.get()
    if ctx is None:
        raise ModeError(f"the mode is known only while a program is traced ({user_source_line()}); "
                        "call this inside the model code that looplift.compile traces")
    return ctx.mode


def mode() -> str:
    """The mode of the program being traced: "train", "eval" or "search"."""
    return _mode()


def is_training() -> bool:
    """True while tracing a program compiled with ``mode="train"``."""
    return _mode() == "train"


def is_search() -> bool:
    """True while tracing a program compiled with ``mode="search"``."""
    return _mode() == "search"
