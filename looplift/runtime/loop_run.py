"""Running a loop node: its body step by step, with the per-entry bookkeeping of the loop's semantics.

This is the literal semantics of :class:`looplift.regions.LoopSpec`, for both
the reference interpreter and the executor (they differ only in how they run
the body: node by node, or with a prepared executor; see `runner`). Per step:

* the body runs on the captured values and the states (frame t of the
  step's environment: ``env.step(axis) == t``);
* an entry that has ended (past its length along the axis, or by the end
  condition) keeps its states frozen; its stacked frames beyond its length
  are padding;
* a search whose beam changes its size per step runs each step as wide as
  the previous step's prune kept;
* a loop that makes its own dim stops when every entry ended, and gives the
  dim its size and lengths; ``max_seq_len`` stops a search, and is an error
  for any other loop that reaches it with entries not yet ended;
* the executor's steps leave out the entries that ended, where no step reads
  one entry for another (:mod:`looplift.runtime.compact`); the reference
  interpreter's run every entry;
* the executor gives each step its frame of a sequence that the body reads
  only by its frames, split once per run (:attr:`LoopRun.frame_inputs`); the
  reference interpreter selects the frame in the step;
* a compiled step whose steps need no Python between them (no end
  condition, no beam, no dims made per step) runs several steps per
  compiled call after the first (:meth:`LoopRun._chunk_of`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .._align import aligner
from ..dims import Dim
from ..errors import ExecutionError
from ..graph import Graph, Op
from ..regions import LoopSpec, first_step_on_one_slot, is_history_of
from ..tensor import Tensor
from . import compact as _compact

__all__ = ["LoopRun", "Runner"]

#: A leading dim of steps, for aligning the masks of all of a run's steps at once
_STEPS = Dim("steps")

#: ``runner(graph, inputs, outputs)`` -> ``run(env, raws) -> raw outputs``: how a region's graph is run
Runner = Callable[[Graph, Sequence[Tensor], Sequence[Tensor]], Callable]


class LoopRun:
    """The kernel of one loop node: ``run(env, *captured, *initial_states[, max_len])``; `compact`: leave the
    entries that ended out of the steps where that changes no result (:mod:`looplift.runtime.compact`), and
    give the steps their frames of sequences split once per run (False: the reference interpreter's literal
    steps)."""

    def __init__(self, spec: LoopSpec, runner: Runner, *, compact: bool = True):
        self.spec = spec
        self.runner = runner
        #: per captured sequence that the body reads only by its frames (``loop.unstack``): its position among
        #: the captured values, the position of the loop's axis in it, and the unstack's result. The executor
        #: splits it into its frames once per run and gives each step its frame (the body's graph fed the
        #: unstack's result).
        #: Selecting frame t in the step would make its gradient a zero sequence holding the frame's, per step:
        #: quadratic in the steps. The reference interpreter selects, literally.
        self.frame_inputs = _frame_inputs(spec) if compact else []
        split = {i: u for i, _, u in self.frame_inputs}
        self.body_inputs = [split.get(i, c) for i, c in enumerate(spec.captured)] + list(spec.placeholders)
        length_dims = spec.length_dims
        self.axis_lengths = None
        if spec.axis.is_dynamic and not spec.own_dim:
            self.axis_lengths = aligner(spec.axis_length_dims, length_dims)
        self.end_align = aligner(spec.end.dims, length_dims) if spec.end is not None else None
        self.max_align = aligner(spec.max_len.dims, length_dims) if isinstance(spec.max_len, Tensor) else None
        # `active` (over the length dims) as each state and each loop.last value is laid out: one aligner per
        # distinct layout, for one step or (after a leading dim of steps) for all steps of a run at once
        layouts = list(dict.fromkeys(v.dims for v in spec.placeholders + spec.lasts))
        self.state_layout = [layouts.index(p.dims) for p in spec.placeholders]
        self.last_layout = [layouts.index(v.dims) for v in spec.lasts]
        self.layout_align = [aligner(length_dims, dims) for dims in layouts]
        self.layout_align_all = [aligner((_STEPS,) + tuple(length_dims), (_STEPS,) + dims) for dims in layouts]
        src = _frame_source(spec) if self.axis_lengths is not None else None
        #: (the captured sequence, the position of the loop's axis in it, its aligner to (axis, length dims))
        self.cond_seq = None if src is None else (
            src, src.dims.index(spec.axis), aligner((spec.axis,) + spec.end.dims, (spec.axis,) + tuple(length_dims)))
        beam = spec.beam[0] if spec.beam is not None else None
        #: per state, the position of a changing beam in it (None: it has none)
        self.beam_pos = [p.dims.index(beam) if beam is not None and beam in p.dims else None
                         for p in spec.placeholders]
        # per-entry bookkeeping only where something depends on it
        self.track = spec.freeze or bool(spec.lasts) or spec.end is not None or spec.own_dim
        #: whether a step makes dims (inner loops that end per entry, compresses): their sizes are collected
        self.makes_dims = any(node.makes_dims or node.region is not None for node in spec.body.nodes)
        # a loop over an axis that ends no entry before its length, whose final states nobody reads: entries
        # past their length give only padding frames, so no state need be frozen
        self.never_freeze = not spec.freeze or (spec.end is None and not spec.freeze_past_length
                                                and not spec.own_dim)
        #: how the steps leave out the entries that ended (None: they run every entry to the end)
        self.compact = _compact.plan(spec) if compact else None
        #: a compiled step runs this many steps at a time as one compiled function, where nothing between steps
        #: needs Python (:meth:`_chunk_of`; 1: one at a time). Set by :meth:`Executor.compile`.
        self.chunk_steps = 1
        self._chunks: dict = {}
        #: whether nothing between two steps needs Python: a loop over an axis without an end condition, a
        #: changing beam, ``loop.last`` values or dims made per step (the condition for :meth:`_chunk_of`)
        self.chunkable = not (spec.own_dim or spec.end is not None or spec.beam is not None or spec.lasts
                              or self.makes_dims)
        #: a search with a fixed beam, optimized: its first step runs on the first slot (the others repeat it
        #: and are invalid) where that is exact; the position of the beam in each captured value and state
        first = spec.fixed_beam if compact and first_step_on_one_slot(spec) else None
        self.first_slot = None if first is None else (
            first, [v.dims.index(first) if first in v.dims else None for v in spec.captured + spec.placeholders])

    @torch.compiler.disable   # (traced by torch.compile, the loop would be unrolled: compiled anew per length)
    def __call__(self, env, *raws):
        spec = self.spec
        axis = spec.axis
        nc, ns = len(spec.captured), len(spec.placeholders)
        captured, state = list(raws[:nc]), list(raws[nc:nc + ns])
        max_len = raws[nc + ns] if self.max_align is not None else spec.max_len
        stacks, lasts = spec.stacks, spec.lasts
        outputs = spec.new_states + stacks + lasts + ([spec.end] if spec.end is not None else [])
        run_body = self.runner(spec.body, self.body_inputs, outputs)
        # a compiled body runs its first step with each outer environment eagerly: that step makes what the
        # environment keeps for the later steps (masks), which compiled steps then only read
        run_first = getattr(run_body, "eager", run_body) if getattr(run_body, "compiled", False) else run_body
        outer = None

        n_steps = None if spec.own_dim else env.size(axis)
        axis_len = None
        if self.axis_lengths is not None:
            axis_len = self.axis_lengths(env.lengths(axis))
            n_steps = min(n_steps, int(axis_len.max())) if axis_len.numel() else 0
        # (an end condition computed before the loop that ends no entry before its length: nothing to track)
        untracked = axis_len is not None and self._ends_only_at_length(captured, axis_len, n_steps)
        track = self.track and not untracked
        alive = None        # entries that have not ended (by loop.end), over length_dims
        counted = None      # steps counted per entry
        frames: list[list] = [[] for _ in stacks]
        last_vals: list = [None] * len(lasts)
        inner: dict[Dim, list] = {}
        scratch: dict = {}  # what ops accumulate over this run's steps (cum_concat)
        width = env.size(spec.beam[0]) if spec.beam is not None else None   # (the beam's, this step)
        rows = _compact.Rows(self.compact, env)
        limit = None if max_len is None or not spec.own_dim else (
            self.max_align(max_len) if self.max_align is not None else max_len)
        # per step, `active` laid out as each state and last (None: every entry runs): for a loop over an axis
        # without an end condition, made for all steps at once before the first
        masks_at = None
        if axis_len is not None and track and spec.end is None:
            masks_at = self._masks_of_steps(axis_len, n_steps)
        split_seqs = [(i, captured[i].unbind(pos)) for i, pos, _ in self.frame_inputs]
        # a compiled step over an axis whose steps need no per-entry bookkeeping between them: after the first,
        # `chunk_steps` steps at a time as one compiled function (see :meth:`_chunk_of`)
        chunk = self._chunk_of(run_body) if self.chunkable and run_first is not run_body else None
        t = 0
        while n_steps is None or t < n_steps:
            if chunk is not None and rows.step_env is outer and n_steps - t >= self.chunk_steps:
                run = range(t, t + self.chunk_steps)
                envs = [rows.step_env.child(self._steps_at(u), scratch) for u in run]
                inputs = [self._step_captured(captured, split_seqs, u) for u in run]
                masks = None if masks_at is None or self.never_freeze else [masks_at[u] for u in run]
                state, outs = chunk(envs, inputs, [_unviewed(v) for v in state], masks)
                for per_step in outs:
                    for k, v in enumerate(per_step):
                        frames[k].append(v)
                t += self.chunk_steps
                continue
            if spec.own_dim:
                if alive is not None and not bool(alive.any()):
                    break   # (a loop over an axis runs all its frames: they are stacked, its ended entries frozen)
                if limit is not None:
                    alive, stop = self._at_max_len(rows.step_env, t, max_len, rows.per_entry(limit), alive)
                    if stop:
                        break
                if rows.worth_cutting(alive, scratch, inner):
                    alive, state, captured = rows.cut(alive, state, captured)
            step_env = rows.step_env.child(self._steps_at(t), scratch)
            if width is not None:
                step_env.sizes[spec.beam[0]] = width
            step_captured = self._step_captured(captured, split_seqs, t)
            if rows.step_env is outer:
                results = run_body(step_env, step_captured + state)
            else:
                inputs = step_captured + state
                if t == 0 and self.first_slot is not None:
                    inputs = self._first_slot(step_env, inputs)
                results = run_first(step_env, inputs)
                if run_first is not run_body:
                    rows.step_env.mark_dynamic()   # (what the compiled steps read of it: any size)
                outer = rows.step_env
            new_state = results[:ns]
            if width is not None:
                width = step_env.sizes.get(spec.beam[1], width)
                state = [_to_width(old, new, pos) for old, new, pos in zip(state, new_state, self.beam_pos)]
            active = None if axis_len is None or not track or masks_at is not None else (t < axis_len)
            if spec.end is not None and not untracked:
                cond = self.end_align(torch.as_tensor(results[-1], device=env.device))  # may be a Python bool
                if alive is None:
                    alive = torch.ones([step_env.size(d) for d in spec.length_dims], dtype=torch.bool,
                                       device=env.device)
                if active is not None:
                    alive = alive & active
                step_counts = alive if spec.include_eos else alive & ~cond
                alive = alive & ~cond
                active = step_counts
            if masks_at is not None:
                masks = masks_at[t]
            elif active is None or (isinstance(active, torch.Tensor) and active.device.type == "cpu"
                                    and bool(active.all())):
                masks = None   # (every entry active: nothing to keep frozen)
            else:
                masks = [al(active) for al in self.layout_align]
            state = new_state if self.never_freeze else self._next_states(env, state, new_state, masks)
            if active is not None and spec.own_dim:
                steps = rows.widen_counts(active.long())
                counted = steps if counted is None else counted + steps
            for k, v in enumerate(results[ns:ns + len(stacks)]):
                frames[k].append(v if rows.index is None else rows.widen_frame(k, v))
            if lasts:
                self._keep_lasts(env, results[ns + len(stacks):ns + len(stacks) + len(lasts)], masks, last_vals)
            if self.makes_dims:
                _collect_inner_dims(step_env, axis, inner)
            t += 1
        state = rows.put_back(state)
        if chunk is not None:   # (as the chunks leave them: code compiled around the loop reads them alike)
            state = [_unviewed(v) for v in state]
        if width is not None:
            env.sizes[spec.beam[0]] = width   # (the final states' beam)
        self._set_dims(env, t, counted, inner)
        size = env.size(axis)
        stacked = [_stack_frames(fr, size, env.device, value.dtype, [_size_or_zero(env, d) for d in value.dims])
                   for value, fr in zip(stacks, frames)]
        finals = [v if v is not None else torch.zeros([_size_or_zero(env, d) for d in value.dims],
                                                      dtype=value.dtype, device=env.device)
                  for value, v in zip(lasts, last_vals)]
        result = tuple(state + stacked + finals)
        return result[0] if len(result) == 1 else result

    def _steps_at(self, t: int) -> dict:
        """The steps of step `t`'s environment: the loop's axis (and the dim it also steps) at `t`."""
        axis, also = self.spec.axis, self.spec.also_steps
        return {axis: t} if also is None else {axis: t, also: t}

    @staticmethod
    def _step_captured(captured: list, split_seqs: list, t: int) -> list:
        """The captured values of step `t`: each sequence split into its frames (`split_seqs`) given as frame t."""
        if not split_seqs:
            return captured
        step_captured = list(captured)
        for i, seq in split_seqs:
            step_captured[i] = seq[t]
        return step_captured

    def _chunk_of(self, run_body):
        """``chunk(envs, inputs, states, masks) -> (states, per step: stacked frames)``: `chunk_steps` steps of
        the compiled step `run_body` (an :class:`~looplift.runtime.executor.Executor`), its generated code run
        once per step with the states kept frozen for the entries not active at each (`masks`: per step, as
        :meth:`_next_states` takes them; None: every entry active), compiled as one function with the step's
        backend and dynamic sizes (as the step is: a new length does not compile again). None where
        `chunk_steps` is below 2 or the step is not an executor compiled here.

        A compiled call costs its wrappers (guards, autograd's function, the backward's own call) once per
        call: per step, they cost more than the step's small kernels save; and steps compiled together fuse
        across their boundaries, forward and backward. The steps are the same kernels in the same order, so
        the values are the step-by-step ones but for the rounding of fused kernels."""
        backend = getattr(run_body, "backend", None)
        if self.chunk_steps < 2 or backend is None:
            return None
        key = (id(run_body), self.chunk_steps)
        found = self._chunks.get(key)
        if found is not None and found[0] is run_body:
            return found[1]
        body, ns, n_stacks = run_body.function, len(self.spec.placeholders), len(self.spec.stacks)
        next_states = self._next_states

        def run_steps(step, envs, inputs, state, masks):
            outs = []
            for k in range(len(envs)):   # (unrolled where it is compiled)
                results = step(envs[k], inputs[k] + state)
                new_state = results[:ns]
                state = new_state if masks is None else next_states(envs[k], state, new_state, masks[k])
                outs.append(results[ns:ns + n_stacks])
            return state, outs

        def chunk(envs, inputs, state, masks):
            return run_steps(body, envs, inputs, state, masks)

        compiled = _without_duck_shapes(torch.compile(chunk, backend=backend, dynamic=True))

        def run(envs, inputs, state, masks):
            try:
                return compiled(envs, inputs, state, masks)
            except Exception:
                # (compiled code names no node: the same steps run eagerly name the one that fails, if any)
                run_steps(run_body.eager, envs, inputs, state, masks)
                raise

        self._chunks[key] = (run_body, run)
        return run

    def _first_slot(self, step_env, raws: list) -> list:
        """The first step's inputs on the beam's first slot, the beam one wide in `step_env`: at the start every
        hypothesis is the first one repeated, and only it is valid (the prune pads the next beam to its size;
        the states after the step are over it)."""
        beam, positions = self.first_slot
        step_env.sizes[beam] = 1
        return [v.narrow(pos, 0, 1) if pos is not None and isinstance(v, torch.Tensor) and v.shape[pos] > 1 else v
                for v, pos in zip(raws, positions)]

    def _ends_only_at_length(self, captured: list, axis_len: torch.Tensor, n_steps: int) -> bool:
        """Whether the loop can run without per-entry bookkeeping: a loop over an axis whose end condition
        is a frame of a sequence computed before it, where no entry ends before its last frame (so no state
        is ever frozen within an entry's length), and nothing past an entry's length is kept frozen."""
        spec = self.spec
        if spec.own_dim or spec.lasts or (spec.freeze and spec.freeze_past_length):
            return False
        if self.cond_seq is None:
            return False
        src, pos, align = self.cond_seq
        seq = captured[next(i for i, c in enumerate(spec.captured) if c is src)]
        if not isinstance(seq, torch.Tensor) or seq.dtype != torch.bool:
            return False
        cond = align(seq.movedim(pos, 0)[:n_steps])
        steps = torch.arange(cond.shape[0], device=cond.device).view(-1, *([1] * (cond.dim() - 1)))
        inside = steps < axis_len
        hit = (cond & inside).long()
        frozen = (hit.cumsum(0) - hit) > 0   # (a step after the entry's end)
        if not spec.include_eos:
            frozen = frozen | hit.bool()        # (the ending step itself does not count)
        return not bool((frozen & inside).any())

    def _at_max_len(self, env, t: int, max_len, limit, alive):
        """Before step `t` of a loop that makes its own dim, whose max_seq_len is `max_len` (`limit`: per entry
        run, aligned): ``(alive, stop)``. A search ends an entry at its max_seq_len (its hypotheses cut there);
        any other loop reaching it with live entries is an error."""
        spec = self.spec
        over = t >= limit
        if spec.stop_at_max_len:
            if not isinstance(over, torch.Tensor):
                return alive, over
            if alive is None:
                alive = torch.ones([env.size(d) for d in spec.length_dims], dtype=torch.bool, device=env.device)
            alive = alive & ~over
            return alive, not bool(alive.any())
        if isinstance(over, torch.Tensor):
            over = bool((over & (alive if alive is not None else True)).any())
        if over:
            err = ExecutionError(
                f"the loop at {spec.source} ran past max_seq_len ({_describe_max(max_len)}) "
                f"with entries not yet ended; raise max_seq_len or check the loop.end condition")
            err.node = spec.node  # the error names its line already
            raise err
        return alive, False

    def _masks_of_steps(self, axis_len: torch.Tensor, n_steps: int) -> list[list[torch.Tensor]]:
        """Per step of a loop over an axis, which entries are within their length (``t < axis_len``), laid out
        as each state and last: made for all steps at once, so a step only picks its own (a view)."""
        steps = torch.arange(n_steps, device=axis_len.device).view(-1, *[1] * axis_len.dim())
        inside = steps < axis_len.unsqueeze(0)
        per_layout = [al(inside).unbind(0) for al in self.layout_align_all]
        return [list(masks) for masks in zip(*per_layout)] if per_layout else [[] for _ in range(n_steps)]

    def _next_states(self, env, state: list, new_state: list, masks) -> list:
        """The states for the next step: the new ones, but the old ones for entries not active (frozen);
        `masks`: the active entries laid out as each state (None: every entry is active)."""
        if masks is None:
            return new_state
        return [torch.where(masks[k], new, old) if type(new) is torch.Tensor and type(old) is torch.Tensor
                else torch.where(masks[k], _raw(new, p.dtype, env), _raw(old, p.dtype, env))
                for k, new, old, p in zip(self.state_layout, new_state, state, self.spec.placeholders)]

    def _keep_lasts(self, env, values, masks, last_vals: list) -> None:
        """Update each ``loop.last`` value with this step's, for the entries active at it (`masks`: laid out as
        each value; None: every entry is active)."""
        for k, v in enumerate(values):
            v = _raw(v, self.spec.lasts[k].dtype, env)
            if masks is None:
                last_vals[k] = v
                continue
            active = masks[self.last_layout[k]]
            last_vals[k] = torch.where(active, v, torch.zeros_like(v) if last_vals[k] is None else last_vals[k])

    def _set_dims(self, env, n_run: int, counted, inner: dict) -> None:
        """After `n_run` steps: the sizes and lengths of the dims the loop makes (its own dim, the dims inner
        loops made per step)."""
        spec, axis = self.spec, self.spec.axis
        if spec.own_dim:
            env.sizes[axis] = n_run
            if counted is None:
                counted = torch.full([env.size(d) for d in spec.length_dims], n_run, dtype=torch.int64,
                                     device=env.device)
            env.lengths_of[axis] = counted
        for d, per_step in inner.items():
            sizes = [s for s, _ in per_step]
            env.sizes[d] = max(sizes) if sizes else 0
            # padded to the loop's size (the steps not run, beyond every entry's length, have length 0)
            env.lengths_of[d] = _stack_frames([n for _, n in per_step], env.size(axis), env.device, torch.int64)
        if n_run == 0:
            # no step ran: the dims the body creates (inner loops' own dims, varying along `axis`) are empty
            for value in spec.stacks + spec.lasts:
                for d in value.dims:
                    if d.is_dynamic and d.origin is None and axis in d.length_dims and not env.knows_lengths(d):
                        env.sizes[d] = 0
                        env.lengths_of[d] = torch.zeros([env.size(e) for e in env.length_dims(d)],
                                                        dtype=torch.int64, device=env.device)


def _unviewed(v):
    """`v`, or a copy of it where it is a view of another tensor: compiled code guards on the layout of the
    tensor a view is of, so a step given views (from an eager step) and later not (from a compiled one)
    would compile twice."""
    return v.clone() if isinstance(v, torch.Tensor) and v._base is not None else v


def _to_width(old, new, pos: int | None):
    """The state `old` cut or widened to the beam of `new` (at `pos`), for keeping entries that ended: their
    hypotheses are the first slots of both (a prune keeps them all), the slots beyond are `new`'s (empty)."""
    if pos is None or not isinstance(old, torch.Tensor) or not isinstance(new, torch.Tensor):
        return old
    have, want = old.shape[pos], new.shape[pos]
    if have > want:
        return old.narrow(pos, 0, want)
    if have < want:
        return torch.cat([old, new.narrow(pos, have, want - have)], pos)
    return old


