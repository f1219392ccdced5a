"""``dot`` / ``matmul`` and ``linear`` against plain PyTorch (einsum, ``F.linear``), values and gradients."""

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

T = ll.Dim("l_time")
F = ll.Dim("l_feat", 4)
H = ll.Dim("l_hidden", 3)
K = ll.Dim("l_keys", 2)
LENS = torch.tensor([5, 2, 4])
TMASK = seq_mask(LENS, 5)


def data(seed=1):
    return with_garbage(randn(3, 5, 4, seed=seed), LENS)


def named(x, dims=(B, T, F)):
    return ll.Named(x, dims, {T: LENS} if T in dims else {})


@pytest.mark.parametrize("ll_fn", [ll.dot, ll.matmul], ids=["dot", "matmul"])
def test_dot_over_static_dim_is_a_matmul_with_batch_dims(ll_fn):
    x, w = data(), randn(4, 3, seed=2)
    out = run(lambda x, w: ll_fn(x, w, reduce=F), named(x), ll.Named(w, (F, H)))
    assert set(out.dims) == {B, T, H}
    assert out.lengths[T].tolist() == LENS.tolist()
    assert_valid_close(out, torch.einsum("btf,fh->bth", x, w), (B, T, H), TMASK[:, :, None])


def test_dot_result_dims_are_shared_then_a_only_then_b_only():
    x, y = data(), randn(2, 3, 4, seed=2)  # y stored (keys, batch, feat)
    out = run(lambda x, y: ll.dot(x, y, reduce=F), named(x), ll.Named(y, (K, B, F)))
    assert out.dims == (B, T, K)
    assert_valid_close(out, torch.einsum("btf,kbf->btk", x, y), (B, T, K), TMASK[:, :, None])


def test_dot_aligns_operands_by_dim_identity_whatever_their_storage_order():
    x, y = data(), randn(4, 3, 5, seed=3)  # y stored (feat, batch, time)
    out = run(lambda x, y: ll.dot(x, y, reduce=F), named(x), ll.Named(y, (F, B, T), {T: LENS}))
    assert set(out.dims) == {B, T}
    assert_valid_close(out, torch.einsum("btf,fbt->bt", x, y), (B, T), TMASK)


def test_dot_over_dynamic_dim_masks_the_padding_of_both_operands():
    x, y = data(1), with_garbage(randn(3, 5, 2, seed=4), LENS, value=-80.0)
    out = run(lambda x, y: ll.dot(x, y, reduce=T), named(x), ll.Named(y, (B, T, K), {T: LENS}))
    assert set(out.dims) == {B, F, K}
    expected = torch.stack([x[b, :n].t() @ y[b, :n] for b, n in enumerate(LENS.tolist())])
    assert_valid_close(out, expected, (B, F, K))


def test_dot_over_several_dims():
    x, y = data(1), with_garbage(randn(3, 5, 4, seed=5), LENS, value=-80.0)
    out = run(lambda x, y: ll.dot(x, y, reduce=[T, F]), named(x), named(y))
    assert out.dims == (B,)
    expected = torch.stack([(x[b, :n] * y[b, :n]).sum() for b, n in enumerate(LENS.tolist())])
    assert_valid_close(out, expected, (B,))


def test_dot_over_batch_masks_the_padding_of_dynamic_dims():
    x, y = data(1), randn(3, 2, seed=6)
    out = run(lambda x, y: ll.dot(x, y, reduce=B), named(x), ll.Named(y, (B, K)))
    assert set(out.dims) == {T, F, K}
    expected = torch.einsum("btf,bk->tfk", torch.where(TMASK[:, :, None], x, 0.0), y)
    assert_valid_close(out, expected, (T, F, K))


def test_dot_of_integer_tensors_gives_the_float_dtype():
    a, b = randint(-3, 4, (3, 4), seed=7), randint(-3, 4, (4, 3), seed=8)
    out = run(lambda a, b: ll.dot(a, b, reduce=F), ll.Named(a, (B, F)), ll.Named(b, (F, H)))
    assert out.tensor.dtype.is_floating_point
    assert torch.equal(out.align(B, H), (a @ b).to(out.tensor.dtype))


def test_dot_reduce_dim_missing_from_an_operand_is_an_error():
    with pytest.raises(ll.errors.DimError):
        run(lambda x, w: ll.dot(x, w, reduce=F), named(data()), ll.Named(randn(3, 2), (H, K)))


