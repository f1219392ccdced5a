"""The IR records of the structural regions: a traced loop (:class:`LoopSpec`) and a Cond (:class:`CondSpec`).

A region node (:attr:`looplift.graph.Op.LOOP`, :attr:`~looplift.graph.Op.COND`)
holds its record in ``node.region``. The record says everything the passes and
the runtime need: the region's graphs, what they capture from around them,
what they are fed and what they return. The user-facing classes
(:class:`looplift.Loop`, :class:`looplift.Cond`) build these records when their
block ends; passes build new ones; the runtime (:mod:`looplift.runtime.loop_run`)
runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import trace as _trace
from .dims import Dim
from .graph import Graph, Node, Op
from .tensor import Tensor

__all__ = ["LoopSpec", "CondSpec", "emit_unstack", "emit_loop_index", "is_history_of", "mixes_entries",
           "node_mixes_entries"]


@dataclass(eq=False)
class LoopSpec:
    """A traced loop, as the runtime runs it and as passes rewrite it.

    The node's inputs are ``captured + initial states + [max_len]`` (the last
    if it is a tensor); its outputs are the final states (over the
    placeholders' dims), the stacked values (the loop's axis first) and the
    values at each entry's last step (over ``length_dims`` too).

    Semantics, per batch entry (the reference interpreter runs exactly this)::

        state = initial
        for t in steps:                      # the axis's length, or until `end` (bounded by max_len)
            feed placeholders with state, run body
            stacked[t] = stacks; if end: stop (after this step if include_eos)
            state = new_states               # frozen once the entry ended
    """

    axis: Dim
    own_dim: bool                      # the loop created `axis` (it ends by `end`)
    source: str
    body: Graph
    captured: list[Tensor]             # tensors of enclosing graphs the body uses
    placeholders: list[Tensor]         # in the body: each state leaf's value from the previous step
    new_states: list[Tensor]           # in the body: each state leaf's next value (placeholder layout)
    stacks: list[Tensor]               # in the body: values stacked along `axis`
    end: Tensor | None                 # in the body: the end condition
    include_eos: bool
    max_len: int | Tensor | None
    length_dims: tuple[Dim, ...]       # dims along which the number of steps differs per entry
    state_names: list[str]
    lasts: list[Tensor] = field(default_factory=list)   # in the body: values tracked for loop.last
    node: Node | None = None
    #: keep the states of entries that ended frozen (False when nothing reads the final states)
    freeze: bool = True
    #: also freeze entries past their length along `axis` (False when only frames before an entry's length
    #: are read: the final states are not, and freezing serves only entries that ended by loop.end early)
    freeze_past_length: bool = True
    #: reaching max_len ends the loop (a search: hypotheses are cut there) rather than being an error
    stop_at_max_len: bool = False
    #: a search whose beam size changes per step: (the loop's beam, the pruned beam). Each step runs with
    #: the beam as wide as the previous step's prune kept (the first with 1)
    beam: tuple[Dim, Dim] | None = None
    #: a search whose beam has a fixed size: that beam. Its hypotheses start as the first one repeated (the
    #: others invalid), so the optimized run may run the first step on one slot
    fixed_beam: Dim | None = None
    #: a search over a dim of its own steps over `axis`, a dim of its own too: the loop's dim (whose history
    #: ``cum_concat`` keeps) is stepped alongside
    also_steps: Dim | None = None
    #: the dims the lengths of `axis` run over around the loop (set when the node is added)
    axis_length_dims: tuple[Dim, ...] = ()

    region_names = ("body",)

    def regions(self) -> list[tuple[Graph, list[Tensor]]]:
        """The body and the values it returns (for :meth:`looplift.graph.Graph.check`)."""
        return [(self.body, [*self.new_states, *self.stacks, *self.lasts, *([self.end] if self.end is not None
                                                                             else [])])]

    def sized_per_step(self, dim: Dim) -> bool:
        """Whether `dim`'s size is set anew at each step (a changing beam, or a dim sized like it)."""
        if self.beam is None:
            return False
        todo = [dim]
        while todo:
            d = todo.pop()
            if d in self.beam:
                return True
            todo += d.operands
        return False

    def add_node(self, graph: Graph, initial: list[Tensor], stacked: list[Tensor] | None = None,
                 source: str | None = None) -> Node:
        """Add the loop node to `graph`; `stacked` are pre-made output tensors for the stacks (or None)."""
        self.axis_length_dims = _trace.length_dims(self.axis) if self.axis.is_dynamic else ()
        max_len = [self.max_len] if isinstance(self.max_len, Tensor) else []
        specs = [(p.dims, p.dtype, p.sparse_dim) for p in self.placeholders]
        specs += [((self.axis,) + v.dims, v.dtype, v.sparse_dim) for v in self.stacks]
        specs += [(v.dims, v.dtype, v.sparse_dim) for v in self.lasts]
        node = graph.add(Op.LOOP, (*self.captured, *initial, *max_len), None, specs,
                         attrs={"axis": self.axis.name}, source=source or self.source, region=self,
                         makes_dims=(self.axis,) if self.own_dim else ())
        n = len(self.placeholders)
        for k, out in enumerate(stacked or []):
            out.node, out.index = node, n + k
            node.outputs[n + k] = out
        self.node = node
        return node

    def add_last(self, tracked: Tensor) -> Tensor:
        """Track the body value `tracked` (which has the length dims) for its value at each entry's last step."""
        self.lasts.append(tracked)
        out = Tensor(tracked.dims, tracked.dtype, sparse_dim=tracked.sparse_dim, node=self.node,
                     index=len(self.node.outputs))
        self.node.outputs.append(out)
        return out


