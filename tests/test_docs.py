"""docs/architecture.md stays true: its example runs, and the graphs it shows are what the code prints."""

import contextlib
import io
import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


def test_the_example_prints_the_graphs_the_page_shows():
    text = DOC.read_text()
    blocks = re.findall(r"^```(\w*)\n(.*?)^```$", text, re.S | re.M)
    code = [body for lang, body in blocks if lang == "python"]
    assert len(code) == 1, "the page has one runnable example"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code[0], "decoder.py", "exec"), {"__name__": "decoder"})
    out = printed.getvalue()
    shown = [body for lang, body in blocks if not lang and body.startswith(("%0 = ", "...\n"))]
    assert len(shown) == 2, shown
    traced, optimized = shown
    assert traced in out                                  # the traced graph, line for line
    tail = optimized.removeprefix("...\n")
    assert tail in out and tail not in traced             # the end of the optimized graph
    assert "moved in: computed over the whole sequence before the loop:\n    linear" in out
    assert "moved out: computed after the loop on the stacked sequence:\n    relu" in out


def test_the_picture_is_linked_and_there():
    assert "](architecture.svg)" in DOC.read_text()
    assert (DOC.parent / "architecture.svg").read_text().startswith("<svg")
