"""A picture of one utterance (PNG): its log-mel spectrogram, what the recognizer heard, and where.

Above, the spectrogram, with the recognized characters at the frames a CTC or
transducer model emits them. Below, by decoder:

- CTC: the per-frame label posteriors and the best path (the best label per
  encoder frame; its transcript is the greedy one);
- transducer: the best alignment of the recognized transcript (``rnnt_align``,
  Viterbi on the loss's lattice): characters emitted so far against the frames;
- attention: each output step's attention weights over the encoder frames.

An encoder frame covers :data:`SUBSAMPLING` feature frames, so everything
shares the spectrogram's time axis (seconds).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import looplift as ll

from . import recipe
from .data import Audio
from .model import BLANK, CHARS, CTC, Attention, Transducer, decode_text, greedy

__all__ = ["Picture", "analyze", "draw", "SUBSAMPLING"]

#: feature frames per encoder frame
SUBSAMPLING = 4


@dataclass
class Picture:
    """What :func:`draw` plots, computed by :func:`analyze` (arrays over this utterance only)."""

    decoder: str
    text: str                      # the recognized transcript
    reference: str                 # the utterance's transcript ("" for a WAV file)
    spectrogram: np.ndarray        # (mel, feature frames), log-mel
    seconds_per_frame: float       # of a feature frame
    emissions: list[tuple[int, str]]   # (encoder frame, character) where a CTC or transducer model emits one
    detail: np.ndarray             # CTC: (label, frame) posteriors; transducer: the prefix length per alignment
    #                                step's frame, (2, steps); attention: (step, frame) weights
    labels: list[str]              # the rows of `detail` (CTC: the blank and the characters; transducer: none,
    #                                then the last character emitted; attention: the characters, then the end)


def analyze(model, audio: Audio, index: int, *, beam: int = 1) -> Picture:
    """Recognize utterance `index` of `audio` (by beam search with `beam`; CTC: the best path) and compute
    what the picture shows."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _analyze(model, audio, index, beam)
    finally:
        model.train(was_training)


def _analyze(model, audio: Audio, index: int, beam: int) -> Picture:
    x = recipe.features(model, audio, [index])
    frames = int(x.lengths[x.dims[1]][0])
    spec = x.tensor[0, :frames].T.numpy()
    seconds = recipe.FEATURES.hop / recipe.FEATURES.sample_rate
    reference = audio.utterances[index].text
    decoder = model.config.decoder
    if isinstance(model, CTC):
        log_probs, n = ll.compile(model, mode="eval")(x)
        time = [d for d in log_probs.dims if d not in (ll.batch_dim, model.labels)][0]
        lp = log_probs.align(ll.batch_dim, time, model.labels)[0, :int(n.tensor[0])]
        (ids,) = greedy(lp[None], n.tensor[:1])
        path = lp.argmax(-1).tolist()
        emissions = [(t, decode_text([c])) for t, c in enumerate(path)
                     if c != BLANK and (t == 0 or path[t - 1] != c)]
        return Picture(decoder, decode_text(ids), reference, spec, seconds, emissions, lp.exp().T.numpy(),
                       ["∅", *(decode_text([i]) for i in range(1, model.labels.size))])
    (ids,) = recipe._best_of_search(ll.compile(model, mode="search")(x, beam=beam))
    text = decode_text(ids)
    if not ids:                                   # nothing recognized: nothing to align or attend with
        return Picture(decoder, text, reference, spec, seconds, [], np.zeros((0, 0)), [])
    y = recipe.transcripts(model, [text])
    if isinstance(model, Transducer):
        path = ll.compile(model, mode="eval")(x, y, align=True)
        steps = path.tensor[0, :int(path.lengths[path.dims[1]][0])].tolist()
        emissions, frame, emitted, points = [], 0, 0, []
        for symbol in steps:
            points.append((frame, emitted))
            if symbol == BLANK:
                frame += 1
            else:
                emissions.append((frame, decode_text([symbol])))
                emitted += 1
        return Picture(decoder, text, reference, spec, seconds, emissions, np.array(points).T,
                       ["", *(decode_text([i]) for i in ids)])
    assert isinstance(model, Attention)
    weights = ll.compile(model, mode="eval")(x, y, attention=True)
    w = weights.align(ll.batch_dim, CHARS, *[d for d in weights.dims if d not in (ll.batch_dim, CHARS)])[0]
    return Picture(decoder, text, reference, spec, seconds, [], w[:len(ids) + 1, :].numpy(),
                   [*(decode_text([i]) for i in ids), "</s>"])


def draw(picture: Picture, path: str) -> None:
    """Write `picture` to `path` (PNG) with matplotlib (``pip install looplift[speech]``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = picture
    mel, frames = p.spectrogram.shape
    end = frames * p.seconds_per_frame
    enc_seconds = SUBSAMPLING * p.seconds_per_frame
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8.0, end * 3.5), 7.5), sharex=True,
                                      gridspec_kw={"height_ratios": [1, 1.3]})
    top.imshow(p.spectrogram, origin="lower", aspect="auto", extent=(0, end, 0, mel), cmap="magma")
    top.set_ylabel("mel band")
    title = f"recognized ({p.decoder}): {p.text!r}"
    if p.reference:
        title = f"reference: {p.reference!r}\n{title}"
    top.set_title(title, fontsize=10, loc="left", pad=16 if p.emissions else 6)   # (above the characters)
    for t, char in p.emissions:
        x = (t + 0.5) * enc_seconds
        top.axvline(x, color="white", linewidth=0.5, alpha=0.6)
        top.text(x, mel * 1.01, char if char != " " else "␣", ha="center", va="bottom", fontsize=7)
    if p.decoder == "ctc":
        rows = len(p.labels)
        bottom.imshow(p.detail, origin="lower", aspect="auto", cmap="Blues", vmin=0, vmax=1,
                      extent=(0, p.detail.shape[1] * enc_seconds, -0.5, rows - 0.5))
        best = p.detail.argmax(0)
        bottom.step((np.arange(len(best)) + 0.5) * enc_seconds, best, where="mid", color="red", linewidth=0.8)
        bottom.set_yticks(range(rows), [c if c != " " else "␣" for c in p.labels], fontsize=6)
        bottom.set_ylabel("label posterior; red: best path")
    elif p.decoder == "rnnt" and p.detail.size:
        frame, emitted = p.detail
        bottom.step((frame + 0.5) * enc_seconds, emitted, where="post", color="red")
        bottom.set_yticks(range(len(p.labels)), [c if c != " " else "␣" for c in p.labels], fontsize=6)
        bottom.set_ylim(-0.5, len(p.labels) - 0.5)
        bottom.grid(alpha=0.3)
        bottom.set_ylabel("alignment: characters emitted")
    elif p.decoder == "aed" and p.detail.size:
        steps = p.detail.shape[0]
        bottom.imshow(p.detail, origin="lower", aspect="auto", cmap="Greys", vmin=0,
                      extent=(0, p.detail.shape[1] * enc_seconds, -0.5, steps - 0.5))
        bottom.set_yticks(range(steps), [c if c != " " else "␣" for c in p.labels], fontsize=6)
        bottom.set_ylabel("attention weights of each output character")
    bottom.set_xlabel("seconds")
    bottom.set_xlim(0, end)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
