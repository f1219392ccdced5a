"""``looplift.Loop`` against hand-written Python loops over the same weights.

The contract (DESIGN.md §4): a loop means a Python ``while`` loop running the
body once per step, for each batch entry independently. Every test here writes
that Python loop by hand (per batch entry, for exactly its length), runs the
looplift program with the executor and with the reference interpreter
(``prog.reference``), and compares values at valid positions, lengths and final
states. Everything is float64.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loop_helpers import DTYPE, B, align_to, masked, run_both
from torch.testing import assert_close

import looplift as ll

T = ll.Dim("time")
F = ll.Dim("feat", 3)
H = ll.Dim("hidden", 4)


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DTYPE)


def close(a, b):
    assert_close(a, b, rtol=1e-10, atol=1e-10)


# -- the seed example: h = tanh(W [x_t; h_prev] + b) ---------------------------------------------

def make_tanh_rnn(seed=0):
    torch.manual_seed(seed)
    lin = ll.nn.Linear(F + H, H).double()

    def f(x):
        loop = ll.Loop(axis=T)
        loop.state.h = ll.zeros([H])
        with loop:
            x_t = loop.unstack(x)
            loop.state.h = ll.tanh(lin(ll.concat(x_t, loop.state.h)))
            y = loop.stack(loop.state.h)
        return y, loop.state.h

    return lin, f


def tanh_rnn_by_hand(lin, x_b, n):
    """One entry: x_b over (time, feat), run for exactly n steps."""
    h = torch.zeros(H.size, dtype=DTYPE)
    ys = []
    for t in range(n):
        h = torch.tanh(torch.cat([x_b[t], h]) @ lin.weight.T + lin.bias)
        ys.append(h)
    return (torch.stack(ys) if ys else torch.zeros(0, H.size, dtype=DTYPE)), h


def test_seed_tanh_rnn_per_entry_lengths():
    lin, f = make_tanh_rnn()
    prog = ll.compile(f)
    x = rand(4, 6, 3)
    n = torch.tensor([6, 3, 0, 1])
    y, h = run_both(prog, ll.Named(x, (B, T, F), {T: n}))
    assert set(y.dims) == {B, T, H} and set(h.dims) == {B, H}
    assert torch.equal(y.lengths[T], n)
    yv, hv = y.align(B, T, H), h.align(B, H)
    for b in range(4):
        ys, hb = tanh_rnn_by_hand(lin, x[b], int(n[b]))
        close(yv[b, :n[b]], ys)
        close(hv[b], hb)
    # the entry of length 0 keeps its initial state
    assert torch.equal(hv[2], torch.zeros(H.size, dtype=DTYPE))


def test_seed_tanh_rnn_padding_does_not_matter():
    lin, f = make_tanh_rnn()
    prog = ll.compile(f)
    x = rand(3, 5, 3)
    n = torch.tensor([5, 2, 4])
    pad = torch.arange(5)[None, :, None] >= n[:, None, None]
    y1, h1 = prog(ll.Named(x, (B, T, F), {T: n}))
    y2, h2 = prog(ll.Named(torch.where(pad, torch.full_like(x, float("nan")), x), (B, T, F), {T: n}))
    close(masked(y1), masked(y2))
    close(h1.tensor, h2.tensor)


# -- one LSTM module called twice per step ---------------------------------------------------------

class TwoCallLSTM(ll.Module):
    """One LSTM (in_dim == out_dim) called twice per step, with one shared or two separate states."""

    def __init__(self, shared: bool):
        super().__init__()
        self.shared = shared
        self.lstm = ll.nn.LSTM(H, H)

    def forward(self, x):
        loop = ll.Loop(axis=T)
        if self.shared:
            loop.state.s = self.lstm.default_initial_state()
        else:
            loop.state.s1 = self.lstm.default_initial_state()
            loop.state.s2 = self.lstm.default_initial_state()
        with loop:
            x_t = loop.unstack(x)
            if self.shared:
                h1, loop.state.s = self.lstm(x_t, state=loop.state.s)
                h2, loop.state.s = self.lstm(h1, state=loop.state.s)
            else:
                h1, loop.state.s1 = self.lstm(x_t, state=loop.state.s1)
                h2, loop.state.s2 = self.lstm(h1, state=loop.state.s2)
            y1, y2 = loop.stack(h1), loop.stack(h2)
        finals = (loop.state.s,) if self.shared else (loop.state.s1, loop.state.s2)
        return y1, y2, finals


def lstm_cell_from(model: TwoCallLSTM) -> torch.nn.LSTMCell:
    cell = torch.nn.LSTMCell(H.size, H.size).double()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(model.lstm, f"{name}_l0"))
    return cell


@pytest.mark.parametrize("shared", [True, False])
def test_lstm_called_twice_per_step(shared):
    torch.manual_seed(1)
    model = TwoCallLSTM(shared).double()
    # one set of parameters, named by the attribute chain
    assert sorted(n for n, _ in model.named_parameters()) == [
        "lstm.bias_hh_l0", "lstm.bias_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l0"]
    prog = ll.compile(model)
    x = rand(3, 5, H.size, seed=2).requires_grad_()
    n = torch.tensor([5, 2, 4])
    y1, y2, finals = run_both(prog, ll.Named(x, (B, T, H), {T: n}))
    assert len(prog.traces[0].graph.params) == 4
    cell = lstm_cell_from(model)
    zero = lambda: (torch.zeros(1, H.size, dtype=DTYPE), torch.zeros(1, H.size, dtype=DTYPE))  # noqa: E731
    loss_ref = 0
    for b in range(3):
        s1 = zero()
        s2 = s1 if shared else zero()
        for t in range(int(n[b])):
            if shared:
                s1 = cell(x[b, t][None], s1)
                s1_out = s1
                s1 = cell(s1[0], s1)
                s2 = s1
                h1, h2 = s1_out[0][0], s1[0][0]
            else:
                s1 = cell(x[b, t][None], s1)
                s2 = cell(s1[0], s2)
                h1, h2 = s1[0][0], s2[0][0]
            close(y1.align(B, T, H)[b, t], h1)
            close(y2.align(B, T, H)[b, t], h2)
            loss_ref = loss_ref + (h1 * 0.5 + h2).sum()
        if shared:
            close(finals[0].h.align(B, H)[b], s1[0][0])
            close(finals[0].c.align(B, H)[b], s1[1][0])
        else:
            close(finals[0].h.align(B, H)[b], s1[0][0])
            close(finals[0].c.align(B, H)[b], s1[1][0])
            close(finals[1].h.align(B, H)[b], s2[0][0])
            close(finals[1].c.align(B, H)[b], s2[1][0])
    # gradients flow into the one shared set of parameters from both calls
    loss = (masked(y1) * 0.5 + masked(y2)).sum()
    grads = torch.autograd.grad(loss, [x, *[getattr(model.lstm, f"{k}_l0") for k in
                                            ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]])
    grads_ref = torch.autograd.grad(loss_ref, [x, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh])
    for g, r in zip(grads, grads_ref):
        close(g, r)


# -- a counting loop with no input, ended by loop.end -------------------------------------------------

def counting_program(include_eos: bool, max_seq_len=20):
    def f(k):
        loop = ll.Loop(max_seq_len=max_seq_len)
        loop.state.i = 0
        with loop:
            loop.state.i = loop.state.i + 1
            loop.end(loop.state.i >= k, include_eos=include_eos)
            ys = loop.stack(loop.state.i * 10)
            idx = loop.stack(loop.index)
        return loop.axis, ys, idx, loop.state.i

    dims = {}

    def g(k):
        axis, ys, idx, i = f(k)
        dims["axis"] = axis
        return ys, idx, i

    return ll.compile(g), dims


@pytest.mark.parametrize("include_eos", [True, False])
def test_counting_loop_end(include_eos):
    prog, dims = counting_program(include_eos)
    k = torch.tensor([3, 1, 5, 0, 2])
    ys, idx, i = run_both(prog, ll.Named(k, (B,)))
    axis = dims["axis"]
    assert ys.dims[0] is axis and axis.is_dynamic
    # by hand: a Python while loop per entry
    exp_len, exp_i, exp_ys = [], [], []
    for kb in k.tolist():
        i_b, steps, vals = 0, 0, []
        while True:
            new_i = i_b + 1
            if new_i >= kb:
                if include_eos:
                    i_b, steps = new_i, steps + 1
                    vals.append(new_i * 10)
                break
            i_b, steps = new_i, steps + 1
            vals.append(new_i * 10)
        exp_len.append(steps)
        exp_i.append(i_b)
        exp_ys.append(vals)
    assert ys.lengths[axis].tolist() == exp_len
    assert idx.lengths[axis].tolist() == exp_len
    assert i.tensor.tolist() == exp_i
    assert i.tensor.dtype == torch.int64
    ys_v, idx_v = ys.align(B, axis), align_to(idx, B, axis, sizes={B: len(k)})
    for b, vals in enumerate(exp_ys):
        assert ys_v[b, :len(vals)].tolist() == vals
        assert idx_v[b, :len(vals)].tolist() == list(range(len(vals)))
    if include_eos:
        assert exp_len == [3, 1, 5, 1, 2]
    else:
        assert exp_len == [2, 0, 4, 0, 1]


def test_counting_loop_past_max_seq_len_raises_naming_the_line():
    def f(k):
        loop = ll.Loop(max_seq_len=3)  # LOOP-LINE
        loop.state.i = 0
        with loop:
            loop.state.i = loop.state.i + 1
            loop.end(loop.state.i >= k, include_eos=True)
        return loop.state.i

    prog = ll.compile(f)
    assert prog(ll.Named(torch.tensor([3, 1]), (B,))).tensor.tolist() == [3, 1]
    line = next(i for i, s in enumerate(open(__file__).read().splitlines(), 1) if "# LOOP-LINE" in s
                and "ll.Loop(" in s)
    for run in (prog, prog.reference):
        with pytest.raises(ll.errors.ExecutionError, match=rf"test_loop\.py:{line}\b.*max_seq_len"):
            run(ll.Named(torch.tensor([3, 5]), (B,)))


def test_max_seq_len_per_entry():
    def f(k, m):
        loop = ll.Loop(max_seq_len=m)
        loop.state.i = 0
        with loop:
            loop.state.i = loop.state.i + 1
            loop.end(loop.state.i >= k, include_eos=True)
        return loop.state.i

    prog = ll.compile(f)
    k, m = torch.tensor([3, 6]), torch.tensor([3, 6])
    assert run_both(prog, ll.Named(k, (B,)), ll.Named(m, (B,))).tensor.tolist() == [3, 6]
    with pytest.raises(ll.errors.ExecutionError, match="max_seq_len"):
        prog(ll.Named(torch.tensor([4, 1]), (B,)), ll.Named(m, (B,)))


# -- nested-structure state, last, index ------------------------------------------------------------

@dataclasses.dataclass
class Acc:
    total: ll.Tensor
    count: ll.Tensor


def test_nested_structure_state_last_and_index():
    torch.manual_seed(3)
    lin = ll.nn.Linear(F, H).double()

    def f(x):
        loop = ll.Loop(axis=T)
        loop.state.pair = (ll.zeros([H]), ll.ones([F]))
        loop.state.d = {"prod": ll.ones([F]), "inner": (ll.zeros([]), {"max": ll.full(-1e9, [F])})}
        loop.state.acc = Acc(total=ll.zeros([F]), count=0)
        with loop:
            x_t = loop.unstack(x)
            a, b = loop.state.pair
            loop.state.pair = (ll.tanh(lin(x_t * b) + a), b * 0.5)
            d = loop.state.d
            loop.state.d = {"prod": d["prod"] * x_t,
                            "inner": (d["inner"][0] + ll.sum(x_t, axis=F),
                                      {"max": ll.maximum(d["inner"][1]["max"], x_t)})}
            acc = loop.state.acc
            loop.state.acc = Acc(total=acc.total + x_t, count=acc.count + 1)
            h = loop.state.pair[0]
            y = loop.stack(h)
            i = loop.stack(loop.index)
            i2 = loop.stack(loop.index * 2 + 1)
        return y, loop.last(h), loop.last(x_t), i, i2, loop.state.pair, loop.state.d, loop.state.acc

    prog = ll.compile(f)
    x = rand(3, 5, 3, seed=4)
    n = torch.tensor([5, 1, 3])
    y, last_h, last_x, i, i2, pair, d, acc = run_both(prog, ll.Named(x, (B, T, F), {T: n}))
    assert isinstance(pair, tuple) and isinstance(d, dict) and isinstance(acc, Acc)
    assert isinstance(d["inner"], tuple) and isinstance(d["inner"][1], dict)
    iv = align_to(i, B, T, sizes={B: 3})
    i2v = align_to(i2, B, T, sizes={B: 3})
    assert torch.equal(i.lengths[T], n)
    assert i.tensor.dtype == torch.int64
    for bi in range(3):
        a, b = torch.zeros(H.size, dtype=DTYPE), torch.ones(F.size, dtype=DTYPE)
        prod, s, mx = torch.ones(F.size, dtype=DTYPE), torch.zeros((), dtype=DTYPE), torch.full((F.size,), -1e9,
                                                                                                    dtype=DTYPE)
        total, count = torch.zeros(F.size, dtype=DTYPE), 0
        for t in range(int(n[bi])):
            xt = x[bi, t]
            a, b = torch.tanh((xt * b) @ lin.weight.T + lin.bias + a), b * 0.5
            prod, s, mx = prod * xt, s + xt.sum(), torch.maximum(mx, xt)
            total, count = total + xt, count + 1
            close(y.align(B, T, H)[bi, t], a)
        assert iv[bi, :n[bi]].tolist() == list(range(int(n[bi])))
        assert i2v[bi, :n[bi]].tolist() == [2 * t + 1 for t in range(int(n[bi]))]
        close(last_h.align(B, H)[bi], a)
        close(last_x.align(B, F)[bi], x[bi, int(n[bi]) - 1])
        close(pair[0].align(B, H)[bi], a)
        close(align_to(pair[1], B, F, sizes={B: 3})[bi], b)
        close(align_to(d["prod"], B, F, sizes={B: 3})[bi], prod)
        close(align_to(d["inner"][0], B, sizes={B: 3})[bi], s)
        close(align_to(d["inner"][1]["max"], B, F, sizes={B: 3})[bi], mx)
        close(align_to(acc.total, B, F, sizes={B: 3})[bi], total)
        assert align_to(acc.count, B, sizes={B: 3})[bi].item() == count


_TWO_LAYOUTS: dict = {}


def two_layouts_prog():
    """A loop with two states laid out differently (one starts without the batch dim) and two lasts."""
    if not _TWO_LAYOUTS:
        torch.manual_seed(5)
        lin = ll.nn.Linear(F + H, H).double()

        def f(x):
            loop = ll.Loop(axis=T)
            loop.state.h = ll.zeros([H])
            loop.state.s = ll.zeros([F])
            with loop:
                x_t = loop.unstack(x)
                h = ll.tanh(lin(ll.concat(x_t, loop.state.h)))
                loop.state.h = h
                loop.state.s = loop.state.s * 0.5 + x_t
            return loop.last(h), loop.last(x_t), loop.state.h, loop.state.s

        _TWO_LAYOUTS.update(prog=ll.compile(f), lin=lin)
    return _TWO_LAYOUTS["prog"], _TWO_LAYOUTS["lin"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lens=st.lists(st.integers(0, 5), min_size=1, max_size=4), pad=st.integers(0, 2), seed=st.integers(0, 99))
def test_states_of_two_layouts_and_lasts_per_entry_length(lens, pad, seed):
    """States frozen past each entry's length and ``loop.last`` of two values, for any lengths (0 and 1
    included): as the Python loop over each entry; an entry that ran no step has zeros as its lasts."""
    prog, lin = two_layouts_prog()
    n = torch.tensor(lens)
    x = rand(len(lens), max(lens) + pad, F.size, seed=seed)
    last_h, last_x, h, s = run_both(prog, ll.Named(x, (B, T, F), {T: n}))
    for b, length in enumerate(lens):
        h_b, s_b = torch.zeros(H.size, dtype=DTYPE), torch.zeros(F.size, dtype=DTYPE)
        for t in range(length):
            h_b = torch.tanh(torch.cat([x[b, t], h_b]) @ lin.weight.T + lin.bias)
            s_b = s_b * 0.5 + x[b, t]
        close(h.align(B, H)[b], h_b)
        close(align_to(s, B, F, sizes={B: len(lens)})[b], s_b)
        close(last_h.align(B, H)[b], h_b)   # (an entry of length 0: zeros, which its initial state is too)
        close(last_x.align(B, F)[b], x[b, length - 1] if length else torch.zeros(F.size, dtype=DTYPE))


def test_last_of_loop_ended_by_end():
    """`last` is the value at each entry's last counted step (include_eos decides which step that is)."""
    for include_eos in (True, False):
        def f(k, include_eos=include_eos):
            loop = ll.Loop(max_seq_len=10)
            loop.state.i = 0
            with loop:
                v = loop.state.i * 3 + 1
                idx = loop.index
                loop.state.i = loop.state.i + 1
                loop.end(loop.state.i >= k, include_eos=include_eos)
            return loop.last(v), loop.last(idx), loop.state.i

        k = torch.tensor([4, 1, 2])
        last_v, last_idx, i = run_both(ll.compile(f), ll.Named(k, (B,)))
        n = [4, 1, 2] if include_eos else [3, 0, 1]
        assert i.tensor.tolist() == n
        for b in range(3):
            if n[b]:
                assert align_to(last_v, B, sizes={B: 3})[b].item() == (n[b] - 1) * 3 + 1
                assert align_to(last_idx, B, sizes={B: 3})[b].item() == n[b] - 1


