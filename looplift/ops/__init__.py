"""The op families. Each op computes its result dims (the dim rule) while
tracing and builds the torch kernel that runs it."""

from .conv import conv1d
from .history import cum_concat, shift_in
from .index import embedding, gather, one_hot
from .linalg import dot, linear, matmul
from .loss import cross_entropy, ctc_loss
from .masking import compress, unmask
from .math import (
                   abs,
                   add,
                   cast,
                   clip,
                   cos,
                   elu,
                   eq,
                   exp,
                   floordiv,
                   ge,
                   gelu,
                   gt,
                   identity,
                   le,
                   leaky_relu,
                   log,
                   log_sigmoid,
                   logical_and,
                   logical_not,
                   logical_or,
                   logical_xor,
                   lt,
                   maximum,
                   minimum,
                   mod,
                   mul,
                   ne,
                   neg,
                   pow,
                   relu,
                   rsqrt,
                   sigmoid,
                   silu,
                   sin,
                   softplus,
                   sqrt,
                   square,
                   sub,
                   swish,
                   tanh,
                   truediv,
                   where,
)
from .nn import dropout, layer_norm
from .reduce import argmax, cumsum, log_softmax, logsumexp, max, mean, min, softmax, sum
from .rnnt import rnnt_align, rnnt_loss
from .shape import (
                   concat,
                   expand,
                   full,
                   length,
                   merge_dims,
                   ones,
                   pad,
                   range_over_dim,
                   replace_dim,
                   shift_right,
                   slice,
                   split,
                   split_dims,
                   zeros,
)

__all__ = [
    "conv1d", "cum_concat", "shift_in", "embedding", "gather", "one_hot", "dot", "linear", "matmul", "compress",
    "unmask", "cross_entropy", "ctc_loss", "rnnt_loss", "rnnt_align",
    "abs", "add", "cast", "clip", "cos", "elu", "eq", "exp", "floordiv",
    "ge", "gelu", "gt", "identity", "le", "leaky_relu", "log", "log_sigmoid", "logical_and", "logical_not",
    "logical_or", "logical_xor", "lt", "maximum", "minimum", "mod", "mul", "ne", "neg", "pow", "relu", "rsqrt",
    "sigmoid", "silu", "sin", "softplus", "sqrt", "square", "sub", "swish", "tanh", "truediv", "where", "dropout",
    "layer_norm", "argmax", "cumsum", "log_softmax", "logsumexp", "max", "mean", "min", "softmax", "sum", "concat",
    "expand", "full", "length", "merge_dims", "ones", "pad", "range_over_dim", "replace_dim", "shift_right",
    "slice", "split", "split_dims", "zeros",
]
