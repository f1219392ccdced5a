"""Ops that change dims (concat, split, slice, pad, split_dims, merge_dims, expand, replace_dim) and
ops that create tensors over dims (full, zeros, ones, range_over_dim, length), against plain PyTorch.

Along a dynamic dim the expected values are built per sequence from its valid frames only.
"""

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

T = ll.Dim("s_time")
T2 = ll.Dim("s_time2")
F = ll.Dim("s_feat", 4)
G = ll.Dim("s_gfeat", 2)
S6 = ll.Dim("s_six", 6)
LENS = torch.tensor([5, 2, 4])
LENS2 = torch.tensor([1, 3, 0])
TMASK = seq_mask(LENS, 5)


def data(seed=1, garbage=50.0):
    return with_garbage(randn(3, 5, 4, seed=seed), LENS, value=garbage)


def data2(seed=2, garbage=-70.0):
    return with_garbage(randn(3, 3, 4, seed=seed), LENS2, value=garbage)


def named(x):
    return ll.Named(x, (B, T, F), {T: LENS})


def named2(y):
    return ll.Named(y, (B, T2, F), {T2: LENS2})


def per_sequence(fn, *xs_and_lengths, size=None):
    """Stack ``fn(valid frames of each input)`` per batch entry, padded with zeros to `size` (or the longest)."""
    rows = []
    for b in range(3):
        rows.append(fn(*(x[b, :int(n[b])] for x, n in xs_and_lengths)))
    size = size or max(r.shape[0] for r in rows)
    out = torch.zeros(3, size, *rows[0].shape[1:], dtype=rows[0].dtype)
    for b, r in enumerate(rows):
        out[b, :r.shape[0]] = r
    return out, torch.tensor([r.shape[0] for r in rows])


# -- concat ---------------------------------------------------------------------------------------

def test_concat_along_static_dims_gives_the_sum_dim():
    x, y = data(), randn(3, 5, 2, seed=3)
    out = run(lambda x, y: ll.concat(x, y, axis=[F, G]), named(x), ll.Named(y, (B, T, G), {T: LENS}))
    assert F + G in out.dims and (F + G).size == 6
    assert_valid_close(out, torch.cat([x, y], dim=2), (B, T, F + G), TMASK[:, :, None])


def test_concat_without_axis_uses_the_dim_each_tensor_does_not_share():
    x, y = data(), randn(3, 5, 2, seed=3)
    out = run(lambda x, y: ll.concat(x, y), named(x), ll.Named(y, (B, T, G), {T: LENS}))
    assert_valid_close(out, torch.cat([x, y], dim=2), (B, T, F + G), TMASK[:, :, None])


def test_concat_into_a_given_out_dim():
    x, y = data(), randn(3, 5, 2, seed=3)
    out = run(lambda x, y: ll.concat(x, y, axis=[F, G], out_dim=S6), named(x), ll.Named(y, (B, T, G), {T: LENS}))
    assert S6 in out.dims
    assert_valid_close(out, torch.cat([x, y], dim=2), (B, T, S6), TMASK[:, :, None])


def test_concat_broadcasts_the_other_dims_by_identity():
    x, y = data(), randn(2, seed=4)  # y has only its feature dim
    out = run(lambda x, y: ll.concat(x, y, axis=[F, G]), named(x), ll.Named(y, (G,)))
    assert_valid_close(out, torch.cat([x, y.expand(3, 5, 2)], dim=2), (B, T, F + G), TMASK[:, :, None])


def test_concat_promotes_dtypes_like_torch_cat():
    x, k = data(), randint(-3, 3, (3, 5, 2), seed=5)
    out = run(lambda x, k: ll.concat(x, k, axis=[F, G]), named(x), ll.Named(k, (B, T, G), {T: LENS}))
    assert out.tensor.dtype == torch.float64
    assert_valid_close(out, torch.cat([x, k.double()], dim=2), (B, T, F + G), TMASK[:, :, None])


