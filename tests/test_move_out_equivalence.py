"""The loop optimizer never changes what a program computes (DESIGN.md §4).

For random loop programs (``random_programs.py``: linear maps, nonlinearities,
reductions, dot products, concatenation, attention over an encoder, nested
loops, states of several shapes and structures, stacked values, ``loop.last``,
end conditions, a second loop over the first one's result, a MaskedComputation
block in one program in three), the optimized run gives the outputs and the
gradients (w.r.t. every parameter and float input) of the reference
interpreter, on batches whose entries have different lengths (0 and 1
included); the optimizer never gives up on a loop, and moves out what depends
on inputs only. Masked blocks on inputs run over ``T'`` (the frames where the
mask is True) in a fair share of the drawn programs (checked below, so that
path cannot silently stop being exercised).

The ``align`` kind is a loop over ``time`` shaped like a transducer's loop over
its alignment: a counter advanced by a sequence-dependent increment (a blank
label, a frame's value), a float accumulator, the encoder gathered at the
counter, ``loop.end`` on the counter (against the encoder's length, a limit or
a constant) and masked blocks keyed on the labels (``label != 0``, of the frame
or the previous one). Its lengths follow from sequence values, so the optimizer
moves the loop out assuming no entry ends early and checks that at run time; a
fair share of its programs take each branch of that check (checked below).

The CI run draws a fixed set of programs (``derandomize``); ``pytest
--runslow`` draws eight times as many others. A failure prints the shrunk
program and data, plain dataclasses that read as the recipe of the loop body;
``random_programs.check(Program(...), Data(...))`` replays it.

Below the property tests, each bug the random programs found is pinned by a
hand-written program.
"""

from __future__ import annotations

import pytest
import random_programs as rp
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from random_programs import DTYPE, FDIMS, B, T, W

import looplift as ll
from looplift.runtime.regions import CondRun

F, H = FDIMS["F"], FDIMS["H"]

# (loop kind, whether a loop over an axis calls loop.end): each drawn separately, so that each is covered
KINDS = [pytest.param("axis", False, id="axis"), pytest.param("axis", True, id="axis-end"),
         pytest.param("static", None, id="static-axis"), pytest.param("max_len", None, id="max_len-end"),
         pytest.param("align", True, id="align-end")]
CI_EXAMPLES = 100     # per kind
SLOW_EXAMPLES = 800   # per kind, with --runslow


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: threads only cost time."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


def _check(kind, end, data):
    spec = data.draw(rp.programs(kind, end), label="program")
    rp.check(spec, data.draw(rp.data(kind), label="data"))


@pytest.mark.parametrize("kind, end", KINDS)
@_settings(CI_EXAMPLES)
@given(data=st.data())
def test_optimized_equals_reference(kind, end, data):
    _check(kind, end, data)


@pytest.mark.slow
@pytest.mark.parametrize("kind, end", KINDS)
@_settings(SLOW_EXAMPLES)
@given(data=st.data())
def test_optimized_equals_reference_many(kind, end, data):
    _check(kind, end, data)


def test_masked_block_on_inputs_runs_over_the_masked_dim():
    """A block under a mask from the frames x2_t, carrying its own state (an RNN step on x_t): the optimizer
    runs it as a loop of its own over time' (the frames where the mask is True), and the results are those
    of the reference run."""
    spec = rp.Program("axis", groups=(rp.Group("single", (rp.Leaf("F", "zeros", "self"),)),),
                      ops=(rp.Op("linear", (5,), ("F", False)), rp.Op("binary", (6, 0), ("add",)),
                           rp.Op("unary", (7,), ("tanh",)), rp.Op("scale", (8,), (0.5,))),
                      updates=(8,), stacks=(5, 9), lasts=(9,), end=None,
                      masked=rp.Masked(first=0, last=4, mask_arg=1, thr=0.0, assign_inside=True))
    prog = rp.check(spec, rp.Data([5, 0, 1, 3], [1, 2, 1, 3], [0, 0, 0, 0], seed=1))
    reports = prog.traces[-1].optimized.reports
    assert any(r.masked for r in reports), prog.explain()
    assert "time'" in [r.axis for r in reports], prog.explain()


