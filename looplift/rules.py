"""What an op declares for the passes, beside its own definition (the op rules table).

The loop optimizer knows no op by name. An op that has a sequence-level form,
or that only changes the storage order of a value, says so here, next to where
it is defined (as JAX keeps per-primitive rules in tables)::

    add = replayable(add)
    sequence_form(add, SequenceForm(carried=("a", "b"), sequences=(True,), run=_running_sum, ...))

The passes ask :func:`rules_of` (``rules_of(call.fn).sequence_form``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

__all__ = ["SequenceForm", "OpRules", "rules_of", "sequence_form", "sequence_rule", "layout_only"]


@dataclass(frozen=True)
class SequenceForm:
    """How an op that carries its own result from step to step runs over a whole sequence at once.

    In a loop, a call of the op matches when one of its `carried` arguments is
    exactly a set of loop states whose next values are exactly the call's
    outputs (in order), its `invariant` arguments do not vary per step, and the
    rest does not depend on any carried state.

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


@dataclass(frozen=True)
class OpRules:
    """The rules of one op (see the module docstring)."""

    #: the op's sequence-level form, for a call that carries its result as a loop state
    sequence_form: SequenceForm | None = None
    #: for ``explain``: an op that needs no carried state but behaves differently over a whole sequence
    #: (``cum_concat``) names its sequence rule here
    sequence_rule: str | None = None
    #: the op only brings a value into another storage order (no part of the meaning)
    layout_only: bool = False


_RULES: dict[Callable, OpRules] = {}
_NONE = OpRules()


def rules_of(op: Callable) -> OpRules:
    """The rules declared for the public op `op` (none declared: the defaults)."""
    return _RULES.get(op, _NONE)


def _declare(op: Callable, **rules) -> None:
    _RULES[op] = replace(rules_of(op), **rules)


def sequence_form(op: Callable, form: SequenceForm) -> None:
    """Declare the sequence-level form of the public op `op` (see :class:`SequenceForm`)."""
    _declare(op, sequence_form=form)


def sequence_rule(op: Callable, text: str) -> None:
    """Name the sequence rule of `op` for ``explain`` (see :attr:`OpRules.sequence_rule`)."""
    _declare(op, sequence_rule=text)


def layout_only(op: Callable) -> None:
    """Declare that `op` only changes the storage order of its input."""
    _declare(op, layout_only=True)
