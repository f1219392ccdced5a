"""Programs under ``torch.compile``: ``looplift.compile(..., backend=...)``, and a program called inside a
user's own ``torch.compile``. Either way the results and gradients are the eager program's, and a new batch
size or sequence length does not compile again (a compile counter, wrapped around the backend, counts the
frames dynamo compiles). A loop runs its steps itself; with ``backend=`` its step is compiled as one
function (the step index a symbolic int), except the step of a loop that keeps memory across its steps
(a search, ``cum_concat``), which runs eagerly.
"""

from __future__ import annotations

import shutil

import pytest
import random_programs as rp
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounterWithBackend

import looplift as ll
from looplift.errors import ArgumentError

B, T = ll.batch_dim, ll.Dim("time")
F, H = ll.Dim("feat", 8), ll.Dim("hidden", 6)
SHAPES = [(3, 5), (4, 9), (2, 12), (5, 3)]   # (batch, padded length): the first compiles, the rest must not

needs_cxx = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                               reason="inductor compiles C++ on CPU: no C++ compiler here")


def _batch(batch: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, steps, F.size, generator=g)
    n = torch.randint(1, steps + 1, (batch,), generator=g)
    n[0] = steps
    return ll.Named(x, (B, T, F), {T: n})


def _attention_pooling():
    """No loop: a projection, a softmax over the padded time dim, a weighted sum, a layer norm."""
    torch.manual_seed(0)
    lin, norm = ll.nn.Linear(F, H), ll.nn.LayerNorm(H)

    def model(x):
        y = ll.tanh(lin(x))
        pooled = ll.sum(ll.softmax(y, axis=T) * y, axis=T)
        return ll.sum(ll.tanh(norm(pooled) + pooled), axis=[B, H])

    return model, [lin, norm]


def _lstm_loop():
    """An LSTM loop with a readout per step, kept as a loop (``optimize=False``)."""
    torch.manual_seed(1)
    lstm, out = ll.nn.LSTM(F, H), ll.nn.Linear(H, H)

    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.s = lstm.default_initial_state()
        with loop:
            h, loop.state.s = lstm(loop.unstack(x), state=loop.state.s)
            y = loop.stack(ll.tanh(out(h)))
        return ll.sum(y, axis=[B, T, H])

    return model, [lstm, out]


def _loss_and_grads(fn, modules, x):
    params = [p for m in modules for p in m.parameters()]
    loss = fn(x)
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads


def _assert_same(fn, eager, modules):
    """Equal losses and gradients (to float32 rounding: compiled kernels may sum in another order)."""
    for i, (batch, steps) in enumerate(SHAPES):
        x = _batch(batch, steps, seed=i)
        got, want = _loss_and_grads(fn, modules, x), _loss_and_grads(eager, modules, x)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        for g, w in zip(got[1], want[1]):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * float(w.abs().max()) + 1e-7)


@needs_cxx
def test_inductor_backend_equals_eager_and_compiles_once_for_all_lengths():
    model, modules = _attention_pooling()
    counter = CompileCounterWithBackend("inductor")
    compiled = ll.compile(model, backend=counter)
    eager = ll.compile(model)
    x = _batch(*SHAPES[0], seed=0)
    compiled(x)
    frames = counter.frame_count
    assert frames >= 1
    _assert_same(lambda v: compiled(v).tensor, lambda v: eager(v).tensor, modules)
    assert counter.frame_count == frames   # (no new length or batch size compiled again)


def _graphs_with(counter, *calls: str) -> list[str]:
    """The code of the graphs dynamo compiled that call all of `calls`."""
    return [g.code for g in counter.graphs if all(c in g.code for c in calls)]


def test_the_step_of_a_loop_is_compiled_as_one_function():
    """The loop kept step by step: the LSTM cell and the readout are one compiled graph, the step's frame an
    input of it (the sequence is split into its frames once per run, not selected in the step), its sizes
    symbolic (no graph per step, none per length)."""
    model, modules = _lstm_loop()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = ll.compile(model, optimize=False, backend=counter, steps_per_call=1)
    eager = ll.compile(model, optimize=False)
    compiled(_batch(*SHAPES[0], seed=0))
    frames = counter.frame_count
    (step,) = _graphs_with(counter, "torch.lstm_cell", "torch.tanh")
    assert "select" not in step and "l_env_steps" not in step and "SymInt" in step, step
    _assert_same(lambda v: compiled(v).tensor, lambda v: eager(v).tensor, modules)
    assert counter.frame_count == frames


def test_a_loops_steps_run_several_per_compiled_call():
    """``steps_per_call=3``: after the eager first step, runs of 3 steps are one compiled function (the step's
    kernels three times in one graph), the steps left over the compiled step; losses and gradients equal the
    eager program's for lengths that leave 0, 1 and 2 steps over (and entries frozen past their lengths);
    neither function compiles again for a new length."""
    model, modules = _lstm_loop()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = ll.compile(model, optimize=False, backend=counter, steps_per_call=3)
    eager = ll.compile(model, optimize=False)
    compiled(_batch(3, 6, seed=0))   # (1 step eagerly, 3 in one call, 2 left over)
    frames = counter.frame_count
    cells = [g.count("torch.lstm_cell") for g in _graphs_with(counter, "torch.lstm_cell", "torch.tanh")]
    assert sorted(cells) == [1, 3], cells
    _assert_same(lambda v: compiled(v).tensor, lambda v: eager(v).tensor, modules)
    assert counter.frame_count == frames