def test_masked_block_on_a_carried_state_stays_in_the_loop():
    """A block whose mask comes from a state carried from step to step cannot run over T' (T' is not known
    before the loop): its calls stay in the loop (those on inputs only still move in), results unchanged."""
    spec = rp.Program("axis", groups=(rp.Group("single", (rp.Leaf("s", "zeros", "self"),)),),
                      ops=(rp.Op("binary", (5, 1), ("mul",)), rp.Op("unary", (6,), ("tanh",)),
                           rp.Op("linear", (0,), ("H", False)), rp.Op("unary", (8,), ("sigmoid",))),
                      updates=(7,), stacks=(9,), lasts=(), end=None,
                      masked=rp.Masked(first=2, last=4, mask_arg=5, thr=0.0))
    prog = rp.check(spec, rp.Data([4, 2], [1, 1], [0, 0]))
    assert not any(r.masked for r in prog.traces[-1].optimized.reports), prog.explain()


def test_random_masked_blocks_often_run_over_the_masked_dim():
    """Of 100 random programs with a masked block in a loop over an axis (without loop.end), at least 10 run
    their block over T' (about a quarter do; the first examples hypothesis draws are the smallest, often
    with an empty block)."""
    moved = []

    @_settings(100)
    @given(data=st.data())
    def draw(data):
        spec = data.draw(rp.programs("axis", False, masked=True), label="program")
        prog = rp.check(spec, data.draw(rp.data("axis"), label="data"))
        moved.append(any(r.masked for r in prog.traces[-1].optimized.reports))

    draw()
    assert sum(moved) >= 10, f"{sum(moved)} of {len(moved)}"


@pytest.fixture
def cond_branches(monkeypatch) -> list[bool]:
    """The branch each Cond took, as the optimized programs run (the only Conds of the random programs are
    those of a checked end: True where some entry ends before its length, the loop then runs as traced);
    `random_programs.check` runs each program twice, with and without gradients."""
    taken, call = [], CondRun.__call__

    def recording(self, env, pred, *raws):
        taken.append(bool(pred))
        return call(self, env, pred, *raws)

    monkeypatch.setattr(CondRun, "__call__", recording)
    return taken


def test_random_alignment_loops_run_their_sequence_forms_and_both_branches_of_the_check(cond_branches):
    """Of 100 random programs of the align kind (a counter advanced by the frames' labels or values, the
    encoder gathered at it, loop.end on it, masked blocks keyed on labels), a fair share run the counter as a
    cumulative sum or lose the loop altogether (97 do; 75 lose it), gather the encoder over the whole
    sequence before the loop (18), run a masked block over T' (10: most blocks read states of the loop, or
    have nothing live), and go through the end's run-time check (97; explain() says so) both for a batch
    where some entry ends early by its counter (the loop as traced: 35) and for one where none does (62).
    Where the data alone say whether an entry ends early (78), the check took that branch. The thresholds
    are about half of that."""
    seen = []

    @_settings(100)
    @given(data=st.data())
    def draw(data):
        spec = data.draw(rp.programs("align", True), label="program")
        inputs = data.draw(rp.data("align"), label="data")
        cond_branches.clear()
        prog, report = rp.check_report(spec, inputs)
        reports = prog.traces[-1].optimized.reports
        assert (report.checked_end is not None) == ("checked at run time" in prog.explain()), prog.explain()
        # (one Cond per optimized run: with gradients, then without; both take the same branch)
        assert len(cond_branches) == 2 * (report.checked_end is not None), (cond_branches, prog.explain())
        assert len(set(cond_branches)) <= 1, cond_branches
        early = rp.ends_early(spec, inputs)
        if cond_branches and early is not None:
            assert cond_branches[0] == early, (spec, inputs, prog.explain())
        seen.append({"cumsum": report.loop_removed or any("running sum as a cumulative sum" in f
                                                          for f in report.sequence_forms),
                     "gather": any(f.startswith("gather ") for f in report.before_loop),
                     "masked": any(r.masked for r in reports), "checked": report.checked_end is not None,
                     "early": cond_branches == [True] * 2, "not early": cond_branches == [False] * 2,
                     "known": bool(cond_branches) and early is not None})

    draw()
    counts = {key: sum(s[key] for s in seen) for key in seen[0]}
    least = {"cumsum": 50, "gather": 8, "masked": 5, "checked": 50, "early": 15, "not early": 30, "known": 40}
    assert all(counts[key] >= n for key, n in least.items()), f"{counts} of {len(seen)}"


