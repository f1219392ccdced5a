"""Random loop programs, for testing the loop optimizer against the reference interpreter.

A program is drawn as plain data (:class:`Program`): the loop's kind, its
states (with their initial values, nested in tuples and dicts), a list of ops
in the body (each naming its operands by their index in a pool of values), the
new value of each state, the stacked values, the values taken by
``loop.last`` and the end condition. :class:`Model` turns it into a Python
function written with looplift, as a user would write it; :func:`check` runs
it optimized and with the reference interpreter and compares outputs and
gradients (:func:`assert_equivalent`, which works for any program).

Being data, a failing program shrinks (hypothesis) to a small one, and its
``repr`` reads as the recipe of the loop body (the pool below says what each
index names). For example, in a loop over ``time`` (pool 0-4: ``x_t``,
``x2_t``, the step index, ``u``, the counter) with one state leaf (pool 5,
``h`` as read)::

    Program(loop='axis', groups=(Group('single', (Leaf('F', 'zeros', 'self'),)),),
            ops=(Op('linear', (5,), ('F', False)), Op('binary', (6, 0), ('add',)), Op('unary', (7,), ('tanh',))),
            updates=(8,), stacks=(8,), lasts=(), end=None,
            masked=Masked(first=0, last=3, mask_arg=1, thr=0.0, assign_inside=True))

is the loop body ::

    h = loop.state.g0
    with ll.MaskedComputation(mask=x2_t > 0.0):
        v6 = linear(h); v7 = v6 + x_t; v8 = tanh(v7)     # pool 6, 7, 8
        loop.state.g0 = v8
    loop.stack(v8)                                        # held: v8 of the last step where x2_t > 0

(a slow RNN stepping only where ``x2_t > 0``; the optimizer runs it over ``T'``).

The pool of values a body op may use:

* loops over ``time`` (``Loop(axis=T)``, dynamic) or over ``window`` (``Loop(axis=W)``, static: then
  ``x`` and ``x2`` have ``window`` instead of ``time``): the frames of ``x`` (over ``f``) and
  of ``x2`` (a scalar per frame), the step index (cast to float), the captured
  input ``u`` (over ``h``, from outside the loop), and if the program has one,
  an int counter state ``counter = counter + 1`` (cast to float);
* loops ended by ``loop.end`` (``Loop(max_seq_len=...)``): the step index, the
  counter, ``u``;
* then each state leaf as read at the start of the step, then each op's result.

A program may have a masked block (:class:`Masked`, one program in three):
some consecutive ops run inside ``with ll.MaskedComputation(mask=pool[m] > thr):``
(the mask from an input frame ``x2_t``, the step index, the counter, a state
or an earlier op), optionally with the state assignments too. The pool is
unchanged: a block value used after the block is the held one (looplift holds
it), so the same index names both (``loop.last`` of a block value used nowhere
else after the block is taken of ``ll.identity(value)``, which holds it). Where
the mask comes from the inputs and the block from inputs and its own states,
the optimizer runs the block as a loop of its own over ``T'`` (the frames where
the mask is True); elsewhere the block stays in the loop (its calls on inputs
only still move out, one by one).

A value's type is its feature dim (``F``, ``H``, ``K``) or ``s`` (no feature
dim: a scalar per batch entry, or none at all); batch dims come and go with
broadcasting.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from hypothesis import strategies as st
from torch.testing import assert_close

import looplift as ll
from looplift._tree import flatten

B = ll.batch_dim
T = ll.Dim("time")
W = ll.Dim("window", 4)   # a static dim to loop over
S = ll.Dim("enc_time")
FDIMS = {"F": ll.Dim("f", 3), "H": ll.Dim("h", 4), "K": ll.Dim("k", 2)}
VEC_TYPES = tuple(FDIMS)
SCALAR = "s"
DTYPE = torch.float64
X_TYPE, ENC_TYPE, U_TYPE = "F", "H", "H"   # the feature dims of x, of the encoder and of u
MAX_LEN = 8                                 # Loop(max_seq_len=...) as an int; limits are below it

UNARY = ("tanh", "sigmoid", "relu", "exp_small")
BINARY = ("add", "mul")
OP_KINDS = ("linear", "unary", "binary", "scale", "where", "sum", "mean", "dot", "concat_linear", "attention",
            "inner_rnn")
UPDATES = ("never", "input", "any", "self", "accum")


# -- programs as data ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Leaf:
    """One state leaf: its type, initial value and how the body updates it.

    init: ``zeros`` (``ll.zeros([D])``, no batch dim), ``full`` (``ll.full(0.25, [D])``), ``number``
    (a Python float, scalars only), ``input`` (computed from the input ``u`` outside the loop, with the
    batch dim). update: ``never`` (never assigned), ``input`` (a value depending on inputs only),
    ``any`` (any value of its type), ``self`` (through a nonlinearity of itself), ``accum``
    (itself plus a value: a running sum).
    """

    type: str
    init: str
    update: str


@dataclass(frozen=True)
class Group:
    """A state variable: one leaf (``single``), or a nested structure of two (``tuple``, ``dict``)."""

    structure: str
    leaves: tuple[Leaf, ...]


@dataclass(frozen=True)
class Op:
    """``kind`` applied to the pool values ``args``; ``param`` is op-specific (see :func:`_emit`)."""

    kind: str
    args: tuple[int, ...]
    param: tuple = ()


@dataclass(frozen=True)
class End:
    """The end condition: for ``value``: ``pool[arg] > thr``; for ``index``: ``loop.index >= lim``;
    for ``counter``: ``counter >= lim`` (the counter after its increment), or'ed with ``pool[arg] > thr``
    if `arg`."""

    kind: str
    include_eos: bool
    arg: int | None = None
    thr: float = 0.0


@dataclass(frozen=True)
class Masked:
    """A MaskedComputation block: ``ops[first:last]`` run inside ``with ll.MaskedComputation(mask=pool[mask_arg]
    > thr):``. `mask_arg` is a scalar pool value made before the block (an input frame, the step index, the
    counter, a state leaf or an earlier op). With `assign_inside` the block goes on to the end of the ops
    (`last` is ``len(ops)``) and the states are assigned in it too (the counter's increment and the end
    condition come after it). Unless `frames_inside`, the loop's own values the block uses (frames, step
    index, counter) are made before it; with it, those first used in the block are made in it (``loop.unstack``
    and ``loop.index`` in the block: values of the block, held where used after it)."""

    first: int
    last: int
    mask_arg: int
    thr: float
    assign_inside: bool = False
    frames_inside: bool = False


@dataclass(frozen=True)
class Program:
    loop: str                          # "axis" (Loop(axis=T)), "static" (Loop(axis=W)) or "max_len"
                                       # (Loop(max_seq_len=...))
    groups: tuple[Group, ...]
    ops: tuple[Op, ...]
    updates: tuple[int | None, ...]    # per leaf (in order): the pool index of its new value, None: never set
    stacks: tuple[int, ...]
    lasts: tuple[int, ...]
    end: End | None
    max_len: str = "int"               # loops without axis: "int" (MAX_LEN) or "tensor" (lim + 1, per entry)
    keys_inside: bool = False          # attention keys computed in the body (hoisted) or before the loop
    counter: bool = False              # the int state `counter` (always in loops without axis)
    stack_new: tuple[int, ...] = ()    # leaves whose new value (read after the assignment) is stacked
    second: bool = False               # a second loop, an RNN over the first stacked value
    finals: bool = True                # the final states are outputs (else nothing reads them)
    stack_index: bool = False          # loop.index (int) is stacked
    axis_max_len: bool = False         # a loop over an axis gets a max_seq_len too (lim + 10)
    masked: Masked | None = None       # a MaskedComputation block in the body

    @property
    def leaves(self) -> list[Leaf]:
        return [leaf for g in self.groups for leaf in g.leaves]


@dataclass(frozen=True)
class Info:
    """What the generator knows of a pool value: its type and what it depends on."""

    type: str
    states: frozenset = frozenset()    # leaves that are assigned in the body, read (transitively)
    seq: bool = False                  # depends on frames or the step index of a loop over an axis
    core: bool = False                 # depends on a value the pass keeps in the loop though no state: the
                                       # step index or counter of a loop without axis, a nested loop
    captured: bool = False             # a value from outside the loop (not a body value)
    usable: bool = True                # (the counter of a program without it)
    parents: tuple[int, ...] = ()

    def input_only(self) -> bool:
        return not self.states and not self.core


COUNTER = -1   # the counter, among the states a value depends on


def _base_infos(loop: str, counter: bool) -> list[Info]:
    """axis: x_t, x2_t, index, u, counter; max_len: index, counter, u."""
    if loop != "max_len":
        return [Info(X_TYPE, seq=True), Info(SCALAR, seq=True), Info(SCALAR, seq=True),
                Info(U_TYPE, captured=True), Info(SCALAR, frozenset([COUNTER]), usable=counter)]
    return [Info(SCALAR, core=True), Info(SCALAR, frozenset([COUNTER]), core=True), Info(U_TYPE, captured=True)]


def _combine(op: Op, kind_type: str, infos: list[Info]) -> Info:
    parts = [infos[a] for a in op.args]
    # (a nested loop on inputs only runs before the loop, over the whole sequence, like any other op)
    core = any(p.core for p in parts)
    return Info(kind_type, frozenset().union(*(p.states for p in parts)), any(p.seq for p in parts), core,
                False, tuple(op.args))


def op_type(op: Op, infos: list[Info]) -> str:
    """The type of the op's result."""
    k = op.kind
    if k in ("linear", "concat_linear"):
        return op.param[0]
    if k in ("sum", "mean", "dot"):
        return SCALAR
    if k == "attention":
        return ENC_TYPE
    if k == "inner_rnn":
        return infos[op.args[0]].type
    if k in ("binary", "where"):
        return next((infos[i].type for i in op.args if infos[i].type != SCALAR), SCALAR)
    return infos[op.args[0]].type


