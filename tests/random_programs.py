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
In the align kind (pool 0-8 below; pool 9 ``h``), ::

    Program(loop='align', groups=(Group('single', (Leaf('F', 'zeros', 'self'),)),),
            ops=(Op('linear', (6,), ('F', False)), Op('linear', (9,), ('F', False)),
                 Op('binary', (11, 8), ('add',)), Op('unary', (12,), ('tanh',))),
            updates=(13,), stacks=(10, 13), lasts=(), end=End('counter', True, bound='enc'),
            masked=Masked(first=1, last=4, mask_arg=8, thr=0.0, assign_inside=True), align=Align('blank'))

is the seeds' transducer in small ::

    t, prev, h = loop.state.counter, loop.state.label, loop.state.g0
    label_t = loop.unstack(labels)
    v10 = linear(ll.gather(enc, index=t, axis=enc_time))
    with ll.MaskedComputation(mask=prev != 0):
        v11 = linear(h); v12 = v11 + ll.cast(prev, DTYPE); v13 = tanh(v12)
        loop.state.g0 = v13
    loop.state.label = label_t
    loop.state.counter = t + ll.cast(label_t == 0, "int64")
    loop.end(loop.state.counter >= ll.length(enc_time), include_eos=True)
    loop.stack(v10); loop.stack(v13)

