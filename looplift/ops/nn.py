"""Neural-network ops: ``dropout`` and ``layer_norm``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import trace as _trace
from ..dims import Dim
from ..errors import DimError
from ..tensor import Tensor
from ._core import as_tensor, check_has, dim_list, emit, nonfinite_padding, require_float

__all__ = ["dropout", "layer_norm"]


def dropout(x, p: float, *, broadcast_over: Sequence[Dim] = ()) -> Tensor:
    """Inverted dropout with drop probability `p`, in train mode only.

    In eval and search mode it returns `x` unchanged (no node). The same mask
    is shared along the dims `broadcast_over` (e.g. the time dim for variational
    dropout).
    """
    x = as_tensor(x)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if _trace.current().mode != "train" or p == 0.0:
        return x
    require_float(x, "dropout")
    shared = dim_list(broadcast_over, "broadcast_over")
    check_has(x, shared, "dropout", "broadcast_over dim")
    keep = tuple(i not in [x.dims.index(d) for d in shared] for i in range(len(x.dims)))
    scale = 1.0 / (1.0 - p)

    def kernel(env, v):
        shape = [s if k else 1 for s, k in zip(v.shape, keep)]
        noise = torch.empty(shape, dtype=v.dtype, device=v.device).bernoulli_(1.0 - p)
        return v * noise * scale

    # (random: a pass must not compute it once for several steps, which each draw their own mask)
    return emit("dropout", (x,), kernel, x.dims, x.dtype, attrs={"p": p}, random=True,
                nonfinite_padding=nonfinite_padding(x, dims=x.dims))


def layer_norm(x, *, axis: Dim | Sequence[Dim], weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    """Normalize `x` to zero mean and unit variance over the static dims `axis`,
    then scale by `weight` and shift by `bias` (each over `axis`, optional)."""
    x = as_tensor(x)
    require_float(x, "layer_norm")
    dims = dim_list(axis)
    check_has(x, dims, "layer_norm")
    if not all(d.is_static for d in dims):
        raise DimError(f"layer_norm normalizes over static dims; {[str(d) for d in dims if not d.is_static]} "
                       f"are not (use looplift.mean over a dynamic dim instead)")
    rest = tuple(d for d in x.dims if d not in dims)
    out_dims = rest + dims
    perm = tuple(x.dims.index(d) for d in out_dims)
    identity_perm = perm == tuple(range(len(perm)))
    shape = [d.size for d in dims]
    params = []
    for p in (weight, bias):
        if p is not None:
            p = as_tensor(p)
            if p.dim_set != frozenset(dims):
                raise DimError(f"layer_norm: weight and bias must have exactly the dims {[str(d) for d in dims]}, "
                               f"got the {p.describe()}")
            params.append((p, tuple(p.dims.index(d) for d in dims)))
    has_w, has_b = weight is not None, bias is not None
    # (a weight laid out as the normalized dims already, a one-dim weight always, is used as it is)
    w_perm = params[0][1] if has_w and params[0][1] != tuple(range(len(dims))) else None
    b_perm = params[-1][1] if has_b and params[-1][1] != tuple(range(len(dims))) else None

    def kernel(env, v, *wb):
        if not identity_perm:
            v = v.permute(perm)
        w = (wb[0] if w_perm is None else wb[0].permute(w_perm)) if has_w else None
        b = (wb[-1] if b_perm is None else wb[-1].permute(b_perm)) if has_b else None
        return F.layer_norm(v, shape, w, b, eps)

    return emit("layer_norm", (x, *(p for p, _ in params)), kernel, out_dims, x.dtype,
                attrs={"axis": [d.name for d in dims], "eps": eps},
                nonfinite_padding=nonfinite_padding(x, *(p for p, _ in params), dims=out_dims))


for _name in __all__:  # every public op records its calls, so passes can replay them
    globals()[_name] = _trace.replayable(globals()[_name])
