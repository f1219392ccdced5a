"""Losses: ``cross_entropy`` (per frame) and ``ctc_loss`` (per sequence).

Both return unreduced losses; sum them with :func:`looplift.sum` (which masks
padding frames) or average with :func:`looplift.mean`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import trace as _trace
from .._align import aligner
from ..dims import Dim
from ..errors import ArgumentError, DimError
from ..tensor import Tensor
from ._core import as_tensor, check_has, emit, indexes_with, masker, require_float, require_int
from .index import gather
from .linalg import dot
from .reduce import log_softmax

__all__ = ["cross_entropy", "ctc_loss"]


def cross_entropy(logits, targets, *, axis: Dim, logits_are_log_probs: bool = False) -> Tensor:
    """``-log softmax(logits)[target]`` per position, over the vocabulary dim `axis`.

    `targets` are label indices (with ``sparse_dim`` `axis`) or a distribution
    over `axis` (soft targets). The result has every dim but `axis`.
    """
    logits, targets = as_tensor(logits), as_tensor(targets)
    require_float(logits, "cross_entropy")
    check_has(logits, (axis,), "cross_entropy", "vocabulary dim")
    log_probs = logits if logits_are_log_probs else log_softmax(logits, axis=axis)
    if targets.dtype.is_floating_point:
        check_has(targets, (axis,), "cross_entropy", "vocabulary dim")
        return -dot(log_probs, targets, reduce=axis)
    require_int(targets, "cross_entropy")
    indexes_with(targets, axis, "cross_entropy")
    if targets.sparse_dim is not None and targets.sparse_dim is not axis.canonical():
        raise DimError(f"cross_entropy: the targets' sparse_dim {targets.sparse_dim!r} is not the vocabulary "
                       f"dim {axis!r}")
    return -gather(log_probs, index=targets, axis=axis)


def ctc_loss(logits, targets, *, input_axis: Dim, targets_axis: Dim, axis: Dim, blank: int,
             logits_are_log_probs: bool = False) -> Tensor:
    """Connectionist temporal classification loss per sequence (the negative log likelihood).

    `logits` has the dims ``{batch dims..., input_axis, axis}`` and `targets`
    ``{batch dims..., targets_axis}`` with label indices; `blank` is the index
    of the blank label in `axis`. Uses the lengths of both dynamic dims. The
    result has the batch dims. Impossible alignments give ``inf``.
    """
    logits, targets = as_tensor(logits), as_tensor(targets)
    require_float(logits, "ctc_loss")
    require_int(targets, "ctc_loss")
    check_has(logits, (input_axis, axis), "ctc_loss")
    check_has(targets, (targets_axis,), "ctc_loss")
    input_axis, targets_axis, axis = input_axis.canonical(), targets_axis.canonical(), axis.canonical()
    if isinstance(blank, bool) or not isinstance(blank, int):
        raise ArgumentError(f"ctc_loss: blank must be the int index of the blank label in {axis.name!r}, got {blank!r}")
    if not 0 <= blank < (axis.size or 0):
        raise DimError(f"ctc_loss: blank={blank} is not an index of {axis!r}")
    log_probs = logits if logits_are_log_probs else log_softmax(logits, axis=axis)
    batch = tuple(d for d in log_probs.dims if d not in (input_axis, axis))
    t_batch = tuple(d for d in targets.dims if d is not targets_axis)
    if set(t_batch) != set(batch):
        raise DimError(f"ctc_loss: the batch dims of the logits ({[str(d) for d in batch]}) and of the targets "
                       f"({[str(d) for d in t_batch]}) differ")
    lp_perm = tuple(log_probs.dims.index(d) for d in (input_axis, *batch, axis))
    tg_perm = tuple(targets.dims.index(d) for d in (*batch, targets_axis))
    n = len(batch)
    zero_pad = masker(log_probs.dims, (input_axis,) if input_axis.is_dynamic else (), 0.0)

    def lengths(env, d: Dim, shape):
        if d.is_static:
            return torch.full(shape, d.size, dtype=torch.long, device=env.device).reshape(-1)
        return aligner(env.length_dims(d), batch)(env.lengths(d)).expand(shape).reshape(-1)

    def kernel(env, lp, tg):
        lp = zero_pad(env, lp).permute(lp_perm)
        bshape = lp.shape[1:1 + n]
        lp = lp.reshape(lp.shape[0], math.prod(bshape), lp.shape[-1])
        if lp.shape[0] == 0:  # torch refuses empty log_probs (a length-0 sequence alone); the frame is unused
            lp = F.pad(lp, (0, 0, 0, 0, 0, 1))
        tg = tg.permute(tg_perm)
        tg = tg.reshape(math.prod(bshape), tg.shape[-1])
        in_len = lengths(env, input_axis, bshape)
        tg_len = lengths(env, targets_axis, bshape)
        tg = tg.clamp(0, lp.shape[-1] - 1).long()
        loss = F.ctc_loss(lp, tg, in_len, tg_len, blank=blank, reduction="none", zero_infinity=False)
        return loss.reshape(bshape)

    return emit("ctc_loss", (log_probs, targets), kernel, batch, log_probs.dtype,
                attrs={"input_axis": input_axis.name, "targets_axis": targets_axis.name, "blank": blank})


for _name in __all__:  # every public op records its calls, so passes can replay them
    globals()[_name] = _trace.replayable(globals()[_name])
