"""The analysis of the move-out pass: where each computation of a loop body goes (the plan).

The body's op calls are grouped into units (one recorded op call, one
structural node, or one MaskedComputation block) and each gets a place by
what it depends on:

* ``INVARIANT``: only values from outside the loop. Computed once, before it.
* ``SEQUENCE``: also frames of unstacked inputs, the step index, or states
  that are themselves moved out, but no state carried by the loop. Replayed
  before the loop on whole sequences (the op's own dim rule treats the loop's
  dim as one more batch dim); inside, what is left reads frame t of it.
* ``CORE``: depends on a state carried from step to step. Stays in the loop,
  unless its results are only stacked (or feed only such calls): then it is
  replayed after the loop on the stacked sequences of its inputs (``after``).

A state whose next value is a sequence value is moved out as well: its value
at step t is that sequence shifted by one step. The classification starts
with every state carried and moves states out until nothing changes, so a
state that feeds itself, however indirectly, always stays. A call that
carries its own result as a state and whose op declares a sequence form
(:mod:`looplift.rules`) is a sequence value too, run by that form.

The analysis reasons only about dependencies, regions and the op rules table,
never about particular ops. It changes nothing; :mod:`.loop_rewrite` builds the
new graph from the plan.
"""

from __future__ import annotations

import enum
import inspect
from dataclasses import dataclass, field
from typing import Literal

from .._tree import flatten
from ..graph import Call, Node, Op
from ..regions import LoopSpec, is_history_of
from ..rules import rules_of
from ..tensor import Tensor

__all__ = ["Place", "Unit", "MaskedBlock", "LoopPlan", "tensors"]


class Place(enum.IntEnum):
    """Where a unit's computation goes (ordered: a unit is placed as its latest input)."""

    INVARIANT = 0   # depends on nothing of the loop: computed once, before it
    SEQUENCE = 1    # on frames, the step index or moved states: over the whole sequence, before the loop
    CORE = 2        # on a carried state: in the loop (or, if only stacked, after it: see Unit.after)


UnitKind = Literal["call", "verbatim", "state", "unstack", "index", "region", "masked"]


@dataclass(eq=False)
class Unit:
    """One op call of the body, one node that is not a call, or one MaskedComputation block."""

    nodes: list[Node]
    call: Call | None
    #: "call": a recorded op call; "verbatim": another node; "state", "unstack", "index": the structural
    #: nodes; "region": a nested loop or a Cond; "masked": a MaskedComputation block run over T'
    kind: UnitKind
    inputs: list[Tensor] = field(default_factory=list)
    place: Place = Place.CORE
    #: a core call replayed after the loop, on the stacked sequences
    after: bool = False
    #: (carried argument, state indices) when run by the op's sequence form
    form: tuple | None = None

    def describe(self) -> str:
        node = self.nodes[0]
        if self.kind == "masked":
            return f"MaskedComputation block at {node.source}"
        construct = self.construct()
        if construct is not None:   # (traced on behalf of the user's construct: named as that)
            return f"{construct} at {node.source}"
        name = self.call.fn.__name__ if self.call is not None else node.op
        if self.kind == "state":
            name = f"state {node.attrs.get('state')!r}"
        outs = self.outputs()
        dims = "{" + ", ".join(d.name for d in outs[0].dims) + "}" if outs else ""
        return f"{name} {dims} at {node.source}"

    def outputs(self) -> list[Tensor]:
        if self.call is not None:
            return self.call.output_tensors()
        return [t for n in self.nodes for t in n.outputs]

    def construct(self) -> str | None:
        """The user's construct this unit implements (its nodes traced on behalf of it), else None."""
        constructs = {n.on_behalf_of for n in self.nodes}
        return constructs.pop() if len(constructs) == 1 else None

    @property
    def place_name(self) -> str:
        """"invariant", "sequence", "core", "after" or "masked" (for reports and pictures)."""
        if self.after:
            return "after"
        return "masked" if self.kind == "masked" else self.place.name.lower()


