"""``Loop``: a loop over a dim with explicit state, written as Python code.

::

    loop = looplift.Loop(axis=time)
    loop.state.h = looplift.zeros([hidden])
    with loop:
        x_t = loop.unstack(x)                          # frame t of x
        loop.state.h = looplift.tanh(lin(looplift.concat(x_t, loop.state.h)))
        y = loop.stack(loop.state.h)                   # y gets the dim `time`
    h_last = loop.state.h                              # each entry's final state

Semantics: those of a Python ``while`` loop running the body once per step,
for each batch entry independently. A state reads like a Python variable:
inside the body, a read gives the value from the previous step (or the initial
one) until the body assigns it; the last assignment of a step is the value for
the next. An entry whose sequence has ended keeps its state frozen while
others go on.

Why state is explicit (``loop.state.NAME``) rather than hidden in modules:
the loop optimizer and the search must see every value that flows from one
step to the next; a hidden state would make "what depends on the previous
step" unknowable. Why a ``with`` block rather than a step function: the body
reads as the literal per-step code, with access to everything around it.

The body is traced once. The dims of a state are those of its initial value
plus the dims along which entries end at different steps (the batch); a state
whose new value gains further dims (say the batch, from an encoder output)
makes the program trace again with the state given those dims from the start,
so ``looplift.zeros([feature])`` is a fine initial value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import graph as _graph
from ._align import aligner
from ._tree import flatten, unflatten
from .dims import Dim
from .errors import DimError, DTypeError, ExecutionError, TraceError
from .ops._core import as_tensor, dims_str
from .ops.math import cast
from .ops.shape import expand, to_layout
from .tensor import Tensor

__all__ = ["Loop", "LoopState", "LoopSpec", "emit_unstack"]


def _is_tensor(v) -> bool:
    return isinstance(v, Tensor)


class LoopState:
    """``loop.state``: attribute access to the loop's state variables."""

    def __init__(self, loop: Loop):
        object.__setattr__(self, "_loop", loop)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._loop._read_state(name)

    def __setattr__(self, name: str, value) -> None:
        self._loop._write_state(name, value)

    def __delattr__(self, name: str) -> None:
        raise TraceError(f"a loop state cannot be deleted ({name!r}, at {_graph.user_source_line()})")


class _Slot:
    """One state variable: its initial value, placeholders, current value inside the body, final value."""

    def __init__(self, name: str, value, source: str):
        self.name = name
        self.source = source
        leaves, self.spec = flatten(value, _is_tensor)
        self.initial = [as_tensor(v) if isinstance(v, (Tensor, int, float, bool)) else v for v in leaves]
        self.tensor_leaves = [i for i, v in enumerate(self.initial) if isinstance(v, Tensor)]
        self.placeholders: list[Tensor] = []
        self.current = None
        self.final = None

    def tree(self, leaves: list):
        return unflatten(self.spec, leaves)


