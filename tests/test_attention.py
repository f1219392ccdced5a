"""Attention runs as one fused kernel (``scaled_dot_product_attention``).

The executor runs ``dot(softmax(dot(q, k) * c), v)`` as one call of torch's
fused attention (:mod:`looplift.runtime.attention`); the reference interpreter
runs the four ops as traced. Checked here, in float64: the executor equals the
reference, outputs and gradients, over random attention models: self-attention
over ``cum_concat`` (moved out of its loop: causal; or left in it, a query per
step), cross-attention over a padded encoder (with empty entries, where the
chain runs as traced), with and without heads, scales and an extra batch dim,
keys stored batch-major or time-major; that the fused call is made where it
should be, and not where the weights are read elsewhere or the keys may be
non-finite in their padding (the fused call adds the mask to the scores).
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loop_helpers import run_both
from test_masked import check_equivalent
from torch._dynamo.testing import CompileCounterWithBackend

import looplift as ll
from looplift.runtime import attention

B = ll.batch_dim
DTYPE = torch.float64
VOCAB = ll.Dim("vocab", 7)


class Attend(ll.Module):
    """Queries from the targets' embedding, per step of a loop over `time`, attending either over their own
    history (``cum_concat``) or over an encoder of the source labels (over `src`)."""

    def __init__(self, time: ll.Dim, src: ll.Dim, *, cross: bool, heads: int, scale: str, extra: int,
                 seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.time, self.src, self.cross, self.scale = time, src, cross, scale
        self.model = ll.Dim("model", 4 * heads)
        self.heads = ll.Dim("heads", heads) if heads > 1 else None
        self.head = ll.Dim("head", 4)
        self.extra = ll.Dim("extra", extra) if extra else None
        self.emb = ll.nn.Embedding(VOCAB, self.model)
        self.src_emb = ll.nn.Embedding(VOCAB, self.model)
        self.q, self.k, self.v = (ll.nn.Linear(self.model, self.model) for _ in range(3))
        if extra:
            self.bias = ll.Parameter([self.extra, self.model], init="normal")
        self.to(DTYPE)

    def _split(self, x):
        if self.heads is None:
            return ll.replace_dim(x, self.model, self.head)
        return ll.split_dims(x, axis=self.model, dims=[self.heads, self.head])

    def _scaled(self, scores):
        c = 1.0 / math.sqrt(self.head.size)
        return {"none": scores, "after": scores * c, "before": c * scores}[self.scale]

    def forward(self, labels, src_labels):
        loop = ll.Loop(axis=self.time)
        if self.cross:
            enc = self.src_emb(src_labels)
            keys, values, axis = self._split(self.k(enc)), self._split(self.v(enc)), self.src
        with loop:
            x = self.emb(loop.unstack(labels))
            if self.extra is not None:
                x = x + self.bias   # (one more batch dim, the extra's)
            if not self.cross:
                keys, values = ll.cum_concat(self._split(self.k(x))), ll.cum_concat(self._split(self.v(x)))
                axis = keys.dims[0]
            q = self._split(self.q(x))
            weights = ll.softmax(self._scaled(ll.dot(q, keys, reduce=self.head)), axis=axis)
            ctx = loop.stack(ll.dot(weights, values, reduce=axis))
        return ctx


def inputs(time: ll.Dim, src: ll.Dim, lengths, src_lengths, *, time_major_src: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB.size, (len(lengths), max(lengths)), generator=g)
    src_labels = torch.randint(0, VOCAB.size, (len(lengths), max(max(src_lengths), 1)), generator=g)
    lengths, src_lengths = torch.tensor(lengths), torch.tensor(src_lengths)
    src_named = ll.Named(src_labels, (B, src), {src: src_lengths}, sparse_dim=VOCAB)
    if time_major_src:
        src_named = ll.Named(src_labels.t().contiguous(), (src, B), {src: src_lengths}, sparse_dim=VOCAB)
    return [ll.Named(labels, (B, time), {time: lengths}, sparse_dim=VOCAB), src_named]


def fused_calls(prog, args) -> int:
    """How many times running `prog` on `args` calls the fused attention."""
    with mock.patch.object(attention.F, "scaled_dot_product_attention",
                           wraps=attention.F.scaled_dot_product_attention) as call:
        prog(*args)
    return call.call_count


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), cross=st.booleans(), optimize=st.booleans(), heads=st.sampled_from([1, 2]),
       scale=st.sampled_from(["none", "after", "before"]), extra=st.sampled_from([0, 2]),
       time_major_src=st.booleans())
def test_fused_attention_equals_the_reference(data, cross, optimize, heads, scale, extra, time_major_src):
    batch = data.draw(st.integers(1, 4), label="batch")
    lengths = data.draw(st.lists(st.integers(1, 5), min_size=batch, max_size=batch), label="lengths")
    src_lengths = data.draw(st.lists(st.integers(0, 4), min_size=batch, max_size=batch), label="src_lengths")
    time, src = ll.Dim("time"), ll.Dim("src")
    model = Attend(time, src, cross=cross, heads=heads, scale=scale, extra=extra, seed=len(lengths))
    args = inputs(time, src, lengths, src_lengths, time_major_src=time_major_src, seed=sum(lengths))
    prog = ll.compile(model, optimize=optimize)
    check_equivalent(prog, args, model.parameters())
    calls = fused_calls(prog, args)
    steps = 1 if optimize else max(lengths)
    if cross and min(src_lengths) == 0:
        assert calls == 0   # (an empty entry: its softmax rows are zeros, run as traced)
    else:
        assert calls == steps


def test_the_causal_history_is_one_fused_call_per_program_call():
    time, src = ll.Dim("time"), ll.Dim("src")
    model = Attend(time, src, cross=False, heads=2, scale="after", extra=0)
    args = inputs(time, src, [5, 3, 4], [2, 2, 2], time_major_src=False, seed=1)
    prog = ll.compile(model)
    with mock.patch.object(attention.F, "scaled_dot_product_attention",
                           wraps=attention.F.scaled_dot_product_attention) as call:
        prog(*args)
    ((_, kwargs),) = [c[1:] for c in call.mock_calls]
    assert kwargs["is_causal"] and kwargs["attn_mask"] is None and kwargs["scale"] == pytest.approx(0.5)
    check_equivalent(prog, args, model.parameters())


class WeightsReturned(Attend):
    """The attention weights are returned too: the chain is not fused (they would not exist)."""

    def forward(self, labels, src_labels):
        enc = self.src_emb(src_labels)
        keys, values = self._split(self.k(enc)), self._split(self.v(enc))
        q = self._split(self.q(self.emb(labels)))
        weights = ll.softmax(ll.dot(q, keys, reduce=self.head), axis=self.src)
        return ll.dot(weights, values, reduce=self.src), weights


class KeysFromInput(Attend):
    """Keys and values straight from a program input, whose padding may hold anything (NaN here)."""

    def forward(self, labels, keys):
        q = self._split(self.q(self.emb(labels)))
        weights = ll.softmax(ll.dot(q, keys, reduce=self.head), axis=self.src)
        return ll.dot(weights, keys, reduce=self.src)


def test_weights_read_elsewhere_or_keys_maybe_not_finite_are_not_fused():
    time, src = ll.Dim("time"), ll.Dim("src")
    model = WeightsReturned(time, src, cross=True, heads=2, scale="none", extra=0)
    args = inputs(time, src, [3, 2], [2, 3], time_major_src=False, seed=2)
    prog = ll.compile(model)
    assert fused_calls(prog, args) == 0
    check_equivalent(prog, args, model.parameters())

    model = KeysFromInput(time, src, cross=True, heads=1, scale="none", extra=0)
    keys = torch.randn(2, 3, 4, dtype=DTYPE)
    keys[1, 2] = float("nan")   # (entry 1 has 2 frames: its third is padding)
    args = [inputs(time, src, [3, 2], [3, 2], time_major_src=False, seed=3)[0],
            ll.Named(keys, (B, src, model.head), {src: torch.tensor([3, 2])})]
    prog = ll.compile(model)
    assert fused_calls(prog, args) == 0
    out = run_both(prog, *args)   # (equal to the reference at the valid positions)
    assert torch.isfinite(out.tensor).all()


@pytest.mark.parametrize("cross", [False, True])
def test_a_compiled_program_with_fused_attention_equals_eager_and_compiles_once(cross):
    """Compiled (``aot_eager``): the causal self-attention moved out of its loop is one fused call in the
    compiled code; the cross-attention of a loop's step, whose encoder entries may be empty, runs as traced
    there (the lengths are not read back in compiled code). Losses and gradients equal the eager program's
    for new batch sizes and lengths, which compile nothing new."""
    time, src = ll.Dim("time"), ll.Dim("src")
    model = Attend(time, src, cross=cross, heads=2, scale="after", extra=0)
    model.to(torch.float32)
    counter = CompileCounterWithBackend("aot_eager")
    compiled, eager = ll.compile(model, backend=counter), ll.compile(model)
    shapes = [([5, 3, 4], [2, 3, 1]), ([6, 2], [4, 1]), ([7, 7, 1, 2], [2, 5, 2, 3])]
    frames = None
    for i, (lengths, src_lengths) in enumerate(shapes):
        args = inputs(time, src, lengths, src_lengths, time_major_src=False, seed=i)
        got, want = _loss_and_grads(compiled, args, model), _loss_and_grads(eager, args, model)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        frames = frames if frames is not None else counter.frame_count
    assert counter.frame_count == frames
    fused = [g for g in counter.graphs if "scaled_dot_product_attention" in g.code]
    assert len(fused) == (0 if cross else 1), [g.code for g in counter.graphs]


def _loss_and_grads(prog, args, model) -> list[torch.Tensor]:
    out = prog(*args)
    loss = (out.tensor * torch.where(out.mask(), 1.0, 0.0)).sum()
    return [loss.detach(), *torch.autograd.grad(loss, list(model.parameters()), allow_unused=True,
                                                materialize_grads=True)]
