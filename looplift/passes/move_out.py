"""The move-out pass: compute outside a loop everything that does not depend on the previous step.

The pass copies a traced graph node by node into a new one; each loop it
meets is rewritten (:class:`Rewriter.transform_loop`) in three steps, one file
each:

* :mod:`.loop_plan` decides where each computation of the body goes: before
  the loop (invariant, or over the whole sequence), in it, or after it;
* :mod:`.loop_rewrite` builds the graph around the loop, the new loop with
  what stays, and what is computed after it; :mod:`.masked_blocks` and
  :mod:`.nested_loops` run MaskedComputation blocks over T' and nested loops
  for all steps at once;
* :mod:`.report` records what was done, for ``explain``.

The pass reasons only about dependencies and regions, never about particular
ops: replaying a recorded call (:class:`looplift.graph.Call`) on other inputs
is all it asks of an op, and the op rules table (:mod:`looplift.rules`) says
which ops have a sequence form. If any part of a rewrite fails, the loop is
left as it was, which is always correct, and ``explain`` says why.

The pass never changes what a program computes: the reference interpreter
runs the graph as traced, and the tests compare both.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .. import trace as _trace
from ..errors import LoopliftError
from ..graph import Graph, Node, Op
from ..regions import CondSpec, LoopSpec
from ..tensor import Tensor
from .loop_rewrite import LoopRewrite
from .report import CannotMove, LoopReport

__all__ = ["optimize", "Optimized", "Rewriter"]


@dataclass
class Optimized:
    """The result of :func:`optimize`: the new graph, its inputs and outputs, and a report per loop."""

    graph: Graph
    inputs: list[Tensor]
    outputs: list[Tensor]
    reports: list[LoopReport]


def optimize(graph: Graph, inputs: list[Tensor], outputs: list[Tensor], *, mode: str,
             float_dtype: torch.dtype) -> Optimized:
    """A new graph computing the same `outputs` with loops optimized; `graph` is left unchanged."""
    new = Graph()
    ctx = _trace.TraceContext(mode, new, float_dtype)
    token = _trace.enter(ctx)
    try:
        rewriter = Rewriter(ctx)
        rewriter.used = _used_tensors(graph) | {id(t) for t in outputs}
        rewriter.copy_graph(graph, new)
        new_inputs = [rewriter.map[id(t)] for t in inputs]
        new_outputs = [rewriter.value(t) for t in outputs]
    finally:
        _trace.leave(token)
    return Optimized(new, new_inputs, new_outputs, rewriter.reports)


class Rewriter:
    """The copy of a graph into a new one, with every loop in it rewritten."""

    def __init__(self, ctx: _trace.TraceContext):
        self.ctx = ctx
        #: id(old tensor) -> its value in the new graph (for body tensors: in the new body)
        self.map: dict[int, Tensor] = {}
        self.reports: list[LoopReport] = []
        #: graphs made by the pass that the map refers to (kept alive so ids stay unique)
        self.keep: list = []
        #: ids of the old graph's tensors that anything uses (as an input, or as a program output)
        self.used: set[int] = set()

    def value(self, t: Tensor) -> Tensor:
        return self.map[id(t)]

    def copy_graph(self, old: Graph, new: Graph) -> None:
        for node in old.nodes:
            if node.op == Op.LOOP:
                self.transform_loop(node, new)
            else:
                self.copy_node(node, new)

    def copy_node(self, node: Node, graph: Graph, value=None) -> Node:
        """`node` added to `graph` unchanged but for its inputs (mapped by `value`, default: the map); a region
        node gets a copy of its region, nested in `graph`."""
        value = value or self.value
        inputs = tuple(value(t) for t in node.inputs)
        region = node.region
        if region is not None:
            region = self._copy_region(node, inputs, graph)
        new = graph.add(node.op, inputs, node.kernel, [(t.dims, t.dtype, t.sparse_dim) for t in node.outputs],
                        dict(node.attrs), node.source, region=region, makes_dims=node.makes_dims,
                        random=node.random, zero_padding=node.zero_padding, value=node.value,
                        nonfinite_padding=node.nonfinite_padding,
                        masked_block=node.masked_block, on_behalf_of=node.on_behalf_of,
                        keeps_run_memory=node.keeps_run_memory)
        new.call = node.call
        if isinstance(region, LoopSpec):
            region.node = new
        for old_t, new_t in zip(node.outputs, new.outputs):
            self.map[id(old_t)] = new_t
        return new

    def _copy_region(self, node: Node, inputs: tuple[Tensor, ...], graph: Graph) -> LoopSpec | CondSpec:
        """The region of `node` copied as it is, its graphs nested in `graph`; `inputs` are the new node's
        (a region's captured values are its node's inputs)."""
        region = node.region
        if isinstance(region, LoopSpec):
            captured = dict(zip(map(id, region.captured), inputs))
            body = self._copy_body(region.body, captured, graph)

            def m(t: Tensor) -> Tensor:
                return captured[id(t)] if id(t) in captured else self.map[id(t)]
            max_len = inputs[-1] if isinstance(region.max_len, Tensor) else region.max_len
            return replace(region, body=body, captured=list(inputs[:len(region.captured)]),
                           placeholders=[m(t) for t in region.placeholders],
                           new_states=[m(t) for t in region.new_states], stacks=[m(t) for t in region.stacks],
                           lasts=[m(t) for t in region.lasts], end=m(region.end) if region.end is not None else None,
                           max_len=max_len, node=None)
        captured = dict(zip(map(id, region.captured), inputs[1:]))
        branches = {b: self._copy_body(g, captured, graph) for b, g in region.branches.items()}
        return CondSpec(branches, list(inputs[1:]),
                        {b: [captured[id(t)] if id(t) in captured else self.map[id(t)] for t in outs]
                         for b, outs in region.outs.items()})

    def _copy_body(self, body: Graph, captured: dict[int, Tensor], parent: Graph) -> Graph:
        new = Graph(parent=parent)
        for n in body.nodes:
            self.copy_node(n, new, lambda t: captured[id(t)] if id(t) in captured else self.map[id(t)])
        return new

    def transform_loop(self, node: Node, parent: Graph) -> None:
        """Rewrite the loop `node` into `parent`; if that fails, copy it unchanged."""
        spec: LoopSpec = node.region
        start, n_reports = len(parent.nodes), len(self.reports)
        saved_graph, saved_loops = self.ctx.graph, list(self.ctx.loops)
        kept: dict[tuple[str, int], str] = {}   # parts that could not move, kept in the loop: the next attempt's
        while True:
            report = LoopReport(spec.source, spec.axis.name, spec=spec)
            try:
                LoopRewrite(self, spec, node, parent, report, kept=kept).run()
                break
            except Exception as e:  # noqa: BLE001 - any failure leaves the part or the loop as traced (correct)
                self.ctx.graph, self.ctx.loops[:] = saved_graph, saved_loops
                del parent.nodes[start:]
                del self.reports[n_reports:]   # (of loops made or rewritten by the attempt)
                key = _part(e)
                if key is not None and key not in kept:
                    kept[key] = str(e)   # that part stays in the loop; plan the rest again
                    continue
                report = LoopReport(spec.source, spec.axis.name, spec=spec, not_optimized=_why(e))
                self.copy_node(node, parent)
                break
            finally:
                self.ctx.graph, self.ctx.loops[:] = saved_graph, saved_loops
        self.reports.append(report)


def _part(e: Exception) -> tuple[str, int] | None:
    """The part of a loop that a failed rewrite names (see :class:`.report.CannotMove`), or None."""
    if isinstance(e, CannotMove):
        if e.part is not None:
            return ("part", e.part)
        if e.block is not None:
            return ("block", e.block)
    return None


def _why(e: Exception) -> str:
    """Why a loop was left as traced, in words."""
    if isinstance(e, LoopliftError):
        return str(e)
    return f"looplift failed to rewrite it ({type(e).__name__}: {e}); please report this as a bug"


def _used_tensors(graph: Graph) -> set[int]:
    """ids of the tensors any node of `graph` (or of the regions inside it) takes as input or returns."""
    used: set[int] = set()
    for node in graph.nodes:
        used.update(id(t) for t in node.inputs)
        if node.region is not None:
            for body, returned in node.region.regions():
                used.update(_used_tensors(body))
                used.update(id(t) for t in returned)
    return used