class Loop:
    """A loop over the dim `axis` (its length per batch entry), or until :meth:`end`.

    Args:
        axis: the dim to loop over: :meth:`unstack` takes its frames, and
            :meth:`stack` gives values this dim. Any dim works (time, a static
            dim, words of a sentence).
        max_seq_len: for loops that end by :meth:`end`: an upper bound on the
            steps (an int, or a tensor over batch dims: per entry). Running past
            it raises an error naming the loop's line; it never hangs. In search
            mode (``looplift.compile(..., mode="search")``) a loop given both
            `axis` and `max_seq_len` runs until :meth:`end` on a new dim named
            like `axis` (``loop.axis``), as decoding needs, while training loops
            over `axis`: one decoder definition serves both. A search stops at
            `max_seq_len` without error (the hypotheses are cut there).
        name: the name of the dim a loop without `axis` creates (``loop.axis``).
    """

    def __init__(self, axis: Dim | None = None, *, max_seq_len: int | Tensor | None = None, name: str = "loop"):
        ctx = _graph.current("Loop")
        self._ctx = ctx
        self.source = _graph.user_source_line()
        if axis is None and max_seq_len is None:
            raise TraceError(f"a Loop needs an axis to loop over or a max_seq_len (with loop.end(...)) "
                             f"(at {self.source})")
        if axis is not None and not isinstance(axis, Dim):
            raise DimError(f"Loop(axis=...) takes a Dim, got {axis!r} (at {self.source})")
        self._ordinal = ctx.next_loop_ordinal()
        self._hints: dict = ctx.loop_hints.setdefault(self._ordinal, {})
        # In search mode a loop with a max_seq_len runs until its end: the search makes the lengths (the
        # reference labels' dim `axis`, which training loops over, is not known there).
        self._own_dim = axis is None or (max_seq_len is not None and ctx.mode == "search")
        #: The dim the loop steps over: `axis`, or a new dynamic dim whose lengths are set by :meth:`end`.
        self.axis: Dim = axis.canonical() if not self._own_dim else Dim(name if axis is None else axis.name)
        if isinstance(max_seq_len, (Tensor, int)) and not isinstance(max_seq_len, bool):
            self._max_len = max_seq_len if isinstance(max_seq_len, int) else as_tensor(max_seq_len)
        elif max_seq_len is None:
            self._max_len = None
        else:
            raise TraceError(f"max_seq_len must be an int or a looplift tensor, got {max_seq_len!r} "
                             f"(at {self.source})")
        if isinstance(self._max_len, Tensor) and self._max_len.dtype.is_floating_point:
            raise DTypeError(f"max_seq_len must be an integer, got the {self._max_len.describe()} (at {self.source})")
        self._parent = ctx.graph
        self.body = _graph.Graph(parent=ctx.graph)
        self._slots: dict[str, _Slot] = {}
        self._phase = "before"
        self._stacks: list[tuple[Tensor, Tensor]] = []
        self._lasts: list[tuple[Tensor, Tensor]] = []
        self._end: tuple[Tensor, bool] | None = None
        self._index: Tensor | None = None
        self._node = None
        #: the beam search of this loop (looplift.search), once a prune ran in its body
        self._search = None
        self._result = None
        self.state = LoopState(self)

    # -- state ---------------------------------------------------------------------------------

    def _read_state(self, name: str):
        slot = self._slots.get(name)
        if slot is None:
            raise TraceError(f"loop state {name!r} was never initialised; set loop.state.{name} = ... before "
                             f"the loop (loop at {self.source}, read at {_graph.user_source_line()})")
        if self._phase == "before":
            return slot.tree(slot.initial)
        if self._phase == "inside":
            return slot.tree(slot.current)
        return slot.final

    def _write_state(self, name: str, value) -> None:
        here = _graph.user_source_line()
        if self._phase == "before":
            self._slots[name] = _Slot(name, value, here)
            return
        if self._phase == "after":
            raise TraceError(f"loop state {name!r} assigned after the loop ended (loop at {self.source}, "
                             f"at {here})")
        slot = self._slots.get(name)
        if slot is None:
            raise TraceError(f"loop state {name!r} has no initial value; set loop.state.{name} = ... before "
                             f"the loop (loop at {self.source}, assigned at {here})")
        leaves, spec = flatten(value, _is_tensor)
        if spec != slot.spec:
            raise TraceError(f"loop state {name!r} is assigned a value of another structure than its initial "
                             f"value (initial at {slot.source}, assigned at {here})")
        current = list(slot.current)
        for i in slot.tensor_leaves:
            current[i] = as_tensor(leaves[i])
        slot.current = current

    def _add_hidden_state(self, name: str, initial: Tensor, sparse_dim) -> Tensor:
        """A state the user does not name (a MaskedComputation's held value); returns its placeholder.

        Called while the body is traced; `initial` lives in the loop's parent graph."""
        slot = _Slot(name, initial, _graph.user_source_line())
        init = slot.initial[0]
        extra = list(dict.fromkeys(d for d in self._batch_dims() + self._hints.get(("state", name, 0), [])
                                   if d not in init.dims))
        if extra:
            saved = self._ctx.graph
            self._ctx.graph = self._parent
            try:
                init = slot.initial[0] = to_layout(expand(init, extra), [*extra, *init.dims])
            finally:
                self._ctx.graph = saved
        node = self.body.add("state", (), None, [(init.dims, init.dtype, sparse_dim)],
                             attrs={"state": name, "leaf": 0}, source=slot.source)
        slot.placeholders = [node.outputs[0]]
        slot.current = [node.outputs[0]]
        self._slots[name] = slot
        return node.outputs[0]

    def _set_hidden_state(self, placeholder: Tensor, value: Tensor) -> None:
        for slot in self._slots.values():
            if slot.placeholders and slot.placeholders[0] is placeholder:
                slot.current = [value]
                return

    # -- entering --------------------------------------------------------------------------------

    def _batch_dims(self) -> list[Dim]:
        """Dims every state gets: those along which entries may end at different steps."""
        dims: list[Dim] = []
        if self.axis.is_dynamic and not self._own_dim:
            dims += _graph.length_dims(self.axis)
        if isinstance(self._max_len, Tensor):
            dims += self._max_len.dims
        dims += self._hints.get("batch", [])
        out: list[Dim] = []
        for d in dims:
            if d not in out:
                out.append(d)
        return out

    def __enter__(self) -> Loop:
        if self._phase != "before":
            raise TraceError(f"a Loop is entered once (loop at {self.source})")
        batch = self._batch_dims()
        for slot in self._slots.values():
            for i in slot.tensor_leaves:
                init = slot.initial[i]
                extra = [d for d in batch + self._hints.get(("state", slot.name, i), []) if d not in init.dims]
                extra = list(dict.fromkeys(extra))   # (a dim may be hinted for the loop and for the state)
                if extra:   # (batch dims first: the layout ops and cells take them in)
                    init = slot.initial[i] = to_layout(expand(init, extra), [*extra, *init.dims])
        self._ctx.loops.append(self)
        self._ctx.graph = self.body
        for slot in self._slots.values():
            slot.placeholders = [None] * len(slot.initial)
            for i in slot.tensor_leaves:
                init = slot.initial[i]
                node = self.body.add("state", (), None, [(init.dims, init.dtype, init.sparse_dim)],
                                     attrs={"state": slot.name, "leaf": i}, source=slot.source)
                slot.placeholders[i] = node.outputs[0]
            slot.current = [p if p is not None else v for p, v in zip(slot.placeholders, slot.initial)]
        self._phase = "inside"
        return self

    # -- inside ------------------------------------------------------------------------------------

    def _require_inside(self, what: str) -> None:
        if self._phase != "inside" or self._ctx.graph is not self.body:
            raise TraceError(f"loop.{what} is used inside the `with` block of its loop (over {self.axis.name!r}), "
                             f"directly (loop at {self.source}, used at {_graph.user_source_line()})")

    def unstack(self, x) -> Tensor:
        """Frame t of `x` at step t (x must have the loop's axis)."""
        self._require_inside("unstack")
        x = as_tensor(x)
        if self._own_dim:
            raise TraceError(f"loop.unstack needs a loop over an axis (Loop(axis=...)); this loop ends by "
                             f"loop.end (loop at {self.source}, at {_graph.user_source_line()})")
        if self.axis not in x.dims:
            raise DimError(f"loop.unstack: the {x.describe()} does not have the loop's axis {self.axis.name!r} "
                           f"(loop at {self.source}, at {_graph.user_source_line()})")
        return emit_unstack(self.body, x, self.axis)

    @property
    def index(self) -> Tensor:
        """The step counter: 0, 1, 2, ... (int64, ``sparse_dim`` the loop's axis)."""
        # A value like any other: readable in regions nested in the body too (an inner loop, a Cond branch).
        if self._phase != "inside" or not self._ctx.graph.is_inside(self.body):
            self._require_inside("index")
        if self._index is None:
            loop, axis = self, self.axis   # (a search over its own dim steps over a dim of its own: see spec)
            self._index = self.body.add(
                "loop_index", (), lambda env: torch.tensor(env.step(loop.spec.axis), device=env.device),
                [((), torch.int64, axis)], attrs={"axis": axis.name}).outputs[0]
        return self._index

    def stack(self, value) -> Tensor:
        """`value` of every step, stacked along the loop's axis (usable after the loop)."""
        self._require_inside("stack")
        value = as_tensor(value)
        if self.axis in value.dims:
            raise DimError(f"loop.stack: the {value.describe()} already has the loop's axis {self.axis.name!r} "
                           f"(at {_graph.user_source_line()})")
        dims = value.dims
        if self._search is not None:   # stacked as the loop's beam (after the step's bookkeeping)
            dims = tuple(self._search.beam if d is self._search.next else d for d in dims)
            if self._search.beam in value.dims and self._search.next in value.dims:
                raise DimError(f"loop.stack: the {value.describe()} has both the beam and the pruned beam "
                               f"(at {_graph.user_source_line()})")
        out = Tensor((self.axis,) + dims, value.dtype, sparse_dim=value.sparse_dim)
        self._stacks.append((value, out))
        return out

    def end(self, cond, *, include_eos: bool) -> None:
        """End the loop for each batch entry at the first step where `cond` is True.

        With ``include_eos=True`` that step is the entry's last (its frame is
        stacked, its state assignments kept); with ``include_eos=False`` the
        entry ends before it (the step is discarded).

        In a loop without an axis this gives the loop's dim its lengths. In a
        loop over an axis (say the reference labels of training, with the
        same code ending on EOS in search), the axis still gives the frames
        and lengths of stacked values; an entry that ends earlier keeps its
        state frozen from then on.
        """
        self._require_inside("end")
        cond = as_tensor(cond)
        if cond.dtype != torch.bool:
            raise DTypeError(f"loop.end needs a bool condition, got the {cond.describe()} "
                             f"(at {_graph.user_source_line()})")
        if self._end is not None:
            raise TraceError(f"loop.end is called once per loop (loop at {self.source}, again at "
                             f"{_graph.user_source_line()})")
        self._end = (cond, bool(include_eos))

    # -- leaving ----------------------------------------------------------------------------------

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._leave_body()
            return
        if self._own_dim and self._end is None:
            self._leave_body()
            raise TraceError(f"a Loop without an axis must call loop.end(...) in its body (loop at {self.source})")
        searching = self._search is not None and self._search.src is not None
        if searching:
            from .ops.masking import PRUNED
            PRUNED.pop(self._search.next, None)   # (the values of this step over the pruned beam are done)
            self._search_bookkeeping()
        new_values = self._new_state_values()
        if self._retrace_needed(new_values):
            self._leave_body()
            raise _graph.Retrace()
        length_dims = self._length_dims()
        steps = self.axis
        if searching and self._own_dim:   # the loop runs over its steps; the dim of its results has lengths
            steps = Dim(f"{self.axis.name}_steps")   # per hypothesis (set by the backtracking)
            steps.set_length_dims([*self._ctx.stepped_dims[:-1], *length_dims])
        elif self._own_dim:
            self.axis.set_length_dims([*self._ctx.stepped_dims[:-1], *length_dims])
        outs = [to_layout(v, p.dims) for v, p in new_values]
        end_cond = None
        if self._end is not None:
            end_cond = self._end[0]
        self._leave_body()
        self._build_node(outs, end_cond, length_dims, steps)
        if searching:
            self._backtrack()
        self._phase = "after"

    def _leave_body(self) -> None:
        if self._search is not None:
            from .ops.masking import PRUNED
            PRUNED.pop(self._search.next, None)
        if self._ctx.loops and self._ctx.loops[-1] is self:
            self._ctx.loops.pop()
        self._ctx.graph = self._parent

    def _new_state_values(self) -> list[tuple[Tensor, Tensor]]:
        """(new value, placeholder) per state leaf, checked; constants cast to the state's dtype."""
        pairs = []
        for slot in self._slots.values():
            for i in slot.tensor_leaves:
                new, ph = slot.current[i], slot.placeholders[i]
                beam = self.beam   # (a state gains the beam like a batch dim)
                old_static = {d for d in ph.dims if d.is_static and d is not beam}
                new_static = {d for d in new.dims if d.is_static and d is not beam}
                if old_static != new_static:
                    raise DimError(
                        f"loop state {slot.name!r} changes its dims between steps: its initial value has "
                        f"{dims_str(ph.dims)}, the new value {dims_str(new.dims)} (created at {new.source}); "
                        f"a state keeps its feature dims (loop at {self.source})")
                if new.dtype != ph.dtype:
                    if new.node is not None and new.node.op == "constant":
                        new = cast(new, ph.dtype)
                    else:
                        raise DTypeError(
                            f"loop state {slot.name!r} changes its dtype from {ph.dtype} to {new.dtype} "
                            f"(new value created at {new.source}; loop at {self.source})")
                pairs.append((new, ph))
        return pairs

    def _retrace_needed(self, new_values) -> bool:
        """Record dims the states lack (as hints for the next trace); True if there are any."""
        needed = False
        k = 0
        for slot in self._slots.values():
            for i in slot.tensor_leaves:
                new, ph = new_values[k]
                k += 1
                extra = [d for d in new.dims if d not in ph.dims]
                if extra:
                    hint = self._hints.setdefault(("state", slot.name, i), [])
                    hint += [d for d in extra if d not in hint]
                    needed = True
        if self._end is not None:
            cond = self._end[0]
            missing = [d for d in cond.dims if any(d not in ph.dims for _, ph in new_values)]
            if missing:
                hint = self._hints.setdefault("batch", [])
                hint += [d for d in missing if d not in hint]
                needed = True
        return needed

    def _length_dims(self) -> tuple[Dim, ...]:
        """The dims along which the number of steps differs per entry."""
        dims = list(self._batch_dims())
        if self._end is not None:
            dims += [d for d in self._end[0].dims if d not in dims]
        if not self._own_dim and not self.axis.is_dynamic and self._end is None:
            return ()
        return tuple(dims)

    def _build_node(self, new_states: list[Tensor], end_cond: Tensor | None, length_dims: tuple[Dim, ...],
                    steps: Dim) -> None:
        returned = [*new_states, *(v for v, _ in self._stacks), *([end_cond] if end_cond is not None else [])]
        placeholders = [slot.placeholders[i] for slot in self._slots.values() for i in slot.tensor_leaves]
        searching = steps is not self.axis or (self._search is not None and self._search.src is not None)
        spec = LoopSpec(
            axis=steps, own_dim=self._own_dim, source=self.source, body=self.body,
            captured=self.body.captured(returned), placeholders=placeholders, new_states=new_states,
            stacks=[v for v, _ in self._stacks], end=end_cond,
            include_eos=self._end[1] if self._end is not None else True, max_len=self._max_len,
            length_dims=length_dims,
            state_names=[f"{slot.name}" + (f"[{i}]" if len(slot.tensor_leaves) > 1 else "")
                         for slot in self._slots.values() for i in slot.tensor_leaves],
            stop_at_max_len=searching,
            beam=(self._search.beam, self._search.next) if searching and self._search.dynamic else None,
            also_steps=self.axis if steps is not self.axis else None)
        initial = [slot.initial[i] for slot in self._slots.values() for i in slot.tensor_leaves]
        # (a search's stacks are backtracked into the user's tensors after the loop)
        node = spec.add_node(self._parent, initial, None if searching else [out for _, out in self._stacks])
        self.spec = spec
        finals = iter(node.outputs[:len(placeholders)])
        for slot in self._slots.values():
            leaves = list(slot.initial)
            for i in slot.tensor_leaves:
                leaves[i] = next(finals)
            slot.final = slot.tree(leaves)

    # -- search ----------------------------------------------------------------------------------

    @property
    def beam(self) -> Dim | None:
        """The beam dim of a loop that searches (``looplift.search``), else None."""
        return self._search.beam if self._search is not None else None

    @property
    def search(self):
        """After a loop that searches: its :class:`looplift.search.Result` (the n-best list's lengths,
        validity and ``choice`` scores; the states and stacks are over ``loop.beam``)."""
        if self._phase != "after" or self._result is None:
            raise TraceError(f"loop.search is read after a loop whose body runs a search step "
                             f"(loop at {self.source}, at {_graph.user_source_line()})")
        return self._result

    def _beam_pair(self) -> tuple[Dim, Dim] | None:
        """(the beam, the pruned beam) of this loop's search, once known (the trace after the first), else None."""
        beam, nxt = self._hints.get(("search", "beam")), self._hints.get(("search", "next"))
        return None if beam is None or nxt is None else (beam, nxt)

    def _slot_of(self, placeholder: Tensor) -> _Slot:
        return next(s for s in self._slots.values() if s.placeholders and s.placeholders[0] is placeholder)

    def _search_bookkeeping(self) -> None:
        """The end of a step that pruned: states and stacks move onto the pruned hypotheses (reordered by
        their sources, those of ended hypotheses kept), the search's own states are updated, and the loop
        ends when every hypothesis of an entry has ended."""
        from .ops import math as m
        from .ops import reduce as r
        from .ops.index import gather
        from .ops.shape import replace_dim
        search = self._search
        beam, nxt, src = search.beam, search.next, search.src
        here = _graph.user_source_line()

        def onto_next(v: Tensor, what: str) -> Tensor:
            if beam in v.dims and nxt in v.dims:
                raise DimError(f"{what} is the {v.describe()}: it has both the beam and the pruned beam "
                               f"{nxt.name!r}; take one of them (e.g. looplift.gather(x, index=pruned.src, "
                               f"axis={beam.name!r})) (loop at {self.source}, at {here})")
            return gather(v, index=src, axis=beam) if beam in v.dims else v

        ended_src = gather(search.ended, index=src, axis=beam)
        own = {id(search.valid), id(search.ended), id(search.length)}
        for slot in self._slots.values():
            if slot.placeholders and id(slot.placeholders[0]) in own:
                continue
            for i in slot.tensor_leaves:
                v, p = slot.current[i], slot.placeholders[i]
                v = onto_next(as_tensor(v), f"the new value of loop state {slot.name!r}")
                if nxt in v.dims:
                    if id(v) not in search.recombined:   # an ended hypothesis keeps its state
                        old = gather(p, index=src, axis=beam) if beam in p.dims else p
                        v = m.where(ended_src, old, v)
                    v = replace_dim(v, nxt, beam)
                slot.current[i] = v
        cond = None
        if self._end is not None:
            cond = onto_next(self._end[0], "the end condition")
        ended = ended_src if cond is None else m.logical_or(ended_src, cond)
        counts = m.logical_not(ended_src)
        if cond is not None and not self._end[1]:
            counts = m.logical_and(counts, m.logical_not(cond))
        length = m.add(gather(search.length, index=src, axis=beam), m.cast(counts, torch.int64))
        valid = search.new_valid
        ended = m.logical_or(ended, m.logical_not(valid))
        for placeholder, value in ((search.valid, valid), (search.ended, ended), (search.length, length)):
            self._set_hidden_state(placeholder, replace_dim(expand(value, [nxt]) if nxt not in value.dims
                                                            else value, nxt, beam))
        self._stacks = [(replace_dim(v, nxt, beam) if nxt in v.dims else v, out) for v, out in
                        ((onto_next(v, "a stacked value"), out) for v, out in self._stacks)]
        batch = tuple(d for d in src.dims if d is not nxt)
        src_beam = to_layout(replace_dim(src, nxt, beam), batch + (beam,))
        self._search_src = Tensor((self.axis,) + src_beam.dims, src_beam.dtype, sparse_dim=beam)
        self._stacks.append((src_beam, self._search_src))
        if self._end is not None or self._own_dim:
            all_ended = m.eq(r.sum(m.cast(m.logical_not(self._slot_current(search.ended)), torch.int64),
                                   axis=beam), 0)
            self._end = (all_ended, True)

    def _slot_current(self, placeholder: Tensor) -> Tensor:
        return self._slot_of(placeholder).current[0]

    def _backtrack(self) -> None:
        """After a loop that searched: the stacked values of each final hypothesis, found by following the
        source hypotheses back from the last step; the loop's dim gets the hypotheses' lengths."""
        from .ops.index import gather
        from .ops.math import where
        from .ops.shape import length as length_of
        from .ops.shape import replace_dim
        search, spec, node = self._search, self.spec, self.spec.node
        beam, steps, axis = search.beam, spec.axis, self.axis
        ns = len(spec.placeholders)
        stacked = node.outputs[ns:ns + len(self._stacks)]
        src_seq = stacked[-1]
        batch = src_seq.dims[1:-1]
        finals = {id(slot.placeholders[0]): slot.final for slot in self._slots.values() if slot.placeholders}
        final_length = finals[id(search.length)]
        saved = self._ctx.graph
        self._ctx.graph = self._parent
        try:
            if self._own_dim:
                axis.set_length_dims([*self._ctx.stepped_dims, *batch, beam])
            n_steps = length_of(steps)
            flen = to_layout(final_length, batch + (beam,))
            from .search import _sized_like
            tmp = self._hints.setdefault(("search", "final"), _sized_like(f"{beam.name}_final", beam))
            n_al = aligner(n_steps.dims, batch)
            own = self._own_dim
            valid = finals[id(search.valid)]
            scores, rank = None, None
            if search.scores:
                from .search import _normalized
                running, alpha = search.scores[0]
                scores = _normalized(finals[id(running)], final_length, alpha)
                if alpha is not None:   # (unnormalized, the beam is in order already)
                    rank = to_layout(where(valid, scores, float("-inf")), batch + (beam,))
            inputs = (src_seq, n_steps, flen) + ((rank,) if rank is not None else ())

            def kernel(env, src, n, fl, key=None):
                size, k = src.shape[0], fl.shape[-1]   # (a beam that changed per step: the last step's)
                n = n_al(torch.as_tensor(n, device=src.device)).expand(src.shape[1:-1])
                first = torch.arange(k, device=src.device).expand(*src.shape[1:-1], k)
                if key is not None:   # the final hypotheses best first, by the normalized score
                    first = key.sort(dim=-1, descending=True, stable=True).indices
                cur, out = first, src.new_empty(size, *src.shape[1:-1], k)
                for t in range(size - 1, -1, -1):   # (an entry's steps past its end: identity)
                    live = (t < n)[..., None]
                    cur = torch.where(live, cur, first)
                    out[t] = cur
                    cur = torch.where(live, src[t].gather(-1, cur), first)
                if own:
                    env.sizes[axis] = size
                    env.lengths_of[axis] = fl.gather(-1, first) if key is not None else fl
                return (out, first) if key is not None else out

            outs = [((steps,) + batch + (tmp,), torch.int64, beam)]
            if rank is not None:
                outs.append((batch + (tmp,), torch.int64, beam))
            node = self._parent.add("backtrack", inputs, kernel, outs,
                                    attrs={"makes_dims": (axis,) if own else ()}, source=self.source)
            index = node.outputs[0]
            for (value, out), seq in zip(self._stacks[:-1], stacked[:-1]):
                v = seq
                if beam in v.dims:
                    v = replace_dim(gather(v, index=index, axis=beam), tmp, beam)
                if steps is not axis:
                    v = replace_dim(v, steps, axis)
                v = to_layout(v, out.dims)
                out.node, out.index = v.node, v.index
                v.node.outputs[v.index] = out
            if rank is not None:   # the states and results in the same order
                order = node.outputs[1]

                def reorder(v: Tensor) -> Tensor:
                    return replace_dim(gather(v, index=order, axis=beam), tmp, beam) if beam in v.dims else v
                final_length, valid, scores = reorder(final_length), reorder(valid), reorder(scores)
                for slot in self._slots.values():
                    if slot.placeholders:
                        leaves, _ = flatten(slot.final, _is_tensor)
                        slot.final = slot.tree([reorder(v) if isinstance(v, Tensor) else v for v in leaves])
            from .search import Result
            self._result = Result(beam, final_length, valid, scores)
        finally:
            self._ctx.graph = saved

    def last(self, value) -> Tensor:
        """After the loop: each batch entry's `value` at its last step."""
        if self._phase != "after":
            raise TraceError(f"loop.last is used after the loop (loop at {self.source}, at "
                             f"{_graph.user_source_line()})")
        if not isinstance(value, Tensor) or value.node is None or value.node.graph is not self.body:
            what = value.describe() if isinstance(value, Tensor) else repr(value)
            raise TraceError(f"loop.last takes a value computed in the loop's body, got the {what} "
                             f"(loop at {self.source}, at {_graph.user_source_line()})")
        block = value.node.attrs.get("masked_block")
        if block is not None:   # a value of a MaskedComputation: as held after the block
            held = block._held.get(id(value))
            if held is None:
                raise TraceError(
                    f"loop.last of the {value.describe()}, computed in the MaskedComputation at {block.source}: "
                    f"take loop.last of a value computed from it after the block (inside the loop, e.g. "
                    f"looplift.identity(value)), which holds its value where the mask is False "
                    f"(loop at {self.source}, at {_graph.user_source_line()})")
            value = held
        if self._search is not None and any(d in value.dims for d in (self._search.beam, self._search.next)):
            raise TraceError(f"loop.last of the {value.describe()} in a search: a value over the beam at an entry's "
                             f"last step belongs to hypotheses that the last prune reorders; keep it as a loop "
                             f"state (loop.state.NAME = value), whose final value follows each final hypothesis "
                             f"(loop at {self.source}, at {_graph.user_source_line()})")
        for v, out in self._lasts:
            if v is value:
                return out
        dims = tuple(value.dims) + tuple(d for d in self.spec.length_dims if d not in value.dims)
        saved = self._ctx.graph
        self._ctx.graph = self.body
        try:
            tracked = to_layout(value, dims)
        finally:
            self._ctx.graph = saved
        out = self.spec.add_last(tracked)
        self._lasts.append((value, out))
        return out


