"""Reductions (sum, mean, max, min, logsumexp, argmax) and normalizations (softmax, log_softmax)
against plain PyTorch, computed per sequence over dynamic dims."""

from __future__ import annotations

import os
import sys

import pytest
import torch

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

T = ll.Dim("r_time")
F = ll.Dim("r_feat", 4)
LENS = torch.tensor([5, 2, 4])
TMASK = seq_mask(LENS, 5)  # (batch, time)


def data(seed=1, garbage=50.0):
    return with_garbage(randn(3, 5, 4, seed=seed), LENS, value=garbage)


def named(x):
    return ll.Named(x, (B, T, F), {T: LENS})


REDUCTIONS = [
    ("sum", ll.sum, lambda v, d: v.sum(dim=d)),
    ("mean", ll.mean, lambda v, d: v.mean(dim=d)),
    ("max", ll.max, lambda v, d: v.amax(dim=d)),
    ("min", ll.min, lambda v, d: v.amin(dim=d)),
    ("logsumexp", ll.logsumexp, lambda v, d: torch.logsumexp(v, dim=d)),
]
RED_IDS = [r[0] for r in REDUCTIONS]


@pytest.mark.parametrize("name,ll_fn,torch_fn", REDUCTIONS, ids=RED_IDS)
def test_reduction_over_dynamic_dim_uses_only_each_sequences_frames(name, ll_fn, torch_fn):
    x = data()
    out = run(lambda x: ll_fn(x, axis=T), named(x))
    assert set(out.dims) == {B, F}
    expected = torch.stack([torch_fn(x[b, :n], 0) for b, n in enumerate(LENS.tolist())])
    assert_valid_close(out, expected, (B, F))


@pytest.mark.parametrize("name,ll_fn,torch_fn", REDUCTIONS, ids=RED_IDS)
def test_reduction_over_static_dim_matches_torch(name, ll_fn, torch_fn):
    x = data()
    out = run(lambda x: ll_fn(x, axis=F), named(x))
    assert set(out.dims) == {B, T}
    assert out.lengths[T].tolist() == LENS.tolist()
    assert_valid_close(out, torch_fn(x, 2), (B, T), TMASK)


@pytest.mark.parametrize("name,ll_fn,torch_fn", REDUCTIONS, ids=RED_IDS)
def test_reduction_over_several_dims_at_once(name, ll_fn, torch_fn):
    x = data()
    out = run(lambda x: ll_fn(x, axis=[F, T]), named(x))
    assert out.dims == (B,)
    expected = torch.stack([torch_fn(x[b, :n].reshape(-1), 0) for b, n in enumerate(LENS.tolist())])
    assert_valid_close(out, expected, (B,))


@pytest.mark.parametrize("name,ll_fn,torch_fn", REDUCTIONS, ids=RED_IDS)
def test_reduction_over_batch_skips_padding_of_shorter_sequences(name, ll_fn, torch_fn):
    # Summing over the batch mixes entries of different lengths: at frame t only the entries
    # longer than t take part.
    x = data()
    out = run(lambda x: ll_fn(x, axis=B), named(x))
    assert set(out.dims) == {T, F}
    expected = torch.stack([torch_fn(x[TMASK[:, t], t], 0) for t in range(5)])
    assert_valid_close(out, expected, (T, F))


@pytest.mark.parametrize("name,ll_fn,torch_fn", REDUCTIONS, ids=RED_IDS)
def test_reduction_result_does_not_depend_on_padding_values(name, ll_fn, torch_fn):
    a = run(lambda x: ll_fn(x, axis=T), named(data(garbage=50.0)))
    b = run(lambda x: ll_fn(x, axis=T), named(data(garbage=-70.0)))
    torch.testing.assert_close(a.align(B, F), b.align(B, F), rtol=0, atol=0)


@pytest.mark.parametrize("name,ll_fn,torch_fn", [r for r in REDUCTIONS if r[0] in ("sum", "max", "min")],
                         ids=["sum", "max", "min"])
