"""What one step of a looplift loop costs: the loop run step by step, and optimized, vs a hand-written loop.

An LSTM decoder-style loop (LSTMCell step + linear readout + cross entropy per step) over a padded
batch, forward + backward, written once as a ``looplift.Loop`` and once by hand as a Python loop over
``torch.nn.LSTMCell`` with the same weights. Two looplift programs are timed:

* step by step (``compile(..., optimize=False)``): the loop runs literally, one body per step, so the
  difference to the hand-written loop is looplift's per-step bookkeeping (the body's executor, per-entry
  state freezing);
* optimized (``compile``): the loop optimizer runs the LSTM as PyTorch's fused kernel over the whole
  sequence and the readout and loss over all steps at once.

Prints a summary and, as the last line, one JSON object: the times per step are medians; the ratios are
medians over rounds of the two times in the same round (each round runs the three once, the order
reversed every other round).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import looplift as ll


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--time", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=40)
    parser.add_argument("--steps", type=int, default=41, help="timed rounds")
    args = parser.parse_args()
    torch.manual_seed(0)
    B, T = ll.batch_dim, ll.Dim("time")
    feat, hid, vocab = ll.Dim("feat", args.hidden), ll.Dim("hidden", args.hidden), ll.Dim("vocab", args.vocab)
    lstm, out = ll.nn.LSTM(feat, hid), ll.nn.Linear(hid, vocab)
    cell = torch.nn.LSTMCell(args.hidden, args.hidden)
    cell.weight_ih.data, cell.weight_hh.data = lstm.weight_ih_l0.data, lstm.weight_hh_l0.data
    cell.bias_ih.data, cell.bias_hh.data = lstm.bias_ih_l0.data, lstm.bias_hh_l0.data
    readout = torch.nn.Linear(args.hidden, args.vocab)
    readout.weight.data, readout.bias.data = out.weight.data, out.bias.data

    def model(x, targets):
        loop = ll.Loop(axis=T)
        loop.state.s = lstm.default_initial_state()
        with loop:
            h, loop.state.s = lstm(loop.unstack(x), state=loop.state.s)
            ce = loop.stack(ll.cross_entropy(out(h), loop.unstack(targets), axis=vocab))
        return ll.sum(ce, axis=[B, T])

    prog = ll.compile(model, mode="train")
    literal = ll.compile(model, mode="train", optimize=False)
    x = torch.randn(args.batch, args.time, args.hidden)
    lengths = torch.randint(args.time // 2, args.time + 1, (args.batch,))
    lengths[0] = args.time
    targets = torch.randint(0, args.vocab, (args.batch, args.time))
    mask = torch.arange(args.time)[None, :] < lengths[:, None]

    def looplift_step(program=prog):
        loss = program(ll.Named(x, (B, T, feat), {T: lengths}), ll.Named(targets, (B, T), sparse_dim=vocab)).tensor
        loss.backward()
        return loss

    def step_by_step():
        return looplift_step(literal)

    def torch_step():
        h = torch.zeros(args.batch, args.hidden)
        c = torch.zeros(args.batch, args.hidden)
        total = 0.0
        for t in range(args.time):
            h2, c2 = cell(x[:, t], (h, c))
            keep = mask[:, t, None]
            h, c = torch.where(keep, h2, h), torch.where(keep, c2, c)
            ce = torch.nn.functional.cross_entropy(readout(h2), targets[:, t], reduction="none")
            total = total + (ce * mask[:, t]).sum()
        total.backward()
        return total

    a, b, c = looplift_step(), step_by_step(), torch_step()
    assert torch.allclose(a, c, rtol=1e-4) and torch.allclose(b, c, rtol=1e-4), (a, b, c)
    fns = (("optimized", looplift_step), ("step_by_step", step_by_step), ("torch", torch_step))
    times = {name: [] for name, _ in fns}
    for i in range(args.steps):
        for name, fn in (fns if i % 2 == 0 else fns[::-1]):   # (the order reversed every other round)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}

    def paired(a: str, b: str) -> float:
        """The median over rounds of `a`'s time over `b`'s in the same round (a burst of load on the machine
        slows both alike)."""
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    per_step = {k: v / args.time * 1e3 for k, v in med.items()}
    print(f"LSTM loop, batch {args.batch}, {args.time} steps, hidden {args.hidden}, vocab {args.vocab}; "
          f"forward + backward, median of {args.steps}")
    print(f"per step: looplift step by step {per_step['step_by_step']:.3f} ms, optimized "
          f"{per_step['optimized']:.3f} ms, hand-written torch loop {per_step['torch']:.3f} ms")
    print(json.dumps({"step_by_step_ms_per_step": round(per_step["step_by_step"], 4),
                      "optimized_ms_per_step": round(per_step["optimized"], 4),
                      "torch_ms_per_step": round(per_step["torch"], 4),
                      "step_by_step_vs_torch_loop": round(paired("step_by_step", "torch"), 4),
                      "optimized_vs_torch_loop": round(paired("optimized", "torch"), 4)}))


if __name__ == "__main__":
    main()