@dataclass(eq=False)
class LoopSpec:
    """A traced loop, as its node's kernel runs it and as passes rewrite it.

    The node's inputs are ``captured + initial states + [max_len]`` (the last
    if it is a tensor); its outputs are the final states (over the
    placeholders' dims), the stacked values (the loop's axis first) and the
    values at each entry's last step (over ``length_dims`` too).
    """

    axis: Dim
    own_dim: bool                      # the loop created `axis` (it ends by `end`)
    source: str
    body: _graph.Graph
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
    node: _graph.Node | None = None
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
    #: a search over a dim of its own steps over `axis`, a dim of its own too: the loop's dim (whose history
    #: ``cum_concat`` keeps) is stepped alongside
    also_steps: Dim | None = None

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

    def add_node(self, graph: _graph.Graph, initial: list[Tensor], stacked: list[Tensor] | None = None,
                 source: str | None = None) -> _graph.Node:
        """Add the loop node to `graph`; `stacked` are pre-made output tensors for the stacks (or None)."""
        max_len = [self.max_len] if isinstance(self.max_len, Tensor) else []
        specs = [(p.dims, p.dtype, p.sparse_dim) for p in self.placeholders]
        specs += [((self.axis,) + v.dims, v.dtype, v.sparse_dim) for v in self.stacks]
        specs += [(v.dims, v.dtype, v.sparse_dim) for v in self.lasts]
        node = graph.add("loop", (*self.captured, *initial, *max_len), _LoopRun(self), specs,
                         attrs={"loop": self, "axis": self.axis.name}, source=source or self.source)
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


