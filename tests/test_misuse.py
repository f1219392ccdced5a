"""User mistakes, each a looplift error naming the line of the mistake and the dims involved.

Each test makes one mistake a user is likely to make (a Dim of the wrong kind, a Named input whose dims, lengths
or labels do not fit, an op given the wrong axis or dtype, a symbolic tensor used like a torch tensor, a module
misconfigured, a loop, Cond or MaskedComputation misused, a search step out of place, a checkpoint or trainer set
up wrongly) and checks the error it gets: its exact class, the ``file:line`` of the mistake in this file (the line
marked ``# <marker>``: the model's line for what is found while tracing, the call for what is found in the
inputs), the names of the dims involved as words, and a fragment of the message saying what is wrong. Labels are
checked against their vocabulary at the program call, within their lengths: a label past its vocabulary is an
``InputError`` naming the call, the input, the vocabulary dim, the value and its position, never the loss of a
clamped label. A bad argument to the ``looplift-g2p`` command line is one stderr line ``looplift-g2p: error:
...`` and a non-zero exit status, before any work, never a traceback."""

from __future__ import annotations

import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from error_helpers import check_error

import looplift as ll
from looplift import nn
from looplift.errors import (
    ArgumentError,
    CheckpointError,
    CheckpointWriteError,
    ConfigError,
    DimError,
    DimMismatchError,
    DTypeError,
    ExecutionError,
    InputError,
    LoopliftError,
    ModeError,
    SymbolicAttributeError,
    SymbolicTensorError,
    TraceError,
)
from looplift.recipes.g2p import cli as g2p_cli
from looplift.train import Trainer, bucketed_batches, load_model

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


# ==================================================================================================================
# The catalogue of mistakes: one function per mistake, the offending line marked with ``# <marker>``, and per area a
# table of rows (function, marker, error class, names the message holds as words, a fragment of the message).
# ==================================================================================================================

F, U = ll.Dim("feat", 3), ll.Dim("labels")


def _feats(batch: int = 2) -> ll.Named:
    """Float features over (batch, time, feat), padded to 5 frames."""
    return ll.Named(torch.randn(batch, 5, 3), (B, T, F), lengths={T: torch.tensor([5, 3, 4][:batch])})


def _targets(values=((1, 2, 3, 0, 0), (4, 0, 2, 0, 0)), lens=(5, 3)) -> ll.Named:
    """Labels over (batch, time) in the vocabulary V."""
    return ll.Named(torch.tensor(values), (B, T), lengths={T: torch.tensor(lens)}, sparse_dim=V)


def _run(fn, *inputs, mode: str = "eval"):
    return ll.compile(fn, mode=mode)(*inputs)


def _sum_program():
    return ll.compile(lambda x: ll.sum(x, axis=[B, T, F]))


def _ctc_inputs():
    logits = ll.Named(torch.randn(2, 5, 5), (B, T, V), {T: torch.tensor([5, 4])})
    targets = ll.Named(torch.tensor([[1, 2], [3, 0]]), (B, U), {U: torch.tensor([2, 1])}, sparse_dim=V)
    return logits, targets


def _rnnt_inputs():
    scores = ll.Named(torch.randn(2, 3, 3, 5), (B, T, U + 1, V), {T: torch.tensor([3, 2]), U: torch.tensor([2, 1])})
    labels = ll.Named(torch.tensor([[1, 2], [3, 0]]), (B, U), {U: torch.tensor([2, 1])}, sparse_dim=V)
    return scores, labels


# a small decoder for the search cases
_DEC_EMB, _DEC_REC, _DEC_OUT = nn.Embedding(V, H), nn.Linear(H, H), nn.Linear(H, V)


def _h0() -> ll.Named:
    return ll.Named(torch.randn(2, 3), (B, H))


def _dec_init(loop, h):
    loop.state.label, loop.state.h = ll.full(0, sparse_dim=V), h


def _dec_step(loop):
    loop.state.h = ll.tanh(_DEC_EMB(loop.state.label) + _DEC_REC(loop.state.h))
    return ll.log_softmax(_DEC_OUT(loop.state.h), axis=V)


class Tiny(ll.Module):
    def __init__(self, feat=F, hidden=H):
        super().__init__()
        self.lin = nn.Linear(feat, hidden)

    def forward(self, x):
        return ll.sum(self.lin(x), axis=[B, T, self.lin.out_dim])


def _tiny_loss(model, batch):
    return (model.lin.weight ** 2).sum() * batch, 1


def _sgd(model, lr=0.1):
    return torch.optim.SGD(model.parameters(), lr=lr)


def _one_batch(epoch):
    return [1.0]



# ------------------------------------------------------------------------------------------------------------------
# Dims
# ------------------------------------------------------------------------------------------------------------------


def _dims_float_size():
    ll.Dim("feat", 40.0)  # <dim-float-size>


def _dims_negative_size():
    ll.Dim("feat", -3)  # <dim-negative-size>


def _dims_string_size():
    ll.Dim("feat", "40")  # <dim-string-size>


def _dims_bool_size():
    ll.Dim("flag", True)  # <dim-bool-size>


def _dims_numpy_int_size():
    sizes = np.array([40, 3])
    ll.Dim("feat", sizes[0])  # <dim-numpy-int-size>


def _dims_torch_scalar_size():
    x = torch.randn(2, 40)
    ll.Dim("feat", torch.tensor(x.shape[-1]))  # <dim-torch-scalar-size>


def _dims_name_not_str():
    ll.Dim(40)  # <dim-name-not-str>


def _dims_args_swapped():
    ll.Dim(40, "feat")  # <dim-args-swapped>


def _dims_empty_name():
    ll.Dim("")  # <dim-empty-name>


def _dims_batch_with_size():
    ll.Dim("beam", 4, batch=True)  # <dim-batch-with-size>


def _dims_length_dims_not_dims():
    ll.Dim("words", length_dims=[2])  # <dim-length-dims-not-dims>


def _dims_declare_same_different_size():
    enc, dec = ll.Dim("enc", 3), ll.Dim("dec", 4)
    enc.declare_same_as(dec)  # <dim-declare-same-different-size>


def _dims_declare_same_static_dynamic():
    ll.Dim("enc", 3).declare_same_as(ll.Dim("time"))  # <dim-declare-same-static-dynamic>


def _dims_declare_same_not_a_dim():
    ll.Dim("a", 3).declare_same_as(3)  # <dim-declare-same-not-a-dim>


def _dims_add_float():
    ll.Dim("time") + 0.5  # <dim-add-float>


def _dims_mul_zero():
    ll.Dim("time") * 0  # <dim-mul-zero>


def _dims_sub_below_zero():
    ll.Dim("win", 3) - 5  # <dim-sub-below-zero>


def _dims_floordiv_zero():
    ll.Dim("time") // 0  # <dim-floordiv-zero>


def _dims_truediv():
    ll.Dim("time") / 2  # <dim-truediv>


def _dims_ceildiv_float():
    ll.Dim("time").ceildiv(2.5)  # <dim-ceildiv-float>


def _dims_same_name_created_twice():
    def model(x):
        feat2 = ll.Dim("feat", 3)
        return x + ll.ones([feat2])  # <dim-same-name-created-twice>
    _run(model, _feats())


def _dims_reduce_over_recreated_dim():
    def model(x):
        return ll.sum(x, axis=ll.Dim("time"))  # <dim-reduce-over-recreated-dim>
    _run(model, _feats())


def _dims_dim_used_as_tensor():
    def model(x):
        return x * F  # <dim-dim-used-as-tensor>
    _run(model, _feats())


_DIMS = [
    (_dims_float_size, "dim-float-size", ArgumentError, ["feat"],
     "size must be an int (static) or None (dynamic), got 40.0"),
    (_dims_negative_size, "dim-negative-size", DimError, ["feat"], "size must be >= 0, got -3"),
    (_dims_string_size, "dim-string-size", ArgumentError, ["feat"], "got '40' of type str"),
    (_dims_bool_size, "dim-bool-size", ArgumentError, ["flag"], "got True of type bool"),
    (_dims_numpy_int_size, "dim-numpy-int-size", ArgumentError, ["feat"], "of type int64 (use int(size))"),
    (_dims_torch_scalar_size, "dim-torch-scalar-size", ArgumentError, ["feat"], "of type Tensor (use int(size))"),
    (_dims_name_not_str, "dim-name-not-str", ArgumentError, [], "Dim name must be a non-empty str, got 40"),
    (_dims_args_swapped, "dim-args-swapped", ArgumentError, [], "the name comes first: Dim(name, size)"),
    (_dims_empty_name, "dim-empty-name", ArgumentError, [], "Dim name must be a non-empty str, got ''"),
    (_dims_batch_with_size, "dim-batch-with-size", DimError, ["beam"], "a batch dim has no static size"),
    (_dims_length_dims_not_dims, "dim-length-dims-not-dims", ArgumentError, ["words"],
     "length_dims must be a sequence of Dims, got [2]"),
    (_dims_declare_same_different_size, "dim-declare-same-different-size", DimError, ["enc", "dec"],
     "their kinds or sizes differ"),
    (_dims_declare_same_static_dynamic, "dim-declare-same-static-dynamic", DimError, ["enc", "time"],
     "cannot declare Dim('enc', 3) the same as Dim('time', dynamic)"),
    (_dims_declare_same_not_a_dim, "dim-declare-same-not-a-dim", ArgumentError, [],
     "declare_same_as needs a Dim, got 3"),
    (_dims_add_float, "dim-add-float", ArgumentError, [], "Dim + expects an int or a Dim, got 0.5"),
    (_dims_mul_zero, "dim-mul-zero", DimError, ["time"], "the factor must be >= 1"),
    (_dims_sub_below_zero, "dim-sub-below-zero", DimError, ["win"], "would have negative size -2"),
    (_dims_floordiv_zero, "dim-floordiv-zero", DimError, ["time"], "the divisor must be >= 1"),
    (_dims_truediv, "dim-truediv", ArgumentError, ["time"], "a dim's size is an int; use time // 2"),
    (_dims_ceildiv_float, "dim-ceildiv-float", ArgumentError, [], "Dim // expects an int or a Dim, got 2.5"),
    (_dims_same_name_created_twice, "dim-same-name-created-twice", DimMismatchError, ["feat"],
     "two different dims are both named 'feat'"),
    (_dims_reduce_over_recreated_dim, "dim-reduce-over-recreated-dim", DimMismatchError, ["time"],
     "it has a different dim also named 'time'"),
    (_dims_dim_used_as_tensor, "dim-dim-used-as-tensor", TraceError, ["feat"],
     "where a tensor was expected; use looplift.length(dim)"),
]


# ------------------------------------------------------------------------------------------------------------------
# Inputs: Named and calling a program
# ------------------------------------------------------------------------------------------------------------------


def _input_too_few_dims():
    prog = _sum_program()
    prog(ll.Named(torch.randn(2, 5, 3), (B, T), lengths={T: torch.tensor([5, 3])}))  # <input-too-few-dims>


def _input_too_many_dims():
    prog = _sum_program()
    prog(ll.Named(torch.randn(2, 5), (B, T, F), lengths={T: torch.tensor([5, 3])}))  # <input-too-many-dims>


def _input_wrong_static_size():
    prog = _sum_program()
    prog(ll.Named(torch.randn(2, 5, 4), (B, T, F), lengths={T: torch.tensor([5, 3])}))  # <input-wrong-static-size>


def _input_dims_order_swapped():
    prog = _sum_program()
    prog(ll.Named(torch.randn(5, 2, 3), (B, T, F), lengths={T: torch.tensor([5, 3])}))  # <input-dims-order-swapped>


def _input_lengths_float():
    prog = _sum_program()
    prog(ll.Named(torch.randn(2, 5, 3), (B, T, F), lengths={T: torch.tensor([5.0, 3.0])}))  # <input-lengths-float>


def _input_lengths_list():
    prog = _sum_program()
    prog(ll.Named(torch.randn(2, 5, 3), (B, T, F), lengths={T: [5, 3]}))  # <input-lengths-list>


def _input_lengths_numpy():
    prog = _sum_program()
    prog(ll.Named(torch.randn(2, 5, 3), (B, T, F), lengths={T: np.array([5, 3])}))  # <input-lengths-numpy>


def _input_lengths_wrong_count():
    prog = _sum_program()
    prog(ll.Named(torch.randn(2, 5, 3), (B, T, F), lengths={T: torch.tensor([5, 3, 2])}))  # <input-lengths-wrong-count>


def _input_lengths_negative():
    prog = _sum_program()
    prog(ll.Named(torch.randn(2, 5, 3), (B, T, F), lengths={T: torch.tensor([5, -1])}))  # <input-lengths-negative>


def _input_lengths_past_padding():
    prog = _sum_program()
    prog(ll.Named(torch.randn(2, 5, 3), (B, T, F), lengths={T: torch.tensor([6, 3])}))  # <input-lengths-past-padding>


def _input_lengths_missing():
    prog = _sum_program()
    prog(ll.Named(torch.randn(2, 5, 3), (B, T, F)))  # <input-lengths-missing>


def _input_lengths_for_static_dim():
    prog = _sum_program()
    x, lens = torch.randn(2, 5, 3), torch.tensor([5, 3])
    prog(ll.Named(x, (B, T, F), lengths={T: lens, F: torch.tensor([3, 3])}))  # <input-lengths-for-static-dim>


def _input_lengths_for_batch_dim():
    prog = _sum_program()
    x, lens = torch.randn(2, 5, 3), torch.tensor([5, 3])
    prog(ll.Named(x, (B, T, F), lengths={T: lens, B: torch.tensor([2])}))  # <input-lengths-for-batch-dim>


def _input_lengths_key_string():
    prog = _sum_program()
    x = torch.randn(2, 5, 3)
    prog(ll.Named(x, (B, T, F), lengths={"time": torch.tensor([5, 3])}))  # <input-lengths-key-string>


