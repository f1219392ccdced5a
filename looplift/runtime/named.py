"""``Named``: a real torch tensor with its dims (and the lengths of its dynamic dims).

It is how values cross the boundary of a program: the inputs of a call and
the outputs it returns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..dims import Dim
from ..errors import ArgumentError, DimError, entry_methods

__all__ = ["Named"]


class Named:
    """A torch tensor whose axes are the `dims`, in that order.

    Args:
        tensor: the data.
        dims: one Dim per axis of `tensor`.
        lengths: for the dynamic dims, their lengths: a torch tensor over the
            dim's ``length_dims`` (by default ``(batch_dim,)``, so a 1-d tensor
            with one length per batch entry). Several inputs may share a dim;
            its lengths need to be given once.
        sparse_dim: for integer label tensors, the vocabulary dim.

    Example::

        x = looplift.Named(feats, (looplift.batch_dim, time, feat), lengths={time: feat_lens})
    """

    __slots__ = ("tensor", "dims", "lengths", "sparse_dim")

    def __init__(self, tensor: torch.Tensor, dims: Sequence[Dim],
                 lengths: Mapping[Dim, torch.Tensor] | None = None, *, sparse_dim: Dim | None = None):
        if not isinstance(tensor, torch.Tensor):
            hint = " (convert it with torch.as_tensor)" if hasattr(tensor, "__array__") or isinstance(
                tensor, (list, tuple)) else ""
            raise ArgumentError(f"Named needs a torch.Tensor, got {type(tensor).__name__}{hint}")
        if isinstance(dims, Dim) or not isinstance(dims, Sequence) or not all(isinstance(d, Dim) for d in dims):
            raise ArgumentError(f"Named: dims must be a sequence of looplift.Dim, one per axis, got {dims!r}")
        if len(dims) != tensor.dim():
            raise DimError(f"Named: the tensor has {tensor.dim()} axes of shape {tuple(tensor.shape)}, but "
                           f"{len(dims)} dims were given: {{{', '.join(d.name for d in dims)}}}")
        if lengths is not None and not isinstance(lengths, Mapping):
            raise ArgumentError(f"Named: lengths must map each dynamic Dim to its lengths tensor "
                                f"(lengths={{dim: lengths}}), got {type(lengths).__name__}")
        for d, n in (lengths or {}).items():
            if not isinstance(d, Dim):
                raise ArgumentError(f"Named: the keys of lengths are Dims, got {d!r}")
            if not isinstance(n, torch.Tensor):
                raise ArgumentError(f"Named: the lengths of {d.name!r} must be a torch.Tensor, got "
                                    f"{type(n).__name__}")
        if sparse_dim is not None and not isinstance(sparse_dim, Dim):
            raise ArgumentError(f"Named: sparse_dim must be the vocabulary Dim, got {sparse_dim!r}")
        self.tensor = tensor
        self.dims = tuple(dims)
        self.lengths = dict(lengths or {})
        self.sparse_dim = sparse_dim

    def align(self, *dims: Dim) -> torch.Tensor:
        """The tensor with its axes in the order `dims` (which must be exactly its dims)."""
        if set(dims) != set(self.dims) or len(dims) != len(self.dims):
            raise DimError(f"align: {[str(d) for d in dims]} is not a permutation of {[str(d) for d in self.dims]}")
        return self.tensor.permute(tuple(self.dims.index(d) for d in dims))

    def mask(self) -> torch.Tensor:
        """A bool tensor over `dims`: True at valid (non-padding) positions."""
        m = torch.ones((1,) * len(self.dims), dtype=torch.bool, device=self.tensor.device)
        for i, d in enumerate(self.dims):
            if d in self.lengths:
                n = self.lengths[d]
                ldims = d.length_dims
                # Lengths dims the tensor lacks (e.g. it was summed over the batch): a position
                # is valid where it is valid for some entry along them.
                absent = [j for j, ld in enumerate(ldims) if ld not in self.dims]
                if absent:
                    kept = [s for j, s in enumerate(n.shape) if j not in absent]
                    n = n.amax(dim=absent) if n.numel() else n.new_zeros(kept)
                    ldims = tuple(ld for ld in ldims if ld in self.dims)
                shape = [1] * len(self.dims)
                for ld, size in zip(ldims, n.shape):
                    shape[self.dims.index(ld)] = size
                order = sorted(range(len(ldims)), key=lambda j: self.dims.index(ldims[j]))
                n = n.permute(order).reshape(shape)
                steps = torch.arange(self.tensor.shape[i], device=m.device).view(
                    [-1 if j == i else 1 for j in range(len(self.dims))])
                m = m & (steps < n)
        return m.expand(self.tensor.shape)

    def __repr__(self) -> str:
        dims = ", ".join(f"{d.name}={s}" for d, s in zip(self.dims, self.tensor.shape))
        return f"Named({dims}, dtype={self.tensor.dtype})"


entry_methods(Named, "__init__", "align", public="looplift.Named")