def infos_of(prog: Program) -> list[Info]:
    """The generator's view of every pool value of `prog`."""
    infos = _base_infos(prog.loop, prog.counter)
    for k, leaf in enumerate(prog.leaves):
        infos.append(Info(leaf.type, frozenset() if leaf.update == "never" else frozenset([k])))
    for op in prog.ops:
        infos.append(_combine(op, op_type(op, infos), infos))
    return infos


def _block_values(prog: Program) -> set[int]:
    """The pool values made in the masked block: its ops' results and, with `frames_inside`, the loop's own
    values first used in it."""
    block = prog.masked
    if block is None:
        return set()
    base = _base_infos(prog.loop, prog.counter)
    n_pre = len(base) + len(prog.leaves)
    made = set(range(n_pre + block.first, n_pre + block.last))
    if block.frames_inside:
        before = {a for op in prog.ops[:block.first] for a in op.args} | {block.mask_arg}
        used = {a for op in prog.ops[block.first:block.last] for a in op.args}
        used |= {i for i in prog.updates if i is not None} if block.assign_inside else set()
        made |= {i for i in used - before if i < len(base) and not base[i].captured}
    return made


def _used_after_block(prog: Program) -> set[int]:
    """The pool values used in the body after the masked block (where a block value is its held value)."""
    block = prog.masked
    if block is None:
        return set()
    used = {a for op in prog.ops[block.last:] for a in op.args} | set(prog.stacks)
    used |= {prog.end.arg} if prog.end is not None and prog.end.arg is not None else set()
    return used | (set() if block.assign_inside else {i for i in prog.updates if i is not None})


