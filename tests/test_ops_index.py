"""Indexing ops (gather, embedding, one_hot) against ``torch.gather``, ``F.embedding`` and ``F.one_hot``."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as tF
from hypothesis import given, settings
from hypothesis import strategies as st

import looplift as ll
from looplift.errors import InputError

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

T = ll.Dim("i_time")
F = ll.Dim("i_feat", 4)
V = ll.Dim("i_vocab", 6)
K = ll.Dim("i_picks", 2)
LENS = torch.tensor([5, 2, 4])
TMASK = seq_mask(LENS, 5)


def data(seed=1):
    return with_garbage(randn(3, 5, 4, seed=seed), LENS)


def named(x):
    return ll.Named(x, (B, T, F), {T: LENS})


def labels(vocab=6, seed=2, garbage=-12345):
    """(batch, time) labels in range at valid frames, out of range (garbage) in the padding."""
    return with_garbage(randint(0, vocab, (3, 5), seed=seed), LENS, value=garbage)


# -- gather ---------------------------------------------------------------------------------------

def test_gather_along_static_dim_picks_per_position_like_torch_gather():
    x, idx = data(), labels(4, seed=3)
    out = run(lambda x, i: ll.gather(x, index=i, axis=F), named(x), ll.Named(idx, (B, T), {T: LENS}, sparse_dim=F))
    assert set(out.dims) == {B, T}
    expected = torch.gather(x, 2, idx.clamp(0, 3)[:, :, None])[:, :, 0]
    assert_valid_close(out, expected, (B, T), TMASK)


def test_gather_along_dynamic_dim_picks_a_frame_per_batch_entry():
    x, idx = data(), torch.tensor([4, 1, 0])
    out = run(lambda x, i: ll.gather(x, index=i, axis=T), named(x), ll.Named(idx, (B,)))
    assert set(out.dims) == {B, F}
    assert_valid_close(out, x[torch.arange(3), idx], (B, F))


def test_gather_replaces_the_axis_by_the_dims_of_the_index():
    x, idx = data(), randint(0, 4, (2, 3), seed=4)  # index stored (picks, batch)
    out = run(lambda x, i: ll.gather(x, index=i, axis=F), named(x), ll.Named(idx, (K, B)))
    assert set(out.dims) == {B, T, K}
    expected = torch.stack([x[b, :, idx[:, b]] for b in range(3)])  # [b, t, k] = x[b, t, idx[k, b]]
    assert_valid_close(out, expected, (B, T, K), TMASK[:, :, None])


def test_gather_from_a_table_without_batch_dims():
    table, idx = randn(6, 4, seed=5), labels(6, seed=6)
    out = run(lambda w, i: ll.gather(w, index=i, axis=V), ll.Named(table, (V, F)),
              ll.Named(idx, (B, T), {T: LENS}, sparse_dim=V))
    assert set(out.dims) == {B, T, F}
    assert_valid_close(out, table[idx.clamp(0, 5)], (B, T, F), TMASK[:, :, None])


def test_gather_clamps_computed_out_of_range_indices_into_the_axis():
    x, idx = randn(3, 4, seed=7), torch.tensor([-2, 1, 98])
    out = run(lambda x, i: ll.gather(x, index=i - 1 + 2, axis=F), ll.Named(x, (B, F)), ll.Named(idx, (B,)))
    assert_valid_close(out, torch.stack([x[0, 0], x[1, 2], x[2, 3]]), (B,))


def test_gather_checks_an_index_given_as_program_input_at_the_call():
    x, idx = randn(3, 4, seed=7), torch.tensor([0, 2, 99])
    with pytest.raises(InputError, match="label 99 at \\(batch 2\\) is not in its vocabulary"):
        run(lambda x, i: ll.gather(x, index=i, axis=F), ll.Named(x, (B, F)), ll.Named(idx, (B,)))


def test_gather_keeps_the_sparse_dim_of_the_gathered_labels():
    lab, idx = randint(0, 6, (3, 4), seed=8), torch.tensor([1, 3, 0])
    out = run(lambda x, i: ll.gather(x, index=i, axis=F), ll.Named(lab, (B, F), sparse_dim=V), ll.Named(idx, (B,)))
    assert out.sparse_dim == V
    assert torch.equal(out.tensor, lab[torch.arange(3), idx])


def test_gather_with_a_python_int_index():
    x = data()
    out = run(lambda x: ll.gather(x, index=2, axis=F), named(x))
    assert_valid_close(out, x[:, :, 2], (B, T), TMASK)


def test_gather_rejects_a_float_index():
    with pytest.raises(ll.errors.DTypeError):
        run(lambda x: ll.gather(x, index=ll.sum(x, axis=F), axis=F), named(data()))


def test_gradient_of_gather_matches_torch_gather():
    x, idx = data().requires_grad_(), labels(4, seed=3)
    out = run(lambda x, i: ll.gather(x, index=i, axis=F), named(x), ll.Named(idx, (B, T), {T: LENS}, sparse_dim=F))
    (got,) = torch.autograd.grad(masked_weighted_sum(out.align(B, T), TMASK), [x])
    expected = torch.gather(x, 2, idx.clamp(0, 3)[:, :, None])[:, :, 0]
    (want,) = torch.autograd.grad(masked_weighted_sum(expected, TMASK), [x])
    torch.testing.assert_close(got, want, **TOL)


def test_gradient_of_gather_along_dynamic_dim_matches_torch_indexing():
    x, idx = data().requires_grad_(), torch.tensor([4, 1, 0])
    out = run(lambda x, i: ll.gather(x, index=i, axis=T), named(x), ll.Named(idx, (B,)))
    (got,) = torch.autograd.grad(masked_weighted_sum(out.align(B, F)), [x])
    (want,) = torch.autograd.grad(masked_weighted_sum(x[torch.arange(3), idx]), [x])
    torch.testing.assert_close(got, want, **TOL)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_gather_picks_like_fancy_indexing_for_any_layout_of_shared_and_own_dims(draw):
    """Any split of dims into shared (batch) dims, the index's own dims and x's own dims, in any storage
    order of both operands: ``out[s, i, x] = x[s, index[s, i], x]``, and its gradient is torch's."""
    n_shared, n_index, n_x = (draw.draw(st.integers(0, 2)) for _ in range(3))
    sizes = draw.draw(st.lists(st.integers(1, 4), min_size=n_shared + n_index + n_x + 1,
                               max_size=n_shared + n_index + n_x + 1))
    dims = [ll.Dim(f"g{k}", n) for k, n in enumerate(sizes)]
    shared, index_own, x_own = dims[:n_shared], dims[n_shared:n_shared + n_index], dims[n_shared + n_index:-1]
    axis = dims[-1]
    x_dims = draw.draw(st.permutations(shared + [axis] + x_own))
    i_dims = draw.draw(st.permutations(shared + index_own))
    g = torch.Generator().manual_seed(draw.draw(st.integers(0, 2**16)))
    x = torch.randn([d.size for d in x_dims], generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, axis.size, [d.size for d in i_dims], generator=g)
    out = run(lambda v, i: ll.gather(v, index=i, axis=axis), ll.Named(x, tuple(x_dims)),
              ll.Named(idx, tuple(i_dims), sparse_dim=axis))
    got = out.align(*shared, *index_own, *x_own)
    xa = x.permute([x_dims.index(d) for d in shared + [axis] + x_own])
    ia = idx.permute([i_dims.index(d) for d in shared + index_own])
    s_n, a_n = math.prod(d.size for d in shared), axis.size
    i_n, x_n = math.prod(d.size for d in index_own), math.prod(d.size for d in x_own)
    flat = xa.reshape(s_n, a_n, x_n)[torch.arange(s_n)[:, None], ia.reshape(s_n, i_n)]
    want = flat.reshape([d.size for d in shared + index_own + x_own])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    weights = torch.randn(want.shape, generator=g, dtype=torch.float64)
    (g_got,) = torch.autograd.grad((got * weights).sum(), [x])
    (g_want,) = torch.autograd.grad((want * weights).sum(), [x])
    torch.testing.assert_close(g_got, g_want, **TOL)