def test_integer_reduction_over_dynamic_dim_keeps_integer_dtype(name, ll_fn, torch_fn):
    x = with_garbage(randint(-20, 20, (3, 5, 4), seed=2), LENS, value=1000)
    out = run(lambda x: ll_fn(x, axis=T), named(x))
    assert out.tensor.dtype == torch.int64
    expected = torch.stack([torch_fn(x[b, :n], 0) for b, n in enumerate(LENS.tolist())])
    assert torch.equal(out.align(B, F), expected)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int64])
def test_sum_of_integers_gives_int64_like_torch_sum(dtype):
    x = with_garbage(randint(0, 20, (3, 5, 4), seed=3), LENS, value=100).to(dtype)
    seen = {}

    def fn(x):
        s = ll.sum(x, axis=T)
        seen["traced"] = s.dtype
        return s

    out = run(fn, named(x))
    expected = torch.stack([x[b, :n].sum(0) for b, n in enumerate(LENS.tolist())])
    assert expected.dtype == torch.int64
    assert seen["traced"] == out.tensor.dtype == torch.int64
    assert torch.equal(out.align(B, F), expected)


def test_sum_of_bool_counts_the_true_values_of_each_sequence():
    x = data()
    out = run(lambda x: ll.sum(x > 0, axis=T), named(x))
    assert out.tensor.dtype == torch.int64
    expected = torch.stack([(x[b, :n] > 0).sum(0) for b, n in enumerate(LENS.tolist())])
    assert torch.equal(out.align(B, F), expected)


def test_mean_over_a_tensor_without_batch_dim_uses_each_batch_entrys_length():
    # The tensor has the dynamic dim but not the batch dim its lengths run over: the result gains the batch dim.
    v = randn(5, 4, seed=3)
    out = run(lambda x, v: ll.mean(v, axis=T), named(data()), ll.Named(v, (T, F)))
    assert set(out.dims) == {B, F}
    expected = torch.stack([v[:n].mean(0) for n in LENS.tolist()])
    assert_valid_close(out, expected, (B, F))


def test_reduction_names_a_dim_the_tensor_lacks_is_an_error():
    with pytest.raises(ll.errors.DimError):
        run(lambda x: ll.sum(x, axis=ll.Dim("r_other", 3)), named(data()))


@pytest.mark.parametrize("name,ll_fn", [("mean", ll.mean), ("logsumexp", ll.logsumexp)])
def test_float_reduction_rejects_integers(name, ll_fn):
    with pytest.raises(ll.errors.DTypeError):
        run(lambda x: ll_fn(x, axis=T), named(randint(0, 5, (3, 5, 4))))


# -- argmax ------------------------------------------------------------------------------------------

def test_argmax_over_dynamic_dim_ignores_padding_and_marks_the_axis_as_sparse_dim():
    x = data(garbage=100.0)  # padding larger than every valid value
    out = run(lambda x: ll.argmax(x, axis=T), named(x))
    assert out.tensor.dtype == torch.int64
    assert out.sparse_dim == T
    expected = torch.stack([x[b, :n].argmax(0) for b, n in enumerate(LENS.tolist())])
    assert torch.equal(out.align(B, F), expected)


def test_argmax_over_static_dim_matches_torch():
    x = data()
    out = run(lambda x: ll.argmax(x, axis=F), named(x))
    assert out.sparse_dim == F
    assert torch.equal(out.align(B, T)[TMASK], x.argmax(2)[TMASK])


def test_argmax_of_integers_over_dynamic_dim():
    x = with_garbage(randint(-50, 50, (3, 5, 4), seed=4), LENS, value=99)
    out = run(lambda x: ll.argmax(x, axis=T), named(x))
    expected = torch.stack([x[b, :n].argmax(0) for b, n in enumerate(LENS.tolist())])
    assert torch.equal(out.align(B, F), expected)


def test_argmax_takes_a_single_dim():
    with pytest.raises(ll.errors.DimError):
        run(lambda x: ll.argmax(x, axis=[T, F]), named(data()))


# -- softmax, log_softmax ------------------------------------------------------------------------------

NORMALIZE = [("softmax", ll.softmax, torch.softmax), ("log_softmax", ll.log_softmax, torch.log_softmax)]


