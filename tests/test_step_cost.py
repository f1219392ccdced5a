"""What one step of a loop costs, counted: torch ops, host syncs and Python calls per step.

Counts, not timings: they are the same on every machine, so they can be tests. Each is the difference
between a run of 10 steps and one of 5, divided by 5, for forward and backward together. The model is
``benchmarks/loop_step_cost.py``'s (an LSTM cell, a readout and a cross entropy per step, over a padded
batch), run step by step (``optimize=False``) against the same loop written by hand in PyTorch.
"""

from __future__ import annotations

import collections
import gc
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import looplift as ll

B, T = ll.batch_dim, ll.Dim("time")
FEAT, HID, VOCAB = ll.Dim("feat", 8), ll.Dim("hidden", 8), ll.Dim("vocab", 5)
BATCH = 4


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _models():
    torch.manual_seed(0)
    lstm, out = ll.nn.LSTM(FEAT, HID), ll.nn.Linear(HID, VOCAB)
    cell = torch.nn.LSTMCell(FEAT.size, HID.size)
    readout = torch.nn.Linear(HID.size, VOCAB.size)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(lstm, f"{name}_l0"))
        readout.weight.copy_(out.weight)
        readout.bias.copy_(out.bias)

    def model(x, targets):
        loop = ll.Loop(axis=T)
        loop.state.s = lstm.default_initial_state()
        with loop:
            h, loop.state.s = lstm(loop.unstack(x), state=loop.state.s)
            ce = loop.stack(ll.cross_entropy(out(h), loop.unstack(targets), axis=VOCAB))
        return ll.sum(ce, axis=[B, T])

    literal = ll.compile(model, mode="train", optimize=False)

    def data(steps):
        g = torch.Generator().manual_seed(steps)
        x = torch.randn(BATCH, steps, FEAT.size, generator=g)
        lengths = torch.tensor([steps, steps - 1, steps - 2, steps])
        return x, lengths, torch.randint(0, VOCAB.size, (BATCH, steps), generator=g)

    def looplift_step(steps):
        x, lengths, targets = data(steps)
        loss = literal(ll.Named(x, (B, T, FEAT), {T: lengths}), ll.Named(targets, (B, T), sparse_dim=VOCAB)).tensor
        loss.backward()
        return loss

    def torch_step(steps):
        x, lengths, targets = data(steps)
        mask = torch.arange(steps)[None, :] < lengths[:, None]
        h = c = torch.zeros(BATCH, HID.size)
        total = 0.0
        for t in range(steps):
            h2, c2 = cell(x[:, t], (h, c))
            keep = mask[:, t, None]
            h, c = torch.where(keep, h2, h), torch.where(keep, c2, c)
            ce = torch.nn.functional.cross_entropy(readout(h2), targets[:, t], reduction="none")
            total = total + (ce * mask[:, t]).sum()
        total.backward()
        return total

    return looplift_step, torch_step


def _ops(fn, steps: int) -> collections.Counter:
    with _CountOps() as mode:
        fn(steps)
    return mode.counts


def _per_step(counts_10: collections.Counter, counts_5: collections.Counter) -> dict[str, float]:
    return {k: (counts_10[k] - counts_5[k]) / 5 for k in set(counts_10) | set(counts_5) if counts_10[k] != counts_5[k]}


def _python_calls(fn, steps: int) -> int:
    calls = [0]

    def profile(frame, event, arg):
        if event == "call":
            calls[0] += 1

    gc.disable()   # (a collection calls the callbacks other modules registered: calls that are not the step's)
    sys.setprofile(profile)
    try:
        fn(steps)
    finally:
        sys.setprofile(None)
        gc.enable()
    return calls[0]


def test_the_two_loops_compute_the_same_loss():
    looplift_step, torch_step = _models()
    torch.testing.assert_close(looplift_step(7), torch_step(7))


def test_a_step_issues_no_more_torch_ops_than_the_hand_written_step():
    looplift_step, torch_step = _models()
    looplift_step(5), torch_step(5)   # (first calls trace)
    ours = _per_step(_ops(looplift_step, 10), _ops(looplift_step, 5))
    theirs = _per_step(_ops(torch_step, 10), _ops(torch_step, 5))
    assert sum(ours.values()) <= sum(theirs.values()), (ours, theirs)


def test_a_loop_over_an_axis_without_an_end_reads_nothing_back_per_step():
    """No host sync per step (``.item()``, ``bool(tensor)``): the number of steps is read once per call."""
    looplift_step, _ = _models()
    looplift_step(5)
    ours = _per_step(_ops(looplift_step, 10), _ops(looplift_step, 5))
    assert "aten._local_scalar_dense.default" not in ours, ours


def test_python_calls_per_step_stay_few():
    """The step's Python work: the generated code of the body, one call per node's kernel, and the loop's
    bookkeeping. The hand-written step makes 15 (``nn.Module.__call__`` and friends); this bound only falls."""
    looplift_step, _ = _models()
    looplift_step(5)
    per_step = (_python_calls(looplift_step, 10) - _python_calls(looplift_step, 5)) / 5
    assert per_step <= 32, per_step
