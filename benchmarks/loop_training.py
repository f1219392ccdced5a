"""Training step of decoders written once as a looplift loop: optimized, step by step, and by hand.

Each model is trained three ways in one process with the same weights:

* optimized: the looplift program as compiled (the loop optimizer moves out what does not depend
  on the previous step);
* reference: the same program run literally, step by step (``Program.reference``);
* hand-written: the same model written by hand in vectorized PyTorch.

With ``--backend``, the optimized program is also handed to ``torch.compile`` (``looplift.compile(...,
backend=...)``); its first call, which compiles, is timed apart. With ``--unfused-attention``, the
optimized program is also timed with its attention run as the ops it is written with (not as one call of
``scaled_dot_product_attention``, as the executor runs it: ``looplift.runtime.attention``), in the same
rounds.

Models (``--models``):

* ``aed``: an attention encoder-decoder over characters (BiLSTM encoder; LSTM decoder whose attention
  context is fed back; label embedding, readout, cross entropy); forward + backward;
* ``transformer``: a step-wise Transformer decoder (self-attention over the history with ``cum_concat``,
  cross-attention, feed-forward; 2 layers) over given encoder frames; forward + backward;
* ``speech_aed``: a small recognizer: a BiLSTM encoder (128 per direction) over 16-dim features (20
  frames), an LSTM decoder (256, embedding 64) with dot attention and its context fed back, a readout
  layer (256) to 40 classes; forward + backward + Adam;
* ``speech_transformer``: the same encoder under a 2-layer step-wise Transformer decoder (d 128, 4
  heads, feed-forward 512); forward + backward + Adam.

The losses of the three ways are asserted equal, and for the speech models every parameter's gradient
too. The last line is one JSON object with the ratios of step times: optimized vs hand-written is the
median over rounds of the two times in the same round (the order alternating); reference vs optimized is
the ratio of the medians.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F

import looplift as ll
import looplift.runtime.executor as _executor
from looplift import nn

B = ll.batch_dim


MODELS = ["aed", "transformer", "speech_aed", "speech_transformer"]


# -- attention encoder-decoder -------------------------------------------------------------------------

class AED(ll.Module):
    def __init__(self, src_vocab: ll.Dim, vocab: ll.Dim, *, emb: int = 64, enc: int = 256, dec: int = 256,
                 att: int = 256):
        super().__init__()
        self.vocab = vocab
        self.emb, self.enc = ll.Dim("emb", emb), ll.Dim("enc", enc)
        self.dec, self.att = ll.Dim("dec", dec), ll.Dim("att", att)
        self.src_emb = nn.Embedding(src_vocab, self.emb)
        self.encoder = nn.LSTM(self.emb, self.enc, bidirectional=True)
        self.tgt_emb = nn.Embedding(vocab, self.emb)
        self.decoder = nn.LSTM(self.emb + self.enc, self.dec)
        self.query = nn.Linear(self.dec, self.att, with_bias=False)
        self.key = nn.Linear(self.enc, self.att, with_bias=False)
        self.readout = nn.Linear(self.dec + self.enc, vocab)

    def forward(self, src, tgt, *, src_time, tgt_time):
        enc, _ = self.encoder(self.src_emb(src), axis=src_time)
        keys = self.key(enc)
        loop = ll.Loop(axis=tgt_time)
        loop.state.label = ll.full(0, sparse_dim=self.vocab)  # BOS
        loop.state.dec = self.decoder.default_initial_state()
        loop.state.ctx = ll.zeros([self.enc])
        with loop:
            x = ll.concat(self.tgt_emb(loop.state.label), loop.state.ctx)
            h, loop.state.dec = self.decoder(x, state=loop.state.dec)
            weights = ll.softmax(ll.dot(self.query(h), keys, reduce=self.att), axis=src_time)
            loop.state.ctx = ll.dot(weights, enc, reduce=src_time)
            logits = self.readout(ll.concat(h, loop.state.ctx))
            target = loop.unstack(tgt)
            ce = loop.stack(ll.cross_entropy(logits, target, axis=self.vocab))
            loop.state.label = target
        return ll.sum(ce, axis=[B, tgt_time])


def aed_by_hand(m: AED, src, src_len, tgt, tgt_len):
    """The AED in vectorized PyTorch: embeddings and readout over whole sequences, the core per step."""
    w = dict(m.named_parameters())
    enc = _bilstm_by_hand(w, "encoder", F.embedding(src, w["src_emb.weight"]), src_len, m.enc.size // 2)
    hidden = _attention_loop_by_hand(w, enc, enc @ w["key.weight"].T, src_len, tgt, m.dec.size)
    return _cross_entropy_by_hand(hidden @ w["readout.weight"].T + w["readout.bias"], tgt, tgt_len)


def _attention_loop_by_hand(w: dict, enc, keys, src_len, tgt, dec: int):
    """The decoder loop of the attention models by hand: per step an LSTM cell over the previous label's
    embedding and the context, a query (``query``) scoring `keys`, the context over `enc`. Returns the LSTM
    outputs and contexts of all steps concatenated, over (batch, step, dec + enc)."""
    src_mask = torch.arange(enc.shape[1])[None, :] < src_len[:, None]
    prev = torch.cat([torch.zeros_like(tgt[:, :1]), tgt[:, :-1]], 1)
    prev_emb = F.embedding(prev, w["tgt_emb.weight"])
    n_batch, steps = tgt.shape
    h = torch.zeros(n_batch, dec)
    c = torch.zeros(n_batch, dec)
    ctx = torch.zeros(n_batch, enc.shape[-1])
    hs, ctxs = [], []
    for t in range(steps):
        h, c = torch.lstm_cell(torch.cat([prev_emb[:, t], ctx], -1), (h, c), w["decoder.weight_ih_l0"],
                               w["decoder.weight_hh_l0"], w["decoder.bias_ih_l0"], w["decoder.bias_hh_l0"])
        q = h @ w["query.weight"].T
        scores = torch.bmm(keys, q[:, :, None])[:, :, 0].masked_fill(~src_mask, float("-inf"))
        ctx = torch.bmm(torch.softmax(scores, -1)[:, None, :], enc)[:, 0]
        hs.append(h)
        ctxs.append(ctx)
    return torch.cat([torch.stack(hs, 1), torch.stack(ctxs, 1)], -1)


def _cross_entropy_by_hand(logits, tgt, tgt_len):
    """The cross entropy of each target step, summed over the valid ones."""
    ce = F.cross_entropy(logits.transpose(1, 2), tgt, reduction="none")
    return (ce * (torch.arange(tgt.shape[1])[None, :] < tgt_len[:, None])).sum()


# -- step-wise Transformer decoder -----------------------------------------------------------------------

class TransformerDecoder(ll.Module):
    def __init__(self, vocab: ll.Dim, *, model: int = 256, heads: int = 4, ff: int = 1024, layers: int = 2):
        super().__init__()
        self.vocab, self.model = vocab, ll.Dim("model", model)
        self.heads, self.head = ll.Dim("heads", heads), ll.Dim("head", model // heads)
        self.emb = nn.Embedding(vocab, self.model)
        self.layers = torch.nn.ModuleList(_Layer(self.model, self.heads, self.head, ll.Dim("ff", ff))
                                          for _ in range(layers))
        self.norm = nn.LayerNorm(self.model)
        self.readout = nn.Linear(self.model, vocab)

    def forward(self, enc, tgt, *, src_time, tgt_time):
        loop = ll.Loop(axis=tgt_time)
        loop.state.label = ll.full(0, sparse_dim=self.vocab)
        with loop:
            x = self.emb(loop.state.label)
            for layer in self.layers:
                x = layer(x, enc, src_time)
            logits = self.readout(self.norm(x))
            target = loop.unstack(tgt)
            ce = loop.stack(ll.cross_entropy(logits, target, axis=self.vocab))
            loop.state.label = target
        return ll.sum(ce, axis=[B, tgt_time])


class _Layer(ll.Module):
    def __init__(self, model, heads, head, ff):
        super().__init__()
        self.model, self.heads, self.head = model, heads, head
        inner = heads * head
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(model), nn.LayerNorm(model), nn.LayerNorm(model)
        self.q1, self.k1, self.v1 = (nn.Linear(model, inner) for _ in range(3))
        self.o1 = nn.Linear(inner, model)
        self.q2, self.k2, self.v2 = (nn.Linear(model, inner) for _ in range(3))
        self.o2 = nn.Linear(inner, model)
        self.ff = nn.FeedForward(model, ff)

    def _split(self, x):
        return ll.split_dims(x, axis=self.heads * self.head, dims=[self.heads, self.head])

    def _attend(self, q, k, v, axis):
        scores = ll.dot(self._split(q), self._split(k), reduce=self.head) * (1.0 / math.sqrt(self.head.size))
        ctx = ll.dot(ll.softmax(scores, axis=axis), self._split(v), reduce=axis)
        return ll.merge_dims(ctx, dims=[self.heads, self.head])

    def forward(self, x, enc, src_time):
        h = self.norm1(x)
        keys, values = ll.cum_concat(self.k1(h)), ll.cum_concat(self.v1(h))  # the step's key and value appended
        x = x + self.o1(self._attend(self.q1(h), keys, values, keys.dims[0]))
        h = self.norm2(x)
        x = x + self.o2(self._attend(self.q2(h), self.k2(enc), self.v2(enc), src_time))
        return x + self.ff(self.norm3(x))


def transformer_by_hand(m: TransformerDecoder, enc, src_len, tgt, tgt_len):
    """The same decoder in vectorized PyTorch over the whole target sequence, with a causal mask."""
    w = dict(m.named_parameters())
    n_batch, steps = tgt.shape
    heads, head = m.heads.size, m.head.size
    prev = torch.cat([torch.zeros_like(tgt[:, :1]), tgt[:, :-1]], 1)
    x = F.embedding(prev, w["emb.weight"])
    causal = torch.ones(steps, steps, dtype=torch.bool).tril()
    src_mask = (torch.arange(enc.shape[1])[None, :] < src_len[:, None])[:, None, None, :]

    def lin(v, name):
        return F.linear(v, w[f"{name}.weight"], w[f"{name}.bias"])

    def split(v):
        return v.view(v.shape[0], v.shape[1], heads, head).transpose(1, 2)

    def attend(q, k, v, mask):
        s = split(q) @ split(k).transpose(-1, -2) / math.sqrt(head)
        ctx = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ split(v)
        return ctx.transpose(1, 2).reshape(q.shape[0], q.shape[1], heads * head)

    def norm(v, name):
        return F.layer_norm(v, (v.shape[-1],), w[f"{name}.weight"], w[f"{name}.bias"])

    for i in range(len(m.layers)):
        p = f"layers.{i}"
        h = norm(x, f"{p}.norm1")
        x = x + lin(attend(lin(h, f"{p}.q1"), lin(h, f"{p}.k1"), lin(h, f"{p}.v1"), causal), f"{p}.o1")
        h = norm(x, f"{p}.norm2")
        x = x + lin(attend(lin(h, f"{p}.q2"), lin(enc, f"{p}.k2"), lin(enc, f"{p}.v2"), src_mask), f"{p}.o2")
        h = norm(x, f"{p}.norm3")
        x = x + lin(torch.relu(lin(h, f"{p}.ff.up")), f"{p}.ff.down")
    x = F.layer_norm(x, (x.shape[-1],), w["norm.weight"], w["norm.bias"])
    logits = lin(x, "readout")
    ce = F.cross_entropy(logits.transpose(1, 2), tgt, reduction="none")
    return (ce * (torch.arange(steps)[None, :] < tgt_len[:, None])).sum()


# -- a small speech recognizer's two decoders over one encoder, trained with Adam ----------------------------

def _bilstm_by_hand(w: dict, prefix: str, x, lengths, hidden: int):
    """A one-layer bidirectional LSTM over a padded batch-first `x` (packed by `lengths`), padded output."""
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    flat = [w[f"{prefix}.{n}"] for n in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0",
                                         "weight_ih_l0_reverse", "weight_hh_l0_reverse", "bias_ih_l0_reverse",
                                         "bias_hh_l0_reverse")]
    h0 = torch.zeros(2, x.shape[0], hidden)
    out, _, _ = torch._VF.lstm(packed.data, packed.batch_sizes, (h0, h0), flat, True, 1, 0.0, True, True)
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(
        type(packed)(out, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices),
        batch_first=True, total_length=x.shape[1])
    return out


class SpeechAED(ll.Module):
    """A BiLSTM encoder (128 per direction) over feature frames; an LSTM decoder (256; the label's embedding
    (64) and the attention context fed back); dot attention of a query (the decoder state, projected) over
    the encoder frames; a readout layer (256, tanh) to the classes."""

    def __init__(self, feat: ll.Dim, vocab: ll.Dim, *, enc: int = 256, dec: int = 256, emb: int = 64,
                 readout: int = 256):
        super().__init__()
        self.vocab = vocab
        self.enc, self.dec = ll.Dim("enc", enc), ll.Dim("dec", dec)
        self.emb, self.hidden = ll.Dim("emb", emb), ll.Dim("readout", readout)
        self.encoder = nn.LSTM(feat, self.enc, bidirectional=True)
        self.tgt_emb = nn.Embedding(vocab, self.emb)
        self.decoder = nn.LSTM(self.emb + self.enc, self.dec)
        self.query = nn.Linear(self.dec, self.enc, with_bias=False)
        self.pre = nn.Linear(self.dec + self.enc, self.hidden)
        self.out = nn.Linear(self.hidden, vocab)

    def forward(self, feats, tgt, *, src_time, tgt_time):
        enc, _ = self.encoder(feats, axis=src_time)
        loop = ll.Loop(axis=tgt_time)
        loop.state.label = ll.full(0, sparse_dim=self.vocab)
        loop.state.dec = self.decoder.default_initial_state()
        loop.state.ctx = ll.zeros([self.enc])
        with loop:
            x = ll.concat(self.tgt_emb(loop.state.label), loop.state.ctx)
            h, loop.state.dec = self.decoder(x, state=loop.state.dec)
            weights = ll.softmax(ll.dot(self.query(h), enc, reduce=self.enc), axis=src_time)
            loop.state.ctx = ll.dot(weights, enc, reduce=src_time)
            logits = self.out(ll.tanh(self.pre(ll.concat(h, loop.state.ctx))))
            target = loop.unstack(tgt)
            ce = loop.stack(ll.cross_entropy(logits, target, axis=self.vocab))
            loop.state.label = target
        return ll.sum(ce, axis=[B, tgt_time])


def speech_aed_by_hand(m: SpeechAED, feats, src_len, tgt, tgt_len):
    w = dict(m.named_parameters())
    enc = _bilstm_by_hand(w, "encoder", feats, src_len, m.enc.size // 2)
    hidden = torch.tanh(F.linear(_attention_loop_by_hand(w, enc, enc, src_len, tgt, m.dec.size), w["pre.weight"],
                                 w["pre.bias"]))
    return _cross_entropy_by_hand(F.linear(hidden, w["out.weight"], w["out.bias"]), tgt, tgt_len)


class SpeechTransformer(ll.Module):
    """The same BiLSTM encoder, projected to the model width, under a 2-layer step-wise Transformer decoder
    (d 128, 4 heads, feed-forward 512)."""

    def __init__(self, feat: ll.Dim, vocab: ll.Dim, *, enc: int = 256, model: int = 128, heads: int = 4,
                 ff: int = 512, layers: int = 2):
        super().__init__()
        self.enc = ll.Dim("enc", enc)
        self.encoder = nn.LSTM(feat, self.enc, bidirectional=True)
        self.decoder = TransformerDecoder(vocab, model=model, heads=heads, ff=ff, layers=layers)
        self.proj = nn.Linear(self.enc, self.decoder.model)

    def forward(self, feats, tgt, *, src_time, tgt_time):
        enc, _ = self.encoder(feats, axis=src_time)
        return self.decoder(self.proj(enc), tgt, src_time=src_time, tgt_time=tgt_time)


def speech_transformer_by_hand(m: SpeechTransformer, feats, src_len, tgt, tgt_len):
    w = dict(m.named_parameters())
    enc = _bilstm_by_hand(w, "encoder", feats, src_len, m.enc.size // 2)
    return transformer_by_hand(m.decoder, F.linear(enc, w["proj.weight"], w["proj.bias"]), src_len, tgt, tgt_len)


# -- timing ------------------------------------------------------------------------------------------------

def _time(fns: dict, repeats: int, warmup: int = 0, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Times of forward + backward (and the `optimizer`'s step) per function, one list per function, in
    rounds that run each function once, in turn, the order reversed every other round (so neither runs
    always first after the other); the first `warmup` rounds are not timed (the allocator and caches settle
    after the first steps, as they do early in a training run)."""
    times = {k: [] for k in fns}

    def train_step(fn):
        fn().backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        for fn in fns.values():
            train_step(fn)
    for i in range(repeats):
        for name, fn in (list(fns.items()) if i % 2 == 0 else list(fns.items())[::-1]):
            start = time.perf_counter()
            train_step(fn)
            times[name].append(time.perf_counter() - start)
    return times


