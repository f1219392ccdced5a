"""``Program.to_fx``: the program as a ``torch.fx.GraphModule`` of torch calls.

The module must compute what the program computes (the same torch calls: equal outputs and gradients), for
other batch sizes and lengths than the example's, refer to the model's own parameters by their names, and
work under ``torch.compile`` and ``torch.export``. A loop left after the optimizer (one that makes its own
dim too, a beam search with its backtracking) and a Cond are each one call of the op ``looplift.loop``
(outputs and gradients the program's). A part without an fx form yet is an ``ExportError`` naming the
user's line.
"""

from __future__ import annotations

import pytest
import torch
from error_helpers import check_error

import looplift as ll
from looplift.errors import ExportError

B, T = ll.batch_dim, ll.Dim("time")
F, H, V = ll.Dim("feat", 6), ll.Dim("hidden", 8), ll.Dim("vocab", 5)
SHAPES = [(3, 5), (4, 9), (2, 12)]   # (batch, padded length): the first is the example


def _inputs(batch: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, steps, F.size, generator=g)
    n = torch.randint(2, steps + 1, (batch,), generator=g)
    n[0] = steps
    y = torch.randint(0, V.size, (batch, steps), generator=g)
    return ll.Named(x, (B, T, F), {T: n}), ll.Named(y, (B, T), sparse_dim=V)


class Pooling(ll.Module):
    """No loop: a projection, a softmax over the padded time dim, a layer norm, a cross entropy per frame."""

    def __init__(self):
        super().__init__()
        self.lin, self.norm, self.out = ll.nn.Linear(F, H), ll.nn.LayerNorm(H), ll.nn.Linear(H, V)

    def forward(self, x, y):
        h = ll.tanh(self.lin(x))
        pooled = ll.sum(ll.softmax(h, axis=T) * h, axis=T)
        logits = self.out(self.norm(h + pooled))
        return ll.sum(ll.cross_entropy(logits, y, axis=V), axis=[B, T])


class SelfAttentionLoop(ll.Module):
    """A step-wise self-attention over the history (``cum_concat``): the optimizer moves the whole loop out."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = ll.nn.Linear(F, H), ll.nn.Linear(F, H), ll.nn.Linear(F, H)
        self.out = ll.nn.Linear(H, V)

    def forward(self, x, y):
        loop = ll.Loop(axis=T)
        with loop:
            x_t = loop.unstack(x)
            keys, values = ll.cum_concat(self.k(x_t)), ll.cum_concat(self.v(x_t))
            w = ll.softmax(ll.dot(self.q(x_t), keys, reduce=H), axis=keys.dims[0])
            ctx = ll.dot(w, values, reduce=keys.dims[0])
            ce = loop.stack(ll.cross_entropy(self.out(ctx), loop.unstack(y), axis=V))
        return ll.sum(ce, axis=[B, T])


class BiLSTMEncoder(ll.Module):
    """A bidirectional LSTM over the padded batch (its outputs only), a readout and a cross entropy."""

    def __init__(self):
        super().__init__()
        self.lstm, self.out = ll.nn.LSTM(F, H, bidirectional=True), ll.nn.Linear(H, V)   # (H/2 per direction)

    def forward(self, x, y):
        h, _ = self.lstm(x, axis=T)
        return ll.sum(ll.cross_entropy(self.out(h), y, axis=V), axis=[B, T])


def _raw_args(x, y):
    return x.tensor, y.tensor, x.lengths[T]


def _assert_module_computes_what_the_program_computes(cls, same) -> None:
    """For every shape of SHAPES (the first the example's), the module's loss and gradients are `same` as the
    program's."""
    torch.manual_seed(0)
    model = cls()
    prog = ll.compile(model)
    module = prog.to_fx(*_inputs(*SHAPES[0], seed=0))
    params = list(model.parameters())
    for i, shape in enumerate(SHAPES):
        x, y = _inputs(*shape, seed=i)
        want = prog(x, y).tensor
        (got,) = module(*_raw_args(x, y))
        same(got, want)
        for g, w in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
            same(g, w)


def _equal(a, b):
    assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [Pooling, SelfAttentionLoop])
def test_the_module_computes_what_the_program_computes_for_any_size(cls):
    """The same torch calls: equal bits."""
    _assert_module_computes_what_the_program_computes(cls, _equal)


def test_an_lstm_over_sequences_of_different_lengths_runs_over_the_padded_batch():
    """Packing reads the lengths back; the module runs the fused kernel over the padded batch (each entry's
    reverse direction over its own frames reversed), which the program uses for long sequences: equal to
    float rounding."""
    _assert_module_computes_what_the_program_computes(
        BiLSTMEncoder, lambda a, b: torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5))


