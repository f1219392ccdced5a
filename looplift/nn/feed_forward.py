"""``FeedForward``: the position-wise block of Transformers."""

from __future__ import annotations

from collections.abc import Callable

from ..dims import Dim
from ..module import Module
from ..ops.math import relu
from ..ops.nn import dropout
from ..tensor import Tensor
from .linear import Linear

__all__ = ["FeedForward"]


class FeedForward(Module):
    """``Linear(dim -> hidden) -> activation -> dropout -> Linear(hidden -> dim)``."""

    def __init__(self, dim: Dim, hidden_dim: Dim, *, activation: Callable[[Tensor], Tensor] = relu,
                 dropout: float = 0.0):
        super().__init__()
        self.up = Linear(dim, hidden_dim)
        self.down = Linear(hidden_dim, dim)
        self.activation, self.dropout = activation, dropout

    def forward(self, x: Tensor) -> Tensor:
        return self.down(dropout(self.activation(self.up(x)), self.dropout))
