"""Training and evaluation glue of the speech recipe: batches of features, the loss, decoding, WER."""

from __future__ import annotations

from collections.abc import Sequence

import torch

import looplift as ll

from .data import Audio
from .features import FeatureConfig, log_mel, num_frames
from .model import CHARS, CTC, FRAMES, decode_text, encode_text, greedy

__all__ = ["features", "transcripts", "alignable", "loss_function", "decode", "word_errors", "evaluate"]

FEATURES = FeatureConfig()


def features(model: CTC, audio: Audio, indices: Sequence[int]) -> ll.Named:
    """The log-mel features of the utterances `indices`, over (batch, frames, mel)."""
    waves, lengths = audio.waves(indices)
    feats, frames = log_mel(waves, lengths, FEATURES)
    return ll.Named(feats, (ll.batch_dim, FRAMES, model.feat), {FRAMES: frames})


def transcripts(model: CTC, texts: Sequence[str]) -> ll.Named:
    """The transcripts as label ids over (batch, chars)."""
    ids = [encode_text(t) for t in texts]
    n = torch.tensor([len(i) for i in ids])
    y = torch.zeros(len(ids), int(n.max()) if ids else 0, dtype=torch.long)
    for row, i in enumerate(ids):
        y[row, :len(i)] = torch.tensor(i)
    return ll.Named(y, (ll.batch_dim, CHARS), {CHARS: n}, sparse_dim=model.labels)


def alignable(audio: Audio) -> list[int]:
    """The utterances a CTC model can be trained on: those with at least as many encoder frames (a quarter of
    the feature frames) as their transcript needs (a frame per character, and a blank between two equal ones).
    Fast speech may have fewer; its loss would be infinite."""
    out = []
    for i, (u, n) in enumerate(zip(audio.utterances, audio.lengths())):
        ids = encode_text(u.text)
        needed = len(ids) + sum(a == b for a, b in zip(ids, ids[1:]))
        if -(-num_frames(n, FEATURES) // 4) >= needed:
            out.append(i)
    return out


def loss_function(audio: Audio):
    """The trainer's loss: the CTC loss summed over a batch (utterance indices) and its number of characters."""
    programs: dict[int, ll.Program] = {}

    def loss_fn(model: CTC, batch: Sequence[int]):
        train = programs.get(id(model))
        if train is None:
            train = programs[id(model)] = ll.compile(model, mode="train")
        y = transcripts(model, [audio.utterances[i].text for i in batch])
        return train(features(model, audio, batch), y).tensor, int(y.lengths[CHARS].sum())

    return loss_fn


def decode(model: CTC, audio: Audio, indices: Sequence[int] | None = None, *, batch_size: int = 32) -> list[str]:
    """The greedy transcript of every utterance (`indices`: all by default), batched by length."""
    indices = list(range(len(audio))) if indices is None else list(indices)
    lengths = audio.lengths()
    order = sorted(range(len(indices)), key=lambda k: lengths[indices[k]])
    program = ll.compile(model, mode="eval")
    out: list[str] = [""] * len(indices)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                log_probs, frames = program(features(model, audio, [indices[k] for k in chunk]))
                time = [d for d in log_probs.dims if d not in (ll.batch_dim, model.labels)][0]
                for k, ids in zip(chunk, greedy(log_probs.align(ll.batch_dim, time, model.labels), frames.tensor)):
                    out[k] = decode_text(ids)
    finally:
        model.train(was_training)
    return out


def _edits(a: Sequence, b: Sequence) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def word_errors(hyps: Sequence[str], refs: Sequence[str]) -> tuple[int, int, int, int]:
    """``(word edits, reference words, character edits, reference characters)`` of `hyps` against `refs`."""
    we = sum(_edits(h.split(), r.split()) for h, r in zip(hyps, refs))
    ce = sum(_edits(h, r) for h, r in zip(hyps, refs))
    return we, sum(len(r.split()) for r in refs), ce, sum(len(r) for r in refs)


def evaluate(model: CTC, audio: Audio, indices: Sequence[int] | None = None) -> dict[str, float]:
    """Word and character error rates of the greedy transcripts."""
    indices = list(range(len(audio))) if indices is None else list(indices)
    hyps = decode(model, audio, indices)
    we, words, ce, chars = word_errors(hyps, [audio.utterances[i].text for i in indices])
    return {"wer": we / max(words, 1), "cer": ce / max(chars, 1)}
