"""The speech recipe's synthesis: eSpeak NG's English voices speak deterministically (the same samples in a call
repeated, after other calls, in another thread and in a new process), voices, rates and pitches change the audio,
a slower rate gives longer audio, bad arguments are ConfigErrors naming the argument, add_noise hits its SNR
from the seed alone, and WAV files round-trip exactly. Skipped without the ``espeakng-loader`` package."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

pytest.importorskip("espeakng_loader")

from looplift.errors import ConfigError  # noqa: E402
from looplift.recipes.asr.synth import (  # noqa: E402
    SAMPLE_RATE,
    Synthesizer,
    active_power,
    add_noise,
    available,
    read_wav,
    write_wav,
)

TEXT = "The quick brown fox jumps over the lazy dog."
# plain, a breathy variant (noise), a Klatt variant, whisper: the last three draw random numbers
CASES = [("en-us", 175, 50), ("en-gb+f3", 220, 30), ("en-gb-scotland+klatt3", 140, 70), ("en-029+whisper", 175, 50)]

HASH_SCRIPT = """
import hashlib, sys
from looplift.recipes.asr.synth import Synthesizer
s = Synthesizer()
for voice, rate, pitch in {cases!r}:
    samples = s.synthesize({text!r}, voice=voice, rate=rate, pitch=pitch)
    print(hashlib.sha256(samples.tobytes()).hexdigest())
