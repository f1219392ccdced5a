"""The kernels of region nodes (loops and Conds), which the runtime builds from their records.

A region's record (:mod:`looplift.regions`) says what to run; how its graphs
are run is the caller's `runner`: the reference interpreter runs them node by
node, the executor with executors prepared once per graph. Both use the same
kernels, so they share the loop's semantics exactly.
"""

from __future__ import annotations

from ..graph import Node, Op
from ..regions import CondSpec
from .loop_run import LoopRun, Runner

__all__ = ["region_kernel", "CondRun"]


class CondRun:
    """The kernel of one Cond node: ``run(env, pred, *captured)`` runs the branch `pred` chooses."""

    def __init__(self, spec: CondSpec, runner: Runner):
        self.runs = {branch: runner(graph, spec.captured, spec.outs[branch]) for branch, graph in spec.branches.items()}
        self.single = len(spec.outs[True]) == 1

    def __call__(self, env, pred, *raws):
        result = self.runs[bool(pred)](env, raws)
        return result[0] if self.single else tuple(result)


def region_kernel(node: Node, runner: Runner, *, literal: bool = False):
    """The kernel of the region node `node` (an :attr:`Op.LOOP` or :attr:`Op.COND`), running its graphs with
    `runner`; `literal`: a loop runs every entry at every step (the reference interpreter's), never leaving
    out the entries that ended (:mod:`looplift.runtime.compact`)."""
    if node.op == Op.LOOP:
        return LoopRun(node.region, runner, compact=not literal)
    if node.op == Op.COND:
        return CondRun(node.region, runner)
    raise ValueError(f"{node!r} is no region node")