def test_the_module_holds_the_models_parameters_by_name():
    torch.manual_seed(0)
    model = Pooling()
    module = ll.compile(model).to_fx(*_inputs(*SHAPES[0], seed=0))
    theirs = dict(model.named_parameters())
    ours = dict(module.named_parameters())
    assert set(ours) == set(theirs)
    assert all(ours[n] is theirs[n] for n in ours)   # (training the module trains the model)
    assert module.meta["looplift"] == {"inputs": [("batch", "time", "feat"), ("batch", "time")],
                                       "lengths": ["time"], "outputs": [()]}


def test_the_module_under_torch_compile():
    torch.manual_seed(0)
    model = SelfAttentionLoop()
    prog = ll.compile(model)
    compiled = torch.compile(prog.to_fx(*_inputs(*SHAPES[0], seed=0)), backend="aot_eager", dynamic=True)
    for i, shape in enumerate(SHAPES):
        x, y = _inputs(*shape, seed=i)
        torch.testing.assert_close(compiled(*_raw_args(x, y))[0], prog(x, y).tensor)


@pytest.mark.parametrize("cls", ["SelfAttentionLoop", "TanhRNN"])
def test_the_module_goes_through_torch_export_with_dynamic_sizes(cls):
    """The loop moved out whole, and a loop that stays (one call of the op ``looplift.loop``)."""
    torch.manual_seed(0)
    prog = ll.compile(globals()[cls]())
    x, y = _inputs(*SHAPES[0], seed=0)
    batch, steps = torch.export.Dim("batch", min=2), torch.export.Dim("time", min=2)
    exported = torch.export.export(prog.to_fx(x, y), _raw_args(x, y),
                                   dynamic_shapes=({0: batch, 1: steps}, {0: batch, 1: steps}, {0: batch}))
    for i, shape in enumerate(SHAPES[1:], 1):
        x, y = _inputs(*shape, seed=i)
        torch.testing.assert_close(exported.module()(*_raw_args(x, y))[0], prog(x, y).tensor)


class TanhRNN(ll.Module):
    """A loop whose step depends on the previous step: it stays a loop after the optimizer."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = ll.nn.Linear(F + H, H), ll.nn.Linear(H, V)

    def forward(self, x, y):
        loop = ll.Loop(axis=T)
        loop.state.h = ll.zeros([H])
        with loop:
            h = ll.tanh(self.lin(ll.concat(loop.unstack(x), loop.state.h)))
            loop.state.h = h
            ce = loop.stack(ll.cross_entropy(self.out(h), loop.unstack(y), axis=V))
        return ll.sum(ce, axis=[B, T]) + ll.sum(loop.last(h), axis=[B, H])


class AttentionDecoder(ll.Module):
    """An LSTM decoder over the labels, fed back the last label and its attention context over the frames
    (dot attention, masked at the padding): the loop keeps the cell and the attention."""

    def __init__(self):
        super().__init__()
        self.emb, self.cell = ll.nn.Embedding(V, H), ll.nn.LSTM(H + F, H)
        self.query, self.out = ll.nn.Linear(H, F), ll.nn.Linear(H + F, V)

    def forward(self, x, y):
        loop = ll.Loop(axis=U)
        loop.state.label = ll.full(0, sparse_dim=V)
        loop.state.s = self.cell.default_initial_state()
        loop.state.ctx = ll.zeros([F])
        with loop:
            h, loop.state.s = self.cell(ll.concat(self.emb(loop.state.label), loop.state.ctx), state=loop.state.s)
            loop.state.ctx = ll.dot(ll.softmax(ll.dot(self.query(h), x, reduce=F), axis=T), x, reduce=T)
            target = loop.unstack(y)
            ce = loop.stack(ll.cross_entropy(self.out(ll.concat(h, loop.state.ctx)), target, axis=V))
            loop.state.label = target
        return ll.sum(ce, axis=[B, U])


U = ll.Dim("labels")


def _decoder_inputs(batch: int, steps: int, seed: int):
    x, _ = _inputs(batch, steps, seed)
    g = torch.Generator().manual_seed(50 + seed)
    n = torch.randint(1, steps + 3, (batch,), generator=g)
    n[-1] = steps + 2
    return x, ll.Named(torch.randint(0, V.size, (batch, steps + 2), generator=g), (B, U), {U: n}, sparse_dim=V)


def _assert_loop_module(cls, inputs, raw, shapes=SHAPES) -> torch.fx.GraphModule:
    """The module of `cls`'s program, whose loop (or Cond) is one call of the op ``looplift.loop``, gives the
    program's losses and gradients (the parameters' and the float inputs') for every shape of `shapes`,
    eagerly and under torch.compile; returns the module."""
    torch.manual_seed(0)
    model = cls()
    prog = ll.compile(model)
    module = prog.to_fx(*inputs(*shapes[0], seed=0))
    assert "torch.ops.looplift.loop(" in module.code, module.code
    compiled = torch.compile(module, backend="aot_eager", dynamic=True)
    params = list(model.parameters())
    for i, shape in enumerate(shapes):
        x, y = inputs(*shape, seed=i)
        x = ll.Named(x.tensor.requires_grad_(), x.dims, x.lengths)
        want = prog(x, y).tensor
        grads = torch.autograd.grad(want, [*params, x.tensor])
        for run in (module, compiled):
            (got,) = run(*raw(x, y))
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            for g, w in zip(torch.autograd.grad(got, [*params, x.tensor]), grads):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    return module


def test_a_loop_left_after_the_optimizer_is_one_op_call():
    _assert_loop_module(TanhRNN, _inputs, _raw_args)


def test_an_attention_decoders_loop_is_one_op_call():
    _assert_loop_module(AttentionDecoder, _decoder_inputs,
                        lambda x, y: (x.tensor, y.tensor, x.lengths[T], y.lengths[U]))


class Counter(ll.Module):
    """A loop that makes its own dim: per entry, a running sum of a projection of the entry's mean frame,
    until it passes a bound (at most 9 steps); the steps stacked and summed after the loop."""

    def __init__(self):
        super().__init__()
        self.lin = ll.nn.Linear(F, H)

    def forward(self, x, y):
        step = ll.sigmoid(self.lin(ll.sum(x, axis=T)))
        loop = ll.Loop(max_seq_len=9)
        loop.state.s = ll.zeros([H])
        with loop:
            s = loop.state.s + step
            loop.state.s = s
            loop.end(ll.sum(s, axis=H) > 6.0, include_eos=True)
            out = loop.stack(s)
        return ll.sum(ll.tanh(out), axis=[B, loop.axis, H])


def test_a_loop_that_makes_its_own_dim_is_one_op_call():
    """The op returns the dim's lengths and size too: the masked sum after the loop uses them."""
    _assert_loop_module(Counter, _inputs, _raw_args)


