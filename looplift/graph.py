"""The traced program: nodes and graphs (the IR).

The IR is deliberately small, in the spirit of ``torch.fx``: a :class:`Graph`
is an ordered list of :class:`Node`\\ s; a node has symbolic input tensors, an
op name, a *kernel* and its output tensors. The kernel is a plain Python
callable over torch tensors, built by the op when it is traced, with every
dim-order decision already taken, so running a node costs one call.

The contract, which :meth:`Graph.check` verifies:

* a node's outputs point back at it (``t.node is node``, ``t.index`` its
  position); its inputs are outputs of earlier nodes of its graph or of an
  enclosing graph, never of a graph nested inside it (no value escapes its
  region: it leaves a loop only by ``loop.stack``, ``loop.last`` or a state);
* a region (a loop body, a branch of a Cond) is a graph whose ``parent`` is
  the graph of the node that runs it; the values it returns are its own or
  visible to it;
* ordinary ops have a kernel; the structural ops of :class:`Op` are the only
  other nodes, each with the one meaning listed there.

What passes and the runtime rely on is in the typed fields of :class:`Node`
(``region``, ``makes_dims``, ``random``, ...). ``attrs`` are for humans
(``explain``, :meth:`Graph.format`, error messages), never read for meaning.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ._tree import flatten, tree_map
from .dims import Dim
from .errors import GraphError
from .source import user_source_line
from .tensor import Tensor

__all__ = ["Op", "Node", "Graph", "Call", "Kernel", "Region"]


class Op(enum.StrEnum):
    """The structural ops: every other node is an ordinary op whose kernel computes its outputs."""

    INPUT = "input"            # a program input: no kernel, the caller feeds its value
    PARAM = "param"            # a module parameter: its kernel returns the torch parameter
    CONSTANT = "constant"      # a Python number: its kernel returns ``node.value``
    STATE = "state"            # in a loop body: a state's value from the previous step; no kernel, the loop feeds it
    UNSTACK = "unstack"        # in a loop body: frame t of a sequence along the loop's dim
    LOOP_INDEX = "loop_index"  # in a loop body: the step counter t
    LOOP = "loop"              # a loop: ``region`` is its LoopSpec, which the runtime runs step by step
    COND = "cond"              # one of two branches: ``region`` is its CondSpec, which the runtime runs


class Region(Protocol):
    """The record of a region node (``looplift.regions.LoopSpec``, ``CondSpec``): its graphs."""

    #: a name per graph, for :meth:`Graph.format` ("body"; "true", "false")
    region_names: tuple[str, ...]

    def regions(self) -> list[tuple[Graph, list[Tensor]]]:
        """Each graph of the region with the values it returns."""


#: ``kernel(env, *raw_inputs)``: the raw torch output, or a tuple of them for a node with several outputs.
#: A kernel may offer ``kernel.for_outputs(used)`` (`used`: per output, whether anything reads it): the kernel
#: to run when only those are read, which may return None for the others (the runtime asks it once per graph).
#: A kernel may say ``kernel.fresh = True``: its result is a new tensor (or a Python number), whose memory no
#: other value shares; and offer ``kernel.for_owned(owned)`` (`owned`: per input, whether it is such a
#: result that nothing else reads): the kernel to run when it may overwrite those inputs (the executor asks).
Kernel = Callable[..., Any]


@dataclass(eq=False)
class Node:
    """One traced operation.

    The kernel returns the raw output (each output's storage order equal to
    its symbolic tensor's ``dims``). A node without a kernel is either a
    placeholder fed by whoever runs its graph (:attr:`Op.INPUT`,
    :attr:`Op.STATE`) or a region run by the runtime (:attr:`Op.LOOP`,
    :attr:`Op.COND`).
    """

    op: str
    inputs: tuple[Tensor, ...]
    kernel: Kernel | None
    #: for humans only: ``explain``, :meth:`Graph.format`, error messages
    attrs: dict[str, Any] = field(default_factory=dict)
    outputs: list[Tensor] = field(default_factory=list)
    source: str = "<unknown>"
    graph: Graph | None = None
    #: The user-level op call that emitted this node (for replaying it on other inputs), or None.
    call: Call | None = None
    #: LOOP and COND: the region's record (its body or branches, what it captures and returns).
    region: Region | None = None
    #: Dims whose size and lengths this node sets when it runs (a compress sets its masked dim's).
    makes_dims: tuple[Dim, ...] = ()
    #: The node draws anew each time it runs (dropout, sampling): never computed once for several steps.
    random: bool = False
    #: The kernel keeps memory across the steps of the loop run around it (``env.scratch``: a ``cum_concat``'s
    #: frames so far, a prune's source hypotheses), so that loop's step is never compiled (see
    #: :meth:`looplift.runtime.executor.Executor.compile`).
    keeps_run_memory: bool = False
    #: Dims in whose padding the output is exactly zero (so a consumer need not mask it again).
    zero_padding: tuple[Dim, ...] = ()
    #: Dims in whose padding the output may hold a non-finite number (NaN, inf), where the parameters are
    #: finite and the program's inputs are within their lengths; None: not known (anywhere, any dim). A dot
    #: leaves an operand's padding as it is where it is finite and the other operand's is zero.
    nonfinite_padding: tuple[Dim, ...] | None = None
    #: CONSTANT: the Python number.
    value: bool | int | float | None = None
    #: The ``looplift.MaskedComputation`` whose block traced this node, or None.
    masked_block: Any = None
    #: Nodes that looplift adds on behalf of a construct of the user's (the search's bookkeeping, a masked
    #: block's held values): that construct, in the user's words (e.g. "looplift.choice"), for reports.
    on_behalf_of: str | None = None

    def __repr__(self) -> str:
        ins = ", ".join("{" + ",".join(d.name for d in t.dims) + "}" for t in self.inputs)
        return f"<Node {self.op}({ins}) at {self.source}>"


class Graph:
    """An ordered list of nodes (and the parameters' tensors).

    A control-flow region (a loop body, a branch of a Cond) is a graph whose
    ``parent`` is the graph around it; its nodes may use tensors of any
    ancestor graph.
    """

    def __init__(self, parent: Graph | None = None) -> None:
        self.parent = parent
        self.nodes: list[Node] = []
        #: (module, attribute name) -> the parameter's symbolic tensor.
        self.params: dict[tuple[int, str], Tensor] = parent.params if parent is not None else {}
        #: What the runtime prepared for this graph (executors, region runners), kept across calls.
        self.prepared: dict = {}

    def encloses(self, other: Graph) -> bool:
        """Whether `other` is this graph or one of its ancestors (so its tensors are visible here)."""
        g = self
        while g is not None:
            if g is other:
                return True
            g = g.parent
        return False

    def is_inside(self, region: Graph) -> bool:
        """Whether this graph is `region` or nested in it."""
        return self.encloses(region)

    def captured(self, returned: Sequence[Tensor] = ()) -> list[Tensor]:
        """Tensors of enclosing graphs that the nodes of this graph (and of regions inside it) use, and
        those of `returned` (the region's results) that it passes on unchanged."""
        seen: dict[int, Tensor] = {}
        for t in [*(t for node in self.nodes for t in node.inputs), *returned]:
            if t.node is not None and not t.node.graph.is_inside(self):
                seen.setdefault(id(t), t)
        return list(seen.values())

    def add(self, op: str, inputs: tuple[Tensor, ...], kernel: Kernel | None,
            outputs: Sequence[tuple[tuple, torch.dtype, Any]], attrs: dict[str, Any] | None = None,
            source: str | None = None, **fields) -> Node:
        """Append a node computing `outputs` (``(dims, dtype, sparse_dim)`` each); `fields` are typed
        :class:`Node` fields (``region``, ``makes_dims``, ``random``, ...)."""
        if "nonfinite_padding" not in fields and not any(dtype.is_floating_point or dtype.is_complex
                                                         for _, dtype, _ in outputs):
            fields["nonfinite_padding"] = ()   # (integers and booleans are finite)
        node = Node(op, inputs, kernel, attrs or {}, source=source or user_source_line(), graph=self, **fields)
        node.outputs = [Tensor(dims, dtype, sparse_dim=sparse, node=node, index=i)
                        for i, (dims, dtype, sparse) in enumerate(outputs)]
        self.nodes.append(node)
        return node

    # -- the contract ------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise :class:`looplift.errors.GraphError` where the graph breaks the contract of this module."""
        _check(self, set())

    def format(self) -> str:
        """The graph as text, one line per node: ``%3 = add(%1, %2) {batch, time} float32  # file:line``,
        with the regions of loops and Conds indented below their node."""
        names: dict[int, str] = {}
        lines: list[str] = []
        _format(self, names, lines, "")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _check(graph: Graph, visible: set[int]) -> None:
    """Check `graph`'s nodes in order; `visible` holds the ids of the tensors defined before it (in enclosing
    graphs) and grows by its own."""
    visible = set(visible)
    for node in graph.nodes:
        if node.graph is not graph:
            _broken(node, "is listed in a graph it does not belong to")
        for t in node.inputs:
            if id(t) not in visible:
                _broken(node, f"uses the {t.describe()}, which is not defined before it in its graph or an "
                              f"enclosing one")
        if node.kernel is None and node.region is None and node.op not in (Op.INPUT, Op.STATE):
            _broken(node, "has no kernel and is no placeholder or region")
        if node.op in (Op.LOOP, Op.COND) and node.region is None:
            _broken(node, "has no region record")
        if node.region is not None:
            for body, returned in node.region.regions():
                if body.parent is not graph:
                    _broken(node, "has a region that is not nested in the graph of its node")
                _check(body, visible)
                inside = {id(t) for n in body.nodes for t in n.outputs}
                for t in returned:
                    if id(t) not in inside and id(t) not in visible:
                        _broken(node, f"returns the {t.describe()}, which is not visible in it")
        for i, t in enumerate(node.outputs):
            if t.node is not node or t.index != i:
                _broken(node, f"has an output {i} that does not point back at it")
            visible.add(id(t))


def _broken(node: Node, what: str):
    raise GraphError(f"the {node.op} node at {node.source} {what}")


def _format(graph: Graph, names: dict[int, str], lines: list[str], indent: str) -> None:
    def name(t: Tensor) -> str:
        return names.get(id(t), "%?")

    for node in graph.nodes:
        for t in node.outputs:
            names[id(t)] = f"%{len(names)}"
        outs = ", ".join(name(t) for t in node.outputs) or "()"
        types = ", ".join("{" + ", ".join(d.name for d in t.dims) + "} " + str(t.dtype).removeprefix("torch.")
                          for t in node.outputs)
        label = node.op
        if node.op == Op.CONSTANT:
            label = f"constant[{node.value!r}]"
        elif node.op == Op.STATE or node.op == Op.PARAM:
            label = f"{node.op}[{node.attrs.get('state', node.attrs.get('name', ''))}]"
        elif node.op in (Op.UNSTACK, Op.LOOP, Op.LOOP_INDEX) and "axis" in node.attrs:
            label = f"{node.op}[{node.attrs['axis']}]"
        lines.append(f"{indent}{outs} = {label}({', '.join(name(t) for t in node.inputs)})  {types}  # {node.source}")
        if node.region is not None:
            for k, (body, returned) in enumerate(node.region.regions()):
                lines.append(f"{indent}  {node.region.region_names[k]}:")
                _format(body, names, lines, indent + "    ")
                lines.append(f"{indent}    return {', '.join(name(t) for t in returned)}")


@dataclass(eq=False)
class Call:
    """One call of a public op from user (or module) code: enough to replay it on other inputs.

    Passes replay calls to move computations: a call traced inside a loop
    body on frame t of a sequence is replayed outside the loop on the whole
    sequence, where the op's own dim rule treats the loop's dim as one more
    batch dim.
    """

    fn: Callable
    args: tuple
    kwargs: dict
    outputs: Any = None
    nodes: list[Node] = field(default_factory=list)
    #: argument tensors the op used in place of others (id -> replacement), e.g. a MaskedComputation's
    #: values held where its mask is False
    substitutions: dict[int, Tensor] = field(default_factory=dict)

    def arguments(self) -> tuple[tuple, dict]:
        """``(args, kwargs)`` as the op saw them (with substitutions made)."""
        if not self.substitutions:
            return self.args, self.kwargs

        def sub(x):
            return self.substitutions.get(id(x), x) if isinstance(x, Tensor) else x

        return (tuple(tree_map(sub, a, _is_tensor) for a in self.args),
                {k: tree_map(sub, v, _is_tensor) for k, v in self.kwargs.items()})

    def output_tensors(self) -> list[Tensor]:
        """The tensors among the call's outputs."""
        leaves, _ = flatten(self.outputs, _is_tensor)
        return [t for t in leaves if isinstance(t, Tensor)]

    def resolve(self, **kwargs) -> None:
        """Record arguments the op inferred from its inputs (e.g. concat's axes), so a replay on inputs
        with more dims does not infer them anew."""
        self.kwargs.update(kwargs)


def _is_tensor(v) -> bool:
    return isinstance(v, Tensor)
