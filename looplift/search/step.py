"""One step of a beam search: the atomic ops (expand, prune, recombine) and ``choice``, which combines them.

See :mod:`looplift.search` for the semantics; the bookkeeping at the end of
each step and after the loop is :mod:`looplift.search.beam_search`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .. import trace as _trace
from .._align import aligner
from ..dims import Dim, batch_dim, run_time_beam, sized_like
from ..errors import ArgumentError, ConfigError, DimError, TraceError, entry_point
from ..loop import Loop
from ..ops import math as _math
from ..ops import reduce as _reduce
from ..ops import shape as _shape
from ..ops._core import as_tensor, emit_many
from ..ops.history import note_sources
from ..ops.index import gather
from ..source import user_source_line
from ..tensor import Tensor
from .beam_search import BeamSearch

__all__ = ["expand", "prune", "Pruned", "recombine", "best", "choice"]

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


def _loop(what: str) -> Loop:
    """The loop whose body is being traced (directly), for the search op `what`."""
    ctx = _trace.current(what)
    if not ctx.loops or not isinstance(ctx.loops[-1], Loop) or ctx.graph is not ctx.loops[-1].body:
        raise TraceError(f"{what} is used directly inside the body of a looplift.Loop (at "
                         f"{user_source_line()})")
    return ctx.loops[-1]


def _current_search(what: str) -> BeamSearch:
    loop = _loop(what)
    if loop.searcher is None:
        raise TraceError(f"{what}: no search step yet in this loop (call looplift.search.prune first)")
    return loop.searcher


def _search_of(loop: Loop, beam_size: int, dynamic: bool = False) -> BeamSearch:
    """The loop's search, made by its first search step (with a beam of `beam_size`)."""
    hints = loop.hints
    if loop.searcher is None:
        if hints.beam is None:
            hints.beam = run_time_beam() if dynamic else Dim("beam", beam_size)
            hints.beam_size = beam_size
        if hints.beam_size != beam_size:
            raise DimError(f"the search in the loop at {loop.source} has beam size {hints.beam_size}, "
                           f"not {beam_size}")
        loop.searcher = BeamSearch(loop, hints.beam, beam_size)
    elif loop.searcher.beam_size != beam_size:
        raise DimError(f"one search step per loop: the beam size is {loop.searcher.beam_size}")
    return loop.searcher


@entry_point(name="looplift.search.expand")
@_trace.acting_for("looplift.search.expand")
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
                       f"label dim {axis.name!r}")
    if loop.hints.beam is None:   # (the first trace: the states have no beam yet, the loop traces again with it)
        return _math.add(scores, label_scores)
    search = _search_of(loop, loop.hints.beam_size)
    labels = _shape.range_over_dim(axis)
    only_first = _math.where(_math.eq(labels, 0), 0.0, NEG_INF)
    extend = _math.where(search.ended, only_first, label_scores)
    extend = _math.where(search.valid, extend, NEG_INF)
    return _math.add(scores, extend)


