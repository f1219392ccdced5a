"""Sequence-level forms of the loop optimizer (DESIGN.md §4, the table of "Automatic optimization").

Each test writes a loop whose body has an op with a sequence-level form (or a
state, step index, output-side computation the optimizer moves), and checks

* the optimized run against the reference interpreter: outputs at valid
  positions and gradients w.r.t. the parameters and the inputs, in float64, on
  padded batches whose lengths differ and include 0 and 1;
* where natural, the outputs against a plain-PyTorch computation per sequence;
* with ``Program.explain()``, that the form was used (or, where it must not
  be, that it was not) and, where expected, that nothing is left in the loop.
"""

from __future__ import annotations

import math

import pytest
import torch
from loop_helpers import assert_same_named, masked, named_leaves
from torch.testing import assert_close

import looplift as ll

B = ll.batch_dim
F = ll.Dim("feat", 3)
H = ll.Dim("hidden", 4)
V = ll.Dim("vocab", 5)
DTYPE = torch.float64
#: lengths of the padded batches: different, with 0 and 1, the longest shorter than the padded size
LENGTHS = torch.tensor([5, 0, 1, 3])
PADDED = 6


# -- helpers ---------------------------------------------------------------------------------------------


def new_time() -> ll.Dim:
    return ll.Dim("time")


def features(dims_sizes: list[int], *, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dims_sizes, generator=g, dtype=DTYPE)


def seq_input(time: ll.Dim, lengths: torch.Tensor = LENGTHS, *, seed: int = 1, feat: ll.Dim = F) -> ll.Named:
    """Random features over (batch, time, feat); the padding holds random values too."""
    return ll.Named(features([len(lengths), PADDED, feat.size], seed=seed), (B, time, feat), {time: lengths})


def _fresh(args: list) -> list:
    """Copies of the Named inputs; float ones require grad."""
    out = []
    for a in args:
        t = a.tensor.detach().clone()
        if t.dtype.is_floating_point:
            t.requires_grad_(True)
        out.append(ll.Named(t, a.dims, a.lengths, sparse_dim=a.sparse_dim))
    return out


def _run(prog: ll.Program, args: list, params: list, *, reference: bool):
    leaves = _fresh(args)
    out = (prog.reference if reference else prog)(*leaves)
    outs = named_leaves(out)
    loss = torch.zeros((), dtype=DTYPE)
    for i, o in enumerate(outs):
        if o.tensor.dtype.is_floating_point:
            # a fixed random weight per position, the same in both runs (their dims are checked equal)
            w = torch.randn(o.tensor.shape, generator=torch.Generator().manual_seed(100 + i), dtype=o.tensor.dtype)
            loss = loss + (masked(o) * w).sum()
    wrt = [x.tensor for x in leaves if x.tensor.requires_grad] + list(params)
    grads = torch.autograd.grad(loss, wrt, allow_unused=True) if loss.requires_grad else [None] * len(wrt)
    grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]
    return out, outs, grads


def check_equivalent(prog: ll.Program, args: list, params=()):
    """The optimized run and the reference interpreter agree on the outputs at valid positions and on the
    gradients of a random weighting of the valid outputs w.r.t. the float inputs and `params`.
    Returns the optimized run's outputs (detached from nothing; structure as the program returns)."""
    params = list(params)
    out, opt_outs, opt_grads = _run(prog, args, params, reference=False)
    _, ref_outs, ref_grads = _run(prog, args, params, reference=True)
    assert len(opt_outs) == len(ref_outs)
    for a, b in zip(opt_outs, ref_outs):
        assert_same_named(a, b)
    assert len(opt_grads) == len(ref_grads)
    for i, (a, b) in enumerate(zip(opt_grads, ref_grads)):
        assert torch.isfinite(a).all(), f"gradient {i} not finite"
        assert_close(a, b, rtol=1e-8, atol=1e-10, msg=lambda s, i=i: f"gradient {i}: {s}")
    return out


def explain_sections(prog: ll.Program) -> list[dict[str, list[str]]]:
    """``prog.explain()`` parsed: per loop, section title -> its items (a stayed item with its
    ``kept by:`` line appended after " | kept by: "); the flags "gone" and "not optimized"."""
    loops: list[dict[str, list[str]]] = []
    section = None
    for line in prog.explain().splitlines():
        if line.startswith("loop over "):
            loops.append({"header": [line]})
            section = None
        elif line.startswith("      kept by: "):
            loops[-1][section][-1] += " | " + line.strip()
        elif line.startswith("    "):
            loops[-1][section].append(line.strip())
        elif line.startswith("  "):
            text = line.strip()
            if text == "nothing left in the loop: it is gone":
                loops[-1]["gone"] = []
            elif text.startswith("not optimized"):
                loops[-1]["not optimized"] = [text]
            else:
                section = text.split(" (")[0].split(":")[0].rstrip(":")
                loops[-1][section] = []
    return loops


