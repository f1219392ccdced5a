"""``Conv1d`` over a named dim."""

from __future__ import annotations

import math

from ..dims import Dim
from ..errors import entry_methods
from ..module import Module, Parameter, check_setting, is_positive_int, static_dims
from ..ops.conv import conv1d
from ..tensor import Tensor

__all__ = ["Conv1d"]


class Conv1d(Module):
    """1-D convolution from `in_dim` to `out_dim` along the dim given at call time.

    The filter is stored ``(out_dim, in_dim, filter)`` as in ``torch.nn.Conv1d``.
    With a stride the output dim is derived from the input's (``ceil(T / stride)``
    for ``padding="same"``).
    """

    def __init__(self, in_dim: Dim, out_dim: Dim, filter_size: int, *, stride: int = 1, dilation: int = 1,
                 padding: str = "same", with_bias: bool = True):
        super().__init__()
        static_dims("Conv1d", in_dim=in_dim, out_dim=out_dim)
        for name, value in (("filter_size", filter_size), ("stride", stride), ("dilation", dilation)):
            check_setting("Conv1d", name, value, is_positive_int(value), "a positive int")
        check_setting("Conv1d", "padding", padding, padding in ("same", "valid"), "'same' or 'valid'")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.filter_dim = Dim("filter", filter_size)
        self.stride, self.dilation, self.padding = stride, dilation, padding
        bound = 1.0 / math.sqrt(in_dim.size * filter_size)
        init = lambda t: t.uniform_(-bound, bound)  # noqa: E731 - as torch.nn.Conv1d
        self.weight = Parameter((out_dim, in_dim, self.filter_dim), init=init)
        self.bias = Parameter((out_dim,), init=init) if with_bias else None

    def forward(self, x: Tensor, *, axis: Dim) -> Tensor:
        return conv1d(x, self.weight, self.bias, axis=axis, in_dim=self.in_dim, out_dim=self.out_dim,
                      filter_dim=self.filter_dim, stride=self.stride, dilation=self.dilation,
                      padding=self.padding)


entry_methods(Conv1d, "__init__", public="looplift.nn.Conv1d")
