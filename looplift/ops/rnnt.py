"""The RNN-T (transducer) lattice: ``rnnt_loss`` (the full-sum loss) and ``rnnt_align`` (the Viterbi alignment).

A transducer's joint network scores, for every encoder frame t and every label
prefix u (the first u labels emitted), the next symbol over the vocabulary:
a tensor over ``{batch, enc_time, prefix, vocab}`` where ``prefix`` is the
labels' dim plus one (``labels_dim + 1``: prefixes of length 0 to U). Written
with named dims, that is the encoder over ``enc_time`` and the prediction
network over ``prefix`` broadcast together (see the README). The loss sums over
all alignments (Graves 2012); the alignment is the best one, as blanks and
labels over a new dim of T + U steps, the target of a transducer trained on a
fixed alignment (the seeds' slow/fast transducer).

The dynamic programs run along the lattice's anti-diagonals
(:mod:`looplift.ops.rnnt_kernels`); the loss's gradient comes from a backward
pass over the same lattice, and the loss allocates one tensor the size of the
scores (the gradient).
"""

from __future__ import annotations

from typing import Literal

import torch

from .. import trace as _trace
from .._align import aligner
from ..dims import Dim
from ..errors import DimError, ExecutionError
from ..source import user_source_line
from ..tensor import Tensor
from ._core import as_tensor, check_has, emit, require_float, require_int
from .rnnt_kernels import rnnt_align_raw, rnnt_loss_raw

__all__ = ["rnnt_loss", "rnnt_align"]


def _lattice(op: str, scores, labels, blank: int, enc_time: Dim, prefix: Dim, axis: Dim):
    """The checked inputs: (scores, labels, the labels' dim, the batch dims)."""
    scores, labels = as_tensor(scores), as_tensor(labels)
    require_float(scores, op)
    require_int(labels, op)
    for name, d in (("enc_time", enc_time), ("prefix", prefix), ("axis", axis)):
        if not isinstance(d, Dim):
            raise DimError(f"{op}: {name} must be a Dim, got {d!r}")
    enc_time, prefix, axis = enc_time.canonical(), prefix.canonical(), axis.canonical()
    check_has(scores, (enc_time, prefix, axis), op)
    batch = tuple(d for d in scores.dims if d not in (enc_time, prefix, axis))
    own = [d for d in labels.dims if d not in batch]
    if len(own) != 1 or any(d not in labels.dims for d in batch):
        raise DimError(f"{op}: the labels {labels.describe()} must have the scores' batch dims "
                       f"{{{', '.join(d.name for d in batch)}}} and one dim of their own")
    label_dim = own[0]
    if prefix is not (label_dim + 1).canonical():
        raise DimError(f"{op}: the prefix dim {prefix.name!r} must be the labels' dim plus one "
                       f"({label_dim.name} + 1: prefixes of 0 to U labels), e.g. made by "
                       f"looplift.pad(labels, axis={label_dim.name}, left=1)")
    if not axis.is_static or not isinstance(blank, int) or isinstance(blank, bool) or not 0 <= blank < axis.size:
        raise DimError(f"{op}: blank must be an index of the vocabulary dim {axis.name!r}, got {blank!r}")
    if not enc_time.is_dynamic and not enc_time.is_static:
        raise DimError(f"{op}: enc_time {enc_time.name!r} must be a sequence dim")
    return scores, labels, label_dim, batch


def _raw_inputs(scores: Tensor, labels: Tensor, label_dim: Dim, batch: tuple, enc_time: Dim, prefix: Dim,
                axis: Dim, op: str):
    """A function ``(env, s, l) -> (scores (N, T, U1, V), labels (N, U), T lengths, U lengths, batch shape)``
    checking the labels and lengths at run time."""
    s_perm = tuple(scores.dims.index(d) for d in (*batch, enc_time, prefix, axis))
    l_perm = tuple(labels.dims.index(d) for d in (*batch, label_dim))
    t_al = aligner(_trace.length_dims(enc_time), batch) if enc_time.is_dynamic else None
    u_al = aligner(_trace.length_dims(label_dim), batch) if label_dim.is_dynamic else None
    where = f"{op} at {user_source_line()}"

    def prepare(env, s, lab, blank):
        shape = [env.size(d) for d in batch]
        s = s.permute(s_perm).reshape(-1, env.size(enc_time), env.size(prefix), env.size(axis))
        lab = lab.permute(l_perm).reshape(-1, env.size(label_dim))
        n = s.shape[0]
        t_len = (t_al(env.lengths(enc_time)).expand(*shape) if t_al is not None
                 else torch.full(shape, env.size(enc_time), device=s.device)).reshape(n)
        u_len = (u_al(env.lengths(label_dim)).expand(*shape) if u_al is not None
                 else torch.full(shape, env.size(label_dim), device=s.device)).reshape(n)
        if n and int(t_len.min()) < 1:
            raise ExecutionError(f"{where}: an entry has no frames along {enc_time.name!r} (T = 0): no path of "
                                 f"the lattice ends with a blank")
        inside = torch.arange(lab.shape[1], device=lab.device)[None, :] < u_len[:, None]
        bad = inside & ((lab == blank) | (lab < 0) | (lab >= env.size(axis)))
        if bool(bad.any()):
            entry, position = (int(i) for i in bad.nonzero()[0])
            raise ExecutionError(f"{where}: label {int(lab[entry, position])} at position {position} of "
                                 f"{label_dim.name!r} (entry {entry}) is the blank ({blank}) or not in "
                                 f"{axis.name!r} (0..{env.size(axis) - 1}): the labels are the non-blank symbols")
        lab = torch.where(inside, lab, torch.zeros_like(lab)).clamp(0, env.size(axis) - 1)
        return s, lab, t_len.to(s.device, torch.long), u_len.to(s.device, torch.long), shape

    return prepare


