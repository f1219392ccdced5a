"""The speech recipe's data plan and cache: held-out voices and sentences, deterministic synthesis, the cache."""

from __future__ import annotations

import pytest

pytest.importorskip("espeakng_loader")
pytest.importorskip("chatterbot_corpus")

import torch  # noqa: E402

from looplift.recipes.asr import data  # noqa: E402
from looplift.recipes.asr.synth import Synthesizer  # noqa: E402


@pytest.fixture(scope="module")
def synth():
    return Synthesizer()


def test_test_voices_and_sentences_are_never_trained_on(synth):
    accents, variants = data.voice_split(synth)
    assert len(accents) == 8 and all(variants.values())
    assert not set(variants["train"]) & (set(variants["dev"]) | set(variants["test"]))
    plan = data.plan(synth)
    train = plan["train"]
    for part in ("dev", "test"):
        assert {u.text for u in plan[part]}.isdisjoint(u.text for u in train)
        assert {u.voice.partition("+")[2] for u in plan[part]}.isdisjoint(u.voice.partition("+")[2] for u in train)
    assert len(train) == 5 * 1228 and len(plan["test"]) == 2 * 149


def test_the_plan_is_deterministic_and_a_smaller_one_is_a_subset(synth):
    full = data.plan(synth, seed=3)
    assert full == data.plan(synth, seed=3) and full != data.plan(synth, seed=4)
    small = data.plan(synth, seed=3, train_voices=2, sentences=10)
    for part in data.PARTS:
        assert set(small[part]) <= set(full[part])
    u = full["train"][0]
    assert 130 <= u.rate <= 200 and 30 <= u.pitch <= 70 and (u.snr_db is None or 5 <= u.snr_db <= 30)


def test_synthesis_is_deterministic_and_cached(synth, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPLIFT_CACHE", str(tmp_path))
    utterances = data.plan(synth, sentences=2)["test"]
    first = data.load("test", utterances, synth, progress=False)
    (cached,) = list((tmp_path / "asr").iterdir())
    again = data.load("test", utterances, synth, progress=False)     # read from the cache
    monkeypatch.setenv("LOOPLIFT_CACHE", str(tmp_path / "fresh"))
    fresh = data.load("test", utterances, synth, progress=False)     # synthesized again
    for audio in (again, fresh):
        assert torch.equal(audio.samples, first.samples) and torch.equal(audio.offsets, first.offsets)
    assert len(first) == 4 and all(n > 10000 for n in first.lengths())
    waves, lengths = first.waves([1, 0])
    assert waves.shape == (2, max(lengths.tolist())) and lengths.tolist() == [first.lengths()[1], first.lengths()[0]]
    assert torch.equal(waves[1, :lengths[1]], first.wave(0).float() / 32768.0) and cached.suffix == ".safetensors"