"""


@pytest.fixture(scope="module")
def synth() -> Synthesizer:
    return Synthesizer()


def digest(samples: np.ndarray) -> str:
    return hashlib.sha256(samples.tobytes()).hexdigest()


def test_available_and_voices(synth):
    assert available()
    voices = synth.voices()
    assert len(voices) == len(set(voices))
    for name in ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us+f3", "en-gb+m2", "en-us+klatt"]:
        assert name in voices
    bases = [v for v in voices if "+" not in v]
    assert all(v == "en" or v.startswith("en-") for v in bases)
    assert {v.partition("+")[0] for v in voices} == set(bases)


def test_samples(synth):
    samples = synth.synthesize(TEXT, voice="en-us")
    assert samples.dtype == np.int16 and samples.ndim == 1
    assert 1.5 < len(samples) / SAMPLE_RATE < 4.0
    assert np.abs(samples).max() > 3000


def test_same_call_twice_gives_the_same_samples(synth):
    first = [synth.synthesize(TEXT, voice=v, rate=r, pitch=p) for v, r, p in CASES]
    synth.synthesize("Something else in between.", voice="en-us+m3", rate=300, pitch=90)
    again = [synth.synthesize(TEXT, voice=v, rate=r, pitch=p) for v, r, p in reversed(CASES)][::-1]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)


def test_threads_give_the_same_samples(synth):
    expected = [digest(synth.synthesize(TEXT, voice=v, rate=r, pitch=p)) for v, r, p in CASES]
    found = {}

    def run(i):
        voice, rate, pitch = CASES[i % len(CASES)]
        found[i] = digest(synth.synthesize(TEXT, voice=voice, rate=rate, pitch=pitch))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [found[i] for i in range(8)] == [expected[i % len(CASES)] for i in range(8)]


def test_new_process_gives_the_same_samples(synth):
    expected = [digest(synth.synthesize(TEXT, voice=v, rate=r, pitch=p)) for v, r, p in CASES]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-c", HASH_SCRIPT.format(cases=CASES, text=TEXT)], env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == expected


def test_voices_rates_and_pitches_change_the_audio(synth):
    variants = {
        "voice": [synth.synthesize(TEXT, voice=v) for v in ["en-us", "en-gb", "en-gb-x-rp", "en-us+f3", "en-us+m2"]],
        "rate": [synth.synthesize(TEXT, voice="en-us", rate=r) for r in [120, 175, 260]],
        "pitch": [synth.synthesize(TEXT, voice="en-us", pitch=p) for p in [10, 50, 90]],
    }
    for what, outputs in variants.items():
        hashes = [digest(a) for a in outputs]
        assert len(set(hashes)) == len(hashes), what


def test_a_slower_rate_gives_longer_audio(synth):
    lengths = [len(synth.synthesize(TEXT, voice="en-gb", rate=r)) for r in [100, 200, 400]]
    assert lengths[0] > lengths[1] > lengths[2]
    assert 1.6 < lengths[0] / lengths[1] < 2.4
    assert 1.5 < lengths[1] / lengths[2] < 2.4


@pytest.mark.parametrize("kwargs, name", [
    ({"voice": "en-xx"}, "voice"),
    ({"voice": "en-us+nobody"}, "voice"),
    ({"voice": "EN-US"}, "voice"),
    ({"voice": "en-us", "rate": 79}, "rate"),
    ({"voice": "en-us", "rate": 451}, "rate"),
    ({"voice": "en-us", "rate": 175.0}, "rate"),
    ({"voice": "en-us", "rate": True}, "rate"),
    ({"voice": "en-us", "pitch": -1}, "pitch"),
    ({"voice": "en-us", "pitch": 101}, "pitch"),
])
def test_bad_arguments_are_config_errors(synth, kwargs, name):
    with pytest.raises(ConfigError, match=name) as caught:
        synth.synthesize(TEXT, **kwargs)
    if name == "voice":
        assert "en-us" in str(caught.value) and "en-gb-scotland" in str(caught.value) and "f3" in str(caught.value)


def test_bad_text_is_a_config_error(synth):
    with pytest.raises(ConfigError, match="text"):
        synth.synthesize(b"bytes", voice="en-us")
    with pytest.raises(ConfigError, match="NUL"):
        synth.synthesize("a\0b", voice="en-us")


def test_active_power_ignores_silence():
    tone = (8000 * np.sin(np.arange(80 * 256) * 0.05)).astype(np.int16)
    silence = np.zeros(100 * 256, dtype=np.int16)    # (whole frames of 256 samples)
    power = active_power(tone)
    assert power == pytest.approx(np.mean(tone.astype(np.float64) ** 2), rel=1e-12)
    assert active_power(np.concatenate([silence, tone, silence])) == pytest.approx(power, rel=1e-12)
    assert active_power(np.concatenate([silence, tone, tone // 1000])) == pytest.approx(power, rel=1e-12)
    assert active_power(silence) == 0.0


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 20.0, 35.0])
def test_add_noise_hits_the_snr(synth, snr_db):
    clean = synth.synthesize(TEXT, voice="en-gb+m2")
    noisy = add_noise(clean, snr_db, np.random.default_rng(7))
    assert noisy.dtype == np.int16 and noisy.shape == clean.shape
    noise = noisy.astype(np.float64) - clean
    measured = 10 * np.log10(active_power(clean) / np.mean(noise ** 2))
    assert abs(measured - snr_db) < 0.5


def test_add_noise_is_deterministic_from_the_seed(synth):
    clean = synth.synthesize(TEXT, voice="en-us")
    a = add_noise(clean, 5.0, np.random.default_rng(1))
    np.testing.assert_array_equal(a, add_noise(clean, 5.0, np.random.default_rng(1)))
    assert not np.array_equal(a, add_noise(clean, 5.0, np.random.default_rng(2)))


def test_add_noise_clips_and_checks_its_arguments(synth):
    clean = synth.synthesize(TEXT, voice="en-us")
    loud = add_noise(clean, -20.0, np.random.default_rng(0))
    assert loud.dtype == np.int16 and loud.min() == -32768 and loud.max() == 32767
    with pytest.raises(ConfigError, match="silent"):
        add_noise(np.zeros(100, dtype=np.int16), 10.0, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="rng"):
        add_noise(clean, 10.0, 0)
    with pytest.raises(ConfigError, match="snr_db"):
        add_noise(clean, float("nan"), np.random.default_rng(0))


def test_wav_round_trip(synth, tmp_path):
    samples = add_noise(synth.synthesize(TEXT, voice="en-029+f2"), -5.0, np.random.default_rng(3))
    samples[:2] = [-32768, 32767]
    write_wav(tmp_path / "a.wav", samples)
    back, rate = read_wav(tmp_path / "a.wav")
    assert rate == SAMPLE_RATE and back.dtype == np.int16
    np.testing.assert_array_equal(back, samples)
    write_wav(str(tmp_path / "b.wav"), samples[:0], rate=16000)
    back, rate = read_wav(tmp_path / "b.wav")
    assert rate == 16000 and back.size == 0
    with pytest.raises(ConfigError, match="int16"):
        write_wav(tmp_path / "c.wav", samples.astype(np.float32))
