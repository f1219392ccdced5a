"""A program as a ``torch.fx.GraphModule`` (:meth:`looplift.Program.to_fx`).

The executor's generated code (:mod:`looplift.runtime.executor`) is plain
Python over torch calls, so dynamo (``torch._dynamo.export``) captures it as
one graph of torch functions: the dims are gone, every size is symbolic, the
masks and permutes are ops of the graph. The module's ``forward`` takes the
raw tensors of the program's ``Named`` inputs in order, then one lengths
tensor per dynamic dim (in the order the inputs first give them), and returns
the raw output tensors; ``module.meta["looplift"]`` names their dims.

Why capture and not a lowering per op: the kernels are the program's exact
torch calls already, with their layout decisions made at build time; dynamo
records them as they run, so the module computes what the program computes.

A loop left after the optimizer (its step depends on the previous step) is
one call of the op ``torch.ops.looplift.loop`` in the graph, on the loop's
inputs, the lengths and the sizes of its dims: it runs the steps as the program
does (the same kernels, so the same results), and for the gradients runs them
again recording them (the op ``looplift.loop_backward``: the steps' activations
are not kept between forward and backward, at the cost of a second run of the
steps). Both ops are opaque to ``torch.compile`` and ``torch.export``, with
their output shapes from the loop's dims, so a module with loops compiles and
exports with symbolic sizes. A loop that makes its dim (one that ends by
``loop.end``) also returns that dim's lengths and size: its size is a symbol
known once the loop ran (an unbacked size). A search's backtracking after its
loop (a Python loop over that many steps) is one call of the same op (no
gradients), and so is a ``Cond`` (it runs the branch its predicate chooses).
The op names its loop by a number: the loop lives as long as the process (a
module exported again adds another).

An LSTM or GRU over sequences of different lengths runs over the padded
batch there (each entry's reverse direction over its own frames reversed), as
the program does on CPU for long sequences, not packed: the same results up to
float rounding. A search whose beam changes its size per step (a threshold)
also returns the beam's size after the loop (an unbacked size too), and its
stacked values the widest step's (their frames are padded to it). Not
supported yet: a loop or Cond that makes dims or draws random numbers
(dropout: the second run would draw anew), and ops that read values back to
decide what to do (an LSTM whose final cell states are read,
which packs; a multi-layer one with dropout; a masked computation's compress):
they raise :class:`~looplift.errors.ExportError` naming the user's line.
"""

from __future__ import annotations

import contextlib
import itertools
import operator
import re

import torch

from .._align import capturing
from ..errors import ExportError
from ..graph import Op
from ..regions import CondSpec
from ..tensor import Tensor
from .env import Env
from .executor import Executor, executor_runner
from .loop_run import LoopRun
from .regions import CondRun

__all__ = ["to_fx"]

_GENERATED_LINE = re.compile(r'File "(<looplift executor \d+>)", line (\d+)')


def to_fx(executor: Executor, inputs: list, raws: list, lengths: dict, device: torch.device,
          root) -> torch.fx.GraphModule:
    """The graph `executor` runs as a GraphModule, captured on the example `raws` (the inputs' raw tensors,
    over the dims of the symbolic `inputs`) and `lengths` (a lengths tensor per dynamic dim); `root`: the
    model whose parameters the module refers to by their names (None: names made up)."""
    loops = {}
    for node in executor.nodes:
        if node.op == Op.LOOP:
            loops[node] = _loop_call(node, device)
        if node.op == "backtrack":
            loops[node] = _backtrack_call(node, device)
        if node.op == Op.COND:
            loops[node] = _cond_call(node, device)
    length_dims = list(lengths)
    sizes_of = []   # per dim with a size: (input, axis) where the size is read
    for k, t in enumerate(inputs):
        for axis, d in enumerate(t.dims):
            d = d.canonical()
            if d.size is None and all(d is not e for e, _, _ in sizes_of):
                sizes_of.append((d, k, axis))
    n_in = len(raws)
    run = executor.function if not loops else executor.with_kernels(loops)

    def forward(*tensors):
        sizes = {d: tensors[k].shape[axis] for d, k, axis in sizes_of}
        env = Env(device, sizes, dict(zip(length_dims, tensors[n_in:])))
        return run(env, list(tensors[:n_in]))

    import torch._dynamo  # (not at import: loading dynamo takes a while)

    example = [*raws, *(lengths[d] for d in length_dims)]
    try:
        with capturing():
            captured, _ = torch._dynamo.export(forward, aten_graph=False, assume_static_by_default=False)(*example)
    except Exception as e:   # (dynamo's own errors: name the node whose generated line it stopped at)
        raise _named(executor, e) from e
    module = _named_parameters(captured, root)
    module.meta["looplift"] = {
        "inputs": [tuple(d.name for d in t.dims) for t in inputs],
        "lengths": [d.name for d in length_dims],
    }
    return module


