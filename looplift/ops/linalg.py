"""``dot``: multiply two tensors and sum over named dims (a matmul by dim identity)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import trace as _trace
from ..dims import Dim
from ..errors import DimError, DTypeError
from ..tensor import Tensor
from ._core import (
    as_tensor,
    broadcast_dims,
    check_has,
    dim_list,
    dims_to_mask,
    emit,
    finite_in,
    masker,
    nonfinite_padding,
    result_dtype,
)
from .index import meet_beams
from .math import cast
from .shape import expand_for_masks

__all__ = ["dot", "matmul", "linear"]


def dot(a, b, *, reduce: Dim | Sequence[Dim]) -> Tensor:
    """``sum(a * b)`` over the dims `reduce`, which both tensors must have.

    Dims in both tensors that are not reduced are batch dims; the result has
    them, then the dims only in `a`, then those only in `b`. Dynamic reduced
    dims are masked in both operands, so padding never takes part.
    It runs as one (batched) matmul.
    """
    a, b = meet_beams(as_tensor(a), as_tensor(b))
    red = dim_list(reduce, "reduce")
    check_has(a, red, "dot", "reduce dim")
    check_has(b, red, "dot", "reduce dim")
    broadcast_dims("dot", a, b)
    dtype = result_dtype(a, b)
    if not dtype.is_floating_point:
        dtype = _trace.current().float_dtype
    a, b = cast(a, dtype), cast(b, dtype)
    mask_a, mask_b = all_a, all_b = dims_to_mask(a, red), dims_to_mask(b, red)
    # Masking an operand whose masks need dims it lacks (a history dim, whose lengths run over the
    # query's time) would broadcast it over them. When the other operand's mask covers the same padding,
    # zeros there suffice if this operand's padding is finite: it is made finite instead.
    finite_a = finite_b = False
    if _needs_dims(b, mask_b) and set(mask_b) <= set(mask_a) and not _needs_dims(a, mask_a):
        mask_b, finite_b = (), True
    elif _needs_dims(a, mask_a) and set(mask_a) <= set(mask_b) and not _needs_dims(b, mask_b):
        mask_a, finite_a = (), True
    # An operand whose padding is zero already (a softmax's result) need not be masked when the other one
    # is masked or made finite (zero times zero or a finite value is zero).
    if mask_a and mask_b and _zero_padded(a, mask_a) and _zero_padded(b, mask_b):
        mask_a = mask_b = ()   # (zero times zero)
    elif mask_a and (mask_b or finite_b) and _zero_padded(a, mask_a):
        mask_a = ()
    elif mask_b and (mask_a or finite_a) and _zero_padded(b, mask_b):
        mask_b = ()
    # An operand finite in the padding need not be masked, or made finite, where the other one is zero there
    # (masked, or zero already): zero times a finite value is zero.
    zero_a = bool(mask_a) or _zero_padded(a, all_a)
    zero_b = bool(mask_b) or _zero_padded(b, all_b)
    if finite_b and finite_in(b, all_b):
        finite_b = False
    elif finite_a and finite_in(a, all_a):
        finite_a = False
    elif mask_b and zero_a and set(mask_b) <= set(all_a) and finite_in(b, mask_b):
        mask_b = ()
    elif mask_a and zero_b and set(mask_a) <= set(all_b) and finite_in(a, mask_a):
        mask_a = ()
    a, b = expand_for_masks(a, mask_a), expand_for_masks(b, mask_b)
    batch = tuple(d for d in a.dims if d in b.dims and d not in red)
    a_only = tuple(d for d in a.dims if d not in b.dims)
    b_only = tuple(d for d in b.dims if d not in a.dims)
    # The padding is cleared by nodes of their own, so that in a loop the clearing of a loop-invariant
    # operand (an encoder's values) is done once, before the loop.
    a, b = _clear_padding(a, mask_a, finite_a), _clear_padding(b, mask_b, finite_b)
    perm_a = tuple(a.dims.index(d) for d in batch + a_only + red)
    perm_b = tuple(b.dims.index(d) for d in batch + red + b_only)
    nb, na, nr = len(batch), len(a_only), len(red)
    out_dims = batch + a_only + b_only
    keep_a, keep_b = perm_a == tuple(range(len(perm_a))), perm_b == tuple(range(len(perm_b)))

    if na == 1 and nr == 1 and len(b_only) == 1:
        # already (batch..., m, k) @ (batch..., k, n): matmul takes the strided views, no reshape copies
        def kernel(env, x, y):
            return torch.matmul(_blas_ready(x if keep_a else x.permute(perm_a)),
                                _blas_ready(y if keep_b else y.permute(perm_b)))

        kernel.fresh = True   # (a new tensor: see looplift.graph.Kernel)
        return emit("dot", (a, b), kernel, out_dims, a.dtype, attrs={"reduce": [d.name for d in red]},
                    nonfinite_padding=nonfinite_padding(a, b, dims=out_dims))

    def kernel(env, x, y):
        if not keep_a:
            x = x.permute(perm_a)
        if not keep_b:
            y = y.permute(perm_b)
        bshape = x.shape[:nb]
        ashape, rshape = x.shape[nb:nb + na], x.shape[nb + na:]
        oshape = y.shape[nb + nr:]
        x = x.reshape(*bshape, math.prod(ashape), math.prod(rshape))
        y = y.reshape(*bshape, math.prod(rshape), math.prod(oshape))
        if nb == 1 and x.shape[0] == y.shape[0]:   # (one batch dim, no broadcasting: one bmm, no matmul dance)
            return torch.bmm(_blas_ready(x), _blas_ready(y)).view((*bshape, *ashape, *oshape))
        return torch.matmul(x, y).reshape((*bshape, *ashape, *oshape))   # (a tuple: the result may have no dims)

    kernel.fresh = True
    return emit("dot", (a, b), kernel, out_dims, a.dtype, attrs={"reduce": [d.name for d in red]},
                nonfinite_padding=nonfinite_padding(a, b, dims=out_dims))


def _blas_ready(v: torch.Tensor) -> torch.Tensor:
    """`v` (a batch of matrices) with one of its matrix dims contiguous, as a batched matmul takes it without
    a slow strided pass (a copy of the operand is far cheaper than that)."""
    if v.dim() >= 3 and v.stride(-1) != 1 and v.stride(-2) != 1 and v.numel() > 1:
        return v.contiguous()
    return v


def _clear_padding(x: Tensor, masked, finite: bool) -> Tensor:
    """`x` with zeros in the padding of the dims `masked` (or, `finite`: with its padding made finite)."""
    if finite:
        return emit("make_finite", (x,), _finite, x.dims, x.dtype, sparse_dim=x.sparse_dim, nonfinite_padding=())
    if not masked:
        return x
    fill = masker(x.dims, masked, 0)
    return emit("clear_padding", (x,), fill, x.dims, x.dtype, sparse_dim=x.sparse_dim,
                zero_padding=tuple(masked), nonfinite_padding=nonfinite_padding(x, dims=x.dims, cleared=masked))


def _zero_padded(x: Tensor, masked) -> bool:
    """Whether `x` is known to be zero in the padding of the dims `masked`."""
    return x.node is not None and set(masked) <= set(x.node.zero_padding)


def _needs_dims(x: Tensor, masked) -> bool:
    """Whether masking `x` along the dims `masked` needs dims `x` lacks."""
    return any(ld not in x.dims for d in masked for ld in _trace.length_dims(d))


def _finite(env, v):
    return torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)


def matmul(a, b, *, reduce: Dim | Sequence[Dim]) -> Tensor:
    """Alias of :func:`dot`."""
    return dot(a, b, reduce=reduce)


def linear(x, weight, bias=None, *, in_dim: Dim, out_dim: Dim) -> Tensor:
    """``x @ weight.T + bias`` mapping `in_dim` to `out_dim`, as ``torch.nn.functional.linear``.

    `weight` is stored ``(out_dim, in_dim)`` and `bias` ``(out_dim,)``, as in
    ``torch.nn.Linear``. Every other dim of `x` is a batch dim. `in_dim` and
    `out_dim` may be the same dim (a map of a feature space to itself).
    """
    x, weight = as_tensor(x), as_tensor(weight)
    in_dim, out_dim = in_dim.canonical(), out_dim.canonical()
    check_has(x, (in_dim,), "linear", "in dim")
    if weight.dims != (out_dim, in_dim):
        raise DimError(f"linear: the weight must be stored as ({out_dim.name}, {in_dim.name}), got the "
                       f"{weight.describe()}")
    if out_dim in x.dims and out_dim is not in_dim:
        raise DimError(f"linear: the input {x.describe()} already has the out dim {out_dim.name!r}")
    if not x.dtype.is_floating_point:
        raise DTypeError(f"linear needs a floating-point input, got the {x.describe()}")
    if weight.dtype != x.dtype:
        raise DTypeError(f"linear: the input {x.describe()} and the weight {weight.describe()} differ in dtype; "
                         f"cast one (model.to(dtype) or looplift.cast)")
    if in_dim.is_dynamic:
        raise DimError(f"linear: the in dim {in_dim!r} must be static")
    rest = tuple(d for d in x.dims if d is not in_dim)
    perm = tuple(x.dims.index(d) for d in rest + (in_dim,))
    identity_perm = perm == tuple(range(len(perm)))
    inputs = (x, weight) if bias is None else (x, weight, as_tensor(bias))
    if bias is not None and inputs[2].dims != (out_dim,):
        raise DimError(f"linear: the bias must have the dims ({out_dim.name},), got the {inputs[2].describe()}")

    def kernel(env, v, w, b=None):
        return F.linear(v if identity_perm else v.permute(perm), w, b)

    return emit("linear", inputs, kernel, rest + (out_dim,), x.dtype,
                attrs={"in_dim": in_dim.name, "out_dim": out_dim.name},
                nonfinite_padding=nonfinite_padding(*inputs, dims=rest + (out_dim,)))


for _name in __all__:  # every public op records its calls, so passes can replay them
    globals()[_name] = _trace.replayable(globals()[_name])