def _frame_inputs(spec: LoopSpec) -> list[tuple[int, int, Tensor]]:
    """Per captured sequence of the loop over an axis `spec` that one ``unstack`` alone reads in the body (and
    is no output of it), without cutting a history dim: its position among the captured values, the
    position of the loop's axis in it, and the unstack's result (see :attr:`LoopRun.frame_inputs`)."""
    if spec.own_dim:
        return []
    readers: dict[int, list] = {}
    for node in spec.body.nodes:
        for t in node.inputs:
            readers.setdefault(id(t), []).append(node)
    outputs = {id(t) for t in spec.new_states + spec.stacks + spec.lasts + [spec.end]}
    found = []
    for i, c in enumerate(spec.captured):
        nodes = readers.get(id(c), [])
        if len(nodes) != 1 or nodes[0].op != Op.UNSTACK or id(c) in outputs:
            continue
        at = [k for k, d in enumerate(c.dims) if d is spec.axis]
        frame = nodes[0].outputs[0]
        if len(at) == 1 and frame.dims == c.dims[:at[0]] + c.dims[at[0] + 1:] and not any(
                is_history_of(d, spec.axis.canonical()) for d in frame.dims):
            found.append((i, at[0], frame))
    return found


def _frame_source(spec: LoopSpec) -> Tensor | None:
    """The captured sequence whose frame is the loop's end condition (a condition computed before the loop,
    over the loop's axis), or None."""
    end = spec.end
    node = end.node if end is not None else None
    if node is None or node.op != "unstack" or not any(node.inputs[0] is c for c in spec.captured):
        return None
    src = node.inputs[0]
    if len(src.dims) != len(end.dims) + 1 or any(d.origin is not None and d.origin[0] == "history" for d in end.dims):
        return None
    return src


