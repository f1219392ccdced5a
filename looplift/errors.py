"""The looplift error hierarchy.

Every error looplift raises for bad input derives from :class:`LoopliftError`
(and, where one fits, from the matching built-in: ``ValueError``, ``TypeError``,
``OSError``, so existing ``except`` clauses keep working). Its message names
the dims involved and says what to do; the error itself knows where the user's
mistake is: the user's source line of the call into looplift, added once, at
the public entry point (:func:`entry_point`), with the name of the call.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

from .source import is_user_frame, user_source_line

__all__ = [
    "LoopliftError", "DimError", "DimMismatchError", "DTypeError", "TraceError",
    "ModeError", "SymbolicTensorError", "SymbolicAttributeError",
    "InputError", "ExecutionError", "CheckpointError", "GraphError", "ConfigError",
    "entry_point", "locate",
]


class LoopliftError(Exception):
    """Base class of all looplift errors.

    ``str(error)`` is the message followed by where the mistake is: ``(at file:line, in looplift.op)``.
    ``where`` is the user's source line (by default the innermost frame of user code when the error is
    made; the public entry point the user called sets it to the line of that call), ``call`` the name of
    that entry point. A message that already names ``where`` gets nothing added.
    """

    def __init__(self, message: str = "", *, where: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where if where is not None else user_source_line()
        if self.where == "<looplift internal>":
            self.where = ""
        self.call: str | None = None

    def __str__(self) -> str:
        if not self.where or self.where in self.message:
            return self.message
        call = f", in {self.call}" if self.call else ""
        return f"{self.message} (at {self.where}{call})"


class TraceError(LoopliftError):
    """A program could not be traced (misuse of the API while tracing)."""


class DimError(TraceError, ValueError):
    """A dim is missing from a tensor, given twice, or of the wrong kind."""


class DimMismatchError(DimError):
    """Two distinct dims share a name where one dim was meant, or dims disagree."""


class DTypeError(TraceError, TypeError):
    """A tensor has a dtype the operation does not accept."""


class SymbolicTensorError(TraceError, TypeError):
    """A torch function, a conversion or indexing was applied to a symbolic :class:`looplift.Tensor`."""


class SymbolicAttributeError(TraceError, AttributeError):
    """A ``torch.Tensor`` attribute (``.shape``, ``.view``, ...) was asked of a symbolic :class:`looplift.Tensor`."""


class ModeError(TraceError):
    """An unknown mode was asked for, or a mode query was used outside of tracing."""


class InputError(LoopliftError, ValueError):
    """The torch tensors given to a program disagree with their dims or lengths."""


class ExecutionError(LoopliftError, RuntimeError):
    """A torch kernel failed while running a traced node."""


class CheckpointError(LoopliftError):
    """A checkpoint could not be saved or does not match the model."""


class GraphError(LoopliftError):
    """A traced graph breaks the IR's contract (:meth:`looplift.graph.Graph.check`): a looplift bug."""


class ConfigError(LoopliftError, ValueError):
    """A setting (of a module, the trainer, the search or a recipe) is out of its range or of the wrong type."""


def entry_point(fn: Callable | None = None, *, name: str | None = None) -> Callable:
    """Decorate a public function or method: a looplift error raised in it, when it was called from user
    code, names the line of that call and the call (``looplift.concat``). Calls from within looplift leave
    the error to the entry point the user called (the outermost one)."""
    if fn is None:
        return functools.partial(entry_point, name=name)
    call = name or f"looplift.{fn.__qualname__}"

    @functools.wraps(fn)
    def entered(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LoopliftError as e:
            locate(e, sys._getframe(1), call)
            raise
    return entered


def locate(e: LoopliftError, caller, call: str) -> None:
    """At a public entry point named `call`, entered from the stack frame `caller`: if that frame is user
    code and no entry point nearer the user has placed `e`, it names the caller's line and `call`."""
    if e.call is None and is_user_frame(caller):
        e.where, e.call = f"{caller.f_code.co_filename}:{caller.f_lineno}", call
