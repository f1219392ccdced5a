"""The run-time environment of one program call: dim sizes, lengths and masks.

Kernels ask it for the padded size of a dim, the lengths of a dynamic dim and
sequence masks. Sizes and lengths of input dims come from the call's tensors;
those of derived dims are computed from their operands on first use and kept
for the rest of the call.

Inside a loop body the environment is a child of the one around the loop that
knows the current step of each loop: a dim whose lengths vary along the loop's
dim has, in the body, the lengths of the current step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._align import aligner
from ..dims import Dim
from ..errors import ExecutionError

__all__ = ["Env"]


class Env:
    """Sizes, lengths and masks for one program call (or one step of a loop in it)."""

    __slots__ = ("device", "sizes", "lengths_of", "_masks", "parent", "steps", "scratch")

    def __init__(self, device: torch.device, sizes: dict[Dim, int], lengths: dict[Dim, torch.Tensor], *,
                 parent: Env | None = None, steps: dict[Dim, int] | None = None):
        self.device = device
        self.sizes = sizes
        self.lengths_of = lengths
        self._masks: dict = {}
        self.parent = parent
        #: Current step of each enclosing loop, by the loop's dim.
        self.steps: dict[Dim, int] = steps or {}
        #: Memory of ops that accumulate over the steps of the enclosing loop run (cum_concat).
        self.scratch: dict = parent.scratch if parent is not None else {}

    def child(self, steps: dict[Dim, int], scratch: dict | None = None) -> Env:
        """The environment of one loop step inside this one (`scratch`: the loop run's memory)."""
        env = Env(self.device, {}, {}, parent=self, steps={**self.steps, **steps})
        if scratch is not None:
            env.scratch = scratch
        return env

    def step(self, dim: Dim) -> int:
        """The current step of the loop over `dim`."""
        return self.steps[dim]

    def length_dims(self, dim: Dim) -> tuple[Dim, ...]:
        """The dims the lengths of `dim` run over here (those stepped by enclosing loops removed)."""
        dims = dim.length_dims
        if not self.steps:
            return dims
        return tuple(d for d in dims if d not in self.steps)

    def size(self, dim: Dim) -> int:
        """The padded size of `dim` in this call."""
        static = dim.size
        if static is not None:
            return static
        size = self.sizes.get(dim)
        if size is None and dim.origin is not None and dim.origin[0] == "history":
            axis = dim.origin[1][0]
            size = self.steps[axis] + 1 if axis in self.steps else self.size(axis)
            self.sizes[dim] = size
        if size is None:
            if self.parent is not None and self.parent.knows(dim):
                size = self.parent.size(dim)
            elif dim.origin is None or dim.masked_from is not None:
                raise ExecutionError(f"the size of {dim!r} is not known in this call: no input has it"
                                     + (" (a masked dim is known once a compress over it ran)" if dim.origin else ""))
            else:
                size = dim.derive_size([self.size(d) for d in dim.operands])
            self.sizes[dim] = size
        return size

    def knows(self, dim: Dim) -> bool:
        """Whether the size of `dim` was given to this environment or an enclosing one."""
        return dim in self.sizes or (self.parent is not None and self.parent.knows(dim))

    def lengths(self, dim: Dim) -> torch.Tensor:
        """The lengths of the dynamic `dim`, a raw int64 tensor over ``self.length_dims(dim)``."""
        n = self.lengths_of.get(dim)
        if n is None and dim.origin is not None and dim.origin[0] == "history":
            axis = dim.origin[1][0]
            if axis in self.steps:  # inside the loop over `axis`: the history so far, the same for every entry
                n = torch.tensor(self.steps[axis] + 1, device=self.device)
            else:  # over the whole sequence: frame t has t + 1 frames of history
                n = torch.arange(1, self.size(axis) + 1, device=self.device)
            self.lengths_of[dim] = n
        if n is None:
            if self.parent is not None and self.parent.knows_lengths(dim):
                n = self.parent.lengths(dim)
                outer = self.parent.length_dims(dim)
                kept = list(outer)
                for d, t in self.steps.items():
                    if d in kept and d not in self.parent.steps:
                        n = n.select(kept.index(d), t)
                        kept.remove(d)
            elif dim.origin is None or dim.masked_from is not None:
                raise ExecutionError(f"the lengths of {dim!r} are not known in this call")
            else:
                ldims = self.length_dims(dim)
                parts = [aligner(self.length_dims(d), ldims)(self.lengths(d)) if d.is_dynamic else self.size(d)
                         for d in dim.operands]
                n = dim.derive_lengths(parts)
                if not isinstance(n, torch.Tensor):
                    n = torch.tensor(n, device=self.device)
            self.lengths_of[dim] = n
        return n

    def nonempty(self, dim: Dim) -> bool:
        """Whether every entry of the dynamic `dim` has at least one frame (asked once per call and dim).
        Inside ``torch.compile``: False, without reading the lengths back (the answer only lets a kernel skip
        work that is correct either way)."""
        if torch.compiler.is_compiling():
            return False
        if dim not in self.lengths_of and self.parent is not None and self.parent.knows_lengths(dim):
            return self.parent.nonempty(dim)
        key = ("nonempty", dim)
        found = self._masks.get(key)
        if found is None:
            n = self.lengths(dim)
            found = self._masks[key] = bool((n > 0).all()) if isinstance(n, torch.Tensor) else n > 0
        return found

    def mark_dynamic(self) -> None:
        """For ``torch.compile``: every size of the masks this environment and those around it keep is
        dynamic, so a compiled loop step that reads them does not compile again for a new length (dynamo
        takes the tensors it finds in objects to be of fixed size until they change). Not the lengths: they
        may be the caller's own tensors."""
        env = self
        while env is not None:
            for v in env._masks.values():
                if isinstance(v, torch.Tensor) and v.dim():
                    torch._dynamo.maybe_mark_dynamic(v, list(range(v.dim())))
            env = env.parent

    def knows_lengths(self, dim: Dim) -> bool:
        return dim in self.lengths_of or (self.parent is not None and self.parent.knows_lengths(dim))

    def mask(self, dims: Sequence[Dim], layout: Sequence[Dim]) -> torch.Tensor:
        """True at the valid positions of all dynamic `dims`, as a bool tensor
        broadcastable to a raw tensor stored in the order `layout`."""
        key = (tuple(dims), tuple(layout))
        m = self._masks.get(key)
        if m is None and self.parent is not None and all(self._same_as_parent(d) for d in dims):
            m = self._masks[key] = self.parent.mask(dims, layout)   # (a loop step: made once per loop run)
        if m is None:
            for d in dims:
                pos = layout.index(d)
                shape = [1] * len(layout)
                shape[pos] = self.size(d)
                steps = torch.arange(shape[pos], device=self.device).view(shape)
                one = steps < aligner(self.length_dims(d), layout)(self.lengths(d))
                m = one if m is None else m & one
            self._masks[key] = m
        return m

    def padding(self, dims: Sequence[Dim], layout: Sequence[Dim]) -> torch.Tensor:
        """``~mask(dims, layout)``: True at the padding positions (kept, as the masks are)."""
        key = ("padding", tuple(dims), tuple(layout))
        p = self._masks.get(key)
        if p is None and self.parent is not None and all(self._same_as_parent(d) for d in dims):
            p = self._masks[key] = self.parent.padding(dims, layout)
        if p is None:
            p = self._masks[key] = ~self.mask(dims, layout)
        return p

    def _same_as_parent(self, dim: Dim) -> bool:
        """Whether `dim` has the same size and lengths here as in the parent env (a loop step's env): known
        there, not made in this step, not along a dim this step selects, not a history that grows."""
        parent = self.parent
        return (dim not in self.lengths_of and dim not in self.sizes and parent.knows_lengths(dim)
                and (dim.origin is None or dim.origin[0] != "history")
                and not any(d in self.steps and d not in parent.steps for d in dim.length_dims))
