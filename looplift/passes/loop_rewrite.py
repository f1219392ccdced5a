"""The rewrite of the move-out pass: one loop rebuilt from its plan, before, inside and after the loop.

Given a :class:`~.loop_plan.LoopPlan`, the loop's body values are computed
where the plan puts them, by replaying their recorded op calls on other
inputs (:meth:`LoopRewrite.replay`):

* invariant values once, in the graph around the loop (:meth:`LoopRewrite.invariant`);
* sequence values over the whole sequence, there too
  (:meth:`LoopRewrite.sequence`): a frame becomes the unstacked input, the
  step index a range, a moved state its next value shifted by one step, a call
  with a sequence form that form, a MaskedComputation block a loop over T'
  (:mod:`.masked_blocks`), a nested loop on frames one loop for all steps
  (:mod:`.nested_loops`);
* what stays builds a new loop whose body reads frame t of the sequence
  values (:meth:`LoopRewrite.body_value`);
* what is only stacked is replayed after that loop on its stacked sequences.

If nothing is left in the loop, it is gone. A value that cannot be computed
where the plan puts it raises :class:`~.report.CannotMove`, and the pass
leaves the whole loop as it was (:mod:`.move_out`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .. import trace as _trace
from .._tree import flatten, unflatten
from ..dims import Dim
from ..errors import LoopliftError
from ..graph import Graph, Node, Op
from ..ops import math as _math
from ..ops import reduce as _reduce
from ..ops import shape as _shape
from ..ops.index import gather
from ..regions import CondSpec, LoopSpec, emit_unstack, mixes_entries
from ..rules import rules_of
from ..source import user_source_line
from ..tensor import Tensor
from . import masked_blocks, nested_loops
from .loop_plan import LoopPlan, Place, Unit, bound_arguments
from .report import CannotMove, LoopReport

__all__ = ["LoopRewrite", "PassLoop", "map_tree"]


@contextlib.contextmanager
def _sourced(source: str, here: str) -> Iterator[None]:
    """Nodes emitted in the block for a unit of the loop name the unit's `source`, not `here`, the line that
    called the pass (the trace's caller). Nodes a replay already gave their own line keep it."""
    graph = _trace.current().graph
    start = len(graph.nodes)
    yield
    for node in graph.nodes[start:]:
        if node.source == here:
            node.source = source


@dataclass
class PassLoop:
    """What ops traced in the body of a loop made by the pass see of it (``ctx.loops``)."""

    axis: Dim
    body: Graph


class LoopRewrite:
    """The rewrite of one loop (`node`, whose record is `spec`) into `parent`; `rw` is the pass's rewriter
    (:class:`.move_out.Rewriter`: the map from old tensors to new ones, the loops' reports)."""

    def __init__(self, rw, spec: LoopSpec, node: Node, parent: Graph, report: LoopReport,
                 kept: dict | None = None):
        self.rw, self.spec, self.node, self.parent, self.report = rw, spec, node, parent, report
        #: the parts kept in the loop because they could not move (see :class:`.report.CannotMove`)
        self.kept_parts = kept or {}
        self.ctx = rw.ctx
        self.axis: Dim = spec.axis
        self.plan: LoopPlan | None = None
        #: the new body (once built)
        self.body: Graph | None = None
        #: values computed before the loop: over the whole sequence, and invariant
        self.sequences: dict[int, Tensor] = {}
        self._invariants: dict[int, Tensor] = {}
        #: final values of states computed by a sequence form (or a masked block's own loop)
        self.finals: dict[int, Tensor] = {}
        self._index_seq: Tensor | None = None
        self._lengths: Tensor | None = None
        self._unfrozen = False
        self._seq_unfrozen: dict[int, Tensor] = {}
        self._on_moved_memo: dict[int, bool] = {}
        self._base_loops = list(rw.ctx.loops)

    # -- tracing into the new graphs ----------------------------------------------------------------------

    @staticmethod
    def sub_loop(axis: Dim, body: Graph) -> PassLoop:
        """What ops traced in `body`, the body of a loop over `axis` that the pass makes, see of that loop."""
        return PassLoop(axis, body)

    @contextlib.contextmanager
    def inside(self, graph: Graph, loop: PassLoop | None = None) -> Iterator[None]:
        """Trace into `graph`: the new body (inside this loop), the parent (around it), or the body of
        another `loop` made in the parent."""
        loops = self._base_loops + ([self.spec] if graph is self.body else [loop] if loop is not None else [])
        with self.ctx.inside(graph, loops=loops):
            yield

    def replay(self, unit: Unit, value_of, memo: dict, graph: Graph | None = None,
               loop: PassLoop | None = None) -> None:
        """Run the unit's call again on the inputs given by `value_of`, in the parent graph (or `graph`, the
        body of `loop`); `memo` gets the new value of each of the call's outputs."""
        call = unit.call

        def sub(x):
            return value_of(x) if isinstance(x, Tensor) else x

        call_args, call_kwargs = call.arguments()
        args = [map_tree(a, sub) for a in call_args]
        kwargs = {k: map_tree(v, sub) for k, v in call_kwargs.items()}
        with self.inside(graph or self.parent, loop):
            try:
                result = call.fn(*args, **kwargs)
            except LoopliftError as e:
                raise CannotMove(f"{unit.describe()} cannot run over the whole sequence: {e.message}",
                                 part=id(unit.nodes[0])) from e
        source = unit.nodes[0].source
        for n in self.ctx.last_call.nodes:
            n.source = source
        old, _ = flatten(call.outputs, _is_tensor)
        new, _ = flatten(result, _is_tensor)
        for o, v in zip(old, new):
            if isinstance(o, Tensor):
                memo[id(o)] = v

    # -- values before the loop ---------------------------------------------------------------------------

    def invariant(self, t: Tensor) -> Tensor:
        """The value of the invariant `t`, in the parent graph."""
        plan = self.plan
        unit = plan.producer.get(id(t))
        if unit is None:
            return self.rw.value(t)
        if id(t) not in self._invariants:
            if unit.kind == "state":
                self._invariants[id(t)] = self.initial[plan.state_index[id(t)]]
            elif unit.kind == "call":
                self.replay(unit, self.invariant, self._invariants)
            else:
                with self.inside(self.parent):
                    new = self.rw.copy_node(unit.nodes[0], self.parent, self.invariant)
                for old_t, new_t in zip(unit.nodes[0].outputs, new.outputs):
                    self._invariants[id(old_t)] = new_t
            self.report.hoisted.append(unit.describe())
        return self._invariants[id(t)]

    def sequence(self, t: Tensor) -> Tensor:
        """The value of `t` over the whole sequence (with the loop's axis unless invariant), in the parent."""
        plan = self.plan
        place = plan.place(t)
        if place == Place.INVARIANT:
            return self.invariant(t)
        assert place == Place.SEQUENCE, t
        # (the end condition's own sequence reads the states unfrozen: see lengths)
        memo = self._seq_unfrozen if self._unfrozen and self._on_moved(t) else self.sequences
        if id(t) in memo:
            return memo[id(t)]
        unit = plan.producer[id(t)]
        report = self.report if memo is self.sequences else LoopReport("", "")
        if unit.kind == "state":   # (the shifted sequence of a state's values: where its new value is computed)
            new_value = self.spec.new_states[plan.state_index[id(t)]]
            source = new_value.node.source if new_value.node is not None else self.spec.source
        else:
            source = unit.nodes[0].source
        with self.inside(self.parent), _sourced(source, user_source_line()):
            if unit.kind == "unstack":
                value = self.rw.value(unit.nodes[0].inputs[0])
            elif unit.kind == "index":
                if self._index_seq is None:
                    self._index_seq = _shape.range_over_dim(self.axis)
                    report.sequence_forms.append(f"step index as range_over_dim({self.axis.name}) at "
                                                 f"{unit.nodes[0].source}")
                value = self._index_seq
            elif unit.form is not None:
                self.run_form(unit)
                value = self.sequences[id(t)]
            elif unit.kind == "masked":
                masked_blocks.run(self, plan.blocks[id(unit)])
                value = self.sequences[id(t)]
            elif unit.kind == "region":
                nested_loops.run(self, unit)
                value = self.sequences[id(t)]
            elif unit.kind == "state":
                k = plan.state_index[id(t)]
                new = self.with_axis(self.sequence(self.spec.new_states[k]))
                value = _shape.shift_right(new, axis=self.axis, initial=self.initial[k])
                if self.spec.end is not None and not self._unfrozen and not plan.full_length:
                    # frozen after the entry's last step: its final value
                    final = self.last_frame(new, initial=self.initial[k])
                    value = _math.where(_math.le(_shape.range_over_dim(self.axis), self.lengths()), value, final)
                report.moved_states.append(self.spec.state_names[k])
            else:
                self.replay(unit, self.sequence, memo)
                rule = rules_of(unit.call.fn).sequence_rule
                if rule is not None:
                    report.sequence_forms.append(f"{rule}: {unit.describe()}")
                else:
                    report.before_loop.append(unit.describe())
                value = memo[id(t)]
                if not self._varies_along_axis(value):
                    raise CannotMove(f"{unit.describe()} loses the loop's dim when run over the sequence",
                                     part=id(unit.nodes[0]))
        memo[id(t)] = value
        return value

    def _on_moved(self, t: Tensor) -> bool:
        """Whether `t` depends on a moved state."""
        found = self._on_moved_memo.get(id(t))
        if found is None:
            plan = self.plan
            unit = plan.producer.get(id(t))
            if unit is None:
                found = False
            elif unit.kind == "state":
                found = plan.state_index[id(t)] in plan.moved
            else:
                found = any(self._on_moved(x) for x in unit.inputs)
            self._on_moved_memo[id(t)] = found
        return found

    def run_form(self, unit: Unit) -> None:
        """Compute the outputs of a call run by its op's sequence form (over the whole sequence)."""
        form = rules_of(unit.call.fn).sequence_form
        name, ks = unit.form
        bound = bound_arguments(unit.call)
        initial = {id(self.spec.placeholders[k]): self.initial[k] for k in ks}
        # every per-step argument over the loop's dim, even one that does not vary (a loop-invariant frame)
        args = {arg: map_tree(value, (lambda x: initial[id(x)]) if arg == name else
                              self.sequence if arg in form.invariant else
                              (lambda x: self.with_axis(self.sequence(x))))
                for arg, value in bound.items()}
        with self.inside(self.parent):
            sequences, finals = form.run(args, name, self.axis)
        source = unit.nodes[0].source
        for out, sequence in zip(unit.outputs(), sequences):
            if sequence is not None:
                self.sequences[id(out)] = sequence
        for k, final in zip(ks, finals):
            if final is not None:
                self.finals[k] = final
        self.report.sequence_forms.append(f"{form.name or unit.call.fn.__name__} carrying "
                                          f"{', '.join(repr(self.spec.state_names[k]) for k in ks)} at {source}")

    def _varies_along_axis(self, value: Tensor) -> bool:
        """Whether a sequence value has the loop's dim, or a dim whose lengths run over it (a history)."""
        return any(d is self.axis or (d.is_dynamic and self.axis in d.length_dims) for d in value.dims)

    def with_axis(self, value: Tensor) -> Tensor:
        """`value` (in the parent) with the loop's dim, broadcast along it if it has it not."""
        with self.inside(self.parent):
            return _shape.expand(value, [self.axis]) if self.axis not in value.dims else value

    # -- the rewrite ----------------------------------------------------------------------------------------

    def run(self) -> None:
        spec, node = self.spec, self.node
        plan = self.plan = LoopPlan(spec, kept=self.kept_parts)
        nc, ns = len(spec.captured), len(spec.placeholders)
        #: the states' initial values in the new graph
        self.initial = [self.rw.value(t) for t in node.inputs[nc:nc + ns]]
        self.report.node_place.update(plan.node_places())
        self.report.layout_only.update(u.describe() for u in plan.units
                                       if u.call is not None and rules_of(u.call.fn).layout_only)
        if plan.full_length:
            self._checked(self._rewrite)
        else:
            self._rewrite()

    def _rewrite(self) -> None:
        spec, node, plan = self.spec, self.node, self.plan
        nc, ns = len(spec.captured), len(spec.placeholders)
        max_len = self.rw.value(node.inputs[nc + ns]) if isinstance(spec.max_len, Tensor) else spec.max_len
        core = [u for u in plan.units if u.place == Place.CORE and not u.after and u.kind != "state"]
        carried = [k for k in range(ns) if k not in plan.moved and k not in plan.constant]
        after_inputs = [t for u in plan.units if u.after for t in u.inputs
                        if plan.place(t) == Place.CORE and not plan.producer[id(t)].after]
        stacked_core: dict[int, Tensor] = {}
        new_node = None
        if core or carried or spec.own_dim:
            new_node, stacked_core = self._build_loop(core, after_inputs, max_len)
        else:
            self.report.loop_removed = True
        self._map_outputs(new_node, stacked_core)
        for unit in core:
            self.report.stayed.append((unit.describe(), plan.chain(unit)))

    def _checked(self, rewrite) -> None:
        """Run `rewrite` (which assumes that no entry ends before its axis length, see
        :attr:`LoopPlan.full_length`) in one branch of a Cond, and the loop as traced in the other, chosen at
        run time by whether some entry ends early. The lengths come from the end condition, computed before
        the loop."""
        outer, outs = self.parent, self.node.outputs
        with self.inside(outer):
            early = _math.lt(self.lengths(), _shape.length(self.axis))
            if early.dims:
                early = _math.gt(_reduce.max(_math.cast(early, torch.int64), axis=list(early.dims)), 0)
        branches = {True: Graph(parent=outer), False: Graph(parent=outer)}
        self.parent = branches[False]
        try:
            rewrite()
        finally:
            self.parent = outer
        returned = [o for o in outs if id(o) in self.rw.map]
        values = {False: [self.rw.map[id(o)] for o in returned]}
        self.rw.copy_node(self.node, branches[True])   # (as traced: step by step, ended entries frozen)
        values[True] = [self.rw.map[id(o)] for o in returned]
        captured = list({id(t): t for b in (True, False) for t in branches[b].captured(values[b])}.values())
        node = outer.add(Op.COND, (early, *captured), None, [(o.dims, o.dtype, o.sparse_dim) for o in returned],
                         source=self.spec.source, region=CondSpec(branches, captured, values))
        for old, new in zip(returned, node.outputs):
            self.rw.map[id(old)] = new
        self.report.checked_end = (f"it runs as traced, step by step, for a batch where an entry ends (loop.end) "
                                   f"before its length along {self.axis.name!r}")

    def _build_loop(self, core: list[Unit], after_inputs: list[Tensor], max_len):
        spec, rw, plan = self.spec, self.rw, self.plan
        body = Graph(parent=self.parent)
        self.body = body
        placeholders = []
        outs = self.node.outputs
        final_used = [id(outs[k]) in self.rw.used for k in range(len(spec.placeholders))]
        # States moved out leave the loop: their values per step are frames of their shifted sequences.
        # (Loops with loop.end move no states: an ended entry's state is frozen, not shifted.)
        self.kept = [k for k in range(len(spec.placeholders)) if k not in plan.final_only and k not in plan.moved]
        # An ended entry's states need not be frozen when nothing reads them: its frames after its end are
        # padding; unless a step computes an entry from the others (a mean over the batch), which read them.
        freeze = any(final_used[k] for k in self.kept) or (
            spec.end is not None and any(mixes_entries(spec.body, d) for d in spec.length_dims))
        with self.inside(body):
            for k in self.kept:
                p = spec.placeholders[k]
                new = body.add(Op.STATE, (), None, [(p.dims, p.dtype, p.sparse_dim)], dict(p.node.attrs),
                               p.node.source, on_behalf_of=p.node.on_behalf_of).outputs[0]
                rw.map[id(p)] = new
                placeholders.append(new)
            for unit in core:
                if unit.kind == "region" and unit.nodes[0].op == Op.LOOP:
                    for t in unit.inputs:
                        self.body_value(t)
                    rw.transform_loop(unit.nodes[0], body)
                elif unit.kind in ("unstack", "index"):
                    for n in unit.nodes:
                        rw.copy_node(n, body, self.body_value)
                else:
                    for n in unit.nodes:
                        if self._hoistable(n):   # a part of the call that depends on nothing of the step
                            with self.inside(self.parent):
                                rw.copy_node(n, self.parent, self._outer_value)
                            if n.op != Op.CONSTANT:   # (a number: nothing to tell)
                                self.report.hoisted.append(f"{n.op} (part of {unit.describe()})")
                        else:
                            rw.copy_node(n, body, self.body_value)
            new_states = [self.body_value(spec.new_states[k]) for k in self.kept]
            end = self.body_value(spec.end) if spec.end is not None else None
            core_stacks = [v for v in spec.stacks if plan.place(v) == Place.CORE and not plan.producer[id(v)].after]
            extra = [t for t in after_inputs if not any(t is v for v in core_stacks)]
            stack_values = [self.body_value(v) for v in core_stacks + extra]
            lasts = [self.body_value(v) for v in spec.lasts]
        returned = [*new_states, *stack_values, *lasts, *([end] if end is not None else [])]
        new_spec = LoopSpec(
            axis=spec.axis, own_dim=spec.own_dim, source=spec.source, body=body,
            captured=body.captured(returned), placeholders=placeholders, new_states=new_states,
            stacks=stack_values, end=end, include_eos=spec.include_eos, max_len=max_len,
            length_dims=spec.length_dims, state_names=[spec.state_names[k] for k in self.kept],
            # (over an axis, an entry's frames after its loop.end are still stacked: from its frozen states)
            freeze=freeze or (spec.end is not None and not spec.own_dim and bool(stack_values)),
            freeze_past_length=freeze or spec.freeze_past_length and not (spec.end is not None
                                                                         and not spec.own_dim),
            stop_at_max_len=spec.stop_at_max_len, beam=spec.beam, fixed_beam=spec.fixed_beam,
            also_steps=spec.also_steps)
        new_node = new_spec.add_node(self.parent, [self.initial[k] for k in self.kept])
        for v in lasts:
            new_spec.add_last(v)
        n = len(placeholders)
        stacked_core = {id(v): new_node.outputs[n + i] for i, v in enumerate(core_stacks + extra)}
        return new_node, stacked_core

    def _hoistable(self, n: Node) -> bool:
        """Whether the body node `n` (of a call that stays in the loop) reads only values from outside the
        loop: it is computed once, before the loop."""
        if n.kernel is None or n.op in (Op.STATE, Op.UNSTACK, Op.LOOP_INDEX, Op.LOOP, Op.COND) or n.random:
            return False
        if any(self.spec.sized_per_step(d) for t in n.outputs for d in t.dims):
            return False   # (over a beam whose size changes per step)
        return all(self.plan.place(t) == Place.INVARIANT or self._hoisted(t) for t in n.inputs)

    def _hoisted(self, t: Tensor) -> bool:
        return id(t) in self.rw.map and self.plan.producer.get(id(t)) is not None and \
            self.rw.map[id(t)].node is not None and self.rw.map[id(t)].node.graph is self.parent

    def _outer_value(self, t: Tensor) -> Tensor:
        return self.rw.map[id(t)] if self._hoisted(t) else self.invariant(t)

    def body_value(self, t: Tensor) -> Tensor:
        """The value of the old body tensor `t` in the new body, in its old layout."""
        if id(t) in self.rw.map:
            return self.rw.map[id(t)]
        plan = self.plan
        place = plan.place(t)
        if place == Place.INVARIANT:
            value = self.rw.map[id(t)] = self.invariant(t)
            return value
        if place == Place.CORE and plan.producer[id(t)].after:
            raise CannotMove("internal: a value computed after the loop is needed inside it")
        assert place == Place.SEQUENCE, t
        sequence = self.with_axis(self.sequence(t))
        source = plan.producer[id(t)].nodes[0].source
        with self.inside(self.body), _sourced(source, user_source_line()):
            frame = emit_unstack(self.body, sequence, self.axis, source)
            value = self.rw.map[id(t)] = _shape.to_layout(frame, t.dims)
        return value

    # -- values after the loop ------------------------------------------------------------------------------

    def _map_outputs(self, new_node: Node | None, stacked_core: dict[int, Tensor]) -> None:
        """Map every output of the old loop node to its value after the rewrite."""
        spec, node, rw, plan = self.spec, self.node, self.rw, self.plan
        ns = len(spec.placeholders)
        outs = node.outputs
        # (what is emitted here for the loop's results, e.g. their layouts, names the loop's line)
        with self.inside(self.parent), _sourced(spec.source, user_source_line()):
            masked_states = {k for b in plan.blocks.values() for k, _, _ in b.states}
            for k in range(ns):
                if k in plan.final_only or (k in masked_states and id(outs[k]) in rw.used):
                    value = self.final_of_form(k)
                elif new_node is not None and k in self.kept:
                    value = new_node.outputs[self.kept.index(k)]
                elif id(outs[k]) not in rw.used:
                    continue  # nothing reads this final value
                elif k in plan.constant:
                    value = self.initial[k]
                else:
                    value = self.last_frame(self.with_axis(self.sequence(spec.new_states[k])), initial=self.initial[k])
                rw.map[id(outs[k])] = _shape.to_layout(value, outs[k].dims)
            after: dict[int, Tensor] = {}
            for j, v in enumerate(spec.stacks):
                out = outs[ns + j]
                place = plan.place(v)
                if place == Place.CORE and plan.producer[id(v)].after:
                    value = self._after_value(v, stacked_core, after)
                elif place == Place.CORE:
                    value = stacked_core[id(v)]
                else:
                    value = self.with_axis(self.sequence(v))
                rw.map[id(out)] = _shape.to_layout(value, out.dims)
            for j, v in enumerate(spec.lasts):
                out = outs[ns + len(spec.stacks) + j]
                if new_node is not None:
                    value = new_node.outputs[len(new_node.outputs) - len(spec.lasts) + j]
                else:
                    value = self.last_frame(self.with_axis(self.sequence(v)))
                rw.map[id(out)] = _shape.to_layout(value, out.dims)

    def final_of_form(self, k: int) -> Tensor:
        """The final value of state k, computed by its sequence form, or by the masked block's own loop."""
        if k not in self.finals:
            plan = self.plan
            unit = next((u for u in plan.units if u.form is not None and k in u.form[1]), None)
            if unit is not None:
                self.run_form(unit)
            else:
                block = next(b for b in plan.blocks.values() if k in [k2 for k2, _, _ in b.states])
                masked_blocks.run(self, block)
        return self.finals[k]

    def _after_value(self, t: Tensor, stacked_core: dict[int, Tensor], memo: dict) -> Tensor:
        """The sequence of the core value `t`, by replaying after the loop what computes it."""
        plan = self.plan
        unit = plan.producer[id(t)]
        if not unit.after:
            return stacked_core[id(t)]
        if id(t) not in memo:
            def value_of(x):
                if plan.place(x) == Place.CORE:
                    return self._after_value(x, stacked_core, memo)
                return self.sequence(x)
            self.replay(unit, value_of, memo)
            self.report.after_loop.append(unit.describe())
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
                    ended = self.with_axis(self.sequence(spec.end))
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

    def last_frame(self, sequence: Tensor, initial: Tensor | None = None) -> Tensor:
        """Frame ``length - 1`` of `sequence` per entry (`initial`, else zeros as in the loop, where the length
        is 0)."""
        n = self.lengths()
        last = gather(sequence, index=_math.maximum(_math.sub(n, 1), 0), axis=self.axis)
        if initial is None:
            initial = _shape.zeros([], dtype=last.dtype)
        return _math.where(_math.gt(n, 0), last, initial)


def map_tree(value, fn):
    """`value` (nested) with each tensor `t` in it replaced by ``fn(t)``."""
    leaves, spec = flatten(value, _is_tensor)
    return unflatten(spec, [fn(x) if isinstance(x, Tensor) else x for x in leaves])


def _is_tensor(v) -> bool:
    return isinstance(v, Tensor)
