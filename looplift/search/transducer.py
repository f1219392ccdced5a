"""What an alignment-synchronous (transducer) search needs besides ``choice``: keys and a per-frame limit.

A transducer's hypotheses that reach the same encoder frame with the same
labels (blanks removed) are one hypothesis reached by different alignments;
the search merges them (:func:`merge`), by log-sum-exp of their scores (the
transducer's sum over alignments) or by their max. The label history is kept
cheaply as a loop state, a hash (:func:`label_history`); a frame may be
limited to a number of labels (:func:`limit_labels_per_frame`)::

    loop.state.history = ll.search.label_history_start()
    loop.state.emitted = ll.zeros([], dtype="int64")
    with loop:
        ...
        log_probs = ll.search.limit_labels_per_frame(log_probs, loop.state.emitted, limit=3, blank=BLANK,
                                                     axis=vocab)
        loop.state.label = ll.choice(log_probs, target=alignment, beam_size=8)
        loop.state.t = loop.state.t + ll.cast(loop.state.label == BLANK, "int64")
        loop.state.emitted = ll.search.labels_since_blank(loop.state.emitted, loop.state.label, blank=BLANK)
        loop.state.history = ll.search.label_history(loop.state.history, loop.state.label, ignore=BLANK)
        ll.search.merge([loop.state.t, loop.state.history, loop.state.emitted], mode="logsumexp")
        loop.end(loop.state.t >= ll.length(enc_time), include_eos=True)

The keys: hypotheses at the same frame with the same labels are one
hypothesis of the transducer's lattice; with a per-frame limit, those that
emitted different numbers of labels in this frame so far are not (the limit
allows them different futures), so the count is a key too.

Outside a search (train and eval mode, ``choice`` returns the reference
labels) these do nothing: the history and the count stay their initial values
(states that never change cost nothing, and the loop optimizer still removes
the loop), the limit filters nothing and ``merge`` merges nothing.

Limits: the history is a hash of 2 x 31 bits: two different label histories
merge only on a hash collision (about 1 in 2**62 per pair of hypotheses).
``merge`` merges the hypotheses of one step's ``choice`` (the pruned beam);
with the atomic ops (``prune``), use :func:`looplift.search.recombine`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from .. import trace as _trace
from ..dims import Dim
from ..errors import DimError, TraceError, entry_point
from ..ops import math as _math
from ..ops import shape as _shape
from ..ops._core import as_tensor
from ..tensor import Tensor
from .step import NEG_INF, _loop, recombine

__all__ = ["HISTORY", "label_history_start", "label_history", "merge", "labels_since_blank",
           "limit_labels_per_frame"]

#: The dim of a label history's hash (two independent 31-bit hashes).
HISTORY = Dim("label_history", 2)
_PRIME = 2**31 - 1
_BASES = (1_000_003, 998_244_353)


@entry_point(name="looplift.search.label_history_start")
def label_history_start() -> Tensor:
    """The hash of an empty label history (int64 over :data:`HISTORY`): a loop state's initial value."""
    return _shape.zeros([HISTORY], dtype=torch.int64)


@entry_point(name="looplift.search.label_history")
@_trace.acting_for("looplift.search.label_history")
def label_history(history, label, *, ignore: int | None = None) -> Tensor:
    """In a search: `history` (a hash over :data:`HISTORY`) extended by `label`, unchanged where `label` is
    `ignore` (the blank). Outside a search: `history` itself."""
    history, label = as_tensor(history), as_tensor(label)
    if HISTORY not in history.dims or history.dtype != torch.int64:
        raise DimError(f"looplift.search.label_history: the history {history.describe()} is no label history "
                       f"(start it with looplift.search.label_history_start())")
    if label.dtype.is_floating_point or label.dtype == torch.bool:
        raise DimError(f"looplift.search.label_history: the label {label.describe()} must be an integer label")
    if not _trace.is_search():
        return history
    bases = _math.cast(_shape.range_over_dim(HISTORY), torch.int64)   # 0, 1 -> the two bases
    base = _math.where(_math.eq(bases, 0), _BASES[0], _BASES[1])
    extended = _math.mod(_math.add(_math.mul(history, base), _math.add(_math.cast(label, torch.int64), 1)),
                         _PRIME)
    if ignore is None:
        return extended
    return _math.where(_math.eq(label, ignore), history, extended)


@entry_point(name="looplift.search.labels_since_blank")
@_trace.acting_for("looplift.search.labels_since_blank")
def labels_since_blank(count, label, *, blank: int) -> Tensor:
    """In a search: the number of labels since the last `blank` (`count` the previous one), for
    :func:`limit_labels_per_frame`. Outside a search: `count` itself."""
    count, label = as_tensor(count), as_tensor(label)
    if not _trace.is_search():
        return count
    return _math.where(_math.eq(label, blank), 0, _math.add(count, 1))


@entry_point(name="looplift.search.limit_labels_per_frame")
@_trace.acting_for("looplift.search.limit_labels_per_frame")
def limit_labels_per_frame(scores, count, *, limit: int, blank: int, axis: Dim) -> Tensor:
    """In a search: `scores` (over the label dim `axis`) with every label but `blank` set to -inf where
    `count` (:func:`labels_since_blank`) has reached `limit`: at most `limit` labels per frame. Outside a
    search: `scores` itself (the reference labels are given)."""
    scores, count = as_tensor(scores), as_tensor(count)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise DimError(f"looplift.search.limit_labels_per_frame: limit must be an int >= 0, got {limit!r}")
    if axis not in scores.dims:
        raise DimError(f"looplift.search.limit_labels_per_frame: the scores {scores.describe()} do not have the "
                       f"label dim {axis.name!r}")
    if not _trace.is_search():
        return scores
    full = _math.logical_and(_math.ge(count, limit), _math.ne(_shape.range_over_dim(axis), blank))
    return _math.where(full, NEG_INF, scores)


@entry_point(name="looplift.search.merge")
@_trace.acting_for("looplift.search.merge")
def merge(keys: Tensor | Sequence[Tensor], *, mode: Literal["logsumexp", "max"] = "logsumexp") -> None:
    """In a search: merge the hypotheses this step's ``choice`` kept whose `keys` are all equal (e.g. the
    frame and the label history): the best of each group keeps the group's log-sum-exp (or max) of the
    scores, the others are dropped. Outside a search: nothing.

    Call it after ``choice``, with keys computed from the label it returned (over the pruned beam)."""
    loop = _loop("looplift.search.merge")
    if not _trace.is_search():
        return
    search = loop.searcher
    if search is None or not search.scores:
        raise TraceError("looplift.search.merge merges the hypotheses of looplift.choice: call choice first in "
                         "this step (with the atomic ops, use looplift.search.recombine)")
    running, _ = search.scores[-1]
    scores = loop.slot_of(running).current[0]
    loop.set_hidden_state(running, recombine(scores, keys, mode=mode))