def only_loop(prog: ll.Program) -> dict[str, list[str]]:
    loops = explain_sections(prog)
    assert len(loops) == 1, prog.explain()
    assert "not optimized" not in loops[0], prog.explain()
    return loops[0]


FORMS = "replaced by sequence forms"
STAYED = "stayed in the loop"
MOVED_IN = "moved in"
MOVED_OUT = "moved out"
STATES = "states moved out"
HOISTED = "computed once before the loop"


def names(items: list[str]) -> list[str]:
    """The op names of explain items ("linear {batch, h} at file:12" -> "linear")."""
    return [x.split(" ")[0] for x in items]


def valid_mask(lengths: torch.Tensor, frames: int) -> torch.Tensor:
    return torch.arange(frames)[None, :] < lengths[:, None]


def assert_valid_close(got: torch.Tensor, want: torch.Tensor, lengths: torch.Tensor) -> None:
    """Compare (batch, time, ...) tensors at the valid frames."""
    m = valid_mask(lengths, got.shape[1]).view(*got.shape[:2], *[1] * (got.dim() - 2))
    assert_close(torch.where(m, got, 0.0), torch.where(m, want, 0.0), rtol=1e-9, atol=1e-10)


# -- LSTM ------------------------------------------------------------------------------------------------


def _lstm_pair(seed: int = 0):
    torch.manual_seed(seed)
    ref = torch.nn.LSTM(F.size, H.size).to(DTYPE)
    module = ll.nn.LSTM(F, H).to(DTYPE)
    module.load_state_dict(ref.state_dict())
    return module, ref


@pytest.mark.parametrize("initial", ["zeros", "input"])
@pytest.mark.parametrize("lengths", [LENGTHS, torch.tensor([0, 0]), torch.tensor([PADDED, PADDED, 1])],
                         ids=["mixed", "all-empty", "full"])
def test_lstm_step_with_its_own_state_is_the_fused_lstm(initial, lengths):
    T = new_time()
    lstm, ref = _lstm_pair()

    def model(x, h0=None, c0=None):
        loop = ll.Loop(axis=T)
        loop.state.s = lstm.default_initial_state() if h0 is None else ll.nn.LstmState(h0, c0)
        with loop:
            h, loop.state.s = lstm(loop.unstack(x), state=loop.state.s)
            y = loop.stack(h)
        return y, loop.state.s.h, loop.state.s.c

    prog = ll.compile(model)
    x = seq_input(T, lengths)
    args = [x]
    h0 = torch.zeros(len(lengths), H.size, dtype=DTYPE)
    c0 = torch.zeros(len(lengths), H.size, dtype=DTYPE)
    if initial == "input":
        h0, c0 = features([len(lengths), H.size], seed=2), features([len(lengths), H.size], seed=3)
        args += [ll.Named(h0, (B, H)), ll.Named(c0, (B, H))]
    y, h, c = check_equivalent(prog, args, lstm.parameters())

    # plain PyTorch, each sequence alone
    for b, n in enumerate(lengths.tolist()):
        if n == 0:
            want_h, want_c = h0[b], c0[b]
        else:
            out, (hn, cn) = ref(x.tensor[b, :n, None], (h0[b][None, None], c0[b][None, None]))
            assert_close(y.align(B, T, H)[b, :n], out[:, 0], rtol=1e-9, atol=1e-10)
            want_h, want_c = hn[0, 0], cn[0, 0]
        assert_close(h.align(B, H)[b], want_h, rtol=1e-9, atol=1e-10)
        assert_close(c.align(B, H)[b], want_c, rtol=1e-9, atol=1e-10)

    loop = only_loop(prog)
    assert any(f.startswith("fused LSTM over the sequence carrying 's[0]', 's[1]'") for f in loop[FORMS]), \
        prog.explain()
    assert "gone" in loop, prog.explain()


@pytest.mark.parametrize("reader", ["stacked new c", "stacked previous c", "c in the output"])
def test_lstm_cell_state_read_elsewhere_keeps_the_step(reader):
    """The fused kernel gives no cell state per step: when anything but the step reads it, the form is not
    used, and the loop stays correct."""
    T = new_time()
    lstm, _ = _lstm_pair()

    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.s = lstm.default_initial_state()
        with loop:
            prev_c = loop.state.s.c
            h, loop.state.s = lstm(loop.unstack(x), state=loop.state.s)
            if reader == "stacked new c":
                y = loop.stack(loop.state.s.c)
            elif reader == "stacked previous c":
                y = loop.stack(ll.tanh(prev_c) + h)
            else:
                y = loop.stack(h * loop.state.s.c)
        return y, loop.state.s.h

    prog = ll.compile(model)
    check_equivalent(prog, [seq_input(T)], lstm.parameters())
    loop = only_loop(prog)
    assert not any("LSTM" in f for f in loop.get(FORMS, [])), prog.explain()
    assert "lstm_cell" in names(loop[STAYED]), prog.explain()


