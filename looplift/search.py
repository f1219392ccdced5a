"""Beam search with the beam as an explicit dim (DESIGN.md §6).

Inside a :class:`looplift.Loop`, one search step is built from atomic ops::

    cand = looplift.search.expand(loop.state.score, log_probs, axis=vocab)  # over (beam, vocab)
    cand = looplift.where(allowed, cand, -inf)                              # filtering: any op
    pruned = looplift.search.prune(cand, beam_size=12, axis=vocab)
    loop.state.score = pruned.scores                                        # over the new beam
    loop.state.label = pruned.labels
    loop.end(pruned.labels == eos, include_eos=True)

``looplift.choice`` is that step in one call (with the running score kept by
the loop), and in train/eval mode simply the reference label.

The beam is a dim of its own (``loop.beam``, static size ``beam_size``); every
op treats it as a batch dim, so model code does not change for search. With a
``threshold`` (``prune(..., threshold=t)``), only the hypotheses within ``t`` of
an entry's best are kept, and the beam's size changes per step: a step runs on
as many slots as the entry that kept the most (the first step on one), and the
results have the last step's. Slots an entry does not fill are invalid. A
prune gives values over the *next* beam (``pruned.beam``), whose hypotheses
come from the source hypotheses ``pruned.src`` of the current beam. The loop
does the bookkeeping when the step ends:

* every state is reordered: a new value over the current beam (computed from
  the previous hypotheses, e.g. an LSTM state) is gathered by ``src``; one over
  the next beam is taken as it is. Both become the loop's beam dim again;
* a hypothesis that ended (``loop.end``) keeps its states and score and
  extends only by one label (label 0, with score 0, beyond its length);
* stacked values are backtracked after the loop, so they are consistent
  hypotheses, and the loop's dim has lengths per hypothesis;
* the loop stops when every hypothesis of every entry ended, or at
  ``max_seq_len`` (the hypotheses are then cut there, not an error).

At the first step all hypotheses are the same (the states have no beam yet):
only the first is valid; invalid hypotheses have score ``-inf`` and are never
chosen while a valid candidate is left.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import graph as _graph
from .dims import Dim
from .errors import DimError, TraceError
from .ops import masking as _masking
from .ops import math as _math
from .ops import reduce as _reduce
from .ops import shape as _shape
from .ops._core import as_tensor, emit_many
from .ops.history import note_sources
from .ops.index import gather
from .tensor import Tensor

__all__ = ["expand", "prune", "Pruned", "recombine", "best", "Result", "choice"]

NEG_INF = float("-inf")


@dataclass
class Pruned:
    """What :func:`prune` keeps: over the next beam ``beam`` (and the batch dims)."""

    beam: Dim          # the next beam
    src: Tensor        # the source hypothesis of each kept one (sparse_dim: the current beam)
    labels: Tensor     # the label of each (sparse_dim: the label dim pruned over)
    scores: Tensor     # the score of each (-inf where fewer candidates than the beam size were valid)
    index: Tensor      # (internal) the flat candidate index, for :meth:`take`

    def take(self, candidates) -> Tensor:
        """The values of `candidates` (over the current beam and the label dim, e.g. a score component) at
        the kept hypotheses: over the next beam."""
        search = _current_search("Pruned.take")
        candidates = as_tensor(candidates)
        if self.labels.sparse_dim in candidates.dims:
            candidates = gather(candidates, index=self.labels, axis=self.labels.sparse_dim)
        if search.beam in candidates.dims:
            candidates = gather(candidates, index=self.src, axis=search.beam)
        return candidates


@dataclass
class Result:
    """The search's n-best list, after the loop (``loop.search``): all over ``beam`` and the batch dims."""

    beam: Dim                 # the beam dim of the results (the loop's states and stacks have it)
    lengths: Tensor           # each hypothesis's length (the loop's dim has these lengths)
    valid: Tensor             # False for beam slots without a hypothesis (fewer than the beam size)
    scores: Tensor | None     # the total score of ``choice`` (length-normalized if asked), else None