(the optimizer removes the loop: the counter a cumulative sum, the gather over
the whole sequence, the block over ``T'``; checked at run time).

The pool of values a body op may use:

* loops over ``time`` (``Loop(axis=T)``, dynamic) or over ``window`` (``Loop(axis=W)``, static: then
  ``x`` and ``x2`` have ``window`` instead of ``time``): the frames of ``x`` (over ``f``) and
  of ``x2`` (a scalar per frame), the step index (cast to float), the captured
  input ``u`` (over ``h``, from outside the loop), and if the program has one,
  an int counter state ``counter = counter + 1`` (cast to float);
* loops of the ``align`` kind (``Loop(axis=T)``, like a transducer's loop over
  its alignment, :class:`Align`): those five (the counter always there), then

  5. ``acc``, a float state (initially 0.0) advanced by ``acc = acc + pool[a]``
     (a scalar, most often one of frames, labels or the step index: a running
     sum of a sequence value), if the program has it;
  6. ``ll.gather(enc, index=counter, axis=enc_time)``: the encoder frame (over
     ``h``) at the counter, a position in ``enc_time`` (with `clamp`, at
     ``ll.minimum(counter, ll.length(enc_time) - 1)``; else past an entry's
     encoder length it reads the padding, the same in both runs);
  7. ``label_t``: the frame of the int input ``labels`` over (batch, time),
     with ``sparse_dim`` ``vocab`` (0 is the blank), cast to float;
  8. ``prev_label``: the state ``label`` (initially ``FIRST_LABEL``, then
     assigned ``label_t`` each step: the previous frame's label), cast to float.

  The counter is advanced by a sequence-dependent increment,
  ``counter = counter + ll.cast(label_t == BLANK, "int64")`` or
  ``ll.cast(pool[i] > thr, "int64")``, after the states' assignments (the
  counter of the other kinds by 1); the end (:class:`End`) mostly compares it,
  ``loop.end(counter >= bound, include_eos=...)`` with the bound
  ``ll.length(enc_time)``, ``lim`` or ``END_CONST``, else the accumulator
  (``acc > thr``) or a value; a masked
  block's mask is half the time ``label_t != 0`` or ``prev_label != 0`` (the
  transducer's slow LSTM steps on the previous label where it is no blank).
  Where the increments and the end depend on inputs only, the optimizer makes
  the counter a cumulative sum, the gather a sequence op, the end a sequence
  value and the masked block a loop over ``T'``, assuming no entry ends before
  its length along ``time``; it checks that at run time (a ``Cond`` runs the
  loop as traced where one does). Its data (:func:`align_data`) has labels per
  entry, half of them an alignment of the encoder (a counter of blanks then
  ends at the last frame), so batches where some entry ends early and batches
  where none does both come (:func:`ends_early` says which, from the data);
* loops ended by ``loop.end`` (``Loop(max_seq_len=...)``): the step index, the
  counter, ``u``;
* then each state leaf as read at the start of the step, then each op's result.

A program may have a masked block (:class:`Masked`, one program in three; in the
align kind two in three): some consecutive ops run inside
``with ll.MaskedComputation(mask=pool[m] > thr):`` (the mask from an input
frame ``x2_t``, the step index, the counter, a state or an earlier op; in the
align kind also ``label_t != 0`` or ``prev_label != 0``, the pool index 7 or 8
naming the label), optionally with the state assignments too. The pool is
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
V = ll.Dim("vocab", 3)   # the labels of the `align` kind: 0 (blank), 1, 2
BLANK, FIRST_LABEL = 0, 1   # the blank label; the initial value of the previous label (as a transducer's BOS)
END_CONST = 2               # End(bound="const"): counter >= 2
# the `align` kind's pool entries after x_t, x2_t, index, u
COUNTER_AT, ACC_AT, GATHER_AT, LABEL_AT, PREV_AT = 4, 5, 6, 7, 8

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
    for ``counter``: ``counter >= lim`` (the counter after its increment; `bound` ``enc``: ``counter >=
    ll.length(enc_time)``, ``const``: ``counter >= END_CONST``), or'ed with ``pool[arg] > thr`` if `arg`;
    for ``acc`` (the ``align`` kind): ``acc > thr`` (the accumulator after its increment)."""

    kind: str
    include_eos: bool
    arg: int | None = None
    thr: float = 0.0
    bound: str = "lim"


@dataclass(frozen=True)
class Align:
    """What a loop of the ``align`` kind has of a transducer's alignment loop (see the module docstring).

    The counter's increment, after the states' assignments: ``step`` ``blank``: ``ll.cast(label_t == BLANK,
    "int64")``; ``value``: ``ll.cast(pool[step_arg] > step_thr, "int64")``. With `acc`, the float state ``acc``
    (initially 0.0) gets ``acc + pool[acc]`` there too. `clamp`: the gather's index is ``ll.minimum(counter,
    ll.length(enc_time) - 1)`` (else the counter: past an entry's encoder length it reads the padding).
    `init`: the counter and the accumulator start as Python numbers (``number``: 0 and 0.0) or as tensors
    (``tensor``: ``ll.zeros([], dtype="int64")`` and ``ll.zeros([])``). With `stack_counter`, the counter after
    its increment is stacked too (cast to float), and its ``loop.last`` taken."""

    step: str
    step_arg: int | None = None
    step_thr: float = 0.0
    acc: int | None = None
    clamp: bool = False
    init: str = "number"
    stack_counter: bool = False


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
    loop: str                          # "axis" (Loop(axis=T)), "static" (Loop(axis=W)), "max_len"
                                       # (Loop(max_seq_len=...)) or "align" (Loop(axis=T), see `align`)
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
    align: Align | None = None         # the `align` kind: the counter's increment, the accumulator, the gather

    def __post_init__(self):
        assert (self.loop == "align") == (self.align is not None), "the align kind, and only it, has `align`"
        if self.loop == "align":   # (its counter is always there)
            object.__setattr__(self, "counter", True)

    @property
    def leaves(self) -> list[Leaf]:
        return [leaf for g in self.groups for leaf in g.leaves]

    @property
    def label_mask(self) -> bool:
        """Whether the masked block's mask is ``label != 0`` (of the frame's label or the previous one)."""
        return self.loop == "align" and self.masked is not None and self.masked.mask_arg in (LABEL_AT, PREV_AT)


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


COUNTER, ACC = -1, -2   # the counter and the accumulator, among the states a value depends on


def _base_infos(loop: str, counter: bool, acc: bool = False) -> list[Info]:
    """axis: x_t, x2_t, index, u, counter; align: those, acc, the gather at the counter, label_t,
    prev_label; max_len: index, counter, u. (The counter, and what reads it, counts as a state even where
    its increment depends on inputs only and the optimizer makes it a cumulative sum.)"""
    if loop != "max_len":
        base = [Info(X_TYPE, seq=True), Info(SCALAR, seq=True), Info(SCALAR, seq=True),
                Info(U_TYPE, captured=True), Info(SCALAR, frozenset([COUNTER]), usable=counter)]
        if loop == "align":
            base += [Info(SCALAR, frozenset([ACC]), usable=acc),
                     Info(ENC_TYPE, frozenset([COUNTER]), parents=(COUNTER_AT,)),
                     Info(SCALAR, seq=True), Info(SCALAR, seq=True)]   # (prev_label: a moved state)
        return base
    return [Info(SCALAR, core=True), Info(SCALAR, frozenset([COUNTER]), core=True), Info(U_TYPE, captured=True)]


def _base_of(prog: Program) -> list[Info]:
    return _base_infos(prog.loop, prog.counter, prog.align is not None and prog.align.acc is not None)


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
    infos = _base_of(prog)
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
    base = _base_of(prog)
    n_pre = len(base) + len(prog.leaves)
    made = set(range(n_pre + block.first, n_pre + block.last))
    if block.frames_inside:   # (a label mask reads the label itself, not its pool value)
        before = {a for op in prog.ops[:block.first] for a in op.args}
        before |= set() if prog.label_mask else {block.mask_arg}
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
    if prog.align is not None:   # the counter's increment and the accumulator's come after the block
        used |= {i for i in (prog.align.step_arg, prog.align.acc) if i is not None}
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

    def __init__(self, draw, loop: str, counter: bool, leaves_: list[Leaf], acc: bool = False):
        self.draw, self.loop = draw, loop
        self.infos = _base_infos(loop, counter, acc)
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
    """A random loop program; `loop`: ``axis``, ``static``, ``max_len`` or ``align``; `end`: whether a loop
    over an axis calls ``loop.end``; `masked`: whether the body has a masked block (None: drawn, one program in
    three, in the align kind two in three)."""
    gs = tuple(draw(st.lists(groups(), min_size=0, max_size=3)))
    leaves_ = [leaf for g in gs for leaf in g.leaves]
    counter = loop in ("max_len", "align") or draw(st.booleans())
    acc = loop == "align" and draw(st.booleans())
    gen = _Gen(draw, loop, counter, leaves_, acc)
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
    align = _align(draw, gen, acc) if loop == "align" else None
    end_spec = None
    if loop == "align":
        if end if end is not None else draw(st.booleans()):
            end_spec = _align_end(draw, scalars, acc)
    elif loop == "max_len":
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
                   axis_max_len=loop != "max_len" and draw(st.booleans()), align=align)
    if masked is None:   # (one program in three; in the align kind, two in three)
        masked = draw(st.integers(0, 2)) == 2 if loop != "align" else draw(st.integers(0, 2)) > 0
    if masked:
        prog = replace(prog, masked=_masked_block(draw, prog))
    return prog


def _frame_scalar(draw, gen: _Gen) -> int:
    """A scalar pool value for an increment: three times in four one on inputs only (frames, labels, the step
    index: the increment is then a sequence value), else any."""
    inputs_only = draw(st.integers(0, 3)) < 3
    found = gen.pick(lambda i: i.type == SCALAR and (i.input_only() or not inputs_only))
    return found if found is not None else gen.pick(lambda i: i.type == SCALAR)


def _align(draw, gen: _Gen, acc: bool) -> Align:
    """The counter's increment (on the frame's label, or a comparison of a scalar), the accumulator's."""
    step = draw(st.sampled_from(("blank", "value")))
    arg, thr = (_frame_scalar(draw, gen), draw(st.sampled_from((-0.5, 0.0, 0.5)))) if step == "value" else (None, 0.0)
    return Align(step, arg, thr, _frame_scalar(draw, gen) if acc else None, draw(st.booleans()),
                 draw(st.sampled_from(("number", "tensor"))), draw(st.booleans()))


