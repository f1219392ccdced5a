"""Elementwise ops (arithmetic, comparisons, logic, where, cast, activations) against plain PyTorch."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as tF

import looplift as ll

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_ops_support import TOL, B, assert_valid_close, randint, randn, run

T = ll.Dim("m_time")
F = ll.Dim("m_feat", 4)
LENS = torch.tensor([5, 2, 4])


def named(x, dims=(B, T, F)):
    return ll.Named(x, dims, {T: LENS} if T in dims else {})


# -- unary ops -------------------------------------------------------------------------------

UNARY = [
    ("neg", ll.neg, torch.neg, "any"),
    ("abs", ll.abs, torch.abs, "any"),
    ("square", ll.square, torch.square, "any"),
    ("exp", ll.exp, torch.exp, "any"),
    ("log", ll.log, torch.log, "positive"),
    ("sqrt", ll.sqrt, torch.sqrt, "positive"),
    ("rsqrt", ll.rsqrt, torch.rsqrt, "positive"),
    ("sin", ll.sin, torch.sin, "any"),
    ("cos", ll.cos, torch.cos, "any"),
    ("relu", ll.relu, torch.relu, "any"),
    ("gelu", ll.gelu, tF.gelu, "any"),
    ("silu", ll.silu, tF.silu, "any"),
    ("swish", ll.swish, tF.silu, "any"),
    ("sigmoid", ll.sigmoid, torch.sigmoid, "any"),
    ("log_sigmoid", ll.log_sigmoid, tF.logsigmoid, "any"),
    ("tanh", ll.tanh, torch.tanh, "any"),
    ("softplus", ll.softplus, tF.softplus, "any"),
    ("elu", ll.elu, tF.elu, "any"),
    ("leaky_relu", ll.leaky_relu, tF.leaky_relu, "any"),
    ("leaky_relu_slope", lambda x: ll.leaky_relu(x, 0.2), lambda x: tF.leaky_relu(x, 0.2), "any"),
    ("identity", ll.identity, lambda x: x, "any"),
    ("operator_neg", lambda x: -x, torch.neg, "any"),
    ("operator_abs", lambda x: abs(x), torch.abs, "any"),
]


@pytest.mark.parametrize("name,ll_fn,torch_fn,domain", UNARY, ids=[u[0] for u in UNARY])
def test_unary_op_matches_torch_elementwise(name, ll_fn, torch_fn, domain):
    x = randn(3, 5, 4, seed=1) * 2
    if domain == "positive":
        x = x.abs() + 0.1
    out = run(ll_fn, named(x))
    assert set(out.dims) == {B, T, F}
    assert out.tensor.dtype == torch.float64
    assert_valid_close(out, torch_fn(x), (B, T, F))


@pytest.mark.parametrize("ll_fn", [ll.exp, ll.log, ll.sqrt, ll.sigmoid, ll.relu])
def test_float_only_unary_op_rejects_integer_input(ll_fn):
    with pytest.raises(ll.errors.DTypeError):
        run(ll_fn, named(randint(0, 5, (3, 5, 4))))


@pytest.mark.parametrize("name,ll_fn,torch_fn", [
    ("neg", ll.neg, torch.neg), ("abs", ll.abs, torch.abs), ("square", ll.square, torch.square),
])
def test_sign_and_square_ops_keep_integer_dtype(name, ll_fn, torch_fn):
    x = randint(-5, 5, (3, 5, 4), seed=2)
    out = run(ll_fn, named(x))
    assert out.tensor.dtype == torch.int64
    assert torch.equal(out.align(B, T, F), torch_fn(x))


# -- binary arithmetic ----------------------------------------------------------------------------

BINARY = [
    ("add", ll.add, torch.add),
    ("sub", ll.sub, torch.sub),
    ("mul", ll.mul, torch.mul),
    ("truediv", ll.truediv, torch.true_divide),
    ("pow", ll.pow, torch.pow),
    ("minimum", ll.minimum, torch.minimum),
    ("maximum", ll.maximum, torch.maximum),
    ("floordiv", ll.floordiv, lambda a, b: torch.div(a, b, rounding_mode="floor")),
    ("mod", ll.mod, torch.remainder),
    ("operator_add", lambda a, b: a + b, torch.add),
    ("operator_sub", lambda a, b: a - b, torch.sub),
    ("operator_mul", lambda a, b: a * b, torch.mul),
    ("operator_truediv", lambda a, b: a / b, torch.true_divide),
    ("operator_floordiv", lambda a, b: a // b, lambda a, b: torch.div(a, b, rounding_mode="floor")),
    ("operator_mod", lambda a, b: a % b, torch.remainder),
    ("operator_pow", lambda a, b: a ** b, torch.pow),
]


@pytest.mark.parametrize("name,ll_fn,torch_fn", BINARY, ids=[b[0] for b in BINARY])
def test_binary_op_broadcasts_by_dim_identity_not_position(name, ll_fn, torch_fn):
    # a is stored (batch, time, feat), b is stored (feat, batch): b is aligned by its dims, not positions.
    a = randn(3, 5, 4, seed=3)
    b = randn(4, 3, seed=4)
    if name.endswith("pow"):
        a = a.abs() + 0.5
    if "div" in name or "mod" in name:
        b = b.sign() * (b.abs() + 0.5)
    out = run(ll_fn, named(a), ll.Named(b, (F, B)))
    assert set(out.dims) == {B, T, F}
    assert out.lengths[T].tolist() == LENS.tolist()
    assert_valid_close(out, torch_fn(a, b.t()[:, None, :]), (B, T, F))


@pytest.mark.parametrize("name,ll_fn,torch_fn", [
    ("floordiv", ll.floordiv, lambda a, b: torch.div(a, b, rounding_mode="floor")),
    ("mod", ll.mod, torch.remainder),
    ("add", ll.add, torch.add),
    ("mul", ll.mul, torch.mul),
], ids=["floordiv", "mod", "add", "mul"])
def test_integer_binary_op_rounds_like_python(name, ll_fn, torch_fn):
    a = randint(-9, 10, (3, 5, 4), seed=5)
    b = randint(1, 4, (3, 5, 4), seed=6) * torch.where(randint(0, 2, (3, 5, 4), seed=7) == 0, -1, 1)
    out = run(ll_fn, named(a), named(b))
    assert out.tensor.dtype == torch.int64
    expected = torch_fn(a, b)
    assert torch.equal(out.align(B, T, F), expected)
    if name == "floordiv":
        assert torch.equal(expected, torch.tensor([[[x // y for x, y in zip(r, s)] for r, s in zip(p, q)]
                                                   for p, q in zip(a.tolist(), b.tolist())]))


def test_true_division_of_integers_gives_the_default_float_dtype():
    a, b = randint(-9, 10, (3, 5, 4), seed=8), randint(1, 5, (3, 5, 4), seed=9)
    out = run(ll.truediv, named(a), named(b))
    assert out.tensor.dtype == torch.get_default_dtype()
    assert_valid_close(out, a / b, (B, T, F), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,ll_fn,torch_fn", [
    ("scalar_right_add", lambda x: x + 2.5, lambda x: x + 2.5),
    ("scalar_left_sub", lambda x: 2.5 - x, lambda x: 2.5 - x),
    ("scalar_left_mul", lambda x: 3 * x, lambda x: 3 * x),
    ("scalar_left_div", lambda x: 1.0 / x, lambda x: 1.0 / x),
    ("scalar_right_pow", lambda x: x ** 2, lambda x: x ** 2),
    ("scalar_left_pow", lambda x: 2.0 ** x, lambda x: 2.0 ** x),
    ("scalar_left_floordiv", lambda x: 7 // x, lambda x: torch.div(7, x, rounding_mode="floor")),
    ("scalar_left_mod", lambda x: 7.5 % x, lambda x: torch.remainder(torch.full_like(x, 7.5), x)),
    ("scalar_minimum", lambda x: ll.minimum(x, 0.3), lambda x: x.clamp(max=0.3)),
    ("scalar_maximum", lambda x: ll.maximum(0.3, x), lambda x: x.clamp(min=0.3)),
    ("clip_both", lambda x: ll.clip(x, -0.5, 0.7), lambda x: x.clamp(-0.5, 0.7)),
    ("clip_min", lambda x: ll.clip(x, min=0.1), lambda x: x.clamp(min=0.1)),
    ("clip_max", lambda x: ll.clip(x, max=0.1), lambda x: x.clamp(max=0.1)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_python_scalar_operand_behaves_as_in_torch_and_keeps_dtype(name, ll_fn, torch_fn):
    x = randn(3, 5, 4, seed=10)
    x = x.sign() * (x.abs() + 0.2)
    out = run(ll_fn, named(x))
    assert out.tensor.dtype == torch.float64
    assert_valid_close(out, torch_fn(x), (B, T, F))


@pytest.mark.parametrize("name,ll_fn,torch_fn", [
    ("minimum", lambda k: ll.minimum(k, 0.5), lambda k: torch.minimum(k, torch.tensor(0.5))),
    ("maximum", lambda k: ll.maximum(2.5, k), lambda k: torch.maximum(torch.tensor(2.5), k)),
    ("clip", lambda k: ll.clip(k, 0.5, 2.5), lambda k: torch.clamp(k, 0.5, 2.5)),
], ids=["minimum", "maximum", "clip"])
def test_integer_tensor_against_a_float_scalar_promotes_to_float_like_torch(name, ll_fn, torch_fn):
    k = randint(-3, 5, (3, 5, 4), seed=35)
    out = run(ll_fn, named(k))
    expected = torch_fn(k)
    assert expected.dtype == torch.get_default_dtype()
    assert out.tensor.dtype == expected.dtype
    assert torch.equal(out.align(B, T, F), expected)


def test_minimum_and_maximum_of_python_numbers():
    x = randn(3, 5, 4, seed=36)
    out = run(lambda x: (ll.minimum(2, 3.5) + x, ll.maximum(ll.length(F), 2.5) + x), named(x))
    assert_valid_close(out[0], x + 2.0, (B, T, F))
    assert_valid_close(out[1], x + 4.0, (B, T, F))


def test_clip_takes_tensor_bounds_over_other_dims():
    x, lo = randn(3, 5, 4, seed=11), randn(4, seed=12) - 1.0
    out = run(lambda x, lo: ll.clip(x, min=lo, max=lo + 1.0), named(x), ll.Named(lo, (F,)))
    assert_valid_close(out, torch.minimum(torch.maximum(x, lo), lo + 1.0), (B, T, F))


def test_two_different_dims_with_the_same_name_do_not_broadcast():
    other_f = ll.Dim("m_feat", 4)
    with pytest.raises(ll.errors.DimMismatchError):
        run(ll.add, named(randn(3, 5, 4)), ll.Named(randn(4), (other_f,)))


# -- comparisons and logic ----------------------------------------------------------------------------

COMPARE = [
    ("eq", ll.eq, torch.eq, lambda a, b: a == b),
    ("ne", ll.ne, torch.ne, lambda a, b: a != b),
    ("lt", ll.lt, torch.lt, lambda a, b: a < b),
    ("le", ll.le, torch.le, lambda a, b: a <= b),
    ("gt", ll.gt, torch.gt, lambda a, b: a > b),
    ("ge", ll.ge, torch.ge, lambda a, b: a >= b),
]


@pytest.mark.parametrize("use_operator", [False, True], ids=["function", "operator"])
@pytest.mark.parametrize("name,ll_fn,torch_fn,op", COMPARE, ids=[c[0] for c in COMPARE])
def test_comparison_gives_bool_like_torch(name, ll_fn, torch_fn, op, use_operator):
    # Small integers make equal elements common, so eq/le/ge are exercised on ties.
    a = randint(0, 3, (3, 5, 4), seed=13).double()
    b = randint(0, 3, (4,), seed=14).double()
    out = run(op if use_operator else ll_fn, named(a), ll.Named(b, (F,)))
    assert out.tensor.dtype == torch.bool
    assert torch.equal(out.align(B, T, F), torch_fn(a, b))


def test_comparison_with_python_scalar():
    x = randn(3, 5, 4, seed=15)
    out = run(lambda x: (x > 0.25, 0.25 >= x), named(x))
    assert torch.equal(out[0].align(B, T, F), x > 0.25)
    assert torch.equal(out[1].align(B, T, F), x <= 0.25)


LOGICAL = [
    ("logical_and", ll.logical_and, torch.logical_and, lambda a, b: a & b),
    ("logical_or", ll.logical_or, torch.logical_or, lambda a, b: a | b),
    ("logical_xor", ll.logical_xor, torch.logical_xor, lambda a, b: a ^ b),
]


@pytest.mark.parametrize("use_operator", [False, True], ids=["function", "operator"])
@pytest.mark.parametrize("name,ll_fn,torch_fn,op", LOGICAL, ids=[c[0] for c in LOGICAL])
def test_logical_op_matches_torch(name, ll_fn, torch_fn, op, use_operator):
    a = randint(0, 2, (3, 5, 4), seed=16).bool()
    b = randint(0, 2, (3, 5), seed=17).bool()
    out = run(op if use_operator else ll_fn, named(a), ll.Named(b, (B, T), {T: LENS}))
    assert out.tensor.dtype == torch.bool
    assert torch.equal(out.align(B, T, F), torch_fn(a, b[:, :, None]))


@pytest.mark.parametrize("use_operator", [False, True], ids=["function", "operator"])
def test_logical_not_matches_torch(use_operator):
    a = randint(0, 2, (3, 5, 4), seed=18).bool()
    out = run((lambda x: ~x) if use_operator else ll.logical_not, named(a))
    assert torch.equal(out.align(B, T, F), ~a)


def test_logical_op_rejects_non_bool_input():
    with pytest.raises(ll.errors.DTypeError):
        run(ll.logical_and, named(randn(3, 5, 4)), named(randn(3, 5, 4) > 0))


def test_logical_op_of_python_bools():
    a = randint(0, 2, (3, 5, 4), seed=37).bool()
    out = run(lambda x: (ll.logical_or(False, True) & x, ll.logical_and(True, False) | x), named(a))
    assert torch.equal(out[0].align(B, T, F), a)
    assert torch.equal(out[1].align(B, T, F), a)


def test_logical_op_with_python_bool():
    a = randint(0, 2, (3, 5, 4), seed=19).bool()
    out = run(lambda x: (ll.logical_and(x, True), ll.logical_or(x, False), ll.logical_xor(x, True)), named(a))
    assert torch.equal(out[0].align(B, T, F), a)
    assert torch.equal(out[1].align(B, T, F), a)
    assert torch.equal(out[2].align(B, T, F), ~a)


# -- where -------------------------------------------------------------------------------------------

def test_where_selects_elementwise_with_broadcasting_by_dims():
    cond = randn(3, 5, seed=20) > 0
    a, b = randn(3, 5, 4, seed=21), randn(4, seed=22)
    out = run(ll.where, ll.Named(cond, (B, T), {T: LENS}), named(a), ll.Named(b, (F,)))
    assert set(out.dims) == {B, T, F}
    assert_valid_close(out, torch.where(cond[:, :, None], a, b), (B, T, F))


def test_where_with_a_python_scalar_branch_keeps_the_tensor_dtype():
    x = randn(3, 5, 4, seed=23)
    out = run(lambda x: ll.where(x > 0, x, 0.0), named(x))
    assert out.tensor.dtype == torch.float64
    assert_valid_close(out, torch.where(x > 0, x, 0.0), (B, T, F))


def test_where_promotes_mixed_branch_dtypes_like_torch():
    x, k = randn(3, 5, 4, seed=24), randint(-3, 3, (3, 5, 4), seed=25)
    out = run(lambda x, k: ll.where(x > 0, k, x), named(x), named(k))
    assert out.tensor.dtype == torch.float64
    assert_valid_close(out, torch.where(x > 0, k.double(), x), (B, T, F))


def test_where_keeps_the_sparse_dim_of_label_branches():
    V = ll.Dim("m_vocab", 6)
    lab = randint(0, 6, (3, 5), seed=26)
    out = run(lambda lab: ll.where(lab > 2, lab, 0), ll.Named(lab, (B, T), {T: LENS}, sparse_dim=V))
    assert out.sparse_dim == V
    assert torch.equal(out.align(B, T), torch.where(lab > 2, lab, 0))


@pytest.mark.parametrize("cond", ["all_true", "all_false", "mixed"])
@pytest.mark.parametrize("broadcast", [False, True], ids=["same_shape", "broadcast_branch"])
def test_where_without_autograd_over_a_uniform_condition_equals_torch_where(cond, broadcast):
    """Large enough and without autograd, a condition the same everywhere gives the branch itself: the values
    of torch.where, whichever branch is broadcast, and a later in-place op on the result leaves the inputs."""
    G = ll.Dim("m_wide", 1024)
    a, b = randn(3, 5, 1024, seed=30), randn(3, 5, 1024, seed=31)
    if broadcast:
        b = b[0, 0]
    c = {"all_true": torch.ones(3, 5, dtype=torch.bool), "all_false": torch.zeros(3, 5, dtype=torch.bool),
         "mixed": randn(3, 5, seed=32) > 0}[cond]
    before = (a.clone(), b.clone())
    prog = ll.compile(lambda c, a, b: ll.where(c, a, b) * 2.0 + 1.0)
    args = (ll.Named(c, (B, T), {T: LENS}), ll.Named(a, (B, T, G), {T: LENS}),
            ll.Named(b, (G,) if broadcast else (B, T, G), {} if broadcast else {T: LENS}))
    with torch.no_grad():
        out = prog(*args)
    want = torch.where(c[:, :, None], a, b) * 2.0 + 1.0
    assert_valid_close(out, want, (B, T, G))
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])


def test_unary_ops_without_autograd_overwrite_only_their_own_temporaries():
    """Without autograd a unary op may compute into a new operand only it reads (``sigmoid_`` into the sum
    before it): the values are torch's, and neither a program input nor a value read twice changes."""
    x, y = randn(3, 5, 4, seed=33), randn(3, 5, 4, seed=34)
    before = (x.clone(), y.clone())

    def f(x, y):
        s = x + y                       # (read by sigmoid alone: its to overwrite)
        twice = x * 2.0                 # (read by tanh and by the sum below: not)
        return ll.sigmoid(s) + ll.tanh(twice) + twice + ll.relu(x)

    prog = ll.compile(f)
    with torch.no_grad():
        out = prog(named(x), named(y))
    assert_valid_close(out, torch.sigmoid(x + y) + torch.tanh(2 * x) + 2 * x + torch.relu(x), (B, T, F))
    assert torch.equal(x, before[0]) and torch.equal(y, before[1])