# -- state edge cases -----------------------------------------------------------------------------------

def test_state_initial_values_without_batch_constants_read_only_and_reassignment():
    three_f = ll.Dim("three_f", 9)
    def f(x, w0):
        loop = ll.Loop(axis=T)
        loop.state.z = ll.zeros([F])           # no batch dim
        loop.state.num = 2.5                   # a Python number
        loop.state.const = ll.zeros([F])       # assigned a constant every step
        loop.state.ro = w0                     # only read: stays equal to its initial value
        loop.state.ro_num = 7                  # only read, a Python int
        loop.state.multi = ll.zeros([F])       # assigned several times per step
        with loop:
            x_t = loop.unstack(x)
            loop.state.z = loop.state.z + x_t * loop.state.ro
            loop.state.num = loop.state.num * 2.0
            loop.state.const = ll.ones([F]) * 3.0
            before = loop.state.multi                        # previous step's value
            loop.state.multi = before + x_t
            after1 = loop.state.multi                        # read after assign: the new value
            loop.state.multi = ll.tanh(loop.state.multi) * 2.0  # the last assignment wins
            after2 = loop.state.multi
            loop.state.multi = after2 * 0.5 + before * loop.state.ro_num
            seen = loop.stack(ll.concat(before, after1, after2, axis=F, out_dim=three_f))
        return (loop.state.z, loop.state.num, loop.state.const, loop.state.ro, loop.state.ro_num,
                loop.state.multi, seen)

    prog = ll.compile(f)
    x = rand(3, 4, 3, seed=6)
    w0 = rand(3, 3, seed=7)
    n = torch.tensor([4, 0, 2])
    z, num, const, ro, ro_num, multi, seen = run_both(prog, ll.Named(x, (B, T, F), {T: n}), ll.Named(w0, (B, F)))
    for b in range(3):
        zb, numb, cb, mb = torch.zeros(3, dtype=DTYPE), 2.5, torch.zeros(3, dtype=DTYPE), torch.zeros(3, dtype=DTYPE)
        for t in range(int(n[b])):
            zb = zb + x[b, t] * w0[b]
            numb = numb * 2.0
            cb = torch.full((3,), 3.0, dtype=DTYPE)
            before = mb
            a1 = before + x[b, t]
            a2 = torch.tanh(a1) * 2.0
            mb = a2 * 0.5 + before * 7
            close(seen.align(B, T, three_f)[b, t], torch.cat([before, a1, a2]))
        close(align_to(z, B, F, sizes={B: 3})[b], zb)
        close(align_to(num, B, sizes={B: 3})[b], torch.tensor(numb, dtype=DTYPE))
        close(align_to(const, B, F, sizes={B: 3})[b], cb)
        close(align_to(multi, B, F, sizes={B: 3})[b], mb)
    assert num.tensor.dtype == DTYPE and const.tensor.dtype == DTYPE
    close(align_to(ro, B, F), w0)
    assert align_to(ro_num, B, sizes={B: 3}).tolist() == [7, 7, 7]