@dataclass(eq=False)
class MaskedBlock:
    """A MaskedComputation block that can run over T', with the wheres that hold its states and the values
    used after it."""

    mc: object
    block: list[Unit]
    members: list[Unit] = field(default_factory=list)
    state_ks: list[int] = field(default_factory=list)   # the loop states it carries (hidden ones included)
    states: list[tuple] = field(default_factory=list)   # (k, where result, value assigned in the block)
    holds: list[tuple] = field(default_factory=list)    # (k, value of the block, held value)


class LoopPlan:
    """The place of every unit of one loop's body, and which states move out."""

    def __init__(self, spec: LoopSpec, *, kept: dict[tuple[str, int], str] | None = None):
        self.spec = spec
        #: parts that stay in the loop whatever they depend on, with why: ("part", id of a call's first node)
        #: or ("block", id of a MaskedComputation) -> the reason (see report.CannotMove)
        self.kept = kept or {}
        self.axis = spec.axis
        self.state_index = {id(p): k for k, p in enumerate(spec.placeholders)}
        #: A loop over an axis with loop.end may run sequence forms and masked blocks as if no entry ended
        #: before its axis length (see `full_length`), as long as the end condition moves out.
        self.end_forms = spec.end is not None and not spec.own_dim
        self._units()
        self._classify()
        self._mark_after()

    # -- units --------------------------------------------------------------------------------------------

    def _units(self) -> None:
        self.units: list[Unit] = []
        by_call: dict[int, Unit] = {}
        for n in self.spec.body.nodes:
            if n.call is not None:
                unit = by_call.get(id(n.call))
                if unit is None:
                    unit = by_call[id(n.call)] = Unit([], n.call, "call")
                    self.units.append(unit)
                unit.nodes.append(n)
                continue
            kind = {Op.STATE: "state", Op.UNSTACK: "unstack", Op.LOOP_INDEX: "index"}.get(n.op)
            if kind is None:
                kind = "region" if n.op in (Op.LOOP, Op.COND) else "verbatim"
            self.units.append(Unit([n], None, kind))
        self.order = {id(n): i for i, n in enumerate(self.spec.body.nodes)}
        #: masked units -> their blocks
        self.blocks: dict[int, MaskedBlock] = {}
        self._index()
        self._group_masked()
        self._sort_units()

    def _sort_units(self) -> None:
        """The units in an order where each comes after those whose values it reads (the body's order where
        that holds). A call's unit sits at its first node, and a call may read the value of another call made
        while it was traced, after its first node: ``where(label == blank, 0, emitted + 1)`` in a search step,
        whose ``emitted + 1`` is gathered onto the pruned beam by a gather call of its own."""
        position = {id(u): i for i, u in enumerate(self.units)}
        needs = {id(u): {id(self.producer[id(t)]) for t in u.inputs if id(t) in self.producer} - {id(u)}
                 for u in self.units}
        if all(position[p] < position[id(u)] for u in self.units for p in needs[id(u)]):
            return
        done: set[int] = set()
        ordered: list[Unit] = []
        pending = list(self.units)
        while pending:   # (stable: at each round, the first unit in body order whose producers are placed)
            at = next(i for i, u in enumerate(pending) if needs[id(u)] <= done)
            unit = pending.pop(at)
            done.add(id(unit))
            ordered.append(unit)
        self.units = ordered

    def _index(self) -> None:
        """The producer and the inputs of every unit, and the consumers of every tensor."""
        self.producer: dict[int, Unit] = {}
        for unit in self.units:
            for n in unit.nodes:
                for t in n.outputs:
                    self.producer[id(t)] = unit
        for unit in self.units:
            own = {id(t) for n in unit.nodes for t in n.outputs}
            block = self.blocks.get(id(unit))
            if block is not None:   # its own states are carried inside it, over T'
                own |= {id(self.spec.placeholders[k]) for k in block.state_ks}
            unit.inputs = []
            seen: set[int] = set()
            for n in unit.nodes:
                for t in n.inputs:
                    if id(t) not in own and id(t) not in seen:
                        seen.add(id(t))
                        unit.inputs.append(t)
        self.consumers: dict[int, list[Unit]] = {}
        for unit in self.units:
            for t in unit.inputs:
                self.consumers.setdefault(id(t), []).append(unit)

    def _group_masked(self) -> None:
        """Each MaskedComputation block that can run over T' (with the wheres holding its states and
        values) becomes one unit of kind "masked"."""
        found: dict[int, tuple] = {}
        for unit in self.units:
            mc = unit.nodes[0].masked_block
            if mc is not None:
                found.setdefault(id(mc), (mc, []))[1].append(unit)
        for mc, units in found.values():
            block = self._masked_block(mc, units)
            if block is None:
                continue
            members = {id(u) for u in block.members}
            unit = Unit([n for u in self.units if id(u) in members for n in u.nodes], None, "masked")
            at = next(i for i, u in enumerate(self.units) if id(u) in members)
            self.units = [u for u in self.units if id(u) not in members]
            self.units.insert(at, unit)
            self.blocks[id(unit)] = block
        if self.blocks:
            self._index()

    def _masked_block(self, mc, units: list[Unit]) -> MaskedBlock | None:
        """The block of `mc` as one that can run as a loop over T', or None where it cannot."""
        spec = self.spec
        # (with loop.end, an ended entry's block still runs on its frozen states: it moves out only where no
        # entry ends before its axis length, see `full_length`)
        if ("block", id(mc)) in self.kept:
            return None
        if spec.own_dim or (spec.end is not None and not self.end_forms) or \
                any(u.kind not in ("call", "unstack", "index") for u in units):
            return None
        block = MaskedBlock(mc, units)
        outs_of = {id(t) for u in units for t in u.outputs()}
        for where_out, new, before in mc.state_wheres:
            k = self.state_index.get(id(before))
            if k is None or self.next_value(k) is not where_out or id(new) not in outs_of:
                return None   # the state was assigned before the block, or again after it
            block.state_ks.append(k)
            block.states.append((k, where_out, new))
        for value, previous, held in mc.holds:
            k = self.state_index.get(id(previous))
            if k is None or self.next_value(k) is not held:
                return None
            block.state_ks.append(k)
            block.holds.append((k, value, held))
        wheres = [self.producer.get(id(t)) for _, t, _ in block.states] + \
            [self.producer.get(id(t)) for _, _, t in block.holds]
        if any(u is None or u.kind != "call" or len(u.outputs()) != 1 for u in wheres):
            return None
        block.members = units + wheres
        # values of the block are used after it only as held values (and the states only by their wheres)
        members = {id(u) for u in block.members}
        inside = {id(new) for _, _, new in block.states} | {id(v) for _, v, _ in block.holds}
        for t_id in outs_of:
            if any(id(u) not in members for u in self.consumers.get(t_id, [])):
                return None
        loose = [*spec.stacks, *spec.lasts, *([spec.end] if spec.end is not None else [])]
        if any(id(t) in outs_of for t in loose) or not inside <= outs_of:
            return None
        for k in block.state_ks:   # its states are read only in the block (held values) or by the block
            p = spec.placeholders[k]
            if k in [k2 for k2, _, _ in block.holds] and any(
                    id(u) not in members for u in self.consumers.get(id(p), [])):
                return None
        return block

    # -- places ---------------------------------------------------------------------------------------------

    def place(self, t: Tensor) -> Place:
        """The place of the body value `t` (a value from outside the body is invariant)."""
        unit = self.producer.get(id(t))
        return Place.INVARIANT if unit is None else unit.place

    @property
    def full_length(self) -> bool:
        """Whether the plan assumes that no entry ends (by loop.end) before its axis length: in a loop over an
        axis with loop.end, a sequence form or a masked block runs over the whole axis. Past an entry's end its
        states are frozen, which neither knows; the rewrite checks the assumption at run time (the end moves
        out, so the lengths are known before the loop) and runs the loop as traced where it fails."""
        return self.end_forms and any(u.form is not None or u.kind == "masked" for u in self.units)

    def _classify(self) -> None:
        while True:
            self._classify_once()
            retry = self.full_length and self.place(self.spec.end) > Place.SEQUENCE
            if retry:   # the end stays in the loop: no lengths before it, so no forms or masked blocks with it
                self.end_forms = False
            stuck = [u for u in self.units if u.kind == "masked" and (retry or u.place == Place.CORE)]
            if not stuck and not retry:
                return
            for unit in stuck:   # the block depends on a carried state: its calls stay in the loop one by one
                at = self.units.index(unit)
                self.units[at:at + 1] = self.blocks.pop(id(unit)).members
                self.units.sort(key=lambda u: self.order[id(u.nodes[0])])
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
                unit.place = self._place_of(unit, moved, constant)
            found = False
            for unit in self.units:
                if unit.place == Place.CORE and unit.kind == "call" and id(unit) not in forms:
                    match = self._match_form(unit, moved, constant)
                    if match is not None:
                        forms[id(unit)] = match
                        found = True
            if found:
                continue
            now = set() if spec.own_dim or blocked else {
                k for k, v in enumerate(spec.new_states) if k not in constant and self.place(v) <= Place.SEQUENCE}
            if now == moved:
                # With loop.end, an ended entry's states stay frozen while the axis goes on: a moved state's
                # value is its shifted sequence up to the entry's length, then the last one. The lengths come
                # from the end condition, which must then be computed outside the loop too.
                if spec.end is not None and moved and self.place(spec.end) > Place.SEQUENCE:
                    blocked, moved = True, set()
                    continue
                break
            moved = now
        #: states whose values are shifted sequences, and states that are never assigned anew
        self.moved, self.constant = moved, constant
        #: states whose values exist only as a final value of a sequence form (no value per step)
        self.final_only = {k for unit in self.units if unit.form is not None
                           for i, k in enumerate(unit.form[1]) if not rules_of(unit.call.fn).sequence_form.sequences[i]}

    def _place_of(self, unit: Unit, moved: set[int], constant: set[int]) -> Place:
        if ("part", id(unit.nodes[0])) in self.kept:
            return Place.CORE
        if unit.form is not None:
            return Place.SEQUENCE
        if unit.kind == "state":
            k = self.state_index[id(unit.nodes[0].outputs[0])]
            return Place.INVARIANT if k in constant else Place.SEQUENCE if k in moved else Place.CORE
        if unit.kind in ("unstack", "index"):
            return Place.CORE if self.spec.own_dim else Place.SEQUENCE
        latest = max((self.place(t) for t in unit.inputs), default=Place.INVARIANT)
        if unit.kind == "masked":   # never invariant: it carries its own states (over T')
            return Place.SEQUENCE if latest <= Place.SEQUENCE else Place.CORE
        if latest == Place.INVARIANT and any(n.random for n in unit.nodes):
            return Place.CORE   # each step draws anew (dropout of a loop-invariant value): it stays in the loop
        if latest == Place.INVARIANT and any(is_history_of(d, self.axis) for t in unit.outputs() for d in t.dims):
            latest = Place.SEQUENCE  # over the loop's history dim (e.g. a range over it): its size is the step's
        if latest == Place.INVARIANT and any(self.spec.sized_per_step(d) for t in unit.outputs() for d in t.dims):
            return Place.CORE   # over a beam whose size changes per step (e.g. a range over it)
        if unit.kind == "region" and latest == Place.SEQUENCE and not self.spec.own_dim and self.nested_movable(unit):
            return Place.SEQUENCE   # a nested loop on frames only: run once over the whole sequence
        if unit.kind in ("region", "verbatim") or self.spec.own_dim:
            return Place.INVARIANT if latest == Place.INVARIANT else Place.CORE
        return latest

    def nested_movable(self, unit: Unit) -> bool:
        """Whether the nested loop `unit` can run before this loop over the whole sequence (this loop's dim one
        more batch dim): a loop over an axis whose body is made of op calls, frames, the step index and states."""
        node = unit.nodes[0]
        inner = node.region
        if node.op != Op.LOOP or inner.own_dim or is_history_of(inner.axis, self.axis):
            return False
        return all(n.op in (Op.STATE, Op.UNSTACK, Op.LOOP_INDEX) or n.call is not None for n in inner.body.nodes)

    def next_value(self, k: int) -> Tensor:
        """The value assigned to state k, before the loop's own re-layout of it."""
        t = self.spec.new_states[k]
        unit = self.producer.get(id(t))
        if unit is not None and unit.kind == "call" and rules_of(unit.call.fn).layout_only:
            return unit.call.args[0]
        return t

    def _match_form(self, unit: Unit, moved: set[int], constant: set[int]):
        """(carried argument, states) if the call and the states it carries can run as the op's sequence form."""
        form = rules_of(unit.call.fn).sequence_form
        spec = self.spec
        if form is None or spec.own_dim or (spec.end is not None and not self.end_forms):
            return None   # (loop.end: see full_length)
        try:
            bound = bound_arguments(unit.call)
        except TypeError:
            return None
        outs = unit.outputs()
        for name in form.carried:
            if name not in bound:
                continue
            leaves = tensors(bound[name])
            ks = [self.state_index.get(id(t)) for t in leaves]
            if (not ks or None in ks or len(set(ks)) != len(ks) or len(ks) != len(outs)
                    or any(k in moved or k in constant for k in ks)
                    or any(self.next_value(k) is not outs[i] for i, k in enumerate(ks))):
                continue
            others_ok = all(self.place(t) <= Place.SEQUENCE
                            and (arg not in form.invariant or self.place(t) == Place.INVARIANT)
                            for arg, value in bound.items() if arg != name for t in tensors(value))
            if not others_ok:
                continue
            if not all(self._only_feeds_state(unit, outs[i], k)
                       for i, k in enumerate(ks) if not form.sequences[i]):
                continue
            return name, ks
        return None

    def _only_feeds_state(self, unit: Unit, out: Tensor, k: int) -> bool:
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
        for unit in reversed(self.units):
            if unit.place != Place.CORE or unit.kind != "call" or ("part", id(unit.nodes[0])) in self.kept:
                continue
            outs = [t for n in unit.nodes for t in n.outputs]
            if any(id(t) in pinned for t in outs):
                continue
            if any(spec.sized_per_step(d) for t in [*unit.inputs, *outs] for d in t.dims):
                continue   # (stacked, a beam whose size changes per step is padded to the widest)
            users = [u for t in outs for u in self.consumers.get(id(t), [])]
            unit.after = all(u.after for u in users)

    # -- for the report ----------------------------------------------------------------------------------

    def node_places(self) -> dict[int, str]:
        """Per body node (by id): the place of its unit ("invariant", "sequence", "core", "after", "masked")."""
        return {id(n): unit.place_name for unit in self.units for n in unit.nodes}

    def chain(self, unit: Unit) -> list[str]:
        """The calls that keep `unit` in the loop: a path back to a carried state."""
        chain, seen = [unit.describe()], {id(unit)}
        reason = self.kept.get(("part", id(unit.nodes[0])))
        block = unit.nodes[0].masked_block
        if reason is None and block is not None and ("block", id(block)) in self.kept:
            reason = f"its MaskedComputation block cannot run over T': {self.kept[('block', id(block))]}"
        if reason is not None:
            return chain + [f"(it cannot run over the whole sequence: {reason})"]
        while unit.kind != "state":
            nxt = next((self.producer[id(t)] for t in unit.inputs
                        if self.place(t) == Place.CORE and id(t) in self.producer), None)
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

    def _why_region_stays(self, unit: Unit) -> str:
        node = unit.nodes[0]
        if node.op == Op.COND:
            return "(a Cond runs per step)"
        if self.spec.own_dim:
            return f"(the loop around it has no axis to run it over: {self.axis.name!r} is made by loop.end)"
        if node.region.own_dim:
            return "(its own dim, made by loop.end, differs per step)"
        return "(its body has a region or a computation it cannot run over the whole sequence)"


def bound_arguments(call: Call) -> dict:
    """The arguments of the recorded `call` (with its substitutions) bound to its op's parameter names."""
    args, kwargs = call.arguments()
    return inspect.signature(call.fn).bind(*args, **kwargs).arguments


def tensors(value) -> list[Tensor]:
    """The tensors in the (nested) `value`."""
    leaves, _ = flatten(value, lambda v: isinstance(v, Tensor))
    return [t for t in leaves if isinstance(t, Tensor)]