class Search(ll.Module):
    """A beam search (beam 3) over labels fed back through an embedding, from a start state pooled from the
    frames, ending at label 0."""

    def __init__(self, threshold=None):
        super().__init__()
        self.threshold = threshold
        self.emb, self.start = ll.nn.Embedding(V, H), ll.nn.Linear(F, H)
        self.rec, self.out = ll.nn.Linear(H, H), ll.nn.Linear(H, V)

    def forward(self, x, y):
        loop = ll.Loop(max_seq_len=ll.length(T) + 2)  # <search>
        loop.state.label = ll.full(0, sparse_dim=V)
        loop.state.h = ll.tanh(self.start(ll.sum(x, axis=T)))
        with loop:
            loop.state.h = ll.tanh(self.emb(loop.state.label) + self.rec(loop.state.h))
            label = ll.choice(ll.log_softmax(self.out(loop.state.h), axis=V), beam_size=3, axis=V,
                              threshold=self.threshold)
            loop.state.label = label
            loop.end(label == 0, include_eos=True)
            ys = loop.stack(label)
        return ys, loop.search.scores, loop.search.lengths, loop.search.valid


@pytest.mark.parametrize("threshold", [None, 1.0], ids=["beam", "threshold"])
def test_a_beam_search_is_one_op_call_for_its_loop_and_one_for_its_backtracking(threshold):
    """The n-best of the module (eagerly and under torch.compile) is the program's, for other batch sizes and
    lengths (so other numbers of steps) than the example's; with a threshold, the beam's size after the loop
    (the last step's) comes out of the loop's op."""
    torch.manual_seed(3)
    prog = ll.compile(Search(threshold), mode="search")
    module = prog.to_fx(*_inputs(*SHAPES[0], seed=0))
    assert module.code.count("torch.ops.looplift.loop(") == 2, module.code
    compiled = torch.compile(module, backend="aot_eager", dynamic=True)
    widths = set()
    for i, shape in enumerate(SHAPES):
        x, y = _inputs(*shape, seed=i)
        want = prog(x, y)
        widths.add(want[-1].tensor.shape[-1])
        for run in (module, compiled):
            got = run(*_raw_args(x, y))
            assert [g.shape for g in got] == [w.tensor.shape for w in want]
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w.tensor, rtol=1e-6, atol=1e-6)
    if threshold is not None:   # (the threshold kept fewer hypotheses than the beam size)
        assert min(widths) < 3, widths


