"""Errors are API: every misuse raises a looplift error that names the user's
source line and the dims involved, never a raw torch error from deep inside.

Each test marks the offending line with a ``# <marker>`` comment; ``where``
finds that line in this file, so the expected ``file:line`` never goes stale.
For errors at call time (:class:`InputError`) the offending line is the one
that calls the program.
"""

from __future__ import annotations

import pytest
import torch
from error_helpers import check_error, marked_line

import looplift as ll
from looplift.errors import (
    ArgumentError,
    DimError,
    DimMismatchError,
    DTypeError,
    ExecutionError,
    InputError,
    ModeError,
    TraceError,
)

B = ll.batch_dim
T = ll.Dim("time")
F = ll.Dim("feat", 4)
H = ll.Dim("hidden", 3)
V = ll.Dim("vocab", 5)

def where(marker: str) -> str:
    """``file:line`` of the one line of this file ending in ``# <marker>``."""
    return marked_line(__file__, marker)


def assert_error(info: pytest.ExceptionInfo, cls: type, marker: str, *names: str) -> None:
    """The error is exactly `cls`, names the marked line and every name in `names` (as a word)."""
    check_error(__file__, info, cls, marker, *names)


def feats(batch: int = 2, frames: int = 5) -> ll.Named:
    """Float features over (batch, time, feat) with valid lengths."""
    lens = torch.tensor([frames, frames - 2][:batch])
    return ll.Named(torch.randn(batch, frames, F.size), (B, T, F), lengths={T: lens})


def labels(dtype: torch.dtype = torch.int64) -> ll.Named:
    """Labels over (batch, time) with sparse_dim vocab (of the given dtype)."""
    return ll.Named(torch.ones(2, 5, dtype=dtype), (B, T), lengths={T: torch.tensor([5, 3])}, sparse_dim=V)


def run(fn, *inputs, mode: str = "eval"):
    return ll.compile(fn, mode=mode)(*inputs)


# -- a dim the tensor does not have --------------------------------------------------------

def test_reduce_over_a_dim_the_tensor_lacks():
    def model(x):
        return ll.sum(x, axis=H)  # <sum-missing>

    with pytest.raises(DimError) as info:
        run(model, feats())
    assert_error(info, DimError, "sum-missing", "hidden", "batch", "time", "feat")


def test_softmax_over_a_dim_the_tensor_lacks():
    def model(x):
        return ll.softmax(x, axis=V)  # <softmax-missing>

    with pytest.raises(DimError) as info:
        run(model, feats())
    assert_error(info, DimError, "softmax-missing", "vocab", "feat")


def test_concat_along_a_dim_one_input_lacks():
    def model(x):
        y = ll.zeros([B, T, H])
        return ll.concat(x, y, axis=[F, F])  # <concat-missing>

    with pytest.raises(DimError) as info:
        run(model, feats())
    assert_error(info, DimError, "concat-missing", "feat", "hidden")


def test_gather_along_a_dim_the_tensor_lacks():
    def model(x, i):
        return ll.gather(x, index=i, axis=V)  # <gather-missing>

    with pytest.raises(DimError) as info:
        run(model, feats(), labels())
    assert_error(info, DimError, "gather-missing", "vocab", "feat")


def test_slice_along_a_dim_the_tensor_lacks():
    def model(x):
        return ll.slice(x, H, 0, 2)  # <slice-missing>

    with pytest.raises(DimError) as info:
        run(model, feats())
    assert_error(info, DimError, "slice-missing", "hidden", "feat")


# -- two dims with one name -------------------------------------------------------------------

def test_elementwise_op_on_two_different_dims_with_one_name():
    other_feat = ll.Dim("feat", 4)

    def model(x, y):
        return x + y  # <add-same-name>

    y = ll.Named(torch.randn(2, 4), (B, other_feat))
    with pytest.raises(DimMismatchError) as info:
        run(model, feats(), y)
    assert_error(info, DimMismatchError, "add-same-name", "feat")
    assert "Dim('feat', 4) and Dim('feat', 4)" in str(info.value)