# the seeds' transducer in small, as a program of the align kind (random_programs' docstring reads it)
TRANSDUCER = rp.Program("align", groups=(rp.Group("single", (rp.Leaf("F", "zeros", "self"),)),),
                        ops=(rp.Op("linear", (6,), ("F", False)), rp.Op("linear", (9,), ("F", False)),
                             rp.Op("binary", (11, 8), ("add",)), rp.Op("unary", (12,), ("tanh",))),
                        updates=(13,), stacks=(10, 13), lasts=(), end=rp.End("counter", True, bound="enc"),
                        masked=rp.Masked(first=1, last=4, mask_arg=8, thr=0.0, assign_inside=True),
                        align=rp.Align("blank"))


@pytest.mark.parametrize("early", [False, True], ids=["none-ends-early", "one-ends-early"])
def test_transducer_program_takes_the_branch_its_data_says(early, cond_branches):
    """A counter of blanks, the encoder gathered at it, loop.end when it reaches the encoder length, a slow RNN
    on the previous label where it is no blank: the loop is gone (a cumulative sum, the gather over the whole
    sequence, the block over time'), checked at run time. Alignments of the encoder (entries of length 0 and 1
    among them) take the rewritten branch; one blank too many (the first entry ends a frame before its length)
    runs the loop as traced. Both equal the reference."""
    labels = [[0, 1, 0, 0], [2, 0], [], [0]]
    if early:
        labels[0] = labels[0] + [0]
    data = rp.Data([len(a) for a in labels], [3, 1, 2, 1], [0, 0, 0, 0], seed=3, labels=labels)
    prog, report = rp.check_report(TRANSDUCER, data)
    assert rp.ends_early(TRANSDUCER, data) == early
    assert cond_branches == [early] * 2   # (with and without gradients)
    assert report.loop_removed and any("running sum as a cumulative sum" in f for f in report.sequence_forms)
    assert any(f.startswith("gather ") for f in report.before_loop), prog.explain()
    assert report.masked and "time'" in [r.axis for r in prog.traces[-1].optimized.reports], prog.explain()
    assert "checked at run time" in prog.explain()


# -- the bugs found by the random programs, pinned --------------------------------------------------------

def _x(lengths, t_max, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(lengths), t_max, F.size, generator=g, dtype=DTYPE)


def _assert_equivalent(fn, tensors: dict, named, params: dict | None = None):
    prog = ll.compile(fn)
    rp.assert_equivalent(prog, params or {}, tensors, named)
    return prog


def _loss(*values):
    total = ll.zeros([])
    for v in values:
        total = total + rp.loss_term(v)
    return total


def test_state_assigned_a_loop_invariant_value():
    """A state whose next value comes from outside the loop is moved out (it was left unoptimized)."""
    def f(x, u):
        loop = ll.Loop(axis=T)
        loop.state.h = ll.zeros([F])
        with loop:
            prev = loop.state.h
            loop.state.h = u
            y = loop.stack(loop.unstack(x) * prev)
        return _loss(y, loop.state.h), y, loop.state.h

    n = torch.tensor([3, 0, 1])
    prog = _assert_equivalent(f, {"x": _x(n, 3), "u": torch.randn(3, F.size, dtype=DTYPE)},
                              lambda t: (ll.Named(t["x"], (B, T, F), {T: n}), ll.Named(t["u"], (B, F))))
    assert "states moved out" in prog.explain()


def test_last_of_an_entry_without_steps_when_the_loop_is_gone():
    """loop.last for an entry of length 0 is zeros, as in the loop, also when the optimizer removed it."""
    def f(x):
        loop = ll.Loop(axis=T)
        with loop:
            x_t = loop.unstack(x)
            y = loop.stack(x_t)
        return _loss(y, loop.last(x_t)), loop.last(x_t)

    n = torch.tensor([3, 0])
    prog = _assert_equivalent(f, {"x": _x(n, 3)}, lambda t: (ll.Named(t["x"], (B, T, F), {T: n}),))
    assert "it is gone" in prog.explain()