@entry_point(name="looplift.search.prune")
@_trace.acting_for("looplift.search.prune")
def prune(scores, *, beam_size: int, axis: Dim, threshold: float | None = None,
          sample: bool = False, generator: torch.Generator | None = None) -> Pruned:
    """Keep the `beam_size` best candidates of `scores` (over the current beam, if any, and the label dim
    `axis`), per batch entry.

    Args:
        threshold: keep only the candidates within this of the best (at most `beam_size`): the next beam
            is as wide as the most any batch entry keeps at this step, its other slots invalid (score -inf).
            The beam dim's size then changes per step (it is sized at run time, 1 before the first step).
        sample: draw the hypotheses instead (Gumbel top-k: without replacement, each in proportion to
            ``exp(score)``); the scores kept are the candidates' own.
        generator: the ``torch.Generator`` the draws come from (for reproducible sampling; default: torch's
            global one). It is used at run time: seed it before a call to repeat that call's draws.
    """
    loop = _loop("looplift.search.prune")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise DimError(f"looplift.search.prune: generator must be a torch.Generator, got {generator!r}")
    scores = as_tensor(scores)
    if not isinstance(beam_size, int) or beam_size < 1:
        raise DimError(f"looplift.search.prune: beam_size must be a positive int, got {beam_size!r}")
    if axis not in scores.dims:
        raise DimError(f"looplift.search.prune: the scores {scores.describe()} do not have the label dim "
                       f"{axis.name!r}")
    if not scores.dtype.is_floating_point:
        raise DimError(f"looplift.search.prune needs float scores, got the {scores.describe()}")
    if threshold is not None and not (isinstance(threshold, (int, float)) and threshold >= 0):
        raise DimError(f"looplift.search.prune: threshold must be a number >= 0, got {threshold!r}")
    search = _search_of(loop, beam_size, dynamic=threshold is not None)
    if threshold is not None and not search.dynamic:
        raise DimError("looplift.search.prune: a threshold makes the beam size change per step; this loop's "
                       "search has a fixed beam")
    if search.src is not None:
        raise TraceError(f"one prune per loop step (loop at {loop.source}, again at {user_source_line()})")
    beam, nxt = search.beam, search.next
    if nxt in scores.dims:
        raise DimError(f"looplift.search.prune: the scores {scores.describe()} are over the pruned beam already")
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
            u = torch.rand(flat.shape, dtype=flat.dtype, device=flat.device, generator=generator)
            u = u.clamp_min(torch.finfo(flat.dtype).tiny)
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
        attrs={"beam_size": beam_size}, random=bool(sample), makes_dims=(nxt,) if search.dynamic else (),
        keeps_run_memory=True)
    search.src = src
    search.new_valid = _math.gt(top, NEG_INF)
    _trace.current().pruned[nxt] = (beam, src)   # (cleared when the loop's step ends)
    return Pruned(nxt, src, labels, top, index)


@entry_point(name="looplift.search.recombine")
@_trace.acting_for("looplift.search.recombine")
def recombine(scores, keys, *, mode: str = "max") -> Tensor:
    """Merge hypotheses of the (next) beam whose `keys` are equal (e.g. the last n labels): the best of
    each group keeps the group's max (``mode="max"``) or log-sum-exp (``"logsumexp"``) of the scores, the
    others get -inf (and are invalid from then on).

    `scores` and `keys` are over the pruned beam (``Pruned.beam``); `keys` is a tensor or a sequence of them
    (hypotheses merge where all are equal), and a key may have further dims (all are compared). Call it after
    :func:`prune`, before assigning the scores to the loop's state."""
    search = _current_search("looplift.search.recombine")
    scores = as_tensor(scores)
    keys = [as_tensor(k) for k in (keys if isinstance(keys, (list, tuple)) else [keys])]
    nxt = search.next
    if mode not in ("max", "logsumexp"):
        raise ValueError(f"looplift.search.recombine: mode is 'max' or 'logsumexp', got {mode!r}")
    for t, what in ((scores, "scores"), *((k, "keys") for k in keys)):
        if nxt not in t.dims:
            raise DimError(f"looplift.search.recombine: the {what} {t.describe()} are not over the pruned beam "
                           f"{nxt.name!r}")
    hints = search.loop.hints
    if hints.other_beam is None:
        hints.other_beam = sized_like(f"{nxt.name}_other", nxt)
    other = hints.other_beam
    scores_o = _shape.replace_dim(scores, nxt, other)
    same = None
    for key in keys:
        equal = _math.eq(key, _shape.replace_dim(key, nxt, other))
        key_dims = [d for d in key.dims if d is not nxt and d not in scores.dims]
        if key_dims:
            equal = _math.eq(_reduce.sum(_math.cast(_math.logical_not(equal), torch.int64), axis=key_dims), 0)
        same = equal if same is None else _math.logical_and(same, equal)
    # (an ended hypothesis extends by label 0 only: whatever its keys, it never merges with a live one)
    ended = search.ended_src()
    same = _math.logical_and(same, _math.eq(ended, _shape.replace_dim(ended, nxt, other)))
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


