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
import re
import sys
import traceback
from collections.abc import Callable

from .source import is_user_frame, user_source_line

__all__ = [
    "LoopliftError", "DimError", "DimMismatchError", "DTypeError", "TraceError",
    "ModeError", "SymbolicTensorError", "SymbolicAttributeError",
    "InputError", "ExecutionError", "CheckpointError", "CheckpointWriteError", "GraphError", "ConfigError",
    "ExportError",
    "ArgumentError", "entry_point", "at_entry",
]


class LoopliftError(Exception):
    """Base class of all looplift errors.

    ``str(error)`` is the message followed by where the mistake is: ``(at file:line, in looplift.op)``.
    ``where`` is the user's source line (by default the innermost frame of user code when the error is
    made), ``call`` the name of the public entry point called on that line, which adds it. A message that
    already names ``where`` gets nothing added.
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


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (no room, no permission, a file where a folder should be); the file it
    would have replaced is left as it was."""


class GraphError(LoopliftError):
    """A traced graph breaks the IR's contract (:meth:`looplift.graph.Graph.check`): a looplift bug."""


class ConfigError(LoopliftError, ValueError):
    """A setting (of a module, the trainer, the search or a recipe) is out of its range or of the wrong type."""


class ExportError(LoopliftError):
    """A program has a part without a ``torch.fx`` form yet (:meth:`looplift.Program.to_fx`)."""


class ArgumentError(LoopliftError, TypeError):
    """A public function or class was called with arguments of the wrong kind or number."""


def entry_point(fn: Callable | None = None, *, name: str | None = None) -> Callable:
    """Decorate a public function or method: an error raised in it, when it was called from user code, names
    the line of that call (or the user's line nearer the failure) and the call (``looplift.concat``). A
    ``TypeError`` or ``ValueError`` raised by looplift's own code for the user's arguments becomes an
    :class:`ArgumentError` or :class:`ConfigError` (still a ``TypeError`` / ``ValueError``); errors raised by the
    user's own code pass through as they are. Calls from within looplift leave the error to the entry point the
    user called."""
    if fn is None:
        return functools.partial(entry_point, name=name)
    call = name or f"looplift.{fn.__qualname__}"

    @functools.wraps(fn)
    def entered(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            placed = at_entry(e, sys._getframe(1), call)
            if placed is None:
                raise
            raise placed from e
    return entered


def at_entry(e: Exception, caller, call: str) -> LoopliftError | None:
    """At a public entry point named `call`, entered from the stack frame `caller`, with `e` raised within:
    the looplift error to raise instead of `e`, or None to raise `e` (placed, if it is a looplift error)."""
    if not is_user_frame(caller):
        return None   # (looplift called its own entry point: the one the user called places the error)
    here = f"{caller.f_code.co_filename}:{caller.f_lineno}"
    if isinstance(e, LoopliftError):
        if e.call is None and e.where == here:   # (else the mistake is on a user line deeper inside this call)
            e.call = call
        return None
    if not isinstance(e, (TypeError, ValueError, AttributeError)):
        return None
    frames = list(traceback.walk_tb(e.__traceback__))[1:]   # (below the entry point)
    if frames and is_user_frame(frames[-1][0]):
        return None   # the user's own code raised it (with no frame below: the call's own arguments are wrong)
    user = [f"{f.f_code.co_filename}:{line}" for f, line in frames if is_user_frame(f)]
    cls = ConfigError if isinstance(e, ValueError) else ArgumentError
    message = str(e)
    if not frames and isinstance(e, TypeError):   # the call's arguments do not fit: say which call, as written
        message = re.sub(r"^[\w.<>]+\(\)", f"{call}()", message)
        if re.search(r"keyword argument '(dim|keepdim)'", message):
            message += "; looplift ops name the dims they work on: axis=Dim"
    placed = cls(message, where=user[-1] if user else here)
    placed.call = None if user else call
    return placed


def entry_methods(cls: type, *names: str, public: str | None = None) -> type:
    """Make the methods `names` of `cls` entry points (:func:`entry_point`); a property's getter and setter
    both. `public` is how users spell the class (``looplift.Loop``); ``__init__`` is reported as its call."""
    public = public or f"looplift.{cls.__qualname__}"
    for name in names:
        member = cls.__dict__[name]
        call = {"__init__": public, "__call__": f"{public}.__call__"}.get(name, f"{public}.{name}")
        if isinstance(member, property):
            member = property(member.fget and entry_point(member.fget, name=call),
                              member.fset and entry_point(member.fset, name=call), member.fdel, member.__doc__)
        else:
            member = entry_point(member, name=call)
        setattr(cls, name, member)
    return cls