@pytest.mark.parametrize("threshold", [0.8, 1e9], ids=["some-end-early", "none-ends-early"])
@pytest.mark.parametrize("include_eos", [True, False])
@pytest.mark.parametrize("finals", [True, False], ids=["finals-read", "only-stacked"])
def test_lstm_step_in_a_loop_with_end_is_fused_where_no_entry_ends_early(include_eos, finals, threshold,
                                                                         monkeypatch):
    """With loop.end, entries that end freeze their state; the fused kernel cannot do that. The end moves out,
    so each entry's length is known before the loop: where no entry ends before its length along the axis, the
    fused kernel runs; where one does, the loop runs as traced. Over an axis, an entry's frames after its end
    are still stacked, from its frozen state (whether or not anything reads the final states)."""
    T = new_time()
    lstm, ref = _lstm_pair()
    fused_calls = []
    fused = torch._VF.lstm

    def recording(*args):
        fused_calls.append(1)
        return fused(*args)

    monkeypatch.setattr(torch._VF, "lstm", recording)

    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.s = lstm.default_initial_state()
        with loop:
            x_t = loop.unstack(x)
            h, loop.state.s = lstm(x_t, state=loop.state.s)
            y = loop.stack(h)
            loop.end(ll.sum(x_t, axis=F) > threshold, include_eos=include_eos)
        return (y, loop.state.s.h, loop.state.s.c) if finals else (y,)

    prog = ll.compile(model)
    x = seq_input(T)
    y, *hc = check_equivalent(prog, [x], lstm.parameters())
    loop = only_loop(prog)
    assert any("fused LSTM" in f for f in loop.get(FORMS, [])), prog.explain()
    assert "checked at run time: it runs as traced, step by step, for a batch where an entry ends (loop.end) " \
           f"before its length along '{T.name}'" in prog.explain(), prog.explain()
    ends_early = any(bool((x.tensor[b, :n].sum(-1) > threshold)[:n - 1 if include_eos else n].any())
                     for b, n in enumerate(LENGTHS.tolist()))
    assert ends_early == (threshold < 1)
    fused_calls.clear()
    prog(x)
    assert bool(fused_calls) == (not ends_early)   # the fused kernel, or the loop step by step

    # plain PyTorch: each entry steps until its end condition; its state stays frozen from then on
    cell = torch.nn.LSTMCell(F.size, H.size).to(DTYPE)
    cell.load_state_dict({k.replace("_l0", ""): v for k, v in ref.state_dict().items()})
    for b, n in enumerate(LENGTHS.tolist()):
        hb, cb = torch.zeros(1, H.size, dtype=DTYPE), torch.zeros(1, H.size, dtype=DTYPE)
        alive = True
        for t in range(n):
            xt = x.tensor[b, t][None]
            nh, nc = cell(xt, (hb, cb))
            assert_close(y.align(B, T, H)[b, t], nh[0], rtol=1e-9, atol=1e-10)
            ended = bool(xt.sum() > threshold)
            if alive and (include_eos or not ended):
                hb, cb = nh, nc
            alive = alive and not ended
        if finals:
            h, c = hc
            assert_close(h.align(B, H)[b], hb[0], rtol=1e-9, atol=1e-10)
            assert_close(c.align(B, H)[b], cb[0], rtol=1e-9, atol=1e-10)


# -- GRU -------------------------------------------------------------------------------------------------


def test_gru_step_with_its_own_state_is_the_fused_gru():
    T = new_time()
    torch.manual_seed(0)
    ref = torch.nn.GRU(F.size, H.size).to(DTYPE)
    gru = ll.nn.GRU(F, H).to(DTYPE)
    gru.load_state_dict(ref.state_dict())

    def model(x, h0):
        loop = ll.Loop(axis=T)
        loop.state.h = h0
        with loop:
            h, loop.state.h = gru(loop.unstack(x), state=loop.state.h)
            y = loop.stack(h)
        return y, loop.state.h

    prog = ll.compile(model)
    x = seq_input(T)
    h0 = features([len(LENGTHS), H.size], seed=2)
    y, hn = check_equivalent(prog, [x, ll.Named(h0, (B, H))], gru.parameters())
    for b, n in enumerate(LENGTHS.tolist()):
        if n == 0:
            assert_close(hn.align(B, H)[b], h0[b])
            continue
        out, last = ref(x.tensor[b, :n, None], h0[b][None, None])
        assert_close(y.align(B, T, H)[b, :n], out[:, 0], rtol=1e-9, atol=1e-10)
        assert_close(hn.align(B, H)[b], last[0, 0], rtol=1e-9, atol=1e-10)

    loop = only_loop(prog)
    assert any(f.startswith("fused GRU over the sequence carrying 'h'") for f in loop[FORMS]), prog.explain()
    assert "gone" in loop, prog.explain()


