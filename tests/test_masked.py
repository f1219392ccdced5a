"""Masked computation (DESIGN.md §5): a block of a loop body that advances only where a mask is True.

In the loop (the reference interpreter, or ``optimize=False``), at a step
where the mask is False every state assigned in the block keeps its previous
value and every value of the block used after it is held from the last step
where the mask was True (zeros before the first). Optimized, the block runs
as a loop of its own over ``T'`` (the frames where the mask is True, so its
cost is proportional to their number), optimized in turn (an LSTM step
becomes the fused LSTM over ``T'``), and its results are unmasked onto ``T``.

Checked here, in float64:

* the in-loop semantics against a hand-written PyTorch loop, for all three
  ways of running (optimized, ``optimize=False``, reference);
* a transducer-like model (a slow label RNN under a mask derived from the
  previous label, a fast RNN every frame): optimized == reference, outputs
  and gradients, with the slow RNN's fused kernel run over ``T'`` only;
* block states and values read around the block and after the loop, and
  blocks the optimizer must leave in the loop: optimized == reference;
* ``compress`` / ``unmask`` outside loops against a per-entry computation;
* a property test over random masks and lengths.

Padding frames of stacked outputs are undefined: outputs are compared at
valid positions only.
"""

from __future__ import annotations

import ast
import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loop_helpers import assert_same_named, masked, named_leaves
from torch.testing import assert_close

import looplift as ll

B = ll.batch_dim
F = ll.Dim("feat", 3)
H = ll.Dim("hidden", 4)
DTYPE = torch.float64

#: the example's batch: lengths differ and include 0; padded beyond the longest
LENGTHS = torch.tensor([6, 0, 4, 3, 5])
PADDED = 7
#: per entry: mixed, zero length, all False, all True, mixed starting with False (the padding is set
#: True in places: it must not count)
MASK = torch.tensor([
    [1, 0, 0, 1, 1, 0, 1],
    [1, 1, 0, 1, 0, 1, 1],
    [0, 0, 0, 0, 1, 1, 1],
    [1, 1, 1, 0, 1, 0, 1],
    [0, 1, 0, 0, 1, 1, 1],
], dtype=torch.bool)


# -- helpers ---------------------------------------------------------------------------------------------


def new_time() -> ll.Dim:
    return ll.Dim("time")


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def valid_mask(lengths: torch.Tensor, frames: int) -> torch.Tensor:
    return torch.arange(frames)[None, :] < lengths[:, None]


