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

This module is the user-facing loop only. When its block ends it records the
traced loop as a :class:`looplift.regions.LoopSpec` (the IR); the runtime runs
that (:mod:`looplift.runtime.loop_run`). A search in the body
(:mod:`looplift.search`) and a :class:`looplift.MaskedComputation` meet the
loop through the seam marked below: hidden states, the state slots, the
stacks, the end condition and the loop's hints.
"""

from __future__ import annotations

from typing import Literal

import torch

from . import trace as _trace
from ._tree import flatten, unflatten
from .dims import Dim
from .errors import DimError, DTypeError, TraceError, entry_methods
from .graph import Graph, Op
from .ops._core import as_tensor, dims_str
from .ops.math import cast
from .ops.shape import expand, to_layout
from .regions import LoopSpec, emit_loop_index, emit_unstack
from .source import user_source_line
from .tensor import Tensor
from .trace import LoopHints

__all__ = ["Loop", "LoopState", "StateSlot"]


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
        raise TraceError(f"a loop state cannot be deleted ({name!r}, at {user_source_line()})")


class StateSlot:
    """One state variable: its initial value (the leaves of its structure), the placeholders of its tensor
    leaves in the body, their current values while the body is traced, and the final value after the loop."""

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
        ctx = _trace.current("Loop")
        self._ctx = ctx
        self.source = user_source_line()
        if axis is None and max_seq_len is None:
            raise TraceError(f"a Loop needs an axis to loop over or a max_seq_len (with loop.end(...)) "
                             f"(at {self.source})")
        if axis is not None and not isinstance(axis, Dim):
            raise DimError(f"Loop(axis=...) takes a Dim, got {axis!r} (at {self.source})")
        #: What an earlier attempt of this trace learnt about this loop (see looplift.trace.LoopHints).
        self.hints: LoopHints = ctx.next_loop_hints()
        #: The loop makes its own dim, whose lengths :meth:`end` sets. (So does a loop with a max_seq_len in
        #: search mode: the search makes the lengths; the reference labels' dim `axis`, which training loops
        #: over, is not known there.)
        self.own_dim = axis is None or (max_seq_len is not None and ctx.mode == "search")
        #: The dim the loop steps over: `axis`, or a new dynamic dim whose lengths are set by :meth:`end`.
        self.axis: Dim = axis.canonical() if not self.own_dim else Dim(name if axis is None else axis.name)
        if isinstance(max_seq_len, (Tensor, int)) and not isinstance(max_seq_len, bool):
            self._max_len = max_seq_len if isinstance(max_seq_len, int) else as_tensor(max_seq_len)
        elif max_seq_len is None:
            self._max_len = None
        else:
            raise TraceError(f"max_seq_len must be an int or a looplift tensor, got {max_seq_len!r} "
                             f"(at {self.source})")
        if isinstance(self._max_len, int) and self._max_len < 1:
            raise DimError(f"max_seq_len must be at least 1 (the most steps the loop may take), got {self._max_len} "
                           f"(at {self.source})")
        if isinstance(self._max_len, Tensor) and self._max_len.dtype.is_floating_point:
            raise DTypeError(f"max_seq_len must be an integer, got the {self._max_len.describe()} (at {self.source})")
        #: The graph around the loop, and the body traced into a graph of its own.
        self.parent = ctx.graph
        self.body = Graph(parent=ctx.graph)
        #: The state variables by name (hidden ones included).
        self.slots: dict[str, StateSlot] = {}
        self.phase: Literal["before", "inside", "after"] = "before"
        #: (value in the body, its stacked tensor after the loop) per ``loop.stack``.
        self.stacks: list[tuple[Tensor, Tensor]] = []
        self._lasts: list[tuple[Tensor, Tensor]] = []
        #: (the end condition, include_eos) once :meth:`end` was called.
        self.ending: tuple[Tensor, bool] | None = None
        self._index: Tensor | None = None
        #: The beam search of this loop (``looplift.search.BeamSearch``), once a search step ran in its body.
        self.searcher = None
        #: After a loop that searched: its n-best list (``looplift.search.Result``, see :attr:`search`).
        self.search_result = None
        #: The IR record of the traced loop, once its block ended.
        self.spec: LoopSpec | None = None
        self.state = LoopState(self)

    # -- state ---------------------------------------------------------------------------------

    def _read_state(self, name: str):
        slot = self.slots.get(name)
        if slot is None:
            raise TraceError(f"loop state {name!r} was never initialised; set loop.state.{name} = ... before "
                             f"the loop (loop at {self.source}, read at {user_source_line()})")
        if self.phase == "before":
            return slot.tree(slot.initial)
        if self.phase == "inside":
            return slot.tree(slot.current)
        return slot.final

    def _write_state(self, name: str, value) -> None:
        here = user_source_line()
        if self.phase == "before":
            self.slots[name] = StateSlot(name, value, here)
            return
        if self.phase == "after":
            raise TraceError(f"loop state {name!r} assigned after the loop ended (loop at {self.source}, "
                             f"at {here})")
        slot = self.slots.get(name)
        if slot is None:
            raise TraceError(f"loop state {name!r} has no initial value; set loop.state.{name} = ... before "
                             f"the loop (loop at {self.source}, assigned at {here})")
        leaves, spec = flatten(value, _is_tensor)
        if spec != slot.spec:
            raise TraceError(f"loop state {name!r} is assigned a value of another structure than its initial "
                             f"value (initial at {slot.source}, assigned at {here})")
        tensors = set(slot.tensor_leaves)
        for i, leaf in enumerate(leaves):
            if i not in tensors and isinstance(leaf, Tensor):
                raise TraceError(f"loop state {name!r} is assigned a tensor where its initial value has "
                                 f"{slot.initial[i]!r}: a state's initial value fixes which of its parts are "
                                 f"tensors; give it an initial tensor, e.g. looplift.zeros([...]) (initial at "
                                 f"{slot.source}, assigned at {here})")
        current = list(slot.current)
        for i in slot.tensor_leaves:
            current[i] = as_tensor(leaves[i])
        slot.current = current

    # -- the seam: what looplift.search and MaskedComputation use ------------------------------------
    # (besides the attributes documented in __init__: hints, parent, body, slots, phase, stacks, ending,
    # searcher, search_result, spec)

    def add_hidden_state(self, name: str, initial: Tensor, sparse_dim) -> Tensor:
        """A state the user does not name (a MaskedComputation's held value, a search's scores); returns its
        placeholder. Called while the body is traced; `initial` lives in the loop's parent graph."""
        slot = StateSlot(name, initial, user_source_line())
        init = slot.initial[0]
        extra = list(dict.fromkeys(d for d in self.batch_dims() + self.hints.state_dims.get((name, 0), [])
                                   if d not in init.dims))
        if extra:
            with self._ctx.inside(self.parent):
                init = slot.initial[0] = to_layout(expand(init, extra), [*extra, *init.dims])
        node = self.body.add(Op.STATE, (), None, [(init.dims, init.dtype, sparse_dim)],
                             attrs={"state": name, "leaf": 0}, source=slot.source,
                             on_behalf_of=self._ctx.on_behalf_of)
        slot.placeholders = [node.outputs[0]]
        slot.current = [node.outputs[0]]
        self.slots[name] = slot
        return node.outputs[0]

    def slot_of(self, placeholder: Tensor) -> StateSlot:
        """The hidden state whose placeholder is `placeholder`."""
        return next(s for s in self.slots.values() if s.placeholders and s.placeholders[0] is placeholder)

    def set_hidden_state(self, placeholder: Tensor, value: Tensor) -> None:
        """Assign the hidden state of `placeholder` its next value."""
        self.slot_of(placeholder).current = [value]

    def beam_pair(self) -> tuple[Dim, Dim] | None:
        """(the beam, the pruned beam) of this loop's search, once known (the trace after the first), else None."""
        hints = self.hints
        return None if hints.beam is None or hints.next_beam is None else (hints.beam, hints.next_beam)

    def batch_dims(self) -> list[Dim]:
        """Dims every state gets: those along which entries may end at different steps."""
        dims: list[Dim] = []
        if self.axis.is_dynamic and not self.own_dim:
            dims += _trace.length_dims(self.axis)
        if isinstance(self._max_len, Tensor):
            dims += self._max_len.dims
        dims += self.hints.batch
        out: list[Dim] = []
        for d in dims:
            if d not in out:
                out.append(d)
        return out

    def __enter__(self) -> Loop:
        if self.phase != "before":
            raise TraceError(f"a Loop is entered once (loop at {self.source})")
        batch = self.batch_dims()
        for slot in self.slots.values():
            for i in slot.tensor_leaves:
                init = slot.initial[i]
                extra = [d for d in batch + self.hints.state_dims.get((slot.name, i), []) if d not in init.dims]
                extra = list(dict.fromkeys(extra))   # (a dim may be hinted for the loop and for the state)
                if extra:   # (batch dims first: the layout ops and cells take them in)
                    init = slot.initial[i] = to_layout(expand(init, extra), [*extra, *init.dims])
        self._ctx.loops.append(self)
        self._ctx.graph = self.body
        for slot in self.slots.values():
            slot.placeholders = [None] * len(slot.initial)
            for i in slot.tensor_leaves:
                init = slot.initial[i]
                node = self.body.add(Op.STATE, (), None, [(init.dims, init.dtype, init.sparse_dim)],
                                     attrs={"state": slot.name, "leaf": i}, source=slot.source)
                slot.placeholders[i] = node.outputs[0]
            slot.current = [p if p is not None else v for p, v in zip(slot.placeholders, slot.initial)]
        self.phase = "inside"
        return self

    # -- inside ------------------------------------------------------------------------------------

    def _require_inside(self, what: str) -> None:
        if self.phase != "inside" or self._ctx.graph is not self.body:
            raise TraceError(f"loop.{what} is used inside the `with` block of its loop (over {self.axis.name!r}), "
                             f"directly (loop at {self.source}, used at {user_source_line()})")

    def unstack(self, x) -> Tensor:
        """Frame t of `x` at step t (x must have the loop's axis)."""
        self._require_inside("unstack")
        x = as_tensor(x)
        if self.own_dim:
            raise TraceError(f"loop.unstack needs a loop over an axis (Loop(axis=...)); this loop ends by "
                             f"loop.end (loop at {self.source}, at {user_source_line()})")
        if self.axis not in x.dims:
            raise DimError(f"loop.unstack: the {x.describe()} does not have the loop's axis {self.axis.name!r} "
                           f"(loop at {self.source}, at {user_source_line()})")
        return emit_unstack(self.body, x, self.axis)

    @property
    def index(self) -> Tensor:
        """The step counter: 0, 1, 2, ... (int64, ``sparse_dim`` the loop's axis)."""
        # A value like any other: readable in regions nested in the body too (an inner loop, a Cond branch).
        if self.phase != "inside" or not self._ctx.graph.is_inside(self.body):
            self._require_inside("index")
        if self._index is None:
            # (a search over its own dim steps over a dim of its own, and this dim alongside: see LoopSpec)
            self._index = emit_loop_index(self.body, self.axis)
        return self._index

    def stack(self, value) -> Tensor:
        """`value` of every step, stacked along the loop's axis (usable after the loop)."""
        self._require_inside("stack")
        value = as_tensor(value)
        if self.axis in value.dims:
            raise DimError(f"loop.stack: the {value.describe()} already has the loop's axis {self.axis.name!r}")
        dims = value.dims
        if self.searcher is not None:   # stacked as the loop's beam (after the step's bookkeeping)
            dims = tuple(self.searcher.beam if d is self.searcher.next else d for d in dims)
            if self.searcher.beam in value.dims and self.searcher.next in value.dims:
                raise DimError(f"loop.stack: the {value.describe()} has both the beam and the pruned beam")
        out = Tensor((self.axis,) + dims, value.dtype, sparse_dim=value.sparse_dim)
        self.stacks.append((value, out))
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
            raise DTypeError(f"loop.end needs a bool condition, got the {cond.describe()}")
        if self.ending is not None:
            raise TraceError(f"loop.end is called once per loop (loop at {self.source}, again at "
                             f"{user_source_line()})")
        self.ending = (cond, bool(include_eos))

    # -- leaving ----------------------------------------------------------------------------------

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._leave_body()
            return
        if self.own_dim and self.ending is None:
            self._leave_body()
            raise TraceError(f"a Loop without an axis must call loop.end(...) in its body (loop at {self.source})")
        search = self.searcher if self.searcher is not None and self.searcher.pruned else None
        if search is not None:   # states and stacks onto the pruned hypotheses; the end when all ended
            search.end_of_step()
        new_values = self._new_state_values()
        if self._retrace_needed(new_values):
            self._leave_body()
            raise _trace.Retrace()
        length_dims = self._length_dims()
        steps = self.axis
        if search is not None and self.own_dim:   # the loop runs over its steps; the dim of its results has lengths
            steps = Dim(f"{self.axis.name}_steps")   # per hypothesis (set by the backtracking)
            steps.set_length_dims([*self._ctx.stepped_dims[:-1], *length_dims])
        elif self.own_dim:
            self.axis.set_length_dims([*self._ctx.stepped_dims[:-1], *length_dims])
        outs = [to_layout(v, p.dims) for v, p in new_values]
        end_cond = None
        if self.ending is not None:
            end_cond = self.ending[0]
        self._leave_body()
        self._build_node(outs, end_cond, length_dims, steps, search)
        self.phase = "after"
        if search is not None:   # the stacks backtracked into consistent hypotheses, the n-best list
            search.after_loop()

    def _leave_body(self) -> None:
        if self.searcher is not None:   # (the values of this step over the pruned beam are done)
            self._ctx.pruned.pop(self.searcher.next, None)
        if self._ctx.loops and self._ctx.loops[-1] is self:
            self._ctx.loops.pop()
        self._ctx.graph = self.parent

    def _new_state_values(self) -> list[tuple[Tensor, Tensor]]:
        """(new value, placeholder) per state leaf, checked; constants cast to the state's dtype."""
        pairs = []
        for slot in self.slots.values():
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
                    if new.node is not None and new.node.op == Op.CONSTANT:
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
        for slot in self.slots.values():
            for i in slot.tensor_leaves:
                new, ph = new_values[k]
                k += 1
                extra = [d for d in new.dims if d not in ph.dims]
                if self.axis is not None and self.axis.canonical() in extra:
                    raise DimError(f"loop state {slot.name!r} would get the loop's axis {self.axis.name!r}: its "
                                   f"new value is the {new.describe()}, over the whole sequence; inside the loop "
                                   f"use loop.unstack(x) for the frame of this step (loop at {self.source})",
                                   where=new.source)
                if extra:
                    hint = self.hints.state_dims.setdefault((slot.name, i), [])
                    hint += [d for d in extra if d not in hint]
                    needed = True
        if self.ending is not None:
            cond = self.ending[0]
            missing = [d for d in cond.dims if any(d not in ph.dims for _, ph in new_values)]
            if missing:
                self.hints.batch += [d for d in missing if d not in self.hints.batch]
                needed = True
        return needed

    def _length_dims(self) -> tuple[Dim, ...]:
        """The dims along which the number of steps differs per entry."""
        dims = list(self.batch_dims())
        if self.ending is not None:
            dims += [d for d in self.ending[0].dims if d not in dims]
        if not self.own_dim and not self.axis.is_dynamic and self.ending is None:
            return ()
        return tuple(dims)

    def _build_node(self, new_states: list[Tensor], end_cond: Tensor | None, length_dims: tuple[Dim, ...],
                    steps: Dim, search) -> None:
        returned = [*new_states, *(v for v, _ in self.stacks), *([end_cond] if end_cond is not None else [])]
        placeholders = [slot.placeholders[i] for slot in self.slots.values() for i in slot.tensor_leaves]
        searching = search is not None
        spec = LoopSpec(
            axis=steps, own_dim=self.own_dim, source=self.source, body=self.body,
            captured=self.body.captured(returned), placeholders=placeholders, new_states=new_states,
            stacks=[v for v, _ in self.stacks], end=end_cond,
            include_eos=self.ending[1] if self.ending is not None else True, max_len=self._max_len,
            length_dims=length_dims,
            state_names=[f"{slot.name}" + (f"[{i}]" if len(slot.tensor_leaves) > 1 else "")
                         for slot in self.slots.values() for i in slot.tensor_leaves],
            stop_at_max_len=searching,
            beam=(search.beam, search.next) if searching and search.dynamic else None,
            fixed_beam=search.beam if searching and not search.dynamic else None,
            also_steps=self.axis if steps is not self.axis else None)
        initial = [slot.initial[i] for slot in self.slots.values() for i in slot.tensor_leaves]
        # (a search's stacks are backtracked into the user's tensors after the loop)
        node = spec.add_node(self.parent, initial, None if searching else [out for _, out in self.stacks])
        self.spec = spec
        finals = iter(node.outputs[:len(placeholders)])
        for slot in self.slots.values():
            leaves = list(slot.initial)
            for i in slot.tensor_leaves:
                leaves[i] = next(finals)
            slot.final = slot.tree(leaves)

    # -- after the loop ----------------------------------------------------------------------------

    @property
    def beam(self) -> Dim | None:
        """The beam dim of a loop that searches (``looplift.search``), else None."""
        return self.searcher.beam if self.searcher is not None else None

    @property
    def search(self):
        """After a loop that searches: its :class:`looplift.search.Result` (the n-best list's lengths,
        validity, ``choice`` scores and score components; the states and stacks are over ``loop.beam``).
        Inside the body, after this step's ``choice`` or ``prune``: a :class:`looplift.search.Step` (whether
        each hypothesis had ended before this step, is valid, its length so far)."""
        if self.phase == "inside" and self.searcher is not None:
            return self.searcher.step()
        if self.phase != "after" or self.search_result is None:
            where = "inside the body after this step's choice or prune, or " if self.phase == "inside" else ""
            raise TraceError(f"loop.search is read {where}after a loop whose body runs a search step "
                             f"(loop at {self.source}, at {user_source_line()})")
        return self.search_result

    def last(self, value) -> Tensor:
        """After the loop: each batch entry's `value` at its last step (zeros for an entry that ran no step)."""
        if self.phase != "after":
            raise TraceError(f"loop.last is used after the loop (loop at {self.source}, at "
                             f"{user_source_line()})")
        if not isinstance(value, Tensor) or value.node is None or value.node.graph is not self.body:
            what = value.describe() if isinstance(value, Tensor) else repr(value)
            raise TraceError(f"loop.last takes a value computed in the loop's body, got the {what} "
                             f"(loop at {self.source}, at {user_source_line()})")
        block = value.node.masked_block
        if block is not None:   # a value of a MaskedComputation: as held after the block
            held = block.held_value(value)
            if held is None:
                raise TraceError(
                    f"loop.last of the {value.describe()}, computed in the MaskedComputation at {block.source}: "
                    f"take loop.last of a value computed from it after the block (inside the loop, e.g. "
                    f"looplift.identity(value)), which holds its value where the mask is False "
                    f"(loop at {self.source}, at {user_source_line()})")
            value = held
        if self.searcher is not None and any(d in value.dims for d in (self.searcher.beam, self.searcher.next)):
            raise TraceError(f"loop.last of the {value.describe()} in a search: a value over the beam at an entry's "
                             f"last step belongs to hypotheses that the last prune reorders; keep it as a loop "
                             f"state (loop.state.NAME = value), whose final value follows each final hypothesis "
                             f"(loop at {self.source}, at {user_source_line()})")
        for v, out in self._lasts:
            if v is value:
                return out
        dims = tuple(value.dims) + tuple(d for d in self.spec.length_dims if d not in value.dims)
        with self._ctx.inside(self.body):
            tracked = to_layout(value, dims)
        out = self.spec.add_last(tracked)
        self._lasts.append((value, out))
        return out


entry_methods(Loop, "__init__", "__enter__", "__exit__", "unstack", "index", "stack", "end", "last",
              public="looplift.Loop")
entry_methods(LoopState, "__getattr__", "__setattr__", "__delattr__", public="looplift.Loop.state")