def _input_lengths_keyed_by_other_time_dim():
    prog = _sum_program()
    x = torch.randn(2, 5, 3)
    prog(ll.Named(x, (B, T, F), lengths={ll.Dim("time"): torch.tensor([5, 3])}))  # <input-lengths-other-time-dim>


def _input_lengths_positional():
    ll.Named(torch.randn(2, 5, 3), (B, T, F), torch.tensor([5, 3]))  # <input-lengths-positional>


def _input_single_dim_not_sequence():
    prog = ll.compile(lambda x: ll.sum(x, axis=B))
    prog(ll.Named(torch.randn(2), B))  # <input-single-dim-not-sequence>


def _input_named_of_numpy():
    prog = _sum_program()
    prog(ll.Named(np.random.randn(2, 5, 3), (B, T, F), lengths={T: torch.tensor([5, 3])}))  # <input-named-of-numpy>


def _input_dims_as_strings():
    prog = _sum_program()
    prog(ll.Named(torch.randn(2, 5, 3), ("batch", "time", "feat")))  # <input-dims-as-strings>


def _input_dim_given_twice():
    prog = ll.compile(lambda x: ll.sum(x, axis=[B, F]))
    prog(ll.Named(torch.randn(2, 3, 3), (B, F, F)))  # <input-dim-given-twice>


def _input_sparse_dim_int():
    emb = nn.Embedding(V, H)
    prog = ll.compile(lambda y: ll.sum(emb(y), axis=[B, T, H]))
    prog(ll.Named(torch.tensor([[1, 2]]), (B, T), {T: torch.tensor([2])}, sparse_dim=5))  # <input-sparse-dim-int>


def _input_too_many_args():
    prog = _sum_program()
    prog(_feats(), _feats())  # <input-too-many-args>


def _input_too_few_args():
    prog = ll.compile(lambda x, y: ll.sum(x + y, axis=[B, T, F]))
    prog(_feats())  # <input-too-few-args>


def _input_unknown_keyword():
    def model(x):
        return ll.sum(x, axis=[B, T, F])
    prog = ll.compile(model)
    prog(inputs=_feats())  # <input-unknown-keyword>


def _input_labels_out_of_range_without_sparse_dim():
    prog = ll.compile(lambda x, y: ll.cross_entropy(x, y, axis=V))
    logits = ll.Named(torch.randn(2, 5, 5), (B, T, V), {T: torch.tensor([5, 3])})
    y = torch.tensor([[1, 9, 3, 0, 0], [4, 0, 2, 0, 0]])
    prog(logits, ll.Named(y, (B, T), {T: torch.tensor([5, 3])}))  # <input-labels-out-of-range-without-sparse-dim>


def _input_batch_sizes_disagree():
    prog = ll.compile(lambda x, y: ll.sum(x + y, axis=[B, T, F]))
    prog(_feats(2), _feats(3))  # <input-batch-sizes-disagree>


def _input_lengths_disagree():
    prog = ll.compile(lambda x, y: ll.sum(x + y, axis=[B, T, F]))
    y = ll.Named(torch.randn(2, 5, 3), (B, T, F), lengths={T: torch.tensor([4, 4])})
    prog(_feats(2), y)  # <input-lengths-disagree>


def _input_batch_dim_missing():
    prog = ll.compile(lambda x: ll.sum(x, axis=[T, F]))
    prog(ll.Named(torch.randn(5, 3), (T, F), lengths={T: torch.tensor([5])}))  # <input-batch-dim-missing>


def _input_spec_passed_to_call():
    prog = _sum_program()
    prog(ll.Spec((B, T, F)))  # <input-spec-passed-to-call>


def _input_align_wrong_dims():
    out = ll.compile(lambda x: x * 2.0)(_feats())
    out.align(B, T)  # <input-align-wrong-dims>


_INPUTS = [
    (_input_too_few_dims, "input-too-few-dims", DimError, ["batch", "time"],
     "the tensor has 3 axes of shape (2, 5, 3), but 2 dims were given: {batch, time}"),
    (_input_too_many_dims, "input-too-many-dims", DimError, ["batch", "time", "feat"],
     "the tensor has 2 axes of shape (2, 5), but 3 dims were given"),
    (_input_wrong_static_size, "input-wrong-static-size", InputError, ["feat"],
     "dim 'feat' is static with size 3, but the tensor has size 4 there"),
    (_input_dims_order_swapped, "input-dims-order-swapped", InputError, ["time", "batch"],
     "the lengths of dim 'time' have shape (2,), expected (5,)"),
    (_input_lengths_float, "input-lengths-float", InputError, ["time"],
     "the lengths of dim 'time' must be an integer torch.Tensor"),
    (_input_lengths_list, "input-lengths-list", ArgumentError, ["time"],
     "the lengths of 'time' must be a torch.Tensor, got list"),
    (_input_lengths_numpy, "input-lengths-numpy", ArgumentError, ["time"],
     "the lengths of 'time' must be a torch.Tensor, got ndarray"),
    (_input_lengths_wrong_count, "input-lengths-wrong-count", InputError, ["time", "batch"],
     "have shape (3,), expected (2,)"),
    (_input_lengths_negative, "input-lengths-negative", InputError, ["time"],
     "must lie in [0, 5] (its padded size), got values from -1 to 5"),
    (_input_lengths_past_padding, "input-lengths-past-padding", InputError, ["time"],
     "must lie in [0, 5] (its padded size), got values from 3 to 6"),
    (_input_lengths_missing, "input-lengths-missing", InputError, ["time"],
     "dim 'time' is dynamic but no lengths were given for it"),
    (_input_lengths_for_static_dim, "input-lengths-for-static-dim", InputError, ["feat"], "which is not a dynamic dim"),
    (_input_lengths_for_batch_dim, "input-lengths-for-batch-dim", InputError, ["batch"], "which is not a dynamic dim"),
    (_input_lengths_key_string, "input-lengths-key-string", ArgumentError, ["time"],
     "the keys of lengths are Dims, got 'time'"),
    (_input_lengths_keyed_by_other_time_dim, "input-lengths-other-time-dim", InputError, ["time"],
     "dim 'time' is dynamic but no lengths were given for it"),
    (_input_lengths_positional, "input-lengths-positional", ArgumentError, [],
     "lengths must map each dynamic Dim to its lengths tensor"),
    (_input_single_dim_not_sequence, "input-single-dim-not-sequence", ArgumentError, ["batch"],
     "dims must be a sequence of looplift.Dim, one per axis"),
    (_input_named_of_numpy, "input-named-of-numpy", ArgumentError, [], "Named needs a torch.Tensor, got ndarray"),
    (_input_dims_as_strings, "input-dims-as-strings", ArgumentError, ["batch", "time", "feat"],
     "dims must be a sequence of looplift.Dim, one per axis"),
    (_input_dim_given_twice, "input-dim-given-twice", InputError, ["feat"], "a dim is given twice"),
    (_input_sparse_dim_int, "input-sparse-dim-int", ArgumentError, [], "sparse_dim must be the vocabulary Dim, got 5"),
    (_input_too_many_args, "input-too-many-args", ArgumentError, [], "too many positional arguments"),
    (_input_too_few_args, "input-too-few-args", ArgumentError, [], "missing a required argument: 'y'"),
    (_input_unknown_keyword, "input-unknown-keyword", ArgumentError, [],
     "called with 0 positional and 1 keyword argument(s)"),
    (_input_labels_out_of_range_without_sparse_dim, "input-labels-out-of-range-without-sparse-dim", InputError,
     ["vocab"], "the labels of cross_entropy: label 9 at (batch 0, time 1)"),
    (_input_batch_sizes_disagree, "input-batch-sizes-disagree", InputError, ["batch"],
     "dim 'batch' has size 3, but input 0"),
    (_input_lengths_disagree, "input-lengths-disagree", InputError, ["time"],
     "the lengths of dim 'time' differ from those given with another input"),
    (_input_batch_dim_missing, "input-batch-dim-missing", InputError, ["time", "batch"],
     "run over 'batch', which no input has"),
    (_input_spec_passed_to_call, "input-spec-passed-to-call", InputError, [], "Spec is for Program.trace"),
    (_input_align_wrong_dims, "input-align-wrong-dims", DimError, ["batch", "time", "feat"], "is not a permutation of"),
]


# ------------------------------------------------------------------------------------------------------------------
# Ops
# ------------------------------------------------------------------------------------------------------------------


def _op_sum_missing_dim():
    def model(x):
        return ll.sum(x, axis=H)  # <op-sum-missing-dim>
    _run(model, _feats())


def _op_sum_axis_string():
    def model(x):
        return ll.sum(x, axis="time")  # <op-sum-axis-string>
    _run(model, _feats())


def _op_sum_dim_twice():
    def model(x):
        return ll.sum(x, axis=[F, F])  # <op-sum-dim-twice>
    _run(model, _feats())


def _op_sum_torch_dim_keyword():
    def model(x):
        return ll.sum(x, dim=F)  # <op-sum-torch-dim-keyword>
    _run(model, _feats())


def _op_sum_keepdim():
    def model(x):
        return ll.sum(x, axis=F, keepdim=True)  # <op-sum-keepdim>
    _run(model, _feats())


def _op_mean_int():
    def model(x):
        return ll.mean(ll.cast(x, "int64"), axis=F)  # <op-mean-int>
    _run(model, _feats())


def _op_max_unpacked_like_torch():
    def model(x):
        values, indices = ll.max(x, axis=F)  # <op-max-unpacked-like-torch>
        return values
    _run(model, _feats())


def _op_softmax_axis_list():
    def model(x):
        return ll.softmax(x, axis=[F])  # <op-softmax-axis-list>
    _run(model, _feats())


def _op_softmax_axis_minus_one():
    def model(x):
        return ll.softmax(x, -1)  # <op-softmax-axis-minus-one>
    _run(model, _feats())


def _op_softmax_int():
    def model(x):
        return ll.softmax(ll.cast(x, "int64"), axis=F)  # <op-softmax-int>
    _run(model, _feats())


def _op_softmax_missing_dim():
    def model(x):
        return ll.log_softmax(x, axis=V)  # <op-softmax-missing-dim>
    _run(model, _feats())


def _op_argmax_two_axes():
    def model(x):
        return ll.argmax(x, axis=[T, F])  # <op-argmax-two-axes>
    _run(model, _feats())


def _op_cumsum_axis_list():
    def model(x):
        return ll.cumsum(x, axis=[T])  # <op-cumsum-axis-list>
    _run(model, _feats())


def _op_concat_out_dim_wrong_size():
    def model(x):
        return ll.concat(x, x, axis=F, out_dim=ll.Dim("feat2", 5))  # <op-concat-out-dim-wrong-size>
    _run(model, _feats())


def _op_concat_cannot_tell_axis():
    def model(x):
        return ll.concat(x, x * 2.0)  # <op-concat-cannot-tell-axis>
    _run(model, _feats())


def _op_concat_axis_missing():
    def model(x):
        return ll.concat(x, ll.zeros([B, T, H]), axis=F)  # <op-concat-axis-missing>
    _run(model, _feats())


def _op_concat_wrong_number_of_axes():
    def model(x):
        return ll.concat(x, x, x, axis=[F, F])  # <op-concat-wrong-number-of-axes>
    _run(model, _feats())


def _op_concat_list_and_positional_axis():
    def model(x):
        return ll.concat([x, x], F)  # <op-concat-list-and-positional-axis>
    _run(model, _feats())


def _op_concat_nothing():
    def model(x):
        parts = []
        return ll.concat(*parts, axis=F)  # <op-concat-nothing>
    _run(model, _feats())


def _op_pad_negative():
    def model(x):
        return ll.pad(x, axis=T, left=-1)  # <op-pad-negative>
    _run(model, _feats())


def _op_pad_missing_axis():
    def model(x):
        return ll.pad(x, axis=H, right=2)  # <op-pad-missing-axis>
    _run(model, _feats())


def _op_gather_float_index():
    def model(x):
        return ll.gather(x, index=ll.zeros([B]), axis=F)  # <op-gather-float-index>
    _run(model, _feats())


def _op_gather_index_has_axis():
    def model(x):
        index = ll.argmax(x, axis=T) + ll.zeros([F], dtype="int64")
        return ll.gather(x, index=index, axis=F)  # <op-gather-index-has-axis>
    _run(model, _feats())


def _op_gather_axis_missing():
    def model(x):
        return ll.gather(x, index=ll.argmax(x, axis=F), axis=V)  # <op-gather-axis-missing>
    _run(model, _feats())


def _op_gather_index_positional():
    def model(x):
        return ll.gather(x, ll.argmax(x, axis=F), F)  # <op-gather-index-positional>
    _run(model, _feats())


def _op_linear_weight_transposed():
    w = nn.Linear(F, H)

    def model(x):
        weight = ll.cast(w.weight, "float32")
        return ll.linear(x, weight, in_dim=H, out_dim=F)  # <op-linear-weight-transposed>
    _run(model, _feats())


def _op_dot_missing_reduce_dim():
    def model(x):
        return ll.dot(x, ll.ones([H]), reduce=H)  # <op-dot-missing-reduce-dim>
    _run(model, _feats())


def _op_dot_without_reduce():
    def model(x):
        return ll.dot(x, x)  # <op-dot-without-reduce>
    _run(model, _feats())


def _op_matmul_same_name_dims():
    def model(x):
        return ll.matmul(x, ll.ones([ll.Dim("feat", 3), H]), reduce=F)  # <op-matmul-same-name-dims>
    _run(model, _feats())


def _op_where_float_condition():
    def model(x):
        return ll.where(x, x, 0.0)  # <op-where-float-condition>
    _run(model, _feats())


def _op_where_int_condition():
    def model(x):
        return ll.where(ll.cast(x > 0.0, "int64"), x, 0.0)  # <op-where-int-condition>
    _run(model, _feats())