def _align_end(draw, scalars: list[int], acc: bool) -> End:
    """Mostly on the counter (against the encoder length, a limit from the inputs, or a constant); else on the
    accumulator or a scalar value."""
    eos = draw(st.booleans())
    kind = draw(st.sampled_from(("counter",) * 4 + (("acc",) if acc else ()) + ("value",)))
    if kind == "value":
        return End("value", eos, draw(st.sampled_from(scalars)), draw(st.sampled_from((-0.5, 0.0, 0.5, 1.0))))
    if kind == "acc":
        return End("acc", eos, thr=draw(st.sampled_from((0.0, 0.5, 1.0, 2.0))))
    arg = draw(st.sampled_from(scalars)) if draw(st.integers(0, 3)) == 3 else None
    return End("counter", eos, arg, draw(st.sampled_from((0.0, 0.5, 1.0))),
               bound=draw(st.sampled_from(("enc", "enc", "lim", "const"))))


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
    # Often the frame x2_t, an input: a block on inputs and its own states then runs over T'. In the align kind,
    # half the time the label of the frame or the previous one (the mask is then `label != 0`).
    if prog.loop == "align" and draw(st.booleans()):
        mask_arg = draw(st.sampled_from((LABEL_AT, PREV_AT)))
    else:
        mask_arg = 1 if prog.loop != "max_len" and draw(st.booleans()) else draw(st.sampled_from(scalars))
    thr = draw(st.sampled_from((-0.5, 0.0, 0.5)))
    label = prog.loop == "align" and mask_arg in (LABEL_AT, PREV_AT)   # (label != 0: no threshold)
    return Masked(first, last, mask_arg, 0.0 if label else thr, assign_inside,
                  frames_inside=draw(st.integers(0, 3)) == 3)


