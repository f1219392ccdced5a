"""The executor: runs a traced graph as generated straight-line Python, one torch kernel call per node.

At build time it drops the nodes the outputs do not need, names every value
the graph computes, and writes the graph as the source of one plain Python
function (as ``torch.fx.GraphModule`` does)::

    def run(env, raws):
        v0 = raws[0]
        v1 = raws[1]
        v2 = k0(env, v0, v1)          # %2 = add(...) at model.py:12
        v3, v4 = k1(env, v2); del v2
        return [v3, v4]

so a call does no per-node Python work beyond the kernel call itself: no
argument lists, no slot table, no per-node ``try``; and, as in a hand-written
model, a value is freed on the line that reads it last. A failing kernel is found
afterwards from the generated line in the traceback, and named by its node's
source line (:func:`looplift.runtime.reference.node_error`). Loops and Conds
get their kernels here too, running their graphs with executors of their own
(:func:`executor_runner`). A ``MaskedComputation`` block left in a loop's
step runs as one kernel on the entries where its mask is True
(:mod:`looplift.runtime.masked_rows`). It must agree exactly with the reference
interpreter (:mod:`looplift.runtime.reference`).
"""

from __future__ import annotations

import itertools
import linecache
import types
import weakref
from collections.abc import Sequence

import torch

from ..errors import LoopliftError
from ..graph import Graph
from ..tensor import Tensor
from .attention import FusedAttention, find_attention
from .env import Env
from .live import live_nodes, read_by
from .loop_run import LoopRun, without_duck_shapes
from .masked_rows import MaskedRows, find_blocks
from .reference import for_outputs, is_placed, node_error
from .regions import region_kernel

__all__ = ["Executor", "executor_runner", "compiled_runner", "live_nodes"]

_serial = itertools.count()


