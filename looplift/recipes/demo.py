"""A small end-to-end example: trace a CTC model, train it a few steps on generated data.

The task is synthetic: each utterance is a random label sequence; its
"features" repeat each label's random code vector for a random number of
frames, plus noise. A model of a strided convolution, feed-forward blocks and a
linear output layer learns to transcribe it with the CTC loss.

Run it with ``looplift-demo`` (``--help`` lists the options).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

import looplift as ll
from looplift import nn


class Transcriber(ll.Module):
    """Conv1d (stride 2) -> N x (x + FeedForward(LayerNorm(x))) -> Linear to the labels (blank = 0)."""

    def __init__(self, feat: ll.Dim, labels: ll.Dim, *, model_size: int = 64, blocks: int = 2):
        super().__init__()
        self.feat, self.labels = feat, labels
        self.model = ll.Dim("model", model_size)
        self.conv = nn.Conv1d(feat, self.model, 3, stride=2)
        self.norms = torch.nn.ModuleList(nn.LayerNorm(self.model) for _ in range(blocks))
        self.blocks = torch.nn.ModuleList(nn.FeedForward(self.model, ll.Dim("hidden", 4 * model_size))
                                          for _ in range(blocks))
        self.out = nn.Linear(self.model, labels)

    def forward(self, x: ll.Tensor, *, time: ll.Dim) -> ll.Tensor:
        x = ll.relu(self.conv(x, axis=time))
        for norm, block in zip(self.norms, self.blocks):
            x = x + ll.dropout(block(norm(x)), 0.1)
        return self.out(x)

    def loss(self, x: ll.Tensor, targets: ll.Tensor, *, time: ll.Dim, target_time: ll.Dim) -> ll.Tensor:
        logits = self.forward(x, time=time)
        frames = time.ceildiv(2)
        per_seq = ll.ctc_loss(logits, targets, input_axis=frames, targets_axis=target_time, axis=self.labels, blank=0)
        return ll.mean(per_seq, axis=ll.batch_dim)


def make_batch(gen: torch.Generator, codes: torch.Tensor, batch: int, max_labels: int, noise: float):
    """Random label sequences (1..V-1) and features repeating each label's code for 4-6 frames."""
    n_labels = torch.randint(2, max_labels + 1, (batch,), generator=gen)
    labels = torch.randint(1, codes.shape[0], (batch, max_labels), generator=gen)
    seqs = []
    for b in range(batch):
        reps = torch.randint(4, 7, (int(n_labels[b]),), generator=gen)
        seqs.append(torch.repeat_interleave(codes[labels[b, :n_labels[b]]], reps, dim=0))
    frames = torch.tensor([len(s) for s in seqs])
    x = torch.zeros(batch, int(frames.max()), codes.shape[1])
    for b, s in enumerate(seqs):
        x[b, :len(s)] = s
    x += noise * torch.randn(x.shape, generator=gen)
    return x, frames, labels, n_labels


def show_greedy(model: Transcriber, dev, time_dim: ll.Dim, labels: ll.Dim, n: int = 3) -> None:
    """Print greedy CTC transcriptions of a few dev utterances next to their references."""
    best = ll.compile(lambda x: ll.argmax(model(x, time=time_dim), axis=labels), mode="eval")
    with torch.no_grad():
        out = best(dev[0])
    frames = time_dim.ceildiv(2)
    hyp = out.align(ll.batch_dim, frames)
    for b in range(n):
        path = hyp[b, :int(out.lengths[frames][b])].tolist()
        decoded = [lab for i, lab in enumerate(path) if lab != 0 and (i == 0 or lab != path[i - 1])]
        ref = dev[1].tensor[b, :int(dev[1].lengths[next(iter(dev[1].lengths))][b])].tolist()
        print(f"utterance {b}: reference {ref}  greedy CTC {decoded}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--batch", type=int, default=16, help="utterances per batch")
    parser.add_argument("--labels", type=int, default=8, help="vocabulary size, blank included")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    time_dim, target_time = ll.Dim("time"), ll.Dim("target_time")
    feat, labels = ll.Dim("feat", 16), ll.Dim("labels", args.labels)
    codes = torch.randn(args.labels, feat.size, generator=gen)
    model = Transcriber(feat, labels)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters: {', '.join(name for name, _ in model.named_parameters())}")

    train = ll.compile(model.loss, mode="train")
    evaluate = ll.compile(model.loss, mode="eval")
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)

    def inputs(batch):
        x, frames, tgt, n = batch
        return (ll.Named(x, (ll.batch_dim, time_dim, feat), {time_dim: frames}),
                ll.Named(tgt, (ll.batch_dim, target_time), {target_time: n}, sparse_dim=labels))

    dev = inputs(make_batch(gen, codes, 64, 6, 0.3))
    kw = dict(time=time_dim, target_time=target_time)
    first_dev = float(evaluate(*dev, **kw).tensor.detach())
    trace = train.trace(*inputs(make_batch(gen, codes, 2, 6, 0.3)), **kw)
    print(f"traced the training program: {trace.num_nodes} nodes in {trace.seconds * 1000:.1f} ms")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = train(*inputs(make_batch(gen, codes, args.batch, 6, 0.3)), **kw).tensor
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == 1:
            print(f"step {step:4d}  train CTC loss {loss.item():7.3f}")
    seconds = time.perf_counter() - start
    last_dev = float(evaluate(*dev, **kw).tensor.detach())
    print(f"trained {args.steps} steps in {seconds:.1f} s ({args.steps * args.batch / seconds:.0f} utterances/s)")
    print(f"dev CTC loss per utterance: {first_dev:.3f} before training, {last_dev:.3f} after")
    show_greedy(model, dev, time_dim, labels)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "transcriber.safetensors")
        ll.save(model, path)
        restored = Transcriber(feat, labels)
        ll.load(restored, path)
        again = float(ll.compile(restored.loss, mode="eval")(*dev, **kw).tensor.detach())
        print(f"checkpoint round trip: dev loss {again:.3f} from the reloaded model "
              f"({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
