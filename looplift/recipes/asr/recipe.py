"""Training and evaluation glue of the speech recipe: batches of features, the loss, decoding, WER."""

from __future__ import annotations

from collections.abc import Sequence

import torch

import looplift as ll

from .data import Audio
from .features import FeatureConfig, log_mel, num_frames
from .model import BLANK, CHARS, CTC, FRAMES, decode_text, encode_text, greedy

__all__ = ["features", "transcripts", "alignable", "loss_function", "decode", "word_errors", "evaluate"]

FEATURES = FeatureConfig()


def features(model, audio: Audio, indices: Sequence[int]) -> ll.Named:
    """The log-mel features of the utterances `indices`, over (batch, frames, mel)."""
    waves, lengths = audio.waves(indices)
    feats, frames = log_mel(waves, lengths, FEATURES)
    return ll.Named(feats, (ll.batch_dim, FRAMES, model.feat), {FRAMES: frames})


def transcripts(model, texts: Sequence[str]) -> ll.Named:
    """The transcripts as label ids over (batch, chars), with the end symbol for a model whose ``target_eos``."""
    ids = [encode_text(t) + ([BLANK] if model.target_eos else []) for t in texts]
    n = torch.tensor([len(i) for i in ids])
    y = torch.zeros(len(ids), int(n.max()) if ids else 0, dtype=torch.long)
    for row, i in enumerate(ids):
        y[row, :len(i)] = torch.tensor(i)
    return ll.Named(y, (ll.batch_dim, CHARS), {CHARS: n}, sparse_dim=model.labels)


def alignable(audio: Audio, model) -> list[int]:
    """The utterances `model` can be trained on: all, but for CTC only those with at least as many encoder
    frames (a quarter of the feature frames) as their transcript needs (a frame per character, and a blank
    between two equal ones). Fast speech may have fewer; its CTC loss would be infinite."""
    if not isinstance(model, CTC):
        return list(range(len(audio)))
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

    def loss_fn(model, batch: Sequence[int]):
        train = programs.get(id(model))
        if train is None:
            train = programs[id(model)] = ll.compile(model, mode="train")
        y = transcripts(model, [audio.utterances[i].text for i in batch])
        return train(features(model, audio, batch), y).tensor, int(y.lengths[CHARS].sum())

    return loss_fn


def decode(model, audio: Audio, indices: Sequence[int] | None = None, *, beam: int = 1,
           batch_size: int = 32) -> list[str]:
    """The transcript of every utterance (`indices`: all by default), batched by length, by beam search (CTC's
    prefix search, the transducer's and the attention decoder's); `beam` 1: greedy (for CTC, the best label
    per frame, without the search)."""
    indices = list(range(len(audio))) if indices is None else list(indices)
    lengths = audio.lengths()
    order = sorted(range(len(indices)), key=lambda k: lengths[indices[k]])
    ctc = isinstance(model, CTC) and beam == 1
    program = ll.compile(model, mode="eval" if ctc else "search")
    out: list[str] = [""] * len(indices)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                x = features(model, audio, [indices[k] for k in chunk])
                if ctc:
                    log_probs, frames = program(x)
                    time = [d for d in log_probs.dims if d not in (ll.batch_dim, model.labels)][0]
                    best = greedy(log_probs.align(ll.batch_dim, time, model.labels), frames.tensor)
                else:
                    best = _best_of_search(program(x, beam=beam))
                for k, ids in zip(chunk, best):
                    out[k] = decode_text(ids)
    finally:
        model.train(was_training)
    return out


def _best_of_search(outputs) -> list[list[int]]:
    """The best hypothesis of each entry of a search's ``(labels, scores, lengths, valid)``, without blanks
    (the transducer's) or the end symbol (the attention decoder's): both are label 0."""
    labels, scores, lengths, valid = outputs
    (beam,) = [d for d in valid.dims if d is not ll.batch_dim]
    (steps,) = [d for d in labels.dims if d not in (ll.batch_dim, beam)]
    ys, n = labels.align(ll.batch_dim, beam, steps), lengths.align(ll.batch_dim, beam)
    sc = scores.align(ll.batch_dim, beam).masked_fill(~valid.align(ll.batch_dim, beam), float("-inf"))
    best = sc.argmax(1)
    return [[t for t in ys[row, k, :int(n[row, k])].tolist() if t != BLANK] for row, k in enumerate(best.tolist())]


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


def evaluate(model, audio: Audio, indices: Sequence[int] | None = None, *, beam: int = 1) -> dict[str, float]:
    """Word and character error rates of the transcripts (see :func:`decode`)."""
    indices = list(range(len(audio))) if indices is None else list(indices)
    hyps = decode(model, audio, indices, beam=beam)
    we, words, ce, chars = word_errors(hyps, [audio.utterances[i].text for i in indices])
    return {"wer": we / max(words, 1), "cer": ce / max(chars, 1)}