@entry_point(name="looplift.search.best")
@_trace.acting_for("looplift.search.best")
def best(x, scores, *, beam: Dim) -> Tensor:
    """`x` of the best hypothesis per batch entry (by `scores` over `beam`): `beam` is gone.

    A dim of `x` whose lengths vary over the beam (the loop's dim after a search: each hypothesis has its
    length) is replaced by a dim of the same name with the best hypotheses' lengths."""
    x, scores = as_tensor(x), as_tensor(scores)
    if not isinstance(beam, Dim) or beam.canonical() is batch_dim.canonical():
        raise DimError(f"looplift.search.best: beam must be the beam dim of the search (loop.search.beam), got "
                       f"{beam!r}")
    for t, what in ((x, "values"), (scores, "scores")):
        if beam not in t.dims:
            raise DimError(f"looplift.search.best: the {what} {t.describe()} are not over the beam {beam.name!r}")
    index = _reduce.argmax(scores, axis=beam)
    out = gather(x, index=index, axis=beam)
    for d in out.dims:
        if d.is_dynamic and beam in _trace.length_dims(d):
            out = _with_selected_lengths(out, d, index, beam)
    return out


def _with_selected_lengths(x: Tensor, dim: Dim, index: Tensor, beam: Dim) -> Tensor:
    """`x` (the same values) with `dim` replaced by a dim whose lengths are those of `dim` at the hypothesis
    `index` picks of `beam`."""
    ldims = _trace.length_dims(dim)
    kept = tuple(d for d in ldims if d is not beam)
    picked = Dim(dim.name)
    picked.set_length_dims([*_trace.current().stepped_dims, *kept])
    pos = ldims.index(beam)
    index_al = aligner(index.dims, kept)

    def kernel(env, v, i):
        n = env.lengths(dim)
        i = index_al(torch.as_tensor(i, device=n.device)).expand(*[env.size(d) for d in kept])
        env.sizes[picked] = env.size(dim)
        env.lengths_of[picked] = n.gather(pos, i.unsqueeze(pos)).squeeze(pos)
        return v

    return emit_many("with_lengths", (x, index), kernel, [(tuple(picked if d is dim else d for d in x.dims),
                                                           x.dtype, x.sparse_dim)], makes_dims=(picked,))[0]


