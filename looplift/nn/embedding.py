"""``Embedding``: a vector per label."""

from __future__ import annotations

from ..dims import Dim
from ..errors import entry_methods
from ..module import Module, Parameter, static_dims
from ..ops.index import embedding
from ..tensor import Tensor

__all__ = ["Embedding"]


class Embedding(Module):
    """The `out_dim` vector of each label of `vocab` (labels: int tensors with ``sparse_dim=vocab``).

    Stored ``(vocab, out_dim)`` and initialised standard normal, as ``torch.nn.Embedding``.
    """

    def __init__(self, vocab: Dim, out_dim: Dim):
        super().__init__()
        static_dims("Embedding", vocab=vocab, out_dim=out_dim)
        self.vocab, self.out_dim = vocab, out_dim
        self.weight = Parameter((vocab, out_dim), init="normal")

    def forward(self, labels: Tensor) -> Tensor:
        return embedding(self.weight, labels)


entry_methods(Embedding, "__init__", public="looplift.nn.Embedding")