# -- gradients --------------------------------------------------------------------------------------

def test_gradients_through_loop():
    lin, f = make_tanh_rnn(seed=8)
    prog = ll.compile(f)
    x = rand(3, 5, 3, seed=9)
    n = torch.tensor([5, 2, 4])
    wy = rand(3, 5, 4, seed=10)
    wh = rand(3, 4, seed=11)
    grads = []
    for run in (prog, prog.reference):
        xg = x.clone().requires_grad_()
        y, h = run(ll.Named(xg, (B, T, F), {T: n}))
        loss = (masked(y).permute([y.dims.index(d) for d in (B, T, H)]) * wy).sum() + (h.align(B, H) * wh).sum()
        grads.append(torch.autograd.grad(loss, [xg, lin.weight, lin.bias]))
    xg = x.clone().requires_grad_()
    loss = 0
    for b in range(3):
        ys, hb = tanh_rnn_by_hand(lin, xg[b], int(n[b]))
        loss = loss + (ys * wy[b, :n[b]]).sum() + (hb * wh[b]).sum()
    expected = torch.autograd.grad(loss, [xg, lin.weight, lin.bias])
    for g in grads:
        for a, e in zip(g, expected):
            close(a, e)
    # padding frames get no gradient
    pad = torch.arange(5)[None, :] >= n[:, None]
    assert torch.all(grads[0][0][pad] == 0)


