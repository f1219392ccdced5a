"""The speech recognizers, each written once: trained with the optimized loop, decoded with looplift's search.

All share the encoder (:mod:`.encoder`: log-mel features, subsampling by 4, a
BiLSTM) and output characters (:data:`.corpus.ALPHABET`): the transcripts are
written in them, so no lexicon is needed, and a word the recognizer has never
heard can still be spelled.

- :class:`CTC`: a linear map of each encoder frame to the characters and a
  blank, trained with ``looplift.ctc_loss``; decoded greedily (the best label
  per frame, repeats merged, blanks dropped).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch

import looplift as ll
from looplift import nn

from .corpus import ALPHABET
from .encoder import Encoder

__all__ = ["Config", "CTC", "BLANK", "FRAMES", "CHARS", "encode_text", "decode_text"]

BLANK = 0
#: the dims of the inputs: the feature frames and the transcript's characters
FRAMES, CHARS = ll.Dim("frames"), ll.Dim("chars")


@dataclass
class Config:
    """Sizes of a recognizer (stored in checkpoints as JSON)."""

    n_mels: int = 80
    conv: int = 256
    enc: int = 256            # per layer, both directions together
    enc_layers: int = 2
    dropout: float = 0.1
    decoder: str = "ctc"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Config:
        return cls(**json.loads(text))


def encode_text(text: str) -> list[int]:
    """The label ids of a transcript: a character's position in :data:`ALPHABET`, plus 1 (0 is the blank)."""
    return [ALPHABET.index(c) + 1 for c in text]


def decode_text(ids) -> str:
    return "".join(ALPHABET[i - 1] for i in ids)


class CTC(ll.Module):
    """``loss = model(feats, chars)`` (summed over the batch) in train/eval mode; ``log_probs, frames =
    model(feats)`` for decoding."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = c = config
        self.feat = ll.Dim("mel", c.n_mels)
        self.labels = ll.Dim("labels", len(ALPHABET) + 1)    # the blank, then the characters
        self.encoder = Encoder(self.feat, ll.Dim("enc", c.enc), conv=c.conv, layers=c.enc_layers, dropout=c.dropout)
        self.out = nn.Linear(self.encoder.enc_dim, self.labels)

    def forward(self, feats, chars=None):
        enc, time = self.encoder(feats, frames=FRAMES)
        logits = self.out(enc)
        if chars is None:
            return ll.log_softmax(logits, axis=self.labels), ll.length(time)
        loss = ll.ctc_loss(logits, chars, input_axis=time, targets_axis=CHARS, axis=self.labels, blank=BLANK)
        return ll.sum(loss, axis=ll.batch_dim)


def greedy(log_probs: torch.Tensor, frames: torch.Tensor) -> list[list[int]]:
    """Per entry of ``log_probs`` (batch, frame, label): the best label per frame over its `frames`, repeats
    merged and blanks dropped."""
    best = log_probs.argmax(-1)
    out = []
    for row, n in zip(best.tolist(), frames.tolist()):
        ids, last = [], BLANK
        for label in row[:n]:
            if label != last and label != BLANK:
                ids.append(label)
            last = label
        out.append(ids)
    return out
