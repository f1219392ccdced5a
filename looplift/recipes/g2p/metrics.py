"""G2P scores against a dictionary with several pronunciations per word: phoneme and word error rates.

A word may have several correct pronunciations (``either``: IY DH ER, AY DH ER),
so a hypothesis is scored against the reference it is closest to. That makes
PER the edit distance to the nearest reference over *that* reference's length,
and a word correct if it matches any reference exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["edit_distance", "Scores", "score"]


def edit_distance(a: Sequence, b: Sequence) -> int:
    """The Levenshtein distance: the fewest insertions, deletions and substitutions (each costing 1) turning
    `a` into `b`. Elements are compared with ``==``; strings compare by character.

    >>> edit_distance("kitten", "sitting"), edit_distance(["K", "AE", "T"], ["K", "AA", "T", "S"])
    (3, 2)
    """
    previous = list(range(len(b) + 1))  # distances from a[:i] to every prefix of b, row by row
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


@dataclass
class Scores:
    """Error rates and the counts they come from.

    ``per = phoneme_errors / phonemes`` (edits to the nearest reference, over its length, summed over words);
    ``wer = word_errors / words`` (words whose hypothesis equals none of their references).
    """

    per: float
    wer: float
    words: int
    phoneme_errors: int
    phonemes: int
    word_errors: int


def score(hyps: Sequence[Sequence[str]], refs: Sequence[Sequence[Sequence[str]]]) -> Scores:
    """Score one hypothesis per word against that word's references (every correct pronunciation).

    For each word, the reference nearest to the hypothesis in :func:`edit_distance`
    gives the phoneme errors and the phoneme count (its length); of equally near
    references the first in order counts. A word is wrong unless its hypothesis
    equals one of its references. An empty hypothesis is allowed (all of the
    nearest reference deleted).

    Raises ValueError for no words, for a different number of hypotheses and
    reference lists, or for a word without references or with an empty one.

    >>> score([["K", "AE", "T"]], [[["K", "AA", "T"], ["K", "AE", "T"]]])
    Scores(per=0.0, wer=0.0, words=1, phoneme_errors=0, phonemes=3, word_errors=0)
    """
    if len(hyps) != len(refs):
        raise ValueError(f"got {len(hyps)} hypotheses but {len(refs)} reference lists; give one of each per word")
    if not hyps:
        raise ValueError("no words to score")
    phoneme_errors = phonemes = word_errors = 0
    for n, (hyp, word_refs) in enumerate(zip(hyps, refs)):
        if not word_refs or not all(word_refs):
            raise ValueError(f"word {n} has no references or an empty one: {[list(ref) for ref in word_refs]}; "
                             "each word needs at least one non-empty reference pronunciation")
        hyp = list(hyp)
        # (a hypothesis equal to a reference is nearest to the first such one: no distances to compute)
        equal = next((ref for ref in word_refs if list(ref) == hyp), None)
        if equal is not None:
            errors, length = 0, len(equal)
        else:
            errors, length = min(((edit_distance(hyp, ref), len(ref)) for ref in word_refs), key=lambda e: e[0])
        phoneme_errors += errors
        phonemes += length
        word_errors += errors > 0  # distance 0 to the nearest reference = equal to some reference
    return Scores(per=phoneme_errors / phonemes, wer=word_errors / len(hyps), words=len(hyps),
                  phoneme_errors=phoneme_errors, phonemes=phonemes, word_errors=word_errors)