# -- cond inside a loop ------------------------------------------------------------------------------

def test_cond_inside_loop_both_branches():
    torch.manual_seed(12)
    lin_a = ll.nn.Linear(F, H).double()
    lin_b = ll.nn.Linear(F, H).double()

    def f(x):
        loop = ll.Loop(axis=T)
        loop.state.h = ll.zeros([H])
        loop.state.branches = (0, 0)
        with loop:
            x_t = loop.unstack(x)
            with ll.Cond(loop.index % 2 == 0) as cond:
                cond.true = (ll.tanh(lin_a(x_t) + loop.state.h), 1, loop.index * 2)    # the loop's index,
                cond.false = (ll.sigmoid(lin_b(x_t)) - loop.state.h, 10, loop.index * 3)  # read in a branch
            h, which, idx = cond.result
            loop.state.h = h
            a, b = loop.state.branches
            loop.state.branches = (a + which, b + 1)
            y = loop.stack(h)
            idxs = loop.stack(idx)
        return y, idxs, loop.state.h, loop.state.branches

    prog = ll.compile(f)
    x = rand(3, 5, 3, seed=13)
    n = torch.tensor([5, 2, 3])
    y, idxs, h, (br, steps) = run_both(prog, ll.Named(x, (B, T, F), {T: n}))
    assert align_to(idxs, B, T, sizes={B: 3})[0].tolist() == [0, 3, 4, 9, 8]
    for b in range(3):
        hb, count = torch.zeros(4, dtype=DTYPE), 0
        for t in range(int(n[b])):
            if t % 2 == 0:
                hb, count = torch.tanh(x[b, t] @ lin_a.weight.T + lin_a.bias + hb), count + 1
            else:
                hb, count = torch.sigmoid(x[b, t] @ lin_b.weight.T + lin_b.bias) - hb, count + 10
            close(y.align(B, T, H)[b, t], hb)
        close(h.align(B, H)[b], hb)
        assert align_to(br, B, sizes={B: 3})[b].item() == count
        assert align_to(steps, B, sizes={B: 3})[b].item() == int(n[b])