def test_gru_step_in_a_loop_with_end_stays_correct():
    """With loop.end an entry's state freezes when it ends: whatever the optimizer does, the same results."""
    T = new_time()
    torch.manual_seed(0)
    gru = ll.nn.GRU(F, H).to(DTYPE)

    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.h = gru.default_initial_state()
        with loop:
            x_t = loop.unstack(x)
            h, loop.state.h = gru(x_t, state=loop.state.h)
            y = loop.stack(h)
            loop.end(ll.sum(x_t, axis=F) > 0.8, include_eos=True)
        return y, loop.state.h

    prog = ll.compile(model)
    check_equivalent(prog, [seq_input(T)], gru.parameters())


# -- running sum ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["s + x", "x + s"])
def test_running_sum_is_a_cumulative_sum(order):
    T = new_time()
    torch.manual_seed(0)
    lin = ll.nn.Linear(F, H).to(DTYPE)

    def model(x, s0):
        loop = ll.Loop(axis=T)
        loop.state.s = s0
        with loop:
            a = lin(loop.unstack(x))
            before = loop.stack(loop.state.s)
            loop.state.s = loop.state.s + a if order == "s + x" else a + loop.state.s
            after = loop.stack(loop.state.s)
        return before, after, loop.state.s

    prog = ll.compile(model)
    x = seq_input(T)
    s0 = features([len(LENGTHS), H.size], seed=2)
    before, after, final = check_equivalent(prog, [x, ll.Named(s0, (B, H))], lin.parameters())

    with torch.no_grad():
        a = x.tensor @ lin.weight.T + lin.bias
        a = torch.where(valid_mask(LENGTHS, PADDED)[:, :, None], a, 0.0)
        cum = s0[:, None] + torch.cumsum(a, 1)
    assert_valid_close(after.align(B, T, H), cum, LENGTHS)
    assert_valid_close(before.align(B, T, H), torch.cat([s0[:, None], cum[:, :-1]], 1), LENGTHS)
    want_final = torch.stack([cum[b, n - 1] if n else s0[b] for b, n in enumerate(LENGTHS.tolist())])
    assert_close(final.align(B, H), want_final)

    loop = only_loop(prog)
    assert any(f.startswith("running sum as a cumulative sum carrying 's'") for f in loop[FORMS]), prog.explain()
    assert "gone" in loop, prog.explain()


def test_running_sums_int_state_and_scalar_per_entry():
    """An int counter and a float scalar per batch entry, both running sums."""
    T = new_time()

    def model(x, t0):
        loop = ll.Loop(axis=T)
        loop.state.count = 0
        loop.state.total = t0
        with loop:
            x_t = loop.unstack(x)
            loop.state.count = loop.state.count + ll.cast(ll.sum(x_t, axis=F) > 0.0, "int64")
            loop.state.total = loop.state.total + ll.sum(x_t * x_t, axis=F)
            counts = loop.stack(loop.state.count)
            totals = loop.stack(loop.state.total)
        return counts, totals, loop.state.count, loop.state.total

    prog = ll.compile(model)
    x = seq_input(T)
    t0 = features([len(LENGTHS)], seed=2)
    counts, totals, count, total = check_equivalent(prog, [x, ll.Named(t0, (B,))])
    assert counts.tensor.dtype == torch.int64 and count.tensor.dtype == torch.int64

    m = valid_mask(LENGTHS, PADDED)
    want_counts = torch.cumsum(((x.tensor.sum(-1) > 0) & m).long(), 1)
    want_totals = t0[:, None] + torch.cumsum(torch.where(m, (x.tensor ** 2).sum(-1), 0.0), 1)
    assert_valid_close(counts.align(B, T), want_counts, LENGTHS)
    assert_valid_close(totals.align(B, T), want_totals, LENGTHS)
    assert torch.equal(count.align(B), want_counts[:, -1])
    assert_close(total.align(B), want_totals[:, -1])

    loop = only_loop(prog)
    forms = loop[FORMS]
    assert any(f.startswith("running sum as a cumulative sum carrying 'count'") for f in forms), prog.explain()
    assert any(f.startswith("running sum as a cumulative sum carrying 'total'") for f in forms), prog.explain()
    assert "gone" in loop, prog.explain()


