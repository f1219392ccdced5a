"""Programs under ``torch.compile``: ``looplift.compile(..., backend=...)``, and a program called inside a
user's own ``torch.compile``. Either way the results and gradients are the eager program's, and a new batch
size or sequence length does not compile again (a compile counter, wrapped around the backend, counts the
frames dynamo compiles). Loops run eagerly, step by step, inside compiled code.
"""

from __future__ import annotations

import shutil

import pytest
import torch
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


def test_a_loop_runs_eagerly_inside_the_compiled_program():
    model, modules = _lstm_loop()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = ll.compile(model, optimize=False, backend=counter)
    eager = ll.compile(model, optimize=False)
    compiled(_batch(*SHAPES[0], seed=0))
    frames = counter.frame_count
    _assert_same(lambda v: compiled(v).tensor, lambda v: eager(v).tensor, modules)
    assert counter.frame_count == frames


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


def test_backend_must_name_a_backend():
    model, _ = _attention_pooling()
    with pytest.raises(ArgumentError, match="backend"):
        ll.compile(model, backend=3)
