"""Neural-network ops (conv1d, dropout, layer_norm) against ``torch.nn.functional``."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as tF

import looplift as ll

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_ops_support import TOL, B, assert_valid_close, masked_weighted_sum, randn, run, seq_mask, with_garbage

T = ll.Dim("n_time")
F = ll.Dim("n_feat", 4)
G = ll.Dim("n_g", 2)
C = ll.Dim("n_channels", 6)
LENS = torch.tensor([9, 3, 6, 1])
TMASK = seq_mask(LENS, 9)


def data(seed=1):
    return with_garbage(randn(4, 9, 4, seed=seed), LENS)


def named(x):
    return ll.Named(x, (B, T, F), {T: LENS})


# -- conv1d ---------------------------------------------------------------------------------------

def conv_alone(xs, w, b, *, stride, dilation, padding, groups):
    """torch conv1d of one sequence (time, in) -> (time', out).

    "same" is torch's stride-1 ``padding="same"``, subsampled by the stride; "valid" is torch's padding 0.
    """
    span = (w.shape[-1] - 1) * dilation
    v = xs.t()[None]
    if padding == "same":
        y = tF.conv1d(v, w, b, dilation=dilation, padding="same", groups=groups)[..., ::stride]
    elif xs.shape[0] <= span:
        return torch.zeros(0, w.shape[0], dtype=xs.dtype)
    else:
        y = tF.conv1d(v, w, b, stride=stride, dilation=dilation, groups=groups)
    return y[0].t()


def conv_expected(x, w, b, **kw):
    rows = [conv_alone(x[i, :n], w, b, **kw) for i, n in enumerate(LENS.tolist())]
    lens = torch.tensor([r.shape[0] for r in rows])
    size = max(int(lens.max()), 1)
    out = torch.zeros(4, size, w.shape[0], dtype=x.dtype)
    for i, r in enumerate(rows):
        out[i, :r.shape[0]] = r
    return out, lens


def out_time(out):
    (d,) = [d for d in out.dims if d not in (B, C)]
    return d


CONV_CASES = [
    dict(k=3, stride=1, dilation=1, padding="same"),
    dict(k=4, stride=1, dilation=1, padding="same"),
    dict(k=3, stride=2, dilation=1, padding="same"),
    dict(k=2, stride=3, dilation=1, padding="same"),
    dict(k=3, stride=1, dilation=2, padding="same"),
    dict(k=3, stride=2, dilation=2, padding="same"),
    dict(k=1, stride=1, dilation=1, padding="valid"),
    dict(k=3, stride=1, dilation=1, padding="valid"),
    dict(k=3, stride=2, dilation=1, padding="valid"),
    dict(k=2, stride=1, dilation=3, padding="valid"),
    dict(k=3, stride=3, dilation=2, padding="valid"),
]
CONV_IDS = ["k{k}-s{stride}-d{dilation}-{padding}".format(**c) for c in CONV_CASES]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_conv1d_over_dynamic_dim_equals_each_sequence_convolved_alone(case):
    k = ll.Dim("n_filter", case["k"])
    x, w, b = data(), randn(6, 4, case["k"], seed=2), randn(6, seed=3)
    kw = dict(stride=case["stride"], dilation=case["dilation"], padding=case["padding"])
    out = run(lambda x, w, b: ll.conv1d(x, w, b, axis=T, in_dim=F, out_dim=C, filter_dim=k, **kw),
              named(x), ll.Named(w, (C, F, k)), ll.Named(b, (C,)))
    new = out_time(out)
    expected, lens = conv_expected(x, w, b, groups=1, **kw)
    assert out.lengths[new].tolist() == lens.tolist()
    got = out.align(B, new, C)
    assert got.shape[1] == max(conv_alone(x[0], w, b, groups=1, **kw).shape[0], 0)  # padded size of the longest
    m = seq_mask(lens, got.shape[1])[:, :, None]
    expected = expected[:, :got.shape[1]]
    assert_valid_close(out, expected, (B, new, C), m)


def test_conv1d_without_bias_and_with_filter_stored_in_another_order():
    k = ll.Dim("n_filter3", 3)
    x, w = data(), randn(6, 4, 3, seed=4)
    out = run(lambda x, w: ll.conv1d(x, w, axis=T, in_dim=F, out_dim=C, filter_dim=k),
              named(x), ll.Named(w.permute(2, 0, 1).contiguous(), (k, C, F)))
    expected, lens = conv_expected(x, w, None, stride=1, dilation=1, padding="same", groups=1)
    assert_valid_close(out, expected, (B, T, C), TMASK[:, :, None])


def test_conv1d_with_groups_matches_torch_grouped_conv():
    k = ll.Dim("n_filter3g", 3)
    x, w, b = data(), randn(6, 2, 3, seed=5), randn(6, seed=6)  # 2 groups: each output sees 2 of 4 inputs
    out = run(lambda x, w, b: ll.conv1d(x, w, b, axis=T, in_dim=F, out_dim=C, filter_dim=k, groups=2),
              named(x), ll.Named(w, (C, G, k)), ll.Named(b, (C,)))
    expected, _ = conv_expected(x, w, b, stride=1, dilation=1, padding="same", groups=2)
    assert_valid_close(out, expected, (B, T, C), TMASK[:, :, None])


def test_conv1d_over_static_dim_with_extra_batch_dims():
    k, S = ll.Dim("n_filter2s", 2), ll.Dim("n_space", 7)
    x, w = randn(4, 2, 7, 4, seed=7), randn(6, 4, 2, seed=8)  # (batch, g, space, feat)
    out = run(lambda x, w: ll.conv1d(x, w, axis=S, in_dim=F, out_dim=C, filter_dim=k, padding="valid"),
              ll.Named(x, (B, G, S, F)), ll.Named(w, (C, F, k)))
    new = S - 1
    expected = tF.conv1d(x.reshape(8, 7, 4).transpose(1, 2), w).reshape(4, 2, 6, 6)
    assert_valid_close(out, expected, (B, G, C, new))


def test_conv1d_of_an_input_without_batch_dim_zeroes_each_batch_entrys_padding():
    # v has the dynamic dim but not the batch dim its lengths run over: the result gains the batch dim.
    k = ll.Dim("n_filter3v", 3)
    v, w = randn(9, 4, seed=17), randn(6, 4, 3, seed=18)
    out = run(lambda x, v, w: ll.conv1d(v, w, axis=T, in_dim=F, out_dim=C, filter_dim=k),
              named(data()), ll.Named(v, (T, F)), ll.Named(w, (C, F, k)))
    assert set(out.dims) == {B, T, C}
    expected, _ = conv_expected(v.expand(4, 9, 4), w, None, stride=1, dilation=1, padding="same", groups=1)
    assert_valid_close(out, expected, (B, T, C), TMASK[:, :, None])


def test_conv1d_with_unknown_padding_mode_is_an_error():
    k = ll.Dim("n_filter3e", 3)
    with pytest.raises(ll.errors.DimError):
        run(lambda x, w: ll.conv1d(x, w, axis=T, in_dim=F, out_dim=C, filter_dim=k, padding="full"),
            named(data()), ll.Named(randn(6, 4, 3), (C, F, k)))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[5], CONV_CASES[8]],
                         ids=[CONV_IDS[1], CONV_IDS[5], CONV_IDS[8]])
def test_gradient_of_conv1d_matches_per_sequence_torch(case):
    k = ll.Dim("n_filter", case["k"])
    x = data().requires_grad_()
    w, b = randn(6, 4, case["k"], seed=2).requires_grad_(), randn(6, seed=3).requires_grad_()
    kw = dict(stride=case["stride"], dilation=case["dilation"], padding=case["padding"])
    out = run(lambda x, w, b: ll.conv1d(x, w, b, axis=T, in_dim=F, out_dim=C, filter_dim=k, **kw),
              named(x), ll.Named(w, (C, F, k)), ll.Named(b, (C,)))
    new = out_time(out)
    got_v = out.align(B, new, C)
    expected, lens = conv_expected(x, w, b, groups=1, **kw)
    m = seq_mask(lens, got_v.shape[1])[:, :, None]
    got = torch.autograd.grad(masked_weighted_sum(got_v, m), [x, w, b])
    want = torch.autograd.grad(masked_weighted_sum(expected[:, :got_v.shape[1]], m), [x, w, b])
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, **TOL)
    assert torch.equal(got[0][~TMASK], torch.zeros_like(got[0][~TMASK]))


# -- dropout --------------------------------------------------------------------------------------

def test_dropout_in_eval_mode_is_the_identity():
    x = data()
    out = run(lambda x: ll.dropout(x, 0.5), named(x), mode="eval")
    assert torch.equal(out.align(B, T, F), x)


def test_dropout_with_zero_probability_is_the_identity_in_train_mode():
    x = data()
    out = run(lambda x: ll.dropout(x, 0.0), named(x), mode="train")
    assert torch.equal(out.align(B, T, F), x)


@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_dropout_in_train_mode_zeroes_some_values_and_scales_the_rest(p):
    x = randn(16, 50, 4, seed=9).abs() + 0.1  # no zeros in the input
    out = run(lambda x: ll.dropout(x, p), ll.Named(x, (B, T, F), {T: torch.full((16,), 50)}), mode="train",
              seed=123)
    y = out.align(B, T, F)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), **TOL)
    n = kept.numel()
    keep_rate = kept.double().mean().item()
    assert abs(keep_rate - (1 - p)) < 4 * ((p * (1 - p) / n) ** 0.5)  # within 4 standard deviations


def test_dropout_with_the_same_seed_gives_the_same_mask():
    x = data()
    a = run(lambda x: ll.dropout(x, 0.5), named(x), mode="train", seed=5).tensor
    b = run(lambda x: ll.dropout(x, 0.5), named(x), mode="train", seed=5).tensor
    c = run(lambda x: ll.dropout(x, 0.5), named(x), mode="train", seed=6).tensor
    assert torch.equal(a, b)
    assert not torch.equal(a != 0, c != 0)


def test_dropout_shares_the_mask_along_broadcast_over_dims():
    x = randn(4, 9, 4, seed=10).abs() + 0.1
    out = run(lambda x: ll.dropout(x, 0.5, broadcast_over=[T]), named(x), mode="train", seed=7)
    kept = out.align(B, T, F) != 0
    assert torch.equal(kept, kept[:, :1, :].expand_as(kept))
    assert kept.any() and not kept.all()


def test_gradient_of_dropout_is_the_mask_scaled():
    x = (randn(4, 9, 4, seed=11).abs() + 0.1).requires_grad_()
    out = run(lambda x: ll.dropout(x, 0.25), named(x), mode="train", seed=8)
    y = out.align(B, T, F)
    (got,) = torch.autograd.grad(masked_weighted_sum(y, TMASK[:, :, None]), [x])
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    mask = (y != 0).double()
    torch.testing.assert_close(got, torch.where(TMASK[:, :, None], w * mask / 0.75, 0.0), **TOL)


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_dropout_probability_out_of_range_is_an_error(p):
    with pytest.raises(ValueError):
        run(lambda x: ll.dropout(x, p), named(data()), mode="train")


# -- layer_norm -----------------------------------------------------------------------------------

@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_layer_norm_matches_torch_layer_norm(affine):
    x, w, b = data(), randn(4, seed=12), randn(4, seed=13)
    args = [named(x)] + ([ll.Named(w, (F,)), ll.Named(b, (F,))] if affine else [])
    out = run(lambda x, w=None, b=None: ll.layer_norm(x, axis=F, weight=w, bias=b), *args)
    expected = tF.layer_norm(x, (4,), w if affine else None, b if affine else None)
    assert_valid_close(out, expected, (B, T, F), TMASK[:, :, None])


def test_layer_norm_normalizes_over_the_named_dim_whatever_its_storage_position():
    x = data()
    out = run(lambda x: ll.layer_norm(x, axis=F, eps=1e-3), ll.Named(x.permute(2, 0, 1), (F, B, T), {T: LENS}))
    assert_valid_close(out, tF.layer_norm(x, (4,), eps=1e-3), (B, T, F), TMASK[:, :, None])


def test_layer_norm_over_several_dims_with_parameters_stored_in_another_order():
    x, w, b = randn(4, 9, 2, 4, seed=14), randn(4, 2, seed=15), randn(2, 4, seed=16)  # x: (batch, time, g, feat)
    out = run(lambda x, w, b: ll.layer_norm(x, axis=[G, F], weight=w, bias=b),
              ll.Named(x, (B, T, G, F), {T: LENS}), ll.Named(w, (F, G)), ll.Named(b, (G, F)))
    expected = tF.layer_norm(x, (2, 4), w.t(), b)
    assert_valid_close(out, expected, (B, T, G, F), TMASK[:, :, None, None])


def test_layer_norm_over_dynamic_dim_is_an_error():
    with pytest.raises(ll.errors.DimError):
        run(lambda x: ll.layer_norm(x, axis=T), named(data()))


def test_gradient_of_layer_norm_matches_torch():
    x = data().requires_grad_()
    w, b = randn(4, seed=12).requires_grad_(), randn(4, seed=13).requires_grad_()
    out = run(lambda x, w, b: ll.layer_norm(x, axis=F, weight=w, bias=b), named(x), ll.Named(w, (F,)),
              ll.Named(b, (F,)))
    m = TMASK[:, :, None]
    got = torch.autograd.grad(masked_weighted_sum(out.align(B, T, F), m), [x, w, b])
    want = torch.autograd.grad(masked_weighted_sum(tF.layer_norm(x, (4,), w, b), m), [x, w, b])
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, **TOL)
