"""Losses (cross_entropy with sparse and soft targets, ctc_loss) against ``torch.nn.functional``,
values and gradients, computed per sequence."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as tF

import looplift as ll

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_ops_support import (
    TOL,
    B,
    assert_valid_close,
    masked_weighted_sum,
    randint,
    randn,
    run,
    seq_mask,
    with_garbage,
)

T = ll.Dim("x_time")
S = ll.Dim("x_labels")
V = ll.Dim("x_vocab", 5)
LENS = torch.tensor([7, 3, 5, 6])
TMASK = seq_mask(LENS, 7)
TG_LENS = torch.tensor([3, 1, 0, 2])


def logits_data(seed=1):
    return with_garbage(randn(4, 7, 5, seed=seed) * 2, LENS)


def named_logits(x):
    return ll.Named(x, (B, T, V), {T: LENS})


def named_labels(y):
    return ll.Named(y, (B, T), {T: LENS}, sparse_dim=V)


def sparse_targets(seed=2):
    return with_garbage(randint(0, 5, (4, 7), seed=seed), LENS, value=-999)


def soft_targets(seed=3):
    return with_garbage(torch.softmax(randn(4, 7, 5, seed=seed), -1), LENS)


# -- cross_entropy --------------------------------------------------------------------------------

def test_cross_entropy_with_label_targets_matches_torch():
    x, y = logits_data(), sparse_targets()
    out = run(lambda x, y: ll.cross_entropy(x, y, axis=V), named_logits(x), named_labels(y))
    assert set(out.dims) == {B, T}
    expected = tF.cross_entropy(x.transpose(1, 2), y.clamp(0, 4), reduction="none")
    assert_valid_close(out, expected, (B, T), TMASK)


def test_cross_entropy_with_soft_targets_matches_torch_probability_targets():
    x, p = logits_data(), soft_targets()
    out = run(lambda x, p: ll.cross_entropy(x, p, axis=V), named_logits(x), ll.Named(p, (B, T, V), {T: LENS}))
    assert set(out.dims) == {B, T}
    expected = tF.cross_entropy(x.transpose(1, 2), p.transpose(1, 2), reduction="none")
    assert_valid_close(out, expected, (B, T), TMASK)


def test_cross_entropy_of_log_probs_is_the_negative_log_likelihood():
    x, y = torch.log_softmax(logits_data(), -1), sparse_targets()
    out = run(lambda x, y: ll.cross_entropy(x, y, axis=V, logits_are_log_probs=True), named_logits(x),
              named_labels(y))
    expected = tF.nll_loss(x.transpose(1, 2), y.clamp(0, 4), reduction="none")
    assert_valid_close(out, expected, (B, T), TMASK)


def test_cross_entropy_finds_the_vocabulary_dim_in_any_storage_position():
    x, y = logits_data(), sparse_targets()
    out = run(lambda x, y: ll.cross_entropy(x, y, axis=V), ll.Named(x.permute(2, 1, 0), (V, T, B), {T: LENS}),
              ll.Named(y.t(), (T, B), {T: LENS}, sparse_dim=V))
    expected = tF.cross_entropy(x.transpose(1, 2), y.clamp(0, 4), reduction="none")
    assert_valid_close(out, expected, (B, T), TMASK)


def test_cross_entropy_summed_over_time_counts_only_valid_frames():
    x, y = logits_data(), sparse_targets()
    out = run(lambda x, y: ll.sum(ll.cross_entropy(x, y, axis=V), axis=T), named_logits(x),
              named_labels(y))
    expected = torch.stack([tF.cross_entropy(x[b, :n], y[b, :n], reduction="sum") for b, n in enumerate(LENS.tolist())])
    assert_valid_close(out, expected, (B,))


def test_cross_entropy_rejects_targets_over_another_vocabulary():
    other = ll.Dim("x_other_vocab", 5)
    with pytest.raises(ll.errors.DimError):
        run(lambda x, y: ll.cross_entropy(x, y, axis=V), named_logits(logits_data()),
            ll.Named(sparse_targets(), (B, T), {T: LENS}, sparse_dim=other))


def test_gradient_of_cross_entropy_with_label_targets_matches_torch():
    x, y = logits_data().requires_grad_(), sparse_targets()
    out = run(lambda x, y: ll.cross_entropy(x, y, axis=V), named_logits(x), named_labels(y))
    (got,) = torch.autograd.grad(masked_weighted_sum(out.align(B, T), TMASK), [x])
    expected = tF.cross_entropy(x.transpose(1, 2), y.clamp(0, 4), reduction="none")
    (want,) = torch.autograd.grad(masked_weighted_sum(expected, TMASK), [x])
    torch.testing.assert_close(got, want, **TOL)
    assert torch.equal(got[~TMASK], torch.zeros_like(got[~TMASK]))


def test_gradient_of_cross_entropy_with_soft_targets_matches_torch_for_logits_and_targets():
    x, p = logits_data().requires_grad_(), soft_targets().requires_grad_()
    out = run(lambda x, p: ll.cross_entropy(x, p, axis=V), named_logits(x), ll.Named(p, (B, T, V), {T: LENS}))
    got = torch.autograd.grad(masked_weighted_sum(out.align(B, T), TMASK), [x, p])
    expected = tF.cross_entropy(x.transpose(1, 2), p.transpose(1, 2), reduction="none")
    want = torch.autograd.grad(masked_weighted_sum(expected, TMASK), [x, p])
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, **TOL)


# -- ctc_loss -------------------------------------------------------------------------------------

def ctc_targets(seed=4, blank=0):
    labels = randint(1, 5, (4, 3), seed=seed)
    if blank != 0:
        labels = labels - 1  # labels 0..3, blank 4
    return with_garbage(labels, TG_LENS, value=-7)


def ctc_alone(log_probs, targets, *, blank):
    """torch CTC of each sequence alone: (batch,) losses."""
    losses = []
    for b in range(4):
        n, m = int(LENS[b]), int(TG_LENS[b])
        losses.append(tF.ctc_loss(log_probs[b, :n, None], targets[b:b + 1, :m], torch.tensor([n]), torch.tensor([m]),
                                  blank=blank, reduction="none", zero_infinity=False)[0])
    return torch.stack(losses)


@pytest.mark.parametrize("blank", [0, 4])
def test_ctc_loss_equals_torch_ctc_of_each_sequence_alone(blank):
    x, y = logits_data(), ctc_targets(blank=blank)
    out = run(lambda x, y: ll.ctc_loss(x, y, input_axis=T, targets_axis=S, axis=V, blank=blank),
              named_logits(x), ll.Named(y, (B, S), {S: TG_LENS}, sparse_dim=V))
    assert out.dims == (B,)
    assert_valid_close(out, ctc_alone(torch.log_softmax(x, -1), y, blank=blank), (B,))


def test_ctc_loss_of_log_probs_and_other_storage_orders():
    x, y = torch.log_softmax(logits_data(), -1), ctc_targets()
    out = run(lambda x, y: ll.ctc_loss(x, y, input_axis=T, targets_axis=S, axis=V, blank=0, logits_are_log_probs=True),
              ll.Named(x.permute(1, 2, 0), (T, V, B), {T: LENS}), ll.Named(y.t(), (S, B), {S: TG_LENS}, sparse_dim=V))
    assert_valid_close(out, ctc_alone(x, y, blank=0), (B,))


def test_ctc_loss_with_two_batch_dims():
    beam = ll.Dim("x_beam", 2)
    x = torch.stack([logits_data(1), logits_data(5)], dim=1)  # (batch, beam, time, vocab)
    y = torch.stack([ctc_targets(4), ctc_targets(6)], dim=2)  # (batch, labels, beam)
    out = run(lambda x, y: ll.ctc_loss(x, y, input_axis=T, targets_axis=S, axis=V, blank=0),
              ll.Named(x, (B, beam, T, V), {T: LENS}), ll.Named(y, (B, S, beam), {S: TG_LENS}, sparse_dim=V))
    assert set(out.dims) == {B, beam}
    expected = torch.stack([ctc_alone(torch.log_softmax(x[:, k], -1), y[:, :, k], blank=0) for k in range(2)], 1)
    assert_valid_close(out, expected, (B, beam))


def test_ctc_loss_of_an_impossible_alignment_is_inf():
    x = logits_data()
    y = torch.tensor([[1, 1, 1], [1, 2, 3], [2, 2, 2], [3, 4, 1]])
    tg_lens = torch.tensor([3, 3, 3, 3])
    # Entry 1: 3 labels in 2 frames; entry 2: the repeats 2 _ 2 _ 2 need 5 frames but there are 4.
    lens = torch.tensor([7, 2, 4, 6])
    out = run(lambda x, y: ll.ctc_loss(x, y, input_axis=T, targets_axis=S, axis=V, blank=0),
              ll.Named(x, (B, T, V), {T: lens}), ll.Named(y, (B, S), {S: tg_lens}, sparse_dim=V))
    loss = out.align(B)
    assert torch.isposinf(loss[1]) and torch.isposinf(loss[2])
    assert torch.isfinite(loss[[0, 3]]).all()


def test_ctc_loss_with_a_blank_outside_the_vocabulary_is_an_error():
    with pytest.raises(ll.errors.DimError):
        run(lambda x, y: ll.ctc_loss(x, y, input_axis=T, targets_axis=S, axis=V, blank=5),
            named_logits(logits_data()), ll.Named(ctc_targets(), (B, S), {S: TG_LENS}, sparse_dim=V))


def test_gradient_of_ctc_loss_matches_torch_ctc_of_each_sequence_alone():
    x, y = logits_data().requires_grad_(), ctc_targets()
    out = run(lambda x, y: ll.ctc_loss(x, y, input_axis=T, targets_axis=S, axis=V, blank=0),
              named_logits(x), ll.Named(y, (B, S), {S: TG_LENS}, sparse_dim=V))
    (got,) = torch.autograd.grad(masked_weighted_sum(out.align(B)), [x])
    (want,) = torch.autograd.grad(masked_weighted_sum(ctc_alone(torch.log_softmax(x, -1), y, blank=0)), [x])
    torch.testing.assert_close(got, want, **TOL)
    assert torch.equal(got[~TMASK], torch.zeros_like(got[~TMASK]))
