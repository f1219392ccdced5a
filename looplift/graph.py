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
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import ModeError, TraceError
from .tensor import Tensor

__all__ = ["Node", "Graph", "TraceContext", "current", "is_training", "is_search", "mode",
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
    equal to its symbolic tensor's ``dims``.
    """

    op: str
    inputs: tuple[Tensor, ...]
    kernel: Kernel
    attrs: dict[str, Any] = field(default_factory=dict)
    outputs: list[Tensor] = field(default_factory=list)
    source: str = "<unknown>"
    graph: Graph | None = None

    def __repr__(self) -> str:
        ins = ", ".join("{" + ",".join(d.name for d in t.dims) + "}" for t in self.inputs)
        return f"<Node {self.op}({ins}) at {self.source}>"


class Graph:
    """An ordered list of nodes, with the program's inputs and parameters."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.inputs: list[Tensor] = []
        #: (module, attribute name) -> the parameter's symbolic tensor.
        self.params: dict[tuple[int, str], Tensor] = {}

    def add(self, op: str, inputs: tuple[Tensor, ...], kernel: Kernel,
            outputs: list[tuple[tuple, torch.dtype, Any]], attrs: dict[str, Any] | None = None,
            source: str | None = None) -> Node:
        node = Node(op, inputs, kernel, attrs or {}, source=source or user_source_line(), graph=self)
        node.outputs = [Tensor(dims, dtype, sparse_dim=sparse, node=node, index=i)
                        for i, (dims, dtype, sparse) in enumerate(outputs)]
        self.nodes.append(node)
        return node


class TraceContext:
    """Everything that exists while one program is traced."""

    def __init__(self, mode: str, graph: Graph, float_dtype: torch.dtype | None = None):
        self.mode = mode
        self.graph = graph
        #: The dtype of new floating-point values (that of the model's parameters).
        self.float_dtype = float_dtype or torch.get_default_dtype()


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
