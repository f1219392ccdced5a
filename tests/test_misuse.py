"""User mistakes, each a looplift error naming the line of the mistake and the dims involved.

Labels against their vocabulary: a label input (an integer ``Named`` with a ``sparse_dim``) is checked
at the program call, within its lengths: a label past its vocabulary is an ``InputError`` naming the call,
the input, the vocabulary dim, the value and its position; never the loss of a clamped label."""

from __future__ import annotations

import pytest
import torch
from error_helpers import check_error

import looplift as ll
from looplift.errors import InputError

B, T, V, H = ll.batch_dim, ll.Dim("time"), ll.Dim("vocab", 5), ll.Dim("hidden", 3)


def _labels(values, lengths=None, vocab=V):
    t = torch.tensor(values)
    return ll.Named(t, (B, T), {T: torch.tensor(lengths if lengths is not None else [t.shape[1]] * t.shape[0])},
                    sparse_dim=vocab)


def _embedding_loss():
    torch.manual_seed(0)
    emb = ll.nn.Embedding(V, H)
    return ll.compile(lambda y: ll.sum(emb(y), axis=[B, T, H]))


def test_a_label_past_the_vocabulary_of_an_embedding():
    prog = _embedding_loss()
    with pytest.raises(InputError) as info:
        prog(_labels([[1, 2, 3], [4, 7, 0]]))  # <embedding>
    check_error(__file__, info, InputError, "embedding", "vocab")
    assert "label 7 at (batch 1, time 1)" in str(info.value) and "(0..4)" in str(info.value)


def test_a_negative_label_in_cross_entropy():
    logits = ll.Named(torch.randn(2, 3, 5), (B, T, V), {T: torch.tensor([3, 3])})
    prog = ll.compile(lambda x, y: ll.cross_entropy(x, y, axis=V))
    with pytest.raises(InputError) as info:
        prog(logits, _labels([[1, -1, 3], [4, 2, 0]]))  # <cross_entropy>
    check_error(__file__, info, InputError, "cross_entropy", "vocab")
    assert "label -1 at (batch 0, time 1)" in str(info.value)


def test_a_label_past_the_vocabulary_in_gather():
    scores = ll.Named(torch.randn(2, 5), (B, V))
    index = ll.Named(torch.tensor([2, 5]), (B,), sparse_dim=V)
    prog = ll.compile(lambda s, i: ll.gather(s, index=i, axis=V))
    with pytest.raises(InputError) as info:
        prog(scores, index)  # <gather>
    check_error(__file__, info, InputError, "gather", "vocab")
    assert "label 5 at (batch 1)" in str(info.value) and "1 such label(s)" in str(info.value)


def test_the_count_of_bad_labels_is_given():
    with pytest.raises(InputError, match="label 9 at \\(batch 0, time 0\\).*3 such label"):
        _embedding_loss()(_labels([[9, 2, 9], [4, 5, 0]]))


def test_padding_holds_anything_and_the_result_is_unchanged():
    """Values past the lengths are not labels (e.g. -100 or -1 as padding): no error, and the loss is that
    of the valid labels alone."""
    prog = _embedding_loss()
    padded = prog(_labels([[1, 2, -100], [4, -1, 77]], lengths=[2, 1])).tensor
    clean = prog(_labels([[1, 2, 0], [4, 0, 0]], lengths=[2, 1])).tensor
    torch.testing.assert_close(padded, clean)


def test_integer_inputs_without_a_vocabulary_are_not_labels():
    """An integer input without a sparse_dim (e.g. positions) is not checked against anything."""
    pair = ll.Dim("pair", 2)
    x = ll.Named(torch.tensor([[3, 900], [-4, 1]]), (B, pair))
    assert ll.compile(lambda v: ll.sum(v, axis=[B, pair]))(x).tensor.item() == 900
