"""The speech recipe's sentences: normalized transcripts of the chatterbot-corpus dialogues, split by hash."""

from __future__ import annotations

import hashlib

import pytest

pytest.importorskip("chatterbot_corpus")

from looplift.recipes.asr.corpus import ALPHABET, normalize, sentences, split, split_of  # noqa: E402


@pytest.mark.parametrize("raw, want", [
    ("Good morning, how are you?", "good morning how are you"),
    ("  I'm   ALSO good. ", "i'm also good"),
    ("'Quoted' text-with-dashes", "quoted text with dashes"),
    ("Hello", None),                                   # one word
    ("It was 1984 then", None),                        # digits: eSpeak would read words the transcript lacks
    (" ".join(["word"] * 21), None),                   # too long
    ("Hi! -- ok", "hi ok"),
])
def test_normalize(raw, want):
    assert normalize(raw) == want


def test_the_sentences_are_distinct_sorted_transcripts():
    s = sentences()
    assert len(s) == 1526 and list(s) == sorted(set(s))
    assert all(set(t) <= set(ALPHABET) and normalize(t) == t for t in s)
    assert "good morning how are you" in s


def test_the_split_is_by_hash_disjoint_and_about_80_10_10():
    parts = split(sentences())
    assert {k: len(v) for k, v in parts.items()} == {"train": 1228, "dev": 149, "test": 149}
    assert not set(parts["train"]) & (set(parts["dev"]) | set(parts["test"]))
    for t in parts["test"][:20]:
        u = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "big") / 2.0**64
        assert u < 0.1 and split_of(t) == "test"