class _Search:
    """The search state of one loop (one trace): its beam dims and hidden states, and this step's prune."""

    def __init__(self, loop, beam: Dim, beam_size: int):
        self.loop, self.beam, self.beam_size = loop, beam, beam_size
        #: the beam's size changes per step (a prune with a threshold): its dims are sized at run time
        self.dynamic = not beam.is_static
        self.next: Dim = loop._hints.setdefault(
            ("search", "next"), Dim(f"{beam.name}'", batch=True) if self.dynamic else Dim(f"{beam.name}'", beam_size))
        hidden = loop._add_hidden_state
        with _in_parent(loop):
            first = _math.eq(_shape.range_over_dim(beam), 0)
            no = _math.ne(_shape.range_over_dim(beam), _shape.range_over_dim(beam))
            zero = _math.mul(_shape.range_over_dim(beam), 0)
        # only the first hypothesis is valid at the start: the others would repeat it
        self.valid = hidden("search:valid", first, None)
        self.ended = hidden("search:ended", no, None)
        self.length = hidden("search:length", zero, None)
        self.src: Tensor | None = None
        self.new_valid: Tensor | None = None
        self.scores: list[tuple[Tensor, float | None]] = []   # choice's running score placeholders
        #: ids of recombined scores: a state assigned them takes them for ended hypotheses too (merged)
        self.recombined: set[int] = set()

    def ended_src(self) -> Tensor:
        """Whether the source of each next hypothesis had ended (over the next beam)."""
        return gather(self.ended, index=self.src, axis=self.beam)


def _in_parent(loop):
    ctx = loop._ctx

    class _Scope:
        def __enter__(self):
            self.saved = ctx.graph, list(ctx.loops)
            ctx.graph = loop._parent
            ctx.loops[:] = [x for x in ctx.loops if x is not loop]

        def __exit__(self, *exc):
            ctx.graph, ctx.loops[:] = self.saved

    return _Scope()


def _loop(what: str):
    ctx = _graph.current(what)
    from .loop import Loop
    if not ctx.loops or not isinstance(ctx.loops[-1], Loop) or ctx.graph is not ctx.loops[-1].body:
        raise TraceError(f"{what} is used directly inside the body of a looplift.Loop (at "
                         f"{_graph.user_source_line()})")
    return ctx.loops[-1]


def _current_search(what: str) -> _Search:
    loop = _loop(what)
    if loop._search is None:
        raise TraceError(f"{what}: no search step yet in this loop (call looplift.search.prune first) "
                         f"(at {_graph.user_source_line()})")
    return loop._search


def _search_of(loop, beam_size: int, dynamic: bool = False) -> _Search:
    if loop._search is None:
        beam = loop._hints.get(("search", "beam"))
        if beam is None:
            beam = loop._hints[("search", "beam")] = _dynamic_beam() if dynamic else Dim("beam", beam_size)
            loop._hints[("search", "beam_size")] = beam_size
        if loop._hints[("search", "beam_size")] != beam_size:
            raise DimError(f"the search in the loop at {loop.source} has beam size "
                           f"{loop._hints[('search', 'beam_size')]}, not {beam_size} (at {_graph.user_source_line()})")
        loop._search = _Search(loop, beam, beam_size)
    elif loop._search.beam_size != beam_size:
        raise DimError(f"one search step per loop: the beam size is {loop._search.beam_size} "
                       f"(at {_graph.user_source_line()})")
    return loop._search


def _dynamic_beam() -> Dim:
    """The beam dim of a search whose number of hypotheses changes per step: sized at run time, 1 at the
    start (the loop sets it at each step from the previous step's prune)."""
    beam = Dim("beam", batch=True)
    beam.origin = ("beam", ())
    beam._size_rule = lambda: 1
    return beam


def _sized_like(name: str, dim: Dim) -> Dim:
    """A dim of the size of `dim`: a static one if `dim` is static, else sized at run time as `dim` is."""
    if dim.is_static:
        return Dim(name, dim.size)
    out = Dim(name, batch=True)
    out.origin = ("sized_like", (dim,))
    out._size_rule = lambda size: size
    return out


