"""Nested structures (tuples, lists, dicts, dataclasses) of values: flatten and rebuild.

Used wherever user values may be nested: program inputs and outputs, and loop
state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

__all__ = ["flatten", "unflatten", "tree_map"]


def flatten(value: Any, is_leaf: Callable[[Any], bool] | None = None) -> tuple[list, Any]:
    """The leaves of `value` in a fixed order, and a spec to rebuild it with :func:`unflatten`."""
    leaves: list = []

    def walk(v):
        if is_leaf is not None and is_leaf(v):
            leaves.append(v)
            return ("leaf",)
        if isinstance(v, tuple) and not hasattr(v, "_fields"):
            return ("tuple", tuple(walk(x) for x in v))
        if isinstance(v, tuple):
            return ("namedtuple", type(v), tuple(walk(x) for x in v))
        if isinstance(v, list):
            return ("list", tuple(walk(x) for x in v))
        if isinstance(v, dict):
            keys = tuple(v.keys())
            return ("dict", keys, tuple(walk(v[k]) for k in keys))
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            names = tuple(f.name for f in dataclasses.fields(v))
            return ("dataclass", type(v), names, tuple(walk(getattr(v, n)) for n in names))
        leaves.append(v)
        return ("leaf",)

    spec = walk(value)
    return leaves, spec


def unflatten(spec: Any, leaves: list) -> Any:
    """Rebuild the structure described by `spec` from `leaves`."""
    it = iter(leaves)

    def build(s):
        kind = s[0]
        if kind == "leaf":
            return next(it)
        if kind == "tuple":
            return tuple(build(x) for x in s[1])
        if kind == "namedtuple":
            return s[1](*(build(x) for x in s[2]))
        if kind == "list":
            return [build(x) for x in s[1]]
        if kind == "dict":
            return {k: build(x) for k, x in zip(s[1], s[2])}
        return s[1](**{n: build(x) for n, x in zip(s[2], s[3])})

    return build(spec)


def tree_map(fn: Callable[[Any], Any], value: Any, is_leaf: Callable[[Any], bool] | None = None) -> Any:
    """`value` with every leaf replaced by ``fn(leaf)``."""
    leaves, spec = flatten(value, is_leaf)
    return unflatten(spec, [fn(x) for x in leaves])
