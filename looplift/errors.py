"""The looplift error hierarchy.

Every error looplift raises for bad input derives from :class:`LoopliftError`.
Errors raised while tracing name the user's source line that created the
offending value and the dims involved, so the fix is obvious from the message.
"""

from __future__ import annotations

__all__ = [
    "LoopliftError", "DimError", "DimMismatchError", "DTypeError", "TraceError",
    "ModeError", "InputError", "ExecutionError", "CheckpointError", "GraphError",
]


class LoopliftError(Exception):
    """Base class of all looplift errors."""


class TraceError(LoopliftError):
    """A program could not be traced (misuse of the API while tracing)."""


class DimError(TraceError, ValueError):
    """A dim is missing from a tensor, given twice, or of the wrong kind."""


class DimMismatchError(DimError):
    """Two distinct dims share a name where one dim was meant, or dims disagree."""


class DTypeError(TraceError, TypeError):
    """A tensor has a dtype the operation does not accept."""


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