def _op_cast_bad_dtype_name():
    def model(x):
        return ll.cast(x, "float")  # <op-cast-bad-dtype-name>
    _run(model, _feats())


def _op_cast_torch_prefixed_name():
    def model(x):
        return ll.cast(x, "torch.int64")  # <op-cast-torch-prefixed-name>
    _run(model, _feats())


def _op_cross_entropy_wrong_sparse_dim():
    def model(x, y):
        return ll.cross_entropy(x, y, axis=F)  # <op-cross-entropy-wrong-sparse-dim>
    _run(model, _feats(), _targets())


def _op_cross_entropy_axis_missing():
    def model(x, y):
        return ll.cross_entropy(x, y, axis=V)  # <op-cross-entropy-axis-missing>
    _run(model, _feats(), _targets())


def _op_cross_entropy_int_logits():
    def model(y):
        return ll.cross_entropy(ll.one_hot(y, dtype="int64"), y, axis=V)  # <op-cross-entropy-int-logits>
    _run(model, _targets())


def _op_cross_entropy_soft_targets_without_axis():
    def model(x):
        soft = ll.softmax(ll.sum(x, axis=F), axis=T)
        return ll.cross_entropy(x, soft, axis=F)  # <op-cross-entropy-soft-targets-without-axis>
    _run(model, _feats())


def _op_cross_entropy_missing_axis_kw():
    def model(x, y):
        return ll.cross_entropy(x, y)  # <op-cross-entropy-missing-axis-kw>
    _run(model, ll.Named(torch.randn(2, 5, 5), (B, T, V), {T: torch.tensor([5, 3])}), _targets())


def _op_ctc_blank_out_of_range():
    def model(x, y):
        return ll.ctc_loss(x, y, input_axis=T, targets_axis=U, axis=V, blank=5)  # <op-ctc-blank-out-of-range>
    _run(model, *_ctc_inputs())


def _op_ctc_targets_axis_swapped():
    def model(x, y):
        return ll.ctc_loss(x, y, input_axis=U, targets_axis=T, axis=V, blank=0)  # <op-ctc-targets-axis-swapped>
    _run(model, *_ctc_inputs())


def _op_ctc_float_targets():
    def model(x, y):
        floats = ll.cast(y, "float32")
        return ll.ctc_loss(x, floats, input_axis=T, targets_axis=U, axis=V, blank=0)  # <op-ctc-float-targets>
    _run(model, *_ctc_inputs())


def _op_ctc_vocab_axis_wrong():
    def model(x, y):
        return ll.ctc_loss(x, y, input_axis=T, targets_axis=U, axis=B, blank=0)  # <op-ctc-vocab-axis-wrong>
    _run(model, *_ctc_inputs())


def _op_rnnt_prefix_is_labels_dim():
    def model(s, y):
        s = ll.replace_dim(s, U + 1, ll.Dim("prefix"))
        return ll.rnnt_loss(s, y, blank=0, enc_time=T, prefix=U, axis=V)  # <op-rnnt-prefix-is-labels-dim>
    _run(model, *_rnnt_inputs())


def _op_rnnt_blank_out_of_range():
    def model(s, y):
        return ll.rnnt_loss(s, y, blank=5, enc_time=T, prefix=U + 1, axis=V)  # <op-rnnt-blank-out-of-range>
    _run(model, *_rnnt_inputs())


def _op_rnnt_scores_are_typo():
    def model(s, y):
        kw = dict(blank=0, enc_time=T, prefix=U + 1, axis=V)
        return ll.rnnt_loss(s, y, **kw, scores_are="log_prob")  # <op-rnnt-scores-are-typo>
    _run(model, *_rnnt_inputs())


def _op_dropout_p_one():
    def model(x):
        return ll.dropout(x, 1.0)  # <op-dropout-p-one>
    _run(model, _feats(), mode="train")


def _op_dropout_p_percent():
    def model(x):
        return ll.dropout(x, 10)  # <op-dropout-p-percent>
    _run(model, _feats(), mode="train")


def _op_dropout_broadcast_dim_missing():
    def model(x):
        return ll.dropout(x, 0.1, broadcast_over=[H])  # <op-dropout-broadcast-dim-missing>
    _run(model, _feats(), mode="train")


def _op_layer_norm_missing_dim():
    def model(x):
        return ll.layer_norm(x, axis=H)  # <op-layer-norm-missing-dim>
    _run(model, _feats())


def _op_layer_norm_dynamic_dim():
    def model(x):
        return ll.layer_norm(x, axis=T)  # <op-layer-norm-dynamic-dim>
    _run(model, _feats())


def _op_layer_norm_int():
    def model(x):
        return ll.layer_norm(ll.cast(x, "int64"), axis=F)  # <op-layer-norm-int>
    _run(model, _feats())


def _op_one_hot_float():
    def model(x):
        return ll.one_hot(x)  # <op-one-hot-float>
    _run(model, _feats())


def _op_one_hot_without_sparse_dim():
    def model(x):
        return ll.one_hot(ll.cast(x, "int64"))  # <op-one-hot-without-sparse-dim>
    _run(model, _feats())


def _op_one_hot_num_classes_kw():
    def model(y):
        return ll.one_hot(y, num_classes=5)  # <op-one-hot-num-classes-kw>
    _run(model, _targets())


def _op_conv1d_padding_typo():
    conv = nn.Conv1d(F, H, 3)

    def model(x):
        kw = dict(in_dim=F, out_dim=H, filter_dim=conv.filter_dim)
        return ll.conv1d(x, conv.weight, axis=T, **kw, padding="SAME")  # <op-conv1d-padding-typo>
    _run(model, _feats())


def _op_cum_concat_outside_loop():
    def model(x):
        return ll.cum_concat(x)  # <op-cum-concat-outside-loop>
    _run(model, _feats())


def _op_cum_concat_of_whole_sequence_in_loop():
    def model(x):
        with ll.Loop(axis=T) as loop:
            hist = ll.cum_concat(x)  # <op-cum-concat-of-whole-sequence-in-loop>
            y = loop.stack(ll.sum(hist, axis=[T.history(), F]))
        return y
    _run(model, _feats())


def _op_shift_in_dynamic_axis():
    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.win = ll.zeros([F])
        with loop:
            loop.state.win = ll.shift_in(loop.state.win, loop.unstack(x), axis=T)  # <op-shift-in-dynamic-axis>
        return loop.state.win
    _run(model, _feats())


def _op_shift_in_frame_extra_dim():
    W = ll.Dim("window", 3)

    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.win = ll.zeros([W])
        with loop:
            loop.state.win = ll.shift_in(loop.state.win, loop.unstack(x), axis=W)  # <op-shift-in-frame-extra-dim>
        return loop.state.win
    _run(model, _feats())


def _op_full_sparse_dim_float():
    def model(x):
        return ll.full(0.0, sparse_dim=V)  # <op-full-sparse-dim-float>
    _run(model, _feats())


def _op_zeros_shape_tuple():
    def model(x):
        return x + ll.zeros((2, 5, 3))  # <op-zeros-shape-tuple>
    _run(model, _feats())


def _op_zeros_dtype_typo():
    def model(x):
        return x + ll.zeros([F], dtype="flaot32")  # <op-zeros-dtype-typo>
    _run(model, _feats())


def _op_ones_positional_dims():
    def model(x):
        return x + ll.ones(B, F)  # <op-ones-positional-dims>
    _run(model, _feats())


def _op_split_wrong_parts():
    def model(x):
        return ll.split(x, F, [ll.Dim("low", 1), ll.Dim("high", 1)])  # <op-split-wrong-parts>
    _run(model, _feats())


def _op_split_dynamic():
    def model(x):
        return ll.split(x, T, [ll.Dim("head", 2), ll.Dim("tail", 3)])  # <op-split-dynamic>
    _run(model, _feats())


def _op_split_not_a_concat():
    def model(x):
        return ll.split(x, F)  # <op-split-not-a-concat>
    _run(model, _feats())


def _op_expand_ints():
    def model(x):
        return ll.expand(x, [4])  # <op-expand-ints>
    _run(model, _feats())


def _op_gather_constant_index_out_of_range():
    def model(x):
        return ll.gather(x, index=3, axis=F)  # <op-gather-constant-index-out-of-range>
    _run(model, _feats())


def _op_full_label_out_of_vocab():
    def model(x):
        bos = ll.full(V.size, sparse_dim=V)  # <op-full-label-out-of-vocab>
        return ll.gather(ll.sum(x, axis=F) + ll.zeros([V]), index=bos, axis=V)
    _run(model, _feats())


def _op_slice_dynamic_positive_end():
    def model(x):
        return ll.slice(x, T, 0, 3)  # <op-slice-dynamic-positive-end>
    _run(model, _feats())


def _op_merge_dims_dynamic_inner():
    def model(x):
        return ll.merge_dims(x, [F, T])  # <op-merge-dims-dynamic-inner>
    _run(model, _feats())


def _op_split_dims_sizes_mismatch():
    def model(x):
        return ll.split_dims(x, F, [ll.Dim("rows", 2), ll.Dim("cols", 2)])  # <op-split-dims-sizes-mismatch>
    _run(model, _feats())


def _op_replace_dim_size_mismatch():
    def model(x):
        return ll.replace_dim(x, F, V)  # <op-replace-dim-size-mismatch>
    _run(model, _feats())


def _op_length_of_string():
    def model(x):
        return ll.length("time")  # <op-length-of-string>
    _run(model, _feats())


def _op_logical_and_float():
    def model(x):
        return ll.logical_and(x, x > 0.0)  # <op-logical-and-float>
    _run(model, _feats())


def _op_and_operator_on_floats():
    def model(x):
        return x & (x > 0.0)  # <op-and-operator-on-floats>
    _run(model, _feats())


def _op_invert_float():
    def model(x):
        return ~x  # <op-invert-float>
    _run(model, _feats())


def _op_tanh_int():
    def model(x):
        return ll.tanh(ll.cast(x, "int64"))  # <op-tanh-int>
    _run(model, _feats())


def _op_add_string():
    def model(x):
        return x + "1"  # <op-add-string>
    _run(model, _feats())


def _op_add_none():
    def model(x):
        bias = None
        return x + bias  # <op-add-none>
    _run(model, _feats())


def _op_add_torch_tensor():
    def model(x):
        return x + torch.ones(3)  # <op-add-torch-tensor>
    _run(model, _feats())


def _op_zeros_outside_trace():
    ll.zeros([F])  # <op-zeros-outside-trace>


def _op_sum_outside_trace_on_torch():
    ll.sum(torch.randn(2, 3), axis=F)  # <op-sum-outside-trace-on-torch>


def _op_compress_int_mask():
    def model(x):
        return ll.compress(x, ll.cast(x > 0.0, "int64"), axis=T)  # <op-compress-int-mask>
    _run(model, _feats())


def _op_unmask_not_masked():
    def model(x):
        return ll.unmask(x, axis=T)  # <op-unmask-not-masked>
    _run(model, _feats())


def _op_shift_right_without_initial():
    def model(x):
        return ll.shift_right(x, axis=T)  # <op-shift-right-without-initial>
    _run(model, _feats())


def _op_clip_bounds_swapped():
    def model(x):
        return ll.clip(x, min=1.0, max=-1.0)  # <op-clip-bounds-swapped>
    _run(model, _feats())


