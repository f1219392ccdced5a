"""Ops run in float32 and bfloat16: the output keeps the input's dtype, and the values agree with the
float64 computation up to that dtype's precision."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as tF

import looplift as ll

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_ops_support import B, assert_valid_close, randint, randn, run, seq_mask

T = ll.Dim("d_time")
F = ll.Dim("d_feat", 4)
H = ll.Dim("d_hidden", 3)
V = ll.Dim("d_vocab", 4)
K = ll.Dim("d_filter", 3)
LENS = torch.tensor([5, 2, 4])
TMASK = seq_mask(LENS, 5)

TOLS = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=3e-2)}

X = randn(3, 5, 4, seed=1)
W = randn(3, 4, seed=2) * 0.5
LAB = randint(0, 4, (3, 5), seed=3)
FILT = randn(3, 4, 3, seed=4) * 0.5


def per_sequence_softmax(x):
    out = torch.zeros_like(x)
    for b, n in enumerate(LENS.tolist()):
        out[b, :n] = torch.softmax(x[b, :n], 0)
    return out


def conv_same(x, w):
    out = torch.zeros(3, 5, 3, dtype=x.dtype)
    for b, n in enumerate(LENS.tolist()):
        out[b, :n] = tF.conv1d(x[b, :n].t()[None], w, padding="same")[0].t()
    return out


# (name, program, extra inputs, output dims, float64 reference, valid mask)
CASES = [
    ("add_mul", lambda x: x * 2.0 + x, (), (B, T, F), lambda x: x * 2.0 + x, TMASK[:, :, None]),
    ("tanh", ll.tanh, (), (B, T, F), torch.tanh, TMASK[:, :, None]),
    ("softmax_over_time", lambda x: ll.softmax(x, axis=T), (), (B, T, F), per_sequence_softmax, TMASK[:, :, None]),
    ("sum_over_time", lambda x: ll.sum(x, axis=T), (), (B, F),
     lambda x: torch.where(TMASK[:, :, None], x, 0.0).sum(1), None),
    ("mean_over_feat", lambda x: ll.mean(x, axis=F), (), (B, T), lambda x: x.mean(2), TMASK),
    ("linear", lambda x, w: ll.linear(x, w, in_dim=F, out_dim=H), ("weight",), (B, T, H),
     lambda x, w: tF.linear(x, w), TMASK[:, :, None]),
    ("layer_norm", lambda x: ll.layer_norm(x, axis=F), (), (B, T, F), lambda x: tF.layer_norm(x, (4,)),
     TMASK[:, :, None]),
    ("cross_entropy", lambda x, y: ll.cross_entropy(x, y, axis=V), ("labels",), (B, T),
     lambda x, y: tF.cross_entropy(x.transpose(1, 2), y, reduction="none"), TMASK),
    ("conv1d", lambda x, w: ll.conv1d(x, w, axis=T, in_dim=F, out_dim=H, filter_dim=K), ("filter",), (B, T, H),
     conv_same, TMASK[:, :, None]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name,fn,extra,dims,reference,mask", CASES, ids=[c[0] for c in CASES])
def test_op_keeps_a_low_precision_dtype_and_agrees_with_float64(name, fn, extra, dims, reference, mask, dtype):
    feat = F if name != "cross_entropy" else V
    x = X.to(dtype)
    args = [ll.Named(x, (B, T, feat), {T: LENS})]
    ref_args = [x.double()]
    for e in extra:
        if e == "weight":
            args.append(ll.Named(W.to(dtype), (H, F)))
            ref_args.append(W.to(dtype).double())
        elif e == "labels":
            args.append(ll.Named(LAB, (B, T), {T: LENS}, sparse_dim=V))
            ref_args.append(LAB)
        elif e == "filter":
            args.append(ll.Named(FILT.to(dtype), (H, F, K)))
            ref_args.append(FILT.to(dtype).double())
    out = run(fn, *args)
    assert out.tensor.dtype == dtype
    assert_valid_close(out, reference(*ref_args).to(dtype), dims, mask, **TOLS[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_dropout_keeps_a_low_precision_dtype(dtype):
    x = X.to(dtype).abs() + 0.5
    out = run(lambda x: ll.dropout(x, 0.5), ll.Named(x, (B, T, F), {T: LENS}), mode="train", seed=3)
    y = out.align(B, T, F)
    assert y.dtype == dtype
    kept = y != 0
    torch.testing.assert_close(y[kept], (x * 2)[kept], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_gradient_flows_in_a_low_precision_dtype(dtype):
    x = X.to(dtype).requires_grad_()
    out = run(lambda x: ll.sum(ll.log_softmax(x, axis=F), axis=[T, F]), ll.Named(x, (B, T, F), {T: LENS}))
    (g,) = torch.autograd.grad(out.tensor.sum(), [x])
    assert g.dtype == dtype
    x64 = X.clone().requires_grad_()
    (want,) = torch.autograd.grad(torch.where(TMASK[:, :, None], torch.log_softmax(x64, 2), 0.0).sum(), [x64])
    torch.testing.assert_close(g, want.to(dtype), **TOLS[dtype])
