"""The Transformer variant of the G2P model, defined once like the LSTM one (``model.py``).

The encoder is a stack of pre-norm Transformer layers over the characters (self-attention over all of
them, keys on ``src.alias()``). The decoder is written as a loop, one phoneme per step: each layer
attends over its own past inputs (``looplift.cum_concat``, the history so far) and over the encoding.
In training ``choice`` returns the reference phonemes and the history is the whole sequence with a
causal history dim, so the loop optimizer removes the loop altogether: the decoder runs over all target
positions at once. In search mode the same code is a beam search whose histories follow the hypotheses.

Positions are sinusoidal (``sin`` and ``cos`` of position / 10000 ** (2i / d)), from
``range_over_dim(src)`` in the encoder and ``loop.index`` in the decoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import looplift as ll
from looplift import nn

from .model import JsonConfig, decoder_loop, next_phoneme, result


@dataclass
class TransformerConfig(JsonConfig):
    """The Transformer's sizes and regularization (stored in checkpoints as JSON)."""

    n_chars: int
    n_phonemes: int
    model: int = 128          # the width of every layer
    heads: int = 4
    ff: int = 512             # the feed-forward blocks' hidden size
    layers: int = 2           # encoder layers, and as many decoder layers
    dropout: float = 0.0      # on the embeddings and every block's output
    label_smoothing: float = 0.0
    arch = "transformer"


class _Attention(ll.Module):
    """Multi-head dot-product attention of queries over the `axis` of a memory."""

    def __init__(self, model: ll.Dim, heads: ll.Dim, head: ll.Dim):
        super().__init__()
        self.model, self.heads, self.head = model, heads, head
        self.query, self.key, self.value, self.out = (nn.Linear(model, model) for _ in range(4))

    def forward(self, x, memory, *, axis: ll.Dim):
        def split(t):
            return ll.split_dims(t, self.model, [self.heads, self.head])
        q, k, v = split(self.query(x)), split(self.key(memory)), split(self.value(memory))
        weights = ll.softmax(ll.dot(q, k, reduce=self.head) * (self.head.size ** -0.5), axis=axis)
        return self.out(ll.merge_dims(ll.dot(weights, v, reduce=axis), [self.heads, self.head], out_dim=self.model))


class _Layer(ll.Module):
    """A pre-norm Transformer layer: self-attention (and, in the decoder, attention over the encoding), then
    a feed-forward block, each added to its input."""

    def __init__(self, c: TransformerConfig, model: ll.Dim, heads: ll.Dim, head: ll.Dim, ff: ll.Dim, *,
                 cross: bool):
        super().__init__()
        self.self_norm, self.self_att = nn.LayerNorm(model), _Attention(model, heads, head)
        if cross:
            self.cross_norm, self.cross_att = nn.LayerNorm(model), _Attention(model, heads, head)
        self.ff_norm, self.ff = nn.LayerNorm(model), nn.FeedForward(model, ff, dropout=c.dropout)
        self.dropout = nn.Dropout(c.dropout)

    def encode(self, x, *, keys: ll.Dim, axis: ll.Dim):
        y = self.self_norm(x)
        x = x + self.dropout(self.self_att(y, ll.replace_dim(y, axis, keys), axis=keys))
        return x + self.dropout(self.ff(self.ff_norm(x)))

    def decode_step(self, x, enc, *, src: ll.Dim):
        y = self.self_norm(x)
        past = ll.cum_concat(y)   # this layer's inputs so far (in training: all, causally)
        (history,) = [d for d in past.dims if d not in y.dims]
        x = x + self.dropout(self.self_att(y, past, axis=history))
        x = x + self.dropout(self.cross_att(self.cross_norm(x), enc, axis=src))
        return x + self.dropout(self.ff(self.ff_norm(x)))


class TransformerG2P(ll.Module):
    """The same interface as :class:`looplift.recipes.g2p.model.G2P`: ``loss = model(chars, phonemes,
    src=..., tgt=...)`` in train/eval mode, ``labels, scores, lengths, valid = model(chars, src=..., tgt=...,
    beam=k)`` in search mode."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = c = config
        if c.model % c.heads or c.model % 2:
            raise ValueError(f"the model width {c.model} must be even and a multiple of heads ({c.heads})")
        self.chars, self.phonemes = ll.Dim("chars", c.n_chars), ll.Dim("phonemes", c.n_phonemes)
        self.model_dim = ll.Dim("model", c.model)
        self.heads, self.head = ll.Dim("heads", c.heads), ll.Dim("head", c.model // c.heads)
        self.ff_dim = ll.Dim("ff", c.ff)
        self.half_sin, self.half_cos = ll.Dim("pos_sin", c.model // 2), ll.Dim("pos_cos", c.model // 2)
        self.char_emb = nn.Embedding(self.chars, self.model_dim)
        self.emb = nn.Embedding(self.phonemes, self.model_dim)
        dims = (self.model_dim, self.heads, self.head, self.ff_dim)
        self.encoder = torch.nn.ModuleList(_Layer(c, *dims, cross=False) for _ in range(c.layers))
        self.decoder = torch.nn.ModuleList(_Layer(c, *dims, cross=True) for _ in range(c.layers))
        self.enc_norm, self.dec_norm = nn.LayerNorm(self.model_dim), nn.LayerNorm(self.model_dim)
        self.readout = nn.Linear(self.model_dim, self.phonemes)
        self.dropout = nn.Dropout(c.dropout)

    def position(self, index):
        """The sinusoidal encoding of the positions `index` (int), over the model dim."""
        dtype = self.readout.weight.dtype
        i = ll.cast(ll.range_over_dim(self.half_sin), dtype)
        rate = ll.exp(i * (-2 * math.log(10000.0) / self.config.model))
        angle = ll.cast(index, dtype) * rate
        cos = ll.replace_dim(ll.cos(angle), self.half_sin, self.half_cos)
        return ll.concat(ll.sin(angle), cos, axis=[self.half_sin, self.half_cos], out_dim=self.model_dim)

    def embed(self, emb: nn.Embedding, labels, index):
        # (the embeddings start standard normal, as large as the positions' sin and cos: not scaled up)
        return self.dropout(emb(labels) + self.position(index))

    def decoder_state(self, memory):
        """None: the decoder's only memory is each layer's history (``cum_concat``), kept by the loop."""
        return None

    def decoder_step(self, state, label, enc, *, src: ll.Dim, index):
        """One decoder step after `label` at position `index`: ``(log-probabilities of the next phoneme, None)``."""
        x = self.embed(self.emb, label, index)
        for layer in self.decoder:
            x = layer.decode_step(x, enc, src=src)
        return ll.log_softmax(self.readout(self.dec_norm(x)), axis=self.phonemes), None

    def encode(self, chars, *, src: ll.Dim):
        x = self.embed(self.char_emb, chars, ll.range_over_dim(src))
        keys = src.alias()
        for layer in self.encoder:
            x = layer.encode(x, keys=keys, axis=src)
        return self.enc_norm(x)

    def forward(self, chars, phonemes=None, *, src: ll.Dim, tgt: ll.Dim, beam: int = 1,
                max_len: int | None = None, threshold: float | None = None):
        enc = self.encode(chars, src=src)
        loop = decoder_loop(self.phonemes, src=src, tgt=tgt, max_len=max_len)
        with loop:
            log_probs, _ = self.decoder_step(None, loop.state.label, enc, src=src, index=loop.index)
            stacked = next_phoneme(loop, log_probs, phonemes, axis=self.phonemes, beam=beam, threshold=threshold,
                                   label_smoothing=self.config.label_smoothing)
        return result(loop, stacked)