def test_concat_along_dynamic_dims_packs_each_sequences_valid_frames():
    x, y = data(), data2()
    out = run(lambda x, y: ll.concat(x, y, axis=[T, T2]), named(x), named2(y))
    assert set(out.dims) == {B, T + T2, F}
    expected, lens = per_sequence(lambda a, b: torch.cat([a, b]), (x, LENS), (y, LENS2), size=5 + 3)
    assert out.lengths[T + T2].tolist() == lens.tolist() == (LENS + LENS2).tolist()
    assert_valid_close(out, expected, (B, T + T2, F), seq_mask(lens, 8)[:, :, None])  # the padded sizes add up


def test_concat_of_a_dynamic_dim_with_itself():
    x = data()
    out = run(lambda x: ll.concat(x, x * 2.0, axis=T), named(x))
    expected, lens = per_sequence(lambda a: torch.cat([a, 2.0 * a]), (x, LENS))
    assert out.lengths[T + T].tolist() == (2 * LENS).tolist()
    assert_valid_close(out, expected, (B, T + T, F), seq_mask(lens, 10)[:, :, None])


def test_concat_of_a_dynamic_dim_with_a_static_dim():
    x, z = data(), randn(3, 2, 4, seed=6)
    out = run(lambda x, z: ll.concat(x, z, axis=[T, G]), named(x), ll.Named(z, (B, G, F)))
    expected, lens = per_sequence(lambda a, c: torch.cat([a, c]), (x, LENS), (z, torch.tensor([2, 2, 2])))
    assert out.lengths[T + G].tolist() == (LENS + 2).tolist()
    assert_valid_close(out, expected, (B, T + G, F), seq_mask(lens, 7)[:, :, None])


def test_concat_along_a_dynamic_dim_broadcasts_an_input_without_batch_dim():
    # v has the dynamic dim but not the batch dim: each batch entry uses its own length of v.
    x, v = data(), with_garbage(randn(3, 5, 4, seed=14), LENS, value=-70.0)[0]
    out = run(lambda x, v: ll.concat(x, v, axis=T), named(x), ll.Named(v, (T, F)))
    expected, lens = per_sequence(lambda a, c: torch.cat([a, c]), (x, LENS), (v.expand(3, 5, 4), LENS))
    assert_valid_close(out, expected, (B, T + T, F), seq_mask(lens, 10)[:, :, None])


def test_concat_of_three_dynamic_dims_in_another_storage_order():
    x, y = data(), data2()
    xt, yt = x.permute(1, 2, 0), y.permute(2, 0, 1)  # stored (time, feat, batch) and (feat, batch, time2)
    out = run(lambda x, y, z: ll.concat(y, x, z, axis=[T2, T, T2]),
              ll.Named(xt, (T, F, B), {T: LENS}), ll.Named(yt, (F, B, T2), {T2: LENS2}),
              ll.Named(yt * 10.0, (F, B, T2), {T2: LENS2}))
    new = T2 + T + T2
    expected, lens = per_sequence(lambda b, a, c: torch.cat([b, a, c]), (y, LENS2), (x, LENS), (10.0 * y, LENS2),
                                  size=3 + 5 + 3)
    assert out.lengths[new].tolist() == lens.tolist()
    assert_valid_close(out, expected, (B, new, F), seq_mask(lens, 11)[:, :, None])


def test_concat_of_a_static_dim_before_a_dynamic_dim():
    x, z = data(), randn(3, 2, 4, seed=6)
    out = run(lambda z, x: ll.concat(z, x, axis=[G, T]), ll.Named(z, (B, G, F)), named(x))
    expected, lens = per_sequence(lambda c, a: torch.cat([c, a]), (z, torch.tensor([2, 2, 2])), (x, LENS))
    assert out.lengths[G + T].tolist() == (LENS + 2).tolist()
    assert_valid_close(out, expected, (B, G + T, F), seq_mask(lens, 7)[:, :, None])


