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
from ..graph import Graph
from ..tensor import Tensor
from .env import Env
from .live import live_nodes, read_by
from .reference import for_outputs, is_placed, node_error
from .regions import region_kernel

__all__ = ["Executor", "executor_runner", "live_nodes"]


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
