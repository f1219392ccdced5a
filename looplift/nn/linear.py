"""``Linear``: an affine map from one dim to another."""

from __future__ import annotations

from ..dims import Dim
from ..errors import entry_methods
from ..module import Module, Parameter, static_dims
from ..ops.linalg import linear
from ..tensor import Tensor

__all__ = ["Linear"]


class Linear(Module):
    """``y = x W^T + b`` from `in_dim` to `out_dim`; every other dim of `x` is a batch dim.

    The weight is stored ``(out_dim, in_dim)`` and initialised as in
    ``torch.nn.Linear``, so its state dict loads into and from PyTorch's.
    """

    def __init__(self, in_dim: Dim, out_dim: Dim, *, with_bias: bool = True):
        super().__init__()
        static_dims("Linear", in_dim=in_dim, out_dim=out_dim)
        self.in_dim, self.out_dim = in_dim, out_dim
        self.weight = Parameter((out_dim, in_dim), init=_fan_in_uniform(in_dim))
        self.bias = Parameter((out_dim,), init=_fan_in_uniform(in_dim)) if with_bias else None

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, in_dim=self.in_dim, out_dim=self.out_dim)


def _fan_in_uniform(in_dim: Dim):
    bound = 1.0 / max(in_dim.size, 1) ** 0.5
    return lambda t: t.uniform_(-bound, bound)


entry_methods(Linear, "__init__", public="looplift.nn.Linear")