# -- the strategy ---------------------------------------------------------------------------------------

_types = st.sampled_from(VEC_TYPES + (SCALAR,))


@st.composite
def leaves(draw) -> Leaf:
    typ = draw(_types)
    inits = ("zeros", "full", "input") + (("number",) if typ == SCALAR else ())
    return Leaf(typ, draw(st.sampled_from(inits)), draw(st.sampled_from(UPDATES)))


@st.composite
def groups(draw) -> Group:
    structure = draw(st.sampled_from(("single", "single", "tuple", "dict")))
    n = 1 if structure == "single" else 2
    return Group(structure, tuple(draw(leaves()) for _ in range(n)))


class _Gen:
    """Draws ops onto a growing pool, keeping `infos` (one per pool value) in step."""

    def __init__(self, draw, loop: str, counter: bool, leaves_: list[Leaf]):
        self.draw, self.loop = draw, loop
        self.infos = _base_infos(loop, counter)
        self.n_base = len(self.infos)
        for k, leaf in enumerate(leaves_):
            self.infos.append(Info(leaf.type, frozenset() if leaf.update == "never" else frozenset([k])))
        self.ops: list[Op] = []

    def pick(self, pred) -> int | None:
        """A pool value for which `pred` holds (often one of the latest, so that chains of ops form)."""
        cands = [i for i, info in enumerate(self.infos) if info.usable and pred(info)]
        if not cands:
            return None
        if len(cands) > 3 and self.draw(st.booleans()):
            cands = cands[-3:]
        return cands[self.draw(st.integers(0, len(cands) - 1))]

    def add(self, op: Op) -> int:
        self.ops.append(op)
        self.infos.append(_combine(op, op_type(op, self.infos), self.infos))
        return len(self.infos) - 1

    def random_op(self) -> int | None:
        draw = self.draw
        kind = draw(st.sampled_from(OP_KINDS))
        is_vec = lambda i: i.type != SCALAR  # noqa: E731
        if kind == "linear":
            a = self.pick(is_vec)
            return self.add(Op("linear", (a,), (draw(st.sampled_from(VEC_TYPES)), draw(st.booleans()))))
        if kind == "unary":
            return self.add(Op("unary", (self.pick(lambda i: True),), (draw(st.sampled_from(UNARY)),)))
        if kind == "scale":
            return self.add(Op("scale", (self.pick(lambda i: True),), (draw(st.sampled_from((0.5, -1.5, 2.0))),)))
        if kind == "binary":
            a = self.pick(lambda i: True)
            ta = self.infos[a].type
            b = self.pick(lambda i: i.type in (ta, SCALAR) or ta == SCALAR)
            return self.add(Op("binary", (a, b), (draw(st.sampled_from(BINARY)),)))
        if kind == "where":   # where(c > 0, a, b)
            a = self.pick(lambda i: True)
            ta = self.infos[a].type
            b = self.pick(lambda i: i.type in (ta, SCALAR) or ta == SCALAR)
            t = ta if ta != SCALAR else self.infos[b].type
            c = self.pick(lambda i: i.type in (t, SCALAR) or t == SCALAR)
            tc = self.infos[c].type
            if t != SCALAR or tc == SCALAR:
                return self.add(Op("where", (c, a, b)))
            return self.add(Op("where", (a, c, b) if ta == SCALAR else (b, a, c)))   # (a vector cond, scalars)
        if kind in ("sum", "mean"):
            return self.add(Op(kind, (self.pick(is_vec),)))
        if kind == "dot":
            a = self.pick(is_vec)
            ta = self.infos[a].type
            return self.add(Op("dot", (a, self.pick(lambda i: i.type == ta))))
        if kind == "concat_linear":
            a, b = self.pick(is_vec), self.pick(is_vec)
            return self.add(Op("concat_linear", (a, b), (draw(st.sampled_from(VEC_TYPES)),)))
        if kind in ("attention", "inner_rnn"):
            return self.add(Op(kind, (self.pick(is_vec),)))
        raise AssertionError(kind)

    def value_of_type(self, typ: str, input_only: bool) -> int:
        """A pool value of type `typ` (depending on inputs only if `input_only`); made if there is none."""
        ok = (lambda i: i.type == typ and i.input_only()) if input_only else (lambda i: i.type == typ)
        found = self.pick(ok)
        if found is not None:
            return found
        src = self.pick(lambda i: i.type != SCALAR and (i.input_only() or not input_only))
        if typ == SCALAR:
            return self.add(Op("sum", (src,)))
        return self.add(Op("linear", (src,), (typ, False)))


