"""``compile`` and ``Program``: trace a model once, run it on torch tensors.

``looplift.compile(model, mode=...)`` returns a :class:`Program`. Calling the
program with :class:`~looplift.Named` tensors traces the model with symbolic
inputs of the same dims (once per distinct signature: dims, dtypes, the other
arguments), then runs the traced graph on the real tensors. Arguments that are
not ``Named`` (dims, numbers, strings, None) are passed to the model as they
are and are part of the signature. Outputs come back as ``Named`` tensors
(with the lengths of their dynamic dims) in the structure the model returned;
autograd flows through them into the model's parameters.

Why trace lazily, on the first call: the dims of the inputs are known only
from the data, and a model is typically called with a few signatures (train
batches, a different search setup). ``Program.trace`` traces ahead of time,
from ``Named`` or :class:`Spec` arguments.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import graph as _graph
from . import trace as _trace
from ._tree import flatten, unflatten
from .dims import Dim
from .errors import ArgumentError, InputError, ModeError, TraceError, entry_methods, entry_point
from .passes.explain import explain as explain_reports
from .passes.explain import to_dot as loops_to_dot
from .passes.move_out import Optimized
from .passes.move_out import optimize as optimize_loops
from .runtime.env import Env
from .runtime.executor import Executor
from .runtime.export import to_fx
from .runtime.named import Named
from .runtime.reference import run_reference
from .source import user_source_line
from .tensor import Tensor

__all__ = ["compile", "Program", "Spec", "Trace"]

MODES = ("train", "eval", "search")
_MAX_TRACE_ATTEMPTS = 8


@dataclass(frozen=True)
class Spec:
    """The dims, dtype and sparse dim of a program input, to trace without data."""

    dims: tuple[Dim, ...]
    dtype: torch.dtype = torch.float32
    sparse_dim: Dim | None = None

    def __init__(self, dims: Sequence[Dim], dtype: torch.dtype = torch.float32, sparse_dim: Dim | None = None):
        if isinstance(dims, Dim) or not all(isinstance(d, Dim) for d in dims):
            raise ArgumentError(f"Spec: dims must be a sequence of looplift.Dim, got {dims!r}")
        if not isinstance(dtype, torch.dtype):
            raise ArgumentError(f"Spec: dtype must be a torch.dtype, got {dtype!r}")
        object.__setattr__(self, "dims", tuple(dims))
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "sparse_dim", sparse_dim)


def _is_input(x) -> bool:
    return isinstance(x, (Named, Spec))


def _spec_of(x: Named | Spec) -> Spec:
    if isinstance(x, Spec):
        return x
    return Spec(x.dims, x.tensor.dtype, x.sparse_dim)


class Trace:
    """One traced signature of a program: the graph and its prepared executor."""

    def __init__(self, graph: _graph.Graph, inputs: list[Tensor], out_spec, out_leaves: list, start: float, *,
                 optimized: Optimized | None = None, label_inputs: dict | None = None, backend=None,
                 steps_per_call: int = 1):
        #: The graph as traced (what the reference interpreter runs).
        self.graph = graph
        self.inputs = inputs
        self.out_spec = out_spec
        self.out_leaves = out_leaves
        self.out_tensors = [x for x in out_leaves if isinstance(x, Tensor)]
        #: Inputs (by argument position) without a sparse_dim that index a vocabulary: (vocabulary, op)
        self.label_inputs = label_inputs or {}
        #: The graph after the loop optimizer (None when compiled with ``optimize=False``).
        self.optimized = optimized
        if optimized is not None:
            self.executor = Executor(optimized.graph, optimized.inputs, optimized.outputs)
        else:
            self.executor = Executor(graph, inputs, self.out_tensors)
        if backend is not None:
            self.executor.compile(backend, steps_per_call=steps_per_call)
        #: Wall time of tracing, optimizing and preparing, in seconds.
        self.seconds = time.perf_counter() - start

    @property
    def num_nodes(self) -> int:
        """Nodes executed per call."""
        return self.executor.num_nodes


class Program:
    """A traced model: call it with :class:`~looplift.Named` tensors. See :func:`compile`."""

    def __init__(self, fn: Callable, mode: str, *, root: torch.nn.Module | None, optimize: bool = True,
                 backend=None, steps_per_call: int = 1):
        self.fn = fn
        self.mode = mode
        self.root = root
        self.optimize = optimize
        self.backend = backend
        self.steps_per_call = steps_per_call
        self._traces: dict[Any, Trace] = {}

    # -- tracing -------------------------------------------------------------------------

    def _float_dtype(self, leaves: list) -> torch.dtype:
        """The dtype of new float values: the model's parameters', else the first float input's."""
        param = self._first_float_param()
        if param is not None:
            return param.dtype
        for x in leaves:
            if _is_input(x) and _spec_of(x).dtype.is_floating_point:
                return _spec_of(x).dtype
        return torch.get_default_dtype()

    def _first_float_param(self) -> torch.nn.Parameter | None:
        if self.root is None:
            return None
        return next((p for p in self.root.parameters() if p.is_floating_point()), None)

    def _key(self, leaves: list, spec) -> Any:
        parts = []
        for x in leaves:
            if _is_input(x):
                s = _spec_of(x)
                parts.append(("input", s.dims, s.dtype, s.sparse_dim))
            else:
                try:
                    hash(x)
                except TypeError:
                    raise InputError(f"argument {x!r} is neither a looplift.Named tensor nor hashable; "
                                     f"program arguments other than tensors must be constants "
                                     f"(dims, numbers, strings) (call at {user_source_line()})") from None
                parts.append(("const", type(x), x))
        return (spec, tuple(parts), self._float_dtype(leaves))

    def trace(self, *args, **kwargs) -> Trace:
        """Trace (or fetch the cached trace) for these arguments, without running it."""
        leaves, spec = flatten((args, kwargs), _is_input)
        return self._trace(leaves, spec)

    @torch.compiler.disable   # (tracing is Python work done once: under a user's torch.compile, never traced)
    def _trace(self, leaves: list, spec) -> Trace:
        key = self._key(leaves, spec)
        trace = self._traces.get(key)
        if trace is not None:
            return trace
        start = time.perf_counter()
        hints: dict = {}
        for _ in range(_MAX_TRACE_ATTEMPTS):
            try:
                graph, inputs, result, label_inputs = self._trace_once(leaves, spec, hints)
                break
            except _trace.Retrace:
                continue  # a loop learnt which dims its states need: trace again with that knowledge
        else:
            raise TraceError(f"the dims of the loop states did not settle after {_MAX_TRACE_ATTEMPTS} traces")
        out_leaves, out_spec = flatten(result, lambda v: isinstance(v, Tensor))
        for v in out_leaves:
            if isinstance(v, torch.Tensor):
                raise TraceError(f"the model returned a torch.Tensor of shape {tuple(v.shape)}, a value fixed "
                                 f"when the program was traced; return looplift tensors (computed with looplift "
                                 f"ops), which are computed at each call")
            if isinstance(v, Tensor) and v.node.graph is not graph:
                if v.node.graph.is_inside(graph):
                    raise TraceError(f"the model returned the {v.describe()}, which was computed inside a loop or "
                                     f"Cond; get it out with loop.stack(...), loop.last(...), a loop state or the "
                                     f"Cond result")
                raise TraceError(f"the model returned the {v.describe()}, which belongs to another program")
        graph.check()   # (the IR's contract: a failure here is a looplift bug, named with its node)
        optimized = None
        if self.optimize:
            optimized = optimize_loops(graph, inputs, [x for x in out_leaves if isinstance(x, Tensor)],
                                       mode=self.mode, float_dtype=self._float_dtype(leaves))
            optimized.graph.check()
        trace = Trace(graph, inputs, out_spec, out_leaves, start, optimized=optimized, label_inputs=label_inputs,
                      backend=self.backend, steps_per_call=self.steps_per_call)
        self._traces[key] = trace
        return trace

    def _trace_once(self, leaves: list, spec, hints: dict):
        graph = _graph.Graph()
        ctx = _trace.TraceContext(self.mode, graph, self._float_dtype(leaves), loop_hints=hints)
        token = _trace.enter(ctx)
        try:
            symbolic, inputs = [], []
            for i, x in enumerate(leaves):
                if _is_input(x):
                    s = _spec_of(x)
                    _check_dims(s.dims, f"input {i}")
                    node = graph.add("input", (), None, [(s.dims, s.dtype, s.sparse_dim)],
                                     attrs={"index": i}, source=f"<program input {i}>",
                                     nonfinite_padding=tuple(d for d in s.dims if d.is_dynamic))
                    inputs.append(node.outputs[0])
                    symbolic.append(node.outputs[0])
                else:
                    symbolic.append(x)
            args, kwargs = unflatten(spec, symbolic)
            try:
                result = self.fn(*args, **kwargs)
            except TypeError as e:
                _check_signature(self.fn, args, kwargs, e)
                raise
        finally:
            _trace.leave(token)
        return graph, inputs, result, ctx.label_inputs

    def _last_trace(self) -> Trace:
        if not self._traces:
            raise TraceError("the program has not been traced yet: call it (or Program.trace) first")
        return next(reversed(self._traces.values()))

    def explain(self) -> str:
        """What the loop optimizer did with the most recent trace: for each loop, what was moved in
        (computed over the whole sequence before it), moved out (after it), replaced by a sequence
        form, and what stayed in the loop with the dependency chain that kept it there."""
        trace = self._last_trace()
        if trace.optimized is None:
            return "compiled with optimize=False: every loop runs step by step as written"
        return explain_reports(trace.optimized.reports)

    def to_dot(self) -> str:
        """The loop bodies of the most recent trace as Graphviz DOT text, coloured by the optimizer's
        outcome (render with ``dot -Tpng``)."""
        trace = self._last_trace()
        return loops_to_dot(trace.optimized.reports if trace.optimized is not None else [])

    def to_fx(self, *args, **kwargs) -> torch.fx.GraphModule:
        """The program, as it runs for arguments like these example ones (``Named`` tensors, as for a call),
        as a ``torch.fx.GraphModule`` of torch calls, for ``torch.compile``, ``torch.export`` or your own
        tooling. Its ``forward`` takes the raw tensors of the ``Named`` inputs in order, then one lengths
        tensor per dynamic dim in the order the inputs first give them, and returns the raw outputs (their
        dims in ``module.meta["looplift"]``). Sizes are symbolic: other batch sizes and lengths run too
        (give an example with sizes of 2 or more: a size of 1 may be taken as fixed). The module holds the
        model's parameters under their names, so training it trains the model.

        A loop left after the optimizer (and a search's backtracking, a Cond) is one call of the op
        ``torch.ops.looplift.loop``, which runs its steps as the program does (and again, recorded, for the
        gradients). A search whose beam changes its size per step (a threshold) returns the beam's size after
        the loop from the op too.

        Not supported yet (an :class:`~looplift.errors.ExportError` naming the line): a loop or Cond that
        makes dims or draws random numbers, and the ops that
        read values back (an LSTM over sequences of different lengths whose final cell states are read,
        which packs them; a masked computation's compress). See :mod:`looplift.runtime.export`."""
        leaves, spec = flatten((args, kwargs), _is_input)
        named = [x for x in leaves if isinstance(x, Named)]
        if len(named) != sum(_is_input(x) for x in leaves):
            raise InputError("to_fx takes example inputs as looplift.Named tensors (Spec has no values)")
        env = _make_env(named, self._first_float_param(), _CALL_SITE)
        trace = self._trace(leaves, spec)
        lengths = {}
        for x in named:
            for d in x.lengths:
                lengths.setdefault(d.canonical(), env.lengths_of[d.canonical()])
        module = to_fx(trace.executor, trace.optimized.inputs if trace.optimized is not None else trace.inputs,
                       [x.tensor for x in named], lengths, env.device, self.root)
        module.meta["looplift"]["outputs"] = [tuple(d.name for d in t.dims) for t in trace.out_tensors]
        return module

    @property
    def traces(self) -> list[Trace]:
        """The traces made so far, one per signature."""
        return list(self._traces.values())

    # -- running -------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        """Run the program (traced on first use for these argument dims) and return its outputs."""
        return self._run(args, kwargs, reference=False)

    def reference(self, *args, **kwargs):
        """Run the program with the reference interpreter (literally, node by node)."""
        return self._run(args, kwargs, reference=True)

    def _run(self, args, kwargs, *, reference: bool):
        leaves, spec = flatten((args, kwargs), _is_input)
        for i, x in enumerate(leaves):
            if isinstance(x, Spec):
                raise InputError("a program is called with looplift.Named tensors; Spec is for Program.trace")
            if isinstance(x, torch.Tensor) and x.dim() or hasattr(x, "__array__") and not isinstance(x, torch.Tensor):
                raise InputError(f"argument {i} is a {type(x).__name__} of shape {tuple(x.shape)}, without dims: "
                                 f"pass looplift.Named(tensor, dims, lengths=...) (call at {_CALL_SITE})")
        named = [x for x in leaves if isinstance(x, Named)]
        env = _make_env(named, self._first_float_param(), _CALL_SITE)
        trace = self._trace(leaves, spec)
        for i, (vocab, op) in trace.label_inputs.items():
            x = leaves[i]
            _check_labels(x, f"input {named.index(x)} ({{{', '.join(str(d) for d in x.dims)}}}), the labels of "
                             f"{op}", env, _CALL_SITE, vocab)
        raws = [x.tensor for x in named]
        if reference:
            outs = run_reference(trace.graph, env, dict(zip(trace.inputs, raws)), trace.out_tensors)
        else:
            outs = trace.executor(env, raws)
        it = iter(outs)
        results = [_to_named(v, next(it), env) if isinstance(v, Tensor) else v for v in trace.out_leaves]
        return unflatten(trace.out_spec, results)


