"""Beam search of an attention LSTM encoder-decoder: looplift's search vs one hand-written for this model.

The model (random weights): a label-embedding + BiLSTM encoder, an LSTM decoder whose attention context
is fed back, a readout to the vocabulary; EOS (label 0) ends a hypothesis. Decoded two ways in one
process, on CPU:

* looplift: the decoder written once as a loop with ``looplift.choice``, compiled with
  ``mode="search"`` (the same module trains with ``mode="train"``);
* hand-written: a batched beam search in vectorized PyTorch for this exact model (states over
  (batch, beam), top-k over (beam x vocab), gathers by the source beams, backtracking): the floor of model
  compute plus top-k.

The n-best lists (labels, lengths, scores) are asserted identical. The last line is one JSON object:
``{"search_vs_handwritten": ratio of median times, "utterances_per_s": looplift's}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import looplift as ll
from looplift import nn

B = ll.batch_dim
EOS = 0


class Seq2Seq(ll.Module):
    def __init__(self, src_vocab: ll.Dim, vocab: ll.Dim, *, emb: int, enc: int, dec: int, beam: int, max_len: int):
        super().__init__()
        self.vocab, self.beam, self.max_len = vocab, beam, max_len
        self.src_emb_dim, self.emb_dim = ll.Dim("src_emb", emb), ll.Dim("emb", emb)
        self.enc_dim, self.dec_dim, self.att = ll.Dim("enc", enc), ll.Dim("dec", dec), ll.Dim("att", enc)
        self.src_emb = nn.Embedding(src_vocab, self.src_emb_dim)
        self.encoder = nn.LSTM(self.src_emb_dim, self.enc_dim, bidirectional=True)
        self.emb = nn.Embedding(vocab, self.emb_dim)
        self.cell = nn.LSTM(self.emb_dim + self.enc_dim, self.dec_dim)
        self.query = nn.Linear(self.dec_dim, self.enc_dim)
        self.readout = nn.Linear(self.dec_dim + self.enc_dim, vocab)

    def forward(self, src, target=None, *, src_time, tgt_time):
        enc, _ = self.encoder(self.src_emb(src), axis=src_time)
        loop = ll.Loop(axis=tgt_time, max_seq_len=self.max_len)
        loop.state.label = ll.full(EOS, sparse_dim=self.vocab)
        loop.state.lstm = self.cell.default_initial_state()
        loop.state.ctx = ll.zeros([self.enc_dim])
        with loop:
            x = ll.concat(self.emb(loop.state.label), loop.state.ctx, axis=[self.emb_dim, self.enc_dim])
            h, loop.state.lstm = self.cell(x, state=loop.state.lstm)
            att = ll.softmax(ll.dot(enc, self.query(h), reduce=self.enc_dim), axis=src_time)
            loop.state.ctx = ll.dot(att, enc, reduce=src_time)
            logits = self.readout(ll.concat(h, loop.state.ctx, axis=[self.dec_dim, self.enc_dim]))
            label = ll.choice(ll.log_softmax(logits, axis=self.vocab), target=target, beam_size=self.beam,
                              axis=self.vocab)
            loop.state.label = label
            loop.end(ll.eq(label, EOS), include_eos=True)
            labels = loop.stack(label)
        return labels, loop.search.scores, loop.search.lengths


def search_by_hand(m: Seq2Seq, src, src_len):
    """The same beam search in vectorized PyTorch: (labels (batch, beam, time), scores, lengths)."""
    w = dict(m.named_parameters())
    k, n_vocab = m.beam, m.vocab.size
    lstm = torch.nn.LSTM(m.src_emb_dim.size, m.enc_dim.size // 2, bidirectional=True, batch_first=True).double()
    lstm.load_state_dict({n[len("encoder."):]: p for n, p in w.items() if n.startswith("encoder.")})
    x = F.embedding(src, w["src_emb.weight"])
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, src_len, batch_first=True, enforce_sorted=False)
    enc, _ = torch.nn.utils.rnn.pad_packed_sequence(lstm(packed)[0], batch_first=True, total_length=src.shape[1])
    n_batch, dec = src.shape[0], m.dec_dim.size
    src_mask = (torch.arange(src.shape[1])[None, :] < src_len[:, None])[:, None, :]   # (batch, 1, src)
    keys = enc[:, None]                                                                  # (batch, 1, src, enc)
    h = torch.zeros(n_batch, k, dec, dtype=enc.dtype)
    c = torch.zeros_like(h)
    ctx = torch.zeros(n_batch, k, enc.shape[-1], dtype=enc.dtype)
    label = torch.zeros(n_batch, k, dtype=torch.long)
    score = torch.full((n_batch, k), float("-inf"), dtype=enc.dtype)
    score[:, 0] = 0.0
    ended = torch.zeros(n_batch, k, dtype=torch.bool)
    length = torch.zeros(n_batch, k, dtype=torch.long)
    eos_only = torch.full((n_vocab,), float("-inf"), dtype=enc.dtype)
    eos_only[0] = 0.0
    srcs, labels = [], []
    w_ih, w_hh = w["cell.weight_ih_l0"], w["cell.weight_hh_l0"]
    bias = w["cell.bias_ih_l0"] + w["cell.bias_hh_l0"]
    for _ in range(m.max_len):
        xin = torch.cat([F.embedding(label, w["emb.weight"]), ctx], -1)
        gates = xin @ w_ih.T + h @ w_hh.T + bias
        i, f, g, o = gates.chunk(4, -1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        q = h_new @ w["query.weight"].T + w["query.bias"]                                 # (batch, beam, enc)
        e = torch.einsum("bse,bke->bks", enc, q).masked_fill(~src_mask, float("-inf"))
        ctx_new = torch.einsum("bks,bse->bke", torch.softmax(e, -1), enc)
        logp = torch.log_softmax(torch.cat([h_new, ctx_new], -1) @ w["readout.weight"].T + w["readout.bias"], -1)
        logp = torch.where(ended[..., None], eos_only, logp)
        top, idx = (score[..., None] + logp).reshape(n_batch, -1).topk(k, -1)
        src_beam, lab = idx // n_vocab, idx % n_vocab
        ended_src = ended.gather(1, src_beam)

        def pick(new, old):
            ix = src_beam[..., None].expand(-1, -1, new.shape[-1])
            return torch.where(ended_src[..., None], old.gather(1, ix), new.gather(1, ix))

        h, c, ctx = pick(h_new, h), pick(c_new, c), pick(ctx_new, ctx)
        label = torch.where(ended_src, label.gather(1, src_beam), lab)
        length = length.gather(1, src_beam) + (~ended_src).long()
        ended = ended_src | (lab == EOS) | (top == float("-inf"))
        score = top
        srcs.append(src_beam)
        labels.append(lab)
        if bool(ended.all()):
            break
    # backtrack
    cur = torch.arange(k).expand(n_batch, k)
    out = []
    for t in range(len(labels) - 1, -1, -1):
        out.append(labels[t].gather(1, cur))
        cur = srcs[t].gather(1, cur)
    return torch.stack(out[::-1], -1), score, length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--beam", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=40)
    parser.add_argument("--source", type=int, default=30, help="source length (padded)")
    parser.add_argument("--max-len", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak", type=float, default=1.0, help="scale of the random readout weights")
    parser.add_argument("--eos-bias", type=float, default=0.0, help="added to the readout bias of EOS")
    args = parser.parse_args()
    torch.manual_seed(0)
    src_time, tgt_time = ll.Dim("src_time"), ll.Dim("tgt_time")
    vocab, src_vocab = ll.Dim("vocab", args.vocab), ll.Dim("src_vocab", 30)
    model = Seq2Seq(src_vocab, vocab, emb=64, enc=256, dec=256, beam=args.beam, max_len=args.max_len).double()
    # a peaked readout with a bias towards EOS, so hypotheses end at various lengths as a trained model's do
    with torch.no_grad():
        model.readout.weight.mul_(args.peak)
        model.readout.bias[EOS] += args.eos_bias
    src = torch.randint(0, 30, (args.batch, args.source))
    src_len = torch.randint(args.source // 2, args.source + 1, (args.batch,))
    src_len[0] = args.source
    prog = ll.compile(model, mode="search")
    inputs = ll.Named(src, (B, src_time), {src_time: src_len}, sparse_dim=src_vocab)

    def by_looplift():
        with torch.no_grad():
            return prog(inputs, src_time=src_time, tgt_time=tgt_time)

    def by_hand():
        with torch.no_grad():
            return search_by_hand(model, src, src_len)

    labels, scores, lengths = by_looplift()
    beam = next(d for d in scores.dims if d is not B)
    axis = next(d for d in labels.dims if d not in (B, beam))
    lab, sc, ln = labels.align(B, beam, axis), scores.align(B, beam), lengths.align(B, beam)
    h_lab, h_sc, h_ln = by_hand()
    assert torch.equal(ln, h_ln), (ln, h_ln)
    for b in range(args.batch):
        for k in range(args.beam):
            n = int(ln[b, k])
            assert torch.equal(lab[b, k, :n], h_lab[b, k, :n]), (b, k)
    torch.testing.assert_close(sc, h_sc, rtol=1e-9, atol=1e-9)
    print(f"n-best identical; mean hypothesis length {float(ln.double().mean()):.1f}, "
          f"steps {lab.shape[-1]}")
    times = {"looplift": [], "handwritten": []}
    fns = {"looplift": by_looplift, "handwritten": by_hand}
    for _ in range(args.warmup):
        for fn in fns.values():
            fn()
    for _ in range(args.repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"median search time, batch {args.batch}, beam {args.beam}: looplift {med['looplift'] * 1e3:.1f} ms, "
          f"hand-written {med['handwritten'] * 1e3:.1f} ms")
    print(json.dumps({"search_vs_handwritten": round(med["looplift"] / med["handwritten"], 3),
                      "utterances_per_s": round(args.batch / med["looplift"], 1)}))


if __name__ == "__main__":
    main()
