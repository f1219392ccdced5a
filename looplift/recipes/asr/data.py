"""The speech data: the corpus's sentences spoken by eSpeak NG's English voices, with noise, cached on disk.

**Voices.** A voice is an accent (``en-us``, ``en-gb-scotland``, ... : 8) with a
variant (``+f3``, ``+m2``, ``+whisper``, ...: 103, which change pitch, formants,
breath and roughness). The variants are split by the SHA-256 of their name, as
the sentences are (:mod:`.corpus`): about 70% train, 15% dev, 15% test. So test
utterances are spoken by variants (voices) and sentences that training never
sees, and dev ones likewise by their own.

**Utterances.** Every train sentence is spoken by `train_voices` voices, every
dev and test sentence by `eval_voices`, each drawn from its part's variants
with a random accent, at a random rate (130 to 200 words per minute) and pitch
(30 to 70), with white noise at a random SNR (5 to 30 dB; a fifth of them clean).
Every choice comes from a generator seeded by the seed, the part, the sentence
and the utterance's number, so the plan of a part does not depend on any other
and a smaller `train_voices` gives a subset.

**Cache.** A part is synthesized once (with a progress bar) and kept as a
safetensors file under ``$LOOPLIFT_CACHE`` (default ``~/.cache/looplift/asr``),
named by a digest of its plan and the eSpeak NG version: the int16 samples of
all utterances, one after the other, their offsets, and the plan as JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from looplift.errors import ConfigError

from . import corpus
from .synth import SAMPLE_RATE, Synthesizer, add_noise

__all__ = ["Utterance", "Audio", "voice_split", "plan", "load", "cache_dir"]

PARTS = ("train", "dev", "test")


@dataclass(frozen=True)
class Utterance:
    """One utterance to synthesize: the transcript, the voice, rate, pitch and noise (None: clean)."""

    text: str
    voice: str
    rate: int
    pitch: int
    snr_db: float | None
    seed: int


def _part_of(name: str) -> str:
    u = int.from_bytes(hashlib.sha256(("voice:" + name).encode("utf-8")).digest()[:8], "big") / 2.0**64
    return "test" if u < 0.15 else "dev" if u < 0.30 else "train"


def voice_split(synth: Synthesizer) -> tuple[list[str], dict[str, list[str]]]:
    """The accents, and the variants of each part (by the SHA-256 of ``"voice:" + variant``)."""
    voices = synth.voices()
    accents = [v for v in voices if "+" not in v]
    variants = sorted({v.partition("+")[2] for v in voices if "+" in v})
    parts: dict[str, list[str]] = {p: [] for p in PARTS}
    for variant in variants:
        parts[_part_of(variant)].append(variant)
    return accents, parts


def plan(synth: Synthesizer, *, seed: int = 0, train_voices: int = 5, eval_voices: int = 2,
         sentences: int | None = None) -> dict[str, list[Utterance]]:
    """The utterances of each part (see the module docstring); `sentences`: only the first N of each part."""
    accents, variants = voice_split(synth)
    out: dict[str, list[Utterance]] = {}
    for part, texts in corpus.split(corpus.sentences()).items():
        per_sentence = train_voices if part == "train" else eval_voices
        utterances = []
        for text in texts[:sentences]:
            for k in range(per_sentence):
                rng = random.Random(f"{seed}:{part}:{text}:{k}")
                utterances.append(Utterance(
                    text=text, voice=f"{rng.choice(accents)}+{rng.choice(variants[part])}",
                    rate=rng.randint(130, 200), pitch=rng.randint(30, 70),
                    snr_db=None if rng.random() < 0.2 else round(rng.uniform(5.0, 30.0), 2),
                    seed=rng.getrandbits(63)))
        out[part] = utterances
    return out


class Audio:
    """The synthesized utterances of one part: ``waves(indices)`` gives a padded float batch and the lengths."""

    def __init__(self, samples: torch.Tensor, offsets: torch.Tensor, utterances: list[Utterance]):
        self.samples, self.offsets, self.utterances = samples, offsets, utterances

    def __len__(self) -> int:
        return len(self.utterances)

    def lengths(self) -> list[int]:
        """The number of samples of every utterance."""
        return (self.offsets[1:] - self.offsets[:-1]).tolist()

    def wave(self, i: int) -> torch.Tensor:
        """The int16 samples of utterance `i`."""
        return self.samples[int(self.offsets[i]):int(self.offsets[i + 1])]

    def waves(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """``(waves, lengths)``: the utterances `indices` as floats in [-1, 1), padded with zeros."""
        parts = [self.wave(i) for i in indices]
        lengths = torch.tensor([len(p) for p in parts])
        out = torch.zeros(len(parts), int(lengths.max()) if parts else 0)
        for row, p in enumerate(parts):
            out[row, :len(p)] = p.float() / 32768.0
        return out, lengths

    def hours(self) -> float:
        return int(self.offsets[-1]) / SAMPLE_RATE / 3600


def cache_dir() -> Path:
    return Path(os.environ.get("LOOPLIFT_CACHE") or Path.home() / ".cache" / "looplift") / "asr"


def load(part: str, utterances: list[Utterance], synth: Synthesizer, *, progress: bool = True) -> Audio:
    """The audio of `utterances` (one part of a :func:`plan`), synthesized on first use and cached."""
    if part not in PARTS:
        raise ConfigError(f"part must be one of {PARTS}, got {part!r}")
    spec = json.dumps({"espeak": synth.version, "rate": SAMPLE_RATE, "utterances": [asdict(u) for u in utterances]})
    path = cache_dir() / f"{part}-{hashlib.sha256(spec.encode()).hexdigest()[:16]}.safetensors"
    if path.exists():
        tensors = load_file(path)
        return Audio(tensors["samples"], tensors["offsets"], utterances)
    from tqdm import tqdm
    pieces, offsets = [], [0]
    for u in tqdm(utterances, desc=f"synthesizing {part}", unit="utt", disable=not progress):
        wave = synth.synthesize(u.text, voice=u.voice, rate=u.rate, pitch=u.pitch)
        if u.snr_db is not None:
            wave = add_noise(wave, u.snr_db, np.random.default_rng(u.seed))
        pieces.append(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.int16)))
        offsets.append(offsets[-1] + len(wave))
    samples = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"samples": samples, "offsets": torch.tensor(offsets)}, str(tmp), metadata={"spec": spec})
    os.replace(tmp, path)
    return Audio(samples, torch.tensor(offsets), utterances)