# -- nested loops: words inside sentences ------------------------------------------------------------

SENT = ll.Dim("sent")
WORD = ll.Dim("word", length_dims=[B, SENT])


def nested_data(extra_pad: int, seed=14):
    """Sentences of words; `extra_pad`: padding frames beyond the longest sentence and word."""
    g = torch.Generator().manual_seed(seed)
    n_sent = torch.tensor([3, 1, 0, 2])
    n_word = torch.tensor([[4, 1, 2], [3, 0, 0], [0, 0, 0], [0, 2, 0]])  # (batch, sent); beyond n_sent: unused
    n_word = torch.cat([n_word, torch.zeros(4, extra_pad, dtype=torch.int64)], 1)
    x = torch.randn(4, 3 + extra_pad, 4 + extra_pad, 3, generator=g, dtype=DTYPE)
    return x, n_sent, n_word


@pytest.mark.parametrize("extra_pad", [0, 2])
def test_nested_loops_words_in_sentences(extra_pad):
    torch.manual_seed(15)
    lin = ll.nn.Linear(F + H, H).double()

    def f(x):
        outer = ll.Loop(axis=SENT)
        outer.state.doc = ll.zeros([F])
        outer.state.h = ll.zeros([H])        # an RNN over all words, carried across sentences
        with outer:
            x_s = outer.unstack(x)
            inner = ll.Loop(axis=WORD)
            inner.state.s = ll.zeros([F])    # a running sum, restarted per sentence
            inner.state.h = outer.state.h
            with inner:
                x_w = inner.unstack(x_s)
                inner.state.s = inner.state.s + x_w
                inner.state.h = ll.tanh(lin(ll.concat(x_w, inner.state.h)))
                cs = inner.stack(inner.state.s)
                hs = inner.stack(inner.state.h)
                idx = inner.stack(inner.index + outer.index * 100)
            outer.state.doc = outer.state.doc + inner.state.s
            outer.state.h = inner.state.h
            cs_all, hs_all, idx_all = outer.stack(cs), outer.stack(hs), outer.stack(idx)
            sent_sum = outer.stack(inner.state.s)
        return cs_all, hs_all, idx_all, sent_sum, outer.state.doc, outer.state.h

    prog = ll.compile(f)
    x, n_sent, n_word = nested_data(extra_pad)
    inp = ll.Named(x, (B, SENT, WORD, F), {SENT: n_sent, WORD: n_word})
    cs, hs, idx, sent_sum, doc, h = run_both(prog, inp)
    assert set(cs.dims) == {B, SENT, WORD, F} and set(hs.dims) == {B, SENT, WORD, H}
    assert torch.equal(cs.lengths[SENT], n_sent) and torch.equal(cs.lengths[WORD], n_word)
    csv, hsv, sv = cs.align(B, SENT, WORD, F), hs.align(B, SENT, WORD, H), sent_sum.align(B, SENT, F)
    idxv = align_to(idx, B, SENT, WORD, sizes={B: 4})
    for b in range(4):
        doc_b, h_b = torch.zeros(3, dtype=DTYPE), torch.zeros(4, dtype=DTYPE)
        for s in range(int(n_sent[b])):
            run = torch.zeros(3, dtype=DTYPE)
            for w in range(int(n_word[b, s])):
                run = run + x[b, s, w]
                h_b = torch.tanh(torch.cat([x[b, s, w], h_b]) @ lin.weight.T + lin.bias)
                close(csv[b, s, w], run)
                close(hsv[b, s, w], h_b)
                assert idxv[b, s, w].item() == w + 100 * s
            close(sv[b, s], run)
            doc_b = doc_b + run
        close(doc.align(B, F)[b], doc_b)
        close(h.align(B, H)[b], h_b)


