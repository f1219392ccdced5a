"""``looplift.nn.LSTM`` and ``looplift.nn.GRU`` against ``torch.nn.LSTM`` / ``GRU`` / ``LSTMCell`` / ``GRUCell``.

The weights are copied with ``load_state_dict`` in both directions. In
sequence mode, every entry of a padded batch of sequences of different lengths
must give what torch gives for that sequence run alone: the outputs at its
valid frames and its final state (a sequence of length 0 keeps its initial
state). In step mode, one call is one ``torch.nn.LSTMCell`` / ``GRUCell``
step, and stepping through a ``looplift.Loop`` gives what sequence mode gives.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import looplift as ll
from looplift.errors import DimError
from looplift.nn.rnn import LstmState

B = ll.batch_dim
T = ll.Dim("time")
F = ll.Dim("feat", 3)
H = ll.Dim("hidden", 4)
OUT2 = ll.Dim("out", 8)  # both directions of a bidirectional RNN with 4 units each

KINDS = ("lstm", "gru")


@pytest.fixture(autouse=True, params=["packed", "padded"])
def sequence_kernel(request, monkeypatch):
    """Every test runs the sequence form both ways: over packed sequences, and over the padded batch (as
    sequences of many frames of different lengths run when no LSTM cell state is read)."""
    from looplift.ops import rnn
    monkeypatch.setattr(rnn, "PADDED_MIN_STEPS", 10**9 if request.param == "packed" else 1)
    return request.param
DTYPES = (torch.float32, torch.float64)
LENGTHS = torch.tensor([5, 2, 4])


def make(kind: str, *, bidirectional: bool = False, dtype: torch.dtype = torch.float64, seed: int = 0):
    """A looplift module and the torch module it took its weights from."""
    torch.manual_seed(seed)
    torch_cls = torch.nn.LSTM if kind == "lstm" else torch.nn.GRU
    ll_cls = ll.nn.LSTM if kind == "lstm" else ll.nn.GRU
    ref = torch_cls(F.size, H.size, bidirectional=bidirectional).to(dtype)
    module = ll_cls(F, OUT2 if bidirectional else H, bidirectional=bidirectional).to(dtype)
    module.load_state_dict(ref.state_dict())
    return module, ref


def padded(lengths: torch.Tensor, dtype: torch.dtype, *, fill: float | None = None, seed: int = 1) -> torch.Tensor:
    """Random features over (batch, time, feat); the padding holds `fill` if given."""
    torch.manual_seed(seed)
    x = torch.randn(len(lengths), int(lengths.max()), F.size, dtype=dtype)
    if fill is not None:
        x = x.masked_fill(~valid(lengths, x.shape[1])[:, :, None], fill)
    return x


def valid(lengths: torch.Tensor, frames: int) -> torch.Tensor:
    return torch.arange(frames)[None, :] < lengths[:, None]


def sequence_program(module):
    """A program running `module` over T; returns the output and the final state leaves per direction
    (``[(h, c), ...]`` for an LSTM, ``[(h,), ...]`` for a GRU). ``h0``/``c0``: initial state per direction."""
    lstm = isinstance(module, ll.nn.LSTM)

    def model(x, h0=None, c0=None):
        state = None
        if h0 is not None:
            per_dir = [LstmState(h, c) for h, c in zip(h0, c0)] if lstm else list(h0)
            state = tuple(per_dir) if module.bidirectional else per_dir[0]
        out, final = module(x, axis=T, state=state)
        finals = final if module.bidirectional else (final,)
        return out, [(s.h, s.c) if lstm else (s,) for s in finals]

    return ll.compile(model, mode="eval")


def run_sequence(module, x: torch.Tensor, lengths: torch.Tensor, h0=None, c0=None):
    """Run sequence mode; returns the output over (batch, time, out) and the final states as
    ``[direction][leaf]`` tensors over (batch, hidden). ``h0``/``c0``: (directions, batch, hidden)."""
    def state(s):
        return None if s is None else tuple(ll.Named(s[d], (B, module.hidden)) for d in range(len(s)))

    out, finals = sequence_program(module)(ll.Named(x, (B, T, F), {T: lengths}), state(h0), state(c0))
    assert out.lengths[T] is not None and torch.equal(out.lengths[T], lengths)
    return out.align(B, T, module.out_dim), [[leaf.align(B, module.hidden) for leaf in d] for d in finals]


def torch_alone(ref, x: torch.Tensor, n: int, h0=None, c0=None):
    """torch on the first `n` frames of one sequence x (time, feat); returns the output (n, out) and the final
    states as ``[direction][leaf]`` tensors over (hidden,). ``h0``/``c0``: (directions, hidden)."""
    dirs = 2 if ref.bidirectional else 1
    lstm = isinstance(ref, torch.nn.LSTM)
    h0 = torch.zeros(dirs, H.size, dtype=x.dtype) if h0 is None else h0
    c0 = torch.zeros(dirs, H.size, dtype=x.dtype) if c0 is None else c0
    if n == 0:
        return x.new_zeros(0, dirs * H.size), [[h0[d], c0[d]] if lstm else [h0[d]] for d in range(dirs)]
    out, final = ref(x[:n, None], (h0[:, None], c0[:, None]) if lstm else h0[:, None])
    leaves = list(final) if lstm else [final]
    return out[:, 0], [[leaf[d, 0] for leaf in leaves] for d in range(dirs)]


def assert_matches_torch_alone(module, ref, x, lengths, h0=None, c0=None):
    out, finals = run_sequence(module, x, lengths, h0, c0)
    for b, n in enumerate(lengths.tolist()):
        ref_out, ref_finals = torch_alone(ref, x[b], n, *(None if s is None else s[:, b] for s in (h0, c0)))
        torch.testing.assert_close(out[b, :n], ref_out)
        for d, ref_leaves in enumerate(ref_finals):
            for leaf, ref_leaf in zip(finals[d], ref_leaves):
                torch.testing.assert_close(leaf[b], ref_leaf)


# -- sequence mode -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", KINDS)
def test_sequence_mode_equals_torch_on_each_sequence_alone(kind, bidirectional, dtype):
    module, ref = make(kind, bidirectional=bidirectional, dtype=dtype)
    assert_matches_torch_alone(module, ref, padded(LENGTHS, dtype), LENGTHS)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", KINDS)
def test_sequence_mode_with_a_given_initial_state_equals_torch(kind, bidirectional):
    module, ref = make(kind, bidirectional=bidirectional)
    dirs = 2 if bidirectional else 1
    h0 = torch.randn(dirs, len(LENGTHS), H.size, dtype=torch.float64)
    c0 = torch.randn(dirs, len(LENGTHS), H.size, dtype=torch.float64)
    assert_matches_torch_alone(module, ref, padded(LENGTHS, torch.float64), LENGTHS, h0, c0)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_sequence_of_length_zero_keeps_its_initial_state(kind, bidirectional):
    module, ref = make(kind, bidirectional=bidirectional)
    lengths = torch.tensor([3, 0, 2])
    dirs = 2 if bidirectional else 1
    h0 = torch.randn(dirs, len(lengths), H.size, dtype=torch.float64)
    c0 = torch.randn(dirs, len(lengths), H.size, dtype=torch.float64)
    _, finals = run_sequence(module, padded(lengths, torch.float64), lengths, h0, c0)
    for d in range(dirs):
        torch.testing.assert_close(finals[d][0][1], h0[d, 1], rtol=0, atol=0)
        if kind == "lstm":
            torch.testing.assert_close(finals[d][1][1], c0[d, 1], rtol=0, atol=0)
    assert_matches_torch_alone(module, ref, padded(lengths, torch.float64), lengths, h0, c0)


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_without_frames_keeps_the_initial_states(kind):
    module, _ = make(kind, bidirectional=True)
    lengths = torch.tensor([0, 0])
    h0, c0 = torch.randn(2, 2, H.size, dtype=torch.float64), torch.randn(2, 2, H.size, dtype=torch.float64)
    out, finals = run_sequence(module, torch.zeros(2, 0, F.size, dtype=torch.float64), lengths, h0, c0)
    assert out.shape == (2, 0, OUT2.size)
    for d in range(2):
        assert torch.equal(finals[d][0], h0[d])
        if kind == "lstm":
            assert torch.equal(finals[d][1], c0[d])


@pytest.mark.parametrize("kind", KINDS)
def test_a_sequence_of_length_zero_with_the_default_state_ends_at_zeros(kind):
    module, _ = make(kind, bidirectional=True)
    lengths = torch.tensor([0, 3])
    _, finals = run_sequence(module, padded(lengths, torch.float64), lengths)
    for direction in finals:
        for leaf in direction:
            assert torch.equal(leaf[0], torch.zeros(H.size, dtype=torch.float64))


@pytest.mark.parametrize("lengths", [LENGTHS, torch.tensor([4, 0, 2])], ids=["nonempty", "with-empty"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", KINDS)
def test_padding_values_never_change_valid_outputs_or_final_states(kind, bidirectional, lengths):
    module, _ = make(kind, bidirectional=bidirectional)
    clean_out, clean_finals = run_sequence(module, padded(lengths, torch.float64, fill=0.0), lengths)
    mask = valid(lengths, clean_out.shape[1])
    for fill in (float("nan"), 1e6, float("inf")):
        out, finals = run_sequence(module, padded(lengths, torch.float64, fill=fill), lengths)
        assert torch.equal(out[mask], clean_out[mask]), fill
        for direction, clean_direction in zip(finals, clean_finals):
            for leaf, clean_leaf in zip(direction, clean_direction):
                assert torch.equal(leaf, clean_leaf), fill


@pytest.mark.parametrize("lengths", [LENGTHS, torch.tensor([4, 0, 2])], ids=["nonempty", "with-empty"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", KINDS)
def test_sequence_output_is_zero_in_the_padding_and_attention_needs_no_mask(kind, bidirectional, lengths):
    """The output over T is exactly 0 beyond each entry's length (an empty entry's included), whatever the
    input's padding holds. So attention over it (``dot(softmax(scores), out, reduce=T)``) masks neither
    operand (the trace has no clearing node), and still equals the attention computed in plain PyTorch on
    each entry's valid frames alone, values and gradients, with NaN in the input's padding."""
    module, _ = make(kind, bidirectional=bidirectional)
    for fill in (float("nan"), 1e6):
        out, _ = run_sequence(module, padded(lengths, torch.float64, fill=fill), lengths)
        mask = valid(lengths, out.shape[1])
        assert torch.equal(out[~mask], torch.zeros_like(out[~mask])), fill

    def attend(x, q):
        out, _ = module(x, axis=T)
        weights = ll.softmax(ll.dot(out, q, reduce=module.out_dim), axis=T)
        return ll.dot(weights, out, reduce=T)

    program = ll.compile(attend, mode="train")
    x = padded(lengths, torch.float64, fill=float("nan"))
    torch.manual_seed(4)
    q = torch.randn(len(lengths), module.out_dim.size, dtype=torch.float64, requires_grad=True)
    ctx = program(ll.Named(x, (B, T, F), {T: lengths}), ll.Named(q, (B, module.out_dim))).align(B, module.out_dim)
    assert "clear_padding" not in [n.op for n in program.traces[-1].graph.nodes]
    out, _ = run_sequence(module, x.nan_to_num(0.0), lengths)   # (valid frames: as with any padding)
    for b, n in enumerate(lengths.tolist()):
        if n == 0:
            assert torch.equal(ctx[b], torch.zeros_like(ctx[b]))
            continue
        frames = out[b, :n].detach()
        want = torch.softmax(frames @ q[b].detach(), 0) @ frames
        torch.testing.assert_close(ctx[b].detach(), want, rtol=1e-12, atol=1e-12)
    ctx.sum().backward()
    assert torch.isfinite(q.grad).all() and all(torch.isfinite(p.grad).all() for p in module.parameters())


# -- gradients -------------------------------------------------------------------------------

@pytest.mark.parametrize("lengths", [LENGTHS, torch.tensor([4, 0, 2])], ids=["nonempty", "with-empty"])
@pytest.mark.parametrize("fill", [0.0, float("nan")], ids=["zero-padding", "nan-padding"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_wrt_weights_input_and_initial_state_equal_torch(kind, bidirectional, fill, lengths):
    module, ref = make(kind, bidirectional=bidirectional)
    dirs = 2 if bidirectional else 1
    x = padded(lengths, torch.float64, fill=fill).requires_grad_()
    torch.manual_seed(2)
    h0 = torch.randn(dirs, len(lengths), H.size, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(dirs, len(lengths), H.size, dtype=torch.float64, requires_grad=kind == "lstm")
    mask = valid(lengths, x.shape[1])
    w_out = torch.randn(len(lengths), x.shape[1], module.out_dim.size, dtype=torch.float64)
    w_final = torch.randn(2, 2, len(lengths), H.size, dtype=torch.float64)  # [direction][leaf]

    out, finals = run_sequence(module, x, lengths, h0, c0)
    loss = torch.where(mask[:, :, None], out * w_out, 0.0).sum()
    for d, leaves in enumerate(finals):
        loss = loss + sum((leaf * w_final[d, k]).sum() for k, leaf in enumerate(leaves))
    loss.backward()

    x_ref, h0_ref, c0_ref = (v.detach().clone().requires_grad_() for v in (x, h0, c0))
    ref_loss = 0.0
    for b, n in enumerate(lengths.tolist()):
        ref_out, ref_finals = torch_alone(ref, x_ref[b], n, h0_ref[:, b], c0_ref[:, b])
        ref_loss = ref_loss + (ref_out * w_out[b, :n]).sum()
        for d, leaves in enumerate(ref_finals):
            ref_loss = ref_loss + sum((leaf * w_final[d, k, b]).sum() for k, leaf in enumerate(leaves))
    ref_loss.backward()

    torch.testing.assert_close(loss.detach(), ref_loss.detach())
    torch.testing.assert_close(x.grad[mask], x_ref.grad[mask])
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))
    torch.testing.assert_close(h0.grad, h0_ref.grad)
    if kind == "lstm":
        torch.testing.assert_close(c0.grad, c0_ref.grad)
    ref_params = dict(ref.named_parameters())
    for name, p in module.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref_params[name].grad, msg=name)


# -- step mode ---------------------------------------------------------------------------------

def cell_pair(kind: str, dtype: torch.dtype):
    """A looplift module with the weights of a torch.nn.LSTMCell / GRUCell (names with ``_l0``)."""
    torch.manual_seed(3)
    cell = (torch.nn.LSTMCell if kind == "lstm" else torch.nn.GRUCell)(F.size, H.size).to(dtype)
    module = (ll.nn.LSTM if kind == "lstm" else ll.nn.GRU)(F, H).to(dtype)
    module.load_state_dict({f"{name}_l0": v for name, v in cell.state_dict().items()})
    return module, cell


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lstm_step_equals_torch_lstm_cell(dtype):
    module, cell = cell_pair("lstm", dtype)

    def model(x, h, c):
        out, state = module(x, state=LstmState(h, c))
        return out, state.h, state.c

    torch.manual_seed(4)
    x, h, c = (torch.randn(3, n, dtype=dtype) for n in (F.size, H.size, H.size))
    out, new_h, new_c = ll.compile(model)(ll.Named(x, (B, F)), ll.Named(h, (B, H)), ll.Named(c, (B, H)))
    ref_h, ref_c = cell(x, (h, c))
    torch.testing.assert_close(out.align(B, H), ref_h)
    torch.testing.assert_close(new_h.align(B, H), ref_h)
    torch.testing.assert_close(new_c.align(B, H), ref_c)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_step_from_the_input_projection_equals_torch_lstm_cell_with_gradients(dtype):
    """``step_from_gates(x @ weight_ih^T)`` is the step ``lstm(x)``: values, and gradients into the weights,
    the projection and the state; a state without the batch dim broadcasts over it."""
    module, cell = cell_pair("lstm", dtype)
    gates = module.gates

    def model(x, h, c, h0):
        projected = ll.dot(x, module.weight_ih_l0, reduce=F)
        out, state = module.step_from_gates(projected, state=(h, c))
        first, _ = module.step_from_gates(projected, state=(h0, h0))   # (h0 over hidden only: broadcast)
        return out, state.c, first

    torch.manual_seed(4)
    x, h, c = (torch.randn(3, n, dtype=dtype, requires_grad=True) for n in (F.size, H.size, H.size))
    h0 = torch.randn(H.size, dtype=dtype)
    out, new_c, first = ll.compile(model)(ll.Named(x, (B, F)), ll.Named(h, (B, H)), ll.Named(c, (B, H)),
                                         ll.Named(h0, (H,)))
    ref_h, ref_c = cell(x, (h, c))
    ref_first, _ = cell(x, (h0.expand(3, -1), h0.expand(3, -1)))
    tol = {} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(out.align(B, H), ref_h, **tol)
    torch.testing.assert_close(new_c.align(B, H), ref_c, **tol)
    torch.testing.assert_close(first.align(B, H), ref_first, **tol)
    assert gates.size == 4 * H.size
    weights = [module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0]
    got = torch.autograd.grad((out.align(B, H) * 1.5 + new_c.align(B, H)).sum(), [x, h, c, *weights])
    want = torch.autograd.grad((ref_h * 1.5 + ref_c).sum(), [x, h, c, *cell.parameters()])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_a_step_from_gates_without_gradients_equals_torch_lstm_cell_and_leaves_its_inputs(grad_mode):
    """Without gradients the step works in place on a tensor of its own: the same values as torch.lstm_cell,
    and the gates and state it was given are left as they were (read again after it)."""
    module, cell = cell_pair("lstm", torch.float64)
    G = module.gates

    def model(gates, h, c):
        out, state = module.step_from_gates(gates, state=(h, c))
        return out, state.c, gates * 1.0, h * 1.0

    torch.manual_seed(5)
    x, h, c = (torch.randn(3, n, dtype=torch.float64) for n in (F.size, H.size, H.size))
    gates = x @ module.weight_ih_l0.detach().t()
    kept = [t.clone() for t in (gates, h, c)]
    with grad_mode():
        out, new_c, gates_after, h_after = ll.compile(model)(ll.Named(gates, (B, G)), ll.Named(h, (B, H)),
                                                             ll.Named(c, (B, H)))
        ref_h, ref_c = cell(x, (h, c))
    torch.testing.assert_close(out.align(B, H), ref_h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_c.align(B, H), ref_c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gates_after.align(B, G), kept[0], rtol=0, atol=0)
    torch.testing.assert_close(h_after.align(B, H), kept[1], rtol=0, atol=0)
    for t, k in zip((gates, h, c), kept):
        assert torch.equal(t, k)


@pytest.mark.parametrize("grad", [True, False])
def test_a_step_from_gates_that_hold_the_biases_equals_torch_lstm_cell(grad):
    """``step_from_gates(x @ weight_ih^T + b_ih + b_hh, bias=False)`` adds no biases: the step ``lstm(x)``,
    with gradients into the projection, the state and weight_hh, and without gradients."""
    module, cell = cell_pair("lstm", torch.float64)

    def model(x, h, c):
        projected = ll.dot(x, module.weight_ih_l0, reduce=F) + module.bias_ih_l0 + module.bias_hh_l0
        out, state = module.step_from_gates(projected, state=(h, c), bias=False)
        return out, state.c

    torch.manual_seed(6)
    x, h, c = (torch.randn(3, n, dtype=torch.float64, requires_grad=grad) for n in (F.size, H.size, H.size))
    with torch.set_grad_enabled(grad):
        out, new_c = ll.compile(model)(ll.Named(x, (B, F)), ll.Named(h, (B, H)), ll.Named(c, (B, H)))
        ref_h, ref_c = cell(x, (h, c))
    torch.testing.assert_close(out.align(B, H), ref_h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_c.align(B, H), ref_c, rtol=1e-12, atol=1e-12)
    if grad:
        weights = [module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0]
        got = torch.autograd.grad((out.align(B, H) * 1.5 + new_c.align(B, H)).sum(), [x, h, c, *weights])
        want = torch.autograd.grad((ref_h * 1.5 + ref_c).sum(), [x, h, c, *cell.parameters()])
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("read_again", [False, True])
def test_a_step_from_gates_overwrites_only_gates_that_nothing_else_reads(read_again):
    """Without gradients, gates that are a new sum which only the step reads are the step's to overwrite: it
    adds ``h @ weight_hh^T`` into them in place (no copy of them). Gates read again after the step are left
    as they were: the step adds into a new tensor. Either way the values of torch.lstm_cell."""
    module, cell = cell_pair("lstm", torch.float64)
    seen = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    def model(x, h, c):
        projected = ll.dot(x, module.weight_ih_l0, reduce=F) + (module.bias_ih_l0 + module.bias_hh_l0)
        out, state = module.step_from_gates(projected, state=(h, c), bias=False)
        return (out, state.c, projected * 1.0) if read_again else (out, state.c)

    torch.manual_seed(7)
    x, h, c = (torch.randn(3, n, dtype=torch.float64) for n in (F.size, H.size, H.size))
    prog = ll.compile(model, mode="eval")
    with torch.no_grad():
        prog(ll.Named(x, (B, F)), ll.Named(h, (B, H)), ll.Named(c, (B, H)))   # (traced)
        with Watch():
            results = prog(ll.Named(x, (B, F)), ll.Named(h, (B, H)), ll.Named(c, (B, H)))
        ref_h, ref_c = cell(x, (h, c))
        projected = x @ module.weight_ih_l0.t() + module.bias_ih_l0 + module.bias_hh_l0
    torch.testing.assert_close(results[0].align(B, H), ref_h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[1].align(B, H), ref_c, rtol=1e-12, atol=1e-12)
    if read_again:
        torch.testing.assert_close(results[2].align(B, module.gates), projected, rtol=1e-12, atol=1e-12)
    assert (torch.ops.aten.addmm_.default in seen) != read_again, seen
    assert (torch.ops.aten.addmm.default in seen) == read_again, seen


def test_a_step_from_gates_needs_the_gate_dim():
    module, _ = cell_pair("lstm", torch.float64)
    with pytest.raises(DimError, match="gate dim"):
        ll.compile(lambda h: module.step_from_gates(h, state=(h, h)))(ll.Named(torch.zeros(3, H.size,
                                                                                             dtype=torch.float64),
                                                                                 (B, H)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gru_step_equals_torch_gru_cell(dtype):
    module, cell = cell_pair("gru", dtype)

    def model(x, h):
        return module(x, state=h)

    torch.manual_seed(4)
    x, h = torch.randn(3, F.size, dtype=dtype), torch.randn(3, H.size, dtype=dtype)
    out, new_h = ll.compile(model)(ll.Named(x, (B, F)), ll.Named(h, (B, H)))
    ref_h = cell(x, h)
    torch.testing.assert_close(out.align(B, H), ref_h)
    torch.testing.assert_close(new_h.align(B, H), ref_h)


@pytest.mark.parametrize("kind", KINDS)
def test_a_step_without_state_starts_from_zeros(kind):
    module, cell = cell_pair(kind, torch.float64)
    x = torch.randn(3, F.size, dtype=torch.float64)
    out, _ = ll.compile(lambda x: module(x))(ll.Named(x, (B, F)))
    ref = cell(x)
    torch.testing.assert_close(out.align(B, H), ref[0] if kind == "lstm" else ref)


@pytest.mark.parametrize("kind", KINDS)
def test_step_gradients_equal_torch_cell(kind):
    module, cell = cell_pair(kind, torch.float64)
    torch.manual_seed(5)
    x = torch.randn(3, F.size, dtype=torch.float64, requires_grad=True)
    h = torch.randn(3, H.size, dtype=torch.float64, requires_grad=True)
    state = LstmState(h, torch.zeros_like(h)) if kind == "lstm" else h
    w = torch.randn(3, H.size, dtype=torch.float64)

    def model(x, h):
        return module(x, state=LstmState(h, ll.zeros([H])) if kind == "lstm" else h)[0]

    (ll.compile(model)(ll.Named(x, (B, F)), ll.Named(h, (B, H))).align(B, H) * w).sum().backward()
    x_ref, h_ref = x.detach().clone().requires_grad_(), h.detach().clone().requires_grad_()
    ref = cell(x_ref, (h_ref, state.c) if kind == "lstm" else h_ref)
    ((ref[0] if kind == "lstm" else ref) * w).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(h.grad, h_ref.grad)
    params = dict(cell.named_parameters())
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad, params[name.removesuffix("_l0")].grad, msg=name)


@pytest.mark.parametrize("positional", [False, True], ids=["state=", "state positional"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_stepping_in_a_loop_equals_sequence_mode(kind, dtype, positional):
    """(The state may be passed by position, ``cell(x_t, loop.state.s)``, as in DESIGN.md.)"""
    module, _ = make(kind, dtype=dtype)
    lstm = kind == "lstm"

    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.s = module.default_initial_state()
        with loop:
            frame = loop.unstack(x)
            out, loop.state.s = module(frame, loop.state.s) if positional else module(frame, state=loop.state.s)
            stepped = loop.stack(out)
        seq, final = module(x, axis=T)
        s = loop.state.s
        return stepped, seq, (s.h, s.c) if lstm else (s,), (final.h, final.c) if lstm else (final,)

    x = padded(LENGTHS, dtype, fill=float("nan"))
    for run in ("__call__", "reference"):
        stepped, seq, finals, seq_finals = getattr(ll.compile(model), run)(ll.Named(x, (B, T, F), {T: LENGTHS}))
        mask = valid(LENGTHS, x.shape[1])
        torch.testing.assert_close(stepped.align(B, T, H)[mask], seq.align(B, T, H)[mask])
        for a, b in zip(finals, seq_finals):
            torch.testing.assert_close(a.align(B, H), b.align(B, H))


def test_default_initial_state_has_the_batch_dims_and_hidden():
    lstm, _ = make("lstm")
    gru, _ = make("gru")
    bi, _ = make("lstm", bidirectional=True)
    other = ll.Dim("beam", 2)

    def model(x):
        s = lstm.default_initial_state([B, other])
        return s.h, s.c, lstm.default_initial_state().h, gru.default_initial_state([B]), bi.default_initial_state([B]).c

    x = torch.randn(3, 2, F.size, dtype=torch.float64)
    h, c, bare, g, b = ll.compile(model)(ll.Named(x, (B, T, F), {T: torch.tensor([2, 1, 2])}))
    assert set(h.dims) == set(c.dims) == {B, other, H}
    assert set(bare.dims) == {H}
    assert set(g.dims) == {B, H}
    assert set(b.dims) == {B, bi.hidden} and bi.hidden.size == H.size
    for v in (h, c, bare, g, b):
        assert v.tensor.dtype == torch.float64
        assert torch.equal(v.tensor, torch.zeros_like(v.tensor))


# -- parameters and state dicts --------------------------------------------------------------

@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", KINDS)
def test_parameter_names_and_shapes_are_torch_s(kind, bidirectional):
    module, ref = make(kind, bidirectional=bidirectional)
    assert list(module.state_dict()) == list(ref.state_dict())
    for (name, value), ref_value in zip(module.state_dict().items(), ref.state_dict().values()):
        assert value.shape == ref_value.shape, name


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_looplift_state_dict_loads_into_torch(kind, bidirectional):
    torch.manual_seed(6)
    module = (ll.nn.LSTM if kind == "lstm" else ll.nn.GRU)(
        F, OUT2 if bidirectional else H, bidirectional=bidirectional).double()
    ref = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(F.size, H.size, bidirectional=bidirectional).double()
    ref.load_state_dict(module.state_dict())
    assert_matches_torch_alone(module, ref, padded(LENGTHS, torch.float64), LENGTHS)


def test_lstm_step_takes_a_plain_h_c_tuple_as_state():
    B, F, H = ll.batch_dim, ll.Dim("f", 3), ll.Dim("h", 4)
    lstm = ll.nn.LSTM(F, H).double()
    cell = torch.nn.LSTMCell(3, 4).double()
    cell.load_state_dict({k.removesuffix("_l0"): v for k, v in lstm.state_dict().items()})
    x, h0, c0 = (torch.randn(2, n, dtype=torch.float64) for n in (3, 4, 4))
    prog = ll.compile(lambda x, h, c: lstm(x, state=(h, c))[1], mode="eval")
    state = prog(ll.Named(x, (B, F)), ll.Named(h0, (B, H)), ll.Named(c0, (B, H)))
    h, c = cell(x, (h0, c0))
    torch.testing.assert_close(state.h.align(B, H), h)
    torch.testing.assert_close(state.c.align(B, H), c)


# ---------------------------------------------------------------------------------------------------------
# several layers: one fused kernel, as torch.nn.LSTM / GRU with num_layers

@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_stacked_layers_equal_torch(kind, bidirectional, mode):
    """nn.LSTM/GRU(num_layers=3, dropout=0.4) over a padded batch equals torch.nn.LSTM/GRU with the same
    state dict on packed sequences: outputs, final states of every layer, gradients of all parameters.
    In train mode the dropout between layers draws the same masks from the same seed; in eval mode none."""
    T, F, H = ll.Dim("time"), ll.Dim("feat", 5), ll.Dim("out", 8)
    m = getattr(ll.nn, kind)(F, H, bidirectional=bidirectional, num_layers=3, dropout=0.4).double()
    ref = getattr(torch.nn, kind)(5, 4 if bidirectional else 8, num_layers=3, dropout=0.4,
                                  bidirectional=bidirectional).double()
    ref.load_state_dict(m.state_dict())
    ref.train(mode == "train")
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    n = torch.tensor([6, 3, 1])

    def run(x):
        out, finals = m(x, axis=T)
        h = [f[0] if bidirectional else f for f in finals]   # layer's (forward) final state
        if kind == "LSTM":
            h = [s.h for s in h]
        return out, *h

    torch.manual_seed(7)
    got = ll.compile(run, mode=mode)(ll.Named(x, (ll.batch_dim, T, F), {T: n}))
    torch.manual_seed(7)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x.transpose(0, 1), n, enforce_sorted=False)
    o, finals = ref(packed)
    o, _ = torch.nn.utils.rnn.pad_packed_sequence(o, total_length=6)
    h_n = finals[0] if kind == "LSTM" else finals
    mask = (torch.arange(6)[None] < n[:, None])[..., None].double()
    out = got[0].align(ll.batch_dim, T, H)
    torch.testing.assert_close(out * mask, o.transpose(0, 1) * mask, rtol=0, atol=1e-12)
    dirs = 2 if bidirectional else 1
    for layer in range(3):
        hidden = next(d for d in got[1 + layer].dims if d is not ll.batch_dim)
        torch.testing.assert_close(got[1 + layer].align(ll.batch_dim, hidden), h_n[layer * dirs],
                                   rtol=0, atol=1e-12)
    ((out * mask).sum() + sum(g.tensor.sum() for g in got[1:])).backward()
    ((o.transpose(0, 1) * mask).sum() + sum(h_n[layer * dirs].sum() for layer in range(3))).backward()
    mine = dict(m.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(mine[name].grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_stacked_layers_step_is_an_error():
    F, H = ll.Dim("feat", 5), ll.Dim("out", 8)
    m = ll.nn.LSTM(F, H, num_layers=2)

    def step(x):
        return m(x)[0]

    with pytest.raises(ll.errors.DimError, match="of 2 layers runs over a whole sequence") as info:
        ll.compile(step, mode="eval")(ll.Named(torch.randn(2, 5), (ll.batch_dim, F)))
    assert "test_rnn.py" in str(info.value)   # the user's line


# ---------------------------------------------------------------------------------------------------------
# the padded form of the sequence kernel equals the packed one

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(0, 9), min_size=2, max_size=5), layers=st.integers(1, 2),
       bidirectional=st.booleans(), kind=st.sampled_from(["LSTM", "GRU"]), train=st.booleans(),
       initial=st.booleans())
def test_the_padded_sequence_kernel_equals_the_packed_one(lengths, layers, bidirectional, kind, train, initial,
                                                          monkeypatch):
    """Random batches of different lengths (empty entries, NaN padding, 1-2 layers with dropout in train mode,
    given or zero initial states): the output, the final states the padded form computes (every layer's and
    direction's h) and all gradients (parameters, input, initial states) equal the packed form's, and a seed
    draws the same dropout masks in both."""
    from looplift.ops import rnn
    assume(len(set(lengths)) > 1)
    T, F, H = ll.Dim("time"), ll.Dim("feat", 3), ll.Dim("out", 4)
    m = getattr(ll.nn, kind)(F, H, bidirectional=bidirectional, num_layers=layers, dropout=0.3).double()
    n = torch.tensor(lengths)
    frames = int(n.max())
    x = torch.randn(len(lengths), frames, 3, dtype=torch.float64)
    x = x.masked_fill(~valid(n, frames)[:, :, None], float("nan")).requires_grad_()
    h0 = torch.randn(len(lengths), m.hidden.size, dtype=torch.float64, requires_grad=True)

    def one_state(h):
        return LstmState(h, h * 0.5) if kind == "LSTM" else h

    def run(x, h0):
        state = None
        if initial:
            per_layer = (one_state(h0), one_state(-h0)) if bidirectional else one_state(h0)
            state = per_layer if layers == 1 else (per_layer,) * layers
        out, finals = m(x, axis=T, state=state)
        per_layer = finals if layers > 1 else (finals,)
        states = [s for f in per_layer for s in (f if bidirectional else (f,))]   # (every layer and direction)
        return out, *[s.h if kind == "LSTM" else s for s in states]

    program = ll.compile(run, mode="train" if train else "eval")
    results = {}
    for form, threshold in (("packed", 10**9), ("padded", 1)):
        monkeypatch.setattr(rnn, "PADDED_MIN_STEPS", threshold)
        m.zero_grad()
        x.grad = h0.grad = None
        torch.manual_seed(5)
        got = program(ll.Named(x, (B, T, F), {T: n}), ll.Named(h0, (B, m.hidden)))
        tensors = [g.tensor for g in got]
        sum(t.nan_to_num(0.0).sum() * (k + 1) for k, t in enumerate(tensors)).backward()
        results[form] = ([t.detach() for t in tensors] + [p.grad.clone() for p in m.parameters()]
                         + [x.grad.clone()] + ([h0.grad.clone()] if initial else []))
    for a, b in zip(results["packed"], results["padded"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