@pytest.mark.parametrize("other_entry_length", [1, 5])
def test_loop_over_axis_runs_all_frames_after_every_entry_ended(other_entry_length):
    """With loop.end in a loop over an axis, the frames after an entry's end are still stacked (its states
    frozen): each entry gets that whether or not another entry of the batch is still running."""
    def f(x):
        loop = ll.Loop(axis=T)
        loop.state.h = ll.zeros([F])
        with loop:
            x_t = loop.unstack(x)
            loop.state.h = ll.tanh(loop.state.h + x_t)
            loop.end(loop.index >= 1, include_eos=True)
            y = loop.stack(loop.state.h + x_t)
        return _loss(y), y

    n = torch.tensor([5, other_entry_length])
    x = _x(n, 5)
    prog = ll.compile(f)
    for run in (prog, prog.reference):
        y = run(ll.Named(x, (B, T, F), {T: n}))[1].align(B, T, F)
        h = torch.tanh(torch.tanh(x[0, 0]) + x[0, 1])      # frozen after step 1, where the entry ended
        torch.testing.assert_close(y[0, 2:], torch.tanh(h + x[0, 2:]) + x[0, 2:], rtol=1e-12, atol=1e-12)
    _assert_equivalent(f, {"x": x}, lambda t: (ll.Named(t["x"], (B, T, F), {T: n}),))


def test_states_stay_frozen_after_loop_end_in_a_loop_over_an_axis():
    """With loop.end in a loop over an axis, a state assigned from the input, and a running sum, stay frozen
    once an entry ended: neither is a shifted sequence or a cumulative sum over the whole axis."""
    def f(x):
        loop = ll.Loop(axis=T)
        loop.state.h = ll.zeros([F])
        loop.state.s = ll.zeros([F])
        with loop:
            x_t = loop.unstack(x)
            prev = loop.state.h
            loop.state.h = x_t
            loop.state.s = loop.state.s + x_t
            loop.end(loop.index >= 1, include_eos=True)
            y, z = loop.stack(prev), loop.stack(loop.state.s)
        return _loss(y, z, loop.state.h, loop.state.s), y, z, loop.state.h, loop.state.s

    n = torch.tensor([5, 2, 0])
    _assert_equivalent(f, {"x": _x(n, 5)}, lambda t: (ll.Named(t["x"], (B, T, F), {T: n}),))


def test_loop_without_axis_whose_end_and_state_both_gain_the_batch_dim():
    """Loop(max_seq_len=...) with a state initialised without the batch dim, assigned a value with it, and
    an end condition with it (the loop and the state were both told to add the batch: tracing failed)."""
    lin = ll.nn.Linear(H, F).double()

    def f(u, lim):
        loop = ll.Loop(max_seq_len=8)
        loop.state.h = ll.zeros([F])
        loop.state.c = 0
        with loop:
            loop.state.h = lin(u) * 2.0
            loop.state.c = loop.state.c + 1
            loop.end(loop.state.c >= lim, include_eos=True)
        return _loss(loop.state.h), loop.state.h, loop.state.c

    lim = torch.tensor([1, 3, 0])
    _assert_equivalent(f, {"u": torch.randn(3, H.size, dtype=DTYPE)},
                       lambda t: (ll.Named(t["u"], (B, H)), ll.Named(lim, (B,))),
                       dict(lin.named_parameters()))


def test_counter_plus_a_python_number_in_a_loop_over_an_axis():
    """``c = c + 1`` is a running sum of a Python number: its cumulative-sum form accepts the number."""
    def f(x):
        loop = ll.Loop(axis=T)
        loop.state.c = 0
        loop.state.s = 0.5
        with loop:
            x_t = loop.unstack(x)
            loop.state.c = loop.state.c + 1
            loop.state.s = loop.state.s + 0.25
            y = loop.stack(x_t * ll.cast(loop.state.c, DTYPE) + loop.state.s)
        return _loss(y), y, loop.state.c, loop.state.s

    n = torch.tensor([3, 0, 1])
    prog = _assert_equivalent(f, {"x": _x(n, 3)}, lambda t: (ll.Named(t["x"], (B, T, F), {T: n}),))
    assert "cumulative sum" in prog.explain()


def test_loop_needed_only_for_its_dim():
    """A loop ended by loop.end whose only use is its dim (a value from outside, stacked: moved out of
    the loop) still runs: it makes the dim's size and lengths (the executor dropped it as unused)."""
    def f(u, lim):
        loop = ll.Loop(max_seq_len=8)
        loop.state.c = 0
        with loop:
            loop.state.c = loop.state.c + 1
            loop.end(loop.state.c >= lim, include_eos=True)
            y = loop.stack(u)
        return _loss(y), y

    lim = torch.tensor([2, 0, 3])
    _assert_equivalent(f, {"u": torch.randn(3, H.size, dtype=DTYPE)},
                       lambda t: (ll.Named(t["u"], (B, H)), ll.Named(lim, (B,))))


