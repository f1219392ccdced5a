"""The run-time environment of one program call: dim sizes, lengths and masks.

Kernels ask it for the padded size of a dim, the lengths of a dynamic dim and
sequence masks. Sizes and lengths of input dims come from the call's tensors;
those of derived dims are computed from their operands on first use and kept
for the rest of the call.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .._align import aligner
from ..dims import Dim
from ..errors import ExecutionError

__all__ = ["Env"]


class Env:
    """Sizes, lengths and masks for one program call."""

    __slots__ = ("device", "sizes", "lengths_of", "_masks")

    def __init__(self, device: torch.device, sizes: dict[Dim, int], lengths: dict[Dim, torch.Tensor]):
        self.device = device
        self.sizes = sizes
        self.lengths_of = lengths
        self._masks: dict = {}

    def size(self, dim: Dim) -> int:
        """The padded size of `dim` in this call."""
        if dim._size is not None:
            return dim._size
        size = self.sizes.get(dim)
        if size is None:
            if dim.origin is None:
                raise ExecutionError(f"the size of {dim!r} is not known in this call: no input has it")
            size = dim.derive_size([self.size(d) for d in dim.operands])
            self.sizes[dim] = size
        return size

    def lengths(self, dim: Dim) -> torch.Tensor:
        """The lengths of the dynamic `dim`, a raw int64 tensor over ``dim.length_dims``."""
        n = self.lengths_of.get(dim)
        if n is None:
            if dim.origin is None:
                raise ExecutionError(f"the lengths of {dim!r} are not known in this call")
            ldims = dim.length_dims
            parts = [aligner(d.length_dims, ldims)(self.lengths(d)) if d.is_dynamic else self.size(d)
                     for d in dim.operands]
            n = dim.derive_lengths(parts)
            if not isinstance(n, torch.Tensor):
                n = torch.tensor(n, device=self.device)
            self.lengths_of[dim] = n
        return n

    def mask(self, dims: Sequence[Dim], layout: Sequence[Dim]) -> torch.Tensor:
        """True at the valid positions of all dynamic `dims`, as a bool tensor
        broadcastable to a raw tensor stored in the order `layout`."""
        key = (tuple(dims), tuple(layout))
        m = self._masks.get(key)
        if m is None:
            m = None
            for d in dims:
                pos = layout.index(d)
                shape = [1] * len(layout)
                shape[pos] = self.size(d)
                steps = torch.arange(shape[pos], device=self.device).view(shape)
                one = steps < aligner(d.length_dims, layout)(self.lengths(d))
                m = one if m is None else m & one
            self._masks[key] = m
        return m
