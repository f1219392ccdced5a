"""Programs: tracing, modes, signatures, outputs, dtypes, and the reference interpreter."""

import dataclasses
import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import looplift as ll
from looplift import Dim, Named
from looplift import batch_dim as B

T, F = Dim("time"), Dim("feat", 3)


def _x(lengths=(4, 2), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), F.size, generator=g, dtype=dtype)
    return Named(x, (B, T, F), {T: torch.tensor(lengths)})


@pytest.mark.parametrize("mode,training,search", [("train", True, False), ("eval", False, False),
                                                    ("search", False, True)])
def test_mode_is_known_while_tracing(mode, training, search):
    seen = {}

    def fn(x):
        seen.update(mode=ll.mode(), training=ll.is_training(), search=ll.is_search())
        return x

    ll.compile(fn, mode=mode)(_x())
    assert seen == {"mode": mode, "training": training, "search": search}


def test_trace_happens_once_per_signature():
    calls = []

    def fn(x, *, axis):
        calls.append(axis)
        return ll.sum(x, axis=axis)

    prog = ll.compile(fn, mode="eval")
    prog(_x(), axis=T)
    prog(_x(lengths=(3, 3, 1)), axis=T)  # other sizes, same dims: no retrace
    assert len(calls) == 1
    prog(_x(), axis=F)                   # another constant argument: a new trace
    prog(_x(dtype=torch.float32), axis=T)  # another dtype: a new trace
    assert len(calls) == 3 and len(prog.traces) == 3


def test_outputs_keep_the_returned_structure():
    @dataclasses.dataclass
    class Out:
        total: object
        parts: dict

    def fn(x):
        return Out(ll.sum(x, axis=[T, F]), {"max": ll.max(x, axis=T), "n": 7})

    out = ll.compile(fn, mode="eval")(_x())
    assert isinstance(out, Out) and out.parts["n"] == 7
    x = _x().tensor
    torch.testing.assert_close(out.total.tensor, torch.stack([x[0, :4].sum(), x[1, :2].sum()]))
    torch.testing.assert_close(out.parts["max"].tensor, torch.stack([x[0, :4].amax(0), x[1, :2].amax(0)]))


def test_outputs_carry_lengths_of_derived_dims():
    out = ll.compile(lambda x: ll.pad(x, axis=T, left=1, right=1), mode="eval")(_x(lengths=(4, 2)))
    (new,) = [d for d in out.dims if d.is_dynamic]
    assert new is T + 2
    assert out.lengths[new].tolist() == [6, 4]


def test_reference_interpreter_agrees_with_the_executor():
    lin = ll.nn.Linear(F, Dim("out", 5)).double()

    def fn(x):
        h = ll.tanh(lin(x))
        return ll.sum(ll.softmax(h, axis=T) * h, axis=T)

    prog = ll.compile(fn, mode="eval")
    torch.testing.assert_close(prog(_x()).tensor, prog.reference(_x()).tensor, rtol=0, atol=0)


def test_nodes_the_outputs_do_not_need_are_not_run():
    prog = ll.compile(lambda x: (ll.exp(x), ll.log(x))[0], mode="eval")
    trace = prog.trace(_x())
    assert [n.op for n in trace.graph.nodes if n.op != "input"] == ["exp", "log"]
    assert trace.num_nodes == 1



def test_a_value_is_freed_after_its_last_use():
    """exp's result is read only by the softplus: while the log after it runs, nothing holds it any more (as a
    hand-written model's temporaries are freed; holding all of them would raise a call's peak memory). (The
    softplus makes a new tensor; the sum and the log then compute into it, their operands being theirs.)"""
    alive = {}

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.log.default, torch.ops.aten.log_.default):
                alive["exp"] = watched["exp"]() is not None
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.exp.default:
                watched["exp"] = weakref.ref(out)
            return out

    watched = {}
    prog = ll.compile(lambda x: ll.log(ll.softplus(ll.exp(x)) + 2.0), mode="eval")
    x = _x()
    with torch.no_grad(), Watch():
        got = prog(x).tensor
    torch.testing.assert_close(got, torch.log(torch.nn.functional.softplus(torch.exp(x.tensor)) + 2.0))
    assert alive == {"exp": False}