@st.composite
def programs(draw, loop: str, end: bool | None = None, masked: bool | None = None) -> Program:
    """A random loop program; `loop`: ``axis``, ``static`` or ``max_len``; `end`: whether a loop over an axis
    calls ``loop.end``; `masked`: whether the body has a masked block (None: drawn, one program in three)."""
    gs = tuple(draw(st.lists(groups(), min_size=0, max_size=3)))
    leaves_ = [leaf for g in gs for leaf in g.leaves]
    counter = loop == "max_len" or draw(st.booleans())
    gen = _Gen(draw, loop, counter, leaves_)
    for _ in range(draw(st.integers(0, 10))):
        gen.random_op()
    updates: list[int | None] = []
    for k, leaf in enumerate(leaves_):
        read = gen.n_base + k
        if leaf.update == "never":
            updates.append(None)
        elif leaf.update in ("input", "any"):
            updates.append(gen.value_of_type(leaf.type, leaf.update == "input"))
        elif leaf.update == "accum":
            other = gen.pick(lambda i, leaf=leaf: i.type in (leaf.type, SCALAR))
            updates.append(gen.add(Op("binary", (read, other), ("add",))))
        else:  # self: a nonlinearity of itself (mixed with another value)
            if leaf.type == SCALAR:
                mixed = gen.add(Op("binary", (read, gen.pick(lambda i: i.type == SCALAR)), ("mul",)))
            else:
                lin = gen.add(Op("linear", (read,), (leaf.type, draw(st.booleans()))))
                same = gen.pick(lambda i, leaf=leaf: i.type in (leaf.type, SCALAR))
                mixed = gen.add(Op("binary", (lin, same), ("add",)))
            updates.append(gen.add(Op("unary", (mixed,), (draw(st.sampled_from(("tanh", "sigmoid"))),))))
    for _ in range(draw(st.integers(0, 3))):   # readouts: ops that feed no state (only stacks, lasts, the end)
        gen.random_op()
    usable = [i for i, info in enumerate(gen.infos) if info.usable]
    stacks = tuple(gen.pick(lambda i: True) for _ in range(draw(st.integers(1, 3))))
    stack_new = tuple(draw(st.lists(st.integers(0, len(leaves_) - 1), max_size=1))) if leaves_ else ()
    lasts = tuple(draw(st.lists(st.sampled_from([i for i in usable if not gen.infos[i].captured]), max_size=2)))
    scalars = [i for i in usable if gen.infos[i].type == SCALAR]
    thresholds = st.sampled_from((-0.5, 0.0, 0.5, 1.0))
    end_spec = None
    if loop == "max_len":
        end_spec = End("counter", draw(st.booleans()), draw(st.one_of(st.none(), st.sampled_from(scalars))),
                       draw(thresholds))
    elif end if end is not None else draw(st.booleans()):
        kind = draw(st.sampled_from(("index", "value", "counter") if counter else ("index", "value")))
        if kind == "index":
            end_spec = End("index", draw(st.booleans()))
        elif kind == "value":
            end_spec = End("value", draw(st.booleans()), draw(st.sampled_from(scalars)), draw(thresholds))
        else:
            end_spec = End("counter", draw(st.booleans()), draw(st.one_of(st.none(), st.sampled_from(scalars))),
                           draw(thresholds))
    prog = Program(loop, gs, tuple(gen.ops), tuple(updates), stacks, lasts, end_spec,
                   max_len=draw(st.sampled_from(("int", "tensor"))) if loop == "max_len" else "int",
                   keys_inside=draw(st.booleans()), counter=counter, stack_new=stack_new,
                   second=draw(st.booleans()), finals=draw(st.booleans()), stack_index=draw(st.booleans()),
                   axis_max_len=loop != "max_len" and draw(st.booleans()))
    if draw(st.integers(0, 2)) == 2 if masked is None else masked:
        prog = replace(prog, masked=_masked_block(draw, prog))
    return prog


def _masked_block(draw, prog: Program) -> Masked:
    """A masked block over some consecutive ops of `prog`. Three times in four, the best span there is: one
    that can run over T' (if its mask is an input), else one with a live op."""
    infos = infos_of(prog)
    n_ops = len(prog.ops)
    n_pre = len(infos) - n_ops
    assign_inside = draw(st.booleans())
    live = _live(prog)

    def is_live(first: int, last: int) -> bool:
        return any(n_pre + j in live for j in range(first, last))

    def over_masked_dim(first: int, last: int) -> bool:   # live, on inputs and its own states, no nested loop
        inside = range(n_pre + first, n_pre + last)
        own = {n_pre - len(prog.updates) + k for k, u in enumerate(prog.updates) if assign_inside and u in inside}
        outer = {a for op in prog.ops[first:last] for a in op.args if a not in inside}
        return (is_live(first, last) and all(op.kind != "inner_rnn" for op in prog.ops[first:last])
                and all(infos[a].input_only() or a in own for a in outer))

    spans = [(first, last) for first in range(n_ops + 1)
             for last in ([n_ops] if assign_inside else range(first, n_ops + 1))]
    best = next(tier for tier in ([s for s in spans if over_masked_dim(*s)], [s for s in spans if is_live(*s)],
                                  spans) if tier)
    first, last = draw(st.sampled_from(best if draw(st.integers(0, 3)) < 3 else spans))
    scalars = [i for i, info in enumerate(infos[:n_pre + first]) if info.usable and info.type == SCALAR]
    # Often the frame x2_t, an input: a block on inputs and its own states then runs over T'.
    mask_arg = 1 if prog.loop != "max_len" and draw(st.booleans()) else draw(st.sampled_from(scalars))
    return Masked(first, last, mask_arg, draw(st.sampled_from((-0.5, 0.0, 0.5))), assign_inside,
                  frames_inside=draw(st.integers(0, 3)) == 3)


