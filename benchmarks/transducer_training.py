"""Training step of the seeds' transducer: written once as a looplift loop, optimized, step by step, and by hand.

The model (DESIGN.md §9): a 2-layer BiLSTM encoder (256 per direction) over 40-dim features; a loop over the
alignment steps with a position state ``t`` (advanced on blanks), the encoder frame gathered at ``t``, a slow
label LSTM (embedding 128, LSTM 256) under ``MaskedComputation(mask=previous label != blank)``, a fast
feed-forward network (256) on frame and slow output, a readout over 40 labels + blank and the cross entropy of
the alignment's label (``choice`` in train mode). Batch 32, 100 frames (lengths 50-100), 20-40 labels per
utterance (about 130 alignment steps). Trained (forward + backward) three ways with the same weights:

* optimized: the looplift program as compiled; the loop is gone: the position is a cumulative sum, the slow
  LSTM one fused call over the label frames T', the rest over the whole alignment;
* reference: the same program run literally, step by step (``Program.reference``);
* hand-written: the same model in plain PyTorch as a careful user writes it: ``torch.nn.LSTM`` encoder, the
  slow LSTM with ``torch.nn.LSTM`` over each utterance's labels only (packed), its outputs brought to the
  alignment steps by index, positions by a cumulative sum, the frames by ``gather``.

Losses and gradients of the three are asserted equal. The last line is one JSON object:
``{"transducer_optimized_vs_handwritten": ..., "transducer_reference_vs_optimized": ...}``: the medians over
rounds of the ratio of step times within a round (each round runs each way once, the order reversed every
other round, so the machine's drift cancels); the goal for the first is <= 1.10.

Run: ``python benchmarks/transducer_training.py [--batch 32 --frames 100 --repeats 11]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import looplift as ll
from looplift import nn

B = ll.batch_dim
BLANK = 0


class SeedTransducer(ll.Module):
    def __init__(self, feat: ll.Dim, vocab: ll.Dim, *, enc: int = 256, emb: int = 128, slow: int = 256,
                 fast: int = 256):
        super().__init__()
        self.vocab = vocab
        self.enc_dim, self.emb = ll.Dim("enc", 2 * enc), ll.Dim("emb", emb)   # (both directions)
        self.slow_dim, self.fast = ll.Dim("slow", slow), ll.Dim("fast", fast)
        self.encoder = nn.LSTM(feat, self.enc_dim, bidirectional=True, num_layers=2)
        self.embed = nn.Embedding(vocab, self.emb)
        self.slow = nn.LSTM(self.emb, self.slow_dim)
        self.from_enc = nn.Linear(self.encoder.out_dim, self.fast)
        self.from_slow = nn.Linear(self.slow_dim, self.fast)
        self.readout = nn.Linear(self.fast, vocab)

    def forward(self, x, alignment, *, time, align):
        enc, _ = self.encoder(x, axis=time)
        loop = ll.Loop(axis=align, max_seq_len=3 * ll.length(time))
        loop.state.t = ll.zeros([], dtype="int64")
        loop.state.label = ll.full(BLANK, sparse_dim=self.vocab)
        loop.state.slow = self.slow.default_initial_state()
        with loop:
            frame = ll.gather(enc, index=loop.state.t, axis=time)
            with ll.MaskedComputation(mask=loop.state.label != BLANK):
                slow, loop.state.slow = self.slow(self.embed(loop.state.label), state=loop.state.slow)
            logits = self.readout(ll.tanh(self.from_enc(frame) + self.from_slow(slow)))
            loop.state.label = ll.choice(logits, target=alignment, beam_size=8, score_type="logits")
            ce = loop.stack(ll.cross_entropy(logits, loop.state.label, axis=self.vocab))
            loop.state.t = loop.state.t + ll.cast(loop.state.label == BLANK, "int64")
            loop.end(loop.state.t >= ll.length(time), include_eos=True)
        return ll.sum(ce, axis=[align, B])


def by_hand(m: SeedTransducer, x, x_len, align, align_len):
    """The same model in plain PyTorch over whole sequences."""
    w = dict(m.named_parameters())
    enc_lstm = torch.nn.LSTM(x.shape[-1], m.enc_dim.size // 2, num_layers=2, bidirectional=True, batch_first=True)
    slow_lstm = torch.nn.LSTM(m.emb.size, m.slow_dim.size, batch_first=True)
    # the looplift modules' parameters, shared (torch.nn.LSTM's names)
    enc_params = {k.removeprefix("encoder."): v for k, v in w.items() if k.startswith("encoder.")}
    slow_params = {k.removeprefix("slow."): v for k, v in w.items() if k.startswith("slow.")}
    enc = torch.func.functional_call(enc_lstm, enc_params, (pack_padded_sequence(
        x, x_len, batch_first=True, enforce_sorted=False),))[0]
    enc = pad_packed_sequence(enc, batch_first=True, total_length=x.shape[1])[0]
    steps = align.shape[1]
    valid = torch.arange(steps)[None, :] < align_len[:, None]
    blank = (align == BLANK) & valid
    label = (align != BLANK) & valid
    # the position and the number of labels before each step (exclusive cumulative sums)
    t = (blank.long().cumsum(1) - blank.long()).clamp(max=x.shape[1] - 1)
    k = label.long().cumsum(1) - label.long()
    frames = enc.gather(1, t[:, :, None].expand(-1, -1, enc.shape[-1]))
    # the slow LSTM over each utterance's labels only
    n_labels = label.sum(1)
    order = torch.argsort((~label).to(torch.int8), dim=1, stable=True)[:, :max(int(n_labels.max()), 1)]
    labels = align.gather(1, order)
    emb = F.embedding(labels, w["embed.weight"])
    packed = pack_padded_sequence(emb, n_labels.clamp(min=1), batch_first=True, enforce_sorted=False)
    slow = pad_packed_sequence(torch.func.functional_call(slow_lstm, slow_params, (packed,))[0],
                               batch_first=True, total_length=emb.shape[1])[0]
    slow = torch.cat([slow.new_zeros(slow.shape[0], 1, slow.shape[2]), slow], 1)   # zeros before the first
    slow = slow.gather(1, k[:, :, None].expand(-1, -1, slow.shape[-1]))
    fast = torch.tanh(F.linear(frames, w["from_enc.weight"], w["from_enc.bias"])
                      + F.linear(slow, w["from_slow.weight"], w["from_slow.bias"]))
    logits = F.linear(fast, w["readout.weight"], w["readout.bias"])
    ce = F.cross_entropy(logits.transpose(1, 2), align, reduction="none")
    return (ce * valid).sum()


def data(args, vocab: int):
    g = torch.Generator().manual_seed(0)
    x_len = torch.randint(args.frames // 2, args.frames + 1, (args.batch,), generator=g)
    x_len[0] = args.frames
    n_labels = torch.randint(20, 41, (args.batch,), generator=g)
    alignments = []
    for t, u in zip(x_len.tolist(), n_labels.tolist()):
        symbols = torch.cat([torch.zeros(t - 1, dtype=torch.long), torch.randint(1, vocab, (u,), generator=g)])
        alignments.append(torch.cat([symbols[torch.randperm(len(symbols), generator=g)], torch.zeros(1).long()]))
    align_len = torch.tensor([len(a) for a in alignments])
    align = torch.zeros(args.batch, int(align_len.max()), dtype=torch.long)
    for b, a in enumerate(alignments):
        align[b, :len(a)] = a
    x = torch.randn(args.batch, args.frames, args.feat, generator=g)
    return x, x_len, align, align_len


def timed(fns: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Forward + backward times per function, `repeats` rounds after `warmup` untimed ones; in each round
    every function runs once, the order reversed every other round (so drift hits all alike)."""
    times = {k: [] for k in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn().backward()
    for r in range(repeats):
        for name in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            start = time.perf_counter()
            fns[name]().backward()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--feat", type=int, default=40)
    parser.add_argument("--labels", type=int, default=40, help="labels besides the blank")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reference-repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    time_dim, align_dim = ll.Dim("time"), ll.Dim("align")
    feat, vocab = ll.Dim("feat", args.feat), ll.Dim("vocab", args.labels + 1)
    model = SeedTransducer(feat, vocab)
    x, x_len, align, align_len = data(args, vocab.size)
    inputs = (ll.Named(x, (B, time_dim, feat), {time_dim: x_len}),
              ll.Named(align, (B, align_dim), {align_dim: align_len}, sparse_dim=vocab))
    kw = dict(time=time_dim, align=align_dim)
    prog = ll.compile(model, mode="train")
    fns = {"optimized": lambda: prog(*inputs, **kw).tensor,
           "reference": lambda: prog.reference(*inputs, **kw).tensor,
           "handwritten": lambda: by_hand(model, x, x_len, align, align_len)}
    params = list(model.parameters())
    grads = {}
    for name, fn in fns.items():
        loss = fn()
        grads[name] = (loss.item(), torch.autograd.grad(loss, params))
    for name in ("optimized", "reference"):
        assert abs(grads[name][0] - grads["handwritten"][0]) <= 1e-4 * abs(grads["handwritten"][0]), grads
        for g, h in zip(grads[name][1], grads["handwritten"][1]):
            torch.testing.assert_close(g, h, rtol=1e-3, atol=1e-4)
    print(prog.explain())
    print(f"alignment steps: {int(align_len.min())}-{int(align_len.max())}, frames {int(x_len.min())}-"
          f"{int(x_len.max())}; losses and gradients equal (optimized, reference, hand-written)")
    paired = timed({k: v for k, v in fns.items() if k != "reference"}, args.repeats, args.warmup)
    reference = timed({"reference": fns["reference"], "optimized": fns["optimized"]}, args.reference_repeats, 0)
    med = {k: statistics.median(v) for k, v in {**paired, "reference": reference["reference"]}.items()}
    print(f"median step: optimized {med['optimized'] * 1e3:.1f} ms, reference {med['reference'] * 1e3:.1f} ms, "
          f"hand-written {med['handwritten'] * 1e3:.1f} ms")
    # the ratios: medians over rounds of the ratio within a round (the machine's drift cancels in each)
    vs_hand = statistics.median(o / h for o, h in zip(paired["optimized"], paired["handwritten"]))
    ref_vs = statistics.median(r / o for r, o in zip(reference["reference"], reference["optimized"]))
    print(json.dumps({"transducer_optimized_vs_handwritten": round(vs_hand, 3),
                      "transducer_reference_vs_optimized": round(ref_vs, 3)}))


if __name__ == "__main__":
    main()
