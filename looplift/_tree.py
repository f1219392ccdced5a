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
    spec = _walk(value, is_leaf, leaves)
    return leaves, spec


def _walk(v: Any, is_leaf: Callable[[Any], bool] | None, leaves: list) -> Any:
    """`v`'s spec, its leaves appended to `leaves`. A function of the module, not a closure: a recursive
    closure refers to itself through its cell, and that cycle would keep the leaves alive until the garbage
    collector runs."""
    if is_leaf is not None and is_leaf(v):
        leaves.append(v)
        return ("leaf",)
    if isinstance(v, tuple) and not hasattr(v, "_fields"):
        return ("tuple", tuple(_walk(x, is_leaf, leaves) for x in v))
    if isinstance(v, tuple):
        return ("namedtuple", type(v), tuple(_walk(x, is_leaf, leaves) for x in v))
    if isinstance(v, list):
        return ("list", tuple(_walk(x, is_leaf, leaves) for x in v))
    if isinstance(v, dict):
        keys = tuple(v.keys())
        return ("dict", keys, tuple(_walk(v[k], is_leaf, leaves) for k in keys))
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        names = tuple(f.name for f in dataclasses.fields(v))
        return ("dataclass", type(v), names, tuple(_walk(getattr(v, n), is_leaf, leaves) for n in names))
    leaves.append(v)
    return ("leaf",)


def unflatten(spec: Any, leaves: list) -> Any:
    """Rebuild the structure described by `spec` from `leaves`."""
    return _build(spec, iter(leaves))


def _build(s: Any, it: Any) -> Any:
    """The structure of spec `s`, its leaves taken from the iterator `it` (a module function, as `_walk`)."""
    kind = s[0]
    if kind == "leaf":
        return next(it)
    if kind == "tuple":
        return tuple(_build(x, it) for x in s[1])
    if kind == "namedtuple":
        return s[1](*(_build(x, it) for x in s[2]))
    if kind == "list":
        return [_build(x, it) for x in s[1]]
    if kind == "dict":
        return {k: _build(x, it) for k, x in zip(s[1], s[2])}
    return s[1](**{n: _build(x, it) for n, x in zip(s[2], s[3])})


def tree_map(fn: Callable[[Any], Any], value: Any, is_leaf: Callable[[Any], bool] | None = None) -> Any:
    """`value` with every leaf replaced by ``fn(leaf)``."""
    leaves, spec = flatten(value, is_leaf)
    return unflatten(spec, [fn(x) for x in leaves])