# -- building the looplift function ------------------------------------------------------------------------

class Model:
    """The parameters of a program (made before tracing) and the looplift function it describes."""

    def __init__(self, prog: Program, seed: int):
        self.prog = prog
        torch.manual_seed(seed)
        self.modules: dict = {}
        self.op_module: dict[int, ll.nn.Linear] = {}
        infos = _base_infos(prog.loop, prog.counter) + [Info(leaf.type) for leaf in prog.leaves]
        for j, op in enumerate(prog.ops):
            if op.kind == "linear":
                din, dout = infos[op.args[0]].type, op.param[0]
                key = ("linear", din, dout) if op.param[1] else ("linear", j)
                self.op_module[j] = self._module(key, FDIMS[din], FDIMS[dout])
            elif op.kind == "concat_linear":
                da, db = (infos[a].type for a in op.args)
                self.op_module[j] = self._module(("cat", j), FDIMS[da] + FDIMS[db], FDIMS[op.param[0]])
            elif op.kind == "attention":
                q = infos[op.args[0]].type
                self.op_module[j] = self._module(("key", q), FDIMS[ENC_TYPE], FDIMS[q])
            elif op.kind == "inner_rnn":
                d = FDIMS[infos[op.args[0]].type]
                self.op_module[j] = self._module(("inner", j), d + FDIMS[ENC_TYPE], d)
            infos.append(Info(op_type(op, infos)))
        for leaf in prog.leaves:
            if leaf.init == "input" and leaf.type != SCALAR:
                self._module(("init", leaf.type), FDIMS[U_TYPE], FDIMS[leaf.type])
        if prog.second:
            self._module(("second_rec",), FDIMS["H"], FDIMS["H"])
            if infos[prog.stacks[0]].type != SCALAR:
                self._module(("second_in",), FDIMS[infos[prog.stacks[0]].type], FDIMS["H"])

    def _module(self, key, din: ll.Dim, dout: ll.Dim) -> ll.nn.Linear:
        if key not in self.modules:
            self.modules[key] = ll.nn.Linear(din, dout).double()
        return self.modules[key]

    # -- the function, traced by looplift

    def _initial(self, leaf: Leaf, u):
        if leaf.type == SCALAR:
            return {"zeros": lambda: ll.zeros([]), "full": lambda: ll.full(0.25, []), "number": lambda: 0.5,
                    "input": lambda: ll.sum(u, axis=FDIMS[U_TYPE]) * 0.3}[leaf.init]()
        d = FDIMS[leaf.type]
        if leaf.init == "zeros":
            return ll.zeros([d])
        if leaf.init == "full":
            return ll.full(0.25, [d])
        return ll.tanh(self.modules[("init", leaf.type)](u))

    def __call__(self, x, x2, enc, u, lim):
        prog = self.prog
        if prog.loop != "max_len":
            loop = ll.Loop(axis=W if prog.loop == "static" else T, max_seq_len=lim + 10 if prog.axis_max_len else None)
        else:
            loop = ll.Loop(max_seq_len=MAX_LEN if prog.max_len == "int" else lim + 1)
        self.source = loop.source
        names = []   # per leaf: (its state's name, its place in the state's structure)
        for g, group in enumerate(prog.groups):
            inits = [self._initial(leaf, u) for leaf in group.leaves]
            setattr(loop.state, f"g{g}", _structure(group.structure, inits))
            names += [(f"g{g}", j) for j in range(len(group.leaves))]
        if prog.counter:
            loop.state.counter = 0
        keys = {}
        if not prog.keys_inside:
            keys = {j: m(enc) for j, m in self.op_module.items() if prog.ops[j].kind == "attention"}
        with loop:
            pool = _Pool(self, loop, x, x2, enc, u, keys, names)
            block = prog.masked
            first, last = (block.first, block.last) if block is not None else (len(prog.ops),) * 2
            pool.emit_ops(0, first)
            if block is not None:
                with ll.MaskedComputation(mask=pool.before_block(block)):
                    pool.emit_ops(first, last)
                    if block.assign_inside:
                        self._assign_states(loop, pool)
            pool.emit_ops(last, len(prog.ops))
            if block is None or not block.assign_inside:
                self._assign_states(loop, pool)
            if prog.counter:
                loop.state.counter = loop.state.counter + 1
            end = prog.end
            if end is not None:
                if end.kind == "counter":
                    cond = loop.state.counter >= lim
                    if end.arg is not None:
                        cond = cond | (pool[end.arg] > end.thr)
                else:
                    cond = loop.index >= lim if end.kind == "index" else pool[end.arg] > end.thr
                loop.end(cond, include_eos=end.include_eos)
            stacks = [loop.stack(pool[i]) for i in prog.stacks]
            if prog.stack_index:
                stacks.append(loop.stack(loop.index))
            for k in prog.stack_new:   # a state read after its assignment: its new value
                name, j = names[k]
                stacks.append(loop.stack(_as_float(_leaves_of(prog.groups[int(name[1:])].structure,
                                                              getattr(loop.state, name))[j])))
            # (loop.last of a block value takes its held value, which exists only if it is used after the block)
            unheld = _block_values(prog) - _used_after_block(prog)
            last_values = [ll.identity(pool[i]) if i in unheld else pool[i] for i in prog.lasts]
        lasts = [loop.last(v) for v in last_values]
        finals = tuple(getattr(loop.state, f"g{g}") for g in range(len(prog.groups))) if prog.finals else ()
        loss = ll.zeros([])
        for y in stacks + lasts:
            loss = loss + loss_term(y)
        for g in finals:
            for leaf in _leaves_of_tree(g):
                loss = loss + loss_term(leaf) * 0.5
        counter = (loop.state.counter,) if prog.counter and prog.finals else ()
        second = self._second_loop(loop.axis, stacks[0]) if prog.second else ()
        for y in second:
            loss = loss + loss_term(y)
        return loss, tuple(stacks), finals, tuple(lasts), counter, second

    def _assign_states(self, loop: ll.Loop, pool: _Pool) -> None:
        """Each state whose leaves get new values is assigned (as a whole: its other leaves unchanged)."""
        prog = self.prog
        new = {k: pool[idx] for k, idx in enumerate(prog.updates) if idx is not None}
        k = 0
        for g, group in enumerate(prog.groups):
            ks = list(range(k, k + len(group.leaves)))
            k += len(group.leaves)
            if any(j in new for j in ks):
                current = _leaves_of(group.structure, getattr(loop.state, f"g{g}"))
                setattr(loop.state, f"g{g}",
                        _structure(group.structure, [new.get(j, current[i]) for i, j in enumerate(ks)]))

    def _second_loop(self, axis: ll.Dim, y):
        """An RNN over the first loop's stacked `y` (over its axis: `time`, or the dim its end made)."""
        loop = ll.Loop(axis=axis)
        loop.state.h = ll.zeros([FDIMS["H"]])
        with loop:
            y_t = loop.unstack(y)
            x_t = self.modules[("second_in",)](y_t) if ("second_in",) in self.modules else y_t * 0.5
            loop.state.h = ll.tanh(x_t + self.modules[("second_rec",)](loop.state.h))
            z = loop.stack(loop.state.h * 0.5)
        return z, loop.state.h


