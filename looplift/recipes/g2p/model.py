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


@dataclass
class Memory:
    """What the decoder attends to: the encoding `enc` over (src, enc), and its projections over src made
    once before the loop: `gates`, each frame's part of the LSTM's input gates as attention context;
    `keys` and `key_bias`, each frame's query projection (a frame's score is ``keys . h + key_bias``);
    `readout`, each frame's part of the readout as attention context (without dropout)."""

    enc: ll.Tensor
    gates: ll.Tensor
    keys: ll.Tensor
    key_bias: ll.Tensor
    readout: ll.Tensor


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

    def encode(self, chars, *, src: ll.Dim) -> Memory:
        """The characters' encoding, and what each decoder step reads of it, projected once per frame."""
        enc, _ = self.encoder(self.dropout(self.char_emb(chars)), axis=src)
        # A step's context sum_s a_s e_s enters the LSTM as W_ctx sum_s a_s e_s = sum_s a_s (W_ctx e_s), and
        # the score of a frame is e_s . (W_q h + b_q) = (W_q^T e_s) . h + e_s . b_q: projecting the frames
        # once here leaves each step products with the attention weights instead of with the context.
        _, w_ctx = ll.split(self.cell.weight_ih_l0, axis=self.cell.in_dim)
        _, w_out = ll.split(self.readout.weight, axis=self.readout.in_dim)
        return Memory(enc, gates=ll.dot(enc, w_ctx, reduce=self.enc_dim),
                      keys=ll.dot(enc, self.query.weight, reduce=self.enc_dim),
                      key_bias=ll.dot(enc, self.query.bias, reduce=self.enc_dim),
                      readout=ll.dot(enc, w_out, reduce=self.enc_dim))

    def forward(self, chars, phonemes=None, *, src: ll.Dim, tgt: ll.Dim, beam: int = 1,
                max_len: int | None = None, threshold: float | None = None):
        memory = self.encode(chars, src=src)
        loop = decoder_loop(self.phonemes, src=src, tgt=tgt, max_len=max_len)
        loop.state.decoder = self.decoder_state(memory)
        with loop:
            log_probs, loop.state.decoder = self.decoder_step(loop.state.decoder, loop.state.label, memory,
                                                              src=src, index=loop.index)
            stacked = next_phoneme(loop, log_probs, phonemes, axis=self.phonemes, beam=beam, threshold=threshold,
                                   label_smoothing=self.config.label_smoothing)
        return result(loop, stacked)

    def decoder_state(self, memory: Memory):
        """The decoder's state before the first phoneme: the LSTM's, and what it keeps of the last step's
        attention (zeros): in training its context, else its weights (see :meth:`decoder_step`)."""
        last = ll.zeros([self.enc_dim]) if ll.is_training() else ll.zeros(memory.key_bias.dims)
        return self.cell.default_initial_state(), last

    def decoder_step(self, state, label, memory: Memory, *, src: ll.Dim, index):
        """One decoder step after `label`: ``(log-probabilities of the next phoneme, the new state)``.

        The LSTM's input is the label's embedding and the last step's attention context; the readout takes
        the new context. In training both take the context whole (with dropout on the readout's; gradients
        of a context are cheaper than of its projections). Otherwise they take it through the frames'
        projections (see :meth:`encode`): per hypothesis, a step multiplies the attention weights instead
        of the context, and keeps the weights as its state."""
        lstm, last = state
        if ll.is_training():
            h, lstm = self.cell(ll.concat(self.emb(label), last, axis=[self.emb_dim, self.enc_dim]), state=lstm)
        else:
            w_emb, _ = ll.split(self.cell.weight_ih_l0, axis=self.cell.in_dim)
            # (the embedding's projection is a table over the phonemes, made once before the loop, with the biases)
            table = ll.dot(self.emb.weight, w_emb, reduce=self.emb_dim) + self.cell.bias_ih_l0 + self.cell.bias_hh_l0
            emb_gates = ll.gather(table, index=label, axis=self.phonemes)
            h, lstm = self.cell.step_from_gates(emb_gates + ll.dot(last, memory.gates, reduce=src), state=lstm,
                                                bias=False)
        att = ll.softmax(ll.dot(memory.keys, h, reduce=self.dec_dim) + memory.key_bias, axis=src)
        if ll.is_training():
            ctx = ll.dot(att, memory.enc, reduce=src)
            logits = self.readout(self.dropout(ll.concat(h, ctx, axis=[self.dec_dim, self.enc_dim])))
            return ll.log_softmax(logits, axis=self.phonemes), (lstm, ctx)
        w_h, _ = ll.split(self.readout.weight, axis=self.readout.in_dim)
        logits = (ll.linear(h, w_h, self.readout.bias, in_dim=self.dec_dim, out_dim=self.phonemes)
                  + ll.dot(att, memory.readout, reduce=src))
        return ll.log_softmax(logits, axis=self.phonemes), (lstm, att)


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
