"""Recurrent modules with explicit state: ``LSTM`` and ``GRU``.

One module runs either one step (``cell(x, state=s) -> (out, new_state)``,
inside a :class:`looplift.Loop`) or a whole sequence over a named dim
(``cell(x, axis=time)``), with the same parameters. Modules never hide state:
the step form takes the state and returns the new one.

Parameter names and layout are those of ``torch.nn.LSTM`` / ``torch.nn.GRU``
(``weight_ih_l0``, ..., ``*_reverse`` for the backward direction, ``*_l1``
for a second layer), so ``module.load_state_dict(torch_lstm.state_dict())``
works. Several layers (``num_layers``, with ``dropout`` between them in train
mode) run as one fused kernel over a sequence; one step takes one layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .. import trace as _trace
from ..dims import Dim
from ..errors import DimError, entry_methods
from ..module import Module, Parameter, check_setting, is_positive_int, is_probability, static_dims
from ..ops.rnn import gru_cell, lstm_cell, lstm_cell_gates, rnn_sequence
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

    def __init__(self, in_dim: Dim, out_dim: Dim, *, bidirectional: bool = False, num_layers: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        static_dims(type(self).__name__, in_dim=in_dim, out_dim=out_dim)
        if bidirectional and out_dim.size % 2:
            raise DimError(f"a bidirectional {type(self).__name__} needs an even out dim (the two directions "
                           f"concatenated), got {out_dim!r}")
        check_setting(type(self).__name__, "num_layers", num_layers, is_positive_int(num_layers), "a positive int")
        check_setting(type(self).__name__, "dropout", dropout, is_probability(dropout), "a probability in [0, 1)")
        self.in_dim, self.out_dim, self.bidirectional = in_dim, out_dim, bidirectional
        self.num_layers, self.dropout = num_layers, float(dropout)
        #: The dim of one direction's hidden state (`out_dim` unless bidirectional).
        self.hidden = out_dim if not bidirectional else Dim(f"{out_dim.name}/dir", out_dim.size // 2)
        if bidirectional:
            # the output of both directions concatenated is `out_dim`
            (self.hidden * 2).declare_same_as(out_dim)
        #: The dim of the gates stacked (``hidden * 4`` for an LSTM, ``* 3`` for a GRU): the weights' first dim.
        self.gates = gates = self.hidden * self._gates
        bound = 1.0 / math.sqrt(self.hidden.size)
        init = lambda t: t.uniform_(-bound, bound)  # noqa: E731 - as torch.nn.LSTM
        for layer in range(num_layers):
            layer_in = in_dim if layer == 0 else out_dim
            for suffix in (f"_l{layer}", f"_l{layer}_reverse") if bidirectional else (f"_l{layer}",):
                setattr(self, f"weight_ih{suffix}", Parameter((gates, layer_in), init=init))
                setattr(self, f"weight_hh{suffix}", Parameter((gates, self.hidden), init=init))
                setattr(self, f"bias_ih{suffix}", Parameter((gates,), init=init))
                setattr(self, f"bias_hh{suffix}", Parameter((gates,), init=init))

    def _weights(self, reverse: bool = False, layer: int = 0) -> list[Tensor]:
        suffix = f"_l{layer}_reverse" if reverse else f"_l{layer}"
        return [getattr(self, f"{name}{suffix}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]

    def _all_weights(self) -> list[Tensor]:
        return [w for layer in range(self.num_layers) for reverse in ((False, True) if self.bidirectional
                                                                      else (False,))
                for w in self._weights(reverse, layer)]

    def _check_step(self, x) -> None:
        ctx = _trace.tracing()
        sequence = [d for d in getattr(x, "dims", ()) if d.is_dynamic]
        if ctx is not None and not ctx.loops and sequence:
            raise DimError(f"{type(self).__name__}: one step on the {x.describe()}, outside any loop, would take "
                           f"{', '.join(repr(d.name) for d in sequence)} as a batch dim; pass axis=... to run over "
                           f"the sequence (or step it inside a looplift.Loop on loop.unstack(x))")
        if self.bidirectional:
            raise DimError(f"a bidirectional {type(self).__name__} runs over a whole sequence; pass axis=...")
        if self.num_layers > 1:
            raise DimError(f"a {type(self).__name__} of {self.num_layers} layers runs over a whole sequence; "
                           f"pass axis=... (or step one single-layer module per layer)")

    def _sequence(self, x: Tensor, axis: Dim, layer_states: list[list[Tensor]]) -> tuple[Tensor, list]:
        """The fused kernel over `axis`; `layer_states`: per layer, the flat initial states of its
        directions. Returns the output and the flat final states per layer."""
        out, *finals = rnn_sequence(self._kind, x, [s for states in layer_states for s in states],
                                    self._all_weights(), axis=axis, in_dim=self.in_dim, hidden=self.hidden,
                                    bidirectional=self.bidirectional, num_layers=self.num_layers,
                                    dropout=self.dropout)
        n = len(finals) // self.num_layers
        return out, [finals[i:i + n] for i in range(0, len(finals), n)]

    def _layer_states(self, state, flat_of) -> list[list[Tensor]]:
        """The initial states per layer: `state` is one layer's (None: zeros), or with several layers a
        sequence of them, one per layer."""
        if self.num_layers == 1:
            return [flat_of(state)]
        if state is None:
            return [flat_of(None)] * self.num_layers
        if not isinstance(state, (tuple, list)) or len(state) != self.num_layers:
            raise DimError(f"a {type(self).__name__} of {self.num_layers} layers takes its initial state as a "
                           f"sequence of {self.num_layers} states, one per layer")
        return [flat_of(s) for s in state]

    def _finals(self, per_layer: list, structure):
        states = [structure(flat) for flat in per_layer]
        return states[0] if self.num_layers == 1 else tuple(states)


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

    def step_from_gates(self, gates: Tensor, state: LstmState | tuple | None = None, *, bias: bool = True):
        """One step whose input's projection ``x @ weight_ih^T`` (over :attr:`gates`) was made elsewhere:
        ``out, new_state`` as ``lstm(x, state=state)`` gives (:func:`looplift.ops.rnn.lstm_cell_gates`).

        A projection can be cheaper made elsewhere: of an attention context ``sum_s a_s e_s``, it is
        ``sum_s a_s (W e_s)``, with ``W e_s`` made once per frame before the loop, not once per step.
        ``bias=False``: `gates` hold the biases ``bias_ih + bias_hh`` already (added once, to a projection made
        before the loop, say), and the step adds none.
        """
        if isinstance(state, tuple):
            state = LstmState(*state)
        self._check_step(gates)
        state = state if state is not None else self.default_initial_state()
        weight_hh, bias_ih, bias_hh = self._weights()[1:]
        h, c = lstm_cell_gates(gates, (state.h, state.c), (weight_hh, bias_ih, bias_hh), hidden=self.hidden,
                               bias=bias)
        return h, LstmState(h, c)

    def forward(self, x: Tensor, state: LstmState | tuple | None = None, *, axis: Dim | None = None):
        if isinstance(state, tuple) and not self.bidirectional and self.num_layers == 1:
            state = LstmState(*state)  # (h, c)
        if axis is None:
            self._check_step(x)
            state = state if state is not None else self.default_initial_state()
            h, c = lstm_cell(x, (state.h, state.c), self._weights(), in_dim=self.in_dim, hidden=self.hidden)
            return h, LstmState(h, c)

        def flat_of(state):
            if state is None:
                return [zeros([self.hidden])] * (4 if self.bidirectional else 2)
            if self.bidirectional:
                return [state[0].h, state[0].c, state[1].h, state[1].c]
            state = LstmState(*state) if isinstance(state, tuple) else state
            return [state.h, state.c]

        def structure(finals):
            states = [LstmState(finals[i], finals[i + 1]) for i in range(0, len(finals), 2)]
            return tuple(states) if self.bidirectional else states[0]

        out, per_layer = self._sequence(x, axis, self._layer_states(state, flat_of))
        return out, self._finals(per_layer, structure)


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

    def forward(self, x: Tensor, state: Tensor | tuple | None = None, *, axis: Dim | None = None):
        if axis is None:
            self._check_step(x)
            h = gru_cell(x, state if state is not None else self.default_initial_state(), self._weights(),
                         in_dim=self.in_dim, hidden=self.hidden)
            return h, h

        def flat_of(state):
            if state is None:
                return [zeros([self.hidden])] * (2 if self.bidirectional else 1)
            return list(state) if self.bidirectional else [state]

        out, per_layer = self._sequence(x, axis, self._layer_states(state, flat_of))
        return out, self._finals(per_layer, lambda f: tuple(f) if self.bidirectional else f[0])


entry_methods(LSTM, "forward", "step_from_gates", public="looplift.nn.LSTM")
entry_methods(GRU, "forward", public="looplift.nn.GRU")
entry_methods(_RNN, "__init__", public="looplift.nn.LSTM/GRU")