def test_running_sum_in_a_loop_with_end_stays_correct():
    """A state frozen after its entry's end is no cumulative sum over the whole axis."""
    T = new_time()

    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.s = ll.zeros([F])
        loop.state.prev = ll.zeros([F])
        with loop:
            x_t = loop.unstack(x)
            before = loop.stack(loop.state.s * loop.state.prev)
            loop.state.s = loop.state.s + x_t
            loop.state.prev = x_t
            after = loop.stack(loop.state.s)
            loop.end(ll.sum(x_t, axis=F) > 0.8, include_eos=True)
        return before, after, loop.state.s, loop.state.prev

    prog = ll.compile(model)
    check_equivalent(prog, [seq_input(T)])


# -- window (shift_in) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_window_of_the_last_frames_is_a_windowing(size):
    T = new_time()
    W = ll.Dim("window", size)

    def model(x, win0, kernel):
        loop = ll.Loop(axis=T)
        loop.state.win = win0
        with loop:
            before = loop.stack(ll.sum(loop.state.win, axis=W))
            loop.state.win = ll.shift_in(loop.state.win, loop.unstack(x), axis=W)
            y = loop.stack(ll.dot(loop.state.win, kernel, reduce=[W, F]))
            w = loop.stack(loop.state.win)
        return before, y, w, loop.state.win

    prog = ll.compile(model)
    x = seq_input(T)
    win0 = features([len(LENGTHS), size, F.size], seed=2)
    kernel = features([size, F.size], seed=3)
    before, y, w, final = check_equivalent(prog, [x, ll.Named(win0, (B, W, F)), ll.Named(kernel, (W, F))])

    # plain PyTorch: the initial window, then the frames; window t ends at frame t
    joined = torch.cat([win0, x.tensor], 1)
    windows = joined.unfold(1, size, 1)[:, 1:PADDED + 1].permute(0, 1, 3, 2)   # (batch, time, window, feat)
    assert_valid_close(before.align(B, T, F), torch.cat([win0[:, None], windows[:, :-1]], 1).sum(2), LENGTHS)
    assert_valid_close(w.align(B, T, W, F), windows, LENGTHS)
    assert_valid_close(y.align(B, T), torch.einsum("btwf,wf->bt", windows, kernel), LENGTHS)
    want_final = torch.stack([windows[b, n - 1] if n else win0[b] for b, n in enumerate(LENGTHS.tolist())])
    assert_close(final.align(B, W, F), want_final)

    loop = only_loop(prog)
    assert any(f.startswith("window of the last frames as a windowing of the sequence carrying 'win'")
               for f in loop[FORMS]), prog.explain()
    assert "gone" in loop, prog.explain()


def test_forms_whose_per_step_argument_is_loop_invariant():
    """An LSTM, a GRU, a window and a running sum fed the same (loop-invariant) value at every step: their
    sequence forms get it over the loop's dim."""
    T = new_time()
    W = ll.Dim("window", 3)
    torch.manual_seed(0)
    lstm, gru = ll.nn.LSTM(F, H).to(DTYPE), ll.nn.GRU(F, H).to(DTYPE)

    def model(x, c):
        loop = ll.Loop(axis=T)
        loop.state.s = lstm.default_initial_state()
        loop.state.g = gru.default_initial_state()
        loop.state.win = ll.zeros([W, F])
        loop.state.total = ll.zeros([F])
        with loop:
            h, loop.state.s = lstm(c, state=loop.state.s)
            g, loop.state.g = gru(c * 2.0, state=loop.state.g)
            loop.state.win = ll.shift_in(loop.state.win, c, axis=W)
            loop.state.total = loop.state.total + c
            y = loop.stack(h + g + ll.sum(loop.state.win * loop.state.total + loop.unstack(x), axis=[W, F]))
        return y, loop.state.s.h, loop.state.s.c, loop.state.g, loop.state.win, loop.state.total

    prog = ll.compile(model)
    c = features([F.size], seed=5)
    outs = check_equivalent(prog, [seq_input(T), ll.Named(c, (F,))], [*lstm.parameters(), *gru.parameters()])
    total = outs[-1]
    assert_close(total.align(B, F), LENGTHS[:, None].to(DTYPE) * c)

    loop = only_loop(prog)
    forms = [f.split(" carrying ")[0] for f in loop[FORMS]]
    assert sorted(forms) == sorted(["fused LSTM over the sequence", "fused GRU over the sequence",
                                    "window of the last frames as a windowing of the sequence",
                                    "running sum as a cumulative sum"]), prog.explain()
    assert "gone" in loop, prog.explain()


