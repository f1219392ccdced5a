"""``conv1d`` over a named dim.

The padding of a dynamic `axis` is zeroed before convolving, so the frames near
each sequence's end see zeros, exactly as the sequence would alone. A stride
gives a derived output dim: ``ceil(T / stride)`` with ``padding="same"``,
``ceil((T - (k - 1) * dilation) / stride)`` with ``padding="valid"``.
"""

from __future__ import annotations

import math

import torch.nn.functional as F

from .. import trace as _trace
from ..dims import Dim
from ..errors import DimError
from ..tensor import Tensor
from ._core import as_tensor, check_has, emit, masker, require_float
from .shape import expand_for_masks

__all__ = ["conv1d"]


def conv1d(x, filter, bias=None, *, axis: Dim, in_dim: Dim, out_dim: Dim, filter_dim: Dim,  # noqa: A002
           stride: int = 1, dilation: int = 1, padding: str = "same", groups: int = 1) -> Tensor:
    """1-D convolution of `x` along `axis`, mapping `in_dim` to `out_dim`.

    `filter` has the dims ``{out_dim, in_dim / groups..., filter_dim}`` stored as
    ``(out_dim, in_dim, filter_dim)`` (for groups > 1 its in dim is the group's
    share); `bias` has ``{out_dim}``. Every other dim of `x` is a batch dim.
    """
    x, filter = as_tensor(x), as_tensor(filter)
    require_float(x, "conv1d")
    check_has(x, (axis, in_dim), "conv1d")
    check_has(filter, (out_dim, filter_dim), "conv1d", "filter dim")
    axis, in_dim, out_dim, filter_dim = (d.canonical() for d in (axis, in_dim, out_dim, filter_dim))
    x = expand_for_masks(x, (axis,) if axis.is_dynamic else ())  # the padding to zero differs per batch entry
    if padding not in ("same", "valid"):
        raise DimError(f"conv1d: padding must be 'same' or 'valid', got {padding!r}")
    if filter_dim.size is None or in_dim.size is None:
        raise DimError(f"conv1d: {filter_dim!r} and {in_dim!r} must be static")
    k = filter_dim.size
    span = (k - 1) * dilation
    if padding == "same":
        left, right = span // 2, span - span // 2
        new = axis.ceildiv(stride)
    else:
        left = right = 0
        new = (axis - span).ceildiv(stride)
    batch = tuple(d for d in x.dims if d not in (axis, in_dim))
    perm = tuple(x.dims.index(d) for d in batch + (in_dim, axis))
    f_in = [d for d in filter.dims if d not in (out_dim, filter_dim)]
    if len(f_in) != 1:
        raise DimError(f"conv1d: the filter {filter.describe()} must have exactly one in dim besides "
                       f"{out_dim.name!r} and {filter_dim.name!r}")
    f_perm = tuple(filter.dims.index(d) for d in (out_dim, f_in[0], filter_dim))
    zero_pad = masker(x.dims, (axis,) if axis.is_dynamic else (), 0)
    n = len(batch)
    inputs = (x, filter) if bias is None else (x, filter, as_tensor(bias))
    if bias is not None:
        check_has(inputs[2], (out_dim,), "conv1d", "bias dim")

    def kernel(env, v, w, b=None):
        v = zero_pad(env, v).permute(perm)
        bshape = v.shape[:n]
        v = v.reshape(math.prod(bshape), v.shape[n], v.shape[n + 1])
        if left or right:
            v = F.pad(v, (left, right))
        if v.shape[-1] < span + 1:  # shorter than the filter (a short sequence alone): no output frame
            v = F.pad(v, (0, span + 1 - v.shape[-1]))
        y = F.conv1d(v, w.permute(f_perm), b, stride=stride, dilation=dilation, groups=groups)
        y = y[..., :env.size(new)]
        return y.reshape(*bshape, *y.shape[1:])

    return emit("conv1d", inputs, kernel, batch + (out_dim, new), x.dtype,
                attrs={"axis": axis.name, "stride": stride, "dilation": dilation, "padding": padding})


for _name in __all__:  # every public op records its calls, so passes can replay them
    globals()[_name] = _trace.replayable(globals()[_name])