# -- embedding ------------------------------------------------------------------------------------

@pytest.mark.parametrize("table_layout", ["vocab_first", "vocab_last"])
def test_embedding_looks_up_rows_like_torch_embedding(table_layout):
    table, lab = randn(6, 4, seed=9), labels(6, seed=10)
    stored = (table, (V, F)) if table_layout == "vocab_first" else (table.t().contiguous(), (F, V))
    out = run(ll.embedding, ll.Named(*stored), ll.Named(lab, (B, T), {T: LENS}, sparse_dim=V))
    assert set(out.dims) == {B, T, F}
    assert_valid_close(out, tF.embedding(lab.clamp(0, 5), table), (B, T, F), TMASK[:, :, None])


@pytest.mark.parametrize("table_layout", ["vocab_first", "vocab_last"])
def test_gradient_of_embedding_matches_torch_embedding(table_layout):
    table, lab = randn(6, 4, seed=9).requires_grad_(), labels(6, seed=10)
    stored = table if table_layout == "vocab_first" else table.t()
    dims = (V, F) if table_layout == "vocab_first" else (F, V)
    out = run(ll.embedding, ll.Named(stored, dims), ll.Named(lab, (B, T), {T: LENS}, sparse_dim=V))
    (got,) = torch.autograd.grad(masked_weighted_sum(out.align(B, T, F), TMASK[:, :, None]), [table])
    want_v = tF.embedding(lab.clamp(0, 5), table)
    (want,) = torch.autograd.grad(masked_weighted_sum(want_v, TMASK[:, :, None]), [table])
    torch.testing.assert_close(got, want, **TOL)