@pytest.mark.parametrize("extra_pad", [0, 2])
def test_inner_loop_ended_by_end_inside_outer_loop(extra_pad):
    """The inner loop's own dim has lengths that vary per outer step (per sentence) and per entry."""
    dims = {}

    def f(k):
        outer = ll.Loop(axis=SENT)
        outer.state.total = 0
        with outer:
            k_s = outer.unstack(k)
            inner = ll.Loop(max_seq_len=10, name="count")
            inner.state.i = 0
            with inner:
                inner.state.i = inner.state.i + 1
                inner.end(inner.state.i >= k_s, include_eos=False)
                vals = inner.stack(inner.state.i * 10 + outer.index)
            dims["count"] = inner.axis
            outer.state.total = outer.state.total + inner.state.i
            all_vals = outer.stack(vals)
            finals = outer.stack(inner.state.i)
        return all_vals, finals, outer.state.total

    prog = ll.compile(f)
    n_sent = torch.tensor([3, 1, 2])
    k = torch.tensor([[4, 1, 3], [2, 7, 7], [3, 5, 0]])   # (batch, sent)
    k = torch.cat([k, torch.full((3, extra_pad), 9)], 1)   # padding sentences (never run)
    vals, finals, total = run_both(prog, ll.Named(k, (B, SENT), {SENT: n_sent}))
    count = dims["count"]
    assert set(vals.dims) == {SENT, count, B}
    # by hand: include_eos=False: an entry counting to k stops before the step reaching k
    exp = [[max(int(k[b, s]) - 1, 0) if s < n_sent[b] else None for s in range(3)] for b in range(3)]
    assert set(count.length_dims) == {B, SENT}
    lens = vals.lengths[count].permute([count.length_dims.index(d) for d in (B, SENT)])  # over (batch, sent)
    assert torch.equal(vals.lengths[SENT], n_sent)
    vv, fv = vals.align(B, SENT, count), finals.align(B, SENT)
    for b in range(3):
        for s in range(int(n_sent[b])):
            assert lens[b, s].item() == exp[b][s]
            assert vv[b, s, :exp[b][s]].tolist() == [10 * (j + 1) + s for j in range(exp[b][s])]
            assert fv[b, s].item() == exp[b][s]
        assert total.tensor[b].item() == sum(e for e in exp[b] if e is not None)


def test_inner_loop_dims_when_outer_loop_runs_no_step():
    def f(k):
        outer = ll.Loop(axis=SENT)
        with outer:
            k_s = outer.unstack(k)
            inner = ll.Loop(max_seq_len=10, name="count")
            inner.state.i = 0
            with inner:
                inner.state.i = inner.state.i + 1
                inner.end(inner.state.i >= k_s, include_eos=True)
                vals = inner.stack(inner.state.i)
            all_vals = outer.stack(vals)
        return all_vals

    prog = ll.compile(f)
    vals = run_both(prog, ll.Named(torch.tensor([[4, 1], [2, 7]]), (B, SENT), {SENT: torch.tensor([0, 0])}))
    count = next(d for d in vals.dims if d not in (B, SENT))
    assert vals.lengths[SENT].tolist() == [0, 0]
    assert vals.lengths[count].sum().item() == 0


# -- loops over other dims ------------------------------------------------------------------------------