def _check_dims(dims: tuple, what: str) -> None:
    for d in dims:
        if not isinstance(d, Dim):
            raise InputError(f"{what}: dims must be looplift.Dim objects, got {d!r} "
                             f"(call at {user_source_line()})")
    canon = [d.canonical() for d in dims]
    if len(set(canon)) != len(canon):
        raise InputError(f"{what}: a dim is given twice in {[str(d) for d in dims]} "
                         f"(call at {user_source_line()})")


class _CallSite:
    """The caller's source line, looked up only when an error message is formatted."""

    def __format__(self, spec: str) -> str:
        return user_source_line()

    __str__ = lambda self: format(self)  # noqa: E731


_CALL_SITE = _CallSite()


def _make_env(named: list[Named], first_param, where: _CallSite) -> Env:
    """Check the call's tensors against their dims and collect sizes and lengths."""
    sizes: dict[Dim, int] = {}
    seen_at: dict[Dim, str] = {}
    lengths: dict[Dim, torch.Tensor] = {}
    device = None
    for i, x in enumerate(named):
        what = f"input {i} ({{{', '.join(str(d) for d in x.dims)}}})"
        _check_dims(x.dims, what)
        if not isinstance(x.tensor, torch.Tensor):
            raise InputError(f"{what}: expected a torch.Tensor, got {type(x.tensor).__name__} (call at {where})")
        if x.tensor.dim() != len(x.dims):
            raise InputError(f"{what}: the tensor has {x.tensor.dim()} axes of shape {tuple(x.tensor.shape)}, "
                             f"but {len(x.dims)} dims were given (call at {where})")
        device = device or x.tensor.device
        for d, size in zip(x.dims, x.tensor.shape):
            d = d.canonical()
            if d.is_static and d.size != size:
                raise InputError(f"{what}: dim {d.name!r} is static with size {d.size}, but the tensor has "
                                 f"size {size} there (call at {where})")
            if d in sizes and sizes[d] != size:
                raise InputError(f"{what}: dim {d.name!r} has size {size}, but {seen_at[d]} has it with size "
                                 f"{sizes[d]} (call at {where})")
            sizes[d] = size
            seen_at.setdefault(d, what)
        for d, n in x.lengths.items():
            d = d.canonical()
            if d not in lengths:
                lengths[d] = n
            elif n is not lengths[d] and not torch.equal(n, lengths[d]):
                raise InputError(f"{what}: the lengths of dim {d.name!r} differ from those given with "
                                 f"another input (call at {where})")
    for d, n in list(lengths.items()):
        if not d.is_dynamic:
            raise InputError(f"lengths were given for {d!r}, which is not a dynamic dim (call at {where})")
        if not isinstance(n, torch.Tensor) or n.dtype.is_floating_point or n.dtype == torch.bool:
            raise InputError(f"the lengths of dim {d.name!r} must be an integer torch.Tensor (call at {where})")
        ldims = d.length_dims
        for ld in ldims:
            if ld not in sizes:
                raise InputError(f"the lengths of dim {d.name!r} run over {ld.name!r}, which no input has "
                                 f"(call at {where})")
        expect = tuple(sizes[ld] for ld in ldims)
        if tuple(n.shape) != expect:
            raise InputError(f"the lengths of dim {d.name!r} have shape {tuple(n.shape)}, expected {expect} "
                             f"over {[str(ld) for ld in ldims]} (call at {where})")
        # The range check reads the values: done for lengths on the CPU, where it costs no device sync.
        if d in sizes and n.numel() and n.device.type == "cpu":
            lo, hi = (int(v) for v in torch.aminmax(n))
            if hi > sizes[d] or lo < 0:
                raise InputError(f"the lengths of dim {d.name!r} must lie in [0, {sizes[d]}] (its padded size), "
                                 f"got values from {lo} to {hi} (call at {where})")
        lengths[d] = n.to(device=device, dtype=torch.int64)
    derived = []   # (a dim derived from given ones, e.g. labels + 1: its lengths follow from theirs)
    for d in sizes:
        if d.is_dynamic and d not in lengths:
            if d.origin is not None and d.masked_from is None and all(
                    o in lengths or not o.is_dynamic for o in d.operands):
                derived.append(d)
                continue
            raise InputError(f"dim {d.name!r} is dynamic but no lengths were given for it; pass "
                             f"looplift.Named(tensor, dims, lengths={{{d.name}: lengths}}) (call at {where})")
    if device is None:
        device = first_param.device if first_param is not None else torch.device("cpu")
    env = Env(device, sizes, lengths)
    for d in derived:
        n = env.lengths(d)
        if isinstance(n, torch.Tensor) and n.numel() and n.device.type == "cpu" and int(n.max()) > sizes[d]:
            raise InputError(f"dim {d.name!r} (derived from {', '.join(o.name for o in d.operands)}) has lengths up "
                             f"to {int(n.max())}, beyond its padded size {sizes[d]} (call at {where})")
    for i, x in enumerate(named):
        _check_labels(x, f"input {i} ({{{', '.join(str(d) for d in x.dims)}}})", env, where)
    return env


