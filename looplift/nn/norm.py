"""``LayerNorm`` over a feature dim."""

from __future__ import annotations

from ..dims import Dim
from ..module import Module, Parameter
from ..ops.nn import layer_norm
from ..tensor import Tensor

__all__ = ["LayerNorm"]


class LayerNorm(Module):
    """Layer normalization over the static dim `dim`, with a learned scale and shift."""

    def __init__(self, dim: Dim, *, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = Parameter((dim,), init=1.0)
        self.bias = Parameter((dim,), init=0.0)

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm(x, axis=self.dim, weight=self.weight, bias=self.bias, eps=self.eps)