def test_loop_over_static_dim():
    """Iterate over the feature dim: a recurrence across features, for every (batch, time) frame."""
    F5 = ll.Dim("feat5", 5)

    def f(x):
        loop = ll.Loop(axis=F5)
        loop.state.c = ll.zeros([])
        loop.state.m = 1.0
        with loop:
            x_f = loop.unstack(x)
            loop.state.c = loop.state.c * 0.5 + x_f
            loop.state.m = loop.state.m * ll.tanh(x_f)
            y = loop.stack(loop.state.c + ll.cast(loop.index, "float64"))
        return y, loop.state.c, loop.state.m

    prog = ll.compile(f)
    x = rand(2, 4, 5, seed=16)
    n = torch.tensor([4, 2])
    y, c, m = run_both(prog, ll.Named(x, (B, T, F5), {T: n}))
    assert set(y.dims) == {F5, B, T} and set(c.dims) == {B, T}
    yv, cv, mv = y.align(B, T, F5), c.align(B, T), m.align(B, T)
    for b in range(2):
        for t in range(int(n[b])):
            cb, mb = torch.zeros((), dtype=DTYPE), torch.ones((), dtype=DTYPE)
            for i in range(5):
                cb = cb * 0.5 + x[b, t, i]
                mb = mb * torch.tanh(x[b, t, i])
                close(yv[b, t, i], cb + i)
            close(cv[b, t], cb)
            close(mv[b, t], mb)


def test_loop_over_dynamic_non_time_dim():
    """Loop over a dynamic dim `cand` (its lengths per entry); the state runs over the other dynamic dim `time`."""
    K = ll.Dim("cand")

    def f(x):
        loop = ll.Loop(axis=K)
        loop.state.best = ll.full(-1e9, [F])
        loop.state.s = ll.zeros([F])
        with loop:
            x_k = loop.unstack(x)                           # over (batch, time, feat)
            loop.state.best = ll.maximum(loop.state.best, x_k)
            loop.state.s = loop.state.s + ll.sum(x_k, axis=T)   # a masked sum over the valid frames
            y = loop.stack(loop.state.best)
        return y, loop.state.best, loop.state.s

    prog = ll.compile(f)
    x = rand(3, 4, 5, 3, seed=17)                            # (batch, time, cand, feat)
    n_t, n_k = torch.tensor([4, 1, 3]), torch.tensor([2, 5, 3])
    y, best, s = run_both(prog, ll.Named(x, (B, T, K, F), {T: n_t, K: n_k}))
    assert torch.equal(y.lengths[K], n_k) and torch.equal(y.lengths[T], n_t)
    yv, bv, sv = y.align(B, T, K, F), best.align(B, T, F), s.align(B, F)
    for b in range(3):
        best_b, s_b = torch.full((4, 3), -1e9, dtype=DTYPE), torch.zeros(3, dtype=DTYPE)
        for k in range(int(n_k[b])):
            best_b = torch.maximum(best_b, x[b, :, k])
            s_b = s_b + x[b, :n_t[b], k].sum(0)
            close(yv[b, :n_t[b], k], best_b[:n_t[b]])
        close(bv[b, :n_t[b]], best_b[:n_t[b]])
        close(sv[b], s_b)


def test_loop_over_batch_dim():
    """Any dim works as the loop's axis, the batch too: a running sum over the entries."""
    def f(x):
        loop = ll.Loop(axis=B)
        loop.state.s = ll.zeros([F])
        with loop:
            loop.state.s = loop.state.s + loop.unstack(x)
            y = loop.stack(loop.state.s)
        return y, loop.state.s

    x = rand(4, 3, seed=18)
    y, s = run_both(ll.compile(f), ll.Named(x, (B, F)))
    close(y.align(B, F), x.cumsum(0))
    close(s.align(F), x.sum(0))


# -- a batch gives each entry the result it gets alone (hypothesis) ----------------------------------------

_BATCH_PROGS: dict = {}


