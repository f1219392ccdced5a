"""``cum_concat``: inside a loop, the history of a value up to the current step.

At step t of a loop over `T`, ``cum_concat(x)`` is x of steps 0..t stacked
along the history dim ``T.history()``, whose length is t + 1. Self-attention
over the past, written step by step::

    keys = ll.cum_concat(k_t)                     # {T_history, batch, key}
    weights = ll.softmax(ll.dot(q_t, keys, reduce=key), axis=keys_dim)

Over a whole sequence (its sequence rule, used when the loop optimizer moves
it out, or when called outside the loop with ``axis=T``), the result is x
itself with `T` renamed to the history dim, whose lengths run over `T`:
frame t sees a history of length t + 1, so reductions and softmax over the
history dim are causal (they mask by those lengths, which brings `T` in).
Nothing is copied.

In a beam search, the history follows the hypotheses: after each prune, the
frames kept so far are reordered by the source hypotheses (as the loop
reorders its states), so each hypothesis attends over its own past.
"""

from __future__ import annotations

import torch

from .. import rules as _rules
from .. import trace as _trace
from .._align import aligner
from ..dims import Dim
from ..errors import DimError, ExecutionError, TraceError
from ..tensor import Tensor
from ._core import as_tensor, dims_str, emit, nonfinite_padding
from .shape import expand, replace_dim

__all__ = ["cum_concat", "shift_in"]

#: In a search loop's run memory: (source hypotheses, their dims) of each prune so far, the last dim the
#: pruned beam (see :func:`note_sources`).
SOURCES = "search:sources"


def note_sources(env, src: torch.Tensor, dims: tuple[Dim, ...]) -> None:
    """Record a prune's source hypotheses `src` (over `dims`, the pruned beam last) in the loop run's memory,
    so histories (:func:`cum_concat`) follow the hypotheses."""
    env.scratch.setdefault(SOURCES, []).append((src, dims))


def cum_concat(x, *, axis: Dim | None = None) -> Tensor:
    """The history of `x` along the history dim of the loop over `axis` (default: the innermost loop)."""
    x = as_tensor(x)
    ctx = _trace.current()
    if axis is None:
        if not ctx.loops:
            raise TraceError("cum_concat without axis= is used inside a loop")
        axis = ctx.loops[-1].axis
    axis = axis.canonical()
    _trace.resolve_call(cum_concat, axis=axis)
    history = axis.history()
    if history in x.dims:
        raise DimError(f"cum_concat: the {x.describe()} already has the history dim {history.name!r}")
    if axis in ctx.stepped_dims:
        if axis in x.dims:
            raise DimError(f"cum_concat inside the loop over {axis.name!r}: the {x.describe()} has the loop's "
                           f"dim (use a frame, e.g. loop.unstack(x))")
        key = object()  # this node's history in the loop run's memory
        loop = next((lp for lp in reversed(ctx.loops) if lp.axis.canonical() is axis), None)
        pair = loop.beam_pair() if loop is not None else None
        beam = next((d for d in (pair or ()) if d in x.dims), None)
        if beam is not None:   # (a search: the history follows the hypotheses, over the loop's batch dims)
            missing = [d for d in loop.batch_dims() if d not in x.dims]
            if missing:
                x = expand(x, missing)
        follow = None if beam is None else _follower(x.dims, beam, after_prune=beam is pair[1], axis=axis)

        def kernel(env, v):
            history = env.scratch.get(key)
            if history is None:
                history = env.scratch[key] = _History()
            if follow is not None:
                follow(env, history)
            history.frames.append(v)
            return torch.stack(history.frames, 0)

        # (in a step, the history has no padding: all t + 1 frames are valid)
        return emit("cum_concat", (x,), kernel, (history,) + x.dims, x.dtype, sparse_dim=x.sparse_dim,
                    attrs={"axis": axis.name}, keeps_run_memory=True,
                    nonfinite_padding=nonfinite_padding(x, dims=(history,) + x.dims))
    if axis not in x.dims:
        x = expand(x, [axis])
    # x with `axis` renamed: the history dim's lengths run over `axis`, so frame t sees t + 1 frames
    return replace_dim(x, axis, history)


class _History:
    """One ``cum_concat``'s frames so far in a loop run, and how many prunes of a search they followed."""

    __slots__ = ("frames", "followed")

    def __init__(self):
        self.frames: list = []
        self.followed = 0