def test_concat_of_labels_keeps_their_sparse_dim():
    V, one = ll.Dim("s_vocab_c", 5), ll.Dim("s_one", 1)
    lab = with_garbage(randint(1, 5, (3, 5), seed=15), LENS, value=-1)

    def prepend_bos(lab):
        return ll.concat(ll.full(0, [B, one], sparse_dim=V), lab, axis=[one, T])

    out = run(prepend_bos, ll.Named(lab, (B, T), {T: LENS}, sparse_dim=V))
    assert out.sparse_dim == V
    expected, lens = per_sequence(lambda a: torch.cat([torch.zeros(1, dtype=a.dtype), a]), (lab, LENS))
    assert_valid_close(out, expected, (B, one + T), seq_mask(lens, 6), rtol=0, atol=0)


def test_gradient_of_concat_along_dynamic_dims_matches_per_sequence_torch():
    x, y = data().requires_grad_(), data2().requires_grad_()
    out = run(lambda x, y: ll.concat(x, y, axis=[T, T2]), named(x), named2(y))
    got_v = out.align(B, T + T2, F)
    m = seq_mask(LENS + LENS2, 8)[:, :, None]
    got = torch.autograd.grad(masked_weighted_sum(got_v, m), [x, y])
    expected, _ = per_sequence(lambda a, b: torch.cat([a, b]), (x, LENS), (y, LENS2), size=8)
    want = torch.autograd.grad(masked_weighted_sum(expected, m), [x, y])
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, **TOL)
    assert torch.equal(got[0][~TMASK], torch.zeros_like(got[0][~TMASK]))


def test_gradient_of_concat_along_static_dims_matches_torch():
    x, y = data().requires_grad_(), randn(3, 5, 2, seed=3).requires_grad_()
    out = run(lambda x, y: ll.concat(x, y, axis=[F, G]), named(x), ll.Named(y, (B, T, G), {T: LENS}))
    m = TMASK[:, :, None]
    got = torch.autograd.grad(masked_weighted_sum(out.align(B, T, F + G), m), [x, y])
    want = torch.autograd.grad(masked_weighted_sum(torch.cat([x, y], 2), m), [x, y])
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, **TOL)


# -- split ---------------------------------------------------------------------------------------

def test_split_of_a_sum_dim_gives_back_the_concatenated_parts():
    x, y = data(), randn(3, 5, 2, seed=3)
    out = run(lambda x, y: ll.split(ll.concat(x, y, axis=[F, G]), axis=F + G), named(x),
              ll.Named(y, (B, T, G), {T: LENS}))
    assert len(out) == 2
    assert_valid_close(out[0], x, (B, T, F), TMASK[:, :, None])
    assert_valid_close(out[1], y, (B, T, G), TMASK[:, :, None])


def test_split_into_given_parts_matches_torch_split():
    x = randn(3, 6, seed=7)
    out = run(lambda x: ll.split(x, axis=S6, parts=[G, F]), ll.Named(x, (B, S6)))
    a, b = torch.split(x, [2, 4], dim=1)
    assert_valid_close(out[0], a, (B, G))
    assert_valid_close(out[1], b, (B, F))


def test_split_of_a_dim_concatenated_with_itself():
    x = data()
    out = run(lambda x: ll.split(ll.concat(x, x * 3.0, axis=F), axis=F + F), named(x))
    assert_valid_close(out[0], x, (B, T, F), TMASK[:, :, None])
    assert_valid_close(out[1], 3.0 * x, (B, T, F), TMASK[:, :, None])


def test_split_of_labels_keeps_their_sparse_dim():
    V = ll.Dim("s_vocab_s", 5)
    lab = randint(0, 5, (3, 6), seed=16)
    out = run(lambda lab: ll.split(lab, axis=S6, parts=[G, F]), ll.Named(lab, (B, S6), sparse_dim=V))
    assert out[0].sparse_dim == V and out[1].sparse_dim == V
    assert torch.equal(out[1].align(B, F), lab[:, 2:])


