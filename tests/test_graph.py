"""The IR's contract: ``Graph.check`` accepts every traced and optimized graph and names each kind of
breach; ``Graph.format`` prints one line per node with regions indented below their node."""

import re

import pytest
import torch

import looplift as ll
from looplift import Dim, Named
from looplift import batch_dim as B
from looplift.errors import GraphError
from looplift.graph import Graph, Op

T, F = Dim("time"), Dim("feat", 3)


def _x():
    return Named(torch.randn(2, 4, 3, dtype=torch.float64), (B, T, F), {T: torch.tensor([4, 2])})


def model(x):
    loop = ll.Loop(axis=T)
    loop.state.h = ll.zeros([F])
    with loop:
        loop.state.h = ll.tanh(loop.state.h + loop.unstack(x))
        with ll.Cond(ll.max(ll.length(T), axis=B) > 3) as cond:
            cond.true = loop.state.h * 2.0
            cond.false = loop.state.h
        y = loop.stack(cond.result)
    return y, loop.state.h


def traced():
    return ll.compile(model, mode="train").trace(ll.Spec((B, T, F), torch.float64))


def loop_node(graph: Graph):
    return next(n for n in graph.nodes if n.op == Op.LOOP)


def test_traced_and_optimized_graphs_pass_the_check():
    trace = traced()
    trace.graph.check()
    trace.optimized.graph.check()
    assert loop_node(trace.graph).region.body.nodes, "the traced loop has a body"


def test_an_output_that_does_not_point_back_at_its_node_is_found():
    trace = traced()
    node = next(n for n in trace.graph.nodes if n.op == Op.LOOP)
    node.outputs[0].index = 7
    with pytest.raises(GraphError, match="does not point back"):
        trace.graph.check()


def test_a_value_used_before_it_is_defined_is_found():
    trace = traced()
    body = loop_node(trace.graph).region.body
    tanh = next(i for i, n in enumerate(body.nodes) if n.op == "tanh")
    body.nodes.insert(0, body.nodes.pop(tanh))   # now before the add it reads
    with pytest.raises(GraphError, match="not defined before it"):
        trace.graph.check()


def test_a_value_escaping_its_loop_is_found():
    trace = traced()
    graph = trace.graph
    inside = next(n for n in loop_node(graph).region.body.nodes if n.op == "tanh").outputs[0]
    graph.add("neg", (inside,), lambda env, v: -v, [(inside.dims, inside.dtype, None)], source="test")
    with pytest.raises(GraphError, match="which is not defined before it"):
        graph.check()


def test_a_region_not_nested_in_the_graph_of_its_node_is_found():
    trace = traced()
    loop_node(trace.graph).region.body.parent = Graph()
    with pytest.raises(GraphError, match="not nested in the graph of its node"):
        trace.graph.check()


def test_a_loop_returning_a_value_it_cannot_see_is_found():
    trace = traced()
    spec = loop_node(trace.graph).region
    other = Graph()
    stray = other.add("stray", (), lambda env: 0.0, [((), torch.float64, None)], source="test").outputs[0]
    spec.stacks.append(stray)
    with pytest.raises(GraphError, match="not visible in it"):
        trace.graph.check()


def test_a_node_without_a_kernel_must_be_a_placeholder_or_a_region():
    trace = traced()
    node = next(n for n in loop_node(trace.graph).region.body.nodes if n.op == "length")
    node.kernel = None
    with pytest.raises(GraphError, match="no kernel"):
        trace.graph.check()


def test_format_prints_a_line_per_node_with_regions_indented():
    trace = traced()
    text = trace.graph.format()
    lines = text.splitlines()

    def count(graph):
        return sum(1 + sum(2 + count(body) for body, _ in n.region.regions()) if n.region is not None else 1
                   for n in graph.nodes)

    assert len(lines) == count(trace.graph), text   # a line per node, and a header and a return per region
    assert re.search(r"^%0 = input\(\)  \{batch, time, feat\} float64  # <program input 0>$", text, re.M), text
    loop_line = next(line for line in lines if " = loop[time](" in line)
    assert not loop_line.startswith(" ") and "# " + __file__ in loop_line, loop_line
    assert "  body:" in lines and any(line.startswith("    %") and "state[h]" in line for line in lines), text
    assert any(line.startswith("      true:") for line in lines), text      # the Cond inside the body
    assert any(re.match(r"^\s+%\d+ = constant\[2\.0\]\(\)", line) for line in lines), text
    assert re.search(r"^    return %\d+, %\d+$", text, re.M), text             # the body's new state and stack
    assert str(trace.graph) == text


def test_format_names_each_value_once_and_inputs_by_those_names():
    text = traced().optimized.graph.format()
    defined = set()
    for line in text.splitlines():
        m = re.match(r"^\s*(%\d+(?:, %\d+)*|\(\)) = \S+?\((.*?)\)  ", line)
        if m is None:
            continue
        for name in re.findall(r"%\d+", m.group(2)):
            assert name in defined, (name, line)
        for name in re.findall(r"%\d+", m.group(1)):
            assert name not in defined, (name, line)
            defined.add(name)
    assert defined