def test_dot_with_batch_dims_sharing_a_name():
    other_time = ll.Dim("time")

    def model(x, y):
        return ll.dot(x, y, reduce=F)  # <dot-batch-same-name>

    y = ll.Named(torch.randn(2, 6, 4), (B, other_time, F), lengths={other_time: torch.tensor([6, 1])})
    with pytest.raises(DimMismatchError) as info:
        run(model, feats(), y)
    assert_error(info, DimMismatchError, "dot-batch-same-name", "time")


def test_dot_reducing_over_a_dim_the_other_has_under_another_identity():
    other_feat = ll.Dim("feat", 4)

    def model(x, y):
        return ll.dot(x, y, reduce=F)  # <dot-reduce-same-name>

    y = ll.Named(torch.randn(2, 4, 3), (B, other_feat, H))
    with pytest.raises(DimMismatchError) as info:
        run(model, feats(), y)
    assert_error(info, DimMismatchError, "dot-reduce-same-name", "feat", "hidden")


# -- wrong dtypes -------------------------------------------------------------------------------

def test_gather_with_a_float_index():
    def model(x, i):
        return ll.gather(x, index=i, axis=F)  # <gather-float>

    index = ll.Named(torch.zeros(2, 3), (B, H))
    with pytest.raises(DTypeError) as info:
        run(model, feats(), index)
    assert_error(info, DTypeError, "gather-float", "hidden", "float32")


def test_embedding_module_with_float_labels():
    emb = ll.nn.Embedding(V, F)

    def model(i):
        return emb(i)  # <embedding-float>

    with pytest.raises(DTypeError) as info:
        run(model, labels(torch.float32))
    assert_error(info, DTypeError, "embedding-float", "batch", "time", "vocab")


def test_logical_and_on_floats():
    def model(x):
        mask = x > 0
        return ll.logical_and(mask, x)  # <and-float>

    with pytest.raises(DTypeError) as info:
        run(model, feats())
    assert_error(info, DTypeError, "and-float", "batch", "time", "feat")


def test_and_operator_on_floats():
    def model(x):
        return (x > 0) & x  # <and-operator-float>

    with pytest.raises(DTypeError) as info:
        run(model, feats())
    assert_error(info, DTypeError, "and-operator-float", "feat")


def test_softmax_on_an_int_tensor():
    def model(i):
        return ll.softmax(i, axis=T)  # <softmax-int>

    with pytest.raises(DTypeError) as info:
        run(model, labels())
    assert_error(info, DTypeError, "softmax-int", "batch", "time", "int64")


def test_one_hot_of_floats():
    def model(x):
        return ll.one_hot(x)  # <one-hot-float>

    with pytest.raises(DTypeError) as info:
        run(model, feats())
    assert_error(info, DTypeError, "one-hot-float", "batch", "time", "feat")


# -- inputs at call time --------------------------------------------------------------------------

def _identity_program():
    return ll.compile(lambda x: ll.softmax(x, axis=F), mode="eval")


def test_call_without_lengths_for_a_dynamic_dim():
    prog = _identity_program()
    x = ll.Named(torch.randn(2, 5, 4), (B, T, F))
    with pytest.raises(InputError) as info:
        prog(x)  # <call-no-lengths>
    assert_error(info, InputError, "call-no-lengths", "time")


def test_named_with_wrong_number_of_axes():
    with pytest.raises(DimError) as info:
        ll.Named(torch.randn(2, 5), (B, T, F), lengths={T: torch.tensor([5, 3])})  # <named-axes>
    assert_error(info, DimError, "named-axes", "batch", "time", "feat")


def test_call_with_static_dim_of_wrong_size():
    prog = _identity_program()
    x = ll.Named(torch.randn(2, 5, 7), (B, T, F), lengths={T: torch.tensor([5, 3])})
    with pytest.raises(InputError) as info:
        prog(x)  # <call-static-size>
    assert_error(info, InputError, "call-static-size", "feat")
    assert "7" in str(info.value)


def test_call_with_one_dim_of_two_sizes_in_two_inputs():
    prog = ll.compile(lambda x, y: x + y, mode="eval")
    x = ll.Named(torch.randn(2, 5, 4), (B, T, F), lengths={T: torch.tensor([5, 3])})
    y = ll.Named(torch.randn(2, 6), (B, T), lengths={T: torch.tensor([5, 3])})
    with pytest.raises(InputError) as info:
        prog(x, y)  # <call-two-sizes>
    assert_error(info, InputError, "call-two-sizes", "time")


