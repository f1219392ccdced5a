"""Running a ``MaskedComputation``'s block on only the rows where its mask is True.

A block that stays in a loop's step (a search's prediction network, stepping
only where the last symbol was a label) is traced as its nodes, run on every
entry, and one ``where(mask, value, before)`` per value read after it (a state
assigned in it, a held value). At a step where half the entries emit a blank,
half of that arithmetic is thrown away by the wheres. The executor runs such a
block as one kernel instead: the entries where the mask is True are taken out
of the block's inputs (one ``index_select`` over the mask's dims flattened),
the block's nodes run on those rows alone, and each ``where`` becomes its
``before`` with those rows replaced (one ``index_copy``). A row of the rows
layout sits where the mask's first dim is, the mask's other dims are of size
1 there.

That computes what the wheres compute where every node of the block computes
an entry from that entry alone, along each of the mask's dims, and takes its
shapes from its inputs: a value over the mask's dims has an input over them;
no node makes a dim, draws random numbers, runs a region or keeps memory; each
dim of a value in the block is one of the mask's or of a static size; and the
block's values are read after it only by such wheres. :func:`find_blocks`
checks that on the graph before the first call; a block that does not pass
runs as it was traced. At run time the rows layout is used only where enough
entries are False and the raws are as wide as the mask (not broadcast); else
the block runs on every entry, with its wheres. A compiled step runs its
blocks as traced (the count of rows would be read back in the step).

The reference interpreter runs the block as traced (every entry, then the
wheres).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..dims import Dim
from ..graph import Node
from ..regions import node_mixes_entries
from ..tensor import Tensor

__all__ = ["Block", "MaskedRows", "find_blocks"]

#: the rows layout is used where at most this share of the mask's entries is True
MAX_SHARE = 0.8


@dataclass
class Block:
    """One masked block of a graph, run as one kernel: its nodes (in graph order), the wheres that read its
    values after it (``where(mask, value, before)``, all on the same `mask`), the values from outside that its
    nodes read (`inputs`), and per where the block's value it reads (`values`)."""

    nodes: list[Node]
    wheres: list[Node]
    mask: Tensor
    inputs: list[Tensor]
    values: list[Tensor]
    #: its kernel (a :class:`MaskedRows`), once the executor made it
    kernel: object = None

    @property
    def arguments(self) -> list[Tensor]:
        """The kernel's arguments, in order: the mask, the block's inputs, each where's ``before``."""
        return [self.mask, *self.inputs, *(w.inputs[2] for w in self.wheres)]


def find_blocks(nodes: Sequence[Node], outputs: Sequence[Tensor]) -> list[Block]:
    """The masked blocks among `nodes` (a graph's nodes that run, in order; `outputs`: what the graph returns)
    that can run on the rows where their mask is True (see the module's docstring)."""
    by_block: dict[int, list[Node]] = {}
    for node in nodes:
        if node.masked_block is not None:
            by_block.setdefault(id(node.masked_block), []).append(node)
    position = {id(node): i for i, node in enumerate(nodes)}
    returned = {id(t) for t in outputs}
    blocks = []
    for members in by_block.values():
        block = _block(members, nodes, position, returned)
        if block is not None:
            blocks.append(block)
    return blocks


def _block(members: list[Node], nodes: Sequence[Node], position: dict, returned: set) -> Block | None:
    inside = {id(node) for node in members}
    made = {id(t) for node in members for t in node.outputs}
    if any(node.region is not None or node.random or node.makes_dims or node.keeps_run_memory
           or node.kernel is None for node in members):
        return None
    if made & returned:
        return None
    # every read of a block value after the block: where(mask, value, before), the same mask throughout
    wheres: list[Node] = []
    for node in nodes:
        if id(node) in inside or not any(id(t) in made for t in node.inputs):
            continue
        if node.op != "where" or len(node.inputs) != 3 or id(node.inputs[1]) not in made \
                or id(node.inputs[0]) in made or id(node.inputs[2]) in made:
            return None
        wheres.append(node)
    if not wheres or len({id(w.inputs[0]) for w in wheres}) != 1:
        return None
    mask = wheres[0].inputs[0]
    dims = mask.dims
    if not dims:
        return None
    inputs = list({id(t): t for node in members for t in node.inputs if id(t) not in made}.values())
    for t in [*inputs, *(t for node in members for t in node.outputs)]:
        present = [d in t.dims for d in dims]
        if (any(present) and not all(present)) or any(d.size is None and d not in dims for d in t.dims):
            return None
    for w in wheres:
        value, before, out = w.inputs[1], w.inputs[2], w.outputs[0]
        if not (tuple(value.dims) == tuple(before.dims) == tuple(out.dims)) or not all(d in out.dims for d in dims) \
                or not value.dtype == before.dtype == out.dtype:
            return None
    if any(node_mixes_entries(node, d) for node in members for d in dims):
        return None
    for node in members:   # (a value over the mask's dims takes them from an input, not from the call's sizes)
        if any(dims[0] in o.dims for o in node.outputs) and not any(dims[0] in t.dims for t in node.inputs):
            return None
    # the kernel runs where the first where is: everything it reads is made before that
    at = position[id(wheres[0])]
    if any(position[id(node)] > at for node in members):
        return None
    for t in [mask, *inputs, *(w.inputs[2] for w in wheres)]:
        if t.node is not None and id(t.node) in position and position[id(t.node)] >= at:
            return None
    return Block(members, wheres, mask, inputs, [w.inputs[1] for w in wheres])


