"""Reductions and normalizations over named dims: sum, mean, max, min,
logsumexp, argmax, softmax, log_softmax.

Each masks the padding of the dynamic dims it reduces over (and of dynamic dims
whose lengths vary along a reduced dim) with the reduction's neutral element,
so results never depend on padding values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .. import trace as _trace
from ..dims import Dim
from ..errors import DimError, DTypeError
from ..tensor import Tensor
from ._core import as_tensor, check_has, dim_list, dims_to_mask, emit, masker, neutral, nonfinite_padding, require_float
from .shape import expand_for_masks

__all__ = ["sum", "mean", "max", "min", "logsumexp", "argmax", "softmax", "log_softmax", "cumsum"]


def _prepare(x, axis, op: str):
    x = as_tensor(x)
    dims = dim_list(axis)
    check_has(x, dims, op)
    masked = dims_to_mask(x, dims)
    x = expand_for_masks(x, masked)
    axes = tuple(x.dims.index(d) for d in dims)
    out_dims = tuple(d for d in x.dims if d not in dims)
    return x, dims, masked, axes, out_dims


def _reduction(name: str, kind: str, torch_fn: Callable, *, float_only: bool = False) -> Callable:
    def reduce(x, axis: Dim | Sequence[Dim]) -> Tensor:
        x, dims, masked, axes, out_dims = _prepare(x, axis, name)
        if float_only:
            require_float(x, name)
        fill = masker(x.dims, masked, neutral(x.dtype, kind))
        # torch.sum of bool or integers gives int64
        dtype = torch.int64 if name == "sum" and not x.dtype.is_floating_point else x.dtype
        return emit(name, (x,), lambda env, v: torch_fn(fill(env, v), axes), out_dims, dtype,
                    attrs={"axis": [d.name for d in dims]})
    reduce.__name__ = name
    reduce.__doc__ = (f"``{name}`` over the dims `axis` (a Dim or a sequence of Dims); the padding of "
                      "dynamic dims never takes part.")
    return reduce


sum = _reduction("sum", "sum", lambda v, axes: v.sum(dim=axes))  # noqa: A001


def _empty_safe(kind: str, fn: Callable) -> Callable:
    """`fn`, but the neutral element where the reduced dims are empty (as for an all-padding sequence);
    torch's amax/amin/argmax refuse empty dims (e.g. a length-0 sequence alone)."""
    def apply(v, axes):
        if any(v.shape[a] == 0 for a in axes):
            shape = [s for i, s in enumerate(v.shape) if i not in axes]
            value = 0 if kind == "argmax" else neutral(v.dtype, kind)
            return torch.full(shape, value, dtype=torch.int64 if kind == "argmax" else v.dtype, device=v.device)
        return fn(v, axes)
    return apply


max = _reduction("max", "max", _empty_safe("max", lambda v, axes: v.amax(dim=axes)))  # noqa: A001
min = _reduction("min", "min", _empty_safe("min", lambda v, axes: v.amin(dim=axes)))  # noqa: A001
logsumexp = _reduction("logsumexp", "max", lambda v, axes: torch.logsumexp(v, dim=axes), float_only=True)


def mean(x, axis: Dim | Sequence[Dim]) -> Tensor:
    """Mean over the dims `axis`, counting only valid (non-padding) positions."""
    x, dims, masked, axes, out_dims = _prepare(x, axis, "mean")
    require_float(x, "mean")
    if not masked:
        return emit("mean", (x,), lambda env, v: v.mean(dim=axes), out_dims, x.dtype,
                    attrs={"axis": [d.name for d in dims]})
    x_dims = x.dims

    def kernel(env, v):
        m = env.mask(masked, x_dims)
        total = v.masked_fill(env.padding(masked, x_dims), 0).sum(dim=axes)
        count = m.expand(v.shape).sum(dim=axes).to(v.dtype)
        return total / count

    return emit("mean", (x,), kernel, out_dims, x.dtype, attrs={"axis": [d.name for d in dims]})