def batch_progs():
    """Compiled once: the seed RNN over `time`, and an RNN that reads `time` by its own step counter (gather)
    in a loop ended by loop.end: after min(length, n_stop) steps."""
    if not _BATCH_PROGS:
        torch.manual_seed(19)
        lin = ll.nn.Linear(F + H, H).double()
        readout = ll.nn.Linear(H, ll.Dim("one", 1)).double()

        def f(x, n_stop):
            length = ll.length(T)
            loop = ll.Loop(max_seq_len=length + 1, name="steps")
            loop.state.h = ll.zeros([H])
            loop.state.t = 0
            with loop:
                loop.end(loop.state.t >= ll.minimum(length, n_stop), include_eos=False)
                x_t = ll.gather(x, index=loop.state.t, axis=T)   # a padding frame at the discarded step
                loop.state.h = ll.tanh(lin(ll.concat(x_t, loop.state.h)))
                loop.state.t = loop.state.t + 1
                y = loop.stack(readout(loop.state.h))
            return y, loop.state.h, loop.state.t

        _BATCH_PROGS["end"] = ll.compile(f)
        _BATCH_PROGS["end_modules"] = lin, readout
        seed_lin, seed_f = make_tanh_rnn(seed=20)
        _BATCH_PROGS["seed"] = ll.compile(seed_f)
        _BATCH_PROGS["seed_lin"] = seed_lin
    return _BATCH_PROGS


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_batch_equals_each_entry_alone(data):
    lens = data.draw(st.lists(st.integers(0, 6), min_size=1, max_size=4), label="lengths")
    stops = data.draw(st.lists(st.integers(0, 7), min_size=len(lens), max_size=len(lens)), label="stops")
    pad = data.draw(st.integers(0, 2), label="extra padding")
    seed = data.draw(st.integers(0, 1000), label="seed")
    t_max = max(lens) + pad
    x = rand(len(lens), t_max, 3, seed=seed)
    n = torch.tensor(lens)
    # padding holds NaN: it must not reach any valid result
    x = torch.where(torch.arange(t_max)[None, :, None] >= n[:, None, None], torch.full_like(x, float("nan")), x)
    progs = batch_progs()
    y, h, steps = run_both(progs["end"], ll.Named(x, (B, T, F), {T: n}), ll.Named(torch.tensor(stops), (B,)))
    ys, hs = run_both(progs["seed"], ll.Named(x, (B, T, F), {T: n}))
    axis, one = y.dims[0], next(d for d in y.dims[1:] if d is not B)
    for b, (length, stop) in enumerate(zip(lens, stops)):
        expected_steps = min(length, stop)   # the Python while loop
        alone = ll.Named(x[b:b + 1, :length], (B, T, F), {T: n[b:b + 1]})
        y1, h1, steps1 = progs["end"](alone, ll.Named(torch.tensor(stops[b:b + 1]), (B,)))
        assert y.lengths[axis][b].item() == y1.lengths[axis][0].item() == expected_steps
        assert steps.tensor[b].item() == steps1.tensor[0].item() == expected_steps
        close(y.align(B, axis, one)[b, :expected_steps], y1.align(B, axis, one)[0, :expected_steps])
        close(h.align(B, H)[b], h1.align(B, H)[0])
        ys1, hs1 = progs["seed"](alone)
        close(ys.align(B, T, H)[b, :length], ys1.align(B, T, H)[0, :length])
        close(hs.align(B, H)[b], hs1.align(B, H)[0])
        # and both equal the hand-written loops
        lin, readout = progs["end_modules"]
        h_b = torch.zeros(H.size, dtype=DTYPE)
        for t in range(expected_steps):
            h_b = torch.tanh(torch.cat([x[b, t], h_b]) @ lin.weight.T + lin.bias)
            close(y.align(B, axis, one)[b, t], h_b @ readout.weight.T + readout.bias)
        close(h.align(B, H)[b], h_b)
        ys_b, hs_b = tanh_rnn_by_hand(progs["seed_lin"], x[b], length)
        close(ys.align(B, T, H)[b, :length], ys_b)
        close(hs.align(B, H)[b], hs_b)


def test_gradients_through_loop_ended_by_end():
    """A loop that ends by loop.end (the last step discarded): gradients equal the hand-written loop's,
    and do not depend on the padding frame read at the discarded step."""
    progs = batch_progs()
    prog, (lin, readout) = progs["end"], progs["end_modules"]
    n = torch.tensor([4, 2, 0, 3])
    stops = torch.tensor([9, 1, 2, 3])
    steps = [4, 1, 0, 3]
    x = rand(4, 5, 3, seed=21)
    wy = rand(4, 5, seed=22)
    wh = rand(4, 4, seed=23)
    params = [lin.weight, lin.bias, readout.weight, readout.bias]
    pad = (torch.arange(5)[None, :, None] >= n[:, None, None]).expand(4, 5, 3)
    results = []
    for fill in (0.0, 1e3):
        for run in (prog, prog.reference):
            xg = torch.where(pad, torch.full_like(x, fill), x).requires_grad_()
            y, h, _ = run(ll.Named(xg, (B, T, F), {T: n}), ll.Named(stops, (B,)))
            axis = y.dims[0]
            one = next(d for d in y.dims if d not in (B, axis))
            yv = masked(y).permute([y.dims.index(d) for d in (B, axis, one)])
            loss = (yv[..., 0] * wy[:, :yv.shape[1]]).sum() + (h.align(B, H) * wh).sum()
            gx, *gp = torch.autograd.grad(loss, [xg, *params])
            results.append((gx.masked_fill(pad, 0), gp))
            assert torch.all(gx[pad] == 0)
    xg = x.clone().requires_grad_()
    loss = 0
    for b in range(4):
        h_b = torch.zeros(H.size, dtype=DTYPE)
        for t in range(steps[b]):
            h_b = torch.tanh(torch.cat([xg[b, t], h_b]) @ lin.weight.T + lin.bias)
            loss = loss + ((h_b @ readout.weight.T + readout.bias)[0] * wy[b, t])
        loss = loss + (h_b * wh[b]).sum()
    gx, *gp = torch.autograd.grad(loss, [xg, *params])
    for rx, rp in results:
        close(rx, gx)
        for a, e in zip(rp, gp):
            close(a, e)


def test_empty_batch_axis():
    """Every entry of length 0 (the axis padded to 0 frames): no step counts; states keep their initial values."""
    progs = batch_progs()
    x = torch.zeros(2, 0, 3, dtype=DTYPE)
    n = torch.tensor([0, 0])
    y, h, steps = run_both(progs["end"], ll.Named(x, (B, T, F), {T: n}), ll.Named(torch.tensor([3, 0]), (B,)))
    assert y.lengths[y.dims[0]].tolist() == [0, 0] and steps.tensor.tolist() == [0, 0]
    assert torch.equal(h.align(B, H), torch.zeros(2, H.size, dtype=DTYPE))
    ys, hs = run_both(progs["seed"], ll.Named(x, (B, T, F), {T: n}))
    assert ys.tensor.numel() == 0
    assert torch.equal(hs.align(B, H), torch.zeros(2, H.size, dtype=DTYPE))