def test_split_parts_must_add_up_to_the_axis():
    with pytest.raises(ll.errors.DimError):
        run(lambda x: ll.split(x, axis=S6, parts=[G, G]), ll.Named(randn(3, 6), (B, S6)))


def test_split_along_a_dynamic_dim_is_an_error():
    with pytest.raises(ll.errors.DimError):
        run(lambda x: ll.split(x, axis=T, parts=[G, G]), named(data()))


# -- slice ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("start,end", [(0, None), (1, 3), (1, None), (-3, -1), (0, -2), (2, 100), (3, 1)])
def test_slice_along_static_dim_has_python_semantics(start, end):
    x = randn(3, 6, 2, seed=8)
    out = run(lambda x: ll.slice(x, axis=S6, start=start, end=end), ll.Named(x, (B, S6, G)))
    expected = x[:, start:end]
    (new,) = [d for d in out.dims if d not in (B, G)]
    assert new.size == expected.shape[1]
    assert_valid_close(out, expected, (B, new, G))


@pytest.mark.parametrize("start,end", [(1, None), (0, -2), (1, -1), (0, None), (3, None)])
def test_slice_along_dynamic_dim_counts_end_from_each_sequences_own_end(start, end):
    x = data()
    out = run(lambda x: ll.slice(x, axis=T, start=start, end=end), named(x))
    (new,) = [d for d in out.dims if d not in (B, F)]
    size = 5 - start + (end or 0)  # the padded size loses the frames cut from every sequence
    expected, lens = per_sequence(lambda a: a[start:a.shape[0] + (end or 0)], (x, LENS), size=size)
    assert out.lengths[new].tolist() == lens.tolist()
    assert_valid_close(out, expected, (B, new, F), seq_mask(lens, size)[:, :, None])


@pytest.mark.parametrize("start,end", [(-1, None), (0, 2)])
def test_slice_along_dynamic_dim_rejects_positions_counted_from_the_padded_end(start, end):
    with pytest.raises(ll.errors.DimError):
        run(lambda x: ll.slice(x, axis=T, start=start, end=end), named(data()))


def test_gradient_of_slice_along_dynamic_dim_reaches_only_the_kept_frames():
    x = data().requires_grad_()
    out = run(lambda x: ll.slice(x, axis=T, start=1, end=-1), named(x))
    (new,) = [d for d in out.dims if d not in (B, F)]
    got_v = out.align(B, new, F)
    m = seq_mask(out.lengths[new], got_v.shape[1])[:, :, None]
    (got,) = torch.autograd.grad(masked_weighted_sum(got_v, m), [x])
    expected, _ = per_sequence(lambda a: a[1:-1], (x, LENS), size=3)
    (want,) = torch.autograd.grad(masked_weighted_sum(expected, m), [x])
    torch.testing.assert_close(got, want, **TOL)


# -- pad -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("left,right,value", [(1, 2, 0.0), (0, 3, -1.5), (2, 0, 7.0), (0, 0, 0.0)])
def test_pad_along_static_dim_matches_torch_pad(left, right, value):
    x = randn(3, 5, 4, seed=9)
    out = run(lambda x: ll.pad(x, axis=F, left=left, right=right, value=value), ll.Named(x, (B, T2, F),
                                                                                      {T2: torch.tensor([5, 5, 5])}))
    assert (F + (left + right)).size == 4 + left + right
    assert_valid_close(out, tF.pad(x, (left, right), value=value), (B, T2, F + (left + right)))