def test_a_call_leaves_no_reference_cycles():
    """What a call returns is freed as soon as the caller drops it, not when the garbage collector next runs:
    nothing a call makes refers to itself (a recursive closure that flattens or rebuilds the outputs would,
    and keep them alive)."""
    def fn(x):
        loop = ll.Loop(axis=T)
        loop.state.h = ll.zeros([F], dtype=x.dtype)
        with loop:
            loop.state.h = ll.tanh(loop.state.h + loop.unstack(x))
            ys = loop.stack(loop.state.h)
        return {"ys": (ys, [loop.state.h * 2.0])}

    prog = ll.compile(fn, mode="train")
    x = _x()
    prog(x)
    gc.collect()
    gc.disable()
    try:
        out = prog(x)
        ys = weakref.ref(out["ys"][0].tensor)
        del out
        assert ys() is None
        assert gc.collect() == 0
    finally:
        gc.enable()


@pytest.mark.parametrize("read_again", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_a_sum_adds_into_a_new_operand_that_only_it_reads(read_again, grad):
    """Without gradients, a sum whose operand is a new tensor (a product) that nothing else reads adds into it
    in place, as a hand-written model writes ``p.add_(1.5)`` into a temporary of its own. An operand read
    again keeps its values, and with gradients nothing is overwritten."""
    seen = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.overloadpacket)
            return func(*args, **(kwargs or {}))

    def model(x, y):
        p = x * y
        s = p + 1.5
        return (s, p) if read_again else (s,)

    x, y = _x(), _x()
    x.tensor.requires_grad_(grad)
    prog = ll.compile(model, mode="eval")
    with torch.set_grad_enabled(grad):
        prog(x, y)   # (traced)
        with Watch():
            results = prog(x, y)
        want = x.tensor * y.tensor
    torch.testing.assert_close(results[0].tensor, want + 1.5, rtol=0, atol=0)
    if read_again:
        torch.testing.assert_close(results[1].tensor, want, rtol=0, atol=0)
    assert (torch.ops.aten.add_ in seen) == (not read_again and not grad), seen
    if grad:
        (g,) = torch.autograd.grad(results[0].tensor.sum(), [x.tensor])
        torch.testing.assert_close(g, y.tensor, rtol=0, atol=0)


def test_a_loop_step_never_overwrites_a_value_made_before_the_loop():
    """A new tensor made before a loop (a product) and read once per step by a sum is the same at every step:
    the step's sum never adds into it, however few times the step's own graph reads it."""
    def model(x, q):
        pre = q * 2.0
        loop = ll.Loop(axis=T)
        loop.state.h = ll.ones([F])
        with loop:
            loop.state.h = ll.tanh(pre + loop.state.h) + loop.unstack(x)
            y = loop.stack(loop.state.h)
        return y

    x = _x(lengths=(4, 4))
    q = Named(torch.randn(2, F.size, dtype=torch.float64), (B, F))
    with torch.no_grad():
        got = ll.compile(model, mode="eval")(x, q).align(B, T, F)
    h = torch.ones(2, F.size, dtype=torch.float64)
    for t in range(4):
        h = torch.tanh(q.tensor * 2.0 + h) + x.tensor[:, t]
        torch.testing.assert_close(got[:, t], h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lengths", [(5, 5), (5, 2)])
def test_a_step_reads_its_frame_of_a_sequence_without_a_gradient_the_size_of_the_sequence(lengths):
    """A sequence that a loop's steps read only by their frames is split into its frames once per run: each
    step's gradient is a frame, gathered into the sequence's once (unbind's backward), not a zero sequence
    holding one frame made per step (select's backward: quadratic in the steps). The reference interpreter
    selects, literally; values and gradients equal a plain PyTorch loop either way."""
    def model(x):
        pre = x * 2.0   # (a sequence made before the loop)
        loop = ll.Loop(axis=T)
        loop.state.h = ll.zeros([F])
        with loop:
            loop.state.h = ll.tanh(loop.unstack(pre) + loop.state.h * 0.5)
            y = loop.stack(loop.state.h)
        return ll.sum(y, axis=[B, T, F])

    def by_hand(x):
        h, total = torch.zeros(x.shape[0], F.size, dtype=x.dtype), 0.0
        for t in range(x.shape[1]):
            h_new = torch.tanh(x[:, t] * 2.0 + h * 0.5)
            inside = (t < torch.tensor(lengths))[:, None]
            h = torch.where(inside, h_new, h)
            total = total + (h_new * inside).sum()
        return total

    seen = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    x = _x(lengths=lengths)
    want_x = x.tensor.clone().requires_grad_(True)
    want = by_hand(want_x)
    want.backward()
    prog = ll.compile(model, mode="train")
    for run in ("executor", "reference"):
        got_x = x.tensor.clone().requires_grad_(True)
        seen.clear()
        with Watch():
            call = prog if run == "executor" else prog.reference
            got = call(Named(got_x, x.dims, x.lengths)).tensor
            got.backward()
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_x.grad, want_x.grad, rtol=1e-12, atol=1e-12)
        assert seen.count(torch.ops.aten.select_backward.default) == (0 if run == "executor" else 5)