def expand(scores, label_scores, *, axis: Dim) -> Tensor:
    """The scores of all extensions: running `scores` (over the beam) plus `label_scores` (over the beam and
    the label dim `axis`).

    A hypothesis that ended extends only by label 0 with score 0 (its score stays; its frames beyond its
    length are padding); an invalid one (an empty beam slot) by nothing.
    """
    loop = _loop("looplift.search.expand")
    scores, label_scores = as_tensor(scores), as_tensor(label_scores)
    if axis not in label_scores.dims:
        raise DimError(f"looplift.search.expand: the label scores {label_scores.describe()} do not have the "
                       f"label dim {axis.name!r} (at {_graph.user_source_line()})")
    beam = loop._hints.get(("search", "beam"))
    if beam is None:   # (the first trace: the states have no beam yet, the loop traces again with it)
        return _math.add(scores, label_scores)
    search = _search_of(loop, loop._hints[("search", "beam_size")])
    labels = _shape.range_over_dim(axis)
    only_first = _math.where(_math.eq(labels, 0), 0.0, NEG_INF)
    extend = _math.where(search.ended, only_first, label_scores)
    extend = _math.where(search.valid, extend, NEG_INF)
    return _math.add(scores, extend)


def prune(scores, *, beam_size: int, axis: Dim, threshold: float | None = None,
          sample: bool = False) -> Pruned:
    """Keep the `beam_size` best candidates of `scores` (over the current beam, if any, and the label dim
    `axis`), per batch entry.

    Args:
        threshold: keep only the candidates within this of the best (at most `beam_size`): the next beam
            is as wide as the most any batch entry keeps at this step, its other slots invalid (score -inf).
            The beam dim's size then changes per step (it is sized at run time, 1 before the first step).
        sample: draw the hypotheses instead (Gumbel top-k: without replacement, each in proportion to
            ``exp(score)``); the scores kept are the candidates' own.
    """
    loop = _loop("looplift.search.prune")
    scores = as_tensor(scores)
    if not isinstance(beam_size, int) or beam_size < 1:
        raise DimError(f"looplift.search.prune: beam_size must be a positive int, got {beam_size!r} "
                       f"(at {_graph.user_source_line()})")
    if axis not in scores.dims:
        raise DimError(f"looplift.search.prune: the scores {scores.describe()} do not have the label dim "
                       f"{axis.name!r} (at {_graph.user_source_line()})")
    if not scores.dtype.is_floating_point:
        raise DimError(f"looplift.search.prune needs float scores, got the {scores.describe()} "
                       f"(at {_graph.user_source_line()})")
    if threshold is not None and not (isinstance(threshold, (int, float)) and threshold >= 0):
        raise DimError(f"looplift.search.prune: threshold must be a number >= 0, got {threshold!r} "
                       f"(at {_graph.user_source_line()})")
    search = _search_of(loop, beam_size, dynamic=threshold is not None)
    if threshold is not None and not search.dynamic:
        raise DimError(f"looplift.search.prune: a threshold makes the beam size change per step; this loop's "
                       f"search has a fixed beam (at {_graph.user_source_line()})")
    if search.src is not None:
        raise TraceError(f"one prune per loop step (loop at {loop.source}, again at {_graph.user_source_line()})")
    beam, nxt = search.beam, search.next
    if nxt in scores.dims:
        raise DimError(f"looplift.search.prune: the scores {scores.describe()} are over the pruned beam already "
                       f"(at {_graph.user_source_line()})")
    has_beam = beam in scores.dims
    batch = tuple(d for d in scores.dims if d is not axis and d is not beam)
    over = (beam, axis) if has_beam else (axis,)
    layout = batch + over
    perm = tuple(scores.dims.index(d) for d in layout)
    n_labels = axis.size
    thr = None if threshold is None else float(threshold)

    def kernel(env, v):
        v = v.permute(perm)
        flat = v.reshape(*v.shape[:len(batch)], -1)
        k = min(beam_size, flat.shape[-1])
        key = flat
        if sample:
            u = torch.rand_like(flat).clamp_min(torch.finfo(flat.dtype).tiny)
            key = flat - torch.log(-torch.log(u))
        _, idx = key.topk(k, dim=-1)
        top = flat.gather(-1, idx)
        if k < beam_size:   # fewer candidates than the beam: empty slots
            pad = [0, beam_size - k]
            idx = torch.nn.functional.pad(idx, pad)
            top = torch.nn.functional.pad(top, pad, value=NEG_INF)
        if thr is not None:   # the kept ones first; the next beam as wide as the most kept by an entry
            best_ = top.max(-1, keepdim=True).values
            keep = (top >= best_ - thr) & (top > NEG_INF)
            top = torch.where(keep, top, torch.full_like(top, NEG_INF))
            if sample:   # (top-k by score is sorted: the kept ones are first already)
                order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
                idx, top = idx.gather(-1, order), top.gather(-1, order)
            width = max(int(keep.sum(-1).max()) if keep.numel() else 0, 1)
            idx, top = idx[..., :width], top[..., :width]
            env.sizes[nxt] = width
        n = n_labels if n_labels is not None else v.shape[-1]
        src = idx // n if has_beam else torch.zeros_like(idx)
        note_sources(env, src, batch + (nxt,))   # (histories follow the hypotheses)
        return src, idx % n, top, idx

    src, labels, top, index = emit_many(
        "prune", (scores,), kernel,
        [(batch + (nxt,), torch.int64, beam), (batch + (nxt,), torch.int64, axis),
         (batch + (nxt,), scores.dtype, None), (batch + (nxt,), torch.int64, None)],
        attrs={"beam_size": beam_size, "random": bool(sample), "makes_dims": (nxt,) if search.dynamic else ()})
    search.src = src
    search.new_valid = _math.gt(top, NEG_INF)
    _masking.PRUNED[nxt] = (beam, src)   # (cleared when the loop's step ends)
    return Pruned(nxt, src, labels, top, index)


