"""The traced program: nodes, graphs, the tracing context and source lines.

The IR is deliberately small (in the spirit of ``torch.fx``): a :class:`Graph`
is an ordered list of :class:`Node`\\ s; a node has symbolic input tensors, an
op name, attributes (for humans: ``explain`` and error messages), a *kernel*
and its output tensors. The kernel is a plain Python callable over torch
tensors, built by the op when it is traced, with every dim-order decision
already taken, so running a node costs one call.

A node remembers the user source line that created it: the innermost stack
frame outside the looplift package. Every error points there.

Tracing state lives in a :class:`TraceContext` that exists only while
:func:`looplift.compile` traces a function; there is no global graph.
"""

from __future__ import annotations

import contextvars
import functools
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .errors import ModeError, TraceError
from .tensor import Tensor

__all__ = ["Node", "Graph", "Call", "replayable", "resolve_call", "SequenceForm", "sequence_form", "TraceContext", "current", "is_training", "is_search", "mode",
           "user_source_line"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_RECIPES_DIR = os.path.join(_PACKAGE_DIR, "recipes") + os.sep
# Frames of torch itself (``nn.Module.__call__`` between a user's call and a module) are skipped too.
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _is_internal(filename: str) -> bool:
    if filename.startswith(_RECIPES_DIR):
        return False
    return filename.startswith(_PACKAGE_DIR) or filename.startswith(_TORCH_DIR)


def user_source_line() -> str:
    """``file:line`` of the innermost stack frame of user code (outside looplift and torch)."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not _is_internal(os.path.abspath(filename) if not filename.startswith("/") else filename):
            return f"{filename}:{frame.f_lineno}"
        frame = frame.f_back
    return "<looplift internal>"


Kernel = Callable[..., Any]


@dataclass(eq=False)
class Node:
    """One traced operation.

    ``kernel(env, *raw_inputs)`` returns the raw torch output (or a tuple of
    them when the node has several outputs), with each output's storage order
    equal to its symbolic tensor's ``dims``. A node without a kernel is a
    placeholder whose value is fed by whoever runs the graph (a program input,
    a loop state).
    """

    op: str
    inputs: tuple[Tensor, ...]
    kernel: Kernel | None
    attrs: dict[str, Any] = field(default_factory=dict)
    outputs: list[Tensor] = field(default_factory=list)
    source: str = "<unknown>"
    graph: Graph | None = None
    #: The user-level op call that emitted this node (for replaying it on other inputs), or None.
    call: Call | None = None

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
        #: What the runtime prepared for this graph (executors), kept across calls.
        self.prepared: dict = {}

    def encloses(self, other: Graph) -> bool:
        """Whether `other` is this graph or one of its ancestors (so its tensors are visible here)."""
        g = self
        while g is not None:
            if g is other:
                return True
            g = g.parent
        return False

    def captured(self, returned: Sequence[Tensor] = ()) -> list[Tensor]:
        """Tensors of enclosing graphs that the nodes of this graph (and of regions inside it) use, and
        those of `returned` (the region's results) that it passes on unchanged."""
        seen: dict[int, Tensor] = {}
        for t in [*(t for node in self.nodes for t in node.inputs), *returned]:
            if t.node is not None and not t.node.graph.is_inside(self):
                seen.setdefault(id(t), t)
        return list(seen.values())

    def is_inside(self, region: Graph) -> bool:
        """Whether this graph is `region` or nested in it."""
        return self is region or (self.parent is not None and self.parent.is_inside(region))

    def add(self, op: str, inputs: tuple[Tensor, ...], kernel: Kernel,
            outputs: list[tuple[tuple, torch.dtype, Any]], attrs: dict[str, Any] | None = None,
            source: str | None = None) -> Node:
        node = Node(op, inputs, kernel, attrs or {}, source=source or user_source_line(), graph=self)
        node.outputs = [Tensor(dims, dtype, sparse_dim=sparse, node=node, index=i)
                        for i, (dims, dtype, sparse) in enumerate(outputs)]
        self.nodes.append(node)
        ctx = _current.get()
        if ctx is not None and ctx.call is not None:
            node.call = ctx.call
            ctx.call.nodes.append(node)
        return node


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
        from ._tree import tree_map
        return (tuple(tree_map(sub, a, lambda v: isinstance(v, Tensor)) for a in self.args),
                {k: tree_map(sub, v, lambda v: isinstance(v, Tensor)) for k, v in self.kwargs.items()})

    def resolve(self, **kwargs) -> None:
        """Record arguments the op inferred from its inputs (e.g. concat's axes), so a replay on inputs
        with more dims does not infer them anew."""
        self.kwargs.update(kwargs)


def replayable(fn: Callable) -> Callable:
    """Mark a public op: its outermost calls are recorded as :class:`Call`\\ s on the nodes they emit."""
    @functools.wraps(fn)
    def op(*args, **kwargs):
        ctx = _current.get()
        if ctx is None or ctx.call is not None:
            return fn(*args, **kwargs)
        call = ctx.call = Call(op, args, dict(kwargs))
        try:
            call.outputs = fn(*args, **kwargs)
        finally:
            ctx.call = None
        ctx.last_call = call
        return call.outputs
    op.replayable = True
    return op


@dataclass(frozen=True)
class SequenceForm:
    """How an op that carries its own result from step to step runs over a whole sequence at once.

    (An op whose sequence rule needs no carried state, like ``cum_concat``,
    simply behaves differently when its loop's dim is not stepped, and names
    that rule in its ``sequence_rule`` attribute for ``explain``.)

    Declared beside the op (``sequence_form(op, SequenceForm(...))``), so the
    loop optimizer needs no knowledge of particular ops. In a loop, a call of
    the op matches when one of its `carried` arguments is exactly a set of loop
    states whose next values are exactly the call's outputs (in order), its
    `invariant` arguments do not vary per step, and the rest does not depend on
    any carried state.

    ``run(args, carried, axis)`` gets the call's bound arguments with the
    carried one replaced by the states' initial values and every other one by
    its value over the whole sequence, and returns ``(sequences, finals)``:
    per output of the call, its value at every step (over `axis`) or None,
    and its final value or None. `sequences` says, per output, whether a
    sequence is returned; `finals_ignore_end` that the finals are only right
    for a loop without ``loop.end``.
    """

    carried: tuple[str, ...]
    run: Callable
    sequences: tuple[bool, ...]
    invariant: tuple[str, ...] = ()
    finals_ignore_end: bool = False
    name: str = ""


def sequence_form(op: Callable, form: SequenceForm) -> None:
    """Declare the sequence-level form of the public op `op` (see :class:`SequenceForm`)."""
    op.sequence_form = form


def resolve_call(op_name: str, **kwargs) -> None:
    """Inside the op `op_name`: record inferred arguments on its call, if it is the call being traced
    (not another op calling it); see :meth:`Call.resolve`."""
    ctx = _current.get()
    if ctx is not None and ctx.call is not None and ctx.call.fn.__name__ == op_name:
        ctx.call.resolve(**kwargs)


class Retrace(BaseException):
    """Raised by a loop that found its states need more dims than their initial values have.

    The program catches it and traces again; the loop then gives its state
    placeholders those dims from the start. (A BaseException, so that user
    code catching ``Exception`` does not swallow it.)
    """


class TraceContext:
    """Everything that exists while one program is traced."""

    def __init__(self, mode: str, graph: Graph, float_dtype: torch.dtype | None = None,
                 loop_hints: dict | None = None):
        self.mode = mode
        self.graph = graph
        #: The dtype of new floating-point values (that of the model's parameters).
        self.float_dtype = float_dtype or torch.get_default_dtype()
        #: The loops whose bodies are being traced, outermost first.
        self.loops: list = []
        #: Per loop (by creation order in the trace): dims its states need beyond their initial values',
        #: learnt by an earlier attempt of the same trace.
        self.loop_hints: dict = loop_hints if loop_hints is not None else {}
        self._loop_count = 0
        #: The outermost op call being traced, if any, and the last one finished.
        self.call: Call | None = None
        self.last_call: Call | None = None

    def next_loop_ordinal(self) -> int:
        self._loop_count += 1
        return self._loop_count - 1

    @property
    def stepped_dims(self) -> tuple:
        """The dims the active loops step over: inside a body, these are not dims of any value."""
        return tuple(loop.axis for loop in self.loops)


def length_dims(dim) -> tuple:
    """The dims the lengths of `dim` run over, as seen in the region being traced.

    Inside a loop over `T`, a dim whose lengths vary along `T` has, per step,
    lengths over the remaining dims only.
    """
    ctx = _current.get()
    dims = dim.length_dims
    if ctx is None or not ctx.loops:
        return dims
    stepped = ctx.stepped_dims
    return tuple(d for d in dims if d not in stepped)


_current: contextvars.ContextVar[TraceContext | None] = contextvars.ContextVar("looplift_trace", default=None)


def current(what: str = "") -> TraceContext:
    """The active trace; outside of tracing, an error naming `what` was attempted (e.g. the op and its dims)."""
    ctx = _current.get()
    if ctx is None:
        what = f": {what}" if what else ""
        raise TraceError(
            f"looplift ops run only while a program is traced{what} (at {user_source_line()}); "
            "wrap the code in a function or Module and call looplift.compile(...)")
    return ctx


def tracing() -> TraceContext | None:
    """The active trace, or None."""
    return _current.get()


def enter(ctx: TraceContext) -> contextvars.Token:
    return _current.set(ctx)


def leave(token: contextvars.Token) -> None:
    _current.reset(token)


def _mode() -> str:
    ctx = _current.get()
    if ctx is None:
        raise ModeError(f"the mode is known only while a program is traced ({user_source_line()}); "
                        "call this inside the model code that looplift.compile traces")
    return ctx.mode


def mode() -> str:
    """The mode of the program being traced: "train", "eval" or "search"."""
    return _mode()


def is_training() -> bool:
    """True while tracing a program compiled with ``mode="train"``."""
    return _mode() == "train"


def is_search() -> bool:
    """True while tracing a program compiled with ``mode="search"``."""
    return _mode() == "search"
