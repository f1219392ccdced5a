"""The reference interpreter: runs a traced graph literally, node by node.

It is the semantic oracle for every optimization: whatever an optimized
executor does, its results must equal this interpreter's. It is kept as plain
as possible on purpose. Loops and Conds run their graphs with it too, loops
step by step (:mod:`looplift.runtime.loop_run`).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ExecutionError, LoopliftError
from ..graph import Graph
from ..tensor import Tensor
from .env import Env
from .live import read_by
from .regions import region_kernel

__all__ = ["run_reference", "reference_runner", "run_node", "node_error", "is_placed", "for_outputs"]


def node_error(node, e: Exception) -> ExecutionError:
    """A failure of a node's torch kernel as an error naming the node's source line and dims."""
    dims = "; ".join("{" + ", ".join(d.name for d in t.dims) + "}" for t in node.inputs)
    err = ExecutionError(f"{node.op} failed on inputs with dims {dims} (created at {node.source}): "
                         f"{type(e).__name__}: {e}", where=node.source)
    err.node = node
    return err


def is_placed(e: LoopliftError) -> bool:
    """Whether `e` names its source line; only run-time errors of the env (a size or lengths not known
    in this call) do not, and get the line of the node whose kernel asked."""
    return not isinstance(e, ExecutionError) or getattr(e, "node", None) is not None


def run_node(node, kernel, env: Env, args):
    """Run one node's `kernel`, turning a torch failure into an error naming the node's source line."""
    try:
        return kernel(env, *args)
    except LoopliftError as e:
        if is_placed(e):
            raise
        raise node_error(node, e) from e
    except Exception as e:  # a failure of the torch kernel: point at the user's line
        raise node_error(node, e) from e


def for_outputs(kernel, node, read: set[int]):
    """`kernel`, or the variant it offers (``kernel.for_outputs(used)``) for when only some of the node's
    results are read (`read`: the ids of the tensors anything reads), e.g. a recurrent kernel that need not
    compute states nobody reads."""
    specialize = getattr(kernel, "for_outputs", None)
    if specialize is None:
        return kernel
    return specialize(tuple(id(t) in read for t in node.outputs))


def run_reference(graph: Graph, env: Env, inputs: dict[Tensor, object], outputs: Sequence[Tensor]) -> list:
    """Run every node of `graph` in order and return the raw values of `outputs`."""
    values: dict[int, object] = {id(t): v for t, v in inputs.items()}
    read = read_by(graph, outputs)
    for node in graph.nodes:
        kernel = node.kernel
        if node.region is not None:
            kernel = region_kernel(node, reference_runner, literal=True)
        elif kernel is None:
            continue   # a placeholder: fed through `inputs`
        else:
            kernel = for_outputs(kernel, node, read)
        result = run_node(node, kernel, env, [values[id(t)] for t in node.inputs])
        if len(node.outputs) == 1:
            values[id(node.outputs[0])] = result
        else:
            for t, v in zip(node.outputs, result):
                values[id(t)] = v
    return [values[id(t)] for t in outputs]


def reference_runner(graph: Graph, inputs: Sequence[Tensor], outputs: Sequence[Tensor]):
    """``run(env, raws)`` of a region's graph with the reference interpreter."""
    return lambda env, raws: run_reference(graph, env, dict(zip(inputs, raws)), outputs)