_OPS = [
    (_op_sum_missing_dim, "op-sum-missing-dim", DimError, ["hidden"], "sum: axis 'hidden' is not a dim of the tensor"),
    (_op_sum_axis_string, "op-sum-axis-string", ArgumentError, ["time"],
     "axis must be a Dim or a sequence of Dims, got 'time'"),
    (_op_sum_dim_twice, "op-sum-dim-twice", DimError, ["feat"], "axis names a dim twice"),
    (_op_sum_torch_dim_keyword, "op-sum-torch-dim-keyword", ArgumentError, [], "unexpected keyword argument 'dim'"),
    (_op_sum_keepdim, "op-sum-keepdim", ArgumentError, [], "unexpected keyword argument 'keepdim'"),
    (_op_mean_int, "op-mean-int", DTypeError, [], "mean needs a floating-point tensor"),
    (_op_max_unpacked_like_torch, "op-max-unpacked-like-torch", TraceError, [],
     "cannot be iterated; ops name the dim they work on instead"),
    (_op_softmax_axis_list, "op-softmax-axis-list", DimError, ["feat"], "softmax takes a single Dim as axis"),
    (_op_softmax_axis_minus_one, "op-softmax-axis-minus-one", DimError, [],
     "softmax takes a single Dim as axis, got -1"),
    (_op_softmax_int, "op-softmax-int", DTypeError, [], "softmax needs a floating-point tensor"),
    (_op_softmax_missing_dim, "op-softmax-missing-dim", DimError, ["vocab"],
     "log_softmax: axis 'vocab' is not a dim of the tensor"),
    (_op_argmax_two_axes, "op-argmax-two-axes", DimError, ["time", "feat"], "argmax takes a single Dim as axis"),
    (_op_cumsum_axis_list, "op-cumsum-axis-list", DimError, ["time"], "cumsum takes a single Dim as axis"),
    (_op_concat_out_dim_wrong_size, "op-concat-out-dim-wrong-size", DimError, ["feat2"], "does not have size 6"),
    (_op_concat_cannot_tell_axis, "op-concat-cannot-tell-axis", DimError, [],
     "concat: cannot tell which dim of the tensor"),
    (_op_concat_axis_missing, "op-concat-axis-missing", DimError, ["feat", "hidden"],
     "concat: axis 'feat' is not a dim of the tensor"),
    (_op_concat_wrong_number_of_axes, "op-concat-wrong-number-of-axes", DimError, [],
     "concat: got 3 tensors but 2 axes"),
    (_op_concat_list_and_positional_axis, "op-concat-list-and-positional-axis", TraceError, [], "cannot use list"),
    (_op_concat_nothing, "op-concat-nothing", DimError, [], "concat needs at least one tensor"),
    (_op_pad_negative, "op-pad-negative", DimError, ["time"], "pad: left and right must be >= 0"),
    (_op_pad_missing_axis, "op-pad-missing-axis", DimError, ["hidden"], "pad: axis 'hidden' is not a dim"),
    (_op_gather_float_index, "op-gather-float-index", DTypeError, [], "gather needs an integer tensor of indices"),
    (_op_gather_index_has_axis, "op-gather-index-has-axis", DimError, ["feat"],
     "must not have the gathered dim 'feat'"),
    (_op_gather_axis_missing, "op-gather-axis-missing", DimError, ["vocab"], "gather: axis 'vocab' is not a dim"),
    (_op_gather_index_positional, "op-gather-index-positional", ArgumentError, [],
     "gather() takes 1 positional argument but 3 were given"),
    (_op_linear_weight_transposed, "op-linear-weight-transposed", DimError, ["hidden"],
     "linear: in dim 'hidden' is not a dim"),
    (_op_dot_missing_reduce_dim, "op-dot-missing-reduce-dim", DimError, ["hidden"],
     "dot: reduce dim 'hidden' is not a dim"),
    (_op_dot_without_reduce, "op-dot-without-reduce", ArgumentError, [],
     "missing 1 required keyword-only argument: 'reduce'"),
    (_op_matmul_same_name_dims, "op-matmul-same-name-dims", DimMismatchError, ["feat"],
     "it has a different dim also named 'feat'"),
    (_op_where_float_condition, "op-where-float-condition", DTypeError, [], "where needs a bool condition"),
    (_op_where_int_condition, "op-where-int-condition", DTypeError, [], "where needs a bool condition"),
    (_op_cast_bad_dtype_name, "op-cast-bad-dtype-name", DTypeError, [], "unknown dtype 'float'; use one of"),
    (_op_cast_torch_prefixed_name, "op-cast-torch-prefixed-name", DTypeError, [], "unknown dtype 'torch.int64'"),
    (_op_cross_entropy_wrong_sparse_dim, "op-cross-entropy-wrong-sparse-dim", DimError, ["vocab", "feat"],
     "is not the vocabulary dim"),
    (_op_cross_entropy_axis_missing, "op-cross-entropy-axis-missing", DimError, ["vocab"],
     "vocabulary dim 'vocab' is not a dim of the tensor"),
    (_op_cross_entropy_int_logits, "op-cross-entropy-int-logits", DTypeError, [],
     "cross_entropy needs a floating-point tensor"),
    (_op_cross_entropy_soft_targets_without_axis, "op-cross-entropy-soft-targets-without-axis", DimError, ["feat"],
     "vocabulary dim 'feat' is not a dim of the tensor"),
    (_op_cross_entropy_missing_axis_kw, "op-cross-entropy-missing-axis-kw", ArgumentError, [],
     "missing 1 required keyword-only argument: 'axis'"),
    (_op_ctc_blank_out_of_range, "op-ctc-blank-out-of-range", DimError, ["vocab"], "blank=5 is not an index of"),
    (_op_ctc_targets_axis_swapped, "op-ctc-targets-axis-swapped", DimError, ["labels"],
     "ctc_loss: axis 'labels' is not a dim"),
    (_op_ctc_float_targets, "op-ctc-float-targets", DTypeError, [], "ctc_loss needs an integer tensor of indices"),
    (_op_ctc_vocab_axis_wrong, "op-ctc-vocab-axis-wrong", DimError, ["batch"], "blank=0 is not an index of"),
    (_op_rnnt_prefix_is_labels_dim, "op-rnnt-prefix-is-labels-dim", DimError, ["labels"],
     "rnnt_loss: axis 'labels' is not a dim"),
    (_op_rnnt_blank_out_of_range, "op-rnnt-blank-out-of-range", DimError, ["vocab"],
     "blank must be an index of the vocabulary dim 'vocab', got 5"),
    (_op_rnnt_scores_are_typo, "op-rnnt-scores-are-typo", DimError, [],
     "scores_are is 'logits' or 'log_probs', got 'log_prob'"),
    (_op_dropout_p_one, "op-dropout-p-one", ConfigError, [], "dropout: p must be in [0, 1), got 1.0"),
    (_op_dropout_p_percent, "op-dropout-p-percent", ConfigError, [], "dropout: p must be in [0, 1), got 10"),
    (_op_dropout_broadcast_dim_missing, "op-dropout-broadcast-dim-missing", DimError, ["hidden"],
     "broadcast_over dim 'hidden' is not a dim"),
    (_op_layer_norm_missing_dim, "op-layer-norm-missing-dim", DimError, ["hidden"],
     "layer_norm: axis 'hidden' is not a dim"),
    (_op_layer_norm_dynamic_dim, "op-layer-norm-dynamic-dim", DimError, ["time"],
     "layer_norm normalizes over static dims"),
    (_op_layer_norm_int, "op-layer-norm-int", DTypeError, [], "layer_norm needs a floating-point tensor"),
    (_op_one_hot_float, "op-one-hot-float", DTypeError, [], "one_hot needs an integer tensor of indices"),
    (_op_one_hot_without_sparse_dim, "op-one-hot-without-sparse-dim", DTypeError, [],
     "one_hot needs label indices with a sparse_dim"),
    (_op_one_hot_num_classes_kw, "op-one-hot-num-classes-kw", ArgumentError, [],
     "unexpected keyword argument 'num_classes'"),
    (_op_conv1d_padding_typo, "op-conv1d-padding-typo", DimError, [], "padding must be 'same' or 'valid', got 'SAME'"),
    (_op_cum_concat_outside_loop, "op-cum-concat-outside-loop", TraceError, [],
     "cum_concat without axis= is used inside a loop"),
    (_op_cum_concat_of_whole_sequence_in_loop, "op-cum-concat-of-whole-sequence-in-loop", DimError, ["time"],
     "has the loop's dim (use a frame"),
    (_op_shift_in_dynamic_axis, "op-shift-in-dynamic-axis", DimError, ["time"], "must have the static dim 'time'"),
    (_op_shift_in_frame_extra_dim, "op-shift-in-frame-extra-dim", DimError, ["window", "feat"],
     "must have the window's dims but 'window'"),
    (_op_full_sparse_dim_float, "op-full-sparse-dim-float", DTypeError, [],
     "full: sparse_dim needs an integer dtype, got torch.float32"),
    (_op_zeros_shape_tuple, "op-zeros-shape-tuple", DimError, [], "dims must be a Dim or a sequence of Dims, got 2"),
    (_op_zeros_dtype_typo, "op-zeros-dtype-typo", DTypeError, [], "unknown dtype 'flaot32'"),
    (_op_ones_positional_dims, "op-ones-positional-dims", ArgumentError, [],
     "ones() takes from 0 to 1 positional arguments but 2 were given"),
    (_op_split_wrong_parts, "op-split-wrong-parts", DimError, ["low", "high", "feat"],
     "have total size 2, but Dim('feat', 3) has size 3"),
    (_op_split_dynamic, "op-split-dynamic", DimError, ["time"], "split works along static dims only"),
    (_op_split_not_a_concat, "op-split-not-a-concat", DimError, ["feat"],
     "is not a concatenation of dims; pass parts=[...]"),
    (_op_expand_ints, "op-expand-ints", DimError, [], "dims must be a Dim or a sequence of Dims, got 4"),
    (_op_gather_constant_index_out_of_range, "op-gather-constant-index-out-of-range", DimError, ["feat"],
     "the index 3 is not in 'feat' (0..2)"),
    (_op_full_label_out_of_vocab, "op-full-label-out-of-vocab", DimError, ["vocab"],
     "the label 5 is not in its sparse_dim 'vocab' (0..4)"),
    (_op_slice_dynamic_positive_end, "op-slice-dynamic-positive-end", DimError, ["time"],
     "slice along the dynamic dim 'time' takes start >= 0"),
    (_op_merge_dims_dynamic_inner, "op-merge-dims-dynamic-inner", DimError, ["feat", "time"],
     "only the first (outer) dim may be dynamic"),
    (_op_split_dims_sizes_mismatch, "op-split-dims-sizes-mismatch", DimError, ["feat", "rows", "cols"],
     "sizes do not multiply to 3"),
    (_op_replace_dim_size_mismatch, "op-replace-dim-size-mismatch", DimError, ["feat", "vocab"], "differ in size"),
    (_op_length_of_string, "op-length-of-string", ArgumentError, ["time"],
     "axis must be a Dim or a sequence of Dims, got 'time'"),
    (_op_logical_and_float, "op-logical-and-float", DTypeError, [], "logical_and needs bool tensors"),
    (_op_and_operator_on_floats, "op-and-operator-on-floats", DTypeError, [], "logical_and needs bool tensors"),
    (_op_invert_float, "op-invert-float", DTypeError, [], "logical_not needs a bool tensor"),
    (_op_tanh_int, "op-tanh-int", DTypeError, [], "tanh needs a floating-point tensor"),
    (_op_add_string, "op-add-string", TraceError, [], "cannot use str '1' as a looplift tensor"),
    (_op_add_none, "op-add-none", TraceError, [], "cannot use NoneType None as a looplift tensor"),
    (_op_add_torch_tensor, "op-add-torch-tensor", TraceError, [], "a torch.Tensor of shape (3,) has no dims"),
    (_op_zeros_outside_trace, "op-zeros-outside-trace", TraceError, ["feat"],
     "looplift ops run only while a program is traced"),
    (_op_sum_outside_trace_on_torch, "op-sum-outside-trace-on-torch", TraceError, [],
     "a torch.Tensor of shape (2, 3) has no dims"),
    (_op_compress_int_mask, "op-compress-int-mask", DTypeError, [], "compress needs a bool mask"),
    (_op_unmask_not_masked, "op-unmask-not-masked", DimError, ["time"], "is not a masked dim"),
    (_op_shift_right_without_initial, "op-shift-right-without-initial", ArgumentError, [],
     "missing 1 required keyword-only argument: 'initial'"),
    (_op_clip_bounds_swapped, "op-clip-bounds-swapped", ConfigError, [], "clip: min (1.0) is above max (-1.0)"),
]


# ------------------------------------------------------------------------------------------------------------------
# Symbolic tensors used like torch tensors
# ------------------------------------------------------------------------------------------------------------------


def _sym_torch_tanh():
    def model(x):
        return torch.tanh(x)  # <sym-torch-tanh>
    _run(model, _feats())


def _sym_torch_cat():
    def model(x):
        return torch.cat([x, x], dim=-1)  # <sym-torch-cat>
    _run(model, _feats())


def _sym_shape():
    def model(x):
        n = x.shape[0]  # <sym-shape>
        return x * n
    _run(model, _feats())


def _sym_size():
    def model(x):
        n = x.size(0)  # <sym-size>
        return x * n
    _run(model, _feats())


def _sym_dim_method():
    def model(x):
        if x.dim() == 3:  # <sym-dim-method>
            return x
        return x
    _run(model, _feats())


def _sym_len():
    def model(x):
        return x * len(x)  # <sym-len>
    _run(model, _feats())


def _sym_index():
    def model(x):
        return x[0]  # <sym-index>
    _run(model, _feats())


def _sym_bool_if():
    def model(x):
        if ll.sum(x, axis=[B, T, F]) > 0.0:  # <sym-bool-if>
            return x
        return -x
    _run(model, _feats())


def _sym_eq_in_if():
    def model(x, y):
        if y == 0:  # <sym-eq-in-if>
            return x
        return x
    _run(model, _feats(), _targets())


def _sym_builtin_max():
    def model(x):
        return max(x, 0.0)  # <sym-builtin-max>
    _run(model, _feats())


def _sym_numpy():
    def model(x):
        return x.numpy()  # <sym-numpy>
    _run(model, _feats())


def _sym_np_asarray():
    def model(x):
        return np.asarray(x)  # <sym-np-asarray>
    _run(model, _feats())


def _sym_float():
    def model(x):
        return float(ll.sum(x, axis=[B, T, F]))  # <sym-float>
    _run(model, _feats())


def _sym_int():
    def model(x):
        n = int(ll.length(T))  # <sym-int>
        return x * n
    _run(model, _feats())


def _sym_item():
    def model(x):
        return ll.sum(x, axis=[B, T, F]).item()  # <sym-item>
    _run(model, _feats())


def _sym_iterate():
    def model(x):
        return [frame * 2.0 for frame in x]  # <sym-iterate>
    _run(model, _feats())


def _sym_to_dtype():
    def model(x):
        return x.to(torch.float64)  # <sym-to-dtype>
    _run(model, _feats())


def _sym_method_sum():
    def model(x):
        return x.sum(F)  # <sym-method-sum>
    _run(model, _feats())


def _sym_detach():
    def model(x):
        return x.detach()  # <sym-detach>
    _run(model, _feats())


def _sym_view():
    def model(x):
        return x.view(-1, 3)  # <sym-view>
    _run(model, _feats())


def _sym_transpose_attr():
    def model(x):
        return x.T  # <sym-transpose-attr>
    _run(model, _feats())