@entry_point(name="looplift.choice")
@_trace.acting_for("looplift.choice")
def choice(scores, *, target=None, beam_size: int, axis: Dim | None = None, score_type: str = "log_prob",
           weights: Mapping[str, float] | None = None, length_normalization: bool | float = False,
           threshold: float | None = None, sample: bool = False,
           generator: torch.Generator | None = None) -> Tensor:
    """The label of this step.

    In train and eval mode: the reference label `target` (its frame at this step, if `target` has the
    loop's dim), so the whole decoder moves out of the loop in training. In search mode: one beam-search
    step (:func:`expand`, :func:`prune`) on `scores` over the label dim, with the running score kept by
    the loop (``loop.search.scores`` after it).

    Args:
        scores: per-label scores, log-probabilities (``score_type="log_prob"``) or ``"logits"``
            (log-softmax is taken). Or several score components, a dict of them by name (an acoustic
            model's and a language model's log-probs, a length bonus): the search prunes on their weighted
            sum and keeps each one's running total, per hypothesis (``loop.search.components``).
        target: the reference labels (sparse, their ``sparse_dim`` is the label dim).
        beam_size: the number of hypotheses kept.
        axis: the label dim (default: `target`'s ``sparse_dim``, else the one static dim of `scores`).
        weights: with score components: each one's weight in the sum (default 1.0 each); any may be negative
            or 0. A candidate any component scores -inf is out.
        length_normalization: rank the final hypotheses by score / length (``True``) or / length ** alpha
            (a float alpha) in ``loop.search.scores``.
        threshold: keep only the hypotheses within this of the best (at most `beam_size`): the beam dim's
            size changes per step (see :func:`prune`).
        sample: draw the hypotheses (in proportion to ``exp(score)``, without replacement) instead of keeping
            the best; `generator` (a ``torch.Generator``) makes the draws reproducible (see :func:`prune`).
    """
    loop = _loop("looplift.choice")
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:   # (in every mode: the
        raise DimError(f"looplift.choice: beam_size must be a positive int, got {beam_size!r}")  # same model)
    components = _components(scores, weights)
    scores = next(iter(components.values())) if components is not None else as_tensor(scores)
    if target is not None:
        target = as_tensor(target)
    if axis is None and target is not None and target.sparse_dim is not None:
        axis = target.sparse_dim
    if axis is None:   # the one static dim of the scores (beams aside)
        beams = [loop.hints.beam, loop.hints.next_beam]
        static = [d for d in scores.dims if d.is_static and d not in beams]
        if len(static) != 1:
            raise DimError(f"looplift.choice needs the label dim: pass axis=... or a sparse target (the scores "
                           f"{scores.describe()} have {len(static)} static dims)")
        axis = static[0]
    if score_type not in ("log_prob", "logits"):
        raise ConfigError(f"looplift.choice: score_type is 'log_prob' or 'logits', got {score_type!r}")
    for name, t in (components or {"scores": scores}).items():
        if axis not in t.dims:
            raise DimError(f"looplift.choice: the {name} {t.describe()} do not have the label dim {axis.name!r}")
    if not _trace.is_search():
        if target is None:
            raise TraceError(f"looplift.choice in {_trace.mode()} mode returns the reference label: pass "
                             f"target=...")
        if loop.axis in target.dims:
            return loop.unstack(target)
        return target
    if score_type == "logits":
        scores = _reduce.log_softmax(scores, axis=axis)
        if components is not None:
            components = {k: _reduce.log_softmax(v, axis=axis) for k, v in components.items()}
    with _trace.current().inside(loop.parent, loops=[x for x in _trace.current().loops if x is not loop]):
        zero = _shape.zeros([], dtype=scores.dtype)
    n = len(loop.searcher.scores) if loop.searcher else 0
    running = loop.add_hidden_state(f"choice:score{n}", zero, None)
    if components is None:
        pruned = prune(expand(running, scores, axis=axis), beam_size=beam_size, axis=axis, threshold=threshold,
                       sample=sample, generator=generator)
        totals = {}
    else:
        totals = {k: loop.add_hidden_state(f"choice:score{n}:{k}", zero, None) for k in components}
        candidates = {k: expand(totals[k], v, axis=axis) for k, v in components.items()}
        pruned = prune(_weighted_sum(candidates, weights), beam_size=beam_size, axis=axis, threshold=threshold,
                       sample=sample, generator=generator)
        for k, running_k in totals.items():
            loop.set_hidden_state(running_k, pruned.take(candidates[k]))
    loop.set_hidden_state(running, pruned.scores)
    if not isinstance(length_normalization, (bool, int, float)):
        raise ArgumentError(f"looplift.choice: length_normalization is True, False or an exponent alpha (a number), "
                            f"got {length_normalization!r}")
    alpha = None if length_normalization is False else 1.0 if length_normalization is True else \
        float(length_normalization)
    loop.searcher.scores.append((running, alpha))
    loop.searcher.components.update(totals)
    return pruned.labels


def _components(scores, weights) -> dict[str, Tensor] | None:
    """The score components of ``choice`` by name (None: one score), checked against `weights`."""
    if not isinstance(scores, Mapping):
        if weights is not None:
            raise DimError("looplift.choice: weights are for score components (a dict of scores by name)")
        return None
    if not scores or not all(isinstance(k, str) for k in scores):
        raise DimError(f"looplift.choice: score components are a non-empty dict of scores by name, got "
                       f"{list(scores)!r}")
    if weights is not None:
        if set(weights) != set(scores) or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                                  for w in weights.values()):
            raise DimError(f"looplift.choice: weights must give a number for each score component "
                           f"{sorted(scores)}, got {dict(weights)!r}")
    return {k: as_tensor(v) for k, v in scores.items()}


def _weighted_sum(candidates: dict[str, Tensor], weights: Mapping[str, float] | None) -> Tensor:
    """The weighted sum of the components' candidate scores; -inf where any component is -inf."""
    out_of_it = None
    for cand in candidates.values():
        inf = _math.eq(cand, NEG_INF)
        out_of_it = inf if out_of_it is None else _math.logical_or(out_of_it, inf)
    total = None
    for k, cand in candidates.items():
        w = 1.0 if weights is None else float(weights[k])
        term = _math.mul(_math.where(out_of_it, 0.0, cand), w)
        total = term if total is None else _math.add(total, term)
    return _math.where(out_of_it, NEG_INF, total)
