"""The bookkeeping of a beam search in a loop: its hidden states, the end of each step, the n-best list.

A :class:`BeamSearch` is made by the first search step traced in a loop's body
(:func:`looplift.search.prune`). It meets the loop only through the loop's
seam (``add_hidden_state``, ``slots``, ``stacks``, ``ending``, ``hints``;
see :mod:`looplift.loop`), and the loop calls back two methods:

* :meth:`BeamSearch.end_of_step`, when the body's block ends: every state and
  stacked value moves onto the pruned hypotheses (reordered by their
  sources; an ended hypothesis keeps its state), the search's own states
  (valid, ended, length) are updated, and the loop ends when every hypothesis
  of an entry has ended;
* :meth:`BeamSearch.after_loop`, after the loop node: the stacked values are
  backtracked from the last step, so each final hypothesis is a consistent
  sequence, and the loop's dim gets the hypotheses' lengths.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import trace as _trace
from .._align import aligner
from .._tree import flatten
from ..dims import Dim, sized_like
from ..errors import DimError
from ..loop import Loop
from ..ops import math as _math
from ..ops import reduce as _reduce
from ..ops import shape as _shape
from ..ops._core import as_tensor
from ..ops.index import gather
from ..source import user_source_line
from ..tensor import Tensor

__all__ = ["BeamSearch", "Result", "Step", "normalized"]


@dataclass
class Result:
    """The search's n-best list, after the loop (``loop.search``): all over ``beam`` and the batch dims."""

    beam: Dim                 # the beam dim of the results (the loop's states and stacks have it)
    lengths: Tensor           # each hypothesis's length (the loop's dim has these lengths)
    valid: Tensor             # False for beam slots without a hypothesis (fewer than the beam size)
    scores: Tensor | None     # the total score of ``choice`` (length-normalized if asked), else None
    #: with score components in ``choice``: each component's total per hypothesis (not normalized)
    components: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Step:
    """``loop.search`` inside a loop's body, after this step's ``choice`` or ``prune``: the hypotheses as they
    were before this step, over the loop's ``beam``."""

    beam: Dim
    ended: Tensor             # the hypothesis had ended (loop.end) before this step
    valid: Tensor             # the slot holds a hypothesis
    lengths: Tensor           # the hypothesis's length so far