def emit_unstack(body: _graph.Graph, x: Tensor, axis: Dim, source: str | None = None) -> Tensor:
    """In the loop body `body`: frame t of `x` along the loop's `axis` at step t.

    A history dim of `axis` (``axis.history()``, from ``cum_concat`` over the sequence) has t + 1 frames at
    step t, as ``cum_concat`` in the loop gives: the frame is cut to them."""
    pos = x.dims.index(axis)
    frame_dims = tuple(d for d in x.dims if d is not axis)
    history = [i for i, d in enumerate(frame_dims) if d.origin is not None and d.origin[0] == "history"
               and d.origin[1][0] is axis.canonical()]

    def kernel(env, v):
        t = env.step(axis)
        frame = v.select(pos, t)
        for i in history:
            frame = frame.narrow(i, 0, t + 1)
        return frame

    return body.add("unstack", (x,), kernel, [(frame_dims, x.dtype, x.sparse_dim)],
                    attrs={"axis": axis.name}, source=source).outputs[0]


class _LoopRun:
    """The loop node's kernel: runs the body step by step (the literal semantics)."""

    def __init__(self, spec: LoopSpec):
        self.spec = spec
        length_dims = spec.length_dims
        axis = spec.axis
        self.axis_lengths = None
        if axis.is_dynamic and not spec.own_dim:
            self.axis_lengths = aligner(_graph.length_dims(axis), length_dims)
        self.end_align = aligner(spec.end.dims, length_dims) if spec.end is not None else None
        self.max_align = aligner(spec.max_len.dims, length_dims) if isinstance(spec.max_len, Tensor) else None
        self.state_align = [aligner(length_dims, p.dims) for p in spec.placeholders]
        src = _frame_source(spec) if self.axis_lengths is not None else None
        #: (the captured sequence, the position of the loop's axis in it, its aligner to (axis, length dims))
        self.cond_seq = None if src is None else (
            src, src.dims.index(axis), aligner((axis,) + spec.end.dims, (axis,) + tuple(length_dims)))
        beam = spec.beam[0] if spec.beam is not None else None
        #: per state, the position of a changing beam in it (None: it has none)
        self.beam_pos = [p.dims.index(beam) if beam is not None and beam in p.dims else None
                         for p in spec.placeholders]

    def _ends_only_at_length(self, env, captured: list, axis_len: torch.Tensor, n_steps: int) -> bool:
        """Whether the loop can run without per-entry bookkeeping: a loop over an axis whose end condition
        is a frame of a sequence computed before it, where no entry ends before its last frame (so no state
        is ever frozen within an entry's length), and nothing past an entry's length is kept frozen."""
        spec = self.spec
        if spec.own_dim or spec.lasts or (spec.freeze and spec.freeze_past_length):
            return False
        if self.cond_seq is None:
            return False
        src, pos, align = self.cond_seq
        seq = captured[next(i for i, c in enumerate(spec.captured) if c is src)]
        if not isinstance(seq, torch.Tensor) or seq.dtype != torch.bool:
            return False
        cond = align(seq.movedim(pos, 0)[:n_steps])
        steps = torch.arange(cond.shape[0], device=cond.device).view(-1, *([1] * (cond.dim() - 1)))
        inside = steps < axis_len
        hit = (cond & inside).long()
        frozen = (hit.cumsum(0) - hit) > 0   # (a step after the entry's end)
        if not spec.include_eos:
            frozen = frozen | hit.bool()        # (the ending step itself does not count)
        return not bool((frozen & inside).any())

    def __call__(self, env, *raws):
        spec = self.spec
        axis = spec.axis
        nc, ns = len(spec.captured), len(spec.placeholders)
        captured, state = list(raws[:nc]), list(raws[nc:nc + ns])
        max_len = raws[nc + ns] if self.max_align is not None else spec.max_len
        stacks, lasts = spec.stacks, spec.lasts
        outputs = spec.new_states + stacks + lasts + ([spec.end] if spec.end is not None else [])
        feed = spec.captured + spec.placeholders
        last_align = [aligner(spec.length_dims, v.dims) for v in lasts]

        if spec.own_dim:
            n_steps = None
        else:
            n_steps = env.size(axis)
        axis_len = None
        if self.axis_lengths is not None:
            axis_len = self.axis_lengths(env.lengths(axis))
            n_steps = min(n_steps, int(axis_len.max())) if axis_len.numel() else 0
        # (an end condition computed before the loop that ends no entry before its length: nothing to track)
        untracked = axis_len is not None and self._ends_only_at_length(env, captured, axis_len, n_steps)
        alive = None        # entries that have not ended (by loop.end), over length_dims
        counted = None      # steps counted per entry
        frames: list[list] = [[] for _ in stacks]
        last_vals: list = [None] * len(lasts)
        inner: dict[Dim, list] = {}
        scratch: dict = {}  # what ops accumulate over this run's steps (cum_concat)
        run_body = env.runner(spec.body, feed, outputs)
        width = env.size(spec.beam[0]) if spec.beam is not None else None   # (the beam's, this step)
        # per-entry bookkeeping only where something depends on it
        track = spec.freeze or bool(lasts) or spec.end is not None or spec.own_dim
        t = 0
        while True:
            if n_steps is not None and t >= n_steps:
                break
            if alive is not None and spec.own_dim and not bool(alive.any()):
                break   # (a loop over an axis runs all its frames: they are stacked, its ended entries frozen)
            if max_len is not None and spec.own_dim and spec.stop_at_max_len:
                # (a search: an entry at its max_seq_len ends there, its hypotheses cut)
                over = t >= (self.max_align(max_len) if self.max_align is not None else max_len)
                if isinstance(over, torch.Tensor):
                    if alive is None:
                        alive = torch.ones([env.size(d) for d in spec.length_dims], dtype=torch.bool,
                                           device=env.device)
                    alive = alive & ~over
                    if not bool(alive.any()):
                        break
                elif over:
                    break
            elif max_len is not None and spec.own_dim:
                over = t >= (self.max_align(max_len) if self.max_align is not None else max_len)
                if isinstance(over, torch.Tensor):
                    over = bool((over & (alive if alive is not None else True)).any())
                if over:
                    err = ExecutionError(
                        f"the loop at {spec.source} ran past max_seq_len ({_describe_max(max_len)}) "
                        f"with entries not yet ended; raise max_seq_len or check the loop.end condition")
                    err.node = spec.node  # the error names its line already
                    raise err
            step_env = env.child({axis: t} if spec.also_steps is None else {axis: t, spec.also_steps: t}, scratch)
            if width is not None:
                step_env.sizes[spec.beam[0]] = width
            results = run_body(step_env, captured + state)
            new_state = results[:ns]
            if width is not None:
                width = step_env.sizes.get(spec.beam[1], width)
                state = [_to_width(old, new, pos) for old, new, pos in zip(state, new_state, self.beam_pos)]
            active = None if axis_len is None or not track or untracked else (t < axis_len)
            if spec.end is not None and not untracked:
                cond = self.end_align(torch.as_tensor(results[-1], device=env.device))  # may be a Python bool
                if alive is None:
                    alive = torch.ones([env.size(d) for d in spec.length_dims], dtype=torch.bool, device=env.device)
                if active is not None:
                    alive = alive & active
                step_counts = alive if spec.include_eos else alive & ~cond
                alive = alive & ~cond
                active = step_counts
            if active is None or not spec.freeze:
                state = new_state
            elif (not spec.freeze_past_length and axis_len is not None
                  and bool((active | (t >= axis_len)).all())):
                state = new_state   # (no entry ended before its length: only padding frames would differ)
            else:
                state = [torch.where(al(active), _raw(new, p.dtype, env), _raw(old, p.dtype, env))
                         for al, new, old, p in zip(self.state_align, new_state, state, spec.placeholders)]
            if active is not None and spec.own_dim:
                counted = active.long() if counted is None else counted + active.long()
            for k, v in enumerate(results[ns:ns + len(stacks)]):
                frames[k].append(v)
            for k, v in enumerate(results[ns + len(stacks):ns + len(stacks) + len(lasts)]):
                v = _raw(v, lasts[k].dtype, env)
                if active is None or last_vals[k] is None:
                    last_vals[k] = v if active is None else torch.where(last_align[k](active), v,
                                                                         torch.zeros_like(v))
                else:
                    last_vals[k] = torch.where(last_align[k](active), v, last_vals[k])
            _collect_inner_dims(step_env, axis, inner)
            t += 1
        if width is not None:
            env.sizes[spec.beam[0]] = width   # (the final states' beam)
        if spec.own_dim:
            env.sizes[axis] = t
            if counted is None:
                counted = torch.full([env.size(d) for d in spec.length_dims], t, dtype=torch.int64,
                                     device=env.device)
            env.lengths_of[axis] = counted
        for d, per_step in inner.items():
            sizes = [s for s, _ in per_step]
            env.sizes[d] = max(sizes) if sizes else 0
            # padded to the loop's size (the steps not run, beyond every entry's length, have length 0)
            env.lengths_of[d] = _stack_frames([n for _, n in per_step], env.size(axis), env.device, torch.int64)
        if t == 0:
            # no step ran: the dims the body creates (inner loops' own dims, varying along `axis`) are empty
            for value in stacks + lasts:
                for d in value.dims:
                    if d.is_dynamic and d.origin is None and axis in d.length_dims and not env.knows_lengths(d):
                        env.sizes[d] = 0
                        env.lengths_of[d] = torch.zeros([env.size(e) for e in env.length_dims(d)],
                                                        dtype=torch.int64, device=env.device)
        size = env.size(axis)
        stacked = []
        for value, fr in zip(stacks, frames):
            stacked.append(_stack_frames(fr, size, env.device, value.dtype,
                                         [_size_or_zero(env, d) for d in value.dims]))
        finals = []
        for value, v in zip(lasts, last_vals):
            finals.append(v if v is not None else torch.zeros([_size_or_zero(env, d) for d in value.dims],
                                                              dtype=value.dtype, device=env.device))
        result = tuple(state + stacked + finals)
        return result[0] if len(result) == 1 else result