def true_frames(mask: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Per entry, the frames (within its length) where `mask` is True."""
    return [[t for t in range(int(n)) if mask[b, t]] for b, n in enumerate(lengths)]


def fresh(inputs: list[ll.Named]) -> list[ll.Named]:
    """Copies of the inputs; float ones are leaves that require grad."""
    out = []
    for a in inputs:
        t = a.tensor.detach().clone()
        if t.dtype.is_floating_point:
            t.requires_grad_(True)
        out.append(ll.Named(t, a.dims, a.lengths, sparse_dim=a.sparse_dim))
    return out


def run(prog: ll.Program, inputs: list[ll.Named], params: list[torch.Tensor], *, reference: bool):
    """(outputs as Named leaves, gradients of a fixed random weighting of the valid outputs w.r.t. the float
    inputs and `params`)."""
    leaves = fresh(inputs)
    outs = named_leaves((prog.reference if reference else prog)(*leaves))
    loss = torch.zeros((), dtype=DTYPE)
    for i, o in enumerate(outs):
        if o.tensor.dtype.is_floating_point:
            w = torch.randn(o.tensor.shape, generator=torch.Generator().manual_seed(100 + i), dtype=DTYPE)
            loss = loss + (masked(o) * w).sum()
    wrt = [x.tensor for x in leaves if x.tensor.requires_grad] + list(params)
    grads = [None] * len(wrt)
    if loss.requires_grad:   # (not when nothing reaches a valid output, e.g. all lengths 0)
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return outs, [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]


def check_equivalent(prog: ll.Program, inputs: list[ll.Named], params) -> list[ll.Named]:
    """The optimized run equals the reference interpreter: outputs at valid positions, gradients w.r.t. the
    float inputs and `params`. Returns the optimized outputs."""
    params = list(params)
    outs, grads = run(prog, inputs, params, reference=False)
    ref_outs, ref_grads = run(prog, inputs, params, reference=True)
    assert len(outs) == len(ref_outs)
    for a, b in zip(outs, ref_outs):
        assert_same_named(a, b)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert torch.isfinite(g).all(), f"gradient {i} not finite"
        assert_close(g, r, rtol=1e-9, atol=1e-11, msg=lambda s, i=i: f"gradient {i}: {s}")
    return outs


def explain_loops(prog: ll.Program) -> dict[str, str]:
    """``prog.explain()`` split per loop: the loop's dim name -> the text of its entry."""
    loops: dict[str, str] = {}
    name = None
    for line in prog.explain().splitlines():
        if line.startswith("loop over "):
            name = ast.literal_eval(line[len("loop over "):].split(" at ")[0])
            assert name not in loops, prog.explain()
            loops[name] = ""
        loops[name] += line + "\n"
    return loops


def assert_block_moved_out(prog: ll.Program, time: ll.Dim, *, fused: bool = True) -> None:
    """The MaskedComputation block left the loop over `time` and ran as a loop over T': as the fused LSTM
    (`fused`), or step by step over T' (where the LSTM's cell state is read per step)."""
    loops = explain_loops(prog)
    masked_loop = time.name + "'"
    assert set(loops) == {time.name, masked_loop}, prog.explain()
    assert "not optimized" not in prog.explain(), prog.explain()
    assert "masked computations moved out" in loops[time.name], prog.explain()
    if fused:
        assert "fused LSTM over the sequence" in loops[masked_loop], prog.explain()
        assert "stayed in the loop" not in loops[masked_loop], prog.explain()
    else:
        assert "lstm_cell" in loops[masked_loop].split("stayed in the loop")[1], prog.explain()


def assert_block_stayed(prog: ll.Program, time: ll.Dim) -> None:
    """The block stayed in the loop over `time` (run step by step there)."""
    loops = explain_loops(prog)
    assert set(loops) == {time.name}, prog.explain()
    assert "not optimized" not in prog.explain(), prog.explain()
    assert "masked computations moved out" not in loops[time.name], prog.explain()
    assert "lstm_cell" in loops[time.name].split("stayed in the loop")[1], prog.explain()


def lstm_cell_like(lstm: ll.nn.LSTM) -> torch.nn.LSTMCell:
    """A torch.nn.LSTMCell with the weights of the looplift LSTM."""
    cell = torch.nn.LSTMCell(lstm.in_dim.size, lstm.hidden.size).to(DTYPE)
    cell.load_state_dict({k.replace("_l0", ""): v for k, v in lstm.state_dict().items()})
    return cell


def linear_of(module: ll.nn.Linear):
    return lambda v: torch.nn.functional.linear(v, module.weight.detach(), module.bias.detach())


# -- the example: a slow LSTM under the mask, a fast accumulation every step ---------------------------------


class Example(ll.Module):
    """The slow LSTM advances where the mask is True; after the block, one value of it is used: its output
    ``s`` (``held="s"``), or ``r = s + skip(x_t)``, which also depends on the frame (``held="r"``)."""

    def __init__(self, time: ll.Dim, held: str = "s", seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.time, self.held = time, held
        self.slow = ll.nn.LSTM(F, H)
        self.skip = ll.nn.Linear(F, H)
        self.fast = ll.nn.Linear(H, H)
        self.to(DTYPE)

    def forward(self, x, m):
        loop = ll.Loop(axis=self.time)
        loop.state.slow = self.slow.default_initial_state([B])
        loop.state.acc = ll.zeros([B, H])
        with loop:
            x_t, m_t = loop.unstack(x), loop.unstack(m)
            with ll.MaskedComputation(mask=m_t):
                s, loop.state.slow = self.slow(x_t, state=loop.state.slow)
                if self.held == "r":
                    s = s + self.skip(x_t)
            loop.state.acc = ll.tanh(self.fast(s) + loop.state.acc)
            y = loop.stack(s * 2.0)
        return y, loop.state.acc, loop.state.slow.h, loop.state.slow.c


def example_inputs(time: ll.Dim, x: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> list[ll.Named]:
    return [ll.Named(x, (B, time, F), {time: lengths}), ll.Named(mask, (B, time), {time: lengths})]


def torch_example(model: Example, x: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor):
    """The example's loop by hand, each entry alone: y over (batch, time, hidden), the final acc, h, c."""
    cell, skip, fast = lstm_cell_like(model.slow), linear_of(model.skip), linear_of(model.fast)
    n, frames = mask.shape
    y = torch.zeros(n, frames, H.size, dtype=DTYPE)
    finals = []
    for b in range(n):
        h = c = s = acc = torch.zeros(H.size, dtype=DTYPE)
        for t in range(int(lengths[b])):
            if mask[b, t]:
                h, c = (v[0] for v in cell(x[b, t][None], (h[None], c[None])))
                s = h + skip(x[b, t]) if model.held == "r" else h
            acc = torch.tanh(fast(s) + acc)
            y[b, t] = s * 2.0
        finals.append((acc, h, c))
    acc, h, c = (torch.stack(v) for v in zip(*finals))
    return y, acc, h, c


@pytest.mark.parametrize("held", ["s", "r"])
def test_example_in_loop_semantics_match_a_hand_written_torch_loop(held):
    time = new_time()
    model = Example(time, held)
    x = randn(len(LENGTHS), PADDED, F.size, seed=1)
    want_y, want_acc, want_h, want_c = torch_example(model, x, MASK, LENGTHS)
    inputs = example_inputs(time, x, MASK, LENGTHS)
    optimized, unoptimized = ll.compile(model), ll.compile(model, optimize=False)
    runs = {"optimized": optimized, "optimize=False": unoptimized, "reference": optimized.reference}
    m = valid_mask(LENGTHS, PADDED)[..., None]
    with torch.no_grad():
        for how, fn in runs.items():
            y, acc, h, c = fn(*inputs)
            assert y.lengths[time].tolist() == LENGTHS.tolist()
            assert_close(torch.where(m, y.align(B, time, H), 0.0), torch.where(m, want_y, 0.0),
                         rtol=1e-9, atol=1e-12, msg=lambda s, how=how: f"{how}, y: {s}")
            for name, got, want in [("acc", acc, want_acc), ("h", h, want_h), ("c", c, want_c)]:
                assert_close(got.align(B, H), want, rtol=1e-9, atol=1e-12,
                             msg=lambda s, how=how, name=name: f"{how}, {name}: {s}")
    assert_block_moved_out(optimized, time)
    assert "masked computations moved out" not in unoptimized.explain()


# -- a transducer: the slow label RNN advances only after a non-blank label ----------------------------------

V = ll.Dim("vocab", 4)
EMB = ll.Dim("emb", 2)
SLOW = ll.Dim("slow_hidden", 3)
JOINT = ll.Dim("joint", 5)
FAST = ll.Dim("fast_hidden", 4)
BLANK, BOS = 0, 1
T_LENGTHS = torch.tensor([7, 0, 5, 2, 6])
T_PADDED = 8
#: the label per frame (blank 0); the padding holds labels too. The mask at frame t is "the previous label
#: (BOS at frame 0) is not blank": True frames per entry 3, 0, 1, 2, 3 (at most 3, against 8 padded frames)
LABELS = torch.tensor([
    [0, 2, 0, 0, 3, 0, 1, 2],
    [3, 1, 2, 3, 1, 2, 3, 1],
    [0, 0, 0, 0, 0, 2, 2, 2],
    [2, 3, 1, 1, 1, 1, 1, 1],
    [1, 0, 0, 2, 0, 0, 3, 3],
])


class Transducer(ll.Module):
    """Per frame: the slow LSTM reads the previous label's embedding where that label is not blank; the fast
    LSTM reads the frame and the slow output; a readout and the cross-entropy of the frame's label."""

    def __init__(self, time: ll.Dim, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.time = time
        self.embed = ll.nn.Embedding(V, EMB)
        self.slow = ll.nn.LSTM(EMB, SLOW)
        self.from_frame = ll.nn.Linear(F, JOINT)
        self.from_slow = ll.nn.Linear(SLOW, JOINT)
        self.fast = ll.nn.LSTM(JOINT, FAST)
        self.readout = ll.nn.Linear(FAST, V)
        self.to(DTYPE)

    def forward(self, x, labels):
        loop = ll.Loop(axis=self.time)
        loop.state.prev_label = ll.full(BOS, sparse_dim=V)
        loop.state.slow = self.slow.default_initial_state([B])
        loop.state.fast = self.fast.default_initial_state([B])
        with loop:
            x_t, label = loop.unstack(x), loop.unstack(labels)
            with ll.MaskedComputation(mask=loop.state.prev_label != BLANK):
                slow_out, loop.state.slow = self.slow(self.embed(loop.state.prev_label), state=loop.state.slow)
            joint = ll.tanh(self.from_frame(x_t) + self.from_slow(slow_out))
            fast_out, loop.state.fast = self.fast(joint, state=loop.state.fast)
            ce = loop.stack(ll.cross_entropy(self.readout(fast_out), label, axis=V))
            loop.state.prev_label = label
        loss = ll.sum(ce, axis=[self.time, B])
        return loss, ce, loop.state.slow.h, loop.state.fast.h


def transducer_inputs(time: ll.Dim, x: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor):
    return [ll.Named(x, (B, time, F), {time: lengths}), ll.Named(labels, (B, time), {time: lengths}, sparse_dim=V)]


def transducer_mask(labels: torch.Tensor) -> torch.Tensor:
    """The block's mask per frame: the previous label (BOS before the first frame) is not blank."""
    prev = torch.cat([torch.full((len(labels), 1), BOS), labels[:, :-1]], 1)
    return prev != BLANK


def loss_and_grads(prog, model, inputs, *, reference: bool):
    x = inputs[0].tensor.detach().clone().requires_grad_(True)
    outs = (prog.reference if reference else prog)(ll.Named(x, inputs[0].dims, inputs[0].lengths), *inputs[1:])
    return outs, torch.autograd.grad(outs[0].tensor, [x, *model.parameters()])


def test_transducer_optimized_equals_reference_with_the_slow_lstm_fused_over_the_masked_frames(monkeypatch):
    calls = []   # (input size, time steps, packed frames) of every fused LSTM kernel call
    fused = torch._VF.lstm

    def recording(data, batch_sizes, *args):
        calls.append((data.shape[-1], len(batch_sizes), data.shape[0]))
        return fused(data, batch_sizes, *args)

    monkeypatch.setattr(torch._VF, "lstm", recording)
    time = new_time()
    model = Transducer(time)
    prog = ll.compile(model)
    inputs = transducer_inputs(time, randn(len(T_LENGTHS), T_PADDED, F.size, seed=2), LABELS, T_LENGTHS)

    ref_outs, ref_grads = loss_and_grads(prog, model, inputs, reference=True)
    assert calls == []   # the reference runs the LSTM cells step by step
    outs, grads = loss_and_grads(prog, model, inputs, reference=False)
    for a, b in zip(outs, ref_outs):
        assert_same_named(a, b)
    names = ["x", *(n for n, _ in model.named_parameters())]
    for name, g, r in zip(names, grads, ref_grads):
        assert torch.isfinite(g).all(), name
        assert_close(g, r, rtol=1e-9, atol=1e-12, msg=lambda s, name=name: f"gradient w.r.t. {name}: {s}")

    loops = explain_loops(prog)
    assert set(loops) == {"time", "time'"}, prog.explain()
    assert "fused LSTM over the sequence carrying 'slow[0]', 'slow[1]'" in loops["time'"], prog.explain()
    assert "masked computations moved out" in loops["time"], prog.explain()
    assert "fused LSTM over the sequence carrying 'fast[0]', 'fast[1]'" in loops["time"], prog.explain()
    assert "prev_label" in loops["time"].split("states moved out")[1], prog.explain()
    assert "nothing left in the loop: it is gone" in loops["time"], prog.explain()

    # the slow LSTM runs over T' only: as many steps as the most True frames of an entry, each entry its own
    # count (an empty one runs one frame, discarded); the fast one over all of T
    counts = [len(f) for f in true_frames(transducer_mask(LABELS), T_LENGTHS)]
    assert counts == [3, 0, 1, 2, 3] and max(counts) < T_PADDED
    slow_calls = [c for c in calls if c[0] == EMB.size]
    fast_calls = [c for c in calls if c[0] == JOINT.size]
    assert slow_calls == [(EMB.size, max(counts), sum(max(n, 1) for n in counts))]
    assert fast_calls == [(JOINT.size, int(T_LENGTHS.max()), sum(max(int(n), 1) for n in T_LENGTHS))]


# -- block states and values used around the block and after the loop (the block moves out) ----------------


def slow_lstm() -> ll.nn.LSTM:
    torch.manual_seed(3)
    return ll.nn.LSTM(F, H).to(DTYPE)


def torch_slow_states(slow: ll.nn.LSTM, x: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor):
    """By hand: the slow LSTM's (h, c) after each step over (batch, time, hidden), kept where the mask is False
    (zeros in the padding), and each entry's final (h, c)."""
    cell = lstm_cell_like(slow)
    n, frames = mask.shape
    hs, cs = torch.zeros(n, frames, H.size, dtype=DTYPE), torch.zeros(n, frames, H.size, dtype=DTYPE)
    finals = []
    for b in range(n):
        h = c = torch.zeros(H.size, dtype=DTYPE)
        for t in range(int(lengths[b])):
            if mask[b, t]:
                h, c = (v[0] for v in cell(x[b, t][None], (h[None], c[None])))
            hs[b, t], cs[b, t] = h, c
        finals.append((h, c))
    h, c = (torch.stack(v) for v in zip(*finals))
    return hs, cs, h, c


def check_masked_lstm_program(model, *, block: str):
    """`model(time, slow)` -> a function of (x, mask); optimized == reference (outputs, gradients), and the block
    ran as `block` says: "fused" (moved out, the fused LSTM over T'), "over T'" (moved out, step by step over
    T'). Returns (the outputs as Named leaves, x, slow, time)."""
    time, slow = new_time(), slow_lstm()
    prog = ll.compile(model(time, slow))
    x = randn(len(LENGTHS), PADDED, F.size, seed=4)
    outs = check_equivalent(prog, example_inputs(time, x, MASK, LENGTHS), slow.parameters())
    assert_block_moved_out(prog, time, fused=block == "fused")
    return outs, x, slow, time


def test_block_state_read_before_and_after_the_block_in_the_same_step():
    def model(time, slow):
        def fn(x, m):
            loop = ll.Loop(axis=time)
            loop.state.slow = slow.default_initial_state([B])
            with loop:
                x_t, m_t = loop.unstack(x), loop.unstack(m)
                before = loop.state.slow.h
                with ll.MaskedComputation(mask=m_t):
                    _, loop.state.slow = slow(x_t, state=loop.state.slow)
                y = loop.stack(before * 3.0 + ll.tanh(loop.state.slow.c))
            return y
        return fn

    # (the cell state is read per step: the fused LSTM, which gives it only at the end, does not apply)
    (y,), x, slow, time = check_masked_lstm_program(model, block="over T'")
    hs, cs, _, _ = torch_slow_states(slow, x, MASK, LENGTHS)
    h_before = torch.cat([torch.zeros(len(LENGTHS), 1, H.size, dtype=DTYPE), hs[:, :-1]], 1)
    m = valid_mask(LENGTHS, PADDED)[..., None]
    assert_close(torch.where(m, y.align(B, time, H), 0.0), torch.where(m, h_before * 3.0 + torch.tanh(cs), 0.0),
                 rtol=1e-9, atol=1e-12)


def test_final_value_of_a_block_state_after_the_loop():
    def model(time, slow):
        def fn(x, m):
            loop = ll.Loop(axis=time)
            loop.state.slow = slow.default_initial_state([B])
            with loop:
                x_t, m_t = loop.unstack(x), loop.unstack(m)
                with ll.MaskedComputation(mask=m_t):
                    _, loop.state.slow = slow(x_t, state=loop.state.slow)
            return loop.state.slow.h, loop.state.slow.c
        return fn

    (h, c), x, slow, _ = check_masked_lstm_program(model, block="fused")
    _, _, want_h, want_c = torch_slow_states(slow, x, MASK, LENGTHS)
    assert_close(h.align(B, H), want_h, rtol=1e-9, atol=1e-12)
    assert_close(c.align(B, H), want_c, rtol=1e-9, atol=1e-12)


def test_block_value_stacked_is_held_where_the_mask_is_false():
    def model(time, slow):
        def fn(x, m):
            loop = ll.Loop(axis=time)
            loop.state.slow = slow.default_initial_state([B])
            with loop:
                x_t, m_t = loop.unstack(x), loop.unstack(m)
                with ll.MaskedComputation(mask=m_t):
                    s, loop.state.slow = slow(x_t, state=loop.state.slow)
                y = loop.stack(s)
            return y
        return fn

    (y,), x, slow, time = check_masked_lstm_program(model, block="fused")
    hs, _, _, _ = torch_slow_states(slow, x, MASK, LENGTHS)
    m = valid_mask(LENGTHS, PADDED)[..., None]
    assert_close(torch.where(m, y.align(B, time, H), 0.0), hs, rtol=1e-9, atol=1e-12)


def test_last_of_a_value_computed_from_a_block_value_after_the_block():
    def model(time, slow):
        def fn(x, m):
            loop = ll.Loop(axis=time)
            loop.state.slow = slow.default_initial_state([B])
            with loop:
                x_t, m_t = loop.unstack(x), loop.unstack(m)
                with ll.MaskedComputation(mask=m_t):
                    s, loop.state.slow = slow(x_t, state=loop.state.slow)
                s2 = s * 2.0
            return loop.last(s2)
        return fn

    (last,), x, slow, _ = check_masked_lstm_program(model, block="fused")
    _, _, want_h, _ = torch_slow_states(slow, x, MASK, LENGTHS)
    assert_close(last.align(B, H), want_h * 2.0, rtol=1e-9, atol=1e-12)


def frames_held(x: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """By hand: over (batch, time, feat), the frame of `x` at the last True frame up to t (zeros before the
    first, and in the padding)."""
    want = torch.zeros_like(x)
    for b, frames in enumerate(true_frames(mask, lengths)):
        for t in range(int(lengths[b])):
            before = [f for f in frames if f <= t]
            if before:
                want[b, t] = x[b, before[-1]]
    return want


def test_two_values_of_one_block_used_after_it_are_each_held():
    def model(time, slow):
        def fn(x, m):
            loop = ll.Loop(axis=time)
            loop.state.slow = slow.default_initial_state([B])
            with loop:
                x_t, m_t = loop.unstack(x), loop.unstack(m)
                with ll.MaskedComputation(mask=m_t):
                    s, loop.state.slow = slow(x_t, state=loop.state.slow)
                    frame = x_t * 1.0
                y = loop.stack(s)
                z = loop.stack(frame)
            return y, z
        return fn

    (y, z), x, slow, time = check_masked_lstm_program(model, block="fused")
    hs, _, _, _ = torch_slow_states(slow, x, MASK, LENGTHS)
    m = valid_mask(LENGTHS, PADDED)[..., None]
    assert_close(torch.where(m, y.align(B, time, H), 0.0), hs, rtol=1e-9, atol=1e-12)
    assert_close(torch.where(m, z.align(B, time, F), 0.0), frames_held(x, MASK, LENGTHS), rtol=0, atol=0)


def test_last_of_a_block_value_is_its_held_value():
    """loop.last of a block value used after the block in the loop is its held value (from the last step where
    the mask was True); of one never used after it, an error naming the block (nothing holds it)."""
    time, slow = new_time(), slow_lstm()

    def model(x, m, *, use_after: bool):
        loop = ll.Loop(axis=time)
        loop.state.slow = slow.default_initial_state([B])
        with loop:
            x_t, m_t = loop.unstack(x), loop.unstack(m)
            with ll.MaskedComputation(mask=m_t):
                s, loop.state.slow = slow(x_t, state=loop.state.slow)
            if use_after:
                loop.stack(s * 2.0)
        return loop.last(s)

    x = randn(len(LENGTHS), PADDED, F.size, seed=4)
    with pytest.raises(ll.errors.TraceError, match=r"loop.last .* MaskedComputation at .*test_masked.py"):
        ll.compile(functools.partial(model, use_after=False))(*example_inputs(time, x, MASK, LENGTHS))
    prog = ll.compile(functools.partial(model, use_after=True))
    x = randn(len(LENGTHS), PADDED, F.size, seed=4)
    (last,) = check_equivalent(prog, example_inputs(time, x, MASK, LENGTHS), slow.parameters())
    _, _, want_h, _ = torch_slow_states(slow, x, MASK, LENGTHS)   # s is the LSTM's h
    assert_close(last.align(B, H), want_h, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("use", ["stack", "last"])
def test_block_state_taken_directly_by_stack_or_last_moves_out(use):
    def model(time, slow):
        def fn(x, m):
            loop = ll.Loop(axis=time)
            loop.state.slow = slow.default_initial_state([B])
            with loop:
                x_t, m_t = loop.unstack(x), loop.unstack(m)
                with ll.MaskedComputation(mask=m_t):
                    _, loop.state.slow = slow(x_t, state=loop.state.slow)
                h = loop.state.slow.h
                if use == "stack":
                    stacked = loop.stack(h)
            return stacked if use == "stack" else loop.last(h)
        return fn

    check_masked_lstm_program(model, block="fused")


def test_mask_the_same_for_every_entry_moves_out():
    """A mask without the batch dim (from loop.index): T' still gets per-entry lengths, as T's lengths differ."""
    time, slow = new_time(), slow_lstm()

    def model(x):
        loop = ll.Loop(axis=time)
        loop.state.slow = slow.default_initial_state([B])
        with loop:
            x_t = loop.unstack(x)
            with ll.MaskedComputation(mask=(loop.index % 2) == 0):
                s, loop.state.slow = slow(x_t, state=loop.state.slow)
            y = loop.stack(s * 2.0)
        return y, loop.state.slow.h

    prog = ll.compile(model)
    x = randn(len(LENGTHS), PADDED, F.size, seed=4)
    check_equivalent(prog, [ll.Named(x, (B, time, F), {time: LENGTHS})], slow.parameters())
    assert_block_moved_out(prog, time)


# -- blocks the optimizer leaves in the loop ------------------------------------------------------------------


def test_block_reading_a_state_the_loop_carries_stays_in_the_loop():
    fast = ll.nn.LSTM(H, H).to(DTYPE)
    feedback = ll.nn.Linear(H, F).to(DTYPE)

    def model(time, slow):
        def fn(x, m):
            loop = ll.Loop(axis=time)
            loop.state.slow = slow.default_initial_state([B])
            loop.state.fast = fast.default_initial_state([B])
            with loop:
                x_t, m_t = loop.unstack(x), loop.unstack(m)
                with ll.MaskedComputation(mask=m_t):
                    s, loop.state.slow = slow(x_t + feedback(loop.state.fast.h), state=loop.state.slow)
                f, loop.state.fast = fast(s, state=loop.state.fast)
                y = loop.stack(f)
            return y, loop.state.slow.c
        return fn

    time, slow = new_time(), slow_lstm()
    prog = ll.compile(model(time, slow))
    x = randn(len(LENGTHS), PADDED, F.size, seed=4)
    params = [*slow.parameters(), *fast.parameters(), *feedback.parameters()]
    check_equivalent(prog, example_inputs(time, x, MASK, LENGTHS), params)
    assert_block_stayed(prog, time)


def test_block_assigning_a_state_assigned_before_it_in_the_same_step_stays_in_the_loop():
    skip = ll.nn.Linear(F, H).to(DTYPE)

    def model(time, slow):
        def fn(x, m):
            loop = ll.Loop(axis=time)
            loop.state.slow = slow.default_initial_state([B])
            loop.state.z = ll.zeros([B, H])
            with loop:
                x_t, m_t = loop.unstack(x), loop.unstack(m)
                loop.state.z = skip(x_t)
                with ll.MaskedComputation(mask=m_t):
                    s, loop.state.slow = slow(x_t, state=loop.state.slow)
                    loop.state.z = loop.state.z + s
                y = loop.stack(loop.state.z)
            return y, loop.state.z
        return fn

    time, slow = new_time(), slow_lstm()
    prog = ll.compile(model(time, slow))
    x = randn(len(LENGTHS), PADDED, F.size, seed=4)
    inputs = example_inputs(time, x, MASK, LENGTHS)
    y, _ = check_equivalent(prog, inputs, [*slow.parameters(), *skip.parameters()])
    assert_block_stayed(prog, time)
    # z at step t: skip(x_t), plus the slow output where the mask is True
    hs, _, _, _ = torch_slow_states(slow, x, MASK, LENGTHS)
    want = linear_of(skip)(x) + torch.where(MASK[..., None], hs, 0.0)
    m = valid_mask(LENGTHS, PADDED)[..., None]
    assert_close(torch.where(m, y.align(B, time, H), 0.0), torch.where(m, want, 0.0), rtol=1e-9, atol=1e-12)


# -- compress and unmask, outside loops -----------------------------------------------------------------------

#: lengths and masks for the ops: per entry mixed, all False, zero length, all True (the padding: True in
#: places, and the padding of the data inf and NaN)
OP_LENGTHS = torch.tensor([5, 3, 0, 2])
OP_PADDED = 6
OP_MASK = torch.tensor([
    [0, 1, 1, 0, 1, 1],
    [0, 0, 0, 1, 1, 0],
    [1, 1, 0, 1, 0, 1],
    [1, 1, 0, 0, 1, 1],
], dtype=torch.bool)
ALL_FALSE = torch.zeros_like(OP_MASK) | ~valid_mask(OP_LENGTHS, OP_PADDED)   # True only in the padding


def garbage_padded(seed: int) -> torch.Tensor:
    """Random (batch, time, feat) values with inf and NaN in the padding of OP_LENGTHS."""
    x = randn(len(OP_LENGTHS), OP_PADDED, F.size, seed=seed)
    pad = ~valid_mask(OP_LENGTHS, OP_PADDED)
    x[pad] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=DTYPE)
    return x


def masked_dim_of(value) -> ll.Dim:
    (dim,) = [d for d in value.dims if d.masked_from is not None]
    return dim


def compress_by_hand(x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Per entry, its frames where the mask is True (within its length)."""
    return [x[b, frames] for b, frames in enumerate(true_frames(mask, OP_LENGTHS))]


def unmask_by_hand(per_entry: list[torch.Tensor], mask: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """Over (batch, time, feat): frame t of entry b is its T' frame (number of True frames up to t) - 1, or
    `initial[b]` before its first True frame; zeros in the padding."""
    rows = []
    for b, frames in enumerate(true_frames(mask, OP_LENGTHS)):
        row = [per_entry[b][sum(f <= t for f in frames) - 1] if any(f <= t for f in frames) else initial[b]
               for t in range(int(OP_LENGTHS[b]))]
        row += [torch.zeros(F.size, dtype=DTYPE)] * (OP_PADDED - len(row))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def weights_like(t: torch.Tensor, seed: int) -> torch.Tensor:
    return randn(*t.shape, seed=seed)


@pytest.mark.parametrize("mask", [OP_MASK, ALL_FALSE], ids=["mixed", "all-false"])
def test_compress_keeps_each_entrys_true_frames_and_gives_t_prime_their_count(mask):
    time = new_time()
    prog = ll.compile(lambda x, m: ll.compress(x, m, axis=time))
    x = garbage_padded(seed=5)
    inputs = [ll.Named(x, (B, time, F), {time: OP_LENGTHS}), ll.Named(mask, (B, time), {time: OP_LENGTHS})]
    want = compress_by_hand(x, mask)
    counts = [len(w) for w in want]
    for how, fn in [("optimized", prog), ("reference", prog.reference)]:
        leaf = x.clone().requires_grad_(True)
        out = fn(ll.Named(leaf, (B, time, F), {time: OP_LENGTHS}), inputs[1])
        masked_time = masked_dim_of(out)
        assert masked_time.masked_from[0] == time
        assert set(out.dims) == {B, masked_time, F}
        assert out.lengths[masked_time].tolist() == counts, how
        got = out.align(B, masked_time, F)
        assert got.shape[1] == max(counts)
        for b, w in enumerate(want):
            assert_close(got[b, :len(w)], w, rtol=0, atol=0)
        # gradients of a weighting of the valid frames: the weights at the kept frames, zero elsewhere
        w = weights_like(got, seed=6)
        (grad,) = torch.autograd.grad((masked(out).permute(*[out.dims.index(d) for d in (B, masked_time, F)])
                                       * w).sum(), [leaf])
        hand_leaf = x.clone().requires_grad_(True)
        kept = compress_by_hand(hand_leaf, mask)
        hand_loss = sum(((e * w[b, :len(e)]).sum() for b, e in enumerate(kept)), hand_leaf.new_zeros(()))
        (want_grad,) = torch.autograd.grad(hand_loss, [hand_leaf], allow_unused=True)
        assert_close(grad, torch.zeros_like(x) if want_grad is None else want_grad, rtol=0, atol=0)


def test_compress_with_a_mask_the_same_for_every_entry():
    """A mask over T alone keeps, in each entry, its True frames within that entry's length."""
    time = new_time()
    prog = ll.compile(lambda x, m: ll.compress(x, m, axis=time))
    x, mask = garbage_padded(seed=5), OP_MASK[0]
    out = prog(ll.Named(x, (B, time, F), {time: OP_LENGTHS}), ll.Named(mask, (time,)))
    masked_time = masked_dim_of(out)
    want = compress_by_hand(x, mask.expand(len(OP_LENGTHS), -1))
    assert out.lengths[masked_time].tolist() == [len(w) for w in want]
    got = out.align(B, masked_time, F)
    for b, w in enumerate(want):
        assert_close(got[b, :len(w)], w, rtol=0, atol=0)


def test_unmask_repeats_the_last_true_frame_with_the_initial_value_before_the_first():
    time = new_time()

    def model(x, m, initial):
        compressed = ll.compress(x, m, axis=time)
        return ll.unmask(ll.tanh(compressed), axis=masked_dim_of(compressed), initial=initial)

    prog = ll.compile(model)
    x, initial = garbage_padded(seed=7), randn(len(OP_LENGTHS), F.size, seed=8)
    w = randn(len(OP_LENGTHS), OP_PADDED, F.size, seed=9)
    for how, fn in [("optimized", prog), ("reference", prog.reference)]:
        x_leaf, init_leaf = x.clone().requires_grad_(True), initial.clone().requires_grad_(True)
        out = fn(ll.Named(x_leaf, (B, time, F), {time: OP_LENGTHS}), ll.Named(OP_MASK, (B, time), {time: OP_LENGTHS}),
                 ll.Named(init_leaf, (B, F)))
        assert set(out.dims) == {B, time, F}, how
        assert out.lengths[time].tolist() == OP_LENGTHS.tolist()
        got = masked(out).permute(*[out.dims.index(d) for d in (B, time, F)])
        grads = torch.autograd.grad((got * w).sum(), [x_leaf, init_leaf])

        hx, hi = x.clone().requires_grad_(True), initial.clone().requires_grad_(True)
        want = unmask_by_hand([torch.tanh(e) for e in compress_by_hand(hx, OP_MASK)], OP_MASK, hi)
        want_grads = torch.autograd.grad((want * w).sum(), [hx, hi])
        assert_close(got, want, rtol=1e-12, atol=0, msg=lambda s, how=how: f"{how}: {s}")
        # (tanh's gradient at the inf/NaN padding is 0 * nan: it stays in the padding, see test_padding.py)
        valid = valid_mask(OP_LENGTHS, OP_PADDED)
        assert_close(grads[0][valid], want_grads[0][valid], rtol=1e-12, atol=0,
                     msg=lambda s, how=how: f"{how}, gradient w.r.t. x: {s}")
        assert_close(grads[1], want_grads[1], rtol=1e-12, atol=0,
                     msg=lambda s, how=how: f"{how}, gradient w.r.t. initial: {s}")


def test_unmask_of_an_empty_t_prime_is_the_initial_value():
    time = new_time()

    def model(x, m):
        compressed = ll.compress(x, m, axis=time)
        return ll.unmask(compressed, axis=masked_dim_of(compressed), initial=-2.0)

    x = garbage_padded(seed=10)
    out = ll.compile(model)(ll.Named(x, (B, time, F), {time: OP_LENGTHS}),
                            ll.Named(ALL_FALSE, (B, time), {time: OP_LENGTHS}))
    valid = valid_mask(OP_LENGTHS, OP_PADDED)[..., None].expand(-1, -1, F.size)
    assert_close(out.align(B, time, F)[valid], torch.full((int(valid.sum()),), -2.0, dtype=DTYPE), rtol=0, atol=0)


@pytest.mark.parametrize("op", ["add", "mul", "where"])
def test_t_prime_tensor_meeting_a_t_tensor_is_unmasked(op):
    time = new_time()
    apply = {"add": lambda a, b: a + b, "mul": lambda a, b: a * b,
             "where": lambda a, b: ll.where(b > 0.0, a, b)}[op]

    def model(x, m, other):
        return apply(ll.compress(x, m, axis=time), other)

    prog = ll.compile(model)
    x, other = garbage_padded(seed=11), randn(len(OP_LENGTHS), OP_PADDED, F.size, seed=12)
    w = randn(len(OP_LENGTHS), OP_PADDED, F.size, seed=13)
    for how, fn in [("optimized", prog), ("reference", prog.reference)]:
        x_leaf, o_leaf = x.clone().requires_grad_(True), other.clone().requires_grad_(True)
        out = fn(ll.Named(x_leaf, (B, time, F), {time: OP_LENGTHS}), ll.Named(OP_MASK, (B, time), {time: OP_LENGTHS}),
                 ll.Named(o_leaf, (B, time, F), {time: OP_LENGTHS}))
        assert set(out.dims) == {B, time, F}, how
        got = masked(out).permute(*[out.dims.index(d) for d in (B, time, F)])
        grads = torch.autograd.grad((got * w).sum(), [x_leaf, o_leaf])

        hx, ho = x.clone().requires_grad_(True), other.clone().requires_grad_(True)
        held = unmask_by_hand(compress_by_hand(hx, OP_MASK), OP_MASK, torch.zeros(len(OP_LENGTHS), F.size, dtype=DTYPE))
        want = {"add": held + ho, "mul": held * ho, "where": torch.where(ho > 0, held, ho)}[op]
        want = torch.where(valid_mask(OP_LENGTHS, OP_PADDED)[..., None], want, 0.0)
        want_grads = torch.autograd.grad((want * w).sum(), [hx, ho])
        assert_close(got, want, rtol=1e-12, atol=0, msg=lambda s, how=how: f"{how}: {s}")
        for name, g, wg in zip(["x", "other"], grads, want_grads):
            assert_close(g, wg, rtol=1e-12, atol=0,
                         msg=lambda s, how=how, name=name: f"{how}, gradient w.r.t. {name}: {s}")


# -- property: random masks, lengths and batch sizes ----------------------------------------------------------

PROPERTY_TIME = new_time()
PROPERTY_MODELS = {held: Example(PROPERTY_TIME, held, seed=7) for held in ("s", "r")}
PROPERTY_PROGRAMS = {held: ll.compile(model) for held, model in PROPERTY_MODELS.items()}


@st.composite
def masked_batches(draw):
    """(lengths, mask, x seed): 1-4 entries of 0-6 frames, padded by 0-2 more, any mask (padding included)."""
    n = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))
    frames = max(lengths) + draw(st.integers(0, 2))
    bits = draw(st.lists(st.booleans(), min_size=n * frames, max_size=n * frames))
    mask = torch.tensor(bits, dtype=torch.bool).reshape(n, frames)
    return torch.tensor(lengths), mask, draw(st.integers(0, 2 ** 16))


@settings(max_examples=50, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(batch=masked_batches(), held=st.sampled_from(["s", "r"]))
def test_example_optimized_equals_reference_for_random_masks(batch, held):
    lengths, mask, seed = batch
    model, prog = PROPERTY_MODELS[held], PROPERTY_PROGRAMS[held]
    x = randn(len(lengths), mask.shape[1], F.size, seed=seed)
    y, acc, h, c = check_equivalent(prog, example_inputs(PROPERTY_TIME, x, mask, lengths), model.parameters())
    assert "not optimized" not in prog.explain(), prog.explain()
    want_y, want_acc, want_h, want_c = torch_example(model, x, mask, lengths)
    m = valid_mask(lengths, mask.shape[1])[..., None]
    assert_close(torch.where(m, y.align(B, PROPERTY_TIME, H), 0.0), torch.where(m, want_y, 0.0),
                 rtol=1e-9, atol=1e-12)
    for got, want in [(acc, want_acc), (h, want_h), (c, want_c)]:
        assert_close(got.align(B, H), want, rtol=1e-9, atol=1e-12)


def test_frames_and_step_index_read_inside_the_block_move_out_with_it():
    """loop.unstack and loop.index inside the block: over T' they are the True frames (and their step numbers)."""
    def model(time, slow):
        def fn(x, m):
            loop = ll.Loop(axis=time)
            loop.state.slow = slow.default_initial_state([B])
            with loop:
                m_t = loop.unstack(m)
                with ll.MaskedComputation(mask=m_t):
                    x_t = loop.unstack(x) * (1.0 + ll.cast(loop.index, DTYPE))
                    s, loop.state.slow = slow(x_t, state=loop.state.slow)
                y = loop.stack(s)
            return y, loop.state.slow
        return fn

    outs, x, slow, time = check_masked_lstm_program(model, block="fused")
    scaled = x * (1.0 + torch.arange(PADDED, dtype=DTYPE))[None, :, None]
    _, _, want_h, _ = torch_slow_states(slow, scaled, MASK, LENGTHS)
    assert_close(outs[-2].align(B, H), want_h, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", ["float mask", "mask without the axis", "x without the axis", "unmask a plain dim"])
def test_compress_and_unmask_errors_name_the_line_and_dims(case):
    time = new_time()

    def model(x, m):
        if case == "float mask":
            return ll.compress(x, ll.cast(m, DTYPE), axis=time)
        if case == "mask without the axis":
            return ll.compress(x, ll.full(True, [B]), axis=time)
        if case == "x without the axis":
            return ll.compress(ll.sum(x, axis=time), m, axis=time)
        return ll.unmask(x, axis=time)

    error, words = {"float mask": (ll.errors.DTypeError, "bool mask"),
                    "mask without the axis": (ll.errors.DimError, "time"),
                    "x without the axis": (ll.errors.DimError, "time"),
                    "unmask a plain dim": (ll.errors.DimError, "not a masked dim")}[case]
    x = randn(len(LENGTHS), PADDED, F.size, seed=1)
    with pytest.raises(error, match=rf"(?s){words}.*test_masked.py:\d+") as info:
        ll.compile(model)(*example_inputs(time, x, MASK, LENGTHS))
    assert "compress" in str(info.value) or "unmask" in str(info.value)