_SYMBOLIC = [
    (_sym_torch_tanh, "sym-torch-tanh", SymbolicTensorError, [], "torch.tanh cannot be applied to the symbolic tensor"),
    (_sym_torch_cat, "sym-torch-cat", SymbolicTensorError, [], "use looplift.concat(*xs, axis=...)"),
    (_sym_shape, "sym-shape", SymbolicAttributeError, [], "has no .shape: it is not a torch.Tensor"),
    (_sym_size, "sym-size", SymbolicAttributeError, [], "has no .size: it is not a torch.Tensor"),
    (_sym_dim_method, "sym-dim-method", SymbolicAttributeError, [], "has no .dim: it is not a torch.Tensor"),
    (_sym_len, "sym-len", TraceError, [], "len() of a symbolic tensor"),
    (_sym_index, "sym-index", SymbolicTensorError, [], "cannot be indexed by position"),
    (_sym_bool_if, "sym-bool-if", TraceError, [], "the truth value of a symbolic tensor"),
    (_sym_eq_in_if, "sym-eq-in-if", TraceError, [], "the truth value of a symbolic tensor"),
    (_sym_builtin_max, "sym-builtin-max", TraceError, [], "the truth value of a symbolic tensor"),
    (_sym_numpy, "sym-numpy", SymbolicAttributeError, [], "has no .numpy: it is not a torch.Tensor"),
    (_sym_np_asarray, "sym-np-asarray", SymbolicTensorError, [], "has no value while looplift traces"),
    (_sym_float, "sym-float", SymbolicTensorError, [], "has no value while looplift traces"),
    (_sym_int, "sym-int", SymbolicTensorError, [], "has no value while looplift traces"),
    (_sym_item, "sym-item", SymbolicAttributeError, [], "has no .item: it is not a torch.Tensor"),
    (_sym_iterate, "sym-iterate", TraceError, [], "cannot be iterated"),
    (_sym_to_dtype, "sym-to-dtype", SymbolicAttributeError, [], "use looplift.cast(x, dtype)"),
    (_sym_method_sum, "sym-method-sum", SymbolicAttributeError, [], "use looplift.sum(x, axis=...)"),
    (_sym_detach, "sym-detach", SymbolicAttributeError, [], "has no .detach: it is not a torch.Tensor"),
    (_sym_view, "sym-view", SymbolicAttributeError, [], "has no .view: it is not a torch.Tensor"),
    (_sym_transpose_attr, "sym-transpose-attr", SymbolicAttributeError, [], "has no .T: it is not a torch.Tensor"),
]


# ------------------------------------------------------------------------------------------------------------------
# Modules: looplift.nn and Parameter
# ------------------------------------------------------------------------------------------------------------------


def _mod_linear_dynamic_in_dim():
    nn.Linear(T, H)  # <mod-linear-dynamic-in-dim>


def _mod_linear_int_sizes():
    nn.Linear(3, 4)  # <mod-linear-int-sizes>


def _mod_linear_bias_keyword():
    nn.Linear(F, H, bias=False)  # <mod-linear-bias-keyword>


def _mod_lstm_zero_layers():
    nn.LSTM(F, H, num_layers=0)  # <mod-lstm-zero-layers>


def _mod_lstm_dropout_out_of_range():
    nn.LSTM(F, H, num_layers=2, dropout=1.5)  # <mod-lstm-dropout-out-of-range>


def _mod_lstm_bidirectional_odd():
    nn.LSTM(F, ll.Dim("enc", 5), bidirectional=True)  # <mod-lstm-bidirectional-odd>


def _mod_lstm_int_sizes():
    nn.LSTM(3, 4)  # <mod-lstm-int-sizes>


def _mod_lstm_batch_first():
    nn.LSTM(F, H, batch_first=True)  # <mod-lstm-batch-first>


def _mod_lstm_initial_state_int_batch():
    cell = nn.LSTM(F, H)

    def model(x):
        out, _ = cell(x, axis=T, state=cell.default_initial_state([2]))  # <mod-lstm-initial-state-int-batch>
        return out
    _run(model, _feats())


def _mod_embedding_dynamic_vocab():
    nn.Embedding(ll.Dim("vocab"), H)  # <mod-embedding-dynamic-vocab>


def _mod_embedding_int_sizes():
    nn.Embedding(5, 4)  # <mod-embedding-int-sizes>


def _mod_layer_norm_dynamic_dim():
    nn.LayerNorm(T)  # <mod-layer-norm-dynamic-dim>


def _mod_dropout_p_out_of_range():
    drop = nn.Dropout(1.5)  # <mod-dropout-p-out-of-range>
    _run(lambda x: drop(x), _feats(), mode="train")


def _mod_conv1d_padding_typo():
    conv = nn.Conv1d(F, H, 3, padding="causal")  # <mod-conv1d-padding-typo>
    _run(lambda x: conv(x, axis=T), _feats())


def _mod_conv1d_stride_zero():
    conv = nn.Conv1d(F, H, 3, stride=0)  # <mod-conv1d-stride-zero>
    _run(lambda x: conv(x, axis=T), _feats())


def _mod_conv1d_filter_size_zero():
    nn.Conv1d(F, H, 0)  # <mod-conv1d-filter-size-zero>


def _mod_parameter_dynamic_dim():
    ll.Parameter([T, F])  # <mod-parameter-dynamic-dim>


def _mod_parameter_init_typo():
    ll.Parameter([F, H], init="xavier")  # <mod-parameter-init-typo>


