"""A MaskedComputation block moved out of its loop: run over T', the frames where its mask is True.

Inside the loop the block advances only where the mask is True; its states
and the values used after it are held elsewhere (``looplift.MaskedComputation``).
Moved out, the block becomes a loop of its own over ``T' = T.masked(mask)``:
its inputs are the sequences of its inputs compressed to T', its states are
the block's states, and what the outer loop reads of it (a state's values, a
held value) is its stacked sequence unmasked onto T by repeating the last True
frame. That loop is optimized in turn, so a block holding only a recurrent
cell becomes one fused call over T' (the cost follows ``sum(mask)``, not T).
"""

from __future__ import annotations

from .. import trace as _trace
from ..graph import Graph, Op
from ..ops import shape as _shape
from ..ops.masking import compress, masked_length_dims, unmask
from ..regions import LoopSpec, emit_unstack
from ..rules import rules_of
from ..tensor import Tensor
from .loop_plan import MaskedBlock, Place
from .report import CannotMove

__all__ = ["run"]


def run(rewrite, block: MaskedBlock) -> None:
    """Run `block` as a loop over T' before the loop of `rewrite` (a :class:`.loop_rewrite.LoopRewrite`):
    its held values and states' sequences go to ``rewrite.sequences``, its states' finals to
    ``rewrite.finals``. Where a call of the block cannot run over T', the whole block stays in the loop."""
    try:
        _run(rewrite, block)
    except CannotMove as e:
        if e.part not in {id(n) for u in block.block for n in u.nodes}:
            raise   # (a value before the block)
        raise CannotMove(e.message, block=id(block.mc)) from e


def _run(rewrite, block: MaskedBlock) -> None:
    plan, spec, rw = rewrite.plan, rewrite.spec, rewrite.rw
    mc, axis, parent = block.mc, rewrite.axis, rewrite.parent
    with rewrite.inside(parent):
        mask = rewrite.with_axis(rewrite.sequence(mc.mask))
        masked = axis.masked(mask, masked_length_dims(mask, axis))
        compress(mask, mask, axis=axis, out_dim=masked)   # gives T' its lengths, even if nothing else does
    scratch = Graph(parent=parent)
    body = Graph(parent=parent)
    rw.keep += [scratch, body]
    sub = rewrite.sub_loop(masked, body)
    values: dict[int, Tensor] = {}
    placeholders = []
    ks = [k for k, _, _ in block.states]
    for k in ks:
        p = spec.placeholders[k]
        new = body.add(Op.STATE, (), None, [(p.dims, p.dtype, p.sparse_dim)], dict(p.node.attrs),
                       p.node.source, on_behalf_of=p.node.on_behalf_of).outputs[0]
        values[id(p)] = new
        placeholders.append(new)

    def frame_of(x: Tensor) -> Tensor:
        if id(x) in values:
            return values[id(x)]
        if plan.place(x) == Place.INVARIANT:
            return rewrite.invariant(x)
        with rewrite.inside(parent):
            sequence = compress(rewrite.with_axis(rewrite.sequence(x)), mask, axis=axis, out_dim=masked)
        with rewrite.inside(body, sub):
            frame = emit_unstack(body, sequence, masked, mc.source)
            values[id(x)] = _shape.to_layout(frame, x.dims)
        return values[id(x)]

    for member in block.block:
        if member.kind in ("unstack", "index"):   # a frame of an input (or the step index) read in the block
            n = member.nodes[0]
            with rewrite.inside(parent):
                sequence = rw.value(n.inputs[0]) if member.kind == "unstack" else _shape.range_over_dim(axis)
                sequence = compress(rewrite.with_axis(sequence), mask, axis=axis, out_dim=masked)
            with rewrite.inside(body, sub):
                frame = emit_unstack(body, sequence, masked, n.source)
                values[id(n.outputs[0])] = _shape.to_layout(frame, n.outputs[0].dims)
            continue
        for x in member.inputs:
            frame_of(x)
        rewrite.replay(member, frame_of, values, graph=body, loop=sub)
    with rewrite.inside(body, sub):
        new_states = [_shape.to_layout(values[id(new)], p.dims) for (_, _, new), p in zip(block.states, placeholders)]
    # a state's sequence is unmasked only where the loop reads it outside the block (its final value is
    # the block loop's own final value)
    loose = {id(t) for t in [*spec.stacks, *spec.lasts]}
    seq_states = [(i, where_out) for i, (k, where_out, _) in enumerate(block.states)
                  if plan.consumers.get(id(spec.placeholders[k])) or id(where_out) in loose
                  or id(spec.placeholders[k]) in loose or any(
                      u.kind != "call" or not rules_of(u.call.fn).layout_only or u.outputs()[0] is not
                      spec.new_states[k] for u in plan.consumers.get(id(where_out), []))]
    stacked = [values[id(block.states[i][2])] for i, _ in seq_states] + \
        [values[id(v)] for _, v, _ in block.holds]
    loop = LoopSpec(axis=masked, own_dim=False, source=mc.source, body=body,
                    captured=body.captured([*new_states, *stacked]), placeholders=placeholders,
                    new_states=new_states, stacks=stacked, end=None, include_eos=True, max_len=None,
                    length_dims=_trace.length_dims(masked),
                    state_names=[spec.state_names[k] for k in ks], freeze=True)
    node = loop.add_node(scratch, [rewrite.initial[k] for k in ks])
    for t in node.inputs:
        rw.map.setdefault(id(t), t)
    rw.used.update(id(t) for t in node.outputs[:len(ks)])
    rw.transform_loop(node, parent)   # the block's own loop, optimized in turn (e.g. a fused cell)
    for k, final in zip(ks, node.outputs):
        rewrite.finals[k] = rw.value(final)
    sequences = [rw.value(out) for out in node.outputs[len(ks):]]
    initials = [rewrite.initial[ks[i]] for i, _ in seq_states] + [rewrite.initial[k] for k, _, _ in block.holds]
    held = [t for _, t in seq_states] + [t for _, _, t in block.holds]
    with rewrite.inside(parent):
        for t, sequence, initial in zip(held, sequences, initials):
            rewrite.sequences[id(t)] = unmask(sequence, axis=masked, initial=initial)
    rewrite.report.masked.append(f"MaskedComputation at {mc.source}: its block runs over {masked.name}, "
                                 f"the frames where the mask is True")