# -- loops: one call of the op ``looplift::loop`` each ------------------------------------------------------

#: The loops of exported modules, by the number their op calls name (a module refers to its loops by it).
_LOOPS: dict[int, _Call] = {}
_loop_ids = itertools.count()


class _Call:
    """A node of an exported program run as one call of the op (a loop, a Cond, a search's backtracking): what
    runs it (for a loop :class:`LoopRun`, which runs the steps eagerly, its body with a prepared executor),
    the dims whose sizes and lengths its call is given, and its outputs' dims."""

    def __init__(self, node, device: torch.device):
        spec = node.region
        self.node = node
        self.device = device
        #: the dim the call makes (a loop's own dim: its size and lengths known once it ran), else None
        self.own = None
        #: a search's beam whose size changes per step: given its size before the loop, its size after the loop
        #: is known once the loop ran; and the outputs that are stacks (each step's frames padded to the
        #: widest step's, which may be wider than the last)
        self.beam, self.stacks = None, range(0)
        outside = list(node.inputs)
        if isinstance(spec, CondSpec):
            self.run = CondRun(spec, executor_runner)
        elif spec is not None:
            self.run = LoopRun(spec, executor_runner)
            self.own = spec.axis.canonical() if spec.own_dim else None
            self.beam = spec.beam[0].canonical() if spec.beam is not None else None
            self.stacks = range(len(spec.new_states), len(spec.new_states) + len(spec.stacks))
            outside = [*spec.captured, *spec.placeholders, spec.axis]
        else:   # (a search's backtracking: the dim it makes is as long as its steps, the first dim of its output)
            self.run = node.kernel
            self.own = node.makes_dims[0].canonical() if node.makes_dims else None
            outside.append(node.outputs[0].dims[0])
        dims = dict.fromkeys(d.canonical() for t in outside + node.outputs
                             for d in (t.dims if isinstance(t, Tensor) else (t,)))
        for d in list(dims):
            for e in d.length_dims if d.is_dynamic else ():
                dims.setdefault(e.canonical(), None)
        dims.pop(self.own, None)
        #: dims given to the loop by size, and those given by lengths too (dynamic dims)
        self.size_dims = [d for d in dims if d.size is None]
        self.length_dims = [d for d in dims if d.is_dynamic]
        #: the dims and dtype of each output: the node's, then for a loop that makes its dim, that dim's
        #: lengths and an empty tensor of its size (the op's outputs carry them out)
        self.outputs = [(tuple(d.canonical() for d in t.dims), t.dtype) for t in node.outputs]
        if self.own is not None:
            self.outputs += [(tuple(d.canonical() for d in self.own.length_dims), torch.int64),
                             ((self.own,), torch.float32)]
        if self.beam is not None:   # (and an empty tensor of the beam's size after the loop)
            self.outputs.append(((self.beam,), torch.float32))
        self.dtypes = [t.dtype for t in node.inputs]

    def env(self, lengths, sizes) -> Env:
        return Env(self.device, dict(zip(self.size_dims, sizes)), dict(zip(self.length_dims, lengths)))

    def __call__(self, raws, lengths, sizes) -> list[torch.Tensor]:
        env = self.env(lengths, sizes)
        out = self.run(env, *raws)
        out = list(out) if isinstance(out, tuple) else [out]
        if self.own is not None:
            out += [env.lengths(self.own), torch.empty(env.size(self.own), device=self.device)]
        if self.beam is not None:
            out.append(torch.empty(env.size(self.beam), device=self.device))
        return [v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=dtype, device=self.device)
                for v, (_, dtype) in zip(out, self.outputs)]