def _mod_plain_torch_parameter():
    class M(ll.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.scale  # <mod-plain-torch-parameter>
    _run(M(), _feats())


def _mod_torch_linear_inside_model():
    class M(ll.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 4)

        def forward(self, x):
            return self.lin(x)  # <mod-torch-linear-inside-model>
    _run(M(), _feats())


_MODULES = [
    (_mod_linear_dynamic_in_dim, "mod-linear-dynamic-in-dim", DimError, ["time"], "in_dim must be a static dim"),
    (_mod_linear_int_sizes, "mod-linear-int-sizes", ArgumentError, [], "Linear: in_dim must be a looplift.Dim, got 3"),
    (_mod_linear_bias_keyword, "mod-linear-bias-keyword", ArgumentError, [], "unexpected keyword argument 'bias'"),
    (_mod_lstm_zero_layers, "mod-lstm-zero-layers", ConfigError, [], "num_layers must be a positive int, got 0"),
    (_mod_lstm_dropout_out_of_range, "mod-lstm-dropout-out-of-range", ConfigError, [],
     "dropout must be a probability in [0, 1), got 1.5"),
    (_mod_lstm_bidirectional_odd, "mod-lstm-bidirectional-odd", DimError, ["enc"],
     "a bidirectional LSTM needs an even out dim"),
    (_mod_lstm_int_sizes, "mod-lstm-int-sizes", ArgumentError, [], "LSTM: in_dim must be a looplift.Dim, got 3"),
    (_mod_lstm_batch_first, "mod-lstm-batch-first", ArgumentError, [], "unexpected keyword argument 'batch_first'"),
    (_mod_lstm_initial_state_int_batch, "mod-lstm-initial-state-int-batch", DimError, [],
     "dims must be a Dim or a sequence of Dims, got 2"),
    (_mod_embedding_dynamic_vocab, "mod-embedding-dynamic-vocab", DimError, ["vocab"], "vocab must be a static dim"),
    (_mod_embedding_int_sizes, "mod-embedding-int-sizes", ArgumentError, [],
     "Embedding: vocab must be a looplift.Dim, got 5"),
    (_mod_layer_norm_dynamic_dim, "mod-layer-norm-dynamic-dim", DimError, ["time"],
     "Parameter dims must be static Dims"),
    (_mod_dropout_p_out_of_range, "mod-dropout-p-out-of-range", ConfigError, [],
     "Dropout: p must be a probability in [0, 1), got 1.5"),
    (_mod_conv1d_padding_typo, "mod-conv1d-padding-typo", ConfigError, [],
     "Conv1d: padding must be 'same' or 'valid', got 'causal'"),
    (_mod_conv1d_stride_zero, "mod-conv1d-stride-zero", ConfigError, [], "stride must be a positive int, got 0"),
    (_mod_conv1d_filter_size_zero, "mod-conv1d-filter-size-zero", ConfigError, [],
     "filter_size must be a positive int, got 0"),
    (_mod_parameter_dynamic_dim, "mod-parameter-dynamic-dim", DimError, ["time", "feat"],
     "Parameter dims must be static Dims"),
    (_mod_parameter_init_typo, "mod-parameter-init-typo", ConfigError, [], "unknown init 'xavier'"),
    (_mod_plain_torch_parameter, "mod-plain-torch-parameter", TraceError, [], "the parameter M.scale has no dims"),
    (_mod_torch_linear_inside_model, "mod-torch-linear-inside-model", SymbolicTensorError, [],
     "torch.linear cannot be applied to the symbolic tensor"),
]


# ------------------------------------------------------------------------------------------------------------------
# Programs: compile, modes, tracing
# ------------------------------------------------------------------------------------------------------------------


def _prog_compile_class():
    prog = ll.compile(Tiny)  # <prog-compile-class>
    prog(_feats())


def _prog_compile_non_callable():
    ll.compile(Tiny().lin.weight.shape)  # <prog-compile-non-callable>


def _prog_mode_training():
    ll.compile(Tiny(), mode="training")  # <prog-mode-training>


def _prog_mode_inference():
    ll.compile(Tiny(), mode="inference")  # <prog-mode-inference>


def _prog_mode_positional():
    ll.compile(Tiny(), "eval")  # <prog-mode-positional>


def _prog_tensor_from_other_program():
    kept = {}

    def first(x):
        kept["x"] = x * 2.0
        return kept["x"]

    def second(x):
        return x + kept["x"]  # <prog-tensor-from-other-program>
    _run(first, _feats())
    _run(second, _feats())


def _prog_is_training_outside_trace():
    ll.is_training()  # <prog-is-training-outside-trace>


def _prog_explain_before_call():
    prog = ll.compile(Tiny())
    prog.explain()  # <prog-explain-before-call>


def _prog_spec_with_string_dims():
    prog = ll.compile(Tiny())
    prog.trace(ll.Spec(["batch", "time", "feat"]))  # <prog-spec-with-string-dims>


_PROGRAMS = [
    (_prog_compile_class, "prog-compile-class", ArgumentError, [], "compile needs a model, not the class Tiny"),
    (_prog_compile_non_callable, "prog-compile-non-callable", ArgumentError, [], "compile needs a callable"),
    (_prog_mode_training, "prog-mode-training", ModeError, [],
     "mode must be one of ('train', 'eval', 'search'), got 'training'"),
    (_prog_mode_inference, "prog-mode-inference", ModeError, [],
     "mode must be one of ('train', 'eval', 'search'), got 'inference'"),
    (_prog_mode_positional, "prog-mode-positional", ArgumentError, [],
     "compile() takes 1 positional argument but 2 were given"),
    (_prog_tensor_from_other_program, "prog-tensor-from-other-program", TraceError, [],
     "belongs to another traced program"),
    (_prog_is_training_outside_trace, "prog-is-training-outside-trace", ModeError, [],
     "the mode is known only while a program is traced"),
    (_prog_explain_before_call, "prog-explain-before-call", TraceError, [], "the program has not been traced yet"),
    (_prog_spec_with_string_dims, "prog-spec-with-string-dims", ArgumentError, [],
     "Spec: dims must be a sequence of looplift.Dim"),
]


# ------------------------------------------------------------------------------------------------------------------
# Loops
# ------------------------------------------------------------------------------------------------------------------


def _loop_entered_twice():
    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.h = ll.zeros([F])
        with loop:
            loop.state.h = loop.state.h + loop.unstack(x)
        with loop:  # <loop-entered-twice>
            loop.state.h = loop.state.h * 2.0
        return loop.state.h
    _run(model, _feats())


def _loop_state_read_never_set_after_loop():
    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.h = ll.zeros([F])
        with loop:
            loop.state.h = loop.state.h + loop.unstack(x)
        return loop.state.c  # <loop-state-read-never-set-after-loop>
    _run(model, _feats())


def _loop_state_new_value_other_dims():
    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.h = ll.zeros([H])
        with loop:
            loop.state.h = loop.unstack(x) * 2.0  # <loop-state-new-value-other-dims>
        return loop.state.h
    _run(model, _feats())


def _loop_state_initial_none():
    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.h = None
        with loop:
            loop.state.h = loop.unstack(x) * 2.0  # <loop-state-initial-none>
        return loop.state.h
    _run(model, _feats())


def _loop_state_initial_torch_tensor():
    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.h = torch.zeros(3)
        with loop:
            loop.state.h = loop.state.h + loop.unstack(x)  # <loop-state-initial-torch-tensor>
        return loop.state.h
    _run(model, _feats())


def _loop_whole_sequence_instead_of_frame():
    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.acc = ll.zeros([F])
        with loop:
            loop.state.acc = loop.state.acc + x  # <loop-whole-sequence-instead-of-frame>
        return loop.state.acc
    _run(model, _feats())


def _loop_state_structure_changes():
    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.h = ll.zeros([F])
        with loop:
            frame = loop.unstack(x)
            loop.state.h = (frame, frame)  # <loop-state-structure-changes>
        return loop.state.h
    _run(model, _feats())


def _loop_state_dtype_changes():
    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.n = ll.zeros([], dtype="int64")
        with loop:
            loop.state.n = loop.state.n + ll.sum(loop.unstack(x), axis=F)  # <loop-state-dtype-changes>
        return loop.state.n
    _run(model, _feats())


def _loop_last_inside():
    def model(x):
        with ll.Loop(axis=T) as loop:
            frame = loop.unstack(x)
            final = loop.last(frame)  # <loop-last-inside>
        return final
    _run(model, _feats())


def _loop_unstack_missing_axis():
    def model(x):
        with ll.Loop(axis=T) as loop:
            y = loop.stack(loop.unstack(ll.sum(x, axis=T)))  # <loop-unstack-missing-axis>
        return y
    _run(model, _feats())


def _loop_end_non_bool():
    def model(x):
        loop = ll.Loop(max_seq_len=5)
        loop.state.i = 0
        with loop:
            loop.state.i = loop.state.i + 1
            loop.end(loop.state.i, include_eos=True)  # <loop-end-non-bool>
        return loop.state.i
    _run(model, _feats())


def _loop_end_without_include_eos():
    def model(x):
        loop = ll.Loop(max_seq_len=5)
        loop.state.i = 0
        with loop:
            loop.state.i = loop.state.i + 1
            loop.end(loop.state.i >= 3)  # <loop-end-without-include-eos>
        return loop.state.i
    _run(model, _feats())


def _loop_axis_string():
    def model(x):
        with ll.Loop(axis="time") as loop:  # <loop-axis-string>
            y = loop.stack(loop.unstack(x))
        return y
    _run(model, _feats())


def _loop_max_seq_len_float():
    def model(x):
        loop = ll.Loop(max_seq_len=5.0)  # <loop-max-seq-len-float>
        loop.state.i = 0
        with loop:
            loop.state.i = loop.state.i + 1
            loop.end(loop.state.i >= 3, include_eos=True)
        return loop.state.i
    _run(model, _feats())


def _loop_max_seq_len_too_small():
    def model(x):
        loop = ll.Loop(max_seq_len=2)  # <loop-max-seq-len-too-small>
        loop.state.i = 0
        with loop:
            loop.state.i = loop.state.i + 1
            loop.end(loop.state.i >= 3, include_eos=True)
        return loop.state.i
    _run(model, _feats())


def _loop_stacked_value_read_inside():
    def model(x):
        with ll.Loop(axis=T) as loop:
            ys = loop.stack(loop.unstack(x))
            total = ll.sum(ys, axis=T)  # <loop-stacked-value-read-inside>
        return total
    _run(model, _feats())


def _loop_stack_value_with_axis():
    def model(x):
        with ll.Loop(axis=T) as loop:
            ys = loop.stack(x)  # <loop-stack-value-with-axis>
        return ys
    _run(model, _feats())


def _loop_unstack_outside_with():
    def model(x):
        loop = ll.Loop(axis=T)
        frame = loop.unstack(x)  # <loop-unstack-outside-with>
        with loop:
            y = loop.stack(frame)
        return y
    _run(model, _feats())


def _loop_created_outside_trace():
    ll.Loop(axis=T)  # <loop-created-outside-trace>


def _loop_del_state():
    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.h = ll.zeros([F])
        with loop:
            del loop.state.h  # <loop-del-state>
        return x
    _run(model, _feats())


def _loop_search_in_train_mode():
    def model(x):
        with ll.Loop(axis=T) as loop:
            loop.stack(loop.unstack(x))
        return loop.search.scores  # <loop-search-in-train-mode>
    _run(model, _feats(), mode="train")


def _loop_value_used_after_loop():
    def model(x):
        with ll.Loop(axis=T) as loop:
            frame = loop.unstack(x) * 2.0
        return ll.sum(frame, axis=F)  # <loop-value-used-after-loop>
    _run(model, _feats())


def _loop_inner_value_used_in_outer_loop():
    def model(x):
        with ll.Loop(axis=T) as outer:
            frame = outer.unstack(x)
            with ll.Loop(axis=F) as inner:
                v = inner.unstack(frame) * 2.0
                inner.stack(v)
            y = outer.stack(v)  # <loop-inner-value-used-in-outer-loop>
        return y
    _run(model, _feats())


def _loop_index_after_loop():
    def model(x):
        with ll.Loop(axis=T) as loop:
            y = loop.stack(loop.unstack(x))
        return y * ll.cast(loop.index, "float32")  # <loop-index-after-loop>
    _run(model, _feats())


_LOOPS = [
    (_loop_entered_twice, "loop-entered-twice", TraceError, [], "a Loop is entered once"),
    (_loop_state_read_never_set_after_loop, "loop-state-read-never-set-after-loop", TraceError, [],
     "loop state 'c' was never initialised"),
    (_loop_state_new_value_other_dims, "loop-state-new-value-other-dims", DimError, ["hidden", "feat"],
     "changes its dims between steps"),
    (_loop_state_initial_none, "loop-state-initial-none", TraceError, [],
     "is assigned a tensor where its initial value has None"),
    (_loop_state_initial_torch_tensor, "loop-state-initial-torch-tensor", TraceError, [],
     "a torch.Tensor of shape (3,) has no dims"),
    (_loop_whole_sequence_instead_of_frame, "loop-whole-sequence-instead-of-frame", DimError, ["time"],
     "would get the loop's axis 'time'"),
    (_loop_state_structure_changes, "loop-state-structure-changes", TraceError, [],
     "is assigned a value of another structure than its initial value"),
    (_loop_state_dtype_changes, "loop-state-dtype-changes", DTypeError, [],
     "changes its dtype from torch.int64 to torch.float32"),
    (_loop_last_inside, "loop-last-inside", TraceError, [], "loop.last is used after the loop"),
    (_loop_unstack_missing_axis, "loop-unstack-missing-axis", DimError, ["time"],
     "does not have the loop's axis 'time'"),
    (_loop_end_non_bool, "loop-end-non-bool", DTypeError, [], "loop.end needs a bool condition"),
    (_loop_end_without_include_eos, "loop-end-without-include-eos", ArgumentError, [],
     "missing 1 required keyword-only argument: 'include_eos'"),
    (_loop_axis_string, "loop-axis-string", DimError, ["time"], "Loop(axis=...) takes a Dim, got 'time'"),
    (_loop_max_seq_len_float, "loop-max-seq-len-float", TraceError, [],
     "max_seq_len must be an int or a looplift tensor, got 5.0"),
    (_loop_max_seq_len_too_small, "loop-max-seq-len-too-small", ExecutionError, [],
     "ran past max_seq_len (2) with entries not yet ended"),
    (_loop_stacked_value_read_inside, "loop-stacked-value-read-inside", TraceError, ["time"],
     "is the result of loop.stack(...), which exists only after the loop"),
    (_loop_stack_value_with_axis, "loop-stack-value-with-axis", DimError, ["time"],
     "already has the loop's axis 'time'"),
    (_loop_unstack_outside_with, "loop-unstack-outside-with", TraceError, ["time"],
     "loop.unstack is used inside the `with` block of its loop"),
    (_loop_created_outside_trace, "loop-created-outside-trace", TraceError, [],
     "looplift ops run only while a program is traced: Loop"),
    (_loop_del_state, "loop-del-state", TraceError, [], "a loop state cannot be deleted ('h'"),
    (_loop_search_in_train_mode, "loop-search-in-train-mode", TraceError, [],
     "loop.search is read after a loop whose body runs a search step"),
    (_loop_value_used_after_loop, "loop-value-used-after-loop", TraceError, [],
     "was computed inside a loop or Cond and is used outside of it"),
    (_loop_inner_value_used_in_outer_loop, "loop-inner-value-used-in-outer-loop", TraceError, [],
     "was computed inside a loop or Cond and is used outside of it"),
    (_loop_index_after_loop, "loop-index-after-loop", TraceError, ["time"],
     "loop.index is used inside the `with` block of its loop"),
]


# ------------------------------------------------------------------------------------------------------------------
# Cond
# ------------------------------------------------------------------------------------------------------------------


def _cond_result_inside_block():
    def model(x):
        with ll.Cond(ll.full(True)) as cond:
            cond.true = x
            y = cond.result  # <cond-result-inside-block>
            cond.false = -x
        return y
    _run(model, _feats())


def _cond_non_bool_predicate():
    def model(x):
        with ll.Cond(ll.sum(x, axis=[B, T, F])) as cond:  # <cond-non-bool-predicate>
            cond.true = x
            cond.false = -x
        return cond.result
    _run(model, _feats())


def _cond_branches_different_dims():
    def model(x):
        with ll.Cond(ll.full(True)) as cond:
            cond.true = ll.sum(x, axis=T)
            cond.false = ll.sum(x, axis=F)  # <cond-branches-different-dims>
        return cond.result
    _run(model, _feats())


def _cond_missing_false():
    def model(x):
        with ll.Cond(ll.full(True)) as cond:  # <cond-missing-false>
            cond.true = x * 2.0
        return cond.result
    _run(model, _feats())


def _cond_read_true():
    def model(x):
        with ll.Cond(ll.full(True)) as cond:
            cond.true = x * 2.0
            cond.false = cond.true  # <cond-read-true>
        return cond.result
    _run(model, _feats())


def _cond_entered_twice():
    def model(x):
        cond = ll.Cond(ll.full(True))
        with cond:
            cond.true = x
            cond.false = -x
        with cond:  # <cond-entered-twice>
            cond.true = x
            cond.false = -x
        return cond.result
    _run(model, _feats())


def _cond_per_entry_predicate():
    def model(x):
        with ll.Cond(ll.length(T) > 3) as cond:  # <cond-per-entry-predicate>
            cond.true = x
            cond.false = -x
        return cond.result
    _run(model, _feats())


def _cond_python_if_else_style():
    def model(x):
        cond = ll.Cond(ll.full(True))
        cond.true = x  # <cond-python-if-else-style>
        return x
    _run(model, _feats())


_CONDS = [
    (_cond_result_inside_block, "cond-result-inside-block", TraceError, [],
     "cond.result is available after the Cond block"),
    (_cond_non_bool_predicate, "cond-non-bool-predicate", TraceError, [],
     "Cond needs a bool scalar (no dims) predicate"),
    (_cond_branches_different_dims, "cond-branches-different-dims", DimMismatchError, ["feat", "time"],
     "the branches of the Cond return tensors with different dims"),
    (_cond_missing_false, "cond-missing-false", TraceError, [], "a Cond block sets both cond.true and cond.false"),
    (_cond_read_true, "cond-read-true", TraceError, [], "cond.true is set, not read"),
    (_cond_entered_twice, "cond-entered-twice", TraceError, [], "a Cond is entered once"),
    (_cond_per_entry_predicate, "cond-per-entry-predicate", TraceError, ["batch"],
     "for a choice per entry use looplift.where"),
    (_cond_python_if_else_style, "cond-python-if-else-style", TraceError, [],
     "cond.true is set once, first, inside the Cond block"),
]


# ------------------------------------------------------------------------------------------------------------------
# MaskedComputation
# ------------------------------------------------------------------------------------------------------------------


def _masked_non_bool_mask():
    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.acc = ll.zeros([F])
        with loop:
            frame = loop.unstack(x)
            with ll.MaskedComputation(mask=ll.sum(frame, axis=F)):  # <masked-non-bool-mask>
                loop.state.acc = loop.state.acc + frame
        return loop.state.acc
    _run(model, _feats())


def _masked_outside_loop():
    def model(x):
        with ll.MaskedComputation(mask=ll.full(True)):  # <masked-outside-loop>
            y = x * 2.0
        return y
    _run(model, _feats())


def _masked_mask_over_whole_sequence():
    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.acc = ll.zeros([F])
        with loop:
            frame = loop.unstack(x)
            with ll.MaskedComputation(mask=ll.sum(x, axis=F) > 0.0):  # <masked-mask-over-whole-sequence>
                loop.state.acc = loop.state.acc + frame
        return loop.state.acc
    _run(model, _feats())


def _masked_inside_cond():
    def model(x):
        loop = ll.Loop(axis=T)
        loop.state.acc = ll.zeros([F])
        with loop:
            frame = loop.unstack(x)
            with ll.Cond(ll.full(True)) as cond:
                with ll.MaskedComputation(mask=ll.sum(frame, axis=F) > 0.0):  # <masked-inside-cond>
                    s = frame * 2.0
                cond.true = s
                cond.false = frame
            loop.state.acc = loop.state.acc + cond.result
        return loop.state.acc
    _run(model, _feats())


def _masked_last_of_block_value():
    def model(x):
        loop = ll.Loop(axis=T)
        with loop:
            frame = loop.unstack(x)
            with ll.MaskedComputation(mask=ll.sum(frame, axis=F) > 0.0):
                s = frame * 2.0
        return loop.last(s)  # <masked-last-of-block-value>
    _run(model, _feats())


_MASKED = [
    (_masked_non_bool_mask, "masked-non-bool-mask", DTypeError, [], "MaskedComputation needs a bool mask"),
    (_masked_outside_loop, "masked-outside-loop", TraceError, [],
     "MaskedComputation is used directly inside a loop's body"),
    (_masked_mask_over_whole_sequence, "masked-mask-over-whole-sequence", DimError, ["time"],
     "has the loop's axis 'time': it is one value per step"),
    (_masked_inside_cond, "masked-inside-cond", TraceError, [],
     "MaskedComputation is used directly inside a loop's body"),
    (_masked_last_of_block_value, "masked-last-of-block-value", TraceError, [],
     "take loop.last of a value computed from it after the block"),
]


# ------------------------------------------------------------------------------------------------------------------
# Search
# ------------------------------------------------------------------------------------------------------------------


def _search_choice_without_beam_size():
    def model(h):
        loop = ll.Loop(max_seq_len=4)
        _dec_init(loop, h)
        with loop:
            label = loop.state.label = ll.choice(_dec_step(loop))  # <search-choice-without-beam-size>
            loop.end(label == 0, include_eos=True)
            ys = loop.stack(label)
        return ys
    _run(model, _h0(), mode="search")


def _search_score_type_typo():
    def model(h):
        loop = ll.Loop(max_seq_len=4)
        _dec_init(loop, h)
        with loop:
            scores = _dec_step(loop)
            label = loop.state.label = ll.choice(scores, beam_size=2, score_type="log_probs")  # <search-score-type>
            loop.end(label == 0, include_eos=True)
            ys = loop.stack(label)
        return ys
    _run(model, _h0(), mode="search")


def _search_beam_zero():
    def model(h):
        loop = ll.Loop(max_seq_len=4)
        _dec_init(loop, h)
        with loop:
            scores = _dec_step(loop)
            label = loop.state.label = ll.choice(scores, beam_size=0)  # <search-beam-zero>
            loop.end(label == 0, include_eos=True)
            ys = loop.stack(label)
        return ys
    _run(model, _h0(), mode="search")


def _search_beam_float():
    def model(h):
        loop = ll.Loop(max_seq_len=4)
        _dec_init(loop, h)
        with loop:
            scores = _dec_step(loop)
            label = loop.state.label = ll.choice(scores, beam_size=4.0)  # <search-beam-float>
            loop.end(label == 0, include_eos=True)
            ys = loop.stack(label)
        return ys
    _run(model, _h0(), mode="search")


def _search_beam_zero_in_train_mode():
    def model(h, y):
        loop = ll.Loop(axis=U, max_seq_len=4)
        _dec_init(loop, h)
        with loop:
            scores = _dec_step(loop)
            label = loop.state.label = ll.choice(scores, target=y, beam_size=0)  # <search-beam-zero-in-train-mode>
            ys = loop.stack(label)
        return ys
    y = ll.Named(torch.tensor([[1, 2], [3, 0]]), (B, U), {U: torch.tensor([2, 1])}, sparse_dim=V)
    _run(model, _h0(), y, mode="train")


def _search_choice_outside_loop():
    def model(h):
        return ll.choice(ll.log_softmax(_DEC_OUT(h), axis=V), beam_size=2)  # <search-choice-outside-loop>
    _run(model, _h0(), mode="search")


def _search_choice_train_without_target():
    def model(h):
        loop = ll.Loop(max_seq_len=4)
        _dec_init(loop, h)
        with loop:
            scores = _dec_step(loop)
            label = loop.state.label = ll.choice(scores, beam_size=2)  # <search-choice-train-without-target>
            loop.end(label == 0, include_eos=True)
            ys = loop.stack(label)
        return ys
    _run(model, _h0(), mode="train")


def _search_choice_ambiguous_label_dim():
    def model(h):
        loop = ll.Loop(max_seq_len=4)
        _dec_init(loop, h)
        with loop:
            scores = _dec_step(loop) + ll.zeros([F])
            label = loop.state.label = ll.choice(scores, beam_size=2)  # <search-choice-ambiguous-label-dim>
            loop.end(label == 0, include_eos=True)
            ys = loop.stack(label)
        return ys
    _run(model, _h0(), mode="search")


def _search_recombine_mode_typo():
    def model(h):
        loop = ll.Loop(max_seq_len=4)
        _dec_init(loop, h)
        loop.state.score = ll.zeros([])
        with loop:
            pruned = ll.search.prune(ll.search.expand(loop.state.score, _dec_step(loop), axis=V), beam_size=2, axis=V)
            best = ll.search.recombine(pruned.scores, keys=pruned.labels, mode="sum")  # <search-recombine-mode-typo>
            loop.state.score = best
            loop.state.label = pruned.labels
            loop.end(pruned.labels == 0, include_eos=True)
            ys = loop.stack(pruned.labels)
        return ys
    _run(model, _h0(), mode="search")


def _search_threshold_negative():
    def model(h):
        loop = ll.Loop(max_seq_len=4)
        _dec_init(loop, h)
        with loop:
            scores = _dec_step(loop)
            label = loop.state.label = ll.choice(scores, beam_size=2, threshold=-1.0)  # <search-threshold-negative>
            loop.end(label == 0, include_eos=True)
            ys = loop.stack(label)
        return ys
    _run(model, _h0(), mode="search")


def _search_best_wrong_beam():
    def model(h):
        loop = ll.Loop(max_seq_len=4)
        _dec_init(loop, h)
        with loop:
            scores = _dec_step(loop)
            label = loop.state.label = ll.choice(scores, beam_size=2)
            loop.end(label == 0, include_eos=True)
            ys = loop.stack(label)
        return ll.search.best(ys, loop.search.scores, beam=B)  # <search-best-wrong-beam>
    _run(model, _h0(), mode="search")


def _search_weights_without_components():
    def model(h):
        loop = ll.Loop(max_seq_len=4)
        _dec_init(loop, h)
        with loop:
            scores = _dec_step(loop)
            label = loop.state.label = ll.choice(scores, beam_size=2, weights={"am": 1.0})  # <search-weights-alone>
            loop.end(label == 0, include_eos=True)
            ys = loop.stack(label)
        return ys
    _run(model, _h0(), mode="search")


def _search_generator_seed_int():
    def model(h):
        loop = ll.Loop(max_seq_len=4)
        _dec_init(loop, h)
        with loop:
            scores = _dec_step(loop)
            label = loop.state.label = ll.choice(scores, beam_size=2, sample=True, generator=0)  # <search-seed-int>
            loop.end(label == 0, include_eos=True)
            ys = loop.stack(label)
        return ys
    _run(model, _h0(), mode="search")


def _search_prune_outside_loop():
    def model(h):
        scores = ll.log_softmax(_DEC_OUT(h), axis=V)
        return ll.search.prune(scores, beam_size=2, axis=V).labels  # <search-prune-outside-loop>
    _run(model, _h0(), mode="search")


def _search_choice_twice_per_step():
    def model(h):
        loop = ll.Loop(max_seq_len=4)
        _dec_init(loop, h)
        with loop:
            lp = _dec_step(loop)
            ll.choice(lp, beam_size=2)
            label = loop.state.label = ll.choice(lp, beam_size=2)  # <search-choice-twice-per-step>
            loop.end(label == 0, include_eos=True)
            ys = loop.stack(label)
        return ys
    _run(model, _h0(), mode="search")


def _search_loop_search_inside_before_choice():
    def model(h):
        loop = ll.Loop(max_seq_len=4)
        _dec_init(loop, h)
        with loop:
            _ = loop.search.ended  # <search-loop-search-inside-before-choice>
            scores = _dec_step(loop)
            label = loop.state.label = ll.choice(scores, beam_size=2)
            loop.end(label == 0, include_eos=True)
            ys = loop.stack(label)
        return ys
    _run(model, _h0(), mode="search")


def _search_loop_over_labels_without_max_seq_len():
    def model(h, y=None):
        loop = ll.Loop(axis=U)  # <search-loop-over-labels-without-max-seq-len>
        _dec_init(loop, h)
        with loop:
            scores = _dec_step(loop)
            label = loop.state.label = ll.choice(scores, target=y, beam_size=2)
            loop.end(label == 0, include_eos=True)
            ys = loop.stack(label)
        return ys
    _run(model, _h0(), mode="search")


_SEARCH = [
    (_search_choice_without_beam_size, "search-choice-without-beam-size", ArgumentError, [],
     "missing 1 required keyword-only argument: 'beam_size'"),
    (_search_score_type_typo, "search-score-type", ConfigError, [],
     "score_type is 'log_prob' or 'logits', got 'log_probs'"),
    (_search_beam_zero, "search-beam-zero", DimError, [], "beam_size must be a positive int, got 0"),
    (_search_beam_float, "search-beam-float", DimError, [], "beam_size must be a positive int, got 4.0"),
    (_search_beam_zero_in_train_mode, "search-beam-zero-in-train-mode", DimError, [],
     "beam_size must be a positive int, got 0"),
    (_search_choice_outside_loop, "search-choice-outside-loop", TraceError, [],
     "looplift.choice is used directly inside the body of a looplift.Loop"),
    (_search_choice_train_without_target, "search-choice-train-without-target", TraceError, [],
     "in train mode returns the reference label: pass target=..."),
    (_search_choice_ambiguous_label_dim, "search-choice-ambiguous-label-dim", DimError, ["vocab", "feat"],
     "looplift.choice needs the label dim"),
    (_search_recombine_mode_typo, "search-recombine-mode-typo", ConfigError, [],
     "mode is 'max' or 'logsumexp', got 'sum'"),
    (_search_threshold_negative, "search-threshold-negative", DimError, [],
     "threshold must be a number >= 0, got -1.0"),
    (_search_best_wrong_beam, "search-best-wrong-beam", DimError, ["batch"], "beam must be the beam dim of the search"),
    (_search_weights_without_components, "search-weights-alone", DimError, [], "weights are for score components"),
    (_search_generator_seed_int, "search-seed-int", DimError, [], "generator must be a torch.Generator, got 0"),
    (_search_prune_outside_loop, "search-prune-outside-loop", TraceError, [],
     "looplift.search.prune is used directly inside the body"),
    (_search_choice_twice_per_step, "search-choice-twice-per-step", TraceError, [], "one prune per loop step"),
    (_search_loop_search_inside_before_choice, "search-loop-search-inside-before-choice", TraceError, [],
     "loop.search is read inside the body after this step's choice or prune"),
    (_search_loop_over_labels_without_max_seq_len, "search-loop-over-labels-without-max-seq-len", ExecutionError,
     ["labels"], "the size of Dim('labels', dynamic) is not known in this call"),
]


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints: looplift.save and looplift.load
# ------------------------------------------------------------------------------------------------------------------


def _ckpt_save_state_dict(tmp_path):
    model = Tiny()
    ll.save(model.state_dict(), tmp_path / "a.safetensors")  # <ckpt-save-state-dict>


def _ckpt_save_args_swapped(tmp_path):
    model = Tiny()
    ll.save(tmp_path / "b.safetensors", model)  # <ckpt-save-args-swapped>


def _ckpt_load_args_swapped(tmp_path):
    model = Tiny()
    path = tmp_path / "c.safetensors"
    ll.save(model, path)
    ll.load(path, model)  # <ckpt-load-args-swapped>


def _ckpt_save_parent_is_file(tmp_path):
    model = Tiny()
    blocker = tmp_path / "blocker"
    blocker.touch()
    ll.save(model, blocker / "model.safetensors")  # <ckpt-save-parent-is-file>


def _ckpt_save_to_existing_directory(tmp_path):
    model = Tiny()
    d = tmp_path / "a_dir"
    d.mkdir()
    ll.save(model, d)  # <ckpt-save-to-existing-directory>


def _ckpt_load_missing_file(tmp_path):
    ll.load(Tiny(), tmp_path / "nope.safetensors")  # <ckpt-load-missing-file>


def _ckpt_load_directory(tmp_path):
    d = tmp_path / "b_dir"
    d.mkdir()
    ll.load(Tiny(), d)  # <ckpt-load-directory>


def _ckpt_load_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a checkpoint\n" * 10)
    ll.load(Tiny(), path)  # <ckpt-load-text-file>


def _ckpt_load_torch_pt(tmp_path):
    model = Tiny()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    ll.load(model, path)  # <ckpt-load-torch-pt>


def _ckpt_load_other_shapes(tmp_path):
    path = tmp_path / "d.safetensors"
    ll.save(Tiny(), path)
    ll.load(Tiny(hidden=ll.Dim("hidden", 7)), path)  # <ckpt-load-other-shapes>


def _ckpt_save_a_function(tmp_path):
    ll.save(lambda x: x, tmp_path / "e.safetensors")  # <ckpt-save-a-function>


def _ckpt_load_model_class(tmp_path):
    path = tmp_path / "f.safetensors"
    ll.save(Tiny(), path)
    ll.load(Tiny, path)  # <ckpt-load-model-class>


_CHECKPOINTS = [
    (_ckpt_save_state_dict, "ckpt-save-state-dict", ArgumentError, [],
     "save takes the model itself, not its state_dict"),
    (_ckpt_save_args_swapped, "ckpt-save-args-swapped", ArgumentError, [], "save takes the model first"),
    (_ckpt_load_args_swapped, "ckpt-load-args-swapped", ArgumentError, [], "load takes the model first"),
    (_ckpt_save_parent_is_file, "ckpt-save-parent-is-file", CheckpointWriteError, [], "is a file, not a folder"),
    (_ckpt_save_to_existing_directory, "ckpt-save-to-existing-directory", CheckpointWriteError, [],
     "it is a folder: give a file name"),
    (_ckpt_load_missing_file, "ckpt-load-missing-file", CheckpointError, [], "No such file or directory"),
    (_ckpt_load_directory, "ckpt-load-directory", CheckpointError, [], "cannot read the checkpoint"),
    (_ckpt_load_text_file, "ckpt-load-text-file", CheckpointError, [], "Error while deserializing header"),
    (_ckpt_load_torch_pt, "ckpt-load-torch-pt", CheckpointError, [], "Error while deserializing header"),
    (_ckpt_load_other_shapes, "ckpt-load-other-shapes", CheckpointError, [], "does not match the model (2 problems)"),
    (_ckpt_save_a_function, "ckpt-save-a-function", ArgumentError, [],
     "save takes a looplift.Module (or torch.nn.Module), got function"),
    (_ckpt_load_model_class, "ckpt-load-model-class", ArgumentError, [], "load takes a model, not the class Tiny"),
]


# ------------------------------------------------------------------------------------------------------------------
# Trainer and bucketed_batches
# ------------------------------------------------------------------------------------------------------------------


def _train_optimizer_class_not_instance():
    model = Tiny()
    Trainer(model, _tiny_loss, torch.optim.Adam, progress=False)  # <train-optimizer-class-not-instance>


def _train_optimizer_over_other_params():
    model = Tiny()
    Trainer(model, _tiny_loss, _sgd(Tiny()), progress=False)  # <train-optimizer-over-other-params>


def _train_progress_typo():
    model = Tiny()
    Trainer(model, _tiny_loss, _sgd(model), progress="bar")  # <train-progress-typo>


def _train_metadata_not_strings():
    model = Tiny()
    Trainer(model, _tiny_loss, _sgd(model), metadata={"layers": 2}, progress=False)  # <train-metadata-not-strings>


def _train_reduce_on_plateau():
    model = Tiny()
    opt = _sgd(model)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    Trainer(model, _tiny_loss, opt, scheduler=plateau, progress=False)  # <train-reduce-on-plateau>


def _train_fit_without_stop():
    model = Tiny()
    Trainer(model, _tiny_loss, _sgd(model), progress=False).fit(_one_batch)  # <train-fit-without-stop>


def _train_resume_without_dir():
    model = Tiny()
    trainer = Trainer(model, _tiny_loss, _sgd(model), progress=False)
    trainer.fit(_one_batch, epochs=1, resume=True)  # <train-resume-without-dir>


def _train_empty_batches():
    model = Tiny()
    Trainer(model, _tiny_loss, _sgd(model), progress=False).fit(lambda e: [], epochs=1)  # <train-empty-batches>


def _train_negative_clip_norm():
    model = Tiny()
    trainer = Trainer(model, _tiny_loss, _sgd(model), clip_norm=-1.0, progress=False)  # <train-negative-clip-norm>
    trainer.fit(_one_batch, epochs=1)


def _train_negative_epochs():
    model = Tiny()
    Trainer(model, _tiny_loss, _sgd(model), progress=False).fit(_one_batch, epochs=-1)  # <train-negative-epochs>


def _train_negative_time_budget():
    model = Tiny()
    trainer = Trainer(model, _tiny_loss, _sgd(model), progress=False)
    trainer.fit(_one_batch, time_budget=-60)  # <train-negative-time-budget>


def _train_checkpoint_dir_is_file(tmp_path):
    model = Tiny()
    blocker = tmp_path / "ckpt_blocker"
    blocker.touch()
    kw = dict(checkpoint_dir=blocker, progress=False)
    Trainer(model, _tiny_loss, _sgd(model), **kw).fit(_one_batch, epochs=1)  # <train-checkpoint-dir-is-file>


def _train_bucketed_batch_size_zero():
    bucketed_batches([3, 4, 5], batch_size=0, seed=0, epoch=0)  # <train-bucketed-batch-size-zero>


def _train_bucketed_rank_out_of_range():
    bucketed_batches([3, 4, 5], batch_size=2, seed=0, epoch=0, world_size=2, rank=2)  # <train-rank-out-of-range>


def _train_load_model_missing(tmp_path):
    load_model(Tiny(), tmp_path / "missing_run")  # <train-load-model-missing>


_TRAINER = [
    (_train_optimizer_class_not_instance, "train-optimizer-class-not-instance", ArgumentError, [],
     "Trainer needs an optimizer, not the class Adam"),
    (_train_optimizer_over_other_params, "train-optimizer-over-other-params", ConfigError, [],
     "that are not parameters of the model"),
    (_train_progress_typo, "train-progress-typo", ConfigError, [], "progress is True, False or 'epochs', got 'bar'"),
    (_train_metadata_not_strings, "train-metadata-not-strings", ConfigError, [],
     "metadata must map strings to strings"),
    (_train_reduce_on_plateau, "train-reduce-on-plateau", ArgumentError, [],
     "ReduceLROnPlateau needs a metric to step"),
    (_train_fit_without_stop, "train-fit-without-stop", ConfigError, [], "fit needs epochs, max_steps or time_budget"),
    (_train_resume_without_dir, "train-resume-without-dir", ConfigError, [], "resume=True needs a checkpoint_dir"),
    (_train_empty_batches, "train-empty-batches", ConfigError, [], "no batches: the dataset is empty"),
    (_train_negative_clip_norm, "train-negative-clip-norm", ConfigError, [], "clip_norm must be a positive number"),
    (_train_negative_epochs, "train-negative-epochs", ConfigError, [],
     "epochs must be a positive int (or None), got -1"),
    (_train_negative_time_budget, "train-negative-time-budget", ConfigError, [],
     "time_budget must be a positive number of seconds"),
    (_train_checkpoint_dir_is_file, "train-checkpoint-dir-is-file", CheckpointError, [],
     "cannot write the checkpoint in"),
    (_train_bucketed_batch_size_zero, "train-bucketed-batch-size-zero", ConfigError, [],
     "batch_size must be at least 1, got 0"),
    (_train_bucketed_rank_out_of_range, "train-rank-out-of-range", ConfigError, [],
     "rank must be in range(world_size), got rank=2, world_size=2"),
    (_train_load_model_missing, "train-load-model-missing", CheckpointError, [], "cannot read the checkpoint"),
]


# -- symbolic tensors, program arguments and results, module calls --------------------------------------------------

def _sym_setitem():
    _run(lambda x: x.__setitem__(0, 1.0), _feats())  # <sym-setitem>


def _sym_matmul():
    _run(lambda x: x @ x, _feats())  # <sym-matmul>


def _prog_returns_torch_tensor():
    ll.compile(lambda x: torch.ones(3))(_feats())  # <prog-returns-torch-tensor>


def _prog_torch_tensor_argument():
    _sum_program()(torch.randn(2, 5, 3))  # <prog-torch-tensor-argument>


def _prog_numpy_argument():
    _sum_program()(np.zeros((2, 5, 3)))  # <prog-numpy-argument>


def _mod_call_names_the_module():
    lin = nn.Linear(F, H)
    x = ll.Named(torch.ones(2, 3, dtype=torch.long), (B, F))
    ll.compile(lambda v: lin(v))(x)  # <mod-call-names-the-module>


class _NoSuperInit(ll.Module):
    def __init__(self):
        self.lin = nn.Linear(F, H)  # <mod-no-super-init>


def _mod_no_super_init():
    _NoSuperInit()


def _train_loss_fn_returns_a_mean():
    model = Tiny()

    def mean_only(m, batch):  # <train-loss-fn-returns-a-mean>
        return (m.lin.weight ** 2).mean()

    Trainer(model, mean_only, _sgd(model), progress=False).fit(_one_batch, epochs=1)


def _named_too_few_dims():
    ll.Named(torch.zeros(2, 5, 3), (B, T))  # <named-too-few-dims>


def _mod_lstm_step_on_a_whole_sequence():
    lstm = nn.LSTM(F, H)
    _run(lambda x: lstm(x)[0], _feats())  # <mod-lstm-step-on-a-whole-sequence>


_HELD_BACK = [
    (_mod_lstm_step_on_a_whole_sequence, "mod-lstm-step-on-a-whole-sequence", DimError, ["time", "batch", "feat"],
     "pass axis=... to run over the sequence"),
    (_sym_setitem, "sym-setitem", SymbolicTensorError, ["batch", "time", "feat"], "cannot be assigned to"),
    (_sym_matmul, "sym-matmul", SymbolicTensorError, ["batch", "time", "feat"], "use looplift.dot(a, b, reduce=dim)"),
    (_prog_returns_torch_tensor, "prog-returns-torch-tensor", TraceError, [], "the model returned a torch.Tensor"),
    (_prog_torch_tensor_argument, "prog-torch-tensor-argument", InputError, [],
     "argument 0 is a Tensor of shape (2, 5, 3), without dims"),
    (_prog_numpy_argument, "prog-numpy-argument", InputError, [], "argument 0 is a ndarray of shape (2, 5, 3)"),
    (_mod_call_names_the_module, "mod-call-names-the-module", DTypeError, ["batch", "feat"],
     "in looplift.nn.Linear"),
    (_mod_no_super_init, "mod-no-super-init", ArgumentError, [], "call super().__init__() first"),
    (_train_loss_fn_returns_a_mean, "train-loss-fn-returns-a-mean", ArgumentError, [],
     "loss_fn must return a pair (loss_sum, count)"),
    (_named_too_few_dims, "named-too-few-dims", DimError, ["batch", "time"], "but 2 dims were given"),
]


CASES = [*_DIMS, *_INPUTS, *_OPS, *_SYMBOLIC, *_MODULES, *_PROGRAMS, *_LOOPS, *_CONDS, *_MASKED, *_SEARCH,
         *_CHECKPOINTS, *_TRAINER, *_HELD_BACK]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[1])
