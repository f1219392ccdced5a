"""Misuse of ``Loop`` and ``Cond``: each raises one looplift error that names the user's line and the
dims or state names involved.

Each test marks the offending line with a ``# <marker>`` comment; ``where``
finds that line in this file, so the expected ``file:line`` never goes stale.
"""

from __future__ import annotations

import time

import pytest
import torch
from error_helpers import check_error, marked_line

import looplift as ll
from looplift.errors import DimError, DimMismatchError, DTypeError, ExecutionError, TraceError

B = ll.batch_dim
T = ll.Dim("time")
F = ll.Dim("feat", 3)
H = ll.Dim("hidden", 2)

def where(marker: str) -> str:
    """``file:line`` of the one line of this file ending in ``# <marker>``."""
    return marked_line(__file__, marker)


def assert_error(info: pytest.ExceptionInfo, cls: type, marker: str, *names: str) -> None:
    """The error is exactly `cls`, names the marked line and every name in `names` (as a word)."""
    check_error(__file__, info, cls, marker, *names)


def feats() -> ll.Named:
    """Float features over (batch, time, feat) with lengths [5, 3]."""
    torch.manual_seed(0)
    return ll.Named(torch.randn(2, 5, F.size), (B, T, F), lengths={T: torch.tensor([5, 3])})


def run(fn, *inputs):
    return ll.compile(fn, mode="eval")(*inputs)


# -- unstack, stack, end, index -------------------------------------------------------------

def test_unstack_of_a_tensor_without_the_loop_axis():
    def model(x):
        with ll.Loop(axis=T) as loop:
            frame = loop.unstack(ll.sum(x, axis=T))  # <unstack-no-axis>
            y = loop.stack(frame)
        return y

    with pytest.raises(DimError) as info:
        run(model, feats())
    assert_error(info, DimError, "unstack-no-axis", "time", "batch", "feat")


def test_unstack_in_a_loop_without_an_axis():
    def model(x):
        loop = ll.Loop(max_seq_len=4)
        loop.state.i = 0
        with loop:
            loop.unstack(x)  # <unstack-own-dim>
            loop.state.i = loop.state.i + 1
            loop.end(loop.state.i >= 2, include_eos=True)
        return loop.state.i

    with pytest.raises(TraceError) as info:
        run(model, feats())
    assert_error(info, TraceError, "unstack-own-dim")


def _arguments(what: str, x):
    """Positional and keyword arguments of the loop method `what`."""
    return ((ll.full(True),), {"include_eos": True}) if what == "end" else ((x,), {})


@pytest.mark.parametrize("what", ["stack", "unstack", "end", "index"])
def test_loop_operations_before_the_with_block(what):
    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.h = ll.zeros([F])
        args, kwargs = _arguments(what, x)
        loop.index if what == "index" else getattr(loop, what)(*args, **kwargs)  # <before-with>
        with loop:
            loop.state.h = loop.state.h + loop.unstack(x)
        return loop.state.h

    with pytest.raises(TraceError) as info:
        run(model, feats())
    assert_error(info, TraceError, "before-with", what, "time")


@pytest.mark.parametrize("what", ["stack", "unstack", "end", "index"])
def test_loop_operations_after_the_with_block(what):
    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.h = ll.zeros([F])
        with loop:
            loop.state.h = loop.state.h + loop.unstack(x)
        args, kwargs = _arguments(what, x)
        loop.index if what == "index" else getattr(loop, what)(*args, **kwargs)  # <after-with>
        return loop.state.h

    with pytest.raises(TraceError) as info:
        run(model, feats())
    assert_error(info, TraceError, "after-with", what, "time")


# -- state ----------------------------------------------------------------------------------

def test_reading_a_state_that_was_never_initialised():
    def model(x):
        with ll.Loop(axis=T) as loop:
            h = loop.state.hidden_state + loop.unstack(x)  # <read-uninit>
            y = loop.stack(h)
        return y

    with pytest.raises(TraceError) as info:
        run(model, feats())
    assert_error(info, TraceError, "read-uninit", "hidden_state")


def test_assigning_a_state_that_was_never_initialised():
    def model(x):
        with ll.Loop(axis=T) as loop:
            loop.state.hidden_state = loop.unstack(x)  # <assign-uninit>
        return x

    with pytest.raises(TraceError) as info:
        run(model, feats())
    assert_error(info, TraceError, "assign-uninit", "hidden_state")


def test_assigning_a_state_after_the_loop():
    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.h = ll.zeros([F])
        with loop:
            loop.state.h = loop.state.h + loop.unstack(x)
        loop.state.h = x  # <assign-after>
        return x

    with pytest.raises(TraceError) as info:
        run(model, feats())
    assert_error(info, TraceError, "assign-after", "h")


def test_a_state_whose_new_value_has_another_feature_dim():
    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.h = ll.zeros([H])
        with loop:
            loop.state.h = loop.unstack(x) * 2.0  # <state-dims>
        return loop.state.h

    with pytest.raises(DimError) as info:
        run(model, feats())
    assert_error(info, DimError, "state-dims", "h", "hidden", "feat")