class BeamSearch:
    """The search of one loop (one trace): its beam dims and hidden states, and this step's prune."""

    def __init__(self, loop: Loop, beam: Dim, beam_size: int):
        self.loop, self.beam, self.beam_size = loop, beam, beam_size
        #: the beam's size changes per step (a prune with a threshold): its dims are sized at run time
        self.dynamic = not beam.is_static
        hints = loop.hints
        if hints.next_beam is None:
            hints.next_beam = Dim(f"{beam.name}'", batch=True) if self.dynamic else Dim(f"{beam.name}'", beam_size)
        #: the pruned beam: the hypotheses this step keeps
        self.next: Dim = hints.next_beam
        with _trace.current().inside(loop.parent, loops=[x for x in _trace.current().loops if x is not loop]):
            first = _math.eq(_shape.range_over_dim(beam), 0)
            no = _math.ne(_shape.range_over_dim(beam), _shape.range_over_dim(beam))
            zero = _math.mul(_shape.range_over_dim(beam), 0)
        # only the first hypothesis is valid at the start: the others would repeat it
        self.valid = loop.add_hidden_state("search:valid", first, None)
        self.ended = loop.add_hidden_state("search:ended", no, None)
        self.length = loop.add_hidden_state("search:length", zero, None)
        #: this step's prune: the source hypotheses (over the pruned beam), and which kept ones are valid
        self.src: Tensor | None = None
        self.new_valid: Tensor | None = None
        self.scores: list[tuple[Tensor, float | None]] = []   # choice's running score placeholders
        #: choice's score components: name -> the running total's placeholder
        self.components: dict[str, Tensor] = {}
        #: ids of recombined scores: a state assigned them takes them for ended hypotheses too (merged)
        self.recombined: set[int] = set()

    def step(self) -> Step:
        """What ``loop.search`` is inside the body."""
        return Step(self.beam, self.ended, self.valid, self.length)

    @property
    def pruned(self) -> bool:
        """Whether this step pruned (the loop then does the bookkeeping at its end)."""
        return self.src is not None

    def ended_src(self) -> Tensor:
        """Whether the source of each next hypothesis had ended (over the next beam)."""
        return gather(self.ended, index=self.src, axis=self.beam)

    # -- the end of a step ----------------------------------------------------------------------------

    @_trace.acting_for("the beam search's bookkeeping at the end of each step")
    def end_of_step(self) -> None:
        """States and stacks move onto the pruned hypotheses (reordered by their sources, those of ended
        hypotheses kept), the search's own states are updated, and the loop ends when every hypothesis of
        an entry has ended. Called by the loop while its body is still being traced."""
        loop = self.loop
        beam, nxt, src = self.beam, self.next, self.src
        _trace.current().pruned.pop(nxt, None)   # (the values of this step over the pruned beam are done)
        ended_src = self.ended_src()
        # (an ended hypothesis keeps its state; a slot that holds none, merged away or never filled, takes the
        # new values, which nothing reads: so the condition is uniform, and its where a no-op, at most steps)
        keeps = _math.logical_and(self.ended, self.valid)
        own = {id(self.valid), id(self.ended), id(self.length)}
        for slot in loop.slots.values():
            if slot.placeholders and id(slot.placeholders[0]) in own:
                continue
            for i in slot.tensor_leaves:
                v, p = as_tensor(slot.current[i]), slot.placeholders[i]
                if beam in v.dims and nxt not in v.dims:
                    # computed from the previous hypotheses: an ended one keeps its state, then all follow their
                    # sources (one gather: where(keeps[src], p[src], v[src]) is where(keeps, p, v)[src])
                    v = gather(_math.where(keeps, p, v), index=src, axis=beam)
                else:
                    v = self._onto_next(v, f"the new value of loop state {slot.name!r}")
                    if nxt in v.dims and id(v) not in self.recombined:   # an ended hypothesis keeps its state
                        old = gather(p, index=src, axis=beam) if beam in p.dims else p
                        v = _math.where(ended_src, old, v)
                if nxt in v.dims:
                    v = _shape.replace_dim(v, nxt, beam)
                slot.current[i] = v
        cond = None
        if loop.ending is not None:
            cond = self._onto_next(loop.ending[0], "the end condition")
        ended = ended_src if cond is None else _math.logical_or(ended_src, cond)
        counts = _math.logical_not(ended_src)
        if cond is not None and not loop.ending[1]:
            counts = _math.logical_and(counts, _math.logical_not(cond))
        length = _math.add(gather(self.length, index=src, axis=beam), _math.cast(counts, torch.int64))
        valid = self.new_valid
        ended = _math.logical_or(ended, _math.logical_not(valid))
        for placeholder, value in ((self.valid, valid), (self.ended, ended), (self.length, length)):
            loop.set_hidden_state(placeholder, _shape.replace_dim(
                _shape.expand(value, [nxt]) if nxt not in value.dims else value, nxt, beam))
        loop.stacks[:] = [(_shape.replace_dim(v, nxt, beam) if nxt in v.dims else v, out) for v, out in
                          ((self._onto_next(v, "a stacked value"), out) for v, out in loop.stacks)]
        batch = tuple(d for d in src.dims if d is not nxt)
        src_beam = _shape.to_layout(_shape.replace_dim(src, nxt, beam), batch + (beam,))
        # (the source hypotheses of every step, stacked last: what the backtracking follows)
        loop.stacks.append((src_beam, Tensor((loop.axis,) + src_beam.dims, src_beam.dtype, sparse_dim=beam)))
        if loop.ending is not None or loop.own_dim:
            still = _math.logical_not(loop.slot_of(self.ended).current[0])
            loop.ending = (_math.eq(_reduce.sum(_math.cast(still, torch.int64), axis=beam), 0), True)

    def _onto_next(self, v: Tensor, what: str) -> Tensor:
        beam, nxt = self.beam, self.next
        if beam in v.dims and nxt in v.dims:
            raise DimError(f"{what} is the {v.describe()}: it has both the beam and the pruned beam "
                           f"{nxt.name!r}; take one of them (e.g. looplift.gather(x, index=pruned.src, "
                           f"axis={beam.name!r})) (loop at {self.loop.source}, at {user_source_line()})")
        return gather(v, index=self.src, axis=beam) if beam in v.dims else v

    # -- after the loop -------------------------------------------------------------------------------

    @_trace.acting_for("the beam search's backtracking")
    def after_loop(self) -> None:
        """The stacked values of each final hypothesis, found by following the source hypotheses back from
        the last step; the loop's dim gets the hypotheses' lengths; ``loop.search`` the n-best list."""
        loop = self.loop
        spec, node = loop.spec, loop.spec.node
        beam, steps, axis = self.beam, spec.axis, loop.axis
        ns = len(spec.placeholders)
        stacked = node.outputs[ns:ns + len(loop.stacks)]
        src_seq = stacked[-1]
        batch = src_seq.dims[1:-1]
        finals = {id(slot.placeholders[0]): slot.final for slot in loop.slots.values() if slot.placeholders}
        final_length = finals[id(self.length)]
        ctx = _trace.current()
        with ctx.inside(loop.parent):
            if loop.own_dim:
                axis.set_length_dims([*ctx.stepped_dims, *batch, beam])
            n_steps = _shape.length(steps)
            flen = _shape.to_layout(final_length, batch + (beam,))
            if loop.hints.final_beam is None:
                loop.hints.final_beam = sized_like(f"{beam.name}_final", beam)
            tmp = loop.hints.final_beam
            valid = finals[id(self.valid)]
            components = {k: finals[id(p)] for k, p in self.components.items()}
            scores, rank = None, None
            if self.scores:
                running, alpha = self.scores[0]
                scores = normalized(finals[id(running)], final_length, alpha)
                if alpha is not None or self.recombined:   # (else the last prune left the beam in order)
                    rank = _shape.to_layout(_math.where(valid, scores, float("-inf")), batch + (beam,))
            index, order = self._backtrack_node(src_seq, n_steps, flen, rank, tmp)
            for (_, out), seq in zip(loop.stacks[:-1], stacked[:-1]):
                v = seq
                if beam in v.dims:
                    v = _shape.replace_dim(gather(v, index=index, axis=beam), tmp, beam)
                if steps is not axis:
                    v = _shape.replace_dim(v, steps, axis)
                v = _shape.to_layout(v, out.dims)
                out.node, out.index = v.node, v.index
                v.node.outputs[v.index] = out
            if order is not None:   # the states and results in the same order

                def reorder(v: Tensor) -> Tensor:
                    return _shape.replace_dim(gather(v, index=order, axis=beam), tmp, beam) if beam in v.dims else v
                final_length, valid, scores = reorder(final_length), reorder(valid), reorder(scores)
                components = {k: reorder(v) for k, v in components.items()}
                for slot in loop.slots.values():
                    if slot.placeholders:
                        leaves, _ = flatten(slot.final, lambda v: isinstance(v, Tensor))
                        slot.final = slot.tree([reorder(v) if isinstance(v, Tensor) else v for v in leaves])
            loop.search_result = Result(beam, final_length, valid, scores, components)

    def _backtrack_node(self, src_seq: Tensor, n_steps: Tensor, flen: Tensor, rank: Tensor | None, tmp: Dim):
        """The node following the source hypotheses back: ``(index, order)``, the source hypothesis of each
        final one at every step (over the steps, the batch and `tmp`), and the final hypotheses best first
        by `rank` (None without a `rank`: they are in order already)."""
        loop, beam = self.loop, self.beam
        steps, axis, own = loop.spec.axis, loop.axis, loop.own_dim
        batch = src_seq.dims[1:-1]
        n_al = aligner(n_steps.dims, batch)

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

        inputs = (src_seq, n_steps, flen) + ((rank,) if rank is not None else ())
        outs = [((steps,) + batch + (tmp,), torch.int64, beam)]
        if rank is not None:
            outs.append((batch + (tmp,), torch.int64, beam))
        node = loop.parent.add("backtrack", inputs, kernel, outs, source=loop.source,
                               makes_dims=(axis,) if own else ())
        return node.outputs[0], (node.outputs[1] if rank is not None else None)


def normalized(score: Tensor, length: Tensor, alpha: float | None) -> Tensor:
    """`score` divided by ``length ** alpha`` (at least length 1); `alpha` None: the score itself."""
    if alpha is None:
        return score
    n = _math.cast(_math.maximum(length, 1), score.dtype)
    return _math.truediv(score, n if alpha == 1.0 else _math.pow(n, alpha))

