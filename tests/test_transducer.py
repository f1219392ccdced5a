"""The seeds' transducer, written as DESIGN §9 writes it: a loop over alignment steps with a position state,
the frame gathered at it, a slow label LSTM under MaskedComputation, a fast network and ``choice``.

In train mode (a fixed alignment) nothing depends on the previous step's computation: the position is a
running sum of the blanks, the end is known before the loop, the slow LSTM runs fused over the label frames.
Every test here compares with the same model written by hand in plain PyTorch, step by step."""

import pytest
import torch
from loop_helpers import assert_same_named
from torch.testing import assert_close

import looplift as ll
from looplift import Dim
from looplift import batch_dim as B

DTYPE = torch.float64
BLANK, BOS = 0, 3
F, V = Dim("feat", 3), Dim("vocab", 4)          # vocab: blank, two labels, BOS (only as the first input)
EMB, SLOW, JOINT = Dim("emb", 5), Dim("slow", 6), Dim("joint", 7)


class SeedTransducer(ll.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = ll.nn.Embedding(V, EMB)
        self.slow = ll.nn.LSTM(EMB, SLOW)
        self.from_frame = ll.nn.Linear(F, JOINT)
        self.from_slow = ll.nn.Linear(SLOW, JOINT)
        self.readout = ll.nn.Linear(JOINT, V)
        self.to(DTYPE)

    def forward(self, enc, alignment, *, enc_time, align):
        loop = ll.Loop(axis=align, max_seq_len=3 * ll.length(enc_time) + 1)
        loop.state.t = ll.zeros([], dtype="int64")
        loop.state.label = ll.full(BOS, sparse_dim=V)
        loop.state.slow = self.slow.default_initial_state()
        with loop:
            x_t = ll.gather(enc, index=loop.state.t, axis=enc_time)
            with ll.MaskedComputation(mask=loop.state.label != BLANK):
                slow, loop.state.slow = self.slow(self.embed(loop.state.label), state=loop.state.slow)
            fast = ll.tanh(self.from_frame(x_t) + self.from_slow(slow))
            log_probs = ll.log_softmax(self.readout(fast), axis=V)
            loop.state.label = ll.choice(log_probs, target=alignment, beam_size=4)
            loop.state.t = loop.state.t + ll.cast(loop.state.label == BLANK, "int64")
            loop.end(loop.state.t >= ll.length(enc_time), include_eos=True)
            scores = loop.stack(ll.gather(log_probs, index=loop.state.label, axis=V))
        return -ll.sum(scores, axis=[align, B]), scores, loop.state.slow.h


def alignments(frames: list[int], labels: list[int], *, seed: int) -> list[list[int]]:
    """Per entry: a random alignment of `labels[b]` labels (1 or 2) and `frames[b]` blanks, ending in a blank."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t, u in zip(frames, labels):
        symbols = [BLANK] * (t - 1) + torch.randint(1, 3, (u,), generator=g).tolist()
        order = torch.randperm(len(symbols), generator=g).tolist()
        out.append([symbols[i] for i in order] + [BLANK])
    return out


def inputs(frames: list[int], align: list[list[int]], *, seed: int = 0):
    """Named inputs: encoder frames (padding random) and the alignments (padding random labels)."""
    g = torch.Generator().manual_seed(seed)
    enc_time, align_dim = Dim("enc_time"), Dim("align")
    enc = torch.randn(len(frames), max(frames) + 1, F.size, generator=g, dtype=DTYPE)
    padded = torch.randint(0, 3, (len(align), max(map(len, align)) + 2), generator=g)
    for b, a in enumerate(align):
        padded[b, :len(a)] = torch.tensor(a)
    return (ll.Named(enc, (B, enc_time, F), {enc_time: torch.tensor(frames)}),
            ll.Named(padded, (B, align_dim), {align_dim: torch.tensor([len(a) for a in align])}, sparse_dim=V),
            enc_time, align_dim)


def by_hand(model: SeedTransducer, enc: torch.Tensor, align: list[int]) -> torch.Tensor:
    """The loss of one entry, step by step in plain PyTorch: `enc` its valid frames, `align` its alignment."""
    cell = torch.nn.LSTMCell(EMB.size, SLOW.size).to(DTYPE)
    cell.weight_ih, cell.weight_hh = model.slow.weight_ih_l0, model.slow.weight_hh_l0
    cell.bias_ih, cell.bias_hh = model.slow.bias_ih_l0, model.slow.bias_hh_l0
    h = c = torch.zeros(1, SLOW.size, dtype=DTYPE)
    label, t, loss = BOS, 0, torch.zeros((), dtype=DTYPE)
    for symbol in align:
        if label != BLANK:
            h, c = cell(model.embed.weight[label][None], (h, c))
        fast = torch.tanh(torch.nn.functional.linear(enc[t], model.from_frame.weight, model.from_frame.bias)
                          + torch.nn.functional.linear(h[0], model.from_slow.weight, model.from_slow.bias))
        log_probs = torch.log_softmax(torch.nn.functional.linear(fast, model.readout.weight, model.readout.bias), -1)
        loss = loss - log_probs[symbol]
        label = symbol
        t += symbol == BLANK
        if t >= len(enc):
            break
    return loss


FRAMES, LABELS = [4, 1, 3, 6], [3, 0, 2, 1]


def loss_and_grads(prog, model, named, *, reference: bool, **dims):
    enc = named[0].tensor.detach().clone().requires_grad_(True)
    run = prog.reference if reference else prog
    outs = run(ll.Named(enc, named[0].dims, named[0].lengths), named[1], **dims)
    return outs, torch.autograd.grad(outs[0].tensor, [enc, *model.parameters()])


def fused_lstm_calls(monkeypatch) -> list:
    """Records each call of PyTorch's fused LSTM kernel (the slow LSTM over T')."""
    calls, fused = [], torch._VF.lstm

    def recording(*args):
        calls.append(1)
        return fused(*args)

    monkeypatch.setattr(torch._VF, "lstm", recording)
    return calls


def test_train_mode_moves_everything_out_and_equals_the_reference_and_plain_pytorch(monkeypatch):
    model = SeedTransducer()
    align = alignments(FRAMES, LABELS, seed=1)
    enc, alignment, enc_time, align_dim = inputs(FRAMES, align)
    prog = ll.compile(model, mode="train")
    dims = {"enc_time": enc_time, "align": align_dim}
    fused = fused_lstm_calls(monkeypatch)
    outs, grads = loss_and_grads(prog, model, (enc, alignment), reference=False, **dims)
    assert len(fused) == 1   # the slow LSTM, once over the label frames of all entries
    ref_outs, ref_grads = loss_and_grads(prog, model, (enc, alignment), reference=True, **dims)
    for a, b in zip(outs, ref_outs):
        assert_same_named(a, b)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, rtol=1e-9, atol=1e-11)

    expected = sum(by_hand(model, enc.tensor[b, :FRAMES[b]], a) for b, a in enumerate(align))
    assert_close(outs[0].tensor, expected, rtol=1e-10, atol=1e-10)
    hand_grads = torch.autograd.grad(expected, list(model.parameters()))
    for g, r in zip(grads[1:], hand_grads):
        assert_close(g, r, rtol=1e-9, atol=1e-11)

    text = prog.explain()
    loops = {entry.split(" at ")[0]: entry for entry in text.split("loop over ")[1:]}
    assert set(loops) == {"'align'", '"align\'"'}, text
    align_loop, slow_loop = loops["'align'"], loops['"align\'"']
    assert "nothing left in the loop: it is gone" in align_loop, text
    assert "MaskedComputation at" in align_loop and "runs over align'" in align_loop, text
    assert "running sum as a cumulative sum carrying 't'" in align_loop, text
    assert "gather" in align_loop.split("moved in")[1] and "log_softmax" in align_loop, text
    assert "checked at run time" in align_loop, text
    assert "fused LSTM over the sequence carrying 'slow[0]', 'slow[1]'" in slow_loop, text
    assert "nothing left in the loop: it is gone" in slow_loop, text


def test_each_entry_alone_equals_the_batch():
    model = SeedTransducer(seed=2)
    align = alignments(FRAMES, LABELS, seed=3)
    enc, alignment, enc_time, align_dim = inputs(FRAMES, align, seed=4)
    prog = ll.compile(model, mode="train")
    _, scores, slow_h = prog(enc, alignment, enc_time=enc_time, align=align_dim)
    for b in range(len(FRAMES)):
        one_enc, one_align, t1, a1 = inputs([FRAMES[b]], [align[b]], seed=5)
        one_enc.tensor[0, :FRAMES[b]] = enc.tensor[b, :FRAMES[b]]
        _, one_scores, one_h = prog(one_enc, one_align, enc_time=t1, align=a1)
        n = len(align[b])
        assert_close(one_scores.align(B, a1)[0, :n], scores.align(B, align_dim)[b, :n], rtol=1e-12, atol=1e-12)
        assert_close(one_h.align(B, SLOW)[0], slow_h.align(B, SLOW)[b], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["too-many-blanks", "too-few-blanks"])
def test_an_alignment_that_disagrees_with_the_end(case, monkeypatch):
    """Too many blanks: the position reaches the last frame before the alignment ends, so loop.end ends the
    entry early; its later steps run from its frozen states (the loop runs as traced for that batch). Too few:
    the end never comes; the alignment's length bounds the entry. Both: optimized == reference == by hand."""
    model = SeedTransducer(seed=6)
    align = alignments(FRAMES, LABELS, seed=7)
    if case == "too-many-blanks":
        align[0] = align[0] + [BLANK, BLANK]       # the position reaches 4 frames two steps before the end
    else:
        align[3] = align[3][:-2]                   # ends before its last two blanks
    enc, alignment, enc_time, align_dim = inputs(FRAMES, align, seed=8)
    prog = ll.compile(model, mode="train")
    dims = {"enc_time": enc_time, "align": align_dim}
    fused = fused_lstm_calls(monkeypatch)
    outs, grads = loss_and_grads(prog, model, (enc, alignment), reference=False, **dims)
    # an entry ending early: that batch runs the loop as traced (no fused LSTM); else the loop is gone
    assert bool(fused) == (case == "too-few-blanks")
    ref_outs, ref_grads = loss_and_grads(prog, model, (enc, alignment), reference=True, **dims)
    for a, b in zip(outs, ref_outs):
        assert_same_named(a, b)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, rtol=1e-9, atol=1e-11)
    if case == "too-few-blanks":   # the stacked scores end with the alignment: the same as by hand
        expected = sum(by_hand(model, enc.tensor[b, :FRAMES[b]], a) for b, a in enumerate(align))
        assert_close(outs[0].tensor, expected, rtol=1e-10, atol=1e-10)
    else:   # past its end an entry's frames are still stacked (from frozen states): the loss sums them too
        scores = outs[1].align(B, align_dim)
        early = by_hand(model, enc.tensor[0, :FRAMES[0]], align[0])        # the steps up to the end
        n = len(align[0]) - 2
        assert_close(-scores[0, :n].sum(), early, rtol=1e-10, atol=1e-10)