# -- cum_concat: self-attention over the history ---------------------------------------------------------


def test_cum_concat_self_attention_is_causal_attention_over_the_sequence():
    T = new_time()
    A = ll.Dim("att", 4)
    torch.manual_seed(0)
    lq, lk, lv = (ll.nn.Linear(F, A).to(DTYPE) for _ in range(3))
    lo = ll.nn.Linear(A, F).to(DTYPE)
    modules = [lq, lk, lv, lo]

    def model(x):
        loop = ll.Loop(axis=T)
        with loop:
            x_t = loop.unstack(x)
            keys = ll.cum_concat(lk(x_t))
            values = ll.cum_concat(lv(x_t))
            w = ll.softmax(ll.dot(lq(x_t), keys, reduce=A) * (1 / math.sqrt(A.size)), axis=T.history())
            y = loop.stack(lo(ll.dot(w, values, reduce=T.history())) + x_t)
        return y

    prog = ll.compile(model)
    x = seq_input(T)
    y = check_equivalent(prog, [x], [p for m in modules for p in m.parameters()])

    with torch.no_grad():
        for b, n in enumerate(LENGTHS.tolist()):
            xb = x.tensor[b, :n]
            q, k, v = (xb @ m.weight.T + m.bias for m in (lq, lk, lv))
            scores = (q @ k.T) / math.sqrt(A.size)
            scores = scores.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
            want = torch.softmax(scores, -1) @ v @ lo.weight.T + lo.bias + xb
            assert_close(y.align(B, T, F)[b, :n], want, rtol=1e-9, atol=1e-10)

    loop = only_loop(prog)
    cums = [f for f in loop[FORMS] if f.startswith("cum_concat as the whole sequence with a causal history dim")]
    assert len(cums) == 2, prog.explain()
    assert "gone" in loop, prog.explain()


@pytest.mark.parametrize("source", ["labels", "features"])
def test_history_values_are_made_finite_only_where_their_padding_may_not_be(source):
    """Over the whole sequence, the attention's weights are zero in the history's padding (and its future),
    but the values there are the padding frames: values from embedded labels are finite there (rows of the
    table, whatever the labels in the padding), and are used as they are; values from an input's features
    (whose padding may hold anything) are made finite first. Either way the step-by-step loop's results."""
    T = new_time()
    A = ll.Dim("att", 4)
    torch.manual_seed(0)
    emb = ll.nn.Embedding(V, F).to(DTYPE)
    lq, lk, lv = (ll.nn.Linear(F, A).to(DTYPE) for _ in range(3))
    modules = [emb, lq, lk, lv]

    def model(x):
        loop = ll.Loop(axis=T)
        with loop:
            x_t = emb(loop.unstack(x)) if source == "labels" else loop.unstack(x)
            keys, values = ll.cum_concat(lk(x_t)), ll.cum_concat(lv(x_t))
            w = ll.softmax(ll.dot(lq(x_t), keys, reduce=A), axis=T.history())
            y = loop.stack(ll.dot(w, values, reduce=T.history()))
        return y

    prog = ll.compile(model)
    if source == "labels":   # (labels out of the vocabulary in the padding)
        labels = torch.randint(0, V.size, (len(LENGTHS), PADDED))
        labels[torch.arange(PADDED)[None, :] >= LENGTHS[:, None]] = 99
        x = ll.Named(labels, (B, T), {T: LENGTHS}, sparse_dim=V)
    else:
        x = seq_input(T)
    y = check_equivalent(prog, [x], [p for m in modules for p in m.parameters()])
    assert torch.isfinite(y.tensor).all()
    ops = [n.op for n in prog.traces[-1].optimized.graph.nodes]
    assert ops.count("make_finite") == (0 if source == "labels" else 1), ops
    assert "gone" in only_loop(prog), prog.explain()