def test_call_with_lengths_of_wrong_shape():
    prog = _identity_program()
    x = ll.Named(torch.randn(2, 5, 4), (B, T, F), lengths={T: torch.tensor([5, 3, 4])})
    with pytest.raises(InputError) as info:
        prog(x)  # <call-lengths-shape>
    assert_error(info, InputError, "call-lengths-shape", "time", "batch")


def test_call_with_lengths_beyond_the_padded_size():
    prog = _identity_program()
    x = ll.Named(torch.randn(2, 5, 4), (B, T, F), lengths={T: torch.tensor([6, 3])})
    with pytest.raises(InputError) as info:
        prog(x)  # <call-lengths-too-long>
    assert_error(info, InputError, "call-lengths-too-long", "time")


def test_call_with_float_lengths():
    prog = _identity_program()
    x = ll.Named(torch.randn(2, 5, 4), (B, T, F), lengths={T: torch.tensor([5.0, 3.0])})
    with pytest.raises(InputError) as info:
        prog(x)  # <call-lengths-float>
    assert_error(info, InputError, "call-lengths-float", "time")


def test_call_with_a_dim_given_twice():
    prog = _identity_program()
    x = ll.Named(torch.randn(2, 4, 4), (B, F, F))
    with pytest.raises(InputError) as info:
        prog(x)  # <call-dim-twice>
    assert_error(info, InputError, "call-dim-twice", "feat")


def test_named_holding_no_torch_tensor():
    with pytest.raises(ArgumentError) as info:
        ll.Named([[1.0, 2.0, 3.0, 4.0]], (B, F))  # <named-not-a-tensor>
    assert_error(info, ArgumentError, "named-not-a-tensor", "list", "torch.as_tensor")


def test_call_with_an_unhashable_constant_argument():
    prog = ll.compile(lambda x, opts: ll.softmax(x, axis=F), mode="eval")
    x = ll.Named(torch.randn(2, 4), (B, F))
    with pytest.raises(InputError) as info:
        prog(x, {1, 2})  # <call-unhashable>
    assert_error(info, InputError, "call-unhashable")


# -- Python control flow and plain torch values while tracing --------------------------------------

def test_symbolic_tensor_in_python_if():
    def model(x):
        y = ll.softmax(x, axis=F)
        if y:  # <python-if>
            return y
        return x

    with pytest.raises(TraceError) as info:
        run(model, feats())
    assert_error(info, TraceError, "python-if", "batch", "time", "feat")


def test_iterating_over_a_symbolic_tensor():
    def model(x):
        y = ll.softmax(x, axis=F)
        return [frame for frame in y]  # <python-iter>

    with pytest.raises(TraceError) as info:
        run(model, feats())
    assert_error(info, TraceError, "python-iter", "batch", "time", "feat")


def test_plain_torch_tensor_inside_traced_function():
    bias = torch.randn(4)

    def model(x):
        return x + bias  # <plain-torch>

    with pytest.raises(TraceError) as info:
        run(model, feats())
    assert_error(info, TraceError, "plain-torch")
    assert "shape (4,)" in str(info.value)


# -- modules and parameters -----------------------------------------------------------------------