def test_steps_per_call_must_be_a_positive_int():
    model, _ = _lstm_loop()
    for bad in (0, 1.5, True, "4"):
        with pytest.raises(ArgumentError, match="steps_per_call"):
            ll.compile(model, backend="eager", steps_per_call=bad)


class _AttentionDecoder(ll.Module):
    """An LSTM decoder over targets with dot attention over padded encoder frames, its context fed back:
    after the optimizer, the loop keeps the LSTM cell and the attention (masked softmax over the frames)."""

    def __init__(self):
        super().__init__()
        self.vocab, self.emb, self.dec = ll.Dim("vocab", 7), ll.Dim("emb", 5), ll.Dim("dec", 6)
        self.embed = ll.nn.Embedding(self.vocab, self.emb)
        self.lstm = ll.nn.LSTM(self.emb + F, self.dec)
        self.query = ll.nn.Linear(self.dec, F)
        self.out = ll.nn.Linear(self.dec + F, self.vocab)

    def forward(self, x, y):
        loop = ll.Loop(axis=U)
        loop.state.label = ll.full(0, sparse_dim=self.vocab)
        loop.state.s = self.lstm.default_initial_state()
        loop.state.ctx = ll.zeros([F])
        with loop:
            h, loop.state.s = self.lstm(ll.concat(self.embed(loop.state.label), loop.state.ctx), state=loop.state.s)
            weights = ll.softmax(ll.dot(self.query(h), x, reduce=F), axis=T)
            loop.state.ctx = ll.dot(weights, x, reduce=T)
            target = loop.unstack(y)
            ce = loop.stack(ll.cross_entropy(self.out(ll.concat(h, loop.state.ctx)), target, axis=self.vocab))
            loop.state.label = target
        return ll.sum(ce, axis=[B, U])


U = ll.Dim("target")


def _targets(batch: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(100 + seed)
    n = torch.randint(1, steps + 2, (batch,), generator=g)
    n[-1] = steps + 1
    return ll.Named(torch.randint(0, 7, (batch, steps + 1), generator=g), (B, U), {U: n}, sparse_dim=_DEC.vocab)


torch.manual_seed(2)
_DEC = _AttentionDecoder()


def test_an_attention_decoders_step_compiled_equals_eager_for_all_lengths():
    counter = CompileCounterWithBackend("aot_eager")
    compiled = ll.compile(_DEC, backend=counter, steps_per_call=3)
    eager = ll.compile(_DEC)
    # (6 steps: the first eagerly, 3 in one compiled call, 2 by the step compiled alone)
    compiled(_batch(*SHAPES[0], seed=0), _targets(SHAPES[0][0], SHAPES[0][1], seed=0))
    frames = counter.frame_count
    steps = _graphs_with(counter, "torch.lstm_cell", "softmax")
    assert sorted(c.count("torch.lstm_cell") for c in steps) == [1, 3], steps
    assert all("masked_fill" in c for c in steps), steps   # (the padding masked)
    _assert_same(lambda v: compiled(v, _targets(v.tensor.shape[0], v.tensor.shape[1], 1)).tensor,
                 lambda v: eager(v, _targets(v.tensor.shape[0], v.tensor.shape[1], 1)).tensor, [_DEC])
    assert counter.frame_count == frames


def test_nested_loops_compile_both_steps():
    """An inner loop over a static dim that reads the outer loop's carried state stays in the outer step:
    the outer step is compiled (the inner loop runs its own steps there, compiled too)."""
    S = ll.Dim("sub", 3)
    torch.manual_seed(4)
    lin = ll.nn.Linear(F + H, H)

    def model(x, y):
        loop = ll.Loop(axis=T)
        loop.state.h = ll.zeros([H])
        with loop:
            x_t = loop.unstack(x)
            inner = ll.Loop(axis=S)
            inner.state.a = loop.state.h
            with inner:
                inner.state.a = ll.tanh(lin(ll.concat(inner.unstack(y) + x_t, inner.state.a, axis=[F, H])))
            loop.state.h = inner.state.a
            out = loop.stack(loop.state.h)
        return ll.sum(out * out, axis=[B, T, H])

    counter = CompileCounterWithBackend("aot_eager")
    compiled = ll.compile(model, backend=counter)
    eager = ll.compile(model)
    y = torch.randn(5, S.size, F.size, generator=torch.Generator().manual_seed(9))

    def sub(v):
        return ll.Named(y[:v.tensor.shape[0]], (B, S, F))

    compiled(_batch(*SHAPES[0], seed=0), sub(_batch(*SHAPES[0], seed=0)))
    frames = counter.frame_count
    assert _graphs_with(counter, "torch._C._nn.linear", "torch.tanh"), [g.code for g in counter.graphs]
    _assert_same(lambda v: compiled(v, sub(v)).tensor, lambda v: eager(v, sub(v)).tensor, [lin])
    assert counter.frame_count == frames


def test_a_search_step_keeps_its_memory_and_runs_eagerly():
    """A search's step keeps the prunes' source hypotheses across its steps: it is not compiled (no graph
    has the top-k), and the n-best equals the eager program's."""
    V = ll.Dim("vocab", 5)
    torch.manual_seed(5)
    emb, rec, out = ll.nn.Embedding(V, H), ll.nn.Linear(H, H), ll.nn.Linear(H, V)

    def search(h0):
        loop = ll.Loop(max_seq_len=6)
        loop.state.label = ll.full(0, sparse_dim=V)
        loop.state.h = h0
        with loop:
            loop.state.h = ll.tanh(emb(loop.state.label) + rec(loop.state.h))
            label = ll.choice(ll.log_softmax(out(loop.state.h), axis=V), beam_size=3, axis=V)
            loop.state.label = label
            loop.end(label == 0, include_eos=True)
            ys = loop.stack(label)
        return ys, loop.search.scores

    counter = CompileCounterWithBackend("aot_eager")
    compiled = ll.compile(search, mode="search", backend=counter)
    eager = ll.compile(search, mode="search")
    for batch in (3, 5, 2):
        h0 = ll.Named(torch.randn(batch, H.size, generator=torch.Generator().manual_seed(batch)), (B, H))
        (ys, scores), (ys_e, scores_e) = compiled(h0), eager(h0)
        assert torch.equal(ys.tensor, ys_e.tensor) and [d.name for d in ys.dims] == [d.name for d in ys_e.dims]
        assert [torch.equal(n, m) for n, m in zip(ys.lengths.values(), ys_e.lengths.values())] == [True]
        torch.testing.assert_close(scores.tensor, scores_e.tensor)
    assert not _graphs_with(counter, "topk"), [g.code for g in counter.graphs]


def test_a_program_inside_a_users_torch_compile():
    """The user compiles their own step, which calls the program: the same results, no recompiles."""
    model, modules = _lstm_loop()
    prog = ll.compile(model)
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter, dynamic=True)
    def step(x):
        return prog(x).tensor * 2.0

    step(_batch(*SHAPES[0], seed=0))
    frames = counter.frame_count
    _assert_same(step, lambda v: prog(v).tensor * 2.0, modules)
    assert counter.frame_count == frames


