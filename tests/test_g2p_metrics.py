"""G2P scores: Levenshtein distance, and PER/WER against several reference pronunciations per word."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from looplift.recipes.g2p.metrics import Scores, edit_distance, score

# -- edit_distance ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("a, b, expected", [
    ("", "", 0),
    ("abc", "", 3),
    ("", "ab", 2),
    ("abc", "abc", 0),
    ("abc", "abd", 1),          # one substitution
    ("abc", "ac", 1),           # one deletion
    ("ac", "abc", 1),           # one insertion
    ("kitten", "sitting", 3),   # k->s, e->i, +g
    ("flaw", "lawn", 2),        # -f, +n
    ("intention", "execution", 5),  # -i, n->e, t->x, +c, n->u
])
def test_edit_distance_of_hand_computed_cases(a, b, expected):
    assert edit_distance(a, b) == expected


def test_edit_distance_compares_phoneme_lists_by_element():
    assert edit_distance(["K", "AE", "T"], ["K", "AA", "T", "S"]) == 2
    assert edit_distance(["AH", "B"], ["AH0", "B"]) == 1


def reference_distance(a: str, b: str) -> int:
    """The textbook recursion, exponential but obviously right."""
    if not a or not b:
        return len(a) + len(b)
    return min(reference_distance(a[1:], b) + 1, reference_distance(a, b[1:]) + 1,
               reference_distance(a[1:], b[1:]) + (a[0] != b[0]))


@given(st.text("abc", max_size=6), st.text("abc", max_size=6))
def test_edit_distance_equals_the_recursive_definition(a, b):
    assert edit_distance(a, b) == reference_distance(a, b)
    assert edit_distance(list(a), list(b)) == edit_distance(b, a)


# -- score -----------------------------------------------------------------------------------------------------

def test_hypothesis_equal_to_the_second_reference_is_correct():
    scores = score([["AY", "DH", "ER"]], [[["IY", "DH", "ER"], ["AY", "DH", "ER"]]])
    assert scores == Scores(per=0.0, wer=0.0, words=1, phoneme_errors=0, phonemes=3, word_errors=0)


def test_errors_and_length_come_from_the_nearest_reference():
    hyp = ["K", "AE", "T", "S"]
    near = ["K", "AE", "T"]                    # one deletion away, 3 phonemes
    far = ["K", "AA", "T", "S", "IH"]          # one substitution and one insertion away, 5 phonemes
    assert (edit_distance(hyp, near), edit_distance(hyp, far)) == (1, 2)
    for refs in ([near, far], [far, near]):
        scores = score([hyp], [refs])
        assert (scores.phoneme_errors, scores.phonemes) == (1, 3)
        assert scores.per == pytest.approx(1 / 3)
        assert (scores.word_errors, scores.wer) == (1, 1.0)


def test_of_equally_near_references_the_first_counts():
    hyp = ["A", "B", "C"]
    short = ["A", "B"]                          # distance 1, 2 phonemes
    long = ["A", "B", "C", "D"]                 # distance 1, 4 phonemes
    assert score([hyp], [[short, long]]).phonemes == 2
    assert score([hyp], [[long, short]]).phonemes == 4


def test_scores_sum_over_words():
    hyps = [["K", "AE", "T"], ["D", "AA", "G"], [], ["AY", "DH", "ER"]]
    refs = [
        [["K", "AE", "T"]],                          # correct: 0 errors of 3
        [["D", "AO", "G"]],                          # one substitution: 1 of 3
        [["AH"], ["EY"]],                            # empty hypothesis: 1 of 1 (the first)
        [["IY", "DH", "ER"], ["AY", "DH", "ER"]],    # the second reference: 0 of 3
    ]
    scores = score(hyps, refs)
    assert scores == Scores(per=2 / 10, wer=2 / 4, words=4, phoneme_errors=2, phonemes=10, word_errors=2)


def test_per_can_exceed_one():
    scores = score([["A", "B", "C"]], [[["X"]]])
    assert (scores.phoneme_errors, scores.phonemes, scores.per) == (3, 1, 3.0)


def test_score_of_no_words_is_an_error():
    with pytest.raises(ValueError, match="no words to score"):
        score([], [])


def test_score_rejects_mismatched_counts():
    with pytest.raises(ValueError, match="got 1 hypotheses but 2 reference lists"):
        score([["A"]], [[["A"]], [["B"]]])


@pytest.mark.parametrize("refs", [[], [["A"], []]])
def test_score_rejects_a_word_without_references_or_with_an_empty_one(refs):
    with pytest.raises(ValueError, match="word 0 has no references or an empty one"):
        score([["A"]], [refs])


@given(st.lists(st.tuples(st.lists(st.sampled_from("ab"), max_size=4),
                          st.lists(st.tuples(*[st.sampled_from("ab")] * 2).map(tuple) | st.just(("a",)),
                                   min_size=1, max_size=3)), min_size=1, max_size=6))
def test_score_is_the_nearest_reference_by_definition(words):
    """Against the definition: per word, the first reference at the least edit distance gives the errors
    and the length (hypotheses equal to a reference included)."""
    hyps, refs = [h for h, _ in words], [r for _, r in words]
    errors = lengths = wrong = 0
    for hyp, word_refs in zip(hyps, refs):
        distances = [edit_distance(hyp, list(ref)) for ref in word_refs]
        k = distances.index(min(distances))
        errors, lengths, wrong = errors + distances[k], lengths + len(word_refs[k]), wrong + (distances[k] > 0)
    s = score(hyps, refs)
    assert (s.phoneme_errors, s.phonemes, s.word_errors) == (errors, lengths, wrong)