def rnnt_loss(scores, labels, *, blank: int, enc_time: Dim, prefix: Dim, axis: Dim,
              scores_are: Literal["logits", "log_probs"] = "logits") -> Tensor:
    """The RNN-T loss per sequence: minus the log of the sum over all alignments of `labels` to the frames.

    Args:
        scores: the joint's output over ``{batch dims..., enc_time, prefix, axis}``: at frame t after u labels,
            the logits (default) or log-probs (``scores_are="log_probs"``) of the next symbol over `axis`.
        labels: the label indices over ``{batch dims..., label dim}`` (blank is no label), where
            ``prefix`` is ``label dim + 1``.
        blank: the index of the blank in `axis`.

    Uses the lengths of `enc_time` (T, at least 1 per entry) and of the labels' dim (U, 0 allowed); values
    past them are never read. The result has the batch dims.
    """
    if scores_are not in ("logits", "log_probs"):
        raise DimError(f"rnnt_loss: scores_are is 'logits' or 'log_probs', got {scores_are!r}")
    scores, labels, label_dim, batch = _lattice("rnnt_loss", scores, labels, blank, enc_time, prefix, axis)
    prepare = _raw_inputs(scores, labels, label_dim, batch, enc_time.canonical(), prefix.canonical(),
                          axis.canonical(), "rnnt_loss")
    logits = scores_are == "logits"

    def kernel(env, s, lab):
        s, lab, t_len, u_len, shape = prepare(env, s, lab, blank)
        return rnnt_loss_raw(s, lab, t_len, u_len, blank=blank, logits=logits).reshape(shape)

    return emit("rnnt_loss", (scores, labels), kernel, batch, scores.dtype,
                attrs={"enc_time": enc_time.name, "prefix": prefix.name, "blank": blank})


def rnnt_align(scores, labels, *, blank: int, enc_time: Dim, prefix: Dim, axis: Dim,
               scores_are: Literal["logits", "log_probs"] = "logits", out_dim: Dim | None = None) -> Tensor:
    """The best alignment of `labels` to the frames (Viterbi, on the lattice of :func:`rnnt_loss`): the
    symbols per alignment step, labels and blanks, over a new dim (`out_dim`, default a new ``Dim("align")``)
    of T + U steps per entry (the last a blank), ``sparse_dim`` `axis`: the ``target`` of a transducer loop
    trained on a fixed alignment. Ties go to the blank."""
    if scores_are not in ("logits", "log_probs"):
        raise DimError(f"rnnt_align: scores_are is 'logits' or 'log_probs', got {scores_are!r}")
    scores, labels, label_dim, batch = _lattice("rnnt_align", scores, labels, blank, enc_time, prefix, axis)
    enc_time, prefix, axis = enc_time.canonical(), prefix.canonical(), axis.canonical()
    if out_dim is None:
        out_dim = Dim("align")
    if not out_dim.is_dynamic:
        raise DimError(f"rnnt_align: out_dim must be a dynamic dim, got {out_dim!r}")
    out_dim.set_length_dims([*_trace.current().stepped_dims, *batch])
    prepare = _raw_inputs(scores, labels, label_dim, batch, enc_time, prefix, axis, "rnnt_align")
    logits = scores_are == "logits"

    def kernel(env, s, lab):
        s, lab, t_len, u_len, shape = prepare(env, s, lab, blank)
        path = rnnt_align_raw(s.detach(), lab, t_len, u_len, blank=blank, logits=logits)
        env.sizes[out_dim] = path.shape[1]
        env.lengths_of[out_dim] = (t_len + u_len).reshape(shape)
        return path.reshape(*shape, path.shape[1])

    return emit("rnnt_align", (scores, labels), kernel, (*batch, out_dim), torch.int64, sparse_dim=axis,
                attrs={"enc_time": enc_time.name, "prefix": prefix.name, "blank": blank}, makes_dims=(out_dim,))


for _name in __all__:  # every public op records its calls, so passes can replay them
    globals()[_name] = _trace.replayable(globals()[_name])