class _Unhashable:
    """A backend callable that cannot be a dict key (it compares by value, say): compiles to the graph itself."""

    __hash__ = None

    def __call__(self, gm, example_inputs):
        return gm.forward


def test_a_backend_that_is_not_hashable():
    model, modules = _lstm_loop()
    compiled = ll.compile(model, optimize=False, backend=_Unhashable())
    eager = ll.compile(model, optimize=False)
    _assert_same(lambda v: compiled(v).tensor, lambda v: eager(v).tensor, modules)


def test_backend_must_name_a_backend():
    model, _ = _attention_pooling()
    with pytest.raises(ArgumentError, match="backend"):
        ll.compile(model, backend=3)


KINDS = [("axis", False), ("axis", True), ("static", None), ("max_len", None), ("align", True)]


def _random_settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


def _check_random(kind, end, data, backend) -> None:
    spec = data.draw(rp.programs(kind, end), label="program")
    inputs = data.draw(rp.data(kind), label="data")
    optimize = data.draw(st.booleans(), label="optimize")
    steps = data.draw(st.sampled_from([1, 2, 3]), label="steps_per_call")
    model = rp.Model(spec, 0)
    prog = ll.compile(model, optimize=optimize, backend=backend, steps_per_call=steps)
    params = {f"{key}.{n}": p for key, m in model.modules.items() for n, p in m.named_parameters()}
    rp.assert_equivalent(prog, params, inputs.make(), inputs.named, optimized=False)


@pytest.mark.parametrize("kind, end", KINDS)
@_random_settings(4)
@given(data=st.data())
def test_random_loops_with_compiled_steps_equal_the_reference(kind, end, data):
    """Random loop programs (:mod:`random_programs`: states nested, frozen entries, ``loop.last``, end
    conditions, masked blocks, the transducer's alignment loop), kept step by step or optimized, their code
    and loop steps compiled (dynamo's ``eager`` backend: what dynamo makes of the generated code and the
    environment): the outputs and gradients of the reference interpreter."""
    _check_random(kind, end, data, "eager")


@pytest.mark.slow
@pytest.mark.parametrize("kind, end", KINDS)
@_random_settings(30)
@given(data=st.data())
def test_random_loops_with_compiled_steps_equal_the_reference_many(kind, end, data):
    """As above, more programs, through AOT autograd too (``aot_eager``)."""
    _check_random(kind, end, data, "aot_eager")