def _check_labels(x: Named, what: str, env: Env, where: _CallSite, vocab: Dim | None = None) -> None:
    """An integer input with a ``sparse_dim`` (or used by an op as labels of `vocab`) holds labels: within its
    lengths each must index that vocabulary (the ops that index with labels would otherwise clamp a label past
    it, silently). One min and max."""
    vocab = vocab or x.sparse_dim
    vocab = vocab.canonical() if vocab is not None else None
    t = x.tensor
    if vocab is None or not vocab.is_static or t.dtype.is_floating_point or t.dtype.is_complex or \
            t.dtype == torch.bool or not t.numel():
        return
    lo, hi = torch.stack(torch.aminmax(t)).tolist()
    if lo >= 0 and hi < vocab.size:
        return   # (padding included: the common case, one op)
    layout = [d.canonical() for d in x.dims]
    ragged = [d for d in layout if d.is_dynamic]
    if any(ld not in layout for d in ragged for ld in d.length_dims):
        return   # (its lengths run over dims it lacks: its padding cannot be told apart here)
    valid = env.mask(ragged, layout) if ragged else None
    values = t if valid is None else torch.where(valid, t, torch.zeros((), dtype=t.dtype, device=t.device))
    lo, hi = torch.stack(torch.aminmax(values)).tolist()
    if lo >= 0 and hi < vocab.size:
        return
    bad = (t < 0) | (t >= vocab.size)
    if valid is not None:
        bad &= valid
    at = bad.nonzero()[0].tolist()
    position = ", ".join(f"{d.name} {k}" for d, k in zip(layout, at))
    raise InputError(f"{what}: label {t[tuple(at)].item()} at ({position}) is not in its vocabulary "
                     f"{vocab.name!r} (0..{vocab.size - 1}); {int(bad.sum())} such label(s) in all. "
                     f"The ops that index with it would clamp it into the vocabulary (call at {where})")


