"""Shared checks for error tests: the offending line of a test is marked with a ``# <marker>`` comment."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest


@functools.cache
def _lines(path: str) -> list[str]:
    return Path(path).read_text().splitlines()


def marked_line(path: str, marker: str) -> str:
    """``file:line`` of the one line of the file `path` ending in ``# <marker>``."""
    hits = [i for i, line in enumerate(_lines(path), 1) if line.rstrip().endswith(f"# <{marker}>")]
    assert len(hits) == 1, f"marker {marker!r} found on lines {hits}"
    return f"{path}:{hits[0]}"


def check_error(path: str, info: pytest.ExceptionInfo, cls: type, marker: str, *names: str) -> None:
    """The error is exactly `cls`, names the marked line of `path` and every name in `names` (as a word)."""
    err = info.value
    assert type(err) is cls, f"expected {cls.__name__}, got {type(err).__name__}: {err}"
    msg = str(err)
    where = marked_line(path, marker)
    assert where in msg, f"the message does not name {where}: {msg}"
    for name in names:
        assert re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", msg), f"the message does not name {name!r}: {msg}"