def test_embedding_through_the_nn_module_matches_torch():
    torch.manual_seed(0)
    emb = ll.nn.Embedding(V, F).double()
    lab = labels(6, seed=11)
    out = run(emb, ll.Named(lab, (B, T), {T: LENS}, sparse_dim=V))
    (got,) = torch.autograd.grad(masked_weighted_sum(out.align(B, T, F), TMASK[:, :, None]), [emb.weight])
    want_v = tF.embedding(lab.clamp(0, 5), emb.weight)
    assert_valid_close(out, want_v, (B, T, F), TMASK[:, :, None])
    (want,) = torch.autograd.grad(masked_weighted_sum(want_v, TMASK[:, :, None]), [emb.weight])
    torch.testing.assert_close(got, want, **TOL)


def test_embedding_needs_labels_with_a_sparse_dim():
    with pytest.raises(ll.errors.DTypeError):
        run(ll.embedding, ll.Named(randn(6, 4), (V, F)), ll.Named(labels(6), (B, T), {T: LENS}))


# -- one_hot --------------------------------------------------------------------------------------

def test_one_hot_of_labels_matches_torch_one_hot_in_the_float_dtype():
    lab = labels(6, seed=12)
    out = run(ll.one_hot, ll.Named(lab, (B, T), {T: LENS}, sparse_dim=V))
    assert out.dims == (B, T, V)
    assert out.tensor.dtype == torch.get_default_dtype()
    assert_valid_close(out, tF.one_hot(lab.clamp(0, 5), 6).float(), (B, T, V), TMASK[:, :, None], rtol=0, atol=0)


def test_one_hot_in_a_given_dtype():
    lab = labels(6, seed=12)
    out = run(lambda i: ll.one_hot(i, dtype="int64"), ll.Named(lab, (B, T), {T: LENS}, sparse_dim=V))
    assert out.tensor.dtype == torch.int64
    assert torch.equal(out.align(B, T, V)[TMASK], tF.one_hot(lab.clamp(0, 5), 6)[TMASK])


def test_one_hot_needs_a_static_sparse_dim():
    with pytest.raises(ll.errors.DTypeError):
        run(lambda i, x: ll.one_hot(i), ll.Named(torch.tensor([1, 0, 2]), (B,), sparse_dim=T), named(data()))
