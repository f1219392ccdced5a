"""Recurrent modules with explicit state: ``LSTM`` and ``GRU``.

One module runs either one step (``cell(x, state=s) -> (out, new_state)``,
inside a :class:`looplift.Loop`) or a whole sequence over a named dim
(``cell(x, axis=time)``), with the same parameters. Modules never hide state:
the step form takes the state and returns the new one.

Parameter names and layout are those of ``torch.nn.LSTM`` / ``torch.nn.GRU``
with one layer (``weight_ih_l0``, ..., ``*_reverse`` for the backward
direction), so ``module.load_state_dict(torch_lstm.state_dict())`` works.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..dims import Dim
from ..errors import DimError
from ..module import Module, Parameter
from ..ops.rnn import gru_cell, lstm_cell, rnn_sequence
from ..ops.shape import zeros
from ..tensor import Tensor

__all__ = ["LSTM", "GRU", "LstmState"]


@dataclass
class LstmState:
    """The state of an LSTM: hidden output `h` and cell `c`, each over ``batch dims + (hidden,)``."""

    h: Tensor
    c: Tensor


class _RNN(Module):
    _gates = 1
    _kind = ""

    def __init__(self, in_dim: Dim, out_dim: Dim, *, bidirectional: bool = False):
        super().__init__()
        if bidirectional and out_dim.size % 2:
            raise DimError(f"a bidirectional {type(self).__name__} needs an even out dim (the two directions "
                           f"concatenated), got {out_dim!r}")
        self.in_dim, self.out_dim, self.bidirectional = in_dim, out_dim, bidirectional
        #: The dim of one direction's hidden state (`out_dim` unless bidirectional).
        self.hidden = out_dim if not bidirectional else Dim(f"{out_dim.name}/dir", out_dim.size // 2)
        if bidirectional:
            # the output of both directions concatenated is `out_dim`
            (self.hidden * 2).declare_same_as(out_dim)
        gates = self.hidden * self._gates
        bound = 1.0 / math.sqrt(self.hidden.size)
        init = lambda t: t.uniform_(-bound, bound)  # noqa: E731 - as torch.nn.LSTM
        for suffix in ("_l0", "_l0_reverse") if bidirectional else ("_l0",):
            setattr(self, f"weight_ih{suffix}", Parameter((gates, in_dim), init=init))
            setattr(self, f"weight_hh{suffix}", Parameter((gates, self.hidden), init=init))
            setattr(self, f"bias_ih{suffix}", Parameter((gates,), init=init))
            setattr(self, f"bias_hh{suffix}", Parameter((gates,), init=init))

    def _weights(self, reverse: bool = False) -> list[Tensor]:
        suffix = "_l0_reverse" if reverse else "_l0"
        return [getattr(self, f"{name}{suffix}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]

    def _all_weights(self) -> list[Tensor]:
        return self._weights() + (self._weights(reverse=True) if self.bidirectional else [])

    def _check_step(self) -> None:
        if self.bidirectional:
            raise DimError(f"a bidirectional {type(self).__name__} runs over a whole sequence; pass axis=...")


class LSTM(_RNN):
    """An LSTM from `in_dim` to `out_dim`: one step, or a whole sequence over a dim.

    Step: ``out, new_state = lstm(x, state=state)`` (``out`` is ``new_state.h``; `state` is an
    :class:`LstmState` or a tuple ``(h, c)``).
    Sequence: ``out, final_state = lstm(x, axis=time)``; for a bidirectional
    LSTM ``out`` concatenates both directions (``out_dim``) and ``final_state``
    is ``(forward_state, backward_state)``.
    """

    _gates = 4
    _kind = "lstm"

    def default_initial_state(self, batch_dims: Sequence[Dim] = ()) -> LstmState:
        """Zeros over ``batch_dims + (hidden,)`` (a loop adds the batch dims it needs by itself)."""
        return LstmState(zeros([*batch_dims, self.hidden]), zeros([*batch_dims, self.hidden]))

    def forward(self, x: Tensor, *, state: LstmState | tuple | None = None, axis: Dim | None = None):
        if isinstance(state, tuple) and not self.bidirectional:
            state = LstmState(*state)  # (h, c)
        if axis is None:
            self._check_step()
            state = state if state is not None else self.default_initial_state()
            h, c = lstm_cell(x, (state.h, state.c), self._weights(), in_dim=self.in_dim, hidden=self.hidden)
            return h, LstmState(h, c)
        if state is None:
            init = [zeros([self.hidden])] * (4 if self.bidirectional else 2)
        elif self.bidirectional:
            init = [state[0].h, state[0].c, state[1].h, state[1].c]
        else:
            init = [state.h, state.c]
        out, *finals = rnn_sequence("lstm", x, init, self._all_weights(), axis=axis, in_dim=self.in_dim,
                                    hidden=self.hidden, bidirectional=self.bidirectional)
        states = [LstmState(finals[i], finals[i + 1]) for i in range(0, len(finals), 2)]
        return out, (tuple(states) if self.bidirectional else states[0])


class GRU(_RNN):
    """A GRU from `in_dim` to `out_dim`: one step, or a whole sequence over a dim.

    Its state is the hidden output `h` itself. Step: ``out, new_h = gru(x, state=h)``;
    sequence: ``out, final_h = gru(x, axis=time)`` (bidirectional: ``(forward_h, backward_h)``).
    """

    _gates = 3
    _kind = "gru"

    def default_initial_state(self, batch_dims: Sequence[Dim] = ()) -> Tensor:
        """Zeros over ``batch_dims + (hidden,)``."""
        return zeros([*batch_dims, self.hidden])

    def forward(self, x: Tensor, *, state: Tensor | tuple | None = None, axis: Dim | None = None):
        if axis is None:
            self._check_step()
            h = gru_cell(x, state if state is not None else self.default_initial_state(), self._weights(),
                         in_dim=self.in_dim, hidden=self.hidden)
            return h, h
        if state is None:
            init = [zeros([self.hidden])] * (2 if self.bidirectional else 1)
        else:
            init = list(state) if self.bidirectional else [state]
        out, *finals = rnn_sequence("gru", x, init, self._all_weights(), axis=axis, in_dim=self.in_dim,
                                    hidden=self.hidden, bidirectional=self.bidirectional)
        return out, (tuple(finals) if self.bidirectional else finals[0])
