"""Common subexpression elimination: a graph computes each distinct op call once.

Two recorded op calls (:class:`looplift.graph.Call`) are the same computation
when they call the same op with the same arguments: the same input tensors
(after merging earlier duplicates), equal constants, the same dims. The second
one is dropped and its outputs are the first one's. Calls that draw anew each
time (``node.random``, e.g. dropout) are never merged. Loops and Conds are
copied as they are (their bodies are graphs of their own).

It is the worked example of ``docs/architecture.md``: a pass reads the IR
through the documented fields of nodes and calls, builds a new graph (the
traced one stays as it is, for the reference interpreter), and returns the new
values of the outputs. Not run by ``looplift.compile``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from ..dims import Dim
from ..graph import Call, Graph, Node, Op
from ..tensor import Tensor
from .move_out import Rewriter

__all__ = ["eliminate_common_subexpressions"]


def eliminate_common_subexpressions(graph: Graph, inputs: Sequence[Tensor], outputs: Sequence[Tensor]
                                    ) -> tuple[Graph, list[Tensor], list[Tensor]]:
    """A new graph computing `outputs` with each distinct op call of `graph` once, with its new inputs and
    outputs."""
    new = Graph()
    copier = Rewriter(ctx=None)   # (its node copy maps inputs and copies regions; no loop is rewritten here)
    seen: dict[Hashable, list[Tensor]] = {}
    done: set[int] = set()
    shared = _used_outside_their_call(graph)
    for node in graph.nodes:
        call = node.call
        if call is None or id(call) in done:
            if call is None:
                _copy_or_merge_constant(node, new, copier, seen)
            continue
        done.add(id(call))
        nodes = [n for n in graph.nodes if n.call is call]
        key = _key(call, copier.map)
        outs = call.output_tensors()
        inner = {id(t) for n in nodes for t in n.outputs} - {id(t) for t in outs}
        if key is not None and key in seen and not any(n.random for n in nodes) and not inner & shared:
            for old, kept in zip(outs, seen[key]):
                copier.map[id(old)] = kept
            continue
        for n in nodes:
            copier.copy_node(n, new)
        if key is not None:
            seen[key] = [copier.map[id(t)] for t in outs]
    return new, [copier.value(t) for t in inputs], [copier.value(t) for t in outputs]


def _copy_or_merge_constant(node: Node, new: Graph, copier: Rewriter, seen: dict) -> None:
    """A node made outside any op call: a constant equal to an earlier one is merged, anything else copied."""
    key = ("constant", type(node.value), node.value, node.outputs[0].dtype) if node.op == Op.CONSTANT else None
    if key is not None and key in seen:
        copier.map[id(node.outputs[0])] = seen[key][0]
        return
    copier.copy_node(node, new)
    if key is not None:
        seen[key] = [copier.map[id(node.outputs[0])]]


def _key(call: Call, new_values: dict[int, Tensor]) -> Hashable | None:
    """What makes `call` the same computation as another: its op and its arguments, tensors by their new
    values (None where an argument is not comparable)."""
    args, kwargs = call.arguments()
    try:
        key = (call.fn, _arg_key(args, new_values), _arg_key(tuple(sorted(kwargs.items())), new_values))
        hash(key)
    except (TypeError, KeyError):
        return None
    return key


def _arg_key(value, new_values: dict[int, Tensor]) -> Hashable:
    if isinstance(value, Tensor):
        return ("tensor", id(new_values[id(value)]))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_arg_key(v, new_values) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _arg_key(v, new_values)) for k, v in sorted(value.items())))
    if value is None or isinstance(value, (bool, int, float, str, Dim)):
        return (type(value), value)   # (the type too: True == 1 == 1.0)
    raise TypeError(f"not comparable: {value!r}")


def _used_outside_their_call(graph: Graph) -> set[int]:
    """ids of tensors made by a call's nodes and used by nodes of other calls (or of none)."""
    made_by = {id(t): n.call for n in graph.nodes for t in n.outputs}
    return {id(t) for n in graph.nodes for t in n.inputs
            if id(t) in made_by and made_by[id(t)] is not None and made_by[id(t)] is not n.call}
