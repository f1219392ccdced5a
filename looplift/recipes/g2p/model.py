"""The grapheme-to-phoneme model, defined once: trained with the optimized loop, decoded by beam search.

Characters are embedded and encoded by a stack of bidirectional LSTMs; an LSTM decoder attends to the
encoding (dot attention through a query projection) and feeds its attention context back into its next
input, with the previous phoneme's embedding. ``looplift.choice`` picks the next phoneme: in train and
eval mode it is the reference, so the loop keeps only the recurrent core (LSTM cell and attention) and the
embedding, readout and loss run over the whole sequence; in search mode it is one beam-search step.

Phoneme 0 is ``<eos>``: it starts the decoder and ends each hypothesis.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import looplift as ll
from looplift import nn

EOS = 0


class JsonConfig:
    """A config dataclass stored in checkpoints as JSON (its ``arch`` says which model it builds)."""

    arch = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        return cls(**json.loads(text))


@dataclass
class Config(JsonConfig):
    """The model's sizes and regularization (stored in checkpoints as JSON)."""

    n_chars: int
    n_phonemes: int
    emb: int = 64
    enc: int = 256            # per layer, both directions together
    enc_layers: int = 2
    dec: int = 256
    dropout: float = 0.0      # on embeddings, between encoder layers and on the readout input
    label_smoothing: float = 0.0
    arch = "lstm"


class G2P(ll.Module):
    """``loss = model(chars, phonemes, src=..., tgt=...)`` in train/eval mode (summed over the batch), and
    ``labels, scores, lengths = model(chars, src=..., tgt=..., beam=k)`` in search mode."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = c = config
        self.chars, self.phonemes = ll.Dim("chars", c.n_chars), ll.Dim("phonemes", c.n_phonemes)
        self.char_emb_dim, self.emb_dim = ll.Dim("char_emb", c.emb), ll.Dim("phoneme_emb", c.emb)
        self.enc_dim = ll.Dim("enc", c.enc)
        self.dec_dim = ll.Dim("dec", c.dec)
        self.char_emb = nn.Embedding(self.chars, self.char_emb_dim)
        # (the layers run as one fused kernel; dropout between them in training)
        self.encoder = nn.LSTM(self.char_emb_dim, self.enc_dim, bidirectional=True, num_layers=c.enc_layers,
                               dropout=c.dropout)
        self.dropout = nn.Dropout(c.dropout)
        self.emb = nn.Embedding(self.phonemes, self.emb_dim)
        self.cell = nn.LSTM(self.emb_dim + self.enc_dim, self.dec_dim)
        self.query = nn.Linear(self.dec_dim, self.enc_dim)
        self.readout = nn.Linear(self.dec_dim + self.enc_dim, self.phonemes)

    def encode(self, chars, *, src: ll.Dim):
        enc, _ = self.encoder(self.dropout(self.char_emb(chars)), axis=src)
        return enc

    def forward(self, chars, phonemes=None, *, src: ll.Dim, tgt: ll.Dim, beam: int = 1,
                max_len: int | None = None, threshold: float | None = None):
        enc = self.encode(chars, src=src)
        loop = decoder_loop(self.phonemes, src=src, tgt=tgt, max_len=max_len)
        loop.state.decoder = self.decoder_state()
        with loop:
            log_probs, loop.state.decoder = self.decoder_step(loop.state.decoder, loop.state.label, enc, src=src,
                                                              index=loop.index)
            stacked = next_phoneme(loop, log_probs, phonemes, axis=self.phonemes, beam=beam, threshold=threshold,
                                   label_smoothing=self.config.label_smoothing)
        return result(loop, stacked)

    def decoder_state(self):
        """The decoder's state before the first phoneme: the LSTM's, and the attention context (zeros)."""
        return self.cell.default_initial_state(), ll.zeros([self.enc_dim])

    def decoder_step(self, state, label, enc, *, src: ll.Dim, index):
        """One decoder step after `label`: ``(log-probabilities of the next phoneme, the new state)``."""
        lstm, ctx = state
        x = ll.concat(self.emb(label), ctx, axis=[self.emb_dim, self.enc_dim])
        h, lstm = self.cell(x, state=lstm)
        att = ll.softmax(ll.dot(enc, self.query(h), reduce=self.enc_dim), axis=src)
        ctx = ll.dot(att, enc, reduce=src)
        readout_in = self.dropout(ll.concat(h, ctx, axis=[self.dec_dim, self.enc_dim]))
        return ll.log_softmax(self.readout(readout_in), axis=self.phonemes), (lstm, ctx)


def decoder_loop(phonemes: ll.Dim, *, src: ll.Dim, tgt: ll.Dim, max_len: int | None) -> ll.Loop:
    """The decoder's loop over `tgt`, shared by the models, its ``label`` state starting at EOS. Decoding stops
    at the end of every hypothesis, at the latest after 2 phonemes per character + 3 (or `max_len`)."""
    loop = ll.Loop(axis=tgt, max_seq_len=ll.length(src) * 2 + 3 if max_len is None else max_len)
    loop.state.label = ll.full(EOS, sparse_dim=phonemes)
    return loop


def next_phoneme(loop: ll.Loop, log_probs, phonemes, *, axis: ll.Dim, beam: int, threshold: float | None,
                 label_smoothing: float):
    """The end of a decoder step, shared by the models: ``choice`` of the next phoneme (fed back as
    ``loop.state.label``; the reference in train/eval mode), the end at EOS, and what is stacked: the chosen
    phonemes in search mode, else each step's (label-smoothed) negative log-likelihood. `axis`: the
    phoneme dim of `log_probs`."""
    label = ll.choice(log_probs, target=phonemes, beam_size=beam, axis=axis, threshold=threshold)
    loop.state.label = label
    loop.end(ll.eq(label, EOS), include_eos=True)
    if ll.is_search():
        return loop.stack(label)
    nll = -ll.gather(log_probs, index=label, axis=axis)
    if label_smoothing:
        nll = (1 - label_smoothing) * nll - label_smoothing * ll.mean(log_probs, axis=axis)
    return loop.stack(nll)


def result(loop: ll.Loop, stacked):
    """The model's result after the decoder loop: ``(labels, scores, lengths, valid)`` of the n-best in search
    mode, else the loss summed over the batch."""
    if ll.is_search():
        return stacked, loop.search.scores, loop.search.lengths, loop.search.valid
    return ll.sum(stacked, axis=[ll.batch_dim, loop.axis])