@dataclass(eq=False)
class CondSpec:
    """A traced Cond: the node's inputs are ``(pred, *captured)``; it runs ``branches[bool(pred)]`` and
    returns that branch's ``outs``."""

    branches: dict[bool, Graph]
    captured: list[Tensor]
    outs: dict[bool, list[Tensor]]

    region_names = ("true", "false")

    def regions(self) -> list[tuple[Graph, list[Tensor]]]:
        return [(self.branches[True], self.outs[True]), (self.branches[False], self.outs[False])]


#: ops that only broadcast or reorder the storage (they name every dim of their result, `dim` among them)
_LAYOUT_OPS = frozenset({"expand", "transpose"})


def mixes_entries(body: Graph, dim: Dim) -> bool:
    """Whether some node of `body` (or of a region in it) may compute an entry along `dim` from other entries:
    it reduces over `dim` (has it in an input but not in every output) or names it (an op along it: a
    softmax, a gather, a split; not a broadcast nor a reordering of the storage). Where none does, what an
    entry computes after it ended (a loop.end) can change no other entry."""
    for node in body.nodes:
        if node.region is not None:
            if any(mixes_entries(graph, dim) for graph, _ in node.region.regions()):
                return True
        elif node_mixes_entries(node, dim):
            return True
    return False


def first_step_on_one_slot(spec: LoopSpec) -> bool:
    """Whether a search with a fixed beam (``spec.fixed_beam``) computes exactly the same hypotheses when its
    first step runs on the beam's first slot alone (its captured values and states cut to it): at the start
    every hypothesis is the first one repeated, and only it is valid. So where no node draws random numbers
    (their stream would change) or runs a region, and no node but the prune and a gather (a reorder by the
    sources) mixes the slots of a value computed from the cut ones; a value with the beam from the prune's
    results is as wide as the beam again. False for a loop that is no such search."""
    beam = spec.fixed_beam
    if beam is None:
        return False
    cut = {id(t) for t in [*spec.captured, *spec.placeholders] if beam in t.dims}
    for node in spec.body.nodes:
        if node.random or node.region is not None:
            return False
        with_beam = [t for t in node.inputs if beam in t.dims]
        if not any(id(t) in cut for t in with_beam):
            continue
        if node.op not in ("prune", "gather") and node_mixes_entries(node, beam):
            return False
        if all(id(t) in cut for t in with_beam):   # (else it broadcasts to the whole beam)
            cut.update(id(o) for o in node.outputs if beam in o.dims)
    return True


def node_mixes_entries(node, dim: Dim) -> bool:
    """Whether `node` (not a region) reduces over `dim` or names it (see :func:`mixes_entries`)."""
    if any(dim in t.dims for t in node.inputs) and not all(dim in o.dims for o in node.outputs):
        return True
    return node.op not in _LAYOUT_OPS and _names(node.attrs, dim.name)


def _names(value, name: str) -> bool:
    if isinstance(value, str):
        return value == name
    if isinstance(value, dict):
        return any(_names(v, name) for v in value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_names(v, name) for v in value)
    return isinstance(value, Dim) and value.name == name


def emit_unstack(body: Graph, x: Tensor, axis: Dim, source: str | None = None) -> Tensor:
    """In the loop body `body`: frame t of `x` along the loop's `axis` at step t.

    A history dim of `axis` (``axis.history()``, from ``cum_concat`` over the sequence) has t + 1 frames at
    step t, as ``cum_concat`` in the loop gives: the frame is cut to them."""
    pos = x.dims.index(axis)
    frame_dims = tuple(d for d in x.dims if d is not axis)
    history = [i for i, d in enumerate(frame_dims) if is_history_of(d, axis.canonical())]

    def kernel(env, v):
        t = env.step(axis)
        frame = v.select(pos, t)
        for i in history:
            frame = frame.narrow(i, 0, t + 1)
        return frame

    return body.add(Op.UNSTACK, (x,), kernel, [(frame_dims, x.dtype, x.sparse_dim)],
                    attrs={"axis": axis.name}, source=source).outputs[0]


def is_history_of(d: Dim, axis: Dim) -> bool:
    """Whether `d` is ``axis.history()`` (t + 1 frames at step t of the loop over `axis`)."""
    return d.origin is not None and d.origin[0] == "history" and d.origin[1][0] is axis


def emit_loop_index(body: Graph, axis: Dim, source: str | None = None) -> Tensor:
    """In the loop body `body`: the step counter t of the loop over `axis` (int64, ``sparse_dim`` `axis`)."""
    return body.add(Op.LOOP_INDEX, (), lambda env: torch.tensor(env.step(axis), device=env.device),
                    [((), torch.int64, axis)], attrs={"axis": axis.name}, source=source).outputs[0]
