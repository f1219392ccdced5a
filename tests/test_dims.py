"""Dims: kinds, identity, derived dims and the sizes and lengths they compute."""

import pytest
import torch

import looplift as ll
from looplift import Dim


def test_static_dynamic_and_batch_kinds():
    feat, time, beam = Dim("feat", 40), Dim("time"), Dim("beam", batch=True)
    assert feat.is_static and feat.size == 40 and not feat.is_dynamic
    assert time.is_dynamic and time.size is None and time.length_dims == (ll.batch_dim,)
    assert not beam.is_dynamic and not beam.is_static and beam.length_dims == ()
    assert not ll.batch_dim.is_dynamic and ll.batch_dim.batch


def test_dims_are_equal_only_by_identity_not_by_name():
    a, b = Dim("time"), Dim("time")
    assert a != b and a == a
    assert len({a, b}) == 2


def test_declared_same_dims_are_one_dim():
    a, b = Dim("enc"), Dim("enc_copy")
    a.declare_same_as(b)
    assert a == b and hash(a) == hash(b) and a.canonical() is b.canonical()


def test_declare_same_as_rejects_different_sizes():
    with pytest.raises(ValueError, match="sizes differ"):
        Dim("a", 3).declare_same_as(Dim("b", 4))


def test_derived_dims_are_created_once_and_remember_their_origin():
    t = Dim("time")
    assert (t + 1) is (t + 1)
    assert (t - 2) is (t + -2)
    assert (t * 2) is (t * 2)
    assert (t // 2) is t.ceildiv(2)
    assert (t + 1).origin == ("+", (t, 1))
    assert (t // 3).operands == (t,)
    assert t + 0 is t and t * 1 is t and t.ceildiv(1) is t


def test_static_derived_sizes():
    f = Dim("f", 10)
    assert (f + 3).size == 13
    assert (f * 2).size == 20
    assert (f // 3).size == 4  # rounded up
    assert (f - 4).size == 6


def test_sum_and_product_dims_flatten_and_are_shared():
    a, b, c = Dim("a", 2), Dim("b", 3), Dim("c", 5)
    assert (a + b).size == 5 and (a + b) is (a + b)
    assert ((a + b) + c) is (a + (b + c))
    assert ((a + b) + c).operands == (a, b, c)
    assert (a * b).size == 6 and ((a * b) * c).size == 30


def test_derived_dynamic_lengths():
    t = Dim("time")
    n = torch.tensor([0, 1, 5, 6])
    assert (t + 1).derive_lengths([n]).tolist() == [1, 2, 6, 7]
    assert (t - 2).derive_lengths([n]).tolist() == [0, 0, 3, 4]  # never negative
    assert t.ceildiv(2).derive_lengths([n]).tolist() == [0, 1, 3, 3]
    assert (t * 3).derive_lengths([n]).tolist() == [0, 3, 15, 18]
    assert t.ceildiv(4).derive_size([9]) == 3


def test_sum_of_dynamic_dims_adds_lengths():
    t1, t2 = Dim("t1"), Dim("t2")
    s = t1 + t2
    assert s.is_dynamic and s.length_dims == (ll.batch_dim,)
    assert s.derive_lengths([torch.tensor([1, 2]), torch.tensor([3, 4])]).tolist() == [4, 6]


def test_derived_dim_lengths_run_over_the_origins_length_dims():
    beam = Dim("beam", batch=True)
    t = Dim("hyp_time", length_dims=[ll.batch_dim, beam])
    assert (t + 1).length_dims == (ll.batch_dim, beam)


@pytest.mark.parametrize("bad", [2.5, "3", True])
def test_bad_static_size_is_rejected(bad):
    with pytest.raises(TypeError):   # (an ArgumentError, which is a TypeError)
        Dim("x", bad)


def test_negative_static_size_is_rejected():
    with pytest.raises(ValueError, match="size must be >= 0"):   # (a DimError, which is a ValueError)
        Dim("x", -1)


def test_negative_derived_static_size_is_rejected():
    with pytest.raises(ValueError, match="negative size"):
        Dim("x", 2) - 3


def test_alias_is_another_axis_of_the_same_size_and_lengths():
    """``T.alias()`` is one derived dim (the same object each time, not T) with T's size rule and lengths:
    self-attention over a padded sequence with keys on it equals plain PyTorch on each entry's valid
    frames, NaN in the padding."""
    T, F = Dim("time"), Dim("f", 3)
    K = T.alias()
    assert K is T.alias() and K is not T and K.is_dynamic and K.length_dims == T.length_dims
    assert Dim("s", 5).alias().size == 5

    def attend(x):
        keys = ll.replace_dim(x, T, K)
        return ll.dot(ll.softmax(ll.dot(x, keys, reduce=F), axis=K), keys, reduce=K)

    x = torch.randn(2, 4, 3, dtype=torch.float64)
    n = torch.tensor([4, 2])
    x[1, 2:] = float("nan")
    out = ll.compile(attend, mode="eval")(ll.Named(x, (ll.batch_dim, T, F), {T: n})).align(ll.batch_dim, T, F)
    for b in range(2):
        v = x[b, :n[b]]
        torch.testing.assert_close(out[b, :n[b]], torch.softmax(v @ v.T, -1) @ v)