def _follower(dims: tuple[Dim, ...], beam: Dim, *, after_prune: bool, axis: Dim):
    """``follow(env, history)``: the `history`'s frames (each over `dims`, a search's beam among them)
    reordered by the source hypotheses of the prunes it has not followed yet: those of the steps before this
    one, and this step's own if the frames are over the pruned beam (`after_prune`)."""
    pos = dims.index(beam)

    def follow(env, history: _History) -> None:
        sources = env.scratch.get(SOURCES, ())
        frames = history.frames
        target = len(sources) if after_prune else env.step(axis)
        for src, src_dims in sources[history.followed:target]:
            src_dims = src_dims[:-1] + (beam,)
            if any(d not in dims for d in src_dims):
                raise ExecutionError(f"cum_concat in a search: the history over {dims_str(dims)} lacks dims of "
                                     f"the hypotheses' sources {dims_str(src_dims)}")
            index = aligner(src_dims, dims)(src)
            for i, f in enumerate(frames):
                shape = [n if k != pos else index.shape[pos] for k, n in enumerate(f.shape)]
                frames[i] = f.gather(pos, index.expand(shape))
        history.followed = max(history.followed, target)

    return follow


cum_concat = _trace.replayable(cum_concat)
_rules.sequence_rule(cum_concat, "cum_concat as the whole sequence with a causal history dim")


def shift_in(window, frame, *, axis: Dim) -> Tensor:
    """`window` (over the static dim `axis`) with its first frame dropped and `frame` appended.

    Kept as a loop state, the window holds the last N frames::

        loop.state.win = ll.zeros([W, feat])             # N = W.size frames
        with loop:
            loop.state.win = ll.shift_in(loop.state.win, loop.unstack(x), axis=W)

    Its sequence form (used when the loop optimizer moves it out) is a
    windowing of the whole sequence: frame t sees frames t - N + 1 .. t, the
    initial window's frames before the start.
    """
    window, frame = as_tensor(window), as_tensor(frame)
    axis = axis.canonical()
    if axis not in window.dims or not axis.is_static:
        raise DimError(f"shift_in: the window {window.describe()} must have the static dim {axis.name!r}")
    extra = [d for d in frame.dims if d not in window.dims]
    if axis in frame.dims or extra:
        raise DimError(f"shift_in: the frame {frame.describe()} must have the window's dims but {axis.name!r}; "
                       f"it has {[d.name for d in extra] or [axis.name]} besides")
    pos = window.dims.index(axis)
    frame_layout = tuple(d for d in window.dims if d is not axis)
    from .._align import aligner
    frame_al = aligner(frame.dims, frame_layout)
    n = axis.size

    def kernel(env, w, f):
        f = frame_al(torch.as_tensor(f, dtype=w.dtype, device=w.device))
        f = f.expand(*[s for i, s in enumerate(w.shape) if i != pos]).unsqueeze(pos)
        return torch.cat([w.narrow(pos, 1, n - 1), f.to(w.dtype)], pos)

    return emit("shift_in", (window, frame), kernel, window.dims, window.dtype, attrs={"axis": axis.name})


def _windows(initial: Tensor, frames: Tensor, *, axis: Dim, over: Dim) -> Tensor:
    """Frame t of `frames` over `over` with the N - 1 frames before it: a window over `axis` per frame,
    the `initial` window's frames before the start (the sequence rule of :func:`shift_in`)."""
    from .._align import aligner
    from .shape import expand
    initial, frames = as_tensor(initial), as_tensor(frames)
    missing = [d for d in initial.dims if d is not axis and d not in frames.dims]
    if missing:
        frames = expand(frames, missing)
    layout = tuple(over if d is axis else d for d in initial.dims)
    pos = initial.dims.index(axis)
    extra = [d for d in frames.dims if d not in layout]
    if extra:
        raise DimError(f"shift_in over a sequence: the frames have dims {[d.name for d in extra]} "
                       f"the window lacks")
    frames_al = aligner(frames.dims, layout)
    n = axis.size

    def kernel(env, w, f):
        f = frames_al(f)
        shape = list(w.shape)
        shape[pos] = f.shape[pos]
        steps = f.shape[pos]
        joined = torch.cat([w, f.expand(shape).to(w.dtype)], pos)
        return joined.unfold(pos, n, 1).narrow(pos, 1, steps)

    return emit("windows", (initial, frames), kernel, layout + (axis,), initial.dtype,
                attrs={"axis": axis.name, "over": over.name})


def _shift_in_over_sequence(args: dict, carried: str, axis: Dim):
    return [_windows(args["window"], args["frame"], axis=args["axis"], over=axis)], [None]


shift_in = _trace.replayable(shift_in)
_rules.sequence_form(shift_in, _rules.SequenceForm(
    carried=("window",), sequences=(True,), run=_shift_in_over_sequence,
    name="window of the last frames as a windowing of the sequence"))