def loss_term(y):
    """A scalar from `y` (summed over valid positions only), not linear in it."""
    y = ll.cast(y, DTYPE) if isinstance(y, ll.Tensor) else ll.full(float(y), [])
    term = y + y * y * 0.25
    while term.dims:   # summing over a dynamic dim may add the dims of its lengths (a stacked index: the batch)
        term = ll.sum(term, axis=list(term.dims))
    return term


def _structure(structure: str, leaves_: list):
    if structure == "single":
        return leaves_[0]
    if structure == "tuple":
        return (leaves_[0], leaves_[1])
    return {"a": leaves_[0], "b": {"c": leaves_[1]}}


def _leaves_of(structure: str, value) -> list:
    if structure == "single":
        return [value]
    if structure == "tuple":
        return [value[0], value[1]]
    return [value["a"], value["b"]["c"]]


def _leaves_of_tree(value) -> list:
    leaves_, _ = flatten(value, lambda v: isinstance(v, ll.Tensor))
    return leaves_


class _Pool:
    """The body's values, made when first used (so unused inputs make no nodes)."""

    def __init__(self, model: Model, loop: ll.Loop, x, x2, enc, u, keys: dict, names: list):
        self.model, self.loop, self.enc, self.keys = model, loop, enc, keys
        prog = model.prog
        counter = loop.state.counter if prog.counter else None   # read now, before its assignment
        count = lambda: ll.cast(counter, DTYPE)  # noqa: E731
        if prog.loop != "max_len":
            makers = [lambda: loop.unstack(x), lambda: loop.unstack(x2),
                      lambda: ll.cast(loop.index, DTYPE), lambda: u, count]
        else:
            makers = [lambda: ll.cast(loop.index, DTYPE), count, lambda: u]
        self.makers = makers
        self.n_base = len(makers)
        self.values: dict[int, ll.Tensor] = {}
        for name, j in names:   # read now: a read after the state's assignment would give the new value
            self.values[len(makers)] = self._read(name, j)
            makers.append(None)
        self.n_ops = 0

    def _read(self, name: str, j: int):
        structure = self.model.prog.groups[int(name[1:])].structure
        return _leaves_of(structure, getattr(self.loop.state, name))[j]

    def __getitem__(self, i: int):
        if i not in self.values:
            self.values[i] = self.makers[i]()
        return self.values[i]

    def emit_ops(self, start: int, stop: int) -> None:
        """Emit ``ops[start:stop]`` (the ops before them are emitted)."""
        assert self.n_ops == start, (self.n_ops, start)
        for op in self.model.prog.ops[start:stop]:
            j = self.n_ops
            self.n_ops += 1
            self.values[len(self.makers)] = _emit(op, [self[a] for a in op.args], self.model.op_module.get(j),
                                                  self.keys.get(j), self.enc)
            self.makers.append(None)

    def before_block(self, block: Masked):
        """The block's mask; unless `block.frames_inside`, the loop's own values the block uses are made now."""
        prog = self.model.prog
        if not block.frames_inside:
            used = [a for op in prog.ops[block.first:block.last] for a in op.args]
            if block.assign_inside:
                used += [i for i in prog.updates if i is not None]
            for i in used:
                if i < self.n_base:
                    self[i]
        return _as_float(self[block.mask_arg]) > block.thr