def test_trace_ahead_from_specs():
    prog = ll.compile(lambda x: ll.mean(x, axis=T), mode="eval")
    trace = prog.trace(ll.Spec((B, T, F), torch.float64))
    assert trace.seconds > 0 and trace.num_nodes == 1
    prog(_x())
    assert len(prog.traces) == 1  # the call found the trace made ahead


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_models_run_in_each_float_dtype(dtype):
    model = ll.nn.FeedForward(F, Dim("hidden", 6)).to(dtype)
    prog = ll.compile(lambda x: ll.mean(model(x), axis=T), mode="eval")
    out = prog(_x(dtype=dtype))
    assert out.tensor.dtype == dtype
    plain = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3)).to(dtype)
    plain[0].weight.data, plain[0].bias.data = model.up.weight.data, model.up.bias.data
    plain[2].weight.data, plain[2].bias.data = model.down.weight.data, model.down.bias.data
    x = _x(dtype=dtype).tensor
    expected = torch.stack([plain(x[0, :4]).mean(0), plain(x[1, :2]).mean(0)])
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(out.tensor, expected, rtol=tol, atol=tol)


def test_gradients_flow_into_inputs():
    x = _x()
    x.tensor.requires_grad_()
    out = ll.compile(lambda v: ll.sum(v * v, axis=[B, T, F]), mode="train")(x)
    out.tensor.backward()
    expected = 2 * x.tensor.detach() * x.mask()
    torch.testing.assert_close(x.tensor.grad, expected)


def test_programs_do_not_share_tracing_state():
    inner = ll.compile(lambda x: ll.exp(x), mode="eval")

    def outer(x):
        return ll.sum(x, axis=T)

    prog = ll.compile(outer, mode="train")
    a = inner(_x())
    b = prog(_x())
    assert a.tensor.shape == (2, 4, 3) and b.tensor.shape == (2, 3)
    assert inner.traces[0].graph is not prog.traces[0].graph


def test_constant_python_arguments_reach_the_model():
    prog = ll.compile(lambda x, scale: x * scale, mode="eval")
    torch.testing.assert_close(prog(_x(), 3.0).tensor, _x().tensor * 3.0)


def test_demo_main_job_trains(capsys):
    from looplift.recipes import demo

    demo.main(["--steps", "30", "--batch", "8"])
    text = capsys.readouterr().out
    before, after = [float(v) for v in text.split("dev CTC loss per utterance: ")[1].split(" before")[0:1]
                     + [text.split("before training, ")[1].split(" after")[0]]]
    assert after < before
    assert "checkpoint round trip" in text