def test_a_state_whose_new_value_gains_a_feature_dim():
    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.h = ll.zeros([H])
        with loop:
            loop.state.h = loop.state.h + ll.sum(loop.unstack(x), axis=B)  # <state-gains-dim>
        return loop.state.h

    with pytest.raises(DimError) as info:
        run(model, feats())
    assert_error(info, DimError, "state-gains-dim", "h", "hidden", "feat")


def test_a_state_whose_new_value_has_another_dtype():
    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.count = ll.zeros([F], dtype=torch.int64)
        with loop:
            loop.state.count = loop.state.count + loop.unstack(x)  # <state-dtype>
        return loop.state.count

    with pytest.raises(DTypeError) as info:
        run(model, feats())
    assert_error(info, DTypeError, "state-dtype", "count", "torch.int64", "torch.float32")


# -- last -------------------------------------------------------------------------------------

def test_last_of_a_value_from_outside_the_loop():
    def model(x):
        loop = ll.Loop(axis=T)
        with loop:
            loop.stack(loop.unstack(x))
        return loop.last(x)  # <last-outer>

    with pytest.raises(TraceError) as info:
        run(model, feats())
    assert_error(info, TraceError, "last-outer", "batch", "time", "feat")


def test_last_inside_the_loop():
    def model(x):
        loop = ll.Loop(axis=T)
        with loop:
            frame = loop.unstack(x)
            final = loop.last(frame)  # <last-inside>
        return final

    with pytest.raises(TraceError) as info:
        run(model, feats())
    assert_error(info, TraceError, "last-inside")


# -- length -----------------------------------------------------------------------------------

def _count_until(limit, max_seq_len):
    """``i`` counts up each step until ``i >= limit``; `max_seq_len` bounds the loop."""
    loop = ll.Loop(max_seq_len=max_seq_len)  # <count-loop>
    loop.state.i = 0
    with loop:
        loop.state.i = loop.state.i + 1
        loop.end(loop.state.i >= limit, include_eos=True)
        steps = loop.stack(loop.state.i)
    return loop.state.i, steps


@pytest.mark.parametrize("run_name", ["__call__", "reference"])
def test_running_past_max_seq_len_is_an_error_at_call_time(run_name):
    program = ll.compile(_count_until)
    limits = ll.Named(torch.tensor([2, 7]), (B,))
    program.trace(limits, 4)  # tracing is fine: the lengths are known only when the program runs
    with pytest.raises(ExecutionError) as info:
        getattr(program, run_name)(limits, 4)
    assert_error(info, ExecutionError, "count-loop", "4")


@pytest.mark.parametrize("run_name", ["__call__", "reference"])
def test_a_loop_that_never_ends_stops_at_max_seq_len(run_name):
    program = ll.compile(_count_until)
    start = time.perf_counter()
    with pytest.raises(ExecutionError) as info:
        getattr(program, run_name)(10 ** 9, 50)  # the end condition is never True; no batch dims at all
    assert time.perf_counter() - start < 10
    assert_error(info, ExecutionError, "count-loop", "50")


def test_running_past_a_per_entry_max_seq_len():
    program = ll.compile(_count_until)
    limits, max_len = ll.Named(torch.tensor([3, 3]), (B,)), ll.Named(torch.tensor([5, 2]), (B,))
    with pytest.raises(ExecutionError) as info:
        program(limits, max_len)
    assert_error(info, ExecutionError, "count-loop")


def test_ending_exactly_at_max_seq_len_is_not_an_error():
    i, steps = ll.compile(_count_until)(3, 3)
    assert int(i.tensor) == 3
    axis = steps.dims[0]
    assert steps.align(axis).tolist() == [1, 2, 3] and int(steps.lengths[axis]) == 3


def test_a_loop_without_axis_and_without_max_seq_len():
    def model(x):
        ll.Loop()  # <no-axis-no-max>
        return x

    with pytest.raises(TraceError) as info:
        run(model, feats())
    assert_error(info, TraceError, "no-axis-no-max", "max_seq_len")


def test_a_loop_without_axis_whose_body_never_ends():
    def model(x):
        loop = ll.Loop(max_seq_len=5)  # <never-ends>
        loop.state.i = 0
        with loop:
            loop.state.i = loop.state.i + 1
        return loop.state.i

    with pytest.raises(TraceError) as info:
        run(model, feats())
    assert_error(info, TraceError, "never-ends", "loop.end")


def test_end_called_twice():
    def model(x):
        loop = ll.Loop(max_seq_len=5)
        loop.state.i = 0
        with loop:
            loop.state.i = loop.state.i + 1
            loop.end(loop.state.i >= 2, include_eos=True)
            loop.end(loop.state.i >= 3, include_eos=True)  # <end-twice>
        return loop.state.i

    with pytest.raises(TraceError) as info:
        run(model, feats())
    assert_error(info, TraceError, "end-twice", "loop.end")