def _to_named(t: Tensor, raw, env: Env) -> Named:
    if not isinstance(raw, torch.Tensor):
        raw = torch.tensor(raw, dtype=t.dtype, device=env.device)
    lengths = {}
    for d in t.dims:
        if d.is_dynamic:
            n = env.lengths(d)
            lengths[d] = n.expand([env.size(ld) for ld in d.length_dims])
    return Named(raw, t.dims, lengths, sparse_dim=t.sparse_dim)


@entry_point
def compile(model: Callable, *, mode: str = "train", optimize: bool = True,  # noqa: A001
            backend: str | Callable | None = None, steps_per_call: int = 8) -> Program:
    """Trace `model` (a :class:`looplift.Module`, any callable, or a bound method) into a :class:`Program`.

    Args:
        model: called with symbolic tensors in place of the ``Named`` inputs.
        mode: ``"train"`` (dropout on), ``"eval"`` or ``"search"``; the model
            can branch on it with :func:`looplift.is_training` and
            :func:`looplift.is_search`.
        optimize: move out of loops what does not depend on the previous
            step (see :meth:`Program.explain`). Off, every loop runs as
            written, step by step, as in :meth:`Program.reference`.
        backend: also hand the program's code to ``torch.compile`` with this backend (``"inductor"``,
            ``"aot_eager"``, or a backend callable), with dynamic sizes: a new batch size or sequence
            length does not compile again. The code before and after each loop is compiled, and the step
            of each loop as one function (its first step in each call runs eagerly; the step index is a
            symbolic int), not unrolled over the whole loop (see `steps_per_call`). The step of a loop
            that keeps memory across its steps (a search, ``cum_concat`` in the loop) runs eagerly, as do
            loops inside a user's own ``torch.compile``.
            A failure inside compiled code runs the call again eagerly, which names the failing node's
            line (an error of the compiler itself, which the eager run does not repeat, is raised as it
            is). Compiling takes seconds to minutes on the first call of each traced signature.
        steps_per_call: with a `backend`, a loop's compiled step runs this many steps per compiled call
            (unrolled in it) where nothing between the steps needs Python: a loop over an axis without an
            end condition, as in training (the first step of each call runs eagerly; the steps left over,
            fewer than this, by the step compiled alone); 1: one step a call. A compiled call's own cost
            (its guards, autograd's function, the backward's call) is paid once per call, and steps compiled
            together fuse across their boundaries, forward and backward. On this project's 2-core CPU, the
            ``speech_aed`` of ``benchmarks/loop_training.py`` (an LSTM decoder fed back its attention
            context) trained in 0.72–0.79 of its hand-written eager twin's time with 8, 0.85–0.86 with 4
            and 0.93–0.94 with 1 (one process, alternating, two runs), and its first call compiled in 84 s
            with an empty inductor cache (49 s with 1).

    Programs compiled from one model share its parameters and do not
    interfere with each other.
    """
    if mode not in MODES:
        raise ModeError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(model, type):
        raise ArgumentError(f"compile needs a model, not the class {model.__name__}: "
                            f"looplift.compile({model.__name__}(...))")
    if not callable(model):
        raise ArgumentError(f"compile needs a callable (a looplift.Module or a function), got {model!r}")
    root = model if isinstance(model, torch.nn.Module) else getattr(model, "__self__", None)
    if not isinstance(root, torch.nn.Module):
        root = None
    if backend is not None and not (isinstance(backend, str) or callable(backend)):
        raise ArgumentError(f"backend must be the name of a torch.compile backend or a backend callable, "
                            f"got {backend!r}")
    if isinstance(steps_per_call, bool) or not isinstance(steps_per_call, int) or steps_per_call < 1:
        raise ArgumentError(f"steps_per_call must be an int >= 1, got {steps_per_call!r}")
    return Program(model, mode, root=root, optimize=optimize, backend=backend, steps_per_call=steps_per_call)


def _check_signature(fn: Callable, args, kwargs, error: TypeError) -> None:
    """A TypeError from calling the model: an :class:`ArgumentError` if the program's arguments do not fit its
    signature (else the model's own error, raised by the caller)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as e:
        name = getattr(fn, "__qualname__", type(fn).__qualname__)
        raise ArgumentError(f"the program was called with {len(args)} positional and {len(kwargs)} keyword "
                            f"argument(s), which do not fit the model {name}{signature}: {e}") from error


entry_methods(Spec, "__init__", public="looplift.Spec")
entry_methods(Program, "__call__", "reference", "trace", "explain", "to_dot", "to_fx", public="looplift.Program")