# -- building the looplift function ------------------------------------------------------------------------

class Model:
    """The parameters of a program (made before tracing) and the looplift function it describes."""

    def __init__(self, prog: Program, seed: int):
        self.prog = prog
        torch.manual_seed(seed)
        self.modules: dict = {}
        self.op_module: dict[int, ll.nn.Linear] = {}
        infos = _base_of(prog) + [Info(leaf.type) for leaf in prog.leaves]
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

    def __call__(self, x, x2, enc, u, lim, labels=None):
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
        numbers = prog.align is None or prog.align.init == "number"
        if prog.counter:
            loop.state.counter = 0 if numbers else ll.zeros([], dtype="int64")
        if prog.align is not None:
            loop.state.label = ll.full(FIRST_LABEL, sparse_dim=V)
            if prog.align.acc is not None:
                loop.state.acc = 0.0 if numbers else ll.zeros([])
        keys = {}
        if not prog.keys_inside:
            keys = {j: m(enc) for j, m in self.op_module.items() if prog.ops[j].kind == "attention"}
        with loop:
            pool = _Pool(self, loop, x, x2, enc, u, keys, names, labels)
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
            if prog.align is not None:
                pool.advance()
            elif prog.counter:
                loop.state.counter = loop.state.counter + 1
            end = prog.end
            if end is not None:
                if end.kind == "counter":
                    bound = {"lim": lim, "enc": ll.length(S), "const": END_CONST}[end.bound]
                    cond = loop.state.counter >= bound
                    if end.arg is not None:
                        cond = cond | (pool[end.arg] > end.thr)
                elif end.kind == "acc":
                    cond = loop.state.acc > end.thr
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
            if prog.align is not None and prog.align.stack_counter:
                new_counter = ll.cast(loop.state.counter, DTYPE)
                stacks.append(loop.stack(new_counter))
                last_values.append(new_counter)
        lasts = [loop.last(v) for v in last_values]
        finals = tuple(getattr(loop.state, f"g{g}") for g in range(len(prog.groups))) if prog.finals else ()
        loss = ll.zeros([])
        for y in stacks + lasts:
            loss = loss + loss_term(y)
        for g in finals:
            for leaf in _leaves_of_tree(g):
                loss = loss + loss_term(leaf) * 0.5
        counter = (loop.state.counter,) if prog.counter and prog.finals else ()
        if prog.align is not None and prog.align.acc is not None and prog.finals:
            counter += (loop.state.acc,)
            loss = loss + loss_term(loop.state.acc) * 0.5
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

    def __init__(self, model: Model, loop: ll.Loop, x, x2, enc, u, keys: dict, names: list, labels=None):
        self.model, self.loop, self.enc, self.keys = model, loop, enc, keys
        prog = model.prog
        counter = loop.state.counter if prog.counter else None   # read now, before its assignment
        self.counter = counter
        count = lambda: ll.cast(counter, DTYPE)  # noqa: E731
        if prog.loop != "max_len":
            makers = [lambda: loop.unstack(x), lambda: loop.unstack(x2),
                      lambda: ll.cast(loop.index, DTYPE), lambda: u, count]
            if prog.align is not None:   # the label and the states are read now (the label before any block)
                self.label, self.prev = loop.unstack(labels), loop.state.label
                self.acc = loop.state.acc if prog.align.acc is not None else None
                makers += [lambda: self.acc, self._gather,
                           lambda: ll.cast(self.label, DTYPE), lambda: ll.cast(self.prev, DTYPE)]
        else:
            makers = [lambda: ll.cast(loop.index, DTYPE), count, lambda: u]
        self.makers = makers
        self.n_base = len(makers)
        self.values: dict[int, ll.Tensor] = {}
        for name, j in names:   # read now: a read after the state's assignment would give the new value
            self.values[len(makers)] = self._read(name, j)
            makers.append(None)
        self.n_ops = 0

    def _gather(self):
        index = self.counter
        if self.model.prog.align.clamp:
            index = ll.minimum(index, ll.length(S) - 1)
        return ll.gather(self.enc, index=index, axis=S)

    def advance(self) -> None:
        """The align kind's assignments after the body's: the previous label, the counter, the accumulator."""
        align, loop = self.model.prog.align, self.loop
        loop.state.label = self.label
        if align.step == "blank":
            step = ll.cast(self.label == BLANK, "int64")
        else:
            step = ll.cast(_as_float(self[align.step_arg]) > align.step_thr, "int64")
        loop.state.counter = self.counter + step
        if align.acc is not None:
            loop.state.acc = self.acc + _as_float(self[align.acc])

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
        if prog.label_mask:
            return (self.label if block.mask_arg == LABEL_AT else self.prev) != BLANK
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
    `static`, ``x`` and ``x2`` are over ``window`` (all of it valid) instead of ``time``; with `labels` (the
    align kind: per entry, its labels over ``time``, as many as its length), the int input ``labels`` over
    (batch, time) with sparse dim ``vocab`` (its padding random)."""

    lengths: list[int]
    enc_lengths: list[int]
    limits: list[int]
    pad: int = 0
    seed: int = 0
    static: bool = False
    labels: list[list[int]] | None = None

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
                ll.Named(torch.tensor(self.limits, dtype=torch.int64), (B,))] + self.named_labels()

    def named_labels(self) -> list[ll.Named]:
        if self.labels is None:
            return []
        assert [len(a) for a in self.labels] == self.lengths, (self.labels, self.lengths)
        g = torch.Generator().manual_seed(self.seed + 1)
        padded = torch.randint(0, V.size, (len(self.lengths), max(self.lengths, default=0) + self.pad), generator=g)
        for b, a in enumerate(self.labels):
            padded[b, :len(a)] = torch.tensor(a, dtype=torch.int64)
        return [ll.Named(padded, (B, T), {T: torch.tensor(self.lengths, dtype=torch.int64)}, sparse_dim=V)]


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


def assert_equivalent(prog: ll.Program, params: dict, tensors: dict, named, *, optimized: bool = True) -> None:
    """The optimized run of `prog` gives the outputs and gradients of its reference run, and (`optimized`)
    no loop was left unoptimized. `params`: name -> parameter; `tensors`: name -> float input;
    `named(tensors)`: the program's arguments; its first output is a scalar loss. Outputs are compared at
    valid positions, the gradients everywhere (those of padding are zero in the reference)."""
    out, grads = run(prog, params.values(), tensors, named, reference=False)
    ref, ref_grads = run(prog, params.values(), tensors, named, reference=True)
    with torch.no_grad():   # (without gradients, kernels may overwrite temporaries of their own)
        plain = prog(*named({k: v.clone() for k, v in tensors.items()}))
    lb = named_leaves(ref)
    for la, how in ((named_leaves(out), ""), (named_leaves(plain), " without gradients")):
        assert len(la) == len(lb)
        for i, (a, b) in [*enumerate(zip(la, lb))][1:] + [(0, (la[0], lb[0]))]:   # the loss last
            assert set(a.dims) == set(b.dims), (i, a.dims, b.dims)
            assert set(a.lengths) == set(b.lengths), (i, a.lengths, b.lengths)
            for d in a.lengths:
                assert torch.equal(a.lengths[d], b.lengths[d]), (i, d, a.lengths[d], b.lengths[d])
            ma, mb = _masked(a, a.dims), _masked(b, a.dims)
            scale = max([1.0, float(mb.detach().abs().max())] if mb.numel() and mb.dtype.is_floating_point
                        else [1.0])
            _close(ma, mb, f"output {i} over {[d.name for d in a.dims]}{how}", atol=ATOL * scale)
    # Rounding is relative to the largest gradient: a gradient that is zero analytically (that of the keys'
    # bias in attention, softmax being invariant to it) comes out as a rounding error of larger terms.
    scale = max([1.0] + [float(r.detach().abs().max()) for r in ref_grads if r.numel()])
    for name, g, r in zip([*params, *tensors], grads, ref_grads):
        _close(g, r, f"gradient of {name}", atol=ATOL * scale)
    if not optimized:
        return
    explain = prog.explain()
    assert "not optimized" not in explain, explain
    assert all(report.not_optimized is None for report in prog.traces[-1].optimized.reports), explain


def _live(prog: Program) -> set[int]:
    """The pool values of `prog` that its outputs need."""
    infos = infos_of(prog)
    n_base = len(_base_of(prog))
    todo = [*prog.stacks, *prog.lasts, *(prog.updates[k] for k in prog.stack_new)]
    todo += [COUNTER_AT] if prog.align is not None and prog.align.stack_counter else []
    if prog.finals:
        todo += prog.updates
        todo += [COUNTER_AT, ACC_AT] if prog.loop == "align" else []   # (the counter and the accumulator)
    # (In a loop over an axis, the end condition decides only the lasts and the final states that change.)
    changing = [k for k, u in enumerate(prog.updates) if u is not None and u != n_base + k]
    end_needed = prog.loop == "max_len" or prog.lasts or (prog.finals and (changing or prog.counter))
    if prog.end is not None and end_needed:
        todo.append(prog.end.arg)
        if prog.loop == "align":   # (the counter or the accumulator it compares)
            todo.append({"counter": COUNTER_AT, "acc": ACC_AT}.get(prog.end.kind))
    # In the align kind, the counter and the accumulator (pool values here: as read) need their increments.
    feeds = {COUNTER_AT: prog.align.step_arg, ACC_AT: prog.align.acc} if prog.align is not None else {}
    live: set[int] = set()
    while todo:
        i = todo.pop()
        if i is None or i in live:
            continue
        live.add(i)
        todo += infos[i].parents
        if n_base <= i < n_base + len(prog.updates):   # a state read: its new value is needed
            todo.append(prog.updates[i - n_base])
        todo.append(feeds.get(i))
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
    return check_report(spec, data, seed)[0]


def check_report(spec: Program, data: Data, seed: int = 0):
    """:func:`check`, returning the program and the report (``LoopReport``) of its loop (the first one)."""
    model = Model(spec, seed)
    prog = ll.compile(model)
    params = {f"{key}.{n}": p for key, m in model.modules.items() for n, p in m.named_parameters()}
    assert_equivalent(prog, params, data.make(), data.named)
    report = next(r for r in prog.traces[-1].optimized.reports if r.source == model.source)
    if moveable(spec):
        moved = [*report.hoisted, *report.before_loop, *report.moved_states, *report.after_loop, *report.sequence_forms,
                 *report.masked]
        assert [m for m in moved if not m.startswith("to_layout")], prog.explain()
    return prog, report


def ends_early(spec: Program, data: Data) -> bool | None:
    """Whether some entry of `data` ends (by loop.end) before its length along ``time``, in a loop of the align
    kind whose end follows from the data alone (the counter or the accumulator, with increments of frames,
    labels or the step index, compared with a bound); None where it does not (it needs the ops' values)."""
    align, end = spec.align, spec.end
    if align is None or end is None:
        return None
    known = (1, 2, COUNTER_AT, LABEL_AT, PREV_AT)   # x2_t, the step index, the counter as read, the labels
    if any(i is not None and i not in known for i in (end.arg, align.step_arg, align.acc)):
        return None
    x2 = data.make()["x2"]
    for b, labels in enumerate(data.labels):
        counter, acc, prev = 0, 0.0, FIRST_LABEL
        for t, label in enumerate(labels):
            pool = {1: float(x2[b, t]), 2: float(t), COUNTER_AT: float(counter), LABEL_AT: float(label),
                    PREV_AT: float(prev)}
            step = label == BLANK if align.step == "blank" else pool[align.step_arg] > align.step_thr
            counter, prev = counter + int(step), label
            acc += pool[align.acc] if align.acc is not None else 0.0
            if end.kind == "counter":
                bound = {"lim": data.limits[b], "enc": data.enc_lengths[b], "const": END_CONST}[end.bound]
                ended = counter >= bound or (end.arg is not None and pool[end.arg] > end.thr)
            elif end.kind == "acc":
                ended = acc > end.thr
            else:
                ended = pool[end.arg] > end.thr if end.kind == "value" else t >= data.limits[b]
            if ended:
                if t + end.include_eos < len(labels):
                    return True
                break
    return False


@st.composite
def data(draw, loop: str) -> Data:
    if loop == "align":
        return draw(align_data())
    n = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))
    enc = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    limits = draw(st.lists(st.integers(0, MAX_LEN - 2 if loop == "max_len" else 6), min_size=n, max_size=n))
    return Data(lengths, enc, limits, draw(st.integers(0, 2)), draw(st.integers(0, 2**16)), loop == "static")


@st.composite
def align_data(draw) -> Data:
    """Data for the align kind: per entry an encoder length and labels over ``time``, half the time an
    alignment of the encoder (its length in blanks, the last one last, and up to two other labels: a counter of
    blanks ends the entry at its last frame), else any labels (of lengths 0 to 5)."""
    n = draw(st.integers(1, 4))
    enc, labels = [], []
    for _ in range(n):
        enc.append(draw(st.integers(1, 4)))
        if draw(st.booleans()):
            symbols = [BLANK] * (enc[-1] - 1) + draw(st.lists(st.integers(1, V.size - 1), max_size=2))
            labels.append(list(draw(st.permutations(symbols))) + [BLANK])
        else:
            labels.append(draw(st.lists(st.integers(0, V.size - 1), max_size=5)))
    limits = draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))
    return Data([len(a) for a in labels], enc, limits, draw(st.integers(0, 2)), draw(st.integers(0, 2**16)),
                labels=labels)