def _raw(v, dtype: torch.dtype, env):
    """The raw value `v` as a torch tensor; a Python number (a constant) of the value's `dtype`, not torch's
    default (float32 would lose the precision of a float64 program)."""
    return v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=dtype, device=env.device)


def _size_or_zero(env, d: Dim) -> int:
    try:
        return env.size(d)
    except ExecutionError:
        return 0


def _describe_max(max_len) -> str:
    if isinstance(max_len, torch.Tensor):
        return f"per entry, up to {int(max_len.max()) if max_len.numel() else 0}"
    return str(max_len)


def _collect_inner_dims(step_env, axis: Dim, inner: dict) -> None:
    """Sizes and lengths of dims created in this step (by inner loops) whose lengths vary along `axis`."""
    for d, n in step_env.lengths_of.items():
        # Dims whose lengths come from outside the loop (inputs, e.g. words over (batch, sent)) only were
        # cached here, selected at this step: their lengths are known already, over all steps.
        if step_env.parent is not None and step_env.parent.knows_lengths(d):
            continue
        if d.origin is None and axis in d.length_dims and d in step_env.sizes:
            inner.setdefault(d, []).append((step_env.sizes[d], n))


def _stack_frames(frames: list, size: int, device, dtype, frame_shape: list[int] | None = None):
    """Stack per-step raw values along a new first axis of `size` (padding with zeros), padding
    frames of different shapes (dims created per step) to the largest."""
    if not frames:
        return torch.zeros([size] + list(frame_shape or []), dtype=dtype, device=device)
    frames = [f if isinstance(f, torch.Tensor) else torch.tensor(f, dtype=dtype, device=device) for f in frames]
    shape = [max(s) for s in zip(*(f.shape for f in frames))] if frames[0].dim() else []
    padded = []
    for f in frames:
        if list(f.shape) != shape:
            pad = []
            for have, want in reversed(list(zip(f.shape, shape))):
                pad += [0, want - have]
            f = F.pad(f, pad)
        padded.append(f)
    out = torch.stack(padded, 0)
    if size > out.shape[0]:
        out = torch.cat([out, out.new_zeros((size - out.shape[0],) + out.shape[1:])], 0)
    return out



@contextlib.contextmanager
def without_duck_shapes():
    """Within: ``torch.compile`` never takes two sizes to be one symbol because they are equal when it compiles
    (torch's "duck shapes": a batch of 5 entries and a static dim of 5 would be one, and the first batch of
    another size would compile again). Dynamo compiles on a call, so compiled code is called within this for
    its first calls (the first step with each kind of input)."""
    from torch.fx.experimental import _config as fx_config

    old = fx_config.use_duck_shape
    fx_config.use_duck_shape = False
    try:
        yield
    finally:
        fx_config.use_duck_shape = old


def _without_duck_shapes(compiled, calls: int = 3):
    """`compiled`, its first `calls` calls :func:`without_duck_shapes`."""
    left = [calls]

    def run(*args):
        if left[0] <= 0:
            return compiled(*args)
        left[0] -= 1
        with without_duck_shapes():
            return compiled(*args)

    return run