def recombine(scores, keys, *, mode: str = "max") -> Tensor:
    """Merge hypotheses of the (next) beam whose `keys` are equal (e.g. the last n labels): the best of
    each group keeps the group's max (``mode="max"``) or log-sum-exp (``"logsumexp"``) of the scores, the
    others get -inf (and are invalid from then on).

    `scores` and `keys` are over the pruned beam (``Pruned.beam``); `keys` may have further dims (all are
    compared). Call it after :func:`prune`, before assigning the scores to the loop's state."""
    search = _current_search("looplift.search.recombine")
    scores, keys = as_tensor(scores), as_tensor(keys)
    nxt = search.next
    if mode not in ("max", "logsumexp"):
        raise ValueError(f"looplift.search.recombine: mode is 'max' or 'logsumexp', got {mode!r}")
    for t, what in ((scores, "scores"), (keys, "keys")):
        if nxt not in t.dims:
            raise DimError(f"looplift.search.recombine: the {what} {t.describe()} are not over the pruned beam "
                           f"{nxt.name!r} (at {_graph.user_source_line()})")
    other = search.loop._hints.setdefault(("search", "other"), _sized_like(f"{nxt.name}_other", nxt))
    keys_o = _shape.replace_dim(keys, nxt, other)
    scores_o = _shape.replace_dim(scores, nxt, other)
    key_dims = [d for d in keys.dims if d is not nxt and d not in scores.dims]
    same = _math.eq(keys, keys_o)
    if key_dims:
        same = _math.eq(_reduce.sum(_math.cast(_math.logical_not(same), torch.int64), axis=key_dims), 0)
    alive = _math.gt(scores_o, NEG_INF)
    same = _math.logical_and(same, alive)
    members = _math.where(same, scores_o, NEG_INF)
    group_max = _reduce.max(members, axis=other)
    # the representative: the first hypothesis (lowest index) with the group's best score
    idx_o = _shape.range_over_dim(other)
    better_before = _math.logical_and(same, _math.logical_or(
        _math.gt(scores_o, scores), _math.logical_and(_math.eq(scores_o, scores),
                                                      _math.lt(idx_o, _shape.range_over_dim(nxt)))))
    n_before = _reduce.sum(_math.cast(better_before, torch.int64), axis=other)
    keep = _math.logical_and(_math.eq(n_before, 0), _math.gt(scores, NEG_INF))
    merged = group_max if mode == "max" else _reduce.logsumexp(members, axis=other)
    out = _math.where(keep, merged, NEG_INF)
    search.new_valid = _math.logical_and(search.new_valid, keep)
    search.recombined.add(id(out))
    return out