@pytest.mark.parametrize("left,right,value", [(1, 2, -1.5), (0, 3, 2.0), (2, 0, 7.0), (1, 1, 0.0)])
def test_pad_along_dynamic_dim_pads_after_each_sequences_last_frame(left, right, value):
    x = data()
    out = run(lambda x: ll.pad(x, axis=T, left=left, right=right, value=value), named(x))
    new = T + (left + right)
    expected, lens = per_sequence(lambda a: tF.pad(a.t(), (left, right), value=value).t(), (x, LENS))
    assert out.lengths[new].tolist() == lens.tolist() == (LENS + left + right).tolist()
    assert_valid_close(out, expected, (B, new, F), seq_mask(lens, 5 + left + right)[:, :, None])


def test_pad_along_dynamic_dim_in_another_storage_order():
    x = data()
    out = run(lambda x: ll.pad(x, axis=T, left=1, right=2, value=-1.5),
              ll.Named(x.permute(2, 1, 0), (F, T, B), {T: LENS}))
    expected, lens = per_sequence(lambda a: tF.pad(a.t(), (1, 2), value=-1.5).t(), (x, LENS))
    assert_valid_close(out, expected, (B, T + 3, F), seq_mask(lens, 8)[:, :, None])


def test_pad_of_labels_keeps_their_sparse_dim():
    V = ll.Dim("s_vocab_p", 5)
    lab = with_garbage(randint(1, 5, (3, 5), seed=17), LENS, value=-1)
    out = run(lambda lab: ll.pad(lab, axis=T, right=1, value=0), ll.Named(lab, (B, T), {T: LENS}, sparse_dim=V))
    assert out.sparse_dim == V
    expected, lens = per_sequence(lambda a: tF.pad(a, (0, 1)), (lab, LENS))
    assert_valid_close(out, expected, (B, T + 1), seq_mask(lens, 6), rtol=0, atol=0)


def test_gradient_of_pad_along_dynamic_dim_matches_per_sequence_torch():
    x = data().requires_grad_()
    out = run(lambda x: ll.pad(x, axis=T, left=1, right=2, value=3.0), named(x))
    m = seq_mask(LENS + 3, 8)[:, :, None]
    (got,) = torch.autograd.grad(masked_weighted_sum(out.align(B, T + 3, F), m), [x])
    expected, _ = per_sequence(lambda a: tF.pad(a.t(), (1, 2), value=3.0).t(), (x, LENS))
    (want,) = torch.autograd.grad(masked_weighted_sum(expected, m), [x])
    torch.testing.assert_close(got, want, **TOL)


def test_pad_with_negative_amount_is_an_error():
    with pytest.raises(ll.errors.DimError):
        run(lambda x: ll.pad(x, axis=T, left=-1), named(data()))


# -- shift_right ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("initial", [2.5, "frame"])
def test_shift_right_delays_each_sequence_by_one_frame(initial):
    """Frame 0 is `initial` (a number, or a frame over the other dims), frame t is frame t - 1."""
    x = data()
    first = randn(3, 4, seed=5) if initial == "frame" else torch.full((3, 4), initial, dtype=x.dtype)
    init = ll.Named(first, (B, F)) if initial == "frame" else initial
    out = run(lambda x, i: ll.shift_right(x, axis=T, initial=i), named(x), init)
    expected = torch.cat([first[:, None], x[:, :-1]], dim=1)
    assert_valid_close(out, expected, (B, T, F), TMASK[:, :, None])


def test_shift_right_of_labels_with_a_number_keeps_their_sparse_dim():
    V = ll.Dim("s_vocab_sr", 6)
    lab = with_garbage(randint(1, 6, (3, 5), seed=18), LENS, value=-1)
    out = run(lambda lab: ll.shift_right(lab, axis=T, initial=0), ll.Named(lab, (B, T), {T: LENS}, sparse_dim=V))
    assert out.sparse_dim == V and out.tensor.dtype == torch.int64
    expected = tF.pad(lab, (1, 0))[:, :5]
    assert_valid_close(out, expected, (B, T), TMASK, rtol=0, atol=0)


