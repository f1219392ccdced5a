"""Draw docs/architecture.svg: looplift's modules in layers, from the imports in the code.

Run from the repository root: ``python docs/make_pictures.py``. It walks the
imports with the same code as ``tests/test_imports.py`` (which fails on a
cycle), groups the modules of each subpackage into one box, and places every
box one row below the lowest box that imports it, so the picture is the
dependency direction itself: everything points down. An arrow is drawn only where no
longer path says the same (the transitive reduction). The small modules every
layer uses (errors, source, _tree, _align) are listed, not drawn.
"""

from __future__ import annotations

import sys
from pathlib import Path
from xml.sax.saxutils import escape

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_imports import import_graph  # noqa: E402  (the walker of the import-cycle test)

PACKAGES = ("ops", "search", "passes", "runtime", "nn", "train", "recipes")
UTILITIES = ("errors", "source", "_tree", "_align")
BOX_W, BOX_H, GAP_X, GAP_Y, MARGIN = 170, 46, 24, 52, 20


def boxes() -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """Box -> the boxes it imports; box -> the modules in it."""
    graph = import_graph(ROOT / "looplift")
    members: dict[str, list[str]] = {}
    edges: dict[str, set[str]] = {}

    def box(module: str) -> str:
        parts = module.split(".")
        return "looplift" if len(parts) == 1 else parts[1]

    for module, deps in graph.items():
        b = box(module)
        members.setdefault(b, []).append(module.split(".")[-1])
        edges.setdefault(b, set()).update(box(d) for d in deps if box(d) != b)
    for b in UTILITIES:
        edges.pop(b, None)
        members.pop(b, None)
    return {b: {d for d in deps if d not in UTILITIES} for b, deps in edges.items()}, members


def reduced(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The edges no longer path implies."""
    def reach(a: str, skip: str) -> set[str]:
        seen, todo = set(), [d for d in edges[a] if d != skip]
        while todo:
            d = todo.pop()
            if d not in seen:
                seen.add(d)
                todo += edges[d]
        return seen
    return {a: {d for d in deps if d not in reach(a, d)} for a, deps in edges.items()}


def svg(edges: dict[str, set[str]], members: dict[str, list[str]]) -> str:
    importers = {b: {a for a in edges if b in edges[a]} for b in edges}
    level: dict[str, int] = {}   # rows from the top: one below the lowest box that imports it

    def depth(b: str) -> int:
        if b not in level:
            level[b] = 1 + max((depth(a) for a in importers[b]), default=-1)
        return level[b]

    rows: dict[int, list[str]] = {}
    for b in sorted(edges):
        rows.setdefault(depth(b), []).append(b)
    width = max(len(r) for r in rows.values()) * (BOX_W + GAP_X) + 2 * MARGIN
    height = len(rows) * (BOX_H + GAP_Y) + 2 * MARGIN + 20
    pos = {}
    for lvl in sorted(rows):   # top down; a box goes below the boxes that import it
        row = sorted(rows[lvl], key=lambda b: _mean([pos[a][0] for a in importers[b] if a in pos], width / 2))
        y = MARGIN + lvl * (BOX_H + GAP_Y)
        x0 = (width - len(row) * (BOX_W + GAP_X) + GAP_X) / 2
        for i, b in enumerate(row):
            pos[b] = (x0 + i * (BOX_W + GAP_X), y)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'font-family="Helvetica, Arial, sans-serif">',
           '<defs><marker id="a" markerWidth="8" markerHeight="8" refX="7" refY="4" orient="auto">'
           '<path d="M0,0 L8,4 L0,8 z" fill="#555"/></marker></defs>',
           f'<rect width="{width:.0f}" height="{height:.0f}" fill="white"/>']
    for a, deps in sorted(reduced(edges).items()):
        ax, ay = pos[a]
        for d in sorted(deps):
            x1, y1, x2, y2 = ax + BOX_W / 2, ay + BOX_H, pos[d][0] + BOX_W / 2, pos[d][1]
            bulge = (level[d] - level[a] - 1) * 0.6 * (BOX_W + GAP_X)   # (past the boxes between, not through)
            out.append(f'<path d="M{x1:.0f},{y1:.0f} C{x1 + bulge:.0f},{y1 + GAP_Y:.0f} {x2 + bulge:.0f},'
                       f'{y2 - GAP_Y:.0f} {x2:.0f},{y2:.0f}" fill="none" stroke="#888" marker-end="url(#a)"/>')
    for b, (x, y) in pos.items():
        pkg = b in PACKAGES
        fill = "#dbe9f6" if pkg else "#f3f3f3"
        out.append(f'<rect x="{x:.0f}" y="{y:.0f}" width="{BOX_W}" height="{BOX_H}" rx="6" fill="{fill}" '
                   f'stroke="#555"/>')
        name = f"{b}/" if pkg else ("looplift (the API)" if b == "looplift" else f"{b}.py")
        out.append(f'<text x="{x + BOX_W / 2:.0f}" y="{y + 18:.0f}" text-anchor="middle" font-size="14" '
                   f'font-weight="bold">{escape(name)}</text>')
        if pkg:
            inner = ", ".join(m for m in sorted(members[b]) if m != b and m != "__init__")
            if len(inner) > 30:
                inner = inner[:28] + "..."
            out.append(f'<text x="{x + BOX_W / 2:.0f}" y="{y + 35:.0f}" text-anchor="middle" font-size="10" '
                       f'fill="#333">{escape(inner)}</text>')
    out.append(f'<text x="{MARGIN}" y="{height - 12:.0f}" font-size="11" fill="#555">Arrows: imports '
               f'(implied ones left out). Every box also uses {", ".join(UTILITIES)}. '
               f'Generated by docs/make_pictures.py.</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _mean(xs: list[float], default: float) -> float:
    return sum(xs) / len(xs) if xs else default


def main() -> None:
    edges, members = boxes()
    path = ROOT / "docs" / "architecture.svg"
    path.write_text(svg(edges, members))
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
