"""The executor: runs a traced graph with the per-call work reduced to kernel calls.

At build time it drops the nodes the outputs do not need and resolves every
input of every node to a slot number, so a call is a loop over prepared
``(kernel, input slots, output slots)`` steps. Loops and Conds get their
kernels here too, running their graphs with executors of their own
(:func:`executor_runner`). It must agree exactly with the reference
interpreter (:mod:`looplift.runtime.reference`).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import LoopliftError
from ..graph import Graph, Node, Op
from ..tensor import Tensor
from .env import Env
from .reference import for_outputs, is_placed, node_error, read_by
from .regions import region_kernel

__all__ = ["Executor", "executor_runner", "live_nodes"]


def live_nodes(graph: Graph, outputs: Sequence[Tensor]) -> list[Node]:
    """The nodes of `graph` that `outputs` depend on, in graph order.

    A value depends on the nodes that compute its inputs, and on the node that gives a dim of it its size
    and lengths (a loop ended by ``loop.end`` makes its dim, a compress its masked dim), even where it takes
    no value from that node.
    """
    makers = {}   # dim -> the node that makes it when it runs
    for node in graph.nodes:
        for d in node.makes_dims:
            makers.setdefault(d, node)
    needed: set[int] = set()
    stack = [t.node for t in outputs if t.node is not None] + _makers_of(outputs, makers)
    while stack:
        node = stack.pop()
        if id(node) in needed:
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


class Executor:
    """A graph prepared for repeated calls."""

    def __init__(self, graph: Graph, inputs: Sequence[Tensor], outputs: Sequence[Tensor]):
        slot: dict[int, int] = {}
        for t in inputs:
            slot[id(t)] = len(slot)
        self._steps = []
        read = read_by(graph, outputs)
        for node in live_nodes(graph, outputs):
            kernel = node.kernel
            if node.region is not None:
                kernel = region_kernel(node, executor_runner)
            elif kernel is None:
                continue   # a placeholder: fed through `inputs`
            else:
                kernel = for_outputs(kernel, node, read)
            ins = tuple(slot[id(t)] for t in node.inputs)
            outs = []
            for t in node.outputs:
                slot[id(t)] = len(slot)
                outs.append(slot[id(t)])
            self._steps.append((node, kernel, ins, outs[0] if len(outs) == 1 else tuple(outs)))
        self._n_slots = len(slot)
        self._n_inputs = len(inputs)
        self._outputs = tuple(slot[id(t)] for t in outputs)

    @property
    def num_nodes(self) -> int:
        return len(self._steps)

    def __call__(self, env: Env, raw_inputs: Sequence) -> list:
        values = list(raw_inputs) + [None] * (self._n_slots - self._n_inputs)
        for node, kernel, ins, out in self._steps:
            try:
                result = kernel(env, *[values[i] for i in ins])
            except LoopliftError as e:
                if is_placed(e):
                    raise
                raise node_error(node, e) from e
            except Exception as e:
                raise node_error(node, e) from e
            if isinstance(out, int):
                values[out] = result
            else:
                for i, v in zip(out, result):
                    values[i] = v
        return [values[i] for i in self._outputs]


def executor_runner(graph: Graph, inputs: Sequence[Tensor], outputs: Sequence[Tensor]) -> Executor:
    """The executor of a region's graph, prepared once per graph and kept in ``graph.prepared``."""
    key = ("executor", tuple(id(t) for t in inputs), tuple(id(t) for t in outputs))
    runner = graph.prepared.get(key)
    if runner is None:
        runner = graph.prepared[key] = Executor(graph, inputs, outputs)
    return runner
