"""The G2P data: CMUdict loading, the hash-based split, symbol tables and padded batches."""

from __future__ import annotations

import hashlib
import random

import pytest
import torch

from looplift.recipes.g2p.data import Entry, Vocab, encode_batch, load, sample, split, split_of

ARPABET = {"AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH", "EH", "ER", "EY", "F", "G", "HH", "IH", "IY",
           "JH", "K", "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH", "T", "TH", "UH", "UW", "V", "W", "Y",
           "Z", "ZH"}
VOWELS = {"AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY", "UH", "UW"}


@pytest.fixture(scope="module")
def entries() -> list[Entry]:
    return load()


@pytest.fixture(scope="module")
def parts(entries) -> dict[str, list[Entry]]:
    return split(entries)


def phonemes(entries: list[Entry]) -> set[str]:
    return {p for entry in entries for pron in entry.prons for p in pron}


# -- loading ---------------------------------------------------------------------------------------------------

def test_load_gives_every_word_sorted_once(entries):
    words = [entry.word for entry in entries]
    assert len(words) == 126_052
    assert words == sorted(set(words))
    assert set("".join(words)) == set("abcdefghijklmnopqrstuvwxyz'-.")


def test_load_keeps_every_pronunciation_in_order(entries):
    either = next(entry for entry in entries if entry.word == "either")
    assert either.prons == (("IY", "DH", "ER"), ("AY", "DH", "ER"))


def test_without_stress_the_phonemes_are_the_39_of_arpabet(entries):
    assert phonemes(entries) == ARPABET


def test_stress_option_keeps_the_stress_digits_on_vowels():
    stressed = load(stress=True)
    symbols = phonemes(stressed)
    assert {"AH0", "AH1", "AH2"} <= symbols
    assert {p.rstrip("012") for p in symbols} == ARPABET
    assert all(p[-1] in "012" for p in symbols if p.rstrip("012") in VOWELS)
    assert all(p in ARPABET for p in symbols if p.rstrip("012") not in VOWELS)


def test_stripping_stress_merges_duplicate_pronunciations_keeping_the_first(entries):
    stressed = load(stress=True)
    assert [e.word for e in stressed] == [e.word for e in entries]
    for with_stress, without in zip(stressed, entries):
        stripped = [tuple(p.rstrip("012") for p in pron) for pron in with_stress.prons]
        assert without.prons == tuple(dict.fromkeys(stripped))
    assert sum(len(e.prons) for e in stressed) > sum(len(e.prons) for e in entries)
    assert all(len(set(e.prons)) == len(e.prons) for e in entries)


def test_load_returns_a_fresh_list_of_the_cached_entries(entries):
    again = load()
    assert again == entries and again is not entries
    assert again[0] is entries[0]


# -- the split -------------------------------------------------------------------------------------------------

def test_split_parts_are_disjoint_and_cover_all_words(entries, parts):
    assert set(parts) == {"train", "dev", "test"}
    words = [{e.word for e in parts[name]} for name in ("train", "dev", "test")]
    assert sum(len(w) for w in words) == len(entries)
    assert set.union(*words) == {e.word for e in entries}


def test_split_is_about_90_5_5(entries, parts):
    total = len(entries)
    for name, fraction in (("train", 0.90), ("dev", 0.05), ("test", 0.05)):
        assert abs(len(parts[name]) / total - fraction) < 0.005, name


def test_split_follows_the_documented_hash_rule(entries, parts):
    def u(word: str) -> float:
        return int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "big") / 2**64

    assert all(u(e.word) < 0.05 for e in parts["test"])
    assert all(0.05 <= u(e.word) < 0.10 for e in parts["dev"])
    assert all(u(e.word) >= 0.10 for e in parts["train"])


def test_split_is_deterministic_and_sorted(entries, parts):
    assert split(entries) == parts
    for part in parts.values():
        assert [e.word for e in part] == sorted(e.word for e in part)


def test_split_does_not_depend_on_the_input_order(entries, parts):
    shuffled = list(entries)
    random.Random(0).shuffle(shuffled)
    assert split(shuffled) == parts


def test_split_of_a_subset_is_the_subset_of_the_split(entries, parts):
    subset = random.Random(1).sample(entries, 5000)
    words = {e.word for e in subset}
    sub_parts = split(subset)
    for name in parts:
        assert sub_parts[name] == [e for e in parts[name] if e.word in words]


def test_a_word_is_always_in_the_same_part(parts):
    for name, part in parts.items():
        for entry in part[:200]:
            assert split_of(entry.word) == name
            assert split([Entry(entry.word, ())])[name] == [Entry(entry.word, ())]


def test_the_dev_sample_spreads_over_the_alphabet(parts):
    """The per-epoch dev sample is not the alphabetically first words: its share of each tenth of the sorted
    dev split is about a tenth, and it does not depend on the order the entries come in."""
    dev = parts["dev"]
    chosen = {e.word for e in sample(dev, 600)}
    assert len(chosen) == 600 and chosen != {e.word for e in dev[:600]}
    tenth = len(dev) // 10
    for k in range(10):
        share = len(chosen & {e.word for e in dev[k * tenth:(k + 1) * tenth]}) / 600
        assert 0.05 < share < 0.15, (k, share)
    shuffled = list(dev)
    random.Random(1).shuffle(shuffled)
    assert sample(shuffled, 600) == sample(dev, 600)


