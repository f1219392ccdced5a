"""What the loop optimizer did, as text (``Program.explain``) and as a Graphviz picture (``Program.to_dot``)."""

from __future__ import annotations

from .report import LoopReport

__all__ = ["explain", "to_dot"]


def _user(items, report: LoopReport):
    """`items` without the calls that only change a layout (bookkeeping of loop states, not user calls), each
    once (the calls looplift makes on behalf of one construct of the user's are named as that construct)."""
    return list(dict.fromkeys(x for x in items if x not in report.layout_only))


def _chain(chain: list[str], report: LoopReport) -> list[str]:
    """The chain that keeps the call ``chain[0]`` in the loop, in the user's terms: without layout-only calls,
    each link once (a construct of the user's kept by its own parts: by its own state)."""
    out = [chain[0]]
    for link in chain[1:]:
        if link not in report.layout_only and out[-1] != link:
            out.append(link)
    return out[1:] or ["its own state from the previous step"]


def explain(reports: list[LoopReport]) -> str:
    """A readable account of each loop: what moved, where, and what stayed with the chain that kept it."""
    if not reports:
        return "no loops"
    lines = []
    for r in reports:
        lines.append(f"loop over {r.axis!r} at {r.source}")
        if r.not_optimized:
            lines.append(f"  not optimized (runs step by step as written): {r.not_optimized}")
            continue
        sections = [
            ("computed once before the loop (loop-invariant)", _user(r.hoisted, r)),
            ("moved in: computed over the whole sequence before the loop", _user(r.before_loop, r)),
            ("replaced by sequence forms", r.sequence_forms),
            ("masked computations moved out (run over T' as a loop of their own, then unmasked)", r.masked),
            ("states moved out (the previous step's value is the sequence shifted by one)", r.moved_states),
            ("moved out: computed after the loop on the stacked sequence", _user(r.after_loop, r)),
        ]
        for title, items in sections:
            if items:
                lines.append(f"  {title}:")
                lines += [f"    {x}" for x in items]
        stayed = list({u: chain for u, chain in reversed(r.stayed) if u not in r.layout_only}.items())[::-1]
        if r.loop_removed:
            lines.append("  nothing left in the loop: it is gone")
        elif stayed:
            lines.append("  stayed in the loop (each kept by its dependency on a carried state):")
            for unit, chain in stayed:
                lines.append(f"    {unit}")
                lines.append(f"      kept by: {' <- '.join(_chain(chain, r))}")
        else:
            lines.append("  stayed in the loop: only the carried states")
        if r.checked_end:
            lines.append(f"  checked at run time: {r.checked_end}")
    return "\n".join(lines)


_COLORS = {"invariant": "lightgrey", "sequence": "lightblue", "masked": "plum", "after": "palegreen",
           "core": "salmon"}


def to_dot(reports: list[LoopReport]) -> str:
    """Graphviz DOT text of each loop body, nodes coloured by where the optimizer put them."""
    out = ["digraph looplift {", "  rankdir=TB;", "  node [shape=box, style=filled, fontname=Helvetica];"]
    legend = ", ".join(f"{k}: {v}" for k, v in _COLORS.items())
    out.append(f'  label="{_escape(legend)}"; labelloc=b;')
    for i, r in enumerate(reports):
        spec = r.spec
        out.append(f"  subgraph cluster_{i} {{")
        title = f"loop over {r.axis} at {r.source}" + (" (not optimized)" if r.not_optimized else "")
        out.append(f'    label="{_escape(title)}";')
        ids = {}
        for k, node in enumerate(spec.body.nodes):
            ids[id(node)] = f"n{i}_{k}"
            place = r.node_place.get(id(node), "core")
            name = node.call.fn.__name__ if node.call is not None else node.op
            if node.op == "state":
                name = f"state {node.attrs.get('state')}"
            dims = ",".join(d.name for d in node.outputs[0].dims) if node.outputs else ""
            out.append(f'    {ids[id(node)]} [label="{_escape(name)}\\n{{{_escape(dims)}}}", '
                       f'fillcolor={_COLORS.get(place, "white")}];')
        for node in spec.body.nodes:
            for t in node.inputs:
                if t.node is not None and id(t.node) in ids:
                    out.append(f"    {ids[id(t.node)]} -> {ids[id(node)]};")
        out.append("  }")
    out.append("}")
    return "\n".join(out)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
