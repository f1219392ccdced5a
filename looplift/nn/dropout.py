"""``Dropout``, active in train mode only."""

from __future__ import annotations

from collections.abc import Sequence

from ..dims import Dim
from ..errors import entry_methods
from ..module import Module, check_setting, is_probability
from ..ops.nn import dropout
from ..tensor import Tensor

__all__ = ["Dropout"]


class Dropout(Module):
    """Inverted dropout with probability `p` in programs compiled with ``mode="train"``; identity otherwise."""

    def __init__(self, p: float, *, broadcast_over: Sequence[Dim] = ()):
        super().__init__()
        check_setting("Dropout", "p", p, is_probability(p),
                      "a probability in [0, 1)")
        self.p, self.broadcast_over = p, tuple(broadcast_over)

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, broadcast_over=self.broadcast_over)


entry_methods(Dropout, "__init__", public="looplift.nn.Dropout")