def test_a_mistake_is_a_looplift_error_at_its_line(case, tmp_path):
    """The mistake raises exactly its error class, naming the marked line, the dims involved and what is wrong."""
    fn, marker, cls, names, fragment = case
    with pytest.raises(LoopliftError) as info:
        if fn.__code__.co_argcount:
            fn(tmp_path)
        else:
            fn()
    check_error(__file__, info, cls, marker, *names)
    assert fragment in str(info.value), f"{fragment!r} is not in the message: {info.value}"


def test_the_catalogue_holds_distinct_mistakes():
    assert len(CASES) >= 150
    assert len({c[0] for c in CASES}) == len({c[1] for c in CASES}) == len(CASES)


# -- the CLI: one line "looplift-g2p: error: ...", a non-zero exit, no traceback, before any work -----------

CLI_CASES = [
    # (id, arguments ({dir}: a fresh folder, {file}: a file), exit status, message fragment)
    ("train-negative-minutes", "train --minutes -1 --dir {dir}", 2, "--minutes: must be >= 0, got -1"),
    ("train-minutes-not-a-number", "train --minutes ten --dir {dir}", 2, "--minutes: 'ten' is not a number"),
    ("train-no-limit", "train --minutes 0 --dir {dir}", 2, "--minutes 0 trains without a time limit"),
    ("train-negative-threads", "train --threads -1 --dir {dir}", 2, "--threads: must be a positive integer, got -1"),
    ("train-zero-threads", "train --threads 0 --dir {dir}", 2, "--threads: must be a positive integer, got 0"),
    ("train-zero-batch", "train --batch 0 --dir {dir}", 2, "--batch: must be a positive integer, got 0"),
    ("train-negative-lr", "train --lr -0.1 --dir {dir}", 2, "--lr: must be > 0, got -0.1"),
    ("train-zero-epochs", "train --epochs 0 --dir {dir}", 2, "--epochs: must be a positive integer, got 0"),
    ("train-zero-max-steps", "train --max-steps 0 --dir {dir}", 2, "--max-steps: must be a positive integer, got 0"),
    ("train-dropout-one", "train --dropout 1 --dir {dir}", 2, "--dropout: must be in [0, 1), got 1"),
    ("train-negative-label-smoothing", "train --label-smoothing -0.1 --dir {dir}", 2,
     "--label-smoothing: must be in [0, 1), got -0.1"),
    ("train-zero-lr-decay", "train --lr-decay 0 --dir {dir}", 2, "--lr-decay: must be in (0, 1], got 0"),
    ("train-warmup-one", "train --warmup 1 --dir {dir}", 2, "--warmup: must be in [0, 1), got 1"),
    ("train-unknown-lr-schedule", "train --lr-schedule linear --dir {dir}", 2,
     "--lr-schedule: invalid choice: 'linear'"),
    ("train-negative-clip", "train --clip -1 --dir {dir}", 2, "--clip: must be >= 0, got -1"),
    ("train-zero-heads", "train --arch transformer --heads 0 --dir {dir}", 2, "--heads: must be a positive integer"),
    ("train-width-not-a-multiple-of-heads", "train --arch transformer --model-dim 10 --heads 4 --dir {dir}", 2,
     "--model-dim (10) must be a multiple of 2 * --heads (8)"),
    ("train-zero-words", "train --words 0 --dir {dir}", 2, "--words: must be a positive integer, got 0"),
    ("train-negative-eval-words", "train --eval-words -5 --dir {dir}", 2, "--eval-words: must be 0 or more, got -5"),
    ("train-zero-eval-beam", "train --eval-beam 0 --dir {dir}", 2, "--eval-beam: must be a positive integer, got 0"),
    ("train-unknown-arch", "train --arch gru --dir {dir}", 2, "--arch: invalid choice: 'gru'"),
    ("train-zero-max-labels", "train --arch transducer --max-labels 0 --dir {dir}", 2,
     "--max-labels: must be a positive integer, got 0"),
    ("train-dir-is-a-file", "train --dir {file}", 2, "is a file, not a folder"),
    ("train-resume-of-nothing", "train --resume --dir {dir}", 2, "--resume: there is no run to resume"),
    ("train-unknown-option", "train --epochz 3 --dir {dir}", 2, "unrecognized arguments: --epochz 3"),
    ("run-zero-beam", "run --beam 0 --dir {dir}", 2, "--beam: must be a positive integer, got 0"),
    ("eval-zero-beam", "eval --beam 0 --dir {dir}", 2, "--beam: must be a positive integer, got 0"),
    ("eval-zero-limit", "eval --limit 0 --dir {dir}", 2, "--limit: must be a positive integer, got 0"),
    ("eval-nan-threshold", "eval --threshold nan --dir {dir}", 2, "--threshold: must be >= 0, got nan"),
    ("eval-train-split", "eval --split train --dir {dir}", 2, "--split: invalid choice: 'train'"),
    ("eval-no-model", "eval --dir {dir}", 1, "no G2P model"),
    ("convert-zero-nbest", "convert --nbest 0 --dir {dir} hello", 2, "--nbest: must be a positive integer, got 0"),
    ("convert-negative-threshold", "convert --threshold -1 --dir {dir} hello", 2, "--threshold: must be >= 0, got -1"),
    ("convert-empty-word", "convert --dir {dir} ''", 2, "a WORD to convert is empty"),
    ("convert-no-words", "convert --dir {dir}", 2, "the following arguments are required: WORD"),
    ("unknown-command", "decode hello", 2, "invalid choice: 'decode'"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c[0])
def test_a_cli_mistake_is_one_line_and_an_exit_status(case, tmp_path, capsys):
    name, arguments, status, fragment = case
    (tmp_path / "a-file").write_text("not a folder")
    argv = [a if a != "''" else "" for a in
            shlex.split(arguments.format(dir=tmp_path / "run", file=tmp_path / "a-file"))]
    with pytest.raises(SystemExit) as info:
        g2p_cli.main(argv)
    out = capsys.readouterr()
    assert info.value.code == status, (info.value.code, out.err)
    lines = out.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("looplift-g2p: error: "), out.err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in out.err + out.out


def test_the_cli_command_prints_no_traceback(tmp_path):
    """The installed command (not only main()): a bad value is one stderr line and exit status 2."""
    run = subprocess.run([sys.executable, "-m", "looplift.recipes.g2p.cli", "train", "--minutes", "-1", "--dir",
                          str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.splitlines() == [
        "looplift-g2p: error: argument --minutes: must be >= 0, got -1 (see looplift-g2p train --help)"]