def _loop_call(node, device: torch.device):
    """The kernel that stands for the loop `node` while the program is captured: one call of the op
    ``looplift::loop`` on the loop's inputs, the lengths and sizes of its dims."""
    spec = node.region
    # (a threshold's prune makes the next beam each step: the loop's op runs the steps and gives the last size)
    _check_region(node, spec.body, "loop", beams=[d.canonical() for d in spec.beam or ()])
    return _op_call(node, device)


def _cond_call(node, device: torch.device):
    """The kernel that stands for a Cond: one call of the op ``looplift::loop``, which runs the branch its
    predicate chooses."""
    for graph in node.region.branches.values():
        _check_region(node, graph, "Cond")
    return _op_call(node, device)


def _check_region(node, graph, what: str, beams=()) -> None:
    """An ExportError naming `node`'s line if its region `graph` draws random numbers or makes dims (other than
    `beams`)."""
    if any(n.random for n in _nodes_in(graph)):
        raise ExportError(f"to_fx: the {what} at {node.source} draws random numbers (dropout, sampling); its "
                          f"exported form computes it again for the gradients and would draw anew",
                          where=node.source)
    if any(d.canonical() not in beams for n in _nodes_in(graph) for d in n.makes_dims):
        raise ExportError(f"to_fx: the {what} at {node.source} makes dims (an inner loop that ends by itself, a "
                          f"masked computation's compress); it has no torch.fx form yet", where=node.source)


def _backtrack_call(node, device: torch.device):
    """The kernel that stands for a search's backtracking (a Python loop over the search's steps, whose number
    is known only once the search ran): one call of the op ``looplift::loop`` too, without gradients."""
    return _op_call(node, device, size_of_own=lambda out: out[0].shape[0])


def _op_call(node, device: torch.device, size_of_own=None):
    """The kernel that stands for `node` (a loop, a backtracking) while the program is captured: one call of the
    op ``looplift::loop`` on its inputs, the lengths and sizes of its dims. A dim it makes gets its lengths from
    the op, and its size from the op (`size_of_own` None) or from ``size_of_own(outputs)``."""
    loop = _Call(node, device)
    key = next(_loop_ids)
    _LOOPS[key] = loop

    def kernel(env, *raws):
        raws = [r if isinstance(r, torch.Tensor) else torch.as_tensor(r, dtype=dtype, device=env.device)
                for r, dtype in zip(raws, loop.dtypes)]
        out = torch.ops.looplift.loop(raws, [env.lengths(d) for d in loop.length_dims],
                                      [env.size(d) for d in loop.size_dims], key)
        if loop.beam is not None:   # (the beam's size after the loop)
            *out, width = out
            # (a search keeps one slot at least: its first step runs on one)
            torch._check(width.shape[0] >= 1)
            for i in loop.stacks:
                if loop.beam in loop.outputs[i][0]:
                    torch._check(out[i].shape[loop.outputs[i][0].index(loop.beam)] >= 1)
            env.sizes[loop.beam] = width.shape[0]
        if loop.own is not None:   # (its dim's size and lengths, for what comes after the loop)
            *out, lengths, size = out
            n = size.shape[0]
            if size_of_own is not None:
                torch._check(n == size_of_own(out))
                n = size_of_own(out)
            env.sizes[loop.own] = n
            env.lengths_of[loop.own] = lengths
        return out[0] if len(out) == 1 else tuple(out)

    kernel.loop = loop   # (keeps the loop alive as long as the module's code refers to it)
    return kernel


def _nodes_in(graph):
    for node in graph.nodes:
        yield node
        region = node.region
        if region is not None:
            for g in ([region.body] if hasattr(region, "body") else region.branches.values()):
                yield from _nodes_in(g)


@torch.library.custom_op("looplift::loop", mutates_args=())
def _loop_op(raws: list[torch.Tensor], lengths: list[torch.Tensor], sizes: list[int], loop: int) -> list[torch.Tensor]:
    """A loop (or Cond, or backtracking) of an exported program (:data:`_LOOPS`), run as the program runs it."""
    seen = {r.untyped_storage().data_ptr() for r in raws if r.numel()}
    result = []
    # (an op's outputs are its own tensors: a state the loop never changed is a copy of its initial value)
    for o in _LOOPS[loop](raws, lengths, sizes):
        if o.numel():
            if o.untyped_storage().data_ptr() in seen:
                o = o.clone()
            seen.add(o.untyped_storage().data_ptr())
        result.append(o)
    return result