class MaskedRows:
    """The kernel of one :class:`Block`: ``kernel(env, mask, *inputs, *befores)`` -> the wheres' results.
    `run_block(env, raws)` runs the block's nodes (the raws of `block.inputs` -> those of `block.values`);
    `wheres` are the where nodes' kernels, for a step that runs every entry."""

    def __init__(self, block: Block, run_block, wheres: Sequence):
        self.run_block = run_block
        self.where_kernels = list(wheres)
        self.n_inputs = len(block.inputs)
        mask_dims = tuple(block.mask.dims)
        self.mask_rank = len(mask_dims)
        #: per input and per where's result: the positions of the mask's dims in it (None: it has none)
        self.input_at = [_positions(t.dims, mask_dims) for t in block.inputs]
        self.out_at = [_positions(w.outputs[0].dims, mask_dims) for w in block.wheres]

    def __call__(self, env, mask, *raws):
        inputs, befores = raws[:self.n_inputs], raws[self.n_inputs:]
        rows = self._rows(mask, inputs, befores)
        if rows is None:
            values = self.run_block(env, list(inputs))
            return _results([k(env, mask, v, b) for k, v, b in zip(self.where_kernels, values, befores)])
        if len(rows) == 0:
            return _results(list(befores))
        shape = mask.shape
        taken = [x if at is None else _take(x, at, shape, rows) for x, at in zip(inputs, self.input_at)]
        values = self.run_block(env, taken)
        return _results([_put(b, v, at, shape, rows) for b, v, at in zip(befores, values, self.out_at)])

    def _rows(self, mask, inputs, befores) -> torch.Tensor | None:
        """The flat indices of the rows to run (over the mask's dims flattened), or None: run every entry."""
        if not isinstance(mask, torch.Tensor) or mask.dim() != self.mask_rank or torch.compiler.is_compiling():
            return None
        shape = mask.shape
        for x, at in [*zip(inputs, self.input_at), *zip(befores, self.out_at)]:
            if at is not None and (not isinstance(x, torch.Tensor) or x.dim() <= max(at)
                                   or tuple(x.shape[p] for p in at) != tuple(shape)):
                return None   # (a raw broadcast along a dim of the mask: the same for every row)
        flat = mask.reshape(-1)
        rows = flat.nonzero().squeeze(1)
        if len(rows) > MAX_SHARE * flat.numel():
            return None
        return rows


def _positions(dims: Sequence[Dim], mask_dims: Sequence[Dim]) -> tuple[int, ...] | None:
    if not any(d in dims for d in mask_dims):
        return None
    return tuple(list(dims).index(d) for d in mask_dims)


def _take(x: torch.Tensor, at: tuple[int, ...], shape, rows: torch.Tensor) -> torch.Tensor:
    """The `rows` of `x` (the mask's dims at `at`, of `shape`, flattened), in the rows layout."""
    front = x.movedim(at, tuple(range(len(at))))
    rest = front.shape[len(at):]
    taken = front.reshape(-1, *rest).index_select(0, rows)
    taken = taken.view(len(rows), *([1] * (len(at) - 1)), *rest)
    return taken.movedim(tuple(range(len(at))), at)


def _put(before: torch.Tensor, value: torch.Tensor, at: tuple[int, ...], shape, rows: torch.Tensor):
    """`before` with its `rows` replaced by `value` (in the rows layout)."""
    n = len(at)
    front = before.movedim(at, tuple(range(n)))
    rest = front.shape[n:]
    value = value.movedim(at, tuple(range(n))).expand(len(rows), *([1] * (n - 1)), *rest)
    flat = front.reshape(-1, *rest).index_copy(0, rows, value.reshape(len(rows), *rest))
    return flat.view(*shape, *rest).movedim(tuple(range(n)), at)


def _results(values: list):
    return values[0] if len(values) == 1 else values