def _as_float(v):
    return v if isinstance(v, ll.Tensor) else ll.full(float(v), [])


def _emit(op: Op, args: list, module, keys, enc):
    k = op.kind
    args = [_as_float(a) for a in args]
    if k == "linear":
        return module(args[0])
    if k == "unary":
        a = args[0]
        return {"tanh": ll.tanh, "sigmoid": ll.sigmoid, "relu": ll.relu,
                "exp_small": lambda v: ll.exp(ll.tanh(v))}[op.param[0]](a)
    if k == "scale":
        return args[0] * op.param[0]
    if k == "binary":
        return args[0] + args[1] if op.param[0] == "add" else args[0] * args[1]
    if k == "where":
        return ll.where(args[0] > 0.0, args[1], args[2])
    if k in ("sum", "mean"):
        a = args[0]
        d = next(d for d in a.dims if d in FDIMS.values())
        return (ll.sum if k == "sum" else ll.mean)(a, axis=d)
    if k == "dot":
        d = next(d for d in args[0].dims if d in FDIMS.values())
        return ll.dot(args[0], args[1], reduce=d)
    if k == "concat_linear":
        a, b = args
        da = next(d for d in a.dims if d in FDIMS.values())
        db = next(d for d in b.dims if d in FDIMS.values())
        return module(ll.concat(a, b, axis=[da, db]))
    if k == "attention":
        q = args[0]
        dq = next(d for d in q.dims if d in FDIMS.values())
        if keys is None:
            keys = module(enc)
        weights = ll.softmax(ll.dot(q, keys, reduce=dq), axis=S)
        return ll.dot(weights, enc, reduce=S)
    if k == "inner_rnn":   # a loop nested in the body: an RNN over the encoder, starting from the operand
        a = args[0]
        d = next(d for d in a.dims if d in FDIMS.values())
        inner = ll.Loop(axis=S)
        inner.state.acc = a
        with inner:
            e = inner.unstack(enc)
            inner.state.acc = ll.tanh(module(ll.concat(inner.state.acc, e, axis=[d, FDIMS[ENC_TYPE]])))
        return inner.state.acc
    raise AssertionError(k)


# -- running and comparing -----------------------------------------------------------------------------------

@dataclass
class Data:
    """The inputs of one call: per-entry lengths of ``time`` and of the encoder, limits, a seed; with
    `static`, ``x`` and ``x2`` are over ``window`` (all of it valid) instead of ``time``."""

    lengths: list[int]
    enc_lengths: list[int]
    limits: list[int]
    pad: int = 0
    seed: int = 0
    static: bool = False

    def make(self) -> dict:
        g = torch.Generator().manual_seed(self.seed)
        n = len(self.lengths)
        t_max = W.size if self.static else max(self.lengths, default=0) + self.pad
        s_max = max(self.enc_lengths) + self.pad
        f, h = FDIMS[X_TYPE].size, FDIMS[ENC_TYPE].size
        return {
            "x": torch.randn(n, t_max, f, generator=g, dtype=DTYPE),
            "x2": torch.randn(n, t_max, generator=g, dtype=DTYPE),
            "enc": torch.randn(n, s_max, h, generator=g, dtype=DTYPE),
            "u": torch.randn(n, FDIMS[U_TYPE].size, generator=g, dtype=DTYPE) * 0.5,
        }

    def named(self, t: dict) -> list[ll.Named]:
        n_t, n_s = torch.tensor(self.lengths, dtype=torch.int64), torch.tensor(self.enc_lengths, dtype=torch.int64)
        axis, lengths = (W, {}) if self.static else (T, {T: n_t})
        return [ll.Named(t["x"], (B, axis, FDIMS[X_TYPE]), lengths), ll.Named(t["x2"], (B, axis), lengths),
                ll.Named(t["enc"], (B, S, FDIMS[ENC_TYPE]), {S: n_s}), ll.Named(t["u"], (B, FDIMS[U_TYPE])),
                ll.Named(torch.tensor(self.limits, dtype=torch.int64), (B,))]


def named_leaves(value) -> list[ll.Named]:
    leaves_, _ = flatten(value, lambda v: isinstance(v, ll.Named))
    return [v for v in leaves_ if isinstance(v, ll.Named)]


def _masked(x: ll.Named, order) -> torch.Tensor:
    t = x.align(*order)
    m = x.mask().permute([x.dims.index(d) for d in order])
    return torch.where(m, t, torch.zeros((), dtype=t.dtype))


RTOL, ATOL = 1e-9, 1e-12


