"""A program as a ``torch.fx.GraphModule`` (:meth:`looplift.Program.to_fx`).

The executor's generated code (:mod:`looplift.runtime.executor`) is plain
Python over torch calls, so dynamo (``torch._dynamo.export``) captures it as
one graph of torch functions: the dims are gone, every size is symbolic, the
masks and permutes are ops of the graph. The module's ``forward`` takes the
raw tensors of the program's ``Named`` inputs in order, then one lengths
tensor per dynamic dim (in the order the inputs first give them), and returns
the raw output tensors; ``module.meta["looplift"]`` names their dims.

Why capture and not a lowering per op: the kernels are the program's exact
torch calls already, with their layout decisions made at build time; dynamo
records them as they run, so the module computes what the program computes.

An LSTM or GRU over sequences of different lengths runs over the padded
batch there (each entry's reverse direction over its own frames reversed), as
the program does on CPU for long sequences, not packed: the same results up to
float rounding. Not supported yet: a loop left after the optimizer (its step
depends on the previous step), a ``Cond``, and ops that read values back to
decide what to do (an LSTM whose final cell states are read, which packs; a
multi-layer one with dropout; a masked computation's compress): they raise
:class:`~looplift.errors.ExportError` naming the user's line.
"""

from __future__ import annotations

import operator
import re

import torch

from ..errors import ExportError
from ..graph import Op
from .env import Env
from .executor import Executor

__all__ = ["to_fx"]

_GENERATED_LINE = re.compile(r'File "(<looplift executor \d+>)", line (\d+)')


def to_fx(executor: Executor, inputs: list, raws: list, lengths: dict, device: torch.device,
          root) -> torch.fx.GraphModule:
    """The graph `executor` runs as a GraphModule, captured on the example `raws` (the inputs' raw tensors,
    over the dims of the symbolic `inputs`) and `lengths` (a lengths tensor per dynamic dim); `root`: the
    model whose parameters the module refers to by their names (None: names made up)."""
    for node in executor.nodes:
        if node.op == Op.LOOP:
            raise ExportError(f"to_fx: the loop at {node.source} has no torch.fx form yet (a loop whose step depends "
                              f"on the previous step stays a loop after the optimizer; program.explain() says why)",
                              where=node.source)
        if node.op == Op.COND:
            raise ExportError(f"to_fx: the Cond at {node.source} has no torch.fx form yet", where=node.source)
    length_dims = list(lengths)
    sizes_of = []   # per dim with a size: (input, axis) where the size is read
    for k, t in enumerate(inputs):
        for axis, d in enumerate(t.dims):
            d = d.canonical()
            if d.size is None and all(d is not e for e, _, _ in sizes_of):
                sizes_of.append((d, k, axis))
    n_in = len(raws)
    run = executor.function

    def forward(*tensors):
        sizes = {d: tensors[k].shape[axis] for d, k, axis in sizes_of}
        env = Env(device, sizes, dict(zip(length_dims, tensors[n_in:])))
        return run(env, list(tensors[:n_in]))

    import torch._dynamo  # (not at import: loading dynamo takes a while)

    example = [*raws, *(lengths[d] for d in length_dims)]
    try:
        captured, _ = torch._dynamo.export(forward, aten_graph=False, assume_static_by_default=False)(*example)
    except Exception as e:   # (dynamo's own errors: name the node whose generated line it stopped at)
        raise _named(executor, e) from e
    module = _named_parameters(captured, root)
    module.meta["looplift"] = {
        "inputs": [tuple(d.name for d in t.dims) for t in inputs],
        "lengths": [d.name for d in length_dims],
    }
    return module


def _named(executor: Executor, e: Exception) -> ExportError:
    for filename, line in _GENERATED_LINE.findall(str(e)):
        node = executor.node_at(filename, int(line))
        if node is not None:
            return ExportError(f"to_fx: {node.op} at {node.source} has no torch.fx form yet: "
                               f"{str(e).splitlines()[0]}", where=node.source)
    return ExportError(f"to_fx: the program could not be captured: {str(e).splitlines()[0]}")


def _named_parameters(captured: torch.fx.GraphModule, root) -> torch.fx.GraphModule:
    """`captured` with its parameters and buffers under their names in `root` (dynamo names them after the
    closures that held them); the very tensors, so training the module trains the model."""
    names = {}
    if root is not None:
        names = {id(v): n for n, v in [*root.named_parameters(), *root.named_buffers()]}
    attrs: dict[str, object] = {}
    constants = 0
    for node in captured.graph.nodes:
        if node.op != "get_attr":
            continue
        value = operator.attrgetter(node.target)(captured)
        name = names.get(id(value))
        if name is None:
            name, constants = f"constant_{constants}", constants + 1
        node.target = name
        attrs[name] = value
    module = torch.fx.GraphModule(attrs, captured.graph, class_name="LoopliftProgram")
    return module
