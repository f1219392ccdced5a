"""Recurrent cells: one step (``lstm_cell``, ``gru_cell``; ``lstm_cell_gates`` from the input's projection
made elsewhere) and a whole sequence (``rnn_sequence``).

Parameters are in ``torch.nn.LSTM`` / ``torch.nn.GRU`` layout, gates stacked
along a ``hidden * 4`` (or ``* 3``) dim. The sequence form runs PyTorch's fused
kernel on a packed sequence, so each entry's final state is the state at its
own last frame and the backward direction of a bidirectional RNN starts at
each entry's own end; padding frames never take part. On CPU, long sequences
of different lengths whose LSTM cell states nobody reads run over the padded
batch instead, one layer and direction at a time, each entry's frames
reversed in place for the backward direction: the same results (padding
zeroed first, after an entry's frames in both directions), the same dropout
masks, and on CPU much faster than packing (see :data:`PADDED_MIN_STEPS`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .. import rules as _rules
from .. import trace as _trace
from .._align import aligner, broadcast_shapes
from ..dims import Dim
from ..errors import DimError, DTypeError
from ..tensor import Tensor
from ._core import as_tensor, broadcast_dims, check_has, emit_many, nonfinite_padding
from .shape import expand_for_masks

__all__ = ["lstm_cell", "lstm_cell_gates", "gru_cell", "rnn_sequence"]


def _check_float(op: str, x: Tensor, weight: Tensor) -> None:
    if not x.dtype.is_floating_point or x.dtype != weight.dtype:
        raise DTypeError(f"{op}: the input {x.describe()} must be floating point with the weights' dtype "
                         f"{weight.dtype}")


def _cell(kind: str, x, state: Sequence, weights: Sequence, in_dim: Dim, hidden: Dim) -> list[Tensor]:
    x = as_tensor(x)
    state = [as_tensor(s) for s in state]
    weights = [as_tensor(w) for w in weights]
    check_has(x, (in_dim,), kind, "in dim")
    for s in state:
        check_has(s, (hidden,), kind, "hidden dim")
    _check_float(kind, x, weights[0])
    batch = broadcast_dims(kind, tuple(d for d in x.dims if d is not in_dim),
                           *(tuple(d for d in s.dims if d is not hidden) for s in state))
    x_al = aligner(x.dims, batch + (in_dim,))
    s_al = [aligner(s.dims, batch + (hidden,)) for s in state]
    n = len(batch)
    cell = torch.lstm_cell if kind == "lstm_cell" else torch.gru_cell

    def kernel(env, v, *rest):
        states, ws = rest[:len(s_al)], rest[len(s_al):]
        v = x_al(v)
        states = [al(s) for al, s in zip(s_al, states)]
        if n == 1 and v.dim() == 2:
            rows = v.shape[0]
            for s in states:
                if s.dim() != 2 or s.shape[0] != rows:
                    break
            else:
                return cell(v, tuple(states) if len(states) > 1 else states[0], *ws)   # (the shapes agree already)
        shape = broadcast_shapes(v.shape[:n], *(s.shape[:n] for s in states))
        flat = math.prod(shape)
        v = v.expand(*shape, v.shape[-1]).reshape(flat, v.shape[-1])
        states = [s.expand(*shape, s.shape[-1]).reshape(flat, s.shape[-1]) for s in states]
        out = cell(v, tuple(states) if len(states) > 1 else states[0], *ws)
        outs = out if isinstance(out, tuple) else (out,)
        result = tuple(o.reshape(*shape, o.shape[-1]) for o in outs)
        return result if len(result) > 1 else result[0]

    outputs = [(batch + (hidden,), x.dtype, None)] * len(state)
    return emit_many(kind, (x, *state, *weights), kernel, outputs,
                     attrs={"in_dim": in_dim.name, "hidden": hidden.name},
                     nonfinite_padding=nonfinite_padding(x, *state, *weights, dims=batch + (hidden,)))


def lstm_cell(x, state: tuple, weights: Sequence, *, in_dim: Dim, hidden: Dim) -> tuple[Tensor, Tensor]:
    """One LSTM step: ``(h, c)`` from input `x` and ``state = (h, c)``.

    `weights` are ``(weight_ih, weight_hh, bias_ih, bias_hh)`` over
    ``(hidden*4, in_dim)``, ``(hidden*4, hidden)``, ``(hidden*4,)``, ``(hidden*4,)``.
    """
    h, c = _cell("lstm_cell", x, state, weights, in_dim, hidden)
    return h, c


def lstm_cell_gates(gates, state: tuple, weights: Sequence, *, hidden: Dim, bias: bool = True) -> tuple[Tensor, Tensor]:
    """One LSTM step from its input's projection made elsewhere: ``(h, c)``, as :func:`lstm_cell` gives for an
    input `x` whose ``x @ weight_ih^T`` is `gates` (over ``hidden*4``, torch's gate order i, f, g, o).

    `weights` are ``(weight_hh, bias_ih, bias_hh)``. A projection may be cheaper made elsewhere: for every
    frame at once before a loop, or, for an attention context ``sum_s a_s e_s``, as ``sum_s a_s (W e_s)``
    with ``W e_s`` made once per frame. ``bias=False``: `gates` include ``bias_ih + bias_hh`` already.
    """
    gates, (h, c) = as_tensor(gates), (as_tensor(state[0]), as_tensor(state[1]))
    weight_hh, bias_ih, bias_hh = (as_tensor(w) for w in weights)
    others = [d for d in weight_hh.dims if d != hidden]
    gate_dim = others[0] if len(others) == 1 and len(weight_hh.dims) == 2 else None
    if gate_dim is None or gate_dim.size != hidden.size * 4:
        raise DimError(f"lstm_cell_gates: weight_hh must be over (hidden*4, hidden) with hidden {hidden!r}, got "
                       f"the {weight_hh.describe()}")
    check_has(gates, (gate_dim,), "lstm_cell_gates", "gate dim")
    for s in (h, c):
        check_has(s, (hidden,), "lstm_cell_gates", "hidden dim")
    _check_float("lstm_cell_gates", gates, weight_hh)
    batch = broadcast_dims("lstm_cell_gates", tuple(d for d in gates.dims if d != gate_dim),
                           *(tuple(d for d in s.dims if d != hidden) for s in (h, c)))
    g_al = aligner(gates.dims, batch + (gate_dim,))
    h_al, c_al = (aligner(s.dims, batch + (hidden,)) for s in (h, c))
    n = len(batch)

    def kernel(env, g, hv, cv, w_hh, b_ih, b_hh, *, own_gates: bool = False):
        g, hv, cv = g_al(g), h_al(hv), c_al(cv)
        shape = broadcast_shapes(g.shape[:n], hv.shape[:n], cv.shape[:n])
        flat = math.prod(shape)
        own_gates = own_gates and tuple(g.shape[:n]) == tuple(shape)   # (not broadcast: its own rows)
        g = g.expand(*shape, g.shape[-1]).reshape(flat, g.shape[-1])
        hv = hv.expand(*shape, hv.shape[-1]).reshape(flat, hv.shape[-1])
        cv = cv.expand(*shape, cv.shape[-1]).reshape(flat, cv.shape[-1])
        grads = torch.is_grad_enabled() and any(t.requires_grad for t in (g, hv, cv, w_hh, b_ih, b_hh))
        if own_gates and not grads:   # (the gates are this kernel's to overwrite: no copy of them)
            g = (g if not bias else g.add_(b_ih + b_hh)).addmm_(hv, w_hh.t())
        elif not bias:   # (the gates hold the biases already)
            g = torch.addmm(g, hv, w_hh.t())
        elif grads:
            g = torch.addmm(g + (b_ih + b_hh), hv, w_hh.t())   # (the gates, as torch.lstm_cell sums them)
        else:   # (in place on one new tensor: each new [rows, 4 * hidden] is one more pass over memory)
            g = torch.add(g, b_ih + b_hh).addmm_(hv, w_hh.t())
        # tanh(x) = 2 sigmoid(2x) - 1: one sigmoid over all four gates (on CPU, tanh costs ~3 sigmoids)
        size = g.shape[1] // 4
        g[:, 2 * size:3 * size].mul_(2.0)
        i, f, cand, o = (torch.sigmoid(g) if grads else g.sigmoid_()).chunk(4, 1)
        if grads:
            c_new = torch.addcmul(f * cv, i, cand * 2.0 - 1.0)
            h_new = o * (torch.sigmoid(c_new * 2.0) * 2.0 - 1.0)
        else:   # (the same arithmetic, in the gates' own memory where it can: two new tensors, not nine)
            c_new = torch.addcmul(f.mul_(cv), i, cand.mul_(2.0).sub_(1.0))
            h_new = torch.mul(c_new, 2.0).sigmoid_().mul_(2.0).sub_(1.0).mul_(o)
        return h_new.reshape(*shape, -1), c_new.reshape(*shape, -1)

    # (an executor whose gates are a new tensor that nothing else reads gives them to the kernel to overwrite)
    kernel.for_owned = lambda owned: functools.partial(kernel, own_gates=True) if owned[0] else kernel
    outputs = [(batch + (hidden,), gates.dtype, None)] * 2
    inputs = (gates, h, c, weight_hh, bias_ih, bias_hh)
    h, c = emit_many("lstm_cell_gates", inputs, kernel, outputs, attrs={"hidden": hidden.name, "bias": bias},
                     nonfinite_padding=nonfinite_padding(*inputs, dims=batch + (hidden,)))
    return h, c


def gru_cell(x, h, weights: Sequence, *, in_dim: Dim, hidden: Dim) -> Tensor:
    """One GRU step: the new `h` from input `x` and the previous `h` (weights as for :func:`lstm_cell`, * 3)."""
    (out,) = _cell("gru_cell", x, (h,), weights, in_dim, hidden)
    return out


def rnn_sequence(kind: str, x, initial: Sequence, weights: Sequence, *, axis: Dim, in_dim: Dim, hidden: Dim,
                 bidirectional: bool = False, num_layers: int = 1, dropout: float = 0.0) -> list[Tensor]:
    """An LSTM (`kind` "lstm") or GRU ("gru") over the dim `axis` of `x`, with PyTorch's fused kernel.

    `initial` are the initial ``(h, c)`` (LSTM) or ``(h,)`` (GRU) over
    ``batch dims + (hidden,)``, one per layer and direction (layer by layer,
    forward then reverse). `weights` are the flat list of a
    ``torch.nn.LSTM``/``GRU`` with `num_layers` layers, in its order.
    `dropout` applies to the outputs of all layers but the last, in train mode
    only (as ``torch.nn.LSTM``). Returns the output over ``batch dims + (axis,
    directions * hidden)`` (as `hidden` or, bidirectional, a new dim of twice
    its size: see the module), then the final states in the order of `initial`.
    """
    x = as_tensor(x)
    initial = [as_tensor(s) for s in initial]
    weights = [as_tensor(w) for w in weights]
    check_has(x, (axis, in_dim), kind)
    if axis.is_static is False and not axis.is_dynamic:
        raise DimError(f"{kind}: cannot run over the batch-like dim {axis!r}")
    _check_float(kind, x, weights[0])
    x = expand_for_masks(x, (axis,) if axis.is_dynamic else ())
    batch = broadcast_dims(kind, tuple(d for d in x.dims if d not in (axis, in_dim)),
                           *(tuple(d for d in s.dims if d is not hidden) for s in initial))
    x_al = aligner(x.dims, (axis,) + batch + (in_dim,))
    s_al = [aligner(s.dims, batch + (hidden,)) for s in initial]
    n_dirs = 2 if bidirectional else 1
    per_dir = len(initial) // (n_dirs * num_layers)
    drop = float(dropout) if _trace.is_training() and num_layers > 1 else 0.0
    len_al = aligner(_trace.length_dims(axis), batch) if axis.is_dynamic else None
    out_dim = hidden if not bidirectional else hidden * 2
    n = len(batch)
    fn = torch._VF.lstm if kind == "lstm" else torch._VF.gru

    def kernel(env, v, *rest, c_finals: bool = True):
        states, ws = rest[:len(s_al)], list(rest[len(s_al):])
        v = x_al(v)
        states = [al(s) for al, s in zip(s_al, states)]
        steps = v.shape[0]
        shape = broadcast_shapes(v.shape[1:1 + n], *(s.shape[:n] for s in states))
        flat = math.prod(shape)
        v = v.expand(steps, *shape, v.shape[-1]).reshape(steps, flat, v.shape[-1])
        states = [s.expand(*shape, s.shape[-1]).reshape(flat, s.shape[-1]) for s in states]
        if len_al is not None:
            lengths = len_al(env.lengths(axis)).expand(shape).reshape(flat)
        else:
            lengths = torch.full((flat,), steps, dtype=torch.int64)
        if steps == 0 or flat == 0:  # no frames or no entries (nothing to pack): the initial states are final
            return (v.new_zeros(steps, *shape, n_dirs * hidden.size), *(s.reshape(*shape, s.shape[-1]) for s in states))
        # (captured by Program.to_fx, the padded kernel wherever it is exact: packing reads the lengths back)
        exporting = torch.compiler.is_exporting() and drop == 0
        if len_al is not None and (kind == "gru" or not c_finals) and (exporting or (
                v.device.type == "cpu" and steps >= PADDED_MIN_STEPS and not bool((lengths == steps).all()))):
            out, *finals = _padded(fn, kind, v, states, ws, lengths, num_layers=num_layers, dirs=n_dirs, drop=drop,
                                   per_dir=per_dir, hidden=hidden.size)
            return (out.reshape(steps, *shape, out.shape[-1]),
                    *(f if f is None else f.reshape(*shape, f.shape[-1]) for f in finals))
        lengths = lengths.cpu()   # (packing takes them on the CPU)
        empty = None
        if len_al is not None and bool((lengths == 0).any()):
            empty = (lengths == 0).to(v.device).view(1, flat, 1)
            # An empty sequence runs one frame (packing needs one), whose result is discarded below; zeros
            # there, so that its padding (NaN, say) never reaches the gradients as 0 * NaN.
            v = v.masked_fill(empty, 0)
        packed = pack_padded_sequence(v, lengths.clamp(min=1), enforce_sorted=False)
        order, unorder = packed.sorted_indices, packed.unsorted_indices
        hx = [torch.stack(states[k::per_dir], 0).index_select(1, order) for k in range(per_dir)]
        out, *finals = fn(packed.data, packed.batch_sizes, hx if kind == "lstm" else hx[0], ws, True, num_layers,
                          drop, drop > 0 or torch.is_grad_enabled(), bidirectional)   # (cuDNN: a backward needs train)
        out, _ = pad_packed_sequence(type(packed)(out, packed.batch_sizes, order, unorder), total_length=steps)
        if empty is not None:   # (the output is zero in the padding: an empty entry's one frame too)
            out = out.masked_fill(empty, 0)
        results = [out.reshape(steps, *shape, out.shape[-1])]
        finals = [f.index_select(1, unorder) for f in finals]
        for d in range(num_layers * n_dirs):
            for k in range(per_dir):
                final = finals[k][d]
                if empty is not None:
                    final = torch.where(empty[0], states[d * per_dir + k], final)
                results.append(final.reshape(*shape, final.shape[-1]))
        return tuple(results)

    # (an executor that reads no LSTM cell state of the results runs the kernel that may skip packing)
    kernel.for_outputs = lambda used: (kernel if kind != "lstm" or any(used[2::2])
                                       else functools.partial(kernel, c_finals=False))
    outputs = [((axis,) + batch + (out_dim,), x.dtype, None)]
    outputs += [(batch + (hidden,), x.dtype, None)] * len(initial)
    # (the output is zero in the padding of `axis`, as pad_packed_sequence leaves it: a dot over it need not
    # mask it; the final states have no `axis`; an entry's frames never meet its padding frames)
    finite = nonfinite_padding(x, *initial, *weights, dims=(axis,) + batch, cleared=(axis,))
    return emit_many(f"{kind}_sequence", (x, *initial, *weights), kernel, outputs, nonfinite_padding=finite,
                     attrs={"axis": axis.name, "in_dim": in_dim.name, "hidden": hidden.name,
                            "bidirectional": bidirectional, "num_layers": num_layers, "dropout": drop},
                     random=drop > 0, zero_padding=(axis,) if axis.is_dynamic else ())


#: Entries of different lengths, on CPU: from this many frames on, the fused kernel runs over the padded batch
#: (each entry's reverse direction over its frames reversed in place) rather than a packed one. (On GPU the
#: packed kernel stays: cuDNN draws its own dropout masks and takes all layers in one call.) On CPU the packed
#: kernel is much slower once lengths differ (a 2-layer BiLSTM 128 x 2, batch 32, 100 frames of 90-100, forward
#: + backward: 450-640 ms packed, 300-330 ms padded; all 100: 300-340 ms both); for short sequences (10 frames,
#: batch 256) packed is as fast or faster.
PADDED_MIN_STEPS = 32


def _padded(fn, kind: str, v: torch.Tensor, states: list, ws: list, lengths: torch.Tensor, *, num_layers: int,
            dirs: int, drop: float, per_dir: int, hidden: int) -> list:
    """The fused kernel over the padded ``v`` (steps, entries, features), one layer and direction at a time:
    the output and the final states of each entry at its own length, exactly as over a packed sequence (the
    padding frames, zeroed, come after an entry's frames in both directions, so they never reach them).
    The LSTM's final cell states are not computed (None): the caller reads none."""
    steps, flat = v.shape[0], v.shape[1]
    lengths = lengths.to(v.device)
    t = torch.arange(steps, device=v.device)[:, None]
    valid = t < lengths
    # (zeros in the padding: a NaN there would reach the gradients of the frames before it as 0 * NaN)
    x = v.masked_fill(~valid[..., None], 0)
    flip = torch.where(valid, lengths - 1 - t, t)[..., None] if dirs == 2 else None   # (its own inverse)
    last = (lengths - 1).clamp(min=0).view(1, flat, 1).expand(1, flat, hidden)
    if torch.compiler.is_exporting():
        empty = (lengths == 0)[:, None]   # (no lengths read back: the empty entries' initial states taken always)
    else:
        empty = None if bool((lengths > 0).all()) else (lengths == 0)[:, None]
    finals: list = []
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            hx = [s[None] for s in states[k * per_dir:(k + 1) * per_dir]]
            inp = x if d == 0 else x.gather(0, flip.expand(steps, flat, x.shape[-1]))
            out, *_ = fn(inp, hx if kind == "lstm" else hx[0], ws[4 * k:4 * k + 4], True, 1, 0.0, False, False,
                         False)
            h = out.gather(0, last)[0]
            if empty is not None:
                h = torch.where(empty, hx[0][0], h)
            finals += [h, None] if kind == "lstm" else [h]
            outs.append(out if d == 0 else out.gather(0, flip.expand(steps, flat, hidden)))
        x = torch.cat(outs, -1) if dirs == 2 else outs[0]
        if drop > 0 and layer < num_layers - 1:
            x = x * _packed_dropout(lengths, x.shape[-1], drop, x)
    return [x.masked_fill(~valid[..., None], 0), *finals]


def _packed_dropout(lengths: torch.Tensor, size: int, p: float, like: torch.Tensor) -> torch.Tensor:
    """The dropout mask (scaled) the packed kernel draws between two layers, over (steps, entries, `size`):
    drawn as it draws it, over the frames in packed order (an empty entry's one frame included), so a seed
    gives the same masks either way."""
    steps, flat = like.shape[0], like.shape[1]
    where = torch.arange(steps * flat, device=like.device).view(steps, flat)
    order = pack_padded_sequence(where, lengths.cpu().clamp(min=1), enforce_sorted=False).data
    mask = like.new_zeros(steps * flat, size)
    mask[order] = torch.nn.functional.dropout(like.new_ones(len(order), size), p, training=True)
    return mask.view(steps, flat, size)


for _name in __all__:  # every public op records its calls, so passes can replay them
    globals()[_name] = _trace.replayable(globals()[_name])


def _lstm_over_sequence(args: dict, carried: str, axis: Dim):
    h0, c0 = args["state"]
    out, h_final, c_final = rnn_sequence("lstm", args["x"], (h0, c0), args["weights"], axis=axis,
                                         in_dim=args["in_dim"], hidden=args["hidden"])
    return [out, None], [h_final, c_final]


def _gru_over_sequence(args: dict, carried: str, axis: Dim):
    out, h_final = rnn_sequence("gru", args["x"], (args["h"],), args["weights"], axis=axis,
                                in_dim=args["in_dim"], hidden=args["hidden"])
    return [out], [None]


# In a loop, an LSTM/GRU step whose state is its own previous output runs as PyTorch's fused kernel over
# the whole sequence. The LSTM's cell state exists only as a final value there (the fused kernel does not
# return it per step), so that form applies when nothing else reads the cell state and the loop has no end.
_rules.sequence_form(lstm_cell, _rules.SequenceForm(
    carried=("state",), invariant=("weights",), sequences=(True, False), run=_lstm_over_sequence,
    finals_ignore_end=True, name="fused LSTM over the sequence"))
_rules.sequence_form(gru_cell, _rules.SequenceForm(
    carried=("h",), invariant=("weights",), sequences=(True,), run=_gru_over_sequence,
    name="fused GRU over the sequence"))
