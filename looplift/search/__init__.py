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
  extends only by one label (label 0, with score 0, beyond its length); an
  invalid slot (below) holds no hypothesis, and its states are whatever the
  step computed there;
* stacked values are backtracked after the loop, so they are consistent
  hypotheses, and the loop's dim has lengths per hypothesis;
* the loop stops when every hypothesis of every entry ended, or at
  ``max_seq_len`` (the hypotheses are then cut there, not an error).

At the first step all hypotheses are the same (the states have no beam yet):
only the first is valid; invalid hypotheses have score ``-inf`` and are never
chosen while a valid candidate is left. The optimized run computes that first
step on the first slot alone (the reference interpreter on all of them), unless
the step draws random numbers, runs a region, or mixes the slots by other ops
than the prune and the reorders: then on all of them too.

The atomic ops and ``choice`` are in :mod:`looplift.search.step`; the
bookkeeping of a step's end and the backtracking after the loop in
:mod:`looplift.search.beam_search`; the keys and the per-frame limit of an
alignment-synchronous (transducer) search in :mod:`looplift.search.transducer`.
"""

from .beam_search import Result, Step
from .step import Pruned, best, choice, expand, prune, recombine
from .transducer import HISTORY, label_history, label_history_start, labels_since_blank, limit_labels_per_frame, merge

__all__ = ["expand", "prune", "Pruned", "recombine", "best", "Result", "Step", "choice", "HISTORY", "label_history",
           "label_history_start", "labels_since_blank", "limit_labels_per_frame", "merge"]
