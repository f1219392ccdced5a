"""A nested loop moved out of its loop: run once for all steps of the outer one.

A loop nested in a body, over an axis of its own (the characters of each word
of a sentence), that reads frames of the outer loop but none of its carried
states, does the same work at every outer step on different frames. Moved
out, it runs once before the outer loop, with the outer loop's dim as one more
batch dim: its body is replayed on the outer sequences, and the new loop is
optimized in turn (a recurrent cell over the inner axis becomes one fused
call for all words at once).
"""

from __future__ import annotations

from .. import trace as _trace
from ..graph import Graph, Op
from ..ops import shape as _shape
from ..regions import LoopSpec, emit_unstack
from ..rules import rules_of
from ..tensor import Tensor
from .loop_plan import Place, Unit
from .report import CannotMove

__all__ = ["run"]


def run(rewrite, unit: Unit) -> None:
    """Run the nested loop `unit` before the loop of `rewrite` (a :class:`.loop_rewrite.LoopRewrite`); the
    sequences of its outputs go to ``rewrite.sequences``."""
    plan, rw, parent = rewrite.plan, rewrite.rw, rewrite.parent
    old = unit.nodes[0]
    inner: LoopSpec = old.region
    axis = rewrite.axis
    nc, ns = len(inner.captured), len(inner.placeholders)
    with rewrite.inside(parent):
        length_dims = _trace.length_dims(inner.axis) if inner.axis.is_dynamic else ()
        if inner.end is not None:
            length_dims = tuple(dict.fromkeys([*inner.length_dims, *length_dims, axis]))

    def outer(x: Tensor) -> Tensor:   # a value of the outer body (or from outside it), over the sequence
        place = plan.place(x)
        if place == Place.CORE:
            raise CannotMove(f"the nested loop at {inner.source} reads a value of the loop's core",
                             part=id(unit.nodes[0]))
        return rewrite.sequence(x) if place == Place.SEQUENCE else rewrite.invariant(x)

    scratch = Graph(parent=parent)
    body = Graph(parent=parent)
    rw.keep += [scratch, body]
    sub = rewrite.sub_loop(inner.axis, body)
    values: dict[int, Tensor] = {}
    placeholders, initials = [], []
    for p, init in zip(inner.placeholders, old.inputs[nc:nc + ns]):
        dims = tuple(dict.fromkeys([*p.dims, *length_dims, axis]))
        with rewrite.inside(parent):
            init = outer(init)
            init = _shape.to_layout(_shape.expand(init, [d for d in dims if d not in init.dims]), dims)
        initials.append(init)
        new = body.add(Op.STATE, (), None, [(dims, p.dtype, p.sparse_dim)], dict(p.node.attrs),
                       p.node.source, on_behalf_of=p.node.on_behalf_of).outputs[0]
        values[id(p)] = new
        placeholders.append(new)

    def value_of(x: Tensor) -> Tensor:
        return values[id(x)] if id(x) in values else outer(x)

    replayed: set[int] = set()
    for n in inner.body.nodes:
        if n.op == Op.UNSTACK:
            with rewrite.inside(parent):
                sequence = outer(n.inputs[0])
            with rewrite.inside(body, sub):
                values[id(n.outputs[0])] = emit_unstack(body, sequence, inner.axis, n.source)
        elif n.op == Op.LOOP_INDEX:
            with rewrite.inside(body, sub):
                rw.copy_node(n, body)
            values[id(n.outputs[0])] = rw.value(n.outputs[0])
        elif n.op == Op.STATE:
            continue
        elif id(n.call) not in replayed:
            replayed.add(id(n.call))
            if rules_of(n.call.fn).layout_only:   # (a layout is no part of the meaning; the new one has more dims)
                values[id(n.call.outputs)] = value_of(n.call.args[0])
                continue
            rewrite.replay(Unit([n], n.call, "call"), value_of, values, graph=body, loop=sub)

    def widened(x: Tensor, dims: tuple) -> Tensor:
        x = value_of(x)
        dims = tuple(dict.fromkeys([*dims, *x.dims]))
        return _shape.to_layout(_shape.expand(x, [d for d in dims if d not in x.dims]), dims)

    with rewrite.inside(body, sub):
        new_states = [widened(v, p.dims) for v, p in zip(inner.new_states, placeholders)]
        stacks = [value_of(v) for v in inner.stacks]
        lasts = [widened(v, tuple(dict.fromkeys([*v.dims, *length_dims]))) for v in inner.lasts]
        end = value_of(inner.end) if inner.end is not None else None
    max_len = inner.max_len
    if isinstance(max_len, Tensor):
        with rewrite.inside(parent):
            max_len = outer(old.inputs[nc + ns])
    returned = [*new_states, *stacks, *lasts, *([end] if end is not None else [])]
    loop = LoopSpec(axis=inner.axis, own_dim=False, source=inner.source, body=body,
                    captured=body.captured(returned), placeholders=placeholders, new_states=new_states,
                    stacks=stacks, end=end, include_eos=inner.include_eos, max_len=max_len,
                    length_dims=length_dims, state_names=list(inner.state_names), freeze=inner.freeze,
                    freeze_past_length=inner.freeze_past_length)
    node = loop.add_node(scratch, initials)
    for v in lasts:
        loop.add_last(v)
    for t in node.inputs:
        rw.map.setdefault(id(t), t)
    rw.used.update(id(t) for t in node.outputs)
    rw.transform_loop(node, parent)   # optimized in turn
    for o, n in zip(old.outputs, node.outputs):
        rewrite.sequences[id(o)] = rw.value(n)
    rewrite.report.before_loop.append(f"loop over {inner.axis.name!r} at {inner.source}, run once for all steps "
                                      f"({axis.name!r} one more batch dim)")