def argmax(x, axis: Dim) -> Tensor:
    """The index of the maximum along `axis`; the result's ``sparse_dim`` is `axis`."""
    if not isinstance(axis, Dim):
        raise DimError(f"argmax takes a single Dim as axis, got {axis!r}")
    x, dims, masked, axes, out_dims = _prepare(x, axis, "argmax")
    if x.dtype == torch.bool:
        raise DTypeError(f"argmax needs a numeric tensor, got the {x.describe()}")
    fill = masker(x.dims, masked, neutral(x.dtype, "max"))
    return emit("argmax", (x,), lambda env, v: _argmax(fill(env, v), axes), out_dims, torch.int64,
                sparse_dim=dims[0], attrs={"axis": axis.name})


_argmax = _empty_safe("argmax", lambda v, axes: v.argmax(dim=axes[0]))


def cumsum(x, axis: Dim) -> Tensor:
    """The running sum along `axis`: frame t is the sum of frames 0..t.

    Frames within each sequence's length depend only on valid frames; padding
    frames (beyond the length) are undefined.
    """
    x = as_tensor(x)
    if not isinstance(axis, Dim):
        raise DimError(f"cumsum takes a single Dim as axis, got {axis!r}")
    check_has(x, (axis,), "cumsum")
    if x.dtype == torch.bool:
        raise DTypeError(f"cumsum needs a numeric tensor, got the {x.describe()}")
    pos = x.dims.index(axis.canonical())
    dtype = x.dtype if x.dtype.is_floating_point else torch.int64
    return emit("cumsum", (x,), lambda env, v: torch.cumsum(v, dim=pos), x.dims, dtype,
                attrs={"axis": axis.name})


def _normalize(name: str, torch_fn: Callable) -> Callable:
    def normalize(x, axis: Dim) -> Tensor:
        if not isinstance(axis, Dim):
            raise DimError(f"{name} takes a single Dim as axis, got {axis!r}")
        x, dims, masked, axes, _ = _prepare(x, axis, name)
        require_float(x, name)
        ax = axes[0]
        x_dims = x.dims
        if not masked:
            def plain(env, v):
                return torch_fn(v, ax)

            if name == "softmax":
                plain.softmax = SoftmaxOver(dims[0], x_dims, (), _always)
            return emit(name, (x,), plain, x.dims, x.dtype, attrs={"axis": axis.name},
                        nonfinite_padding=nonfinite_padding(x, dims=x.dims))
        # softmax gives exact zeros in the padding already, but for rows with no valid frame at all (NaN
        # there): only an axis whose entries can be empty needs the result masked again
        rows_ok = name == "softmax" and masked == (axis.canonical(),)
        never_empty = rows_ok and _is_history(axis)

        def full_rows(env) -> bool:
            return never_empty or (rows_ok and env.nonempty(axis))

        def kernel(env, v):
            pad = env.padding(masked, x_dims)
            out = torch_fn(v.masked_fill(pad, float("-inf")), ax)
            if full_rows(env):
                return out
            return out.masked_fill(pad, 0.0)

        if name == "softmax":
            kernel.softmax = SoftmaxOver(dims[0], x_dims, masked, full_rows)
        # (the padding of the result is zero: a dot over it need not mask it again)
        return emit(name, (x,), kernel, x.dims, x.dtype, attrs={"axis": axis.name}, zero_padding=masked,
                    nonfinite_padding=nonfinite_padding(x, dims=x.dims, cleared=masked))
    normalize.__name__ = name
    normalize.__doc__ = (f"``{name}`` over `axis`; padding positions do not take part in the "
                         "normalization, and the result there is 0.")
    return normalize


@dataclass(frozen=True)
class SoftmaxOver:
    """What a softmax's kernel computes (``kernel.softmax``), for a kernel that runs it fused with the ops
    around it (:mod:`looplift.runtime.attention`): the softmax over `axis` of its input over `dims`, the padding
    of the dims `masked` left out; ``full(env)``: whether every row has a valid frame in this call (where one
    has none, the kernel gives zeros there)."""

    axis: Dim
    dims: tuple[Dim, ...]
    masked: tuple[Dim, ...]
    full: Callable[..., bool]


def _always(env) -> bool:
    return True


def _is_history(d: Dim) -> bool:
    c = d.canonical()
    return c.origin is not None and c.origin[0] == "history"


softmax = _normalize("softmax", lambda v, ax: torch.softmax(v, dim=ax))
log_softmax = _normalize("log_softmax", lambda v, ax: torch.log_softmax(v, dim=ax))


for _name in __all__:  # every public op records its calls, so passes can replay them
    globals()[_name] = _trace.replayable(globals()[_name])