class DropoutLoop(ll.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.drop = ll.nn.Linear(F + H, H), ll.nn.Dropout(0.5)

    def forward(self, x, y):
        loop = ll.Loop(axis=T)  # <dropout-loop>
        loop.state.h = ll.zeros([H])
        with loop:
            loop.state.h = self.drop(ll.tanh(self.lin(ll.concat(loop.unstack(x), loop.state.h))))
            s = loop.stack(ll.sum(loop.state.h, axis=H))
        return ll.sum(s, axis=[B, T])


def test_a_loop_drawing_random_numbers_in_its_step_is_an_export_error_naming_its_line():
    """The op recomputes the steps for the gradients: dropout would draw other masks."""
    with pytest.raises(ExportError) as info:
        ll.compile(DropoutLoop(), mode="train").to_fx(*_inputs(*SHAPES[0], seed=0))
    check_error(__file__, info, ExportError, "dropout-loop")


class CondModel(ll.Module):
    """A Cond on the sign of the frames' sum: a tanh of a projection, or twice the projection."""

    def __init__(self):
        super().__init__()
        self.lin = ll.nn.Linear(F, H)

    def forward(self, x, y):
        h = self.lin(x)
        with ll.Cond(ll.sum(x, axis=[B, T, F]) > 0.0) as cond:
            cond.true = ll.tanh(h)
            cond.false = h * 2.0
        return ll.sum(cond.result, axis=[B, T, H])


def test_a_cond_is_one_op_call_running_the_branch_its_predicate_chooses():
    def inputs(batch, steps, seed):   # (odd seeds: the frames negative, the other branch)
        x, y = _inputs(batch, steps, seed)
        return ll.Named(x.tensor.abs() * (-1.0 if seed % 2 else 1.0), x.dims, x.lengths), y

    _assert_loop_module(CondModel, inputs, _raw_args, shapes=[s for s in SHAPES for _ in (0, 1)])


def _lstm_final_cell_state():
    torch.manual_seed(0)
    lstm = ll.nn.LSTM(F, H)

    def model(x, y):
        _, final = lstm(x, axis=T)  # <packed-lstm>
        return ll.sum(final.c, axis=[B, H])

    return model


def test_the_final_cell_state_of_an_lstm_over_different_lengths_is_an_export_error_naming_its_line():
    """Each entry's final cell state comes from packing (the padded kernel gives only the padded end's)."""
    with pytest.raises(ExportError) as info:
        ll.compile(_lstm_final_cell_state()).to_fx(*_inputs(*SHAPES[0], seed=0))
    check_error(__file__, info, ExportError, "packed-lstm")


def _readme_example(k: int) -> dict:
    """The names the README's `k`-th python example defines, after running it."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    example = re.findall(r"```python\n(.*?)```", readme, re.S)[k]
    ns: dict = {"__name__": "readme"}
    exec(compile(example, "README.md", "exec"), ns)
    return ns


def test_the_readmes_first_example_as_a_module():
    """The README's classifier (no loop): the module gives the program's loss and best labels."""
    ns = _readme_example(0)
    train, time, feat, classes = ns["train"], ns["time"], ns["feat"], ns["classes"]
    x, lengths, labels = ns["x"], ns["lengths"], ns["labels"]
    args = (ll.Named(x, (B, time, feat), lengths={time: lengths}), ll.Named(labels, (B, time), sparse_dim=classes))
    module = train.to_fx(*args, axis=time)
    loss, best = train(*args, axis=time)
    got_loss, got_best = module(x, labels, lengths)
    assert torch.equal(got_loss, loss.tensor) and torch.equal(got_best, best.tensor)


def test_the_readmes_lstm_loop_as_a_module():
    """The README's LSTM loop with a running total and ``loop.last``: the optimizer leaves no loop, and the
    module gives the program's outputs (its LSTM over the padded batch: equal to float rounding)."""
    ns = _readme_example(2)
    prog, x, lengths, time, feat = ns["step_by_step"], ns["x"], ns["lengths"], ns["time"], ns["feat"]
    named = ll.Named(x, (B, time, feat), lengths={time: lengths})
    module = prog.to_fx(named)
    for got, want in zip(module(x, lengths), prog(named)):
        torch.testing.assert_close(got, want.tensor)


def test_example_inputs_are_checked_as_a_call_checks_them():
    """A Spec has no values, and a tensor that does not fit its dims is the call's InputError: both name the
    line that asks for the module."""
    from looplift.errors import InputError

    prog = ll.compile(Pooling())
    x, y = _inputs(*SHAPES[0], seed=0)
    with pytest.raises(InputError) as info:
        prog.to_fx(ll.Spec((B, T, F), torch.float32), y)  # <spec-example>
    check_error(__file__, info, InputError, "spec-example")
    bad = ll.Named(torch.randn(3, 5, F.size + 1), (B, T, F), {T: x.lengths[T]})
    with pytest.raises(InputError) as info:
        prog.to_fx(bad, y)  # <misfit-example>
    check_error(__file__, info, InputError, "misfit-example", "feat")