class Executor:
    """A graph prepared for repeated calls: ``executor(env, raws)`` returns the raw values of the outputs."""

    def __init__(self, graph: Graph, inputs: Sequence[Tensor], outputs: Sequence[Tensor], *,
                 masked_rows: bool = True):
        name: dict[int, str] = {}
        lines = ["def run(env, raws):"]
        for k, t in enumerate(inputs):
            name[id(t)] = f"v{k}"
            lines.append(f"    v{k} = raws[{k}]")
        fresh = itertools.count(len(inputs))   # (names of computed values: never an input's)
        kernels: dict[str, object] = {}
        #: the node of each generated line that calls a kernel, by its line number (1-based, as tracebacks say)
        self._node_at: dict[int, object] = {}
        #: the name of each node's kernel in the generated code's namespace
        self._name_of: dict[object, str] = {}
        read = read_by(graph, outputs)
        live = live_nodes(graph, outputs, given=inputs)
        owned = _owned(live, outputs)
        calls = []   # (node, kernel name, target names, argument names), in order
        # a masked block runs as one kernel on the rows where its mask is True, where its first where was
        blocks = {id(b.wheres[0]): b for b in (self._masked_blocks(graph, live, outputs) if masked_rows else [])}
        replaced = {id(n) for b in blocks.values() for n in (*b.nodes, *b.wheres)}
        # attention (two dots around a softmax) runs as one fused kernel, where its second dot was
        fused = {id(a.nodes[-1]): a for a in find_attention(live, outputs) if not {id(n) for n in a.nodes} & replaced}
        replaced |= {id(n) for a in fused.values() for n in a.nodes if n not in a.shared}
        #: the nodes the generated code runs (those of fused kernels too), in order
        self._runs = []
        for node in live:
            chain = fused.get(id(node))
            if chain is not None:
                k = self._name_of[node] = f"k{len(kernels)}"
                kernels[k] = FusedAttention(chain, {n: for_outputs(n.kernel, n, read) for n in chain.nodes})
                name[id(chain.output)] = f"v{next(fresh)}"
                calls.append((node, k, [name[id(chain.output)]], [name[id(t)] for t in chain.arguments]))
                self._runs += [n for n in chain.nodes if n not in chain.shared]
                continue
            block = blocks.get(id(node))
            if block is not None:
                k = self._name_of[node] = f"k{len(kernels)}"
                kernels[k] = block.kernel
                args = [name[id(t)] for t in block.arguments]
                for w in block.wheres:
                    name[id(w.outputs[0])] = f"v{next(fresh)}"
                calls.append((node, k, [name[id(w.outputs[0])] for w in block.wheres], args))
                self._runs += [*block.nodes, *block.wheres]
                continue
            if id(node) in replaced:
                continue
            kernel = node.kernel
            if node.region is not None:
                kernel = region_kernel(node, executor_runner)
            elif kernel is None:
                continue   # a placeholder: fed through `inputs`
            else:
                kernel = for_outputs(kernel, node, read)
                if node in owned and hasattr(kernel, "for_owned"):
                    kernel = kernel.for_owned(owned[node])
            self._runs.append(node)
            k = self._name_of[node] = f"k{len(kernels)}"
            kernels[k] = kernel
            args = [name[id(t)] for t in node.inputs]
            for t in node.outputs:
                name[id(t)] = f"v{next(fresh)}"
            calls.append((node, k, [name[id(t)] for t in node.outputs], args))
        # (a value is deleted on the line that reads it last, or makes it unread, as a hand-written model's
        # temporaries are freed: the peak memory of a call is that of the model, not of all its values)
        kept = {name[id(t)] for t in outputs} | {f"v{k}" for k in range(len(inputs))}
        last = {v: i for i, (_, _, outs, args) in enumerate(calls) for v in (*outs, *args)}
        for i, (node, k, outs, args) in enumerate(calls):
            dead = sorted({v for v in (*args, *outs) if last[v] == i and v not in kept}, key=lambda v: int(v[1:]))
            target = outs[0] if len(outs) == 1 else ", ".join(outs)
            where = str(node.source).replace("\n", " ")
            free = f"; del {', '.join(dead)}" if dead else ""
            what = "masked block" if id(node) in blocks else "attention" if id(node) in fused else node.op
            lines.append(f"    {target} = {k}(env{''.join(f', {a}' for a in args)}){free}   # {what} at {where}")
            self._node_at[len(lines)] = node
        lines.append(f"    return [{', '.join(name[id(t)] for t in outputs)}]")
        self.source = "\n".join(lines) + "\n"
        filename = f"<looplift executor {next(_serial)}>"
        linecache.cache[filename] = (len(self.source), None, self.source.splitlines(True), filename)
        weakref.finalize(self, linecache.cache.pop, filename, None)   # (programs made per call leave none behind)
        namespace = dict(kernels)
        exec(compile(self.source, filename, "exec"), namespace)
        self._run = self._eager = namespace["run"]
        self._code = self._run.__code__
        self.backend = None

    @staticmethod
    def _masked_blocks(graph: Graph, live: Sequence, outputs: Sequence[Tensor]) -> list:
        """The masked blocks among `live` that run on the rows where their mask is True
        (:mod:`looplift.runtime.masked_rows`), each with its kernel (``block.kernel``)."""
        found = []
        read = read_by(graph, outputs)
        for block in find_blocks(live, outputs):
            inner = Executor(graph, block.inputs, block.values, masked_rows=False)
            if {id(n) for n in inner.nodes} != {id(n) for n in block.nodes}:
                continue   # (the block's values need more than its own nodes)
            block.kernel = MaskedRows(block, inner, [for_outputs(w.kernel, w, read) for w in block.wheres])
            found.append(block)
        return found

    @property
    def num_nodes(self) -> int:
        return len(self._node_at)

    @property
    def nodes(self) -> list:
        """The nodes the generated code runs, in order (placeholders excepted; those of a kernel that runs
        several, a masked block or an attention, where it runs)."""
        return list(self._runs)

    @property
    def function(self):
        """The generated function itself, ``run(env, raws) -> raw outputs`` (not compiled, errors not named)."""
        return self._eager

    def node_at(self, filename: str, lineno: int):
        """The node that line `lineno` of the generated file `filename` runs, or None (another file)."""
        return self._node_at.get(lineno) if filename == self._code.co_filename else None

    def compile(self, backend, *, itself: bool = True, steps_per_call: int = 1) -> None:
        """Run the generated code through ``torch.compile`` with `backend`, every size dynamic (a new batch
        size or length does not compile again); `itself`: False leaves this graph's own code eager and
        compiles only the steps of its loops; `steps_per_call`: a loop's compiled step runs that many steps
        a call where nothing between them needs Python (:meth:`LoopRun._chunk_of`).

        A loop is not traced here (it would be unrolled, and compiled anew for every length): it runs its
        steps itself, and its step (its body's executor) is compiled as one function the same way, and so
        on down nested loops. Not the step of a loop whose body keeps memory across its steps
        (``Node.keeps_run_memory``: a ``cum_concat`` in the loop, a search's prune): that memory grows per
        step, and a compiled step would compile again for each length of it. Such a step runs eagerly
        (the loops inside it compiled)."""
        #: the backend it was compiled with (None: not compiled): a loop runs several of its steps at once with it
        self.backend = backend if itself else None
        if itself:
            self._run = self._without_duck_shapes(torch.compile(self._run, backend=backend, dynamic=True))
        for kernel in map(self._eager.__globals__.get, self._name_of.values()):
            if isinstance(kernel, LoopRun):
                steps = not any(node.keeps_run_memory for node in kernel.spec.body.nodes)
                kernel.runner = compiled_runner(backend, itself=steps, steps_per_call=steps_per_call)
                kernel.chunk_steps = steps_per_call

    def with_kernels(self, kernels: dict):
        """The generated function, ``run(env, raws)``, with the kernels of some nodes (`kernels`: node -> kernel)
        replaced (not compiled, errors not named)."""
        namespace = {**self._eager.__globals__, **{self._name_of[node]: k for node, k in kernels.items()}}
        return types.FunctionType(self._code, namespace, "run")

    def _without_duck_shapes(self, compiled, calls: int = 3):
        """`compiled`, whose sizes are never taken to be equal because they were equal when it compiled
        (torch's "duck shapes": a batch of 5 entries and a static dim of 5 would be one symbol, compiled again
        for the first batch of another size). Dynamo compiles on a call: the setting is made around the first
        `calls` calls (the first step with each kind of input), then this executor calls `compiled` itself
        (a setting costs 20 us a call; a later compile without it is only a possible extra recompile)."""
        left = [calls]

        def run(env, raws):
            left[0] -= 1
            if left[0] <= 0:
                self._run = compiled
            with without_duck_shapes():
                return compiled(env, raws)

        return run

    @property
    def compiled(self) -> bool:
        return self._run is not self._eager

    def __call__(self, env: Env, raw_inputs: Sequence) -> list:
        return self._call(self._run, env, raw_inputs)

    def eager(self, env: Env, raw_inputs: Sequence) -> list:
        """As a call, but never compiled: the generated code run as it is."""
        return self._call(self._eager, env, raw_inputs)

    def _call(self, run, env: Env, raw_inputs: Sequence) -> list:
        try:
            return run(env, raw_inputs)
        except Exception as e:
            if run is not self._eager and not isinstance(e, LoopliftError):
                # (compiled code has no generated line in its traceback: the same call run eagerly names the
                # node that fails; if it does not fail, the failure is the compiled code's own)
                self._call(self._eager, env, raw_inputs)
                raise
            node = self._failed_node(e)
            if node is None or (isinstance(e, LoopliftError) and is_placed(e)):
                raise
            raise node_error(node, e) from e

    def _failed_node(self, e: Exception):
        """The node whose kernel raised `e` (from the generated line in its traceback), or None."""
        tb = e.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code is self._code:
                return self._node_at.get(tb.tb_lineno)
            tb = tb.tb_next
        return None