def best(x, scores, *, beam: Dim) -> Tensor:
    """`x` of the best hypothesis per batch entry (by `scores` over `beam`): `beam` is gone."""
    x, scores = as_tensor(x), as_tensor(scores)
    return gather(x, index=_reduce.argmax(scores, axis=beam), axis=beam)


def choice(scores, *, target=None, beam_size: int, axis: Dim | None = None, score_type: str = "log_prob",
           length_normalization: bool | float = False, threshold: float | None = None) -> Tensor:
    """The label of this step.

    In train and eval mode: the reference label `target` (its frame at this step, if `target` has the
    loop's dim), so the whole decoder moves out of the loop in training. In search mode: one beam-search
    step (:func:`expand`, :func:`prune`) on `scores` over the label dim, with the running score kept by
    the loop (``loop.search.scores`` after it).

    Args:
        scores: per-label scores, log-probabilities (``score_type="log_prob"``) or ``"logits"``
            (log-softmax is taken).
        target: the reference labels (sparse, their ``sparse_dim`` is the label dim).
        beam_size: the number of hypotheses kept.
        axis: the label dim (default: `target`'s ``sparse_dim``, else the one static dim of `scores`).
        length_normalization: rank the final hypotheses by score / length (``True``) or / length ** alpha
            (a float alpha) in ``loop.search.scores``.
        threshold: keep only the hypotheses within this of the best (at most `beam_size`): the beam dim's
            size changes per step (see :func:`prune`).
    """
    loop = _loop("looplift.choice")
    scores = as_tensor(scores)
    if target is not None:
        target = as_tensor(target)
    if axis is None and target is not None and target.sparse_dim is not None:
        axis = target.sparse_dim
    if axis is None:   # the one static dim of the scores (beams aside)
        beams = [loop._hints.get(("search", k)) for k in ("beam", "next")]
        static = [d for d in scores.dims if d.is_static and d not in beams]
        if len(static) != 1:
            raise DimError(f"looplift.choice needs the label dim: pass axis=... or a sparse target (the scores "
                           f"{scores.describe()} have {len(static)} static dims) (at {_graph.user_source_line()})")
        axis = static[0]
    if score_type not in ("log_prob", "logits"):
        raise ValueError(f"looplift.choice: score_type is 'log_prob' or 'logits', got {score_type!r}")
    if not _graph.is_search():
        if target is None:
            raise TraceError(f"looplift.choice in {_graph.mode()} mode returns the reference label: pass "
                             f"target=... (at {_graph.user_source_line()})")
        if loop.axis in target.dims:
            return loop.unstack(target)
        return target
    if score_type == "logits":
        scores = _reduce.log_softmax(scores, axis=axis)
    with _in_parent(loop):
        zero = _shape.zeros([], dtype=scores.dtype)
    running = loop._add_hidden_state(f"choice:score{len(loop._search.scores) if loop._search else 0}", zero, None)
    pruned = prune(expand(running, scores, axis=axis), beam_size=beam_size, axis=axis, threshold=threshold)
    loop._set_hidden_state(running, pruned.scores)
    alpha = None if length_normalization is False else 1.0 if length_normalization is True else \
        float(length_normalization)
    loop._search.scores.append((running, alpha))
    return pruned.labels


def _normalized(score: Tensor, length: Tensor, alpha: float | None) -> Tensor:
    if alpha is None:
        return score
    n = _math.cast(_math.maximum(length, 1), score.dtype)
    return _math.truediv(score, n if alpha == 1.0 else _math.pow(n, alpha))