def test_where_rejects_a_non_bool_condition():
    with pytest.raises(ll.errors.DTypeError):
        run(lambda x: ll.where(x, x, 0.0), named(randn(3, 5, 4)))


# -- cast ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype_arg,torch_dtype", [
    ("int32", torch.int32), ("int64", torch.int64), (torch.int16, torch.int16), ("float32", torch.float32),
    ("bfloat16", torch.bfloat16), ("bool", torch.bool), ("uint8", torch.uint8),
], ids=["int32", "int64", "torch.int16", "float32", "bfloat16", "bool", "uint8"])
def test_cast_of_float_converts_like_torch_to(dtype_arg, torch_dtype):
    x = randn(3, 5, 4, seed=27) * 4
    if torch_dtype == torch.uint8:
        x = x.abs()
    out = run(lambda x: ll.cast(x, dtype_arg), named(x))
    assert out.tensor.dtype == torch_dtype
    assert torch.equal(out.align(B, T, F), x.to(torch_dtype))


def test_cast_of_bool_to_float_gives_zeros_and_ones():
    x = randn(3, 5, 4, seed=28)
    out = run(lambda x: ll.cast(x > 0, "float64"), named(x))
    assert out.tensor.dtype == torch.float64
    assert torch.equal(out.align(B, T, F), (x > 0).double())


