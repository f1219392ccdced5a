"""The move-out pass: compute outside a loop everything that does not depend on the previous step.

For each loop, the body's op calls are classified by what they depend on:

* invariant: only values from outside the loop. Computed once, before it.
* sequence: also frames of unstacked inputs, the step index, or states that
  are themselves moved out, but on no state carried by the loop. Replayed
  before the loop on whole sequences: the op's own dim rule treats the loop's
  dim as one more batch dim. Inside, what is left reads frame t of the result.
* core: depends on a state carried from step to step. Stays in the loop,
  unless its results are only stacked (or feed only such calls): then it is
  replayed after the loop on the stacked sequences of its inputs.

A state whose next value is a sequence value is moved out as well: its value
at step t is that sequence shifted by one step, the initial value in front
(``shift_right``). The classification starts with every state carried and
moves states out until nothing changes, so a state that feeds itself, however
indirectly, always stays.

The pass reasons only about dependencies and regions, never about particular
ops: replaying a recorded call (:class:`looplift.graph.Call`) on other inputs
is all it asks of an op. Calls it cannot replay, nested loops and Conds stay
where they are (nested loops are optimized in turn). If a replay fails, the
loop is left as it was, which is always correct, and ``explain`` says why.

The pass never changes what a program computes: the reference interpreter
runs the graph as traced, and the tests compare both.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from .. import graph as _graph
from .. import trace as _trace
from .._tree import flatten
from ..dims import Dim
from ..errors import LoopliftError
from ..regions import LoopSpec, emit_unstack, is_history_of
from ..rules import rules_of
from ..ops import math as _math
from ..ops import reduce as _reduce
from ..ops import shape as _shape
from ..ops.index import gather
from ..ops.masking import compress, masked_length_dims, unmask
from ..tensor import Tensor

__all__ = ["optimize", "Optimized", "LoopReport"]

INVARIANT, SEQUENCE, CORE = 0, 1, 2


@dataclass
class LoopReport:
    """What the pass did with one loop (see :meth:`looplift.Program.explain`)."""

    source: str
    axis: str
    hoisted: list[str] = field(default_factory=list)         # computed once, before the loop
    moved_in: list[str] = field(default_factory=list)        # over the whole sequence, before the loop
    moved_out: list[str] = field(default_factory=list)       # over the stacked sequences, after the loop
    moved_states: list[str] = field(default_factory=list)    # states whose values are shifted sequences
    forms: list[str] = field(default_factory=list)           # replaced by an op's sequence-level form
    stayed: list[tuple[str, list[str]]] = field(default_factory=list)  # (call, the chain that keeps it)
    masked: list[str] = field(default_factory=list)          # MaskedComputation blocks run over T'
    loop_removed: bool = False
    not_optimized: str | None = None
    #: per body node: "invariant", "sequence", "core" or "after" (for pictures)
    node_class: dict[int, str] = field(default_factory=dict)
    spec: LoopSpec | None = None


@dataclass
class Optimized:
    graph: _graph.Graph
    inputs: list[Tensor]
    outputs: list[Tensor]
    reports: list[LoopReport]


def optimize(graph: _graph.Graph, inputs: list[Tensor], outputs: list[Tensor], *, mode: str,
             float_dtype: torch.dtype) -> Optimized:
    """A new graph computing the same `outputs` with loops optimized; `graph` is left unchanged."""
    new = _graph.Graph()
    ctx = _trace.TraceContext(mode, new, float_dtype)
    token = _trace.enter(ctx)
    try:
        rewriter = _Rewriter(ctx)
        rewriter.used = _used_tensors(graph) | {id(t) for t in outputs}
        rewriter.copy_graph(graph, new)
        new_inputs = [rewriter.map[id(t)] for t in inputs]
        new_outputs = [rewriter.value(t) for t in outputs]
    finally:
        _trace.leave(token)
    return Optimized(new, new_inputs, new_outputs, rewriter.reports)


class _CannotMove(LoopliftError):
    pass


class _Rewriter:
    def __init__(self, ctx: _trace.TraceContext):
        self.ctx = ctx
        #: id(old tensor) -> its value in the new graph (for body tensors: in the new body)
        self.map: dict[int, Tensor] = {}
        self.reports: list[LoopReport] = []
        #: graphs made by the pass that the map refers to (kept alive so ids stay unique)
        self.keep: list = []
        #: ids of the old graph's tensors that anything uses (as an input, or as a program output)
        self.used: set[int] = set()

    def value(self, t: Tensor) -> Tensor:
        return self.map[id(t)]

    def copy_graph(self, old: _graph.Graph, new: _graph.Graph) -> None:
        for node in old.nodes:
            if node.op == "loop":
                self.transform_loop(node, new)
            else:
                self.copy_node(node, new)

    def copy_node(self, node: _graph.Node, graph: _graph.Graph, value=None) -> _graph.Node:
        """`node` added to `graph` unchanged but for its inputs (mapped by `value`, default: the map)."""
        value = value or self.value
        new = graph.add(node.op, tuple(value(t) for t in node.inputs), node.kernel,
                        [(t.dims, t.dtype, t.sparse_dim) for t in node.outputs], dict(node.attrs), node.source,
                        region=node.region, makes_dims=node.makes_dims, random=node.random,
                        zero_padding=node.zero_padding, value=node.value, masked_block=node.masked_block)
        new.call = node.call
        for old_t, new_t in zip(node.outputs, new.outputs):
            self.map[id(old_t)] = new_t
        return new

    def transform_loop(self, node: _graph.Node, parent: _graph.Graph) -> None:
        spec: LoopSpec = node.region
        report = LoopReport(spec.source, spec.axis.name, spec=spec)
        start, n_reports = len(parent.nodes), len(self.reports)
        saved_graph, saved_loops = self.ctx.graph, list(self.ctx.loops)
        try:
            _LoopMove(self, spec, node, parent, report).run()
        except Exception as e:  # noqa: BLE001 - any failure leaves the loop as traced, which is correct
            self.ctx.graph, self.ctx.loops[:] = saved_graph, saved_loops
            del parent.nodes[start:]
            del self.reports[n_reports:]   # (of loops made or rewritten by the attempt)
            report = LoopReport(spec.source, spec.axis.name, spec=spec,
                                not_optimized=f"{type(e).__name__}: {e}")
            self.copy_node(node, parent)
        finally:
            self.ctx.graph, self.ctx.loops[:] = saved_graph, saved_loops
        self.reports.append(report)


@dataclass(eq=False)
class _Region:
    """A MaskedComputation block with the wheres that hold its states and the values used after it."""

    mc: object
    block: list
    members: list = field(default_factory=list)
    state_ks: list = field(default_factory=list)     # the loop states it carries (hidden ones included)
    states: list = field(default_factory=list)       # (k, where result, value assigned in the block)
    holds: list = field(default_factory=list)        # (k, value of the block, held value)


@dataclass(eq=False)
class _Unit:
    """One op call of the body (or one node that is not a call)."""

    nodes: list
    call: _graph.Call | None
    kind: str                     # "call", "verbatim", "state", "unstack", "index", "region"
    inputs: list[Tensor] = field(default_factory=list)
    cls: int = CORE
    after: bool = False           # replayed after the loop
    form: tuple | None = None     # (carried argument, state indices) when run by the op's sequence form

    def describe(self) -> str:
        node = self.nodes[0]
        if self.kind == "masked":
            return f"MaskedComputation block at {node.source}"
        name = self.call.fn.__name__ if self.call is not None else node.op
        if self.kind == "state":
            name = f"state {node.attrs.get('state')!r}"
        outs = self.outputs()
        dims = "{" + ", ".join(d.name for d in outs[0].dims) + "}" if outs else ""
        return f"{name} {dims} at {node.source}"

    def outputs(self) -> list[Tensor]:
        if self.call is not None:
            leaves, _ = flatten(self.call.outputs, lambda v: isinstance(v, Tensor))
            return [t for t in leaves if isinstance(t, Tensor)]
        return [t for n in self.nodes for t in n.outputs]


class _LoopMove:
    """The rewrite of one loop."""

    def __init__(self, rw: _Rewriter, spec: LoopSpec, node: _graph.Node, parent: _graph.Graph,
                 report: LoopReport):
        self.rw, self.spec, self.node, self.parent, self.report = rw, spec, node, parent, report
        self.ctx = rw.ctx
        self.axis: Dim = spec.axis
        self._seq: dict[int, Tensor] = {}
        self._inv: dict[int, Tensor] = {}
        self._index_seq: Tensor | None = None
        self._lengths: Tensor | None = None
        self._form_final: dict[int, Tensor] = {}
        self._unfrozen = False
        self._seq_unfrozen: dict[int, Tensor] = {}
        self._on_moved_memo: dict[int, bool] = {}
        self.body: _graph.Graph | None = None
        self._base_loops = list(rw.ctx.loops)

    # -- analysis -------------------------------------------------------------------------------------

    def _units(self) -> None:
        spec = self.spec
        self.units: list[_Unit] = []
        by_call: dict[int, _Unit] = {}
        for n in spec.body.nodes:
            if n.call is not None:
                unit = by_call.get(id(n.call))
                if unit is None:
                    unit = by_call[id(n.call)] = _Unit([], n.call, "call")
                    self.units.append(unit)
                unit.nodes.append(n)
                continue
            kind = {"state": "state", "unstack": "unstack", "loop_index": "index"}.get(n.op)
            if kind is None:
                kind = "region" if n.op in ("loop", "cond") else "verbatim"
            self.units.append(_Unit([n], None, kind))
        self._order = {id(n): i for i, n in enumerate(spec.body.nodes)}
        self.regions: dict[int, _Region] = {}
        self._index()
        self.state_index = {id(p): k for k, p in enumerate(spec.placeholders)}
        self._group_masked()

    def _index(self) -> None:
        """The producer and the inputs of every unit, and the consumers of every tensor."""
        self.producer: dict[int, _Unit] = {}
        for unit in self.units:
            for n in unit.nodes:
                for t in n.outputs:
                    self.producer[id(t)] = unit
        for unit in self.units:
            own = {id(t) for n in unit.nodes for t in n.outputs}
            region = self.regions.get(id(unit))
            if region is not None:   # its own states are carried inside it, over T'
                own |= {id(self.spec.placeholders[k]) for k in region.state_ks}
            unit.inputs = []
            seen: set[int] = set()
            for n in unit.nodes:
                for t in n.inputs:
                    if id(t) not in own and id(t) not in seen:
                        seen.add(id(t))
                        unit.inputs.append(t)
        self.consumers: dict[int, list[_Unit]] = {}
        for unit in self.units:
            for t in unit.inputs:
                self.consumers.setdefault(id(t), []).append(unit)

    def _group_masked(self) -> None:
        """Each MaskedComputation block that can run over T' (with the wheres holding its states and
        values) becomes one unit of kind "masked"."""
        blocks: dict[int, tuple] = {}
        for unit in self.units:
            mc = unit.nodes[0].masked_block
            if mc is not None:
                blocks.setdefault(id(mc), (mc, []))[1].append(unit)
        for mc, block in blocks.values():
            region = self._region(mc, block)
            if region is None:
                continue
            members = {id(u) for u in region.members}
            unit = _Unit([n for u in self.units if id(u) in members for n in u.nodes], None, "masked")
            at = next(i for i, u in enumerate(self.units) if id(u) in members)
            self.units = [u for u in self.units if id(u) not in members]
            self.units.insert(at, unit)
            self.regions[id(unit)] = region
        if self.regions:
            self._index()

    def _region(self, mc, block: list[_Unit]):
        """The block of `mc` as a region that can run as a loop over T', or None where it cannot."""
        spec = self.spec
        # (with loop.end, an ended entry's block still runs on its frozen states: it stays in the loop)
        if spec.own_dim or spec.end is not None or any(u.kind not in ("call", "unstack", "index") for u in block):
            return None
        region = _Region(mc, block)
        outs_of = {id(t) for u in block for t in u.outputs()}
        for where_out, new, before in mc.state_wheres:
            k = self.state_index.get(id(before))
            if k is None or self._next_value(k) is not where_out or id(new) not in outs_of:
                return None   # the state was assigned before the block, or again after it
            region.state_ks.append(k)
            region.states.append((k, where_out, new))
        for value, previous, held in mc.holds:
            k = self.state_index.get(id(previous))
            if k is None or self._next_value(k) is not held:
                return None
            region.state_ks.append(k)
            region.holds.append((k, value, held))
        whers = [self.producer.get(id(t)) for _, t, _ in region.states] + \
            [self.producer.get(id(t)) for _, _, t in region.holds]
        if any(u is None or u.kind != "call" or len(u.outputs()) != 1 for u in whers):
            return None
        region.members = block + whers
        # values of the block are used after it only as held values (and the states only by their wheres)
        members = {id(u) for u in region.members}
        inside = {id(new) for _, _, new in region.states} | {id(v) for _, v, _ in region.holds}
        for t_id in outs_of:
            if any(id(u) not in members for u in self.consumers.get(t_id, [])):
                return None
        loose = [*spec.stacks, *spec.lasts, *([spec.end] if spec.end is not None else [])]
        if any(id(t) in outs_of for t in loose) or not inside <= outs_of:
            return None
        for k in region.state_ks:   # its states are read only in the region (held values) or by the block
            p = spec.placeholders[k]
            if k in [k2 for k2, _, _ in region.holds] and any(
                    id(u) not in members for u in self.consumers.get(id(p), [])):
                return None
        return region

    def cls(self, t: Tensor) -> int:
        unit = self.producer.get(id(t))
        return INVARIANT if unit is None else unit.cls

    def _classify(self) -> None:
        while True:
            self._classify_once()
            stuck = [u for u in self.units if u.kind == "masked" and u.cls == CORE]
            if not stuck:
                return
            for unit in stuck:   # the block depends on a carried state: its calls stay in the loop one by one
                at = self.units.index(unit)
                self.units[at:at + 1] = self.regions.pop(id(unit)).members
                self.units.sort(key=lambda u: self._order[id(u.nodes[0])])
            self._index()

    def _classify_once(self) -> None:
        spec = self.spec
        constant = {k for k, (p, v) in enumerate(zip(spec.placeholders, spec.new_states)) if p is v}
        moved: set[int] = set()
        forms: dict[int, tuple] = {}
        blocked = False   # (loop.end) the end condition depends on a carried state: no state moves
        while True:
            for unit in self.units:
                unit.form = forms.get(id(unit))
                unit.cls = self._unit_class(unit, moved, constant)
            found = False
            for unit in self.units:
                if unit.cls == CORE and unit.kind == "call" and id(unit) not in forms:
                    match = self._match_form(unit, moved, constant)
                    if match is not None:
                        forms[id(unit)] = match
                        found = True
            if found:
                continue
            now = set() if spec.own_dim or blocked else {
                k for k, v in enumerate(spec.new_states) if k not in constant and self.cls(v) <= SEQUENCE}
            if now == moved:
                # With loop.end, an ended entry's states stay frozen while the axis goes on: a moved state's
                # value is its shifted sequence up to the entry's length, then the last one. The lengths come
                # from the end condition, which must then be computed outside the loop too.
                if spec.end is not None and moved and self.cls(spec.end) > SEQUENCE:
                    blocked, moved = True, set()
                    continue
                break
            moved = now
        self.moved, self.constant = moved, constant
        #: states whose values exist only as a final value of a sequence form (no value per step)
        self.seqless = {k for unit in self.units if unit.form is not None
                        for i, k in enumerate(unit.form[1]) if not rules_of(unit.call.fn).sequence_form.sequences[i]}

    def _unit_class(self, unit: _Unit, moved: set[int], constant: set[int]) -> int:
        if unit.form is not None:
            return SEQUENCE
        if unit.kind == "state":
            k = self.state_index[id(unit.nodes[0].outputs[0])]
            return INVARIANT if k in constant else SEQUENCE if k in moved else CORE
        if unit.kind in ("unstack", "index"):
            return CORE if self.spec.own_dim else SEQUENCE
        if unit.kind == "masked":   # never invariant: it carries its own states (over T')
            return SEQUENCE if max((self.cls(t) for t in unit.inputs), default=INVARIANT) <= SEQUENCE else CORE
        worst = max((self.cls(t) for t in unit.inputs), default=INVARIANT)
        if worst == INVARIANT and any(n.random for n in unit.nodes):
            return CORE   # each step draws anew (dropout of a loop-invariant value): it stays in the loop
        if worst == INVARIANT and any(is_history_of(d, self.axis) for t in unit.outputs() for d in t.dims):
            worst = SEQUENCE  # over the loop's history dim (e.g. a range over it): its size is the step's
        if worst == INVARIANT and any(self.spec.sized_per_step(d) for t in unit.outputs() for d in t.dims):
            return CORE   # over a beam whose size changes per step (e.g. a range over it)
        if unit.kind == "region" and worst == SEQUENCE and not self.spec.own_dim and self._nested_movable(unit):
            return SEQUENCE   # a nested loop on frames only: run once over the whole sequence
        if unit.kind in ("region", "verbatim") or self.spec.own_dim:
            return INVARIANT if worst == INVARIANT else CORE
        return worst

    def _nested_movable(self, unit: _Unit) -> bool:
        """Whether the nested loop `unit` can run before this loop over the whole sequence (this loop's dim one
        more batch dim): a loop over an axis whose body is made of op calls, frames, the step index and states."""
        node = unit.nodes[0]
        inner = node.region
        if node.op != "loop" or inner.own_dim or is_history_of(inner.axis, self.axis):
            return False
        return all(n.op in ("state", "unstack", "loop_index") or n.call is not None for n in inner.body.nodes)

    def _why_region_stays(self, unit: _Unit) -> str:
        node = unit.nodes[0]
        if node.op == "cond":
            return "(a Cond runs per step)"
        if self.spec.own_dim:
            return f"(the loop around it has no axis to run it over: {self.axis.name!r} is made by loop.end)"
        inner = node.region
        if inner.own_dim:
            return "(its own dim, made by loop.end, differs per step)"
        return "(its body has a region or a computation it cannot run over the whole sequence)"

    def _next_value(self, k: int) -> Tensor:
        """The value assigned to state k, before the loop's own re-layout of it."""
        t = self.spec.new_states[k]
        unit = self.producer.get(id(t))
        if unit is not None and unit.kind == "call" and rules_of(unit.call.fn).layout_only:
            return unit.call.args[0]
        return t

    def _match_form(self, unit: _Unit, moved: set[int], constant: set[int]):
        """(carried argument, states) if the call and the states it carries can run as the op's sequence form."""
        form = rules_of(unit.call.fn).sequence_form
        spec = self.spec
        if form is None or spec.own_dim or spec.end is not None:   # (loop.end: see the moved states above)
            return None
        try:
            call_args, call_kwargs = unit.call.arguments()
            bound = inspect.signature(unit.call.fn).bind(*call_args, **call_kwargs).arguments
        except TypeError:
            return None
        outs = unit.outputs()
        for name in form.carried:
            if name not in bound:
                continue
            leaves = _tensors(bound[name])
            ks = [self.state_index.get(id(t)) for t in leaves]
            if (not ks or None in ks or len(set(ks)) != len(ks) or len(ks) != len(outs)
                    or any(k in moved or k in constant for k in ks)
                    or any(self._next_value(k) is not outs[i] for i, k in enumerate(ks))):
                continue
            others_ok = all(self.cls(t) <= SEQUENCE and (arg not in form.invariant or self.cls(t) == INVARIANT)
                            for arg, value in bound.items() if arg != name for t in _tensors(value))
            if not others_ok:
                continue
            if not all(self._only_feeds_state(unit, outs[i], k)
                       for i, k in enumerate(ks) if not form.sequences[i]):
                continue
            if form.finals_ignore_end and spec.end is not None:
                continue
            return name, ks
        return None

    def _only_feeds_state(self, unit: _Unit, out: Tensor, k: int) -> bool:
        """Whether `out` is used only as state k's next value, and state k is read only by `unit`."""
        spec = self.spec
        if any(out is t for t in [*spec.stacks, *spec.lasts, *([spec.end] if spec.end is not None else [])]):
            return False
        users = [u for u in self.consumers.get(id(out), [])
                 if not (u.kind == "call" and rules_of(u.call.fn).layout_only
                         and u.outputs()[0] is spec.new_states[k])]
        readers = [u for u in self.consumers.get(id(spec.placeholders[k]), []) if u is not unit]
        return not users and not readers

    def _mark_after(self) -> None:
        """Core calls whose results are only stacked, or feed only such calls: replayed after the loop."""
        spec = self.spec
        pinned = {id(t) for t in spec.new_states} | {id(t) for t in spec.lasts}
        if spec.end is not None:
            pinned.add(id(spec.end))
        consumers: dict[int, list[_Unit]] = {}
        for unit in self.units:
            for t in unit.inputs:
                consumers.setdefault(id(t), []).append(unit)
        for unit in reversed(self.units):
            if unit.cls != CORE or unit.kind != "call":
                continue
            outs = [t for n in unit.nodes for t in n.outputs]
            if any(id(t) in pinned for t in outs):
                continue
            if any(spec.sized_per_step(d) for t in [*unit.inputs, *outs] for d in t.dims):
                continue   # (stacked, a beam whose size changes per step is padded to the widest)
            users = [u for t in outs for u in consumers.get(id(t), [])]
            unit.after = all(u.after for u in users)

    # -- values outside the loop --------------------------------------------------------------------

    def _in(self, graph: _graph.Graph, loop=None):
        """Trace into `graph`: the new body (inside this loop), the parent (around it), or the body of
        another `loop` made in the parent."""
        move = self
        loops = move._base_loops + ([move.spec] if graph is move.body else [loop] if loop is not None else [])

        class _Scope:
            def __enter__(self):
                self.saved = move.ctx.graph, list(move.ctx.loops)
                move.ctx.graph = graph
                move.ctx.loops[:] = loops

            def __exit__(self, *exc):
                move.ctx.graph, move.ctx.loops[:] = self.saved[0], self.saved[1]

        return _Scope()

    def inv(self, t: Tensor) -> Tensor:
        """The value of the invariant `t`, in the parent graph."""
        unit = self.producer.get(id(t))
        if unit is None:
            return self.rw.value(t)
        if id(t) not in self._inv:
            if unit.kind == "state":
                k = self.state_index[id(t)]
                self._inv[id(t)] = self.initial[k]
            elif unit.kind == "call":
                self._replay(unit, self.inv, self._inv)
            else:
                with self._in(self.parent):
                    new = self.rw.copy_node(unit.nodes[0], self.parent, self.inv)
                for old_t, new_t in zip(unit.nodes[0].outputs, new.outputs):
                    self._inv[id(old_t)] = new_t
            self.report.hoisted.append(unit.describe())
        return self._inv[id(t)]

    def seq(self, t: Tensor) -> Tensor:
        """The value of `t` over the whole sequence (with the loop's axis unless invariant), in the parent."""
        c = self.cls(t)
        if c == INVARIANT:
            return self.inv(t)
        assert c == SEQUENCE, t
        # (the end condition's own sequence reads the states unfrozen: see lengths)
        memo = self._seq_unfrozen if self._unfrozen and self._on_moved(t) else self._seq
        if id(t) in memo:
            return memo[id(t)]
        unit = self.producer[id(t)]
        report = self.report if memo is self._seq else LoopReport("", "")
        with self._in(self.parent):
            if unit.kind == "unstack":
                value = self.rw.value(unit.nodes[0].inputs[0])
            elif unit.kind == "index":
                if self._index_seq is None:
                    self._index_seq = _shape.range_over_dim(self.axis)
                    report.forms.append(f"step index as range_over_dim({self.axis.name}) at {unit.nodes[0].source}")
                value = self._index_seq
            elif unit.form is not None:
                self._run_form(unit)
                value = self._seq[id(t)]
            elif unit.kind == "masked":
                self._run_masked(unit)
                value = self._seq[id(t)]
            elif unit.kind == "region":
                self._run_nested(unit)
                value = self._seq[id(t)]
            elif unit.kind == "state":
                k = self.state_index[id(t)]
                new = self.with_axis(self.seq(self.spec.new_states[k]))
                value = _shape.shift_right(new, axis=self.axis, initial=self.initial[k])
                if self.spec.end is not None and not self._unfrozen:
                    # frozen after the entry's last step: its final value
                    final = self._last_frame(new, initial=self.initial[k])
                    value = _math.where(_math.le(_shape.range_over_dim(self.axis), self.lengths()), value, final)
                report.moved_states.append(self.spec.state_names[k])
            else:
                self._replay(unit, self.seq, memo)
                rule = rules_of(unit.call.fn).sequence_rule
                if rule is not None:
                    report.forms.append(f"{rule}: {unit.describe()}")
                else:
                    report.moved_in.append(unit.describe())
                value = memo[id(t)]
                if not self._varies_along_axis(value):
                    raise _CannotMove(f"{unit.describe()} loses the loop's dim when run over the sequence")
        memo[id(t)] = value
        return value

    def _on_moved(self, t: Tensor) -> bool:
        """Whether `t` depends on a moved state."""
        found = self._on_moved_memo.get(id(t))
        if found is None:
            unit = self.producer.get(id(t))
            if unit is None:
                found = False
            elif unit.kind == "state":
                found = self.state_index[id(t)] in self.moved
            else:
                found = any(self._on_moved(x) for x in unit.inputs)
            self._on_moved_memo[id(t)] = found
        return found

    def _run_form(self, unit: _Unit) -> None:
        """Compute the outputs of a call run by its op's sequence form (over the whole sequence)."""
        form = rules_of(unit.call.fn).sequence_form
        name, ks = unit.form
        call_args, call_kwargs = unit.call.arguments()
        bound = inspect.signature(unit.call.fn).bind(*call_args, **call_kwargs).arguments
        initial = {id(self.spec.placeholders[k]): self.initial[k] for k in ks}
        # every per-step argument over the loop's dim, even one that does not vary (a loop-invariant frame)
        args = {arg: _map_tree(value, (lambda x: initial[id(x)]) if arg == name else
                               self.seq if arg in form.invariant else (lambda x: self.with_axis(self.seq(x))))
                for arg, value in bound.items()}
        with self._in(self.parent):
            sequences, finals = form.run(args, name, self.axis)
        source = unit.nodes[0].source
        for out, sequence in zip(unit.outputs(), sequences):
            if sequence is not None:
                self._seq[id(out)] = sequence
        for k, final in zip(ks, finals):
            if final is not None:
                self._form_final[k] = final
        self.report.forms.append(f"{form.name or unit.call.fn.__name__} carrying "
                                 f"{', '.join(repr(self.spec.state_names[k]) for k in ks)} at {source}")

    def _run_masked(self, unit: _Unit) -> None:
        """Run a MaskedComputation block as a loop over T' (the frames where its mask is True), optimized in
        turn, and unmask its results onto the loop's dim (repeating the last True frame)."""
        region: _Region = self.regions[id(unit)]
        mc, axis = region.mc, self.axis
        with self._in(self.parent):
            mask = self.with_axis(self.seq(mc.mask))
            masked = axis.masked(mask, masked_length_dims(mask, axis))
            compress(mask, mask, axis=axis, out_dim=masked)   # gives T' its lengths, even if nothing else does
        scratch = _graph.Graph(parent=self.parent)
        body = _graph.Graph(parent=scratch)
        self.rw.keep += [scratch, body]
        values: dict[int, Tensor] = {}
        placeholders = []
        ks = [k for k, _, _ in region.states]
        for k in ks:
            p = self.spec.placeholders[k]
            new = body.add("state", (), None, [(p.dims, p.dtype, p.sparse_dim)], dict(p.node.attrs),
                           p.node.source).outputs[0]
            values[id(p)] = new
            placeholders.append(new)

        def frame_of(x: Tensor) -> Tensor:
            if id(x) in values:
                return values[id(x)]
            if self.cls(x) == INVARIANT:
                return self.inv(x)
            with self._in(self.parent):
                sequence = compress(self.with_axis(self.seq(x)), mask, axis=axis, out_dim=masked)
            with self._in(body, _SubLoop(masked, body)):
                frame = emit_unstack(body, sequence, masked, mc.source)
                values[id(x)] = _shape.to_layout(frame, x.dims)
            return values[id(x)]

        for member in region.block:
            if member.kind in ("unstack", "index"):   # a frame of an input (or the step index) read in the block
                n = member.nodes[0]
                with self._in(self.parent):
                    sequence = self.rw.value(n.inputs[0]) if member.kind == "unstack" else \
                        _shape.range_over_dim(axis)
                    sequence = compress(self.with_axis(sequence), mask, axis=axis, out_dim=masked)
                with self._in(body, _SubLoop(masked, body)):
                    frame = emit_unstack(body, sequence, masked, n.source)
                    values[id(n.outputs[0])] = _shape.to_layout(frame, n.outputs[0].dims)
                continue
            for x in member.inputs:
                frame_of(x)
            self._replay(member, frame_of, values, graph=body, loop=_SubLoop(masked, body))
        with self._in(body, _SubLoop(masked, body)):
            new_states = [_shape.to_layout(values[id(new)], p.dims) for (_, _, new), p in zip(region.states, placeholders)]
        # a state's sequence is unmasked only where the loop reads it outside the block (its final value is
        # the block loop's own final value)
        loose = {id(t) for t in [*self.spec.stacks, *self.spec.lasts]}
        seq_states = [(i, where_out) for i, (k, where_out, _) in enumerate(region.states)
                      if self.consumers.get(id(self.spec.placeholders[k])) or id(where_out) in loose
                      or id(self.spec.placeholders[k]) in loose or any(
                          u.kind != "call" or not rules_of(u.call.fn).layout_only or u.outputs()[0] is not
                          self.spec.new_states[k] for u in self.consumers.get(id(where_out), []))]
        stacked = [values[id(region.states[i][2])] for i, _ in seq_states] + \
            [values[id(v)] for _, v, _ in region.holds]
        sub = LoopSpec(axis=masked, own_dim=False, source=mc.source, body=body,
                       captured=body.captured([*new_states, *stacked]), placeholders=placeholders,
                       new_states=new_states, stacks=stacked, end=None, include_eos=True, max_len=None,
                       length_dims=_trace.length_dims(masked),
                       state_names=[self.spec.state_names[k] for k in ks], freeze=True)
        node = sub.add_node(scratch, [self.initial[k] for k in ks])
        for t in node.inputs:
            self.rw.map.setdefault(id(t), t)
        self.rw.used.update(id(t) for t in node.outputs[:len(ks)])
        self.rw.transform_loop(node, self.parent)   # the block's own loop, optimized in turn (e.g. a fused cell)
        for k, final in zip(ks, node.outputs):
            self._form_final[k] = self.rw.value(final)
        sequences = [self.rw.value(out) for out in node.outputs[len(ks):]]
        initials = [self.initial[ks[i]] for i, _ in seq_states] + [self.initial[k] for k, _, _ in region.holds]
        held = [t for _, t in seq_states] + [t for _, _, t in region.holds]
        with self._in(self.parent):
            for t, sequence, initial in zip(held, sequences, initials):
                self._seq[id(t)] = unmask(sequence, axis=masked, initial=initial)
        self.report.masked.append(f"MaskedComputation at {mc.source}: its block runs over {masked.name}, "
                                  f"the frames where the mask is True")

    def _run_nested(self, unit: _Unit) -> None:
        """Run a nested loop that reads frames but no carried state once over the whole sequence, before this
        loop: its body is replayed with this loop's dim as one more batch dim, and the new loop is optimized in
        turn (e.g. a fused cell over the inner axis, for all steps of this loop at once)."""
        old = unit.nodes[0]
        inner: LoopSpec = old.region
        axis = self.axis
        nc, ns = len(inner.captured), len(inner.placeholders)
        with self._in(self.parent):
            length_dims = _trace.length_dims(inner.axis) if inner.axis.is_dynamic else ()
            if inner.end is not None:
                length_dims = tuple(dict.fromkeys([*inner.length_dims, *length_dims, axis]))

        def outer(x: Tensor) -> Tensor:   # a value of this loop's body (or from outside it), over the sequence
            c = self.cls(x)
            if c == CORE:
                raise _CannotMove(f"internal: the nested loop at {inner.source} reads a value of the loop's core")
            return self.seq(x) if c == SEQUENCE else self.inv(x)

        scratch = _graph.Graph(parent=self.parent)
        body = _graph.Graph(parent=scratch)
        self.rw.keep += [scratch, body]
        sub = _SubLoop(inner.axis, body)
        values: dict[int, Tensor] = {}
        placeholders, initials = [], []
        for p, init in zip(inner.placeholders, old.inputs[nc:nc + ns]):
            dims = tuple(dict.fromkeys([*p.dims, *length_dims, axis]))
            with self._in(self.parent):
                init = outer(init)
                init = _shape.to_layout(_shape.expand(init, [d for d in dims if d not in init.dims]), dims)
            initials.append(init)
            new = body.add("state", (), None, [(dims, p.dtype, p.sparse_dim)], dict(p.node.attrs),
                           p.node.source).outputs[0]
            values[id(p)] = new
            placeholders.append(new)

        def value_of(x: Tensor) -> Tensor:
            return values[id(x)] if id(x) in values else outer(x)

        replayed: set[int] = set()
        for n in inner.body.nodes:
            if n.op == "unstack":
                with self._in(self.parent):
                    sequence = outer(n.inputs[0])
                with self._in(body, sub):
                    values[id(n.outputs[0])] = emit_unstack(body, sequence, inner.axis, n.source)
            elif n.op == "loop_index":
                with self._in(body, sub):
                    self.rw.copy_node(n, body)
                values[id(n.outputs[0])] = self.rw.value(n.outputs[0])
            elif n.op == "state":
                continue
            elif id(n.call) not in replayed:
                replayed.add(id(n.call))
                if rules_of(n.call.fn).layout_only:   # (a layout is no part of the meaning; the new one has more dims)
                    values[id(n.call.outputs)] = value_of(n.call.args[0])
                    continue
                self._replay(_Unit([n], n.call, "call"), value_of, values, graph=body, loop=sub)

        def widened(x: Tensor, dims: tuple) -> Tensor:
            x = value_of(x)
            dims = tuple(dict.fromkeys([*dims, *x.dims]))
            return _shape.to_layout(_shape.expand(x, [d for d in dims if d not in x.dims]), dims)

        with self._in(body, sub):
            new_states = [widened(v, p.dims) for v, p in zip(inner.new_states, placeholders)]
            stacks = [value_of(v) for v in inner.stacks]
            lasts = [widened(v, tuple(dict.fromkeys([*v.dims, *length_dims]))) for v in inner.lasts]
            end = value_of(inner.end) if inner.end is not None else None
        max_len = inner.max_len
        if isinstance(max_len, Tensor):
            with self._in(self.parent):
                max_len = outer(old.inputs[nc + ns])
        returned = [*new_states, *stacks, *lasts, *([end] if end is not None else [])]
        spec = LoopSpec(axis=inner.axis, own_dim=False, source=inner.source, body=body,
                        captured=body.captured(returned), placeholders=placeholders, new_states=new_states,
                        stacks=stacks, end=end, include_eos=inner.include_eos, max_len=max_len,
                        length_dims=length_dims, state_names=list(inner.state_names), freeze=inner.freeze,
                        freeze_past_length=inner.freeze_past_length)
        node = spec.add_node(scratch, initials)
        for v in lasts:
            spec.add_last(v)
        for t in node.inputs:
            self.rw.map.setdefault(id(t), t)
        self.rw.used.update(id(t) for t in node.outputs)
        self.rw.transform_loop(node, self.parent)   # optimized in turn
        for o, n in zip(old.outputs, node.outputs):
            self._seq[id(o)] = self.rw.value(n)
        self.report.moved_in.append(f"loop over {inner.axis.name!r} at {inner.source}, run once for all steps "
                                    f"({axis.name!r} one more batch dim)")

    def _varies_along_axis(self, value: Tensor) -> bool:
        """Whether a sequence value has the loop's dim, or a dim whose lengths run over it (a history)."""
        return any(d is self.axis or (d.is_dynamic and self.axis in d.length_dims) for d in value.dims)

    def with_axis(self, value: Tensor) -> Tensor:
        with self._in(self.parent):
            return _shape.expand(value, [self.axis]) if self.axis not in value.dims else value

    def _replay(self, unit: _Unit, value_of, memo: dict, graph=None, loop=None) -> None:
        """Run the unit's call again on the inputs given by `value_of`, in the parent graph (or `graph`, the
        body of `loop`)."""
        call = unit.call

        def sub(x):
            return value_of(x) if isinstance(x, Tensor) else x

        call_args, call_kwargs = call.arguments()
        args = [_map_tree(a, sub) for a in call_args]
        kwargs = {k: _map_tree(v, sub) for k, v in call_kwargs.items()}
        with self._in(graph or self.parent, loop):
            try:
                result = call.fn(*args, **kwargs)
            except LoopliftError as e:
                raise _CannotMove(f"{unit.describe()} cannot run over the whole sequence: {e}") from e
        source = unit.nodes[0].source
        for n in self.ctx.last_call.nodes:
            n.source = source
        old, _ = flatten(call.outputs, lambda v: isinstance(v, Tensor))
        new, _ = flatten(result, lambda v: isinstance(v, Tensor))
        for o, v in zip(old, new):
            if isinstance(o, Tensor):
                memo[id(o)] = v

    # -- the rewrite ------------------------------------------------------------------------------------

    def run(self) -> None:
        spec, node = self.spec, self.node
        self._units()
        self._classify()
        self._mark_after()
        nc, ns = len(spec.captured), len(spec.placeholders)
        self.initial = [self.rw.value(t) for t in node.inputs[nc:nc + ns]]
        max_len = self.rw.value(node.inputs[nc + ns]) if isinstance(spec.max_len, Tensor) else spec.max_len
        core = [u for u in self.units if u.cls == CORE and not u.after and u.kind != "state"]
        carried = [k for k in range(ns) if k not in self.moved and k not in self.constant]
        self.loop_stays = bool(core or carried or spec.own_dim)
        after_inputs = [t for u in self.units if u.after for t in u.inputs
                        if self.cls(t) == CORE and not self.producer[id(t)].after]
        for unit in self.units:
            name = "after" if unit.after else "masked" if unit.kind == "masked" else \
                ["invariant", "sequence", "core"][unit.cls]
            self.report.node_class.update({id(n): name for n in unit.nodes})
        stacked_core: dict[int, Tensor] = {}
        new_node = None
        if self.loop_stays:
            new_node, stacked_core = self._build_loop(core, after_inputs, max_len)
        else:
            self.report.loop_removed = True
        self._map_outputs(new_node, stacked_core)
        for unit in core:
            self.report.stayed.append((unit.describe(), self._chain(unit)))

    def _build_loop(self, core: list[_Unit], after_inputs: list[Tensor], max_len):
        spec, rw = self.spec, self.rw
        body = _graph.Graph(parent=self.parent)
        self.body = body
        placeholders = []
        outs = self.node.outputs
        final_used = [id(outs[k]) in self.rw.used for k in range(len(spec.placeholders))]
        # States moved out leave the loop: their values per step are frames of their shifted sequences.
        # (Loops with loop.end move no states: an ended entry's state is frozen, not shifted.)
        self.kept = [k for k in range(len(spec.placeholders)) if k not in self.seqless and k not in self.moved]
        self.freeze = any(final_used[k] for k in self.kept)
        with self._in(body):
            for k in self.kept:
                p = spec.placeholders[k]
                new = body.add("state", (), None, [(p.dims, p.dtype, p.sparse_dim)], dict(p.node.attrs),
                               p.node.source).outputs[0]
                rw.map[id(p)] = new
                placeholders.append(new)
            for unit in core:
                if unit.kind == "region" and unit.nodes[0].op == "loop":
                    for t in unit.inputs:
                        self.in_body(t)
                    rw.transform_loop(unit.nodes[0], body)
                elif unit.kind in ("unstack", "index"):
                    for n in unit.nodes:
                        rw.copy_node(n, body, self.in_body)
                else:
                    for n in unit.nodes:
                        if self._hoistable(n):   # a part of the call that depends on nothing of the step
                            with self._in(self.parent):
                                rw.copy_node(n, self.parent, self._outer_value)
                            self.report.hoisted.append(f"{n.op} (part of {unit.describe()})")
                        else:
                            rw.copy_node(n, body, self.in_body)
            new_states = [self.in_body(spec.new_states[k]) for k in self.kept]
            end = self.in_body(spec.end) if spec.end is not None else None
            core_stacks = [v for v in spec.stacks if self.cls(v) == CORE and not self.producer[id(v)].after]
            extra = [t for t in after_inputs if not any(t is v for v in core_stacks)]
            stack_values = [self.in_body(v) for v in core_stacks + extra]
            lasts = [self.in_body(v) for v in spec.lasts]
        returned = [*new_states, *stack_values, *lasts, *([end] if end is not None else [])]
        new_spec = LoopSpec(
            axis=spec.axis, own_dim=spec.own_dim, source=spec.source, body=body,
            captured=body.captured(returned), placeholders=placeholders, new_states=new_states,
            stacks=stack_values, end=end, include_eos=spec.include_eos, max_len=max_len,
            length_dims=spec.length_dims, state_names=[spec.state_names[k] for k in self.kept],
            # (over an axis, an entry's frames after its loop.end are still stacked: from its frozen states)
            freeze=self.freeze or (spec.end is not None and not spec.own_dim and bool(stack_values)),
            freeze_past_length=self.freeze or spec.freeze_past_length and not (spec.end is not None
                                                                              and not spec.own_dim),
            stop_at_max_len=spec.stop_at_max_len, beam=spec.beam, also_steps=spec.also_steps)
        new_node = new_spec.add_node(self.parent, [self.initial[k] for k in self.kept])
        for v in lasts:
            new_spec.add_last(v)
        n = len(placeholders)
        stacked_core = {id(v): new_node.outputs[n + i] for i, v in enumerate(core_stacks + extra)}
        return new_node, stacked_core

    def _hoistable(self, n: _graph.Node) -> bool:
        """Whether the body node `n` (of a call that stays in the loop) reads only values from outside the
        loop: it is computed once, before the loop."""
        if n.kernel is None or n.op in ("state", "unstack", "loop_index", "loop", "cond") or n.random:
            return False
        if any(self.spec.sized_per_step(d) for t in n.outputs for d in t.dims):
            return False   # (over a beam whose size changes per step)
        return all(self.cls(t) == INVARIANT or self._hoisted(t) for t in n.inputs)

    def _hoisted(self, t: Tensor) -> bool:
        return id(t) in self.rw.map and self.producer.get(id(t)) is not None and \
            self.rw.map[id(t)].node is not None and self.rw.map[id(t)].node.graph is self.parent

    def _outer_value(self, t: Tensor) -> Tensor:
        return self.rw.map[id(t)] if self._hoisted(t) else self.inv(t)

    def in_body(self, t: Tensor) -> Tensor:
        """The value of the old body tensor `t` in the new body, in its old layout."""
        if id(t) in self.rw.map:
            return self.rw.map[id(t)]
        c = self.cls(t)
        if c == INVARIANT:
            value = self.rw.map[id(t)] = self.inv(t)
            return value
        if c == CORE and self.producer[id(t)].after:
            raise _CannotMove("internal: a value computed after the loop is needed inside it")
        assert c == SEQUENCE, t
        sequence = self.with_axis(self.seq(t))
        with self._in(self.body):
            frame = emit_unstack(self.body, sequence, self.axis, self.producer[id(t)].nodes[0].source)
            value = self.rw.map[id(t)] = _shape.to_layout(frame, t.dims)
        return value

    def _map_outputs(self, new_node, stacked_core: dict[int, Tensor]) -> None:
        spec, node, rw = self.spec, self.node, self.rw
        ns = len(spec.placeholders)
        outs = node.outputs
        with self._in(self.parent):
            masked_states = {k for r in self.regions.values() for k, _, _ in r.states}
            for k in range(ns):
                if k in self.seqless or (k in masked_states and id(outs[k]) in rw.used):
                    value = self._final_of_form(k)
                elif new_node is not None and k in self.kept:
                    value = new_node.outputs[self.kept.index(k)]
                elif id(outs[k]) not in rw.used:
                    continue  # nothing reads this final value
                elif k in self.constant:
                    value = self.initial[k]
                else:
                    value = self._last_frame(self.with_axis(self.seq(spec.new_states[k])), initial=self.initial[k])
                rw.map[id(outs[k])] = _shape.to_layout(value, outs[k].dims)
            after: dict[int, Tensor] = {}
            for j, v in enumerate(spec.stacks):
                out = outs[ns + j]
                c = self.cls(v)
                if c == CORE and self.producer[id(v)].after:
                    value = self._after(v, stacked_core, after)
                elif c == CORE:
                    value = stacked_core[id(v)]
                else:
                    value = self.with_axis(self.seq(v))
                rw.map[id(out)] = _shape.to_layout(value, out.dims)
            for j, v in enumerate(spec.lasts):
                out = outs[ns + len(spec.stacks) + j]
                if new_node is not None:
                    value = new_node.outputs[len(new_node.outputs) - len(spec.lasts) + j]
                else:
                    value = self._last_frame(self.with_axis(self.seq(v)))
                rw.map[id(out)] = _shape.to_layout(value, out.dims)

    def _final_of_form(self, k: int) -> Tensor:
        """The final value of state k, computed by its sequence form, or by the masked block's own loop."""
        if k not in self._form_final:
            unit = next((u for u in self.units if u.form is not None and k in u.form[1]), None)
            if unit is not None:
                self._run_form(unit)
            else:
                unit = next(u for u in self.units if u.kind == "masked"
                            and k in [k2 for k2, _, _ in self.regions[id(u)].states])
                self._run_masked(unit)
        return self._form_final[k]

    def _after(self, t: Tensor, stacked_core: dict[int, Tensor], memo: dict) -> Tensor:
        """The sequence of the core value `t`, by replaying after the loop what computes it."""
        unit = self.producer[id(t)]
        if not unit.after:
            return stacked_core[id(t)]
        if id(t) not in memo:
            def value_of(x):
                c = self.cls(x)
                if c == CORE:
                    return self._after(x, stacked_core, memo)
                return self.seq(x)
            self._replay(unit, value_of, memo)
            self.report.moved_out.append(unit.describe())
        return memo[id(t)]

    def lengths(self) -> Tensor:
        """Each entry's number of steps, computed outside the loop (for a loop that is gone)."""
        if self._lengths is None:
            spec, axis = self.spec, self.axis
            if spec.end is None:
                n = _shape.length(axis)
            else:
                # The end condition at step t matters only while the entry has not ended, where its states are
                # not frozen yet: it reads them as plain shifted sequences (which need no lengths).
                self._unfrozen = True
                try:
                    ended = self.with_axis(self.seq(spec.end))
                finally:
                    self._unfrozen = False
                count = _math.cast(ended, torch.int64)
                before = _math.gt(_math.sub(_reduce.cumsum(count, axis=axis), count), 0)
                counted = _math.logical_not(before)
                if not spec.include_eos:
                    counted = _math.logical_and(counted, _math.logical_not(ended))
                n = _reduce.sum(_math.cast(counted, torch.int64), axis=axis)
            self._lengths = n
        return self._lengths

    def _last_frame(self, sequence: Tensor, initial: Tensor | None = None) -> Tensor:
        """Frame ``length - 1`` of `sequence` per entry (`initial`, else zeros as in the loop, where the length
        is 0)."""
        n = self.lengths()
        last = gather(sequence, index=_math.maximum(_math.sub(n, 1), 0), axis=self.axis)
        if initial is None:
            initial = _shape.zeros([], dtype=last.dtype)
        return _math.where(_math.gt(n, 0), last, initial)

    def _chain(self, unit: _Unit) -> list[str]:
        """The calls that keep `unit` in the loop: a path back to a carried state."""
        chain, seen = [unit.describe()], {id(unit)}
        while unit.kind != "state":
            nxt = next((self.producer[id(t)] for t in unit.inputs
                        if self.cls(t) == CORE and id(t) in self.producer), None)
            if nxt is None and unit.kind == "region":
                chain.append(self._why_region_stays(unit))
            elif nxt is None and unit.kind in ("index", "unstack"):
                chain.append("(the step counter of a loop made by loop.end: its steps are known only as it runs)")
            if nxt is None or id(nxt) in seen:
                break
            seen.add(id(nxt))
            unit = nxt
            chain.append(unit.describe())
        return chain


@dataclass
class _SubLoop:
    """What ops traced in the body of a loop made by the pass see of it (``ctx.loops``)."""

    axis: Dim
    body: _graph.Graph


def _used_tensors(graph: _graph.Graph) -> set[int]:
    """ids of the tensors any node of `graph` (or of the regions inside it) takes as input."""
    used: set[int] = set()
    for node in graph.nodes:
        used.update(id(t) for t in node.inputs)
        if node.region is not None:
            for body, returned in node.region.regions():
                used.update(_used_tensors(body))
                used.update(id(t) for t in returned)
    return used


def _tensors(value) -> list[Tensor]:
    leaves, _ = flatten(value, lambda v: isinstance(v, Tensor))
    return [t for t in leaves if isinstance(t, Tensor)]


def _map_tree(value, fn):
    leaves, spec = flatten(value, lambda v: isinstance(v, Tensor))
    from .._tree import unflatten
    return unflatten(spec, [fn(x) if isinstance(x, Tensor) else x for x in leaves])