def test_loop_needed_only_for_its_dim_without_the_optimizer():
    """The same as written by hand: nothing but the loop's dim is used after the loop."""
    def f(u, lim):
        loop = ll.Loop(max_seq_len=8)
        loop.state.c = 0
        with loop:
            loop.state.c = loop.state.c + 1
            loop.end(loop.state.c >= lim, include_eos=True)
        return ll.expand(u, [loop.axis])

    prog = ll.compile(f, optimize=False)
    args = ll.Named(torch.randn(3, H.size, dtype=DTYPE), (B, H)), ll.Named(torch.tensor([2, 0, 3]), (B,))
    for run in (prog, prog.reference):
        y = run(*args)
        assert y.lengths[next(d for d in y.dims if d not in (B, H))].tolist() == [2, 1, 3]


def test_dot_to_a_value_without_dims():
    """dot of two tensors that have only the reduced dim: a value without dims (its kernel failed)."""
    def f(a):
        return ll.dot(a, a * 2.0, reduce=F)

    prog = ll.compile(f)
    assert prog(ll.Named(torch.arange(3.0, dtype=DTYPE), (F,))).tensor.item() == 10.0


def test_last_of_a_python_number_state_in_a_loop_ended_by_it():
    """loop.last of a state kept at its Python-number initial value, which also ends the loop: the value
    the body gives at each step is that number, not a tensor (the loop's kernel failed on it)."""
    def f(x2):
        loop = ll.Loop(axis=W)
        loop.state.s = 0.5
        loop.state.c = 0.0
        with loop:
            s = loop.state.s
            loop.state.c = loop.state.c + loop.unstack(x2)
            loop.end(s > 0.25, include_eos=True)
        return _loss(loop.last(s), loop.state.c), loop.last(s), loop.state.c

    _assert_equivalent(f, {"x2": torch.randn(3, W.size, dtype=DTYPE)}, lambda t: (ll.Named(t["x2"], (B, W)),))


def test_nonlinearity_of_a_python_number_state_in_float64():
    """tanh or exp of a state still at its Python-number initial value is computed in the program's float
    dtype (float64 here), not in torch's default float32 (the reference run differed by 1e-8)."""
    def f(x2):
        loop = ll.Loop(axis=W)
        loop.state.s = 0.1
        with loop:
            y = loop.stack(ll.exp(loop.state.s) + ll.tanh(loop.state.s))
            loop.state.s = ll.cast(loop.index, DTYPE)
            z = loop.stack(loop.unstack(x2))
        return _loss(y, z), y

    prog = _assert_equivalent(f, {"x2": torch.randn(2, W.size, dtype=DTYPE)}, lambda t: (ll.Named(t["x2"], (B, W)),))
    y = prog.reference(ll.Named(torch.randn(2, W.size, dtype=DTYPE), (B, W)))[1]
    s = torch.tensor([0.1, 0.0, 1.0, 2.0], dtype=DTYPE)
    assert y.tensor.dtype == DTYPE
    torch.testing.assert_close(y.tensor, torch.exp(s) + torch.tanh(s), rtol=1e-15, atol=0)


def test_frozen_python_number_state_keeps_float64():
    """A state still at its Python-number initial value, in a loop ended by a condition without dims (the
    states are frozen after it, not expanded to the batch): the frozen value keeps the program's float64
    (torch.where of two Python numbers gave float32, and the reference run differed by 1e-8)."""
    def f(x):
        loop = ll.Loop(axis=W)
        loop.state.s = 0.1
        with loop:
            loop.end(loop.index >= 1, include_eos=True)
            y = loop.stack(ll.tanh(loop.state.s) + loop.unstack(x))
        return _loss(y), y

    x = torch.randn(3, W.size, F.size, dtype=DTYPE)
    prog = _assert_equivalent(f, {"x": x}, lambda t: (ll.Named(t["x"], (B, W, F)),))
    y = prog.reference(ll.Named(x, (B, W, F)))[1]
    expected = torch.tanh(torch.tensor(0.1, dtype=DTYPE)) + x
    torch.testing.assert_close(y.align(B, W, F), expected, rtol=1e-15, atol=1e-15)


def test_where_with_a_python_bool_condition_has_the_dims_of_its_branches():
    """where(cond, a, b) whose condition is a Python bool at run time (a comparison of a Python-number state)
    still has the dims of its branches (it gave the chosen branch as it was: a number without dims)."""
    def f(x):
        loop = ll.Loop(axis=W)
        loop.state.s = 0.5
        with loop:
            v = ll.where(loop.state.s > 0.0, 2.0, loop.unstack(x))
            y = loop.stack(ll.sum(v, axis=F))
        return _loss(y), y

    x = torch.randn(2, W.size, F.size, dtype=DTYPE)
    prog = _assert_equivalent(f, {"x": x}, lambda t: (ll.Named(t["x"], (B, W, F)),))
    y = prog(ll.Named(x, (B, W, F)))[1]
    assert y.align(B, W).tolist() == [[6.0] * W.size] * 2