@_loop_op.register_fake
def _loop_fake(raws, lengths, sizes, loop):
    entry = _LOOPS[loop]
    size = dict(zip(entry.size_dims, sizes))
    if entry.own is not None:   # (as many steps as the loop runs: known once it ran)
        size[entry.own] = torch.library.get_ctx().new_dynamic_size()
    if entry.beam is not None:   # (as wide as the last step's prune kept: known once it ran)
        size[entry.beam] = torch.library.get_ctx().new_dynamic_size()
    sizes = [size] * len(entry.outputs)
    if entry.beam is not None:   # (a stack as wide as its widest step, a symbol of its own)
        for i in entry.stacks:
            sizes[i] = {**size, entry.beam: torch.library.get_ctx().new_dynamic_size()}
    device = raws[0].device if raws else entry.device
    return [torch.empty([d.size if d.size is not None else at[d] for d in dims], dtype=dtype, device=device)
            for (dims, dtype), at in zip(entry.outputs, sizes)]


def _loop_setup(ctx, inputs, output):
    raws, lengths, sizes, loop = inputs
    ctx.save_for_backward(*raws, *lengths)
    ctx.n_raws, ctx.sizes, ctx.loop = len(raws), sizes, loop


def _loop_backward(ctx, grads):
    saved = ctx.saved_tensors
    raws, lengths = list(saved[:ctx.n_raws]), list(saved[ctx.n_raws:])
    found = torch.ops.looplift.loop_backward(raws, lengths, ctx.sizes, ctx.loop, list(grads))
    return ([g if r.dtype.is_floating_point else None for r, g in zip(raws, found)], [None] * len(lengths), None,
            None)


@torch.library.custom_op("looplift::loop_backward", mutates_args=())
def _loop_backward_op(raws: list[torch.Tensor], lengths: list[torch.Tensor], sizes: list[int], loop: int,
                      grads: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """The gradients of a loop's inputs (zeros for those it does not reach, and for integer ones): its steps run
    again, recorded, and differentiated. An op of its own, so that a compiler sees it as one call too."""
    wrt = [r.detach().requires_grad_() if r.dtype.is_floating_point else r for r in raws]
    with _recording():
        out = _LOOPS[loop](wrt, lengths, sizes)
    pairs = [(o, g) for o, g in zip(out, grads) if g is not None and o.requires_grad]
    leaves = [w for w in wrt if w.requires_grad]
    found = iter(torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
                 if pairs and leaves else [None] * len(leaves))
    result = []
    for w in wrt:
        g = next(found) if w.requires_grad else None
        result.append(torch.zeros_like(w) if g is None else g)
    return result


@contextlib.contextmanager
def _recording():
    """Autograd on again inside an op's implementation (which runs below autograd: its keys excluded)."""
    key = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for k in (key.AutogradFunctionality, key.AutogradOther, key.AutogradNestedTensor, key.ADInplaceOrView):
        exclude = exclude.remove(k)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


@_loop_backward_op.register_fake
def _loop_backward_fake(raws, lengths, sizes, loop, grads):
    return [torch.empty_like(r) for r in raws]


_loop_op.register_autograd(_loop_backward, setup_context=_loop_setup)


def _named(executor: Executor, e: Exception) -> ExportError:
    for filename, line in _GENERATED_LINE.findall(str(e)):
        node = executor.node_at(filename, int(line))
        if node is not None:
            return ExportError(f"to_fx: {node.op} at {node.source} has no torch.fx form yet: "
                               f"{str(e).splitlines()[0]}", where=node.source)
    return ExportError(f"to_fx: the program could not be captured: {str(e).splitlines()[0]}")


def _named_parameters(captured: torch.fx.GraphModule, root) -> torch.fx.GraphModule:
    """`captured` with its parameters and buffers under their names in `root` (dynamo names them after the
    closures that held them); the very tensors, so training the module trains the model."""
    names = {}
    if root is not None:
        names = {id(v): n for n, v in [*root.named_parameters(), *root.named_buffers()]}
    attrs: dict[str, object] = {}
    constants = 0
    for node in captured.graph.nodes:
        if node.op != "get_attr":
            continue
        value = operator.attrgetter(node.target)(captured)
        name = names.get(id(value))
        if name is None:
            name, constants = f"constant_{constants}", constants + 1
        node.target = name
        attrs[name] = value
    module = torch.fx.GraphModule(attrs, captured.graph, class_name="LoopliftProgram")
    return module