def _owned(nodes: Sequence, outputs: Sequence[Tensor]) -> dict:
    """Per node whose kernel may overwrite inputs (``kernel.for_owned``), which of its inputs it may: a new
    tensor (its maker's kernel is ``fresh``) made by one of `nodes` (not by a node of a graph around it: a
    loop's step reads the values made before the loop at every step; nor by one whose value is fed as an
    input), that only this node reads, once, and that is no output. A hand-written model does the same where
    it writes ``x.addmm_(...)`` into a temporary of its own."""
    reads: dict[int, int] = {}
    for node in nodes:
        for t in node.inputs:
            reads[id(t)] = reads.get(id(t), 0) + 1
    returned = {id(t) for t in outputs}

    runs = {id(node) for node in nodes}

    def own(t: Tensor) -> bool:
        maker = t.node
        return (reads[id(t)] == 1 and id(t) not in returned and maker is not None and id(maker) in runs
                and maker.region is None and getattr(maker.kernel, "fresh", False) and len(maker.outputs) == 1)

    found = {}
    for node in nodes:
        if node.region is None and hasattr(node.kernel, "for_owned"):
            which = tuple(own(t) for t in node.inputs)
            if any(which):
                found[node] = which
    return found


def executor_runner(graph: Graph, inputs: Sequence[Tensor], outputs: Sequence[Tensor]) -> Executor:
    """The executor of a region's graph, prepared once per graph and kept in ``graph.prepared``."""
    key = ("executor", tuple(id(t) for t in inputs), tuple(id(t) for t in outputs))
    runner = graph.prepared.get(key)
    if runner is None:
        runner = graph.prepared[key] = Executor(graph, inputs, outputs)
    return runner


def compiled_runner(backend, *, itself: bool = True, steps_per_call: int = 1):
    """A runner like :func:`executor_runner` whose executors are compiled with `backend` (`itself`: False,
    only their loops' steps; `steps_per_call`: their loops' steps a call; see :meth:`Executor.compile`), kept
    in ``graph.prepared`` apart from the eager ones, per backend."""

    def runner(graph: Graph, inputs: Sequence[Tensor], outputs: Sequence[Tensor]) -> Executor:
        # (a backend by its name, or by its identity: it may not be hashable; the executor kept under the key
        # holds it, so the identity is not reused)
        which = backend if isinstance(backend, str) else id(backend)
        key = ("compiled", which, itself, steps_per_call, tuple(id(t) for t in inputs),
               tuple(id(t) for t in outputs))
        found = graph.prepared.get(key)
        if found is None:
            # (without masked blocks on their rows: their row count would be read back mid-step)
            found = graph.prepared[key] = Executor(graph, inputs, outputs, masked_rows=False)
            found.compile(backend, itself=itself, steps_per_call=steps_per_call)
        return found

    return runner
