"""The speech recognizers, each written once: trained with the optimized loop, decoded with looplift's search.

All share the encoder (:mod:`.encoder`: log-mel features, subsampling by 4, a
BiLSTM) and output characters (:data:`.corpus.ALPHABET`): the transcripts are
written in them, so no lexicon is needed, and a word the recognizer has never
heard can still be spelled.

- :class:`CTC`: a linear map of each encoder frame to the characters and a
  blank, trained with ``looplift.ctc_loss``; decoded greedily (the best label
  per frame, repeats merged, blanks dropped) or by a prefix beam search.
- :class:`Transducer`: RNN-T. A prediction LSTM over the characters so far,
  a joint over every (frame, prefix) pair, the full-sum ``looplift.rnnt_loss``;
  searched alignment-synchronously (at most `max_labels` characters per frame,
  equal prefixes at the same frame merged), as the G2P transducer is.
- :class:`Attention`: an LSTM decoder with dot attention over the encoder
  frames, its context fed back, ``looplift.choice`` for the next character
  (the G2P recipe's decoder, over speech): trained with the optimized loop,
  searched with beam search.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch

import looplift as ll
from looplift import nn

from ..g2p.model import decoder_loop, next_phoneme, result
from ..g2p.transducer import alignment_search
from .corpus import ALPHABET
from .encoder import Encoder

__all__ = ["Config", "CTC", "Transducer", "Attention", "build", "BLANK", "FRAMES", "CHARS", "STEPS",
           "encode_text", "decode_text"]

BLANK = 0     # (the end of a transcript for the attention decoder)
#: the dims of the inputs: the feature frames and the transcript's characters; a search's steps
FRAMES, CHARS, STEPS = ll.Dim("frames"), ll.Dim("chars"), ll.Dim("steps")


@dataclass
class Config:
    """Sizes of a recognizer (stored in checkpoints as JSON)."""

    n_mels: int = 80
    conv: int = 256
    enc: int = 256            # per layer, both directions together
    enc_layers: int = 2
    dropout: float = 0.1
    decoder: str = "ctc"      # "ctc", "rnnt" or "aed"
    emb: int = 64             # the character embedding of the rnnt and aed decoders
    dec: int = 256            # their LSTM
    joint: int = 256          # the rnnt's joint
    max_labels: int = 4       # the rnnt's characters per encoder frame at most, in search

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


class _Recognizer(ll.Module):
    """The encoder and the output labels (the blank or end symbol, then the characters) every decoder shares."""

    #: whether the training targets end with the end symbol (only the attention decoder's do)
    target_eos = False

    def __init__(self, config: Config):
        super().__init__()
        self.config = c = config
        self.feat = ll.Dim("mel", c.n_mels)
        self.labels = ll.Dim("labels", len(ALPHABET) + 1)
        self.encoder = Encoder(self.feat, ll.Dim("enc", c.enc), conv=c.conv, layers=c.enc_layers, dropout=c.dropout)


class CTC(_Recognizer):
    """``loss = model(feats, chars)`` (summed over the batch) in train/eval mode; ``log_probs, frames =
    model(feats)`` for decoding."""

    def __init__(self, config: Config):
        super().__init__(config)
        self.out = nn.Linear(self.encoder.enc_dim, self.labels)

    def forward(self, feats, chars=None, *, beam: int = 1):
        enc, time = self.encoder(feats, frames=FRAMES)
        logits = self.out(enc)
        if ll.is_search():
            return self._search(ll.log_softmax(logits, axis=self.labels), time, beam)
        if chars is None:
            return ll.log_softmax(logits, axis=self.labels), ll.length(time)
        loss = ll.ctc_loss(logits, chars, input_axis=time, targets_axis=CHARS, axis=self.labels, blank=BLANK)
        return ll.sum(loss, axis=ll.batch_dim)


    def _search(self, log_probs, time: ll.Dim, beam: int):
        """The prefix beam search: a loop over the encoder frames whose hypotheses are alignments (a label or
        the blank per frame); those with the same label sequence so far and the same last symbol are merged
        (log-sum-exp), so a hypothesis's score is the probability of its prefix ending in that symbol, the
        sums of the prefix search. The stacked labels are those the alignment emits (a label other than the
        one before it), the blank elsewhere."""
        loop = ll.Loop(axis=time)
        loop.state.last = ll.full(BLANK, sparse_dim=self.labels)
        loop.state.history = ll.search.label_history_start()
        with loop:
            label = ll.choice(loop.unstack(log_probs), beam_size=beam, axis=self.labels)
            emitted = ll.where(label != loop.state.last, label, ll.full(BLANK, sparse_dim=self.labels))
            loop.state.history = ll.search.label_history(loop.state.history, emitted, ignore=BLANK)
            loop.state.last = label
            ll.search.merge([loop.state.history, loop.state.last], mode="logsumexp")
            labels = loop.stack(emitted)
        return labels, loop.search.scores, loop.search.lengths, loop.search.valid


class Transducer(_Recognizer):
    """``loss = model(feats, chars)`` in train/eval mode (summed over the batch); ``model(feats, chars,
    align=True)``: the best alignment of `chars` (``looplift.rnnt_align``); ``labels, scores, lengths, valid =
    model(feats, beam=k)`` in search mode (labels over alignment steps, blanks included)."""

    def __init__(self, config: Config):
        super().__init__(config)
        c = config
        self.emb_dim, self.pred_dim, self.joint_dim = ll.Dim("emb", c.emb), ll.Dim("pred", c.dec), \
            ll.Dim("joint", c.joint)
        self.emb = nn.Embedding(self.labels, self.emb_dim)
        self.pred = nn.LSTM(self.emb_dim, self.pred_dim)
        self.from_enc = nn.Linear(self.encoder.enc_dim, self.joint_dim)
        self.from_pred = nn.Linear(self.pred_dim, self.joint_dim)
        self.readout = nn.Linear(self.joint_dim, self.labels)
        self.dropout = nn.Dropout(c.dropout)

    def joint(self, enc, pred):
        return self.readout(ll.tanh(enc + pred))

    def forward(self, feats, chars=None, *, beam: int = 1, align: bool = False):
        enc, time = self.encoder(feats, frames=FRAMES)
        enc = self.from_enc(self.dropout(enc))
        if ll.is_search():
            return self._search(enc, time, beam)
        prefix = CHARS + 1                                   # the prefixes of 0..U characters
        inputs = ll.pad(chars, axis=CHARS, left=1, value=BLANK)
        loop = ll.Loop(axis=prefix)
        loop.state.lstm = self.pred.default_initial_state()
        with loop:
            h, loop.state.lstm = self.pred(self.emb(loop.unstack(inputs)), loop.state.lstm)
            pred = loop.stack(self.from_pred(self.dropout(h)))
        logits = self.joint(enc, pred)                       # {batch, time, chars + 1, labels}
        if align:                                            # the best alignment of `chars` (Viterbi)
            return ll.rnnt_align(logits, chars, blank=BLANK, enc_time=time, prefix=prefix, axis=self.labels)
        loss = ll.rnnt_loss(logits, chars, blank=BLANK, enc_time=time, prefix=prefix, axis=self.labels)
        return ll.sum(loss, axis=ll.batch_dim)

    def _search(self, enc, time: ll.Dim, beam: int):
        limit = self.config.max_labels
        return alignment_search(self, enc, self.labels, frames=time, steps=STEPS, max_labels=limit, beam=beam,
                                max_len=(limit + 1) * ll.length(time))


class Attention(_Recognizer):
    """``loss = model(feats, chars)`` in train/eval mode (summed over the batch; the targets end with the end
    symbol); ``model(feats, chars, attention=True)``: the attention weights of each step over the encoder
    frames, given `chars`; ``labels, scores, lengths, valid = model(feats, beam=k)`` in search mode."""

    target_eos = True

    def __init__(self, config: Config):
        super().__init__(config)
        c = config
        self.emb_dim, self.dec_dim = ll.Dim("emb", c.emb), ll.Dim("dec", c.dec)
        enc_dim = self.encoder.enc_dim
        self.emb = nn.Embedding(self.labels, self.emb_dim)
        self.cell = nn.LSTM(self.emb_dim + enc_dim, self.dec_dim)
        self.query = nn.Linear(self.dec_dim, enc_dim)
        self.readout = nn.Linear(self.dec_dim + enc_dim, self.labels)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, feats, chars=None, *, beam: int = 1, attention: bool = False):
        enc, time = self.encoder(feats, frames=FRAMES)
        enc_dim = self.encoder.enc_dim
        loop = decoder_loop(self.labels, src=time, tgt=CHARS if chars is not None else STEPS, max_len=None)
        loop.state.lstm = self.cell.default_initial_state()
        loop.state.ctx = ll.zeros([enc_dim])
        with loop:
            x = ll.concat(self.emb(loop.state.label), loop.state.ctx, axis=[self.emb_dim, enc_dim])
            h, loop.state.lstm = self.cell(x, loop.state.lstm)
            att = ll.softmax(ll.dot(enc, self.query(h), reduce=enc_dim), axis=time)
            loop.state.ctx = ll.dot(att, enc, reduce=time)
            readout_in = self.dropout(ll.concat(h, loop.state.ctx, axis=[self.dec_dim, enc_dim]))
            log_probs = ll.log_softmax(self.readout(readout_in), axis=self.labels)
            stacked = next_phoneme(loop, log_probs, chars, axis=self.labels, beam=beam, threshold=None,
                                   label_smoothing=0.0)
            weights = loop.stack(att) if attention else None
        if attention:                                        # each step's weights over the frames
            return weights
        return result(loop, stacked)


DECODERS = {"ctc": CTC, "rnnt": Transducer, "aed": Attention}


def build(config: Config) -> CTC | Transducer | Attention:
    """The recognizer of `config.decoder`."""
    if config.decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {sorted(DECODERS)}, got {config.decoder!r}")
    return DECODERS[config.decoder](config)


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