def _paired_ratio(a: list, b: list) -> float:
    """The median over rounds of `a`'s time over `b`'s in the same round: a burst of load on this machine
    slows both runs of a round alike, so it cancels, where a ratio of two medians keeps it."""
    return statistics.median(x / y for x, y in zip(a, b))


def _gradients(model: ll.Module, fn) -> dict:
    model.zero_grad(set_to_none=True)
    fn().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def _compare(name: str, model: ll.Module, inputs: tuple, kw: dict, by_hand, args, *, adam: bool = False) -> dict:
    """Time `model` optimized, step by step and by hand (asserting equal losses, and with `adam` equal
    gradients, timing Adam's step too); the two ratios."""
    prog = ll.compile(model, mode="train", backend=args.backend, steps_per_call=args.steps_per_call)
    fns = {"optimized": lambda: prog(*inputs, **kw).tensor,
           "reference": lambda: prog.reference(*inputs, **kw).tensor,
           "handwritten": by_hand}
    start = time.perf_counter()
    losses = {"optimized": float(fns["optimized"]().detach())}
    first_call = time.perf_counter() - start   # (tracing, optimizing, and with --backend compiling)
    if args.unfused_attention:
        # the same program with its attention run as the ops it is written with (the executor finds none to
        # fuse as it is built, on the first call), timed in the same rounds
        unfused = ll.compile(model, mode="train", backend=args.backend, steps_per_call=args.steps_per_call)
        with mock.patch.object(_executor, "find_attention", lambda *a: []):
            losses["unfused"] = float(unfused(*inputs, **kw).tensor.detach())
        fns["unfused"] = lambda: unfused(*inputs, **kw).tensor
    losses.update({k: float(f().detach()) for k, f in fns.items() if k != "optimized"})
    assert all(math.isclose(v, losses["handwritten"], rel_tol=1e-4) for v in losses.values()), losses
    optimizer = None
    if adam:
        want = _gradients(model, by_hand)
        for k in ("optimized", "reference"):
            for n, g in _gradients(model, fns[k]).items():
                # (the floor of 1e-6: a gradient that is zero in exact arithmetic, as the keys' bias's in
                # attention, whose row of scores it shifts as a whole, is float rounding of about 1e-7)
                torch.testing.assert_close(g, want[n], rtol=1e-3, atol=1e-4 * float(want[n].abs().max()) + 1e-6,
                                           msg=lambda m, n=n, k=k: f"{name}: gradient of {n} ({k}): {m}")
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    print(prog.explain())
    times = _time({k: v for k, v in fns.items() if k != "reference"}, args.repeats, args.warmup, optimizer)
    times.update(_time({"reference": fns["reference"]}, args.reference_repeats, optimizer=optimizer))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{name}: loss {losses['optimized']:.4f}; median step: optimized {med['optimized'] * 1e3:.1f} ms, "
          f"reference {med['reference'] * 1e3:.1f} ms, hand-written {med['handwritten'] * 1e3:.1f} ms; "
          f"first call {first_call:.1f} s")
    result = {f"{name}_optimized_vs_handwritten": _paired_ratio(times["optimized"], times["handwritten"]),
              f"{name}_reference_vs_optimized": med["reference"] / med["optimized"]}
    if "unfused" in times:
        result[f"{name}_unfused_attention_vs_handwritten"] = _paired_ratio(times["unfused"], times["handwritten"])
    if args.backend is not None:
        result[f"{name}_first_call_s"] = first_call
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--target", type=int, default=64, help="target length (padded)")
    parser.add_argument("--source", type=int, default=50, help="source length (padded)")
    parser.add_argument("--vocab", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds before timing")
    parser.add_argument("--reference-repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS,
                        help="which models (speech_*: 16-dim features, encoder length --frames, with Adam)")
    parser.add_argument("--frames", type=int, default=20, help="encoder length of the speech models (padded)")
    parser.add_argument("--backend", default=None,
                        help="compile the optimized program with this torch.compile backend (e.g. inductor); "
                             "the first call's time then includes compiling")
    parser.add_argument("--steps-per-call", type=int, default=8,
                        help="with --backend: a loop's compiled steps per call (looplift.compile's steps_per_call)")
    parser.add_argument("--unfused-attention", action="store_true",
                        help="also time each program with its attention unfused (the ops as written, not one "
                             "scaled_dot_product_attention call), in the same rounds")
    args = parser.parse_args()
    torch.manual_seed(0)
    src_time, tgt_time = ll.Dim("src_time"), ll.Dim("tgt_time")
    vocab, src_vocab = ll.Dim("vocab", args.vocab), ll.Dim("src_vocab", 30)
    src = torch.randint(0, 30, (args.batch, args.source))
    src_len = torch.randint(args.source // 2, args.source + 1, (args.batch,))
    src_len[0] = args.source
    tgt = torch.randint(1, args.vocab, (args.batch, args.target))
    tgt_len = torch.randint(args.target // 2, args.target + 1, (args.batch,))
    tgt_len[0] = args.target
    results = {}

    kw = dict(src_time=src_time, tgt_time=tgt_time)
    targets = ll.Named(tgt, (B, tgt_time), {tgt_time: tgt_len}, sparse_dim=vocab)
    if "aed" in args.models:
        aed = AED(src_vocab, vocab)
        results.update(_compare("aed", aed, (
            ll.Named(src, (B, src_time), {src_time: src_len}, sparse_dim=src_vocab), targets), kw,
            lambda: aed_by_hand(aed, src, src_len, tgt, tgt_len), args))
    if "transformer" in args.models:
        dec = TransformerDecoder(vocab)
        enc = torch.randn(args.batch, args.source, dec.model.size)
        results.update(_compare("transformer", dec, (
            ll.Named(enc, (B, src_time, dec.model), {src_time: src_len}), targets), kw,
            lambda: transformer_by_hand(dec, enc, src_len, tgt, tgt_len), args))
    feat = ll.Dim("feat", 16)
    feats = torch.randn(args.batch, args.frames, feat.size)
    frames = torch.randint(args.frames // 2, args.frames + 1, (args.batch,))
    frames[0] = args.frames
    speech_inputs = (ll.Named(feats, (B, src_time, feat), {src_time: frames}), targets)
    for name, cls, by_hand in (("speech_aed", SpeechAED, speech_aed_by_hand),
                               ("speech_transformer", SpeechTransformer, speech_transformer_by_hand)):
        if name in args.models:
            model = cls(feat, vocab)
            results.update(_compare(name, model, speech_inputs, kw,
                                    lambda m=model, f=by_hand: f(m, feats, frames, tgt, tgt_len), args, adam=True))
    print(json.dumps({k: round(v, 3) for k, v in results.items()}))


if __name__ == "__main__":
    main()
