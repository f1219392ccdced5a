"""``Embedding``: a vector per label."""

from __future__ import annotations

from ..dims import Dim
from ..module import Module, Parameter
from ..ops.index import embedding
from ..tensor import Tensor

__all__ = ["Embedding"]


class Embedding(Module):
    """The `out_dim` vector of each label of `vocab` (labels: int tensors with ``sparse_dim=vocab``).

    Stored ``(vocab, out_dim)`` and initialised standard normal, as ``torch.nn.Embedding``.
    """

    def __init__(self, vocab: Dim, out_dim: Dim):
        super().__init__()
        self.vocab, self.out_dim = vocab, out_dim
        self.weight = Parameter((vocab, out_dim), init="normal")

    def forward(self, labels: Tensor) -> Tensor:
        return embedding(self.weight, labels)