def test_end_with_a_condition_that_is_not_bool():
    def model(x):
        loop = ll.Loop(max_seq_len=5)
        loop.state.i = 0
        with loop:
            loop.state.i = loop.state.i + 1
            loop.end(loop.state.i - 2, include_eos=True)  # <end-not-bool>
        return loop.state.i

    with pytest.raises(DTypeError) as info:
        run(model, feats())
    assert_error(info, DTypeError, "end-not-bool", "int64", "bool")


# -- values crossing the loop boundary --------------------------------------------------------

def test_a_value_from_inside_the_loop_used_after_it():
    def model(x):
        with ll.Loop(axis=T) as loop:
            doubled = loop.unstack(x) * 2.0
        return doubled + 1.0  # <used-after>

    with pytest.raises(TraceError) as info:
        run(model, feats())
    assert_error(info, TraceError, "used-after", "batch", "feat", "loop.stack")


def test_a_value_from_inside_the_loop_returned_by_the_model():
    def model(x):
        with ll.Loop(axis=T) as loop:
            doubled = loop.unstack(x) * 2.0  # <returned-from-inside>
        return doubled

    with pytest.raises(TraceError) as info:
        run(model, feats())
    assert_error(info, TraceError, "returned-from-inside", "batch", "feat", "loop")


def test_a_stacked_value_used_inside_the_loop():
    def model(x):
        with ll.Loop(axis=T) as loop:
            ys = loop.stack(loop.unstack(x))
            z = ys * 2.0  # <stacked-inside>
        return z

    with pytest.raises(TraceError) as info:
        run(model, feats())
    assert_error(info, TraceError, "stacked-inside", "time", "batch", "feat", "loop.stack")


# -- Cond ---------------------------------------------------------------------------------------

def test_cond_branches_with_different_dims():
    def model(x):
        with ll.Cond(ll.full(True)) as cond:  # <cond-dims>
            cond.true = ll.sum(x, axis=T)  # <cond-dims-true>
            cond.false = ll.sum(x, axis=F)  # <cond-dims-false>
        return cond.result

    with pytest.raises(DimMismatchError) as info:
        run(model, feats())
    assert_error(info, DimMismatchError, "cond-dims", "batch", "feat", "time")
    assert where("cond-dims-true") in str(info.value) and where("cond-dims-false") in str(info.value)


def test_cond_branches_with_different_dtypes():
    def model(x):
        with ll.Cond(ll.full(True)) as cond:  # <cond-dtypes>
            cond.true = ll.sum(x, axis=T)
            cond.false = ll.cast(ll.sum(x, axis=T), "int64")
        return cond.result

    with pytest.raises(DTypeError) as info:
        run(model, feats())
    assert_error(info, DTypeError, "cond-dtypes", "float32", "int64")


def test_cond_with_a_predicate_that_is_not_a_scalar():
    def model(x):
        with ll.Cond(ll.sum(x, axis=T) > 0.0) as cond:  # <cond-not-scalar>
            cond.true = x
            cond.false = -x
        return cond.result

    with pytest.raises(TraceError) as info:
        run(model, feats())
    assert_error(info, TraceError, "cond-not-scalar", "batch", "feat", "looplift.where")


def test_cond_with_a_predicate_that_is_not_bool():
    def model(x):
        with ll.Cond(ll.full(1)) as cond:  # <cond-not-bool>
            cond.true = x
            cond.false = -x
        return cond.result

    with pytest.raises(TraceError) as info:
        run(model, feats())
    assert_error(info, TraceError, "cond-not-bool", "bool")


def test_cond_where_only_the_true_branch_is_set():
    def model(x):
        with ll.Cond(ll.full(True)) as cond:  # <cond-only-true>
            cond.true = x * 2.0
        return cond.result

    with pytest.raises(TraceError) as info:
        run(model, feats())
    assert_error(info, TraceError, "cond-only-true", "cond.false")


def test_cond_where_the_false_branch_is_set_first():
    def model(x):
        with ll.Cond(ll.full(True)) as cond:
            cond.false = x * 2.0  # <cond-false-first>
            cond.true = x
        return cond.result

    with pytest.raises(TraceError) as info:
        run(model, feats())
    assert_error(info, TraceError, "cond-false-first", "cond.true")


def test_a_value_from_inside_a_cond_branch_used_after_it():
    def model(x):
        with ll.Cond(ll.full(True)) as cond:
            doubled = x * 2.0
            cond.true = doubled
            cond.false = x
        return doubled + cond.result  # <cond-leak>

    with pytest.raises(TraceError) as info:
        run(model, feats())
    assert_error(info, TraceError, "cond-leak", "batch", "time", "feat")


def test_a_loop_state_assigned_inside_a_cond_branch():
    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.h = ll.zeros([B, F])
        with loop:
            frame = loop.unstack(x)
            with ll.Cond(loop.index > 0) as cond:
                loop.state.h = loop.state.h + frame  # <state-in-branch>
                cond.true = frame
                cond.false = frame
        return loop.state.h

    with pytest.raises(TraceError) as info:
        run(model, feats())
    assert_error(info, TraceError, "state-in-branch", "batch", "feat", "Cond result")