def test_cum_concat_of_input_values_read_by_a_carried_state():
    """The history is input-side (its sequence form runs before the loop) but a recurrent state attends to
    it: the loop stays, and reads at step t the history of its t + 1 frames."""
    T = new_time()
    torch.manual_seed(0)
    lk, lin = ll.nn.Linear(F, H).to(DTYPE), ll.nn.Linear(H, H).to(DTYPE)

    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.h = ll.zeros([H])
        with loop:
            keys = ll.cum_concat(lk(loop.unstack(x)))
            w = ll.softmax(ll.dot(loop.state.h, keys, reduce=H), axis=T.history())
            loop.state.h = ll.tanh(ll.dot(w, keys, reduce=T.history()) + lin(loop.state.h))
            y = loop.stack(loop.state.h)
        return y, loop.state.h

    prog = ll.compile(model)
    x = seq_input(T)
    y, _ = check_equivalent(prog, [x], [*lk.parameters(), *lin.parameters()])

    with torch.no_grad():
        keys = x.tensor @ lk.weight.T + lk.bias                        # (batch, time, hidden)
        h = torch.zeros(len(LENGTHS), H.size, dtype=DTYPE)
        for t in range(PADDED):
            w = torch.softmax(torch.einsum("bh,bjh->bj", h, keys[:, :t + 1]), -1)
            h = torch.tanh(torch.einsum("bj,bjh->bh", w, keys[:, :t + 1]) + h @ lin.weight.T + lin.bias)
            m = t < LENGTHS
            assert_close(y.align(B, T, H)[m, t], h[m], rtol=1e-9, atol=1e-10)

    loop = only_loop(prog)
    assert any(f.startswith("cum_concat as the whole sequence") for f in loop[FORMS]), prog.explain()
    assert "gone" not in loop and "cum_concat" not in names(loop[STAYED]), prog.explain()


@pytest.mark.parametrize("recurrent", [False, True], ids=["loop-gone", "loop-stays"])
def test_values_over_the_history_dim_follow_the_step(recurrent):
    """A value over the history dim that depends on nothing else (a range over it: relative positions) has
    t + 1 frames at step t: it is no loop-invariant, whether the loop goes or stays."""
    T = new_time()
    torch.manual_seed(0)
    lk, lin = ll.nn.Linear(F, H).to(DTYPE), ll.nn.Linear(H, H).to(DTYPE)

    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.h = ll.zeros([H])
        with loop:
            x_t = loop.unstack(x)
            keys = ll.cum_concat(lk(x_t))
            position = ll.cast(ll.range_over_dim(T.history()), DTYPE)
            query = loop.state.h if recurrent else lk(x_t)
            w = ll.softmax(ll.dot(query, keys, reduce=H) + 0.3 * position, axis=T.history())
            new = ll.tanh(ll.dot(w, keys, reduce=T.history()) + (lin(loop.state.h) if recurrent else 0.0))
            loop.state.h = new
            y = loop.stack(new)
        return y

    prog = ll.compile(model)
    x = seq_input(T)
    y = check_equivalent(prog, [x], [*lk.parameters(), *lin.parameters()])

    with torch.no_grad():
        keys = x.tensor @ lk.weight.T + lk.bias
        h = torch.zeros(len(LENGTHS), H.size, dtype=DTYPE)
        for t in range(PADDED):
            query = h if recurrent else keys[:, t]
            scores = torch.einsum("bh,bjh->bj", query, keys[:, :t + 1]) + 0.3 * torch.arange(t + 1, dtype=DTYPE)
            out = torch.einsum("bj,bjh->bh", torch.softmax(scores, -1), keys[:, :t + 1])
            h = torch.tanh(out + (h @ lin.weight.T + lin.bias if recurrent else 0.0))
            m = t < LENGTHS
            assert_close(y.align(B, T, H)[m, t], h[m], rtol=1e-9, atol=1e-10)

    loop = only_loop(prog)
    assert ("gone" in loop) != recurrent, prog.explain()
    assert "range_over_dim" not in names(loop.get(HOISTED, [])), prog.explain()


# -- step index --------------------------------------------------------------------------------------------