# -- split_dims, merge_dims ----------------------------------------------------------------------------

def test_split_dims_of_static_dim_is_a_reshape():
    x = randn(3, 6, seed=10)
    three = ll.Dim("s_three", 3)
    out = run(lambda x: ll.split_dims(x, axis=S6, dims=[G, three]), ll.Named(x, (B, S6)))
    assert out.dims == (B, G, three)
    assert_valid_close(out, x.reshape(3, 2, 3), (B, G, three))


def test_split_dims_derives_the_outer_dim_when_it_is_none():
    x = randn(3, 6, seed=10)
    three = ll.Dim("s_three2", 3)
    out = run(lambda x: ll.split_dims(x, axis=S6, dims=[None, three]), ll.Named(x, (B, S6)))
    outer = S6.ceildiv(3)
    assert outer.size == 2 and out.dims == (B, outer, three)
    assert_valid_close(out, x.reshape(3, 2, 3), (B, outer, three))


def test_split_dims_of_dynamic_dim_completes_the_last_frame_with_zeros():
    x = data()
    out = run(lambda x: ll.split_dims(x, axis=T, dims=[None, G]), named(x))
    outer = T.ceildiv(2)
    assert out.lengths[outer].tolist() == [3, 1, 2]

    def alone(a):
        n = a.shape[0]
        return tF.pad(a.t(), (0, -(-n // 2) * 2 - n)).t().reshape(-1, 2, 4)

    expected, lens = per_sequence(alone, (x, LENS))
    assert_valid_close(out, expected, (B, outer, G, F), seq_mask(lens, 3)[:, :, None, None])


def test_split_dims_of_an_input_without_batch_dim_completes_each_batch_entrys_last_frame():
    v = randn(5, 4, seed=18)
    out = run(lambda x, v: ll.split_dims(v, axis=T, dims=[None, G]), named(data()), ll.Named(v, (T, F)))
    outer = T.ceildiv(2)
    assert set(out.dims) == {B, outer, G, F}

    def alone(a):
        n = a.shape[0]
        return tF.pad(a.t(), (0, -(-n // 2) * 2 - n)).t().reshape(-1, 2, 4)

    expected, lens = per_sequence(alone, (v.expand(3, 5, 4), LENS))
    assert_valid_close(out, expected, (B, outer, G, F), seq_mask(lens, 3)[:, :, None, None])


def test_split_dims_of_static_dim_into_wrong_sizes_is_an_error():
    with pytest.raises(ll.errors.DimError):
        run(lambda x: ll.split_dims(x, axis=S6, dims=[G, G]), ll.Named(randn(3, 6), (B, S6)))


def test_merge_dims_of_static_dims_is_a_reshape_in_the_given_order():
    x = randn(3, 4, 2, seed=11)  # stored (batch, feat, g); merged as (g outer, feat inner)
    out = run(lambda x: ll.merge_dims(x, dims=[G, F]), ll.Named(x, (B, F, G)))
    assert out.dims == (B, G * F) and (G * F).size == 8
    assert_valid_close(out, x.permute(0, 2, 1).reshape(3, 8), (B, G * F))


def test_merge_dims_into_a_given_out_dim():
    eight = ll.Dim("s_eight", 8)
    x = randn(3, 4, 2, seed=11)
    out = run(lambda x: ll.merge_dims(x, dims=[F, G], out_dim=eight), ll.Named(x, (B, F, G)))
    assert_valid_close(out, x.reshape(3, 8), (B, eight))


def test_merge_dims_into_an_out_dim_of_the_wrong_size_is_an_error():
    with pytest.raises(ll.errors.DimError):
        run(lambda x: ll.merge_dims(x, dims=[F, G], out_dim=S6), ll.Named(randn(3, 4, 2), (B, F, G)))


def test_merge_dims_with_dynamic_outer_dim_keeps_the_valid_frames_packed():
    x = data()
    out = run(lambda x: ll.merge_dims(x, dims=[T, F]), named(x))
    new = T * F
    assert out.lengths[new].tolist() == (LENS * 4).tolist()
    expected, lens = per_sequence(lambda a: a.reshape(-1), (x, LENS))
    assert_valid_close(out, expected, (B, new), seq_mask(lens, 20))


def test_merge_dims_of_an_input_without_batch_dim():
    v = randn(5, 4, seed=19)
    out = run(lambda x, v: ll.merge_dims(v, dims=[T, F]), named(data()), ll.Named(v, (T, F)))
    expected, lens = per_sequence(lambda a: a.reshape(-1), (v.expand(3, 5, 4), LENS))
    assert_valid_close(out, expected, (B, T * F), seq_mask(lens, 20))


def test_merge_dims_with_dynamic_inner_dim_is_an_error():
    with pytest.raises(ll.errors.DimError):
        run(lambda x: ll.merge_dims(x, dims=[F, T]), named(data()))


def test_split_dims_then_merge_dims_restores_a_static_dim():
    x = randn(3, 6, seed=12)
    three = ll.Dim("s_three3", 3)
    out = run(lambda x: ll.merge_dims(ll.split_dims(x, axis=S6, dims=[G, three]), dims=[G, three], out_dim=S6),
              ll.Named(x, (B, S6)))
    assert_valid_close(out, x, (B, S6), rtol=0, atol=0)


# -- expand, replace_dim ---------------------------------------------------------------------------

def test_expand_repeats_the_values_along_the_new_dims():
    v = randn(3, 4, seed=13)
    out = run(lambda x, v: ll.expand(v, [T, G]), named(data()), ll.Named(v, (B, F)))
    assert set(out.dims) == {B, F, T, G}
    assert out.lengths[T].tolist() == LENS.tolist()
    assert_valid_close(out, v[:, :, None, None].expand(3, 4, 5, 2), (B, F, T, G), rtol=0, atol=0)


def test_expand_over_dims_already_present_is_a_no_op():
    x = data()
    out = run(lambda x: ll.expand(x, [F, B]), named(x))
    assert out.dims == (B, T, F)
    assert torch.equal(out.tensor, x)


def test_expand_of_a_python_number():
    out = run(lambda x: ll.expand(2.5, [B, F]), named(data()))
    assert torch.equal(out.align(B, F).double(), torch.full((3, 4), 2.5, dtype=torch.float64))


def test_replace_dim_renames_a_dim_keeping_the_values():
    f2 = ll.Dim("s_feat_renamed", 4)
    x = data()
    out = run(lambda x: ll.replace_dim(x, axis=F, new=f2), named(x))
    assert set(out.dims) == {B, T, f2}
    assert_valid_close(out, x, (B, T, f2), TMASK[:, :, None], rtol=0, atol=0)


def test_replace_dim_with_a_dim_of_another_size_is_an_error():
    with pytest.raises(ll.errors.DimError):
        run(lambda x: ll.replace_dim(x, axis=F, new=S6), named(data()))


# -- creating tensors ------------------------------------------------------------------------------

# Without a model, new float values take the program's float dtype from its first float input (float64 here).
@pytest.mark.parametrize("make,value,dtype", [
    (lambda: ll.full(1.5, [B, F]), 1.5, torch.float64),
    (lambda: ll.full(3, [B, F]), 3, torch.int64),
    (lambda: ll.full(True, [B, F]), True, torch.bool),
    (lambda: ll.full(2, [B, F], dtype="float64"), 2.0, torch.float64),
    (lambda: ll.zeros([B, F]), 0.0, torch.float64),
    (lambda: ll.ones([B, F]), 1.0, torch.float64),
    (lambda: ll.zeros([B, F], dtype="int32"), 0, torch.int32),
    (lambda: ll.ones([B, F], dtype=torch.float64), 1.0, torch.float64),
], ids=["full_float", "full_int", "full_bool", "full_dtype", "zeros", "ones", "zeros_int32", "ones_float64"])
def test_full_zeros_ones_fill_the_dims_with_the_value_and_dtype(make, value, dtype):
    out = run(lambda x: make(), ll.Named(randn(3, 4), (B, F)))
    assert out.dims == (B, F)
    assert out.tensor.dtype == dtype
    assert torch.equal(out.tensor, torch.full((3, 4), value, dtype=dtype))


def test_full_over_a_dynamic_dim_has_its_padded_size_and_lengths():
    out = run(lambda x: ll.full(7, [B, T]), named(data()))
    assert torch.equal(out.align(B, T), torch.full((3, 5), 7))
    assert out.lengths[T].tolist() == LENS.tolist()


def test_full_float_dtype_follows_the_models_parameters():
    class M(ll.Module):
        def __init__(self):
            super().__init__()
            self.w = ll.Parameter((F,), dtype=torch.float64)

        def forward(self, x):
            return ll.full(0.25, [B, F]) + self.w * 0.0

    out = run(M(), ll.Named(randn(3, 4), (B, F)))
    assert out.tensor.dtype == torch.float64
    assert torch.equal(out.align(B, F), torch.full((3, 4), 0.25, dtype=torch.float64))


def test_full_with_sparse_dim_gives_labels():
    V = ll.Dim("s_vocab", 5)
    out = run(lambda x: ll.full(4, [B], sparse_dim=V), named(data()))
    assert out.sparse_dim == V
    assert torch.equal(out.tensor, torch.full((3,), 4))


def test_full_with_sparse_dim_needs_an_integer_dtype():
    with pytest.raises(ll.errors.DTypeError):
        run(lambda x: ll.full(1.0, [B], sparse_dim=F), named(data()))


def test_range_over_static_dim_is_arange_with_the_dim_as_sparse_dim():
    out = run(lambda x: ll.range_over_dim(S6), named(data()))
    assert out.dims == (S6,) and out.sparse_dim == S6
    assert torch.equal(out.tensor, torch.arange(6))


def test_range_over_dynamic_dim_covers_its_padded_size():
    out = run(lambda x: ll.range_over_dim(T), named(data()))
    assert out.dims == (T,) and out.tensor.dtype == torch.int64
    assert torch.equal(out.tensor, torch.arange(5))


def test_range_over_dim_in_float_has_no_sparse_dim():
    out = run(lambda x: ll.range_over_dim(S6, dtype="float64"), named(data()))
    assert out.sparse_dim is None
    assert torch.equal(out.tensor, torch.arange(6, dtype=torch.float64))


def test_length_of_dynamic_dim_is_the_lengths_per_batch_entry():
    out = run(lambda x: ll.length(T), named(data()))
    assert out.dims == (B,) and out.tensor.dtype == torch.int64
    assert out.tensor.tolist() == LENS.tolist()


def test_length_of_derived_dynamic_dim_is_derived_from_its_origin():
    out = run(lambda x, y: (ll.length(T + T2), ll.length(T.ceildiv(2)), ll.length(T - 3)), named(data()),
              named2(data2()))
    assert out[0].tensor.tolist() == (LENS + LENS2).tolist()
    assert out[1].tensor.tolist() == [3, 1, 2]
    assert out[2].tensor.tolist() == [2, 0, 1]


def test_length_of_static_dim_is_its_size():
    out = run(lambda x: ll.length(F), named(data()))
    assert out.dims == () and int(out.tensor) == 4


def test_length_of_batch_dim_is_the_batch_size():
    out = run(lambda x: ll.length(B), named(data()))
    assert out.dims == () and int(out.tensor) == 3


def test_length_can_be_used_in_arithmetic_against_range():
    out = run(lambda x: ll.range_over_dim(T) < ll.length(T), named(data()))
    assert torch.equal(out.align(B, T), TMASK)