def test_the_dev_sample_follows_its_hash_rule_and_grows_by_appending(parts):
    dev = parts["dev"]
    key = [int.from_bytes(hashlib.sha256(("sample:" + e.word).encode()).digest()[:8], "big") for e in dev]
    assert [e.word for e in sample(dev, 50)] == [dev[i].word for i in sorted(range(len(dev)), key=key.__getitem__)[:50]]
    assert sample(dev, 100)[:40] == sample(dev, 40)
    assert sample(dev, None) == sample(dev, len(dev) + 5) and len(sample(dev, None)) == len(dev)


def test_split_of_known_words():
    """Pinned, so that a change of the rule (which would reshuffle every experiment) is noticed."""
    assert [split_of(w) for w in ("cat", "either", "'round", "abbe", "zweig", "'course", "aachen")] == [
        "train", "train", "test", "test", "test", "dev", "dev"]


def test_growing_dev_leaves_test_as_it_is(entries, parts):
    assert split(entries, dev=0.2)["test"] == parts["test"]


def test_split_rejects_fractions_that_do_not_fit():
    with pytest.raises(ValueError, match="dev=0.6, test=0.5"):
        split([Entry("cat", (("K", "AE", "T"),))], dev=0.6, test=0.5)


# -- Vocab -----------------------------------------------------------------------------------------------------

def test_vocab_build_puts_eos_first_then_sorted_symbols():
    vocab = Vocab.build(["cab", "bad"], kind="character")
    assert vocab.symbols == ["<eos>", "a", "b", "c", "d"]
    assert len(vocab) == 5 and vocab.eos == 0


def test_vocab_encode_decode_round_trip(entries):
    vocab = Vocab.build((e.word for e in entries), kind="character")
    assert len(vocab) == 1 + 29
    for entry in entries[::1000]:
        ids = vocab.encode(entry.word)
        assert 0 not in ids
        assert "".join(vocab.decode(ids)) == entry.word


def test_vocab_decode_stops_at_eos():
    vocab = Vocab.build([["K", "AE", "T"]], kind="phoneme")
    assert vocab.decode([2, 1, 3, 0, 2, 2]) == ["K", "AE", "T"]
    assert vocab.decode(torch.tensor([3, 0])) == ["T"]


def test_vocab_decode_rejects_ids_out_of_range():
    with pytest.raises(ValueError, match="id 7 is out of range for a vocab of 4 phonemes"):
        Vocab.build([["K", "AE", "T"]], kind="phoneme").decode([1, 7])


def test_vocab_unknown_symbol_error_names_the_symbol_and_position():
    vocab = Vocab.build(["abcdefghijklmnopqrstuvwxyz'-."], kind="character")
    with pytest.raises(ValueError) as info:
        vocab.encode("café")
    assert str(info.value) == "unknown character 'é' (position 4) in 'café'; known: ' - . a-z"


def test_vocab_unknown_symbols_error_names_each_of_them():
    vocab = Vocab.build([["K", "AE", "T"]], kind="phoneme")
    with pytest.raises(ValueError) as info:
        vocab.encode(["K", "AE1", "T", "Q"])
    assert str(info.value) == "unknown phonemes 'AE1' (position 2), 'Q' (position 4) in 'K AE1 T Q'; known: AE K T"


def test_vocab_eos_is_not_an_input_symbol():
    vocab = Vocab.build([["K"]], kind="phoneme")
    with pytest.raises(ValueError, match="'<eos>' \\(position 1\\)"):
        vocab.encode(["<eos>"])
    with pytest.raises(ValueError, match="reserved"):
        Vocab.build([["<eos>"]])


def test_vocab_json_round_trip(entries):
    vocab = Vocab.build((pron for e in entries for pron in e.prons), kind="phoneme")
    again = Vocab.from_json(vocab.to_json())
    assert again == vocab
    assert again.symbols == vocab.symbols and again.kind == "phoneme"
    assert again.encode(["K", "AE", "T"]) == vocab.encode(["K", "AE", "T"])


def test_vocab_rejects_symbols_without_eos_first_or_repeated():
    with pytest.raises(ValueError, match="first symbol"):
        Vocab(["a", "<eos>"])
    with pytest.raises(ValueError, match="repeated: \\['a'\\]"):
        Vocab(["<eos>", "a", "a"])


# -- encode_batch ----------------------------------------------------------------------------------------------

def test_encode_batch_pads_to_the_longest():
    ids, lengths = encode_batch([[5, 6, 7], [8], []])
    assert ids.dtype == lengths.dtype == torch.int64
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert lengths.tolist() == [3, 1, 0]


def test_encode_batch_uses_the_given_pad():
    ids, _ = encode_batch([[1], [2, 3]], pad=-1)
    assert ids.tolist() == [[1, -1], [2, 3]]


def test_encode_batch_of_nothing_is_empty():
    ids, lengths = encode_batch([])
    assert ids.shape == (0, 0) and lengths.shape == (0,)


def test_encode_batch_of_empty_sequences_has_no_columns():
    ids, lengths = encode_batch([[], []])
    assert ids.shape == (2, 0) and ids.dtype == torch.int64 and lengths.tolist() == [0, 0]