@pytest.mark.parametrize("name,ll_fn,torch_fn", NORMALIZE, ids=["softmax", "log_softmax"])
def test_normalization_over_dynamic_dim_is_per_sequence(name, ll_fn, torch_fn):
    x = data()
    out = run(lambda x: ll_fn(x, axis=T), named(x))
    assert set(out.dims) == {B, T, F}
    expected = torch.zeros(3, 5, 4, dtype=torch.float64)
    for b, n in enumerate(LENS.tolist()):
        expected[b, :n] = torch_fn(x[b, :n], 0)
    assert_valid_close(out, expected, (B, T, F), TMASK[:, :, None])


@pytest.mark.parametrize("name,ll_fn,torch_fn", NORMALIZE, ids=["softmax", "log_softmax"])
def test_normalization_over_static_dim_matches_torch(name, ll_fn, torch_fn):
    x = data()
    out = run(lambda x: ll_fn(x, axis=F), named(x))
    assert_valid_close(out, torch_fn(x, 2), (B, T, F), TMASK[:, :, None])


def test_softmax_gives_padding_frames_probability_zero():
    out = run(lambda x: ll.softmax(x, axis=T), named(data()))
    probs = out.align(B, T, F)
    assert torch.equal(probs[~TMASK], torch.zeros_like(probs[~TMASK]))
    torch.testing.assert_close(probs.sum(1), torch.ones(3, 4, dtype=torch.float64), **TOL)


@pytest.mark.parametrize("name,ll_fn,torch_fn", NORMALIZE, ids=["softmax", "log_softmax"])
def test_normalization_result_does_not_depend_on_padding_values(name, ll_fn, torch_fn):
    a = run(lambda x: ll_fn(x, axis=T), named(data(garbage=50.0))).align(B, T, F)
    b = run(lambda x: ll_fn(x, axis=T), named(data(garbage=-70.0))).align(B, T, F)
    torch.testing.assert_close(a[TMASK], b[TMASK], rtol=0, atol=0)


# -- gradients ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,ll_fn,torch_fn", REDUCTIONS, ids=RED_IDS)
def test_gradient_of_reduction_over_dynamic_dim_matches_per_sequence_torch(name, ll_fn, torch_fn):
    x = data().requires_grad_()
    out = run(lambda x: ll_fn(x, axis=T), named(x))
    (got,) = torch.autograd.grad(masked_weighted_sum(out.align(B, F)), [x])
    expected = torch.stack([torch_fn(x[b, :n], 0) for b, n in enumerate(LENS.tolist())])
    (want,) = torch.autograd.grad(masked_weighted_sum(expected), [x])
    torch.testing.assert_close(got, want, **TOL)
    assert torch.equal(got[~TMASK], torch.zeros_like(got[~TMASK]))  # padding gets no gradient


@pytest.mark.parametrize("name,ll_fn,torch_fn", REDUCTIONS, ids=RED_IDS)
def test_gradient_of_reduction_over_static_dim_matches_torch(name, ll_fn, torch_fn):
    x = data().requires_grad_()
    out = run(lambda x: ll_fn(x, axis=F), named(x))
    (got,) = torch.autograd.grad(masked_weighted_sum(out.align(B, T), TMASK), [x])
    (want,) = torch.autograd.grad(masked_weighted_sum(torch_fn(x, 2), TMASK), [x])
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("axis_name", ["time", "feat"])
@pytest.mark.parametrize("name,ll_fn,torch_fn", NORMALIZE, ids=["softmax", "log_softmax"])
def test_gradient_of_normalization_matches_per_sequence_torch(name, ll_fn, torch_fn, axis_name):
    x = data().requires_grad_()
    axis = T if axis_name == "time" else F
    out = run(lambda x: ll_fn(x, axis=axis), named(x))
    (got,) = torch.autograd.grad(masked_weighted_sum(out.align(B, T, F), TMASK[:, :, None]), [x])
    if axis is T:
        rows = [torch_fn(x[b, :n], 0) for b, n in enumerate(LENS.tolist())]
        expected = torch.stack([torch.cat([r, torch.zeros(5 - r.shape[0], 4, dtype=r.dtype)]) for r in rows])
    else:
        expected = torch_fn(x, 2)
    (want,) = torch.autograd.grad(masked_weighted_sum(expected, TMASK[:, :, None]), [x])
    torch.testing.assert_close(got, want, **TOL)
    assert torch.equal(got[~TMASK], torch.zeros_like(got[~TMASK]))