def _to_width(old, new, pos: int | None):
    """The state `old` cut or widened to the beam of `new` (at `pos`), for keeping entries that ended: their
    hypotheses are the first slots of both (a prune keeps them all), the slots beyond are `new`'s (empty)."""
    if pos is None or not isinstance(old, torch.Tensor) or not isinstance(new, torch.Tensor):
        return old
    have, want = old.shape[pos], new.shape[pos]
    if have > want:
        return old.narrow(pos, 0, want)
    if have < want:
        return torch.cat([old, new.narrow(pos, have, want - have)], pos)
    return old


def _frame_source(spec: LoopSpec) -> Tensor | None:
    """The captured sequence whose frame is the loop's end condition (a condition computed before the loop,
    over the loop's axis), or None."""
    end = spec.end
    node = end.node if end is not None else None
    if node is None or node.op != "unstack" or not any(node.inputs[0] is c for c in spec.captured):
        return None
    src = node.inputs[0]
    if len(src.dims) != len(end.dims) + 1 or any(d.origin is not None and d.origin[0] == "history" for d in end.dims):
        return None
    return src


def _raw(v, dtype: torch.dtype, env):
    """The raw value `v` as a torch tensor; a Python number (a constant) of the value's `dtype`, not torch's
    default (float32 would lose the precision of a float64 program)."""
    return v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=dtype, device=env.device)


