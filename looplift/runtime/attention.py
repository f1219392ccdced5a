"""Attention run as one fused kernel.

Attention written with looplift's ops, over the keys' dim `A`::

    scores = ll.dot(q, k, reduce=head) * scale         # (the scaling optional)
    ctx = ll.dot(ll.softmax(scores, axis=A), v, reduce=A)

is traced as two dots, a mul and a softmax, which run as a hand-written model
runs them: the scores and the weights are made whole, forward and backward.
The executor runs such a chain as one call of
``torch.nn.functional.scaled_dot_product_attention`` instead, whose fused
kernels compute the same without making them (on this project's CPU, the
causal self-attention of a Transformer decoder, 4 heads of 32 or 64 over 64
steps, trains in 0.70-0.77 of the time of its ops, forward and backward).
The softmax's mask becomes the call's mask: the padding of `A` (and of dims
whose lengths vary along it), or, for the history dim of ``cum_concat`` over
the queries' dim (frame t sees frames 0..t), ``is_causal``.

:func:`find_attention` checks the chain on the graph before the first call:
the scores and weights read by nothing else; one dim reduced by the first dot,
one only the values have, every other dim of the three shared (batch dims) or
the queries' own; a number as the scale; the keys known
to be finite in `A`'s padding (the mask is added to the scores). At run
time, where a row of the scores may have no valid frame (an empty entry of
`A`: the softmax gives zeros there), the chain runs as traced.

The reference interpreter runs the ops as traced; the tests compare both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..dims import Dim
from ..graph import Node, Op
from ..ops._core import finite_in
from ..tensor import Tensor

__all__ = ["Attention", "FusedAttention", "find_attention"]


@dataclass
class Attention:
    """One attention chain of a graph, run as one kernel: its nodes (the first dot, the scale's constant and
    the scaling where there is one, the softmax, the second dot), those of them that nodes outside the chain
    read too (`shared`: the constant, which runs as traced), the queries, keys and values it reads, and its
    result (the second dot's)."""

    nodes: list[Node]
    shared: list[Node]
    queries: Tensor
    keys: Tensor
    values: Tensor
    output: Tensor
    scale: float
    #: the softmax's kernel's description (:class:`looplift.ops.reduce.SoftmaxOver`)
    softmax: object
    #: the dims by role: (batch dims, the queries' own dims, the dim the first dot reduces, the values' own dim)
    layout: tuple

    @property
    def arguments(self) -> list[Tensor]:
        return [self.queries, self.keys, self.values]


def find_attention(nodes: Sequence[Node], outputs: Sequence[Tensor]) -> list[Attention]:
    """The attention chains among `nodes` (a graph's nodes that run, in order; `outputs`: what it returns)
    that can run as one kernel (see the module's docstring)."""
    readers: dict[int, list[Node]] = {}
    for node in nodes:
        for t in node.inputs:
            readers.setdefault(id(t), []).append(node)
    returned = {id(t) for t in outputs}

    def only_reader(t: Tensor) -> Node | None:
        found = readers.get(id(t), [])
        return found[0] if len(found) == 1 and id(t) not in returned else None

    chains = []
    for node in nodes:
        form = getattr(node.kernel, "softmax", None)
        if node.op == "softmax" and form is not None:
            chain = _chain(node, form, only_reader)
            if chain is not None:
                chains.append(chain)
    return chains


def _chain(softmax: Node, form, only_reader) -> Attention | None:
    weights = softmax.outputs[0]
    second = only_reader(weights)
    if second is None or second.op != "dot" or second.inputs[0] is not weights or second.inputs[1] is weights:
        return None
    scores, scale, nodes, shared = softmax.inputs[0], 1.0, [softmax, second], []
    reader = softmax   # (of the scores)
    scaling = scores.node
    if scaling is not None and scaling.op == "mul" and only_reader(scores) is softmax:
        constant = next((t for t in scaling.inputs if t.node is not None and t.node.op == Op.CONSTANT), None)
        other = [t for t in scaling.inputs if t is not constant]
        if constant is None or len(other) != 1 or isinstance(constant.node.value, bool) \
                or not isinstance(constant.node.value, float | int) or other[0].dims != scores.dims:
            return None
        scale = float(constant.node.value)
        nodes[:0] = [constant.node, scaling]
        if only_reader(constant) is not scaling:
            shared.append(constant.node)   # (read by other nodes too: the executor keeps it)
        scores, reader = other[0], scaling
    first = scores.node
    if first is None or first.op != "dot" or only_reader(scores) is not reader:
        return None
    nodes.insert(0, first)
    q, k = first.inputs
    v, out = second.inputs[1], second.outputs[0]
    axis = form.axis
    layout = None if q is k or tuple(form.dims) != tuple(scores.dims) else _layout(q, k, v, scores, out, axis)
    if layout is None:
        return None
    if not finite_in(k, (axis,)):   # (the mask is added to the scores: a non-finite key would spoil its row)
        return None
    if q.dtype != k.dtype or k.dtype != v.dtype or not q.dtype.is_floating_point:
        return None
    return Attention(nodes, shared, q, k, v, out, scale, form, layout)


def _layout(q: Tensor, k: Tensor, v: Tensor, scores: Tensor, out: Tensor, axis: Dim) -> tuple | None:
    """The dims by role (see :attr:`Attention.layout`) where they are those of attention: scores over
    (batch..., queries..., axis) with one dim reduced, the result over (batch..., queries..., value dim);
    else None."""
    batch = [d for d in scores.dims if d in q.dims and d in k.dims]
    q_only = [d for d in scores.dims if d in q.dims and d not in k.dims]
    reduced = [d for d in q.dims if d in k.dims and d not in scores.dims]
    if len(reduced) != 1 or tuple(scores.dims) != (*batch, *q_only, axis):
        return None
    if set(q.dims) != {*batch, *q_only, *reduced} or set(k.dims) != {*batch, axis, *reduced}:
        return None
    v_only = [d for d in out.dims if d in v.dims and d not in scores.dims]
    if not (len(v_only) == 1 and tuple(out.dims) == (*batch, *q_only, *v_only)
            and set(v.dims) == {*batch, axis, *v_only} and axis not in out.dims):
        return None
    return batch, q_only, reduced[0], v_only[0]


class FusedAttention:
    """The kernel of one :class:`Attention`: ``kernel(env, q, k, v)`` -> the second dot's result. `traced`: per
    node of the chain (and the scale's constant), its kernel, run in order where a row may have no valid frame."""

    fresh = True   # (a new tensor: see looplift.graph.Kernel)

    def __init__(self, chain: Attention, traced: dict):
        q, k, v, scores = chain.queries, chain.keys, chain.values, chain.softmax.dims
        axis = chain.softmax.axis
        batch, q_only, reduced, v_only = chain.layout
        self.perm_q = tuple(q.dims.index(d) for d in (*batch, *q_only, reduced))
        self.perm_k = tuple(k.dims.index(d) for d in (*batch, axis, reduced))
        self.perm_v = tuple(v.dims.index(d) for d in (*batch, axis, v_only))
        self.n_batch, self.n_queries = len(batch), len(q_only)
        self.scores = tuple(scores)
        self.masked = tuple(chain.softmax.masked)
        history = axis.canonical().origin
        # the history of the queries' dim, masked by its own lengths alone: frame t sees frames 0..t
        self.causal = (len(q_only) == 1 and self.masked == (axis,) and history is not None
                       and history[0] == "history" and history[1][0] is q_only[0].canonical())
        self.scale = chain.scale
        self.full_rows = chain.softmax.full
        # (the chain as traced: per node, its kernel, where its inputs come from and its result's id)
        self.steps = [(kernel, [id(t) for t in node.inputs], id(node.outputs[0])) for node, kernel in traced.items()]
        self.given = (id(q), id(k), id(v))
        self.result = id(chain.output)

    def __call__(self, env, q, k, v):
        if not self.full_rows(env):
            return self._as_traced(env, q, k, v)
        q, k, v = q.permute(self.perm_q), k.permute(self.perm_k), v.permute(self.perm_v)
        nb, nq = self.n_batch, self.n_queries
        batch, queries = q.shape[:nb], q.shape[nb:nb + nq]
        rows = math.prod(queries)   # (the queries' dims as one: a single query where there are none)
        if nq != 1:
            q = q.reshape(*batch, rows, q.shape[-1])
        mask = None if self.causal or not self.masked else env.mask(self.masked, self.scores)
        if mask is not None and nq != 1:
            mask = mask.expand(*mask.shape[:nb], *queries, mask.shape[-1]).reshape(*mask.shape[:nb], rows, -1)
        q, k, v = (_four(x, batch) for x in (q, k, v))
        mask = None if mask is None else _four(mask, batch)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal, scale=self.scale)
        return out.reshape(*batch, *queries, out.shape[-1])

    def _as_traced(self, env, q, k, v):
        values = dict(zip(self.given, (q, k, v)))
        for kernel, inputs, result in self.steps:
            values[result] = kernel(env, *(values[i] for i in inputs))
        return values[self.result]


def _four(x: torch.Tensor, batch: torch.Size) -> torch.Tensor:
    """`x` over (batch..., rows, cols), its batch dims possibly of size 1 (broadcast), as a 4-d tensor: the
    batch dims merged into two, or padded with dims of size 1."""
    n = len(batch)
    if n < 2:
        return x.reshape(*([1] * (2 - n)), *x.shape)
    if n > 2:
        x = x.expand(*batch[:-1], *x.shape[n - 1:])
        return x.reshape(math.prod(batch[:-1]), *x.shape[n - 1:])
    return x
