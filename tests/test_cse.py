"""The worked example of a pass (docs/architecture.md): common subexpression elimination computes each distinct
op call once, and the new graph computes what the traced one does (against the reference interpreter)."""

import torch

import looplift as ll
from looplift import Dim, Named
from looplift import batch_dim as B
from looplift.graph import Op
from looplift.passes.cse import eliminate_common_subexpressions
from looplift.runtime.env import Env
from looplift.runtime.executor import Executor

T, F = Dim("time"), Dim("feat", 3)


def _x(seed=0):
    g = torch.Generator().manual_seed(seed)
    return Named(torch.randn(2, 4, 3, generator=g, dtype=torch.float64), (B, T, F), {T: torch.tensor([4, 2])})


def run(graph, inputs, outputs, x: Named) -> list[torch.Tensor]:
    env = Env(torch.device("cpu"), {B: 2, T: 4}, {T: x.lengths[T]})
    return Executor(graph, inputs, outputs)(env, [x.tensor])


def ops(graph) -> list[str]:
    return [n.op for n in graph.nodes]


def model(x):
    a = ll.tanh(x) * 2.0
    b = ll.tanh(x) * 2.0                        # the same computation again
    c = ll.tanh(x) * 3.0                        # another constant: not the same
    loop = ll.Loop(axis=T)
    loop.state.h = ll.zeros([F])
    with loop:
        loop.state.h = loop.state.h + loop.unstack(a)
    return ll.sum(a + b, axis=[T, F]), ll.sum(c, axis=[T, F]), loop.state.h


def test_duplicate_calls_are_computed_once_with_the_same_results():
    prog = ll.compile(model, mode="eval", optimize=False)
    x = _x()
    trace = prog.trace(x)
    graph, inputs, outputs = eliminate_common_subexpressions(trace.graph, trace.inputs, trace.out_tensors)
    graph.check()
    assert ops(trace.graph).count("tanh") == 3 and ops(graph).count("tanh") == 1
    assert ops(trace.graph).count("mul") == 3 and ops(graph).count("mul") == 2   # (* 2.0 once, * 3.0)
    assert ops(graph).count(Op.LOOP) == 1
    expected = prog.reference(x)
    got = run(graph, inputs, outputs, x)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e.tensor, rtol=0, atol=0)
    # the traced graph is left as it was
    assert ops(trace.graph).count("tanh") == 3


def test_random_calls_are_never_merged():
    def noisy(x):
        return ll.dropout(x, 0.5) + ll.dropout(x, 0.5)

    trace = ll.compile(noisy, mode="train").trace(_x())
    graph, _, _ = eliminate_common_subexpressions(trace.graph, trace.inputs, trace.out_tensors)
    assert ops(graph).count("dropout") == 2


def test_calls_on_different_inputs_or_dims_are_kept():
    def two(x):
        return ll.sum(x, axis=T), ll.sum(x, axis=F), ll.sum(ll.exp(x), axis=T)

    trace = ll.compile(two, mode="eval").trace(_x())
    graph, _, _ = eliminate_common_subexpressions(trace.graph, trace.inputs, trace.out_tensors)
    assert ops(graph) == ops(trace.graph)
