"""Nested loops moved out of the loop around them.

A loop nested in a body that reads frames of the outer loop's inputs (and
values computed from them) but no state the outer loop carries does not
depend on the previous outer step. The optimizer runs it once, before the
outer loop, over all outer steps at once: the outer loop's dim becomes one
more batch dim of the inner loop, which is then optimized in turn (an LSTM
step becomes the fused LSTM over the inner axis, for every word of every
sentence at once).

Checked here, in float64, with padded batches (lengths differ per entry and
per outer step): optimized == reference interpreter, outputs and gradients;
``explain`` says the inner loop moved and what it became; a nested loop that
reads a carried state stays in the body and stays correct.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from random_programs import assert_equivalent

import looplift as ll

DTYPE = torch.float64
B = ll.batch_dim
WORD = ll.Dim("word", length_dims=[B])
CHAR = ll.Dim("char", length_dims=[B, WORD])   # characters per word: lengths per entry and word
F, H, G = ll.Dim("f", 3), ll.Dim("h", 4), ll.Dim("g", 5)


def reports(prog: ll.Program) -> dict:
    return {r.axis: r for r in prog.traces[-1].optimized.reports}


def char_data(n_word: list[int], n_char: list[list[int]], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n_b, w_max = len(n_word), max([1, *n_word])
    c_max = max([1, *(c for row in n_char for c in row)])
    chars = torch.zeros(n_b, w_max, dtype=torch.int64)
    for b, row in enumerate(n_char):
        chars[b, :len(row)] = torch.tensor(row, dtype=torch.int64)
    x = torch.randn(n_b, w_max, c_max, F.size, generator=g, dtype=DTYPE)
    return x, torch.tensor(n_word), chars


class CharWords(ll.Module):
    """A word-level LSTM over words, each word encoded by a character-level LSTM written as an inner loop."""

    def __init__(self):
        super().__init__()
        self.char_lstm = ll.nn.LSTM(F, H)
        self.word_lstm = ll.nn.LSTM(H, G)
        self.out = ll.nn.Linear(G, F)

    def forward(self, x):
        loop = ll.Loop(axis=WORD)
        loop.state.word = self.word_lstm.default_initial_state()
        with loop:
            x_w = loop.unstack(x)                       # the characters of word w
            inner = ll.Loop(axis=CHAR)
            inner.state.c = self.char_lstm.default_initial_state()
            with inner:
                _, inner.state.c = self.char_lstm(inner.unstack(x_w), state=inner.state.c)
            word_vec = inner.state.c.h                  # the word's last character state
            y, loop.state.word = self.word_lstm(word_vec, state=loop.state.word)
            ys = loop.stack(self.out(y))
        loss = ll.sum(ys * ys, axis=[B, WORD, F])
        return loss, ys, loop.state.word.h


def _check_char_words(n_word, n_char, seed=0):
    torch.manual_seed(seed)
    model = CharWords().double()
    prog = ll.compile(model)
    x, nw, nc = char_data(n_word, n_char, seed)
    params = dict(model.named_parameters())
    assert_equivalent(prog, params, {"x": x},
                      lambda t: [ll.Named(t["x"], (B, WORD, CHAR, F), {WORD: nw, CHAR: nc})])
    return prog


def test_char_lstm_in_a_word_loop_runs_once_for_all_words_as_the_fused_lstm():
    prog = _check_char_words([3, 1, 2], [[2, 4, 1], [3], [1, 2]])
    rep = reports(prog)
    word, char = rep["word"], rep["char"]
    assert any("loop over 'char'" in m for m in word.before_loop), prog.explain()
    assert not any(s.startswith("loop ") for s, _ in word.stayed), prog.explain()
    # the moved inner loop became the fused LSTM over the characters of all words at once
    assert char.loop_removed and any("fused LSTM" in f for f in char.sequence_forms), prog.explain()
    # and the word LSTM, carrying only its own state, is the fused LSTM over the words: nothing is left
    assert word.loop_removed and any("fused LSTM" in f and "'word[0]'" in f
                                     for f in word.sequence_forms), prog.explain()


def test_the_fused_char_lstm_runs_once_over_the_characters_of_all_words(monkeypatch):
    calls = []   # packed frames of every fused LSTM kernel call
    fused = torch._VF.lstm

    def recording(data, batch_sizes, *args):
        calls.append(data.shape[0])
        return fused(data, batch_sizes, *args)

    monkeypatch.setattr(torch._VF, "lstm", recording)
    n_char = [[2, 4, 1], [3, 1]]
    _check_char_words([3, 2], n_char)
    # one call over the 11 characters of all 5 words (plus one frame for the padding word of the second
    # entry, which has none: a packed sequence has at least one), one over the 5 words; per optimized run
    # (the equivalence check runs it with and without gradients)
    assert sorted(calls) == [5, 5, 11 + 1, 11 + 1], calls


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=3), min_size=1, max_size=3),
       st.integers(0, 10))
def test_char_words_equivalent_on_random_lengths(n_char, seed):
    """Entries with no word, words with no character (an empty inner loop), padding everywhere."""
    _check_char_words([len(row) for row in n_char], n_char, seed)


S = ll.Dim("sub", 3)


@pytest.mark.parametrize("variant", ["plain", "end", "last", "index", "stack", "outer_end", "invariant_init"])
def test_inner_loop_variants_move_and_agree(variant):
    """An inner loop over a static dim inside a loop over time, on frames only: moved for all frames."""
    T = ll.Dim("time", length_dims=[B])
    torch.manual_seed(3)
    lin = ll.nn.Linear(F + H, H).double()
    lin2 = ll.nn.Linear(H + H, H).double()

    def f(x, y):
        loop = ll.Loop(axis=T)
        loop.state.h = ll.zeros([H])
        with loop:
            x_t = loop.unstack(x)
            inner = ll.Loop(axis=S)
            inner.state.a = ll.zeros([H]) if variant == "invariant_init" else ll.tanh(lin(
                ll.concat(x_t, ll.zeros([H]), axis=[F, H])))
            with inner:
                e = inner.unstack(y) + x_t
                if variant == "index":
                    e = e + ll.cast(inner.index, DTYPE) * 0.1 + ll.cast(loop.index, DTYPE) * 0.01
                inner.state.a = ll.tanh(lin(ll.concat(e, inner.state.a, axis=[F, H])))
                if variant == "end":
                    inner.end(ll.sum(inner.state.a, axis=H) > 0.5, include_eos=True)
                a_seq = inner.stack(inner.state.a * 2.0)
                tracked = inner.state.a * 3.0
            got = inner.last(tracked) if variant == "last" else inner.state.a
            if variant == "stack":
                got = got + ll.sum(a_seq, axis=S)
            loop.state.h = ll.tanh(lin2(ll.concat(got, loop.state.h, axis=[H, H])))
            if variant == "outer_end":
                loop.end(ll.sum(loop.state.h, axis=H) > 1.0, include_eos=True)
            out = loop.stack(loop.state.h)
            seqs = loop.stack(a_seq)
        loss = ll.sum(out * out, axis=[B, T, H]) + ll.sum(seqs, axis=[B, T, S, H])
        return loss, out, seqs, loop.state.h

    prog = ll.compile(f)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 5, F.size, generator=g, dtype=DTYPE)
    y = torch.randn(3, S.size, F.size, generator=g, dtype=DTYPE)
    lengths = torch.tensor([5, 2, 0])
    params = {**{f"lin.{k}": v for k, v in lin.named_parameters()},
              **{f"lin2.{k}": v for k, v in lin2.named_parameters()}}
    assert_equivalent(prog, params, {"x": x, "y": y},
                      lambda t: [ll.Named(t["x"], (B, T, F), {T: lengths}), ll.Named(t["y"], (B, S, F))])
    time = reports(prog)["time"]
    assert any("loop over 'sub'" in m for m in time.before_loop), prog.explain()
    assert not any(s.startswith("loop ") for s, _ in time.stayed), prog.explain()


def test_inner_loop_reading_a_carried_state_stays_and_agrees():
    T = ll.Dim("time", length_dims=[B])
    torch.manual_seed(4)
    lin = ll.nn.Linear(F + H, H).double()

    def f(x, y):
        loop = ll.Loop(axis=T)
        loop.state.h = ll.zeros([H])
        with loop:
            x_t = loop.unstack(x)
            inner = ll.Loop(axis=S)
            inner.state.a = loop.state.h              # the outer loop's carried state
            with inner:
                e = inner.unstack(y) + x_t
                inner.state.a = ll.tanh(lin(ll.concat(e, inner.state.a, axis=[F, H])))
            loop.state.h = inner.state.a
            out = loop.stack(loop.state.h)
        return ll.sum(out * out, axis=[B, T, H]), out

    prog = ll.compile(f)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, F.size, generator=g, dtype=DTYPE)
    y = torch.randn(2, S.size, F.size, generator=g, dtype=DTYPE)
    params = {f"lin.{k}": v for k, v in lin.named_parameters()}
    assert_equivalent(prog, params, {"x": x, "y": y},
                      lambda t: [ll.Named(t["x"], (B, T, F), {T: torch.tensor([4, 1])}), ll.Named(t["y"], (B, S, F))])
    time = reports(prog)["time"]
    stayed = [(s, chain) for s, chain in time.stayed if s.startswith("loop ")]
    assert stayed and "state 'h'" in stayed[0][1][-1], prog.explain()
    assert not time.before_loop, prog.explain()