def _close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = ATOL) -> None:
    if a.dtype.is_floating_point:
        assert_close(a, b, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")
    else:
        assert torch.equal(a, b), f"{what}: {a} != {b}"


def run(prog: ll.Program, params: list, tensors: dict, named, *, reference: bool):
    """Run `prog` (or its reference) on `named(tensors)`, with fresh leaves of `tensors` that need gradients;
    its first output is the loss. Returns (outputs, gradients of the loss w.r.t. `params` and `tensors`)."""
    tensors = {k: v.clone().requires_grad_() for k, v in tensors.items()}
    out = (prog.reference if reference else prog)(*named(tensors))
    loss = out[0].tensor
    wrt = list(params) + list(tensors.values())
    grads = [None] * len(wrt)
    if loss.requires_grad:   # (not when no parameter nor input reaches it, e.g. all lengths 0)
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return out, [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads)]


def assert_equivalent(prog: ll.Program, params: dict, tensors: dict, named) -> None:
    """The optimized run of `prog` gives the outputs and gradients of its reference run, and no loop was
    left unoptimized. `params`: name -> parameter; `tensors`: name -> float input; `named(tensors)`: the
    program's arguments; its first output is a scalar loss. Outputs are compared at valid positions, the
    gradients everywhere (those of padding are zero in the reference)."""
    out, grads = run(prog, params.values(), tensors, named, reference=False)
    ref, ref_grads = run(prog, params.values(), tensors, named, reference=True)
    la, lb = named_leaves(out), named_leaves(ref)
    assert len(la) == len(lb)
    for i, (a, b) in [*enumerate(zip(la, lb))][1:] + [(0, (la[0], lb[0]))]:   # the loss last
        assert set(a.dims) == set(b.dims), (i, a.dims, b.dims)
        assert set(a.lengths) == set(b.lengths), (i, a.lengths, b.lengths)
        for d in a.lengths:
            assert torch.equal(a.lengths[d], b.lengths[d]), (i, d, a.lengths[d], b.lengths[d])
        ma, mb = _masked(a, a.dims), _masked(b, a.dims)
        scale = max([1.0, float(mb.detach().abs().max())] if mb.numel() and mb.dtype.is_floating_point else [1.0])
        _close(ma, mb, f"output {i} over {[d.name for d in a.dims]}", atol=ATOL * scale)
    # Rounding is relative to the largest gradient: a gradient that is zero analytically (that of the keys'
    # bias in attention, softmax being invariant to it) comes out as a rounding error of larger terms.
    scale = max([1.0] + [float(r.detach().abs().max()) for r in ref_grads if r.numel()])
    for name, g, r in zip([*params, *tensors], grads, ref_grads):
        _close(g, r, f"gradient of {name}", atol=ATOL * scale)
    explain = prog.explain()
    assert "not optimized" not in explain, explain
    assert all(report.not_optimized is None for report in prog.traces[-1].optimized.reports), explain


def _live(prog: Program) -> set[int]:
    """The pool values of `prog` that its outputs need."""
    infos = infos_of(prog)
    n_base = len(_base_infos(prog.loop, prog.counter))
    todo = [*prog.stacks, *prog.lasts, *(prog.updates[k] for k in prog.stack_new)]
    if prog.finals:
        todo += prog.updates
    # (In a loop over an axis, the end condition decides only the lasts and the final states that change.)
    changing = [k for k, u in enumerate(prog.updates) if u is not None and u != n_base + k]
    end_needed = prog.loop == "max_len" or prog.lasts or (prog.finals and (changing or prog.counter))
    if prog.end is not None and prog.end.arg is not None and end_needed:
        todo.append(prog.end.arg)
    live: set[int] = set()
    while todo:
        i = todo.pop()
        if i is None or i in live:
            continue
        live.add(i)
        todo += infos[i].parents
        if n_base <= i < n_base + len(prog.updates):   # a state read: its new value is needed
            todo.append(prog.updates[i - n_base])
    return live


def moveable(prog: Program) -> bool:
    """Whether the body has a live op that depends on inputs only (which the optimizer moves out: in a
    masked block too, with the block over T' or on its own)."""
    infos = infos_of(prog)
    n_pre = len(infos) - len(prog.ops)
    return any(i >= n_pre and infos[i].input_only() for i in _live(prog))


def check(spec: Program, data: Data, seed: int = 0) -> ll.Program:
    """Build `spec` (parameters from `seed`) and :func:`assert_equivalent` on `data`; if its body computes
    something from inputs only, the optimizer moved something out of the loop (a masked block run over T'
    counts). Returns the program."""
    model = Model(spec, seed)
    prog = ll.compile(model)
    params = {f"{key}.{n}": p for key, m in model.modules.items() for n, p in m.named_parameters()}
    assert_equivalent(prog, params, data.make(), data.named)
    if moveable(spec):
        report = next(r for r in prog.traces[-1].optimized.reports if r.source == model.source)
        moved = [*report.hoisted, *report.before_loop, *report.moved_states, *report.after_loop, *report.sequence_forms,
                 *report.masked]
        assert [m for m in moved if not m.startswith("to_layout")], prog.explain()
    return prog


@st.composite
def data(draw, loop: str) -> Data:
    n = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))
    enc = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    limits = draw(st.lists(st.integers(0, MAX_LEN - 2 if loop == "max_len" else 6), min_size=n, max_size=n))
    return Data(lengths, enc, limits, draw(st.integers(0, 2)), draw(st.integers(0, 2**16)), loop == "static")