class PlainParam(ll.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.scale  # <plain-param>


def test_module_with_a_plain_torch_parameter():
    with pytest.raises(TraceError) as info:
        run(PlainParam(), feats())
    assert_error(info, TraceError, "plain-param")
    assert "PlainParam.scale" in str(info.value)


class Scale(ll.Module):
    def __init__(self):
        super().__init__()
        self.scale = ll.Parameter((F,), init=1.0)

    def forward(self, x):
        return x * self.scale  # <resized-param>


def test_parameter_replaced_by_one_of_another_shape():
    model = Scale()
    model.scale = torch.nn.Parameter(torch.ones(7))
    with pytest.raises(TraceError) as info:
        run(model, feats())
    assert_error(info, TraceError, "resized-param", "feat")
    assert "(7,)" in str(info.value)


def test_error_inside_a_looplift_nn_module_names_the_callers_line():
    proj = ll.nn.Linear(H, F)

    def model(x):
        return proj(x)  # <linear-module>

    with pytest.raises(DimError) as info:
        run(model, feats())
    assert_error(info, DimError, "linear-module", "hidden", "feat")


# -- outside of tracing -----------------------------------------------------------------------------

def test_is_training_outside_of_tracing():
    with pytest.raises(ModeError) as info:
        ll.is_training()  # <is-training-outside>
    assert_error(info, ModeError, "is-training-outside")


def test_op_outside_of_tracing():
    with pytest.raises(TraceError) as info:
        ll.range_over_dim(T)  # <op-outside>
    assert_error(info, TraceError, "op-outside", "time")


def test_creating_a_tensor_outside_of_tracing():
    with pytest.raises(TraceError) as info:
        ll.zeros([B, F])  # <zeros-outside>
    assert_error(info, TraceError, "zeros-outside", "batch", "feat")


def test_symbolic_tensor_used_after_tracing():
    leaked = []

    def model(x):
        leaked.append(x)
        return x

    run(model, feats())
    with pytest.raises(TraceError) as info:
        ll.softmax(leaked[0], axis=F)  # <leaked>
    assert_error(info, TraceError, "leaked", "batch", "time", "feat")


# -- op arguments ----------------------------------------------------------------------------------

def test_concat_with_ambiguous_dims():
    def model(x, y):
        return ll.concat(x, y)  # <concat-ambiguous>

    y = ll.Named(torch.randn(2, 3, 5), (B, H, V))
    with pytest.raises(DimError) as info:
        run(model, feats(), y)
    assert_error(info, DimError, "concat-ambiguous", "time", "feat")


def test_layer_norm_over_a_dynamic_dim():
    def model(x):
        return ll.layer_norm(x, axis=T)  # <layer-norm-dynamic>

    with pytest.raises(DimError) as info:
        run(model, feats())
    assert_error(info, DimError, "layer-norm-dynamic", "time")


def test_compile_with_an_unknown_mode():
    with pytest.raises(ModeError) as info:
        ll.compile(lambda x: x, mode="decode")  # <unknown-mode>
    assert_error(info, ModeError, "unknown-mode")
    assert "'decode'" in str(info.value)


def test_split_into_parts_that_do_not_add_up():
    a, b = ll.Dim("part_a", 1), ll.Dim("part_b", 2)

    def model(x):
        return ll.split(x, F, [a, b])  # <split-sizes>

    with pytest.raises(DimError) as info:
        run(model, feats())
    assert_error(info, DimError, "split-sizes", "feat", "part_a", "part_b")


def test_merge_dims_with_a_dynamic_inner_dim():
    def model(x):
        return ll.merge_dims(x, [F, T])  # <merge-dynamic>

    with pytest.raises(DimError) as info:
        run(model, feats())
    assert_error(info, DimError, "merge-dynamic", "feat", "time")


# -- run time ----------------------------------------------------------------------------------------

def _int_pair():
    x = ll.Named(torch.tensor([[4, 5], [6, 7]]), (B, H_TWO))
    y = ll.Named(torch.tensor([[1, 0], [2, 1]]), (B, H_TWO))
    return x, y


H_TWO = ll.Dim("pair", 2)


def _floor_div(x, y):
    return x // y  # <kernel-failure>


def test_kernel_failure_is_an_execution_error_naming_the_node():
    with pytest.raises(ExecutionError) as info:
        ll.compile(_floor_div, mode="eval")(*_int_pair())
    assert_error(info, ExecutionError, "kernel-failure", "batch", "pair")
    assert isinstance(info.value.__cause__, RuntimeError)


def test_kernel_failure_in_the_reference_interpreter_is_an_execution_error():
    with pytest.raises(ExecutionError) as info:
        ll.compile(_floor_div, mode="eval").reference(*_int_pair())
    assert_error(info, ExecutionError, "kernel-failure", "batch", "pair")


def _floor_div_in_a_loop(x, y):
    loop = ll.Loop(axis=ll.batch_dim)
    with loop:
        q = loop.stack(loop.unstack(x) // loop.unstack(y))  # <loop-kernel-failure>
    return q


@pytest.mark.parametrize("optimize", [True, False])
def test_kernel_failure_in_a_loop_step_names_the_line_in_the_loop(optimize):
    """A loop's step runs as generated code called from the program's generated code: the error names the
    failing node's line (in the step, or moved out of the loop), never the loop's."""
    with pytest.raises(ExecutionError) as info:
        ll.compile(_floor_div_in_a_loop, mode="eval", optimize=optimize)(*_int_pair())
    assert_error(info, ExecutionError, "loop-kernel-failure", "pair")
    assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize("fn, optimize, marker", [(_floor_div, True, "kernel-failure"),
                                                   (_floor_div_in_a_loop, True, "loop-kernel-failure"),
                                                   (_floor_div_in_a_loop, False, "loop-kernel-failure")])
def test_kernel_failure_in_compiled_code_names_the_line(fn, optimize, marker):
    """Compiled code (``backend=``) has no generated line in its traceback: the call runs again eagerly, and
    that run's error names the failing node (moved out of the loop, or in its compiled step)."""
    with pytest.raises(ExecutionError) as info:
        ll.compile(fn, mode="eval", optimize=optimize, backend="aot_eager")(*_int_pair())
    assert_error(info, ExecutionError, marker, "pair")


def test_a_compiler_failure_the_eager_run_does_not_repeat_is_raised_as_it_is():
    def broken(gm, example_inputs):
        raise RuntimeError("the backend broke")

    with pytest.raises(Exception, match="the backend broke"):
        ll.compile(lambda x, y: x + y, mode="eval", backend=broken)(*_int_pair())


def test_dim_no_input_has_fails_at_run_time_naming_the_line():
    unseen = ll.Dim("unseen")

    def model(x):
        return ll.range_over_dim(unseen)  # <unknown-size>

    with pytest.raises(ExecutionError) as info:
        run(model, feats())
    assert_error(info, ExecutionError, "unknown-size", "unseen")


# -- more argument checks ----------------------------------------------------------------------

def test_gather_with_an_index_over_the_gathered_dim():
    def model(x):
        index = ll.argmax(x, axis=F)              # over {batch, time}
        return ll.gather(x, index=index, axis=T)  # <gather-index-has-axis>

    with pytest.raises(DimError) as info:
        run(model, feats())
    assert_error(info, DimError, "gather-index-has-axis", "time")


def test_parameter_over_a_dynamic_dim():
    with pytest.raises(DimError) as info:
        ll.Parameter((F, T))  # <param-dynamic>
    assert_error(info, DimError, "param-dynamic", "time", "feat")


def test_linear_with_input_and_weight_of_different_dtypes():
    lin = ll.nn.Linear(F, H)  # float32 weights

    def model(x):
        return lin(x)  # <linear-dtype>

    with pytest.raises(DTypeError) as info:
        run(model, ll.Named(torch.randn(2, 5, 4, dtype=torch.float64), (B, T, F), {T: torch.tensor([5, 3])}))
    assert_error(info, DTypeError, "linear-dtype", "feat", "hidden")


def test_nodes_the_loop_optimizer_makes_name_the_models_lines_not_the_callers():
    """A state moved out of the loop (its shifted sequence), the frames unstacked again and the loop's results
    after it name lines of the model (the new state's, the loop's), never the line that called the program."""
    import inspect

    T, V, E = ll.Dim("time"), ll.Dim("vocab", 5), ll.Dim("emb", 3)
    emb = ll.nn.Embedding(V, E)

    def model(tgt):
        loop = ll.Loop(axis=T)
        loop.state.label = ll.full(0, sparse_dim=V)
        with loop:
            e = emb(loop.state.label)
            target = loop.unstack(tgt)
            out = loop.stack(ll.sum(e, axis=E))
            loop.state.label = target
        return ll.sum(out, axis=[ll.batch_dim, T])

    prog = ll.compile(model, mode="train")
    x = ll.Named(torch.randint(0, 5, (2, 4)), (ll.batch_dim, T), {T: torch.tensor([4, 2])}, sparse_dim=V)
    trace = prog.trace(x); caller = f"{__file__}:{inspect.currentframe().f_lineno}"  # noqa: E702
    lines, first = inspect.getsourcelines(model)
    mine = {f"{__file__}:{first + k}" for k in range(len(lines))}
    sources = {n.op: n.source for n in trace.optimized.graph.nodes if n.op not in ("param", "input")}
    assert "shift_right" in sources and caller not in sources.values()
    assert set(sources.values()) <= mine, sources
    assert sources["shift_right"] == f"{__file__}:{first + 5}"      # target = loop.unstack(tgt)