def test_step_index_is_a_range_over_the_dim():
    T = new_time()

    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.tri = 0
        with loop:
            x_t = loop.unstack(x)
            i = loop.stack(loop.index)
            y = loop.stack(ll.cast(loop.index, DTYPE) * ll.sum(x_t, axis=F))
            loop.state.tri = loop.state.tri + loop.index
        return i, y, loop.state.tri

    prog = ll.compile(model)
    x = seq_input(T)
    i, y, tri = check_equivalent(prog, [x])
    steps = torch.arange(PADDED)
    assert_valid_close(i.align(T)[None].expand(len(LENGTHS), -1) if B not in i.dims else i.align(B, T),
                       steps[None].expand(len(LENGTHS), -1), LENGTHS)
    assert_valid_close(y.align(B, T), steps[None] * x.tensor.sum(-1), LENGTHS)
    assert torch.equal(tri.align(B), LENGTHS * (LENGTHS - 1) // 2)

    loop = only_loop(prog)
    assert any(f.startswith(f"step index as range_over_dim({T.name})") for f in loop[FORMS]), prog.explain()
    assert "gone" in loop, prog.explain()


# -- states moved out, loops that stay, output-side moving ---------------------------------------------------


def test_state_of_input_values_is_the_shifted_sequence():
    T = new_time()

    def model(x, p0):
        loop = ll.Loop(axis=T)
        loop.state.prev = p0
        with loop:
            x_t = loop.unstack(x)
            y = loop.stack(loop.state.prev * x_t)
            loop.state.prev = ll.tanh(x_t)
        return y, loop.state.prev

    prog = ll.compile(model)
    x = seq_input(T)
    p0 = features([F.size], seed=2)
    y, final = check_equivalent(prog, [x, ll.Named(p0, (F,))])
    shifted = torch.cat([p0.expand(len(LENGTHS), 1, F.size), torch.tanh(x.tensor[:, :-1])], 1)
    assert_valid_close(y.align(B, T, F), shifted * x.tensor, LENGTHS)
    want_final = torch.stack([torch.tanh(x.tensor[b, n - 1]) if n else p0 for b, n in enumerate(LENGTHS.tolist())])
    assert_close(final.align(B, F), want_final)

    loop = only_loop(prog)
    assert loop[STATES] == ["prev"], prog.explain()
    assert "tanh" in names(loop[MOVED_IN]), prog.explain()
    assert "gone" in loop, prog.explain()


def _rnn(seed: int = 0):
    torch.manual_seed(seed)
    return ll.nn.Linear(F, H).to(DTYPE), ll.nn.Linear(H, H).to(DTYPE), ll.nn.Linear(H, V).to(DTYPE)


def _torch_rnn(x: torch.Tensor, lin_in, lin_rec) -> torch.Tensor:
    """h_t = tanh(W_in x_t + b_in + W_rec h_{t-1} + b_rec) over (batch, time, feat), from zeros."""
    h = torch.zeros(x.shape[0], H.size, dtype=DTYPE)
    hs = []
    for t in range(x.shape[1]):
        h = torch.tanh(x[:, t] @ lin_in.weight.T + lin_in.bias + h @ lin_rec.weight.T + lin_rec.bias)
        hs.append(h)
    return torch.stack(hs, 1)


def test_state_feeding_itself_through_a_nonlinearity_stays_with_its_chain():
    T = new_time()
    lin_in, lin_rec, _ = _rnn()

    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.h = ll.zeros([H])
        with loop:
            loop.state.h = ll.tanh(lin_rec(loop.state.h) + lin_in(loop.unstack(x)))
            y = loop.stack(loop.state.h)
        return y, loop.state.h

    prog = ll.compile(model)
    x = seq_input(T)
    y, h = check_equivalent(prog, [x], [*lin_in.parameters(), *lin_rec.parameters()])
    with torch.no_grad():
        want = _torch_rnn(x.tensor, lin_in, lin_rec)
    assert_valid_close(y.align(B, T, H), want, LENGTHS)
    for b, n in enumerate(LENGTHS.tolist()):
        assert_close(h.align(B, H)[b], want[b, n - 1] if n else torch.zeros(H.size, dtype=DTYPE))

    loop = only_loop(prog)
    assert "gone" not in loop, prog.explain()
    assert "linear" in names(loop[MOVED_IN]), prog.explain()    # the input projection: over the sequence
    stayed = loop[STAYED]
    assert sorted(names(stayed)) == ["add", "linear", "tanh"], prog.explain()
    tanh = next(s for s in stayed if s.startswith("tanh"))
    chain = tanh.split(" | kept by: ")[1].split(" <- ")
    assert [c.split(" ")[0] for c in chain] == ["add", "linear", "state"], prog.explain()
    assert chain[-1].startswith("state 'h'"), prog.explain()


def test_readout_and_log_softmax_are_moved_out_after_the_loop():
    T = new_time()
    lin_in, lin_rec, readout = _rnn()
    params = [p for m in (lin_in, lin_rec, readout) for p in m.parameters()]

    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.h = ll.zeros([H])
        with loop:
            loop.state.h = ll.tanh(lin_rec(loop.state.h) + lin_in(loop.unstack(x)))
            y = loop.stack(ll.log_softmax(readout(loop.state.h), axis=V))
        return y, ll.sum(ll.sum(y, axis=V), axis=[B, T])

    prog = ll.compile(model)
    x = seq_input(T)
    y, total = check_equivalent(prog, [x], params)
    with torch.no_grad():
        want = torch.log_softmax(_torch_rnn(x.tensor, lin_in, lin_rec) @ readout.weight.T + readout.bias, -1)
    assert_valid_close(y.align(B, T, V), want, LENGTHS)
    assert_close(total.tensor, torch.where(valid_mask(LENGTHS, PADDED)[:, :, None], want, 0.0).sum())

    loop = only_loop(prog)
    assert names(loop[MOVED_OUT]) == ["linear", "log_softmax"], prog.explain()
    assert sorted(names(loop[STAYED])) == ["add", "linear", "tanh"], prog.explain()
    assert not any(s.startswith("log_softmax") for s in loop[STAYED]), prog.explain()
