"""Which nodes of a graph a call needs, and which values anything reads: the same answer for the reference
interpreter and the executor, so both run the same kernel variants (``kernel.for_outputs``)."""

from __future__ import annotations

from collections.abc import Sequence

from ..graph import Graph, Node, Op
from ..tensor import Tensor

__all__ = ["live_nodes", "read_by"]


def live_nodes(graph: Graph, outputs: Sequence[Tensor], given: Sequence[Tensor] = ()) -> list[Node]:
    """The nodes of `graph` that `outputs` depend on, in graph order; a node whose results are all `given`
    (fed to the call as inputs) is not run, nor what only it needs.

    A value depends on the nodes that compute its inputs, and on the node that gives a dim of it its size
    and lengths (a loop ended by ``loop.end`` makes its dim, a compress its masked dim), even where it takes
    no value from that node.
    """
    fed = {id(t) for t in given}
    makers = {}   # dim -> the node that makes it when it runs
    for node in graph.nodes:
        for d in node.makes_dims:
            makers.setdefault(d, node)
    needed: set[int] = set()
    stack = [t.node for t in outputs if t.node is not None] + _makers_of(outputs, makers)
    while stack:
        node = stack.pop()
        if id(node) in needed or (fed and node.outputs and all(id(t) in fed for t in node.outputs)):
            continue
        needed.add(id(node))
        stack.extend(t.node for t in node.inputs if t.node is not None)
        if makers:
            stack.extend(_makers_of([*node.inputs, *node.outputs], makers))
            spec = node.region if node.op == Op.LOOP else None
            if spec is not None and spec.axis in makers and makers[spec.axis] is not node:
                stack.append(makers[spec.axis])   # a loop over a dim made by another node (a masked dim)
    return [n for n in graph.nodes if id(n) in needed]


def _makers_of(tensors: Sequence[Tensor], makers: dict) -> list[Node]:
    """The nodes among `makers` that make a dim of `tensors` (or a dim one of them derives from)."""
    found, seen = [], set()
    todo = [d for t in tensors for d in t.dims]
    while todo:
        d = todo.pop()
        if d in seen:
            continue
        seen.add(d)
        if d in makers:
            found.append(makers[d])
        todo.extend(d.operands)
        todo.extend(d.length_dims if d.is_dynamic else ())
    return found


def read_by(graph: Graph, outputs: Sequence[Tensor]) -> set[int]:
    """The ids of the tensors of `graph` that the nodes `outputs` need read (or that are among `outputs`).
    Kept in ``graph.prepared``."""
    key = ("read", tuple(id(t) for t in outputs))
    read = graph.prepared.get(key)
    if read is None:
        read = graph.prepared[key] = ({id(t) for node in live_nodes(graph, outputs) for t in node.inputs}
                                      | {id(t) for t in outputs})
    return read