def test_op_of_two_python_numbers_has_the_program_float_dtype():
    """A state kept at its Python-number initial value, scaled and stacked: hoisted out of the loop, the
    product of two constants is declared (and expanded) in the program's float64, not torch's float32."""
    def f(x):
        loop = ll.Loop(axis=W)
        loop.state.s = 0.5
        with loop:
            y = loop.stack(loop.state.s * 0.5)
            z = loop.stack(loop.unstack(x))
        return _loss(y, z), y, ll.expand(ll.add(0.5, 0.25), [F])

    x = torch.randn(2, W.size, F.size, dtype=DTYPE)
    prog = _assert_equivalent(f, {"x": x}, lambda t: (ll.Named(t["x"], (B, W, F)),))
    _, y, c = prog(ll.Named(x, (B, W, F)))
    assert y.tensor.dtype == c.tensor.dtype == DTYPE


def test_held_value_gains_the_batch_dim_in_a_loop_ended_per_entry():
    """A value of a masked block without the batch dim (a function of the step index), held under a mask
    over the batch and stacked, in a loop over a static dim ended by a condition over the batch: the held
    value gets the batch dim once (it was hinted for the loop and for the held state, and tracing failed
    with "dims names a dim twice: {batch, batch}", in the reference run too)."""
    def f(x2, lim):
        loop = ll.Loop(axis=W)
        with loop:
            with ll.MaskedComputation(mask=loop.unstack(x2) > 0.0):
                a = ll.tanh(ll.cast(loop.index, DTYPE))
            loop.end(loop.index >= lim, include_eos=False)
            y = loop.stack(a)
        return _loss(y), y

    x2 = torch.tensor([[1.0, -1.0, 1.0, 1.0], [-1.0, 1.0, -1.0, 1.0]], dtype=DTYPE)
    lim = torch.tensor([2, 3])
    _assert_equivalent(f, {"x2": x2}, lambda t: (ll.Named(t["x2"], (B, W)), ll.Named(lim, (B,))))


def test_masked_block_over_a_static_dim_under_a_mask_without_the_batch_dim():
    """A state assigned in a block whose mask depends on the step index only (no batch dim), in a loop over
    a static dim: moved out, the block runs over window', whose lengths have no dims; its final value is the
    reference's (the length of window' failed: ``expand()`` without sizes)."""
    def f(x2):
        loop = ll.Loop(axis=W)
        loop.state.s = ll.zeros([])
        with loop:
            x2_t = loop.unstack(x2)
            with ll.MaskedComputation(mask=ll.cast(loop.index, DTYPE) > 0.5):
                loop.state.s = ll.tanh(x2_t)
        return _loss(loop.state.s), loop.state.s

    _assert_equivalent(f, {"x2": torch.randn(2, W.size, dtype=DTYPE)}, lambda t: (ll.Named(t["x2"], (B, W)),))


def test_masked_block_that_reads_only_its_own_state():
    """A block that only steps its own state (no frame read in it), under a mask from the frames, with the
    state's final value as the output: moved out, it runs over time' (the optimized run failed: "the size of
    time' is not known in this call", as no input of the block's own loop is over time')."""
    def f(x2):
        loop = ll.Loop(axis=T)
        loop.state.s = ll.full(0.5, [])
        with loop:
            with ll.MaskedComputation(mask=loop.unstack(x2) > 0.0):
                loop.state.s = ll.tanh(loop.state.s)
        return _loss(loop.state.s), loop.state.s

    n = torch.tensor([3, 1, 0])
    x2 = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 5.0, 5.0], [1.0, 1.0, 1.0]], dtype=DTYPE)
    prog = _assert_equivalent(f, {"x2": x2}, lambda t: (ll.Named(t["x2"], (B, T), {T: n}),))
    s = prog(ll.Named(x2, (B, T), {T: n}))[1].align(B)
    half = torch.tensor(0.5, dtype=DTYPE)
    torch.testing.assert_close(s, torch.stack([torch.tanh(torch.tanh(half)), half, half]), rtol=1e-12, atol=0)
