"""The executor: runs a traced graph with the per-call work reduced to kernel calls.

At build time it drops the nodes the outputs do not need and resolves every
input of every node to a slot number, so a call is a loop over prepared
``(kernel, input slots, output slots)`` steps. It must agree exactly with the
reference interpreter (:mod:`looplift.runtime.reference`).
"""

from __future__ import annotations

from typing import Sequence

from ..errors import LoopliftError
from ..graph import Graph, Node
from ..tensor import Tensor
from .env import Env
from .reference import is_placed, node_error

__all__ = ["Executor"]


def live_nodes(graph: Graph, outputs: Sequence[Tensor]) -> list[Node]:
    """The nodes of `graph` that `outputs` depend on, in graph order."""
    needed: set[int] = set()
    stack = [t.node for t in outputs if t.node is not None]
    while stack:
        node = stack.pop()
        if id(node) in needed:
            continue
        needed.add(id(node))
        stack.extend(t.node for t in node.inputs if t.node is not None)
    return [n for n in graph.nodes if id(n) in needed]


class Executor:
    """A graph prepared for repeated calls."""

    def __init__(self, graph: Graph, inputs: Sequence[Tensor], outputs: Sequence[Tensor]):
        slot: dict[int, int] = {}
        for t in inputs:
            slot[id(t)] = len(slot)
        self._steps = []
        for node in live_nodes(graph, outputs):
            if node.kernel is None:
                continue
            ins = tuple(slot[id(t)] for t in node.inputs)
            outs = []
            for t in node.outputs:
                slot[id(t)] = len(slot)
                outs.append(slot[id(t)])
            self._steps.append((node, node.kernel, ins, outs[0] if len(outs) == 1 else tuple(outs)))
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