def test_gradient_of_dot_over_dynamic_dim_matches_per_sequence_torch():
    x = data(1).requires_grad_()
    y = with_garbage(randn(3, 5, 2, seed=4), LENS, value=-80.0).requires_grad_()
    out = run(lambda x, y: ll.dot(x, y, reduce=T), named(x), ll.Named(y, (B, T, K), {T: LENS}))
    got = torch.autograd.grad(masked_weighted_sum(out.align(B, F, K)), [x, y])
    expected = torch.stack([x[b, :n].t() @ y[b, :n] for b, n in enumerate(LENS.tolist())])
    want = torch.autograd.grad(masked_weighted_sum(expected), [x, y])
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, **TOL)
    assert torch.equal(got[0][~TMASK], torch.zeros_like(got[0][~TMASK]))


def test_gradient_of_dot_over_static_dim_matches_torch():
    x, w = data().requires_grad_(), randn(4, 3, seed=2).requires_grad_()
    out = run(lambda x, w: ll.dot(x, w, reduce=F), named(x), ll.Named(w, (F, H)))
    got = torch.autograd.grad(masked_weighted_sum(out.align(B, T, H), TMASK[:, :, None]), [x, w])
    want = torch.autograd.grad(masked_weighted_sum(torch.einsum("btf,fh->bth", x, w), TMASK[:, :, None]), [x, w])
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, **TOL)


# -- linear ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_linear_matches_torch_functional_linear(with_bias):
    x, w, b = data(), randn(3, 4, seed=9), randn(3, seed=10)
    args = [named(x), ll.Named(w, (H, F))] + ([ll.Named(b, (H,))] if with_bias else [])
    out = run(lambda x, w, b=None: ll.linear(x, w, b, in_dim=F, out_dim=H), *args)
    assert out.dims == (B, T, H)
    assert_valid_close(out, tF.linear(x, w, b if with_bias else None), (B, T, H), TMASK[:, :, None])


def test_linear_accepts_the_input_dims_in_any_storage_order():
    x, w, b = data(), randn(3, 4, seed=9), randn(3, seed=10)
    xt = x.permute(2, 0, 1).contiguous()  # stored (feat, batch, time)
    out = run(lambda x, w, b: ll.linear(x, w, b, in_dim=F, out_dim=H),
              ll.Named(xt, (F, B, T), {T: LENS}), ll.Named(w, (H, F)), ll.Named(b, (H,)))
    assert_valid_close(out, tF.linear(x, w, b), (B, T, H), TMASK[:, :, None])


def test_linear_weight_stored_in_the_wrong_order_is_an_error():
    with pytest.raises(ll.errors.DimError):
        run(lambda x, w: ll.linear(x, w, in_dim=F, out_dim=H), named(data()), ll.Named(randn(4, 3), (F, H)))


def test_gradient_of_linear_matches_torch_for_input_weight_and_bias():
    x = data().requires_grad_()
    w, b = randn(3, 4, seed=9).requires_grad_(), randn(3, seed=10).requires_grad_()
    out = run(lambda x, w, b: ll.linear(x, w, b, in_dim=F, out_dim=H),
              named(x), ll.Named(w, (H, F)), ll.Named(b, (H,)))
    got = torch.autograd.grad(masked_weighted_sum(out.align(B, T, H), TMASK[:, :, None]), [x, w, b])
    want = torch.autograd.grad(masked_weighted_sum(tF.linear(x, w, b), TMASK[:, :, None]), [x, w, b])
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, **TOL)
    assert torch.equal(got[0][~TMASK], torch.zeros_like(got[0][~TMASK]))


class _Affine(ll.Module):
    def __init__(self):
        super().__init__()
        self.weight = ll.Parameter((H, F), dtype=torch.float64)
        self.bias = ll.Parameter((H,), init=0.5, dtype=torch.float64)

    def forward(self, x):
        return ll.linear(x, self.weight, self.bias, in_dim=F, out_dim=H)


def test_gradient_of_linear_flows_into_module_parameters():
    torch.manual_seed(0)
    model = _Affine()
    x = data()
    out = run(model, named(x))
    got = torch.autograd.grad(masked_weighted_sum(out.align(B, T, H), TMASK[:, :, None]),
                              [model.weight, model.bias])
    want = torch.autograd.grad(masked_weighted_sum(tF.linear(x, model.weight, model.bias), TMASK[:, :, None]),
                               [model.weight, model.bias])
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, **TOL)