def test_cast_to_the_same_dtype_is_the_input_itself():
    x = randn(3, 5, 4, seed=29)
    out = run(lambda x: ll.cast(x, torch.float64), named(x))
    assert torch.equal(out.align(B, T, F), x)


def test_cast_keeps_the_sparse_dim_between_integer_dtypes_only():
    V = ll.Dim("m_vocab2", 6)
    lab = randint(0, 6, (3, 5), seed=30)
    out = run(lambda lab: (ll.cast(lab, "int32"), ll.cast(lab, "float32")),
              ll.Named(lab, (B, T), {T: LENS}, sparse_dim=V))
    assert out[0].sparse_dim == V and out[0].tensor.dtype == torch.int32
    assert out[1].sparse_dim is None and out[1].tensor.dtype == torch.float32
    assert torch.equal(out[0].align(B, T), lab.int())


def test_cast_of_a_python_number_gives_a_scalar_of_that_dtype():
    x = randn(3, 5, 4, seed=31)
    out = run(lambda x: x * ll.cast(3, "float64"), named(x))
    assert out.tensor.dtype == torch.float64
    assert_valid_close(out, x * 3, (B, T, F))


def test_unknown_dtype_name_is_an_error():
    with pytest.raises(ll.errors.DTypeError):
        run(lambda x: ll.cast(x, "float128"), named(randn(3, 5, 4)))


# -- gradients ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,ll_fn,torch_fn", [
    ("mul_add", lambda a, b: a * b + a, lambda a, b: a * b + a),
    ("div_pow", lambda a, b: (a / b) ** 2, lambda a, b: (a / b) ** 2),
    ("where_max", lambda a, b: ll.where(a > 0, ll.maximum(a, b), ll.tanh(b)),
     lambda a, b: torch.where(a > 0, torch.maximum(a, b), torch.tanh(b))),
    ("activations", lambda a, b: ll.gelu(a) * ll.sigmoid(b) + ll.softplus(a - b),
     lambda a, b: tF.gelu(a) * torch.sigmoid(b) + tF.softplus(a - b)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_gradient_of_elementwise_ops_matches_torch(name, ll_fn, torch_fn):
    a = randn(3, 5, 4, seed=32).requires_grad_()
    b = (randn(4, 3, seed=33) + 3.0).requires_grad_()
    out = run(ll_fn, named(a), ll.Named(b, (F, B)))
    w = randn(3, 5, 4, seed=34)
    got = torch.autograd.grad((out.align(B, T, F) * w).sum(), [a, b])
    want = torch.autograd.grad((torch_fn(a, b.t()[:, None, :]) * w).sum(), [a, b])
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, **TOL)