def _size_or_zero(env, d: Dim) -> int:
    try:
        return env.size(d)
    except ExecutionError:
        return 0


def _describe_max(max_len) -> str:
    if isinstance(max_len, torch.Tensor):
        return f"per entry, up to {int(max_len.max()) if max_len.numel() else 0}"
    return str(max_len)


def _collect_inner_dims(step_env, axis: Dim, inner: dict) -> None:
    """Sizes and lengths of dims created in this step (by inner loops) whose lengths vary along `axis`."""
    for d, n in step_env.lengths_of.items():
        # Dims whose lengths come from outside the loop (inputs, e.g. words over (batch, sent)) only were
        # cached here, selected at this step: their lengths are known already, over all steps.
        if step_env.parent is not None and step_env.parent.knows_lengths(d):
            continue
        if d.origin is None and axis in d.length_dims and d in step_env.sizes:
            inner.setdefault(d, []).append((step_env.sizes[d], n))


def _stack_frames(frames: list, size: int, device, dtype, frame_shape: list[int] | None = None):
    """Stack per-step raw values along a new first axis of `size` (padding with zeros), padding
    frames of different shapes (dims created per step) to the largest."""
    if not frames:
        return torch.zeros([size] + list(frame_shape or []), dtype=dtype, device=device)
    frames = [f if isinstance(f, torch.Tensor) else torch.tensor(f, dtype=dtype, device=device) for f in frames]
    shape = [max(s) for s in zip(*(f.shape for f in frames))] if frames[0].dim() else []
    padded = []
    for f in frames:
        if list(f.shape) != shape:
            pad = []
            for have, want in reversed(list(zip(f.shape, shape))):
                pad += [0, want - have]
            f = F.pad(f, pad)
        padded.append(f)
    out = torch.stack(padded, 0)
    if size > out.shape[0]:
        out = torch.cat([out, out.new_zeros((size - out.shape[0],) + out.shape[1:])], 0)
    return out
