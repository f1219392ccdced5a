"""Dims: the named axes of looplift tensors.

A :class:`Dim` is an object with identity. Two dims are the same dim only if
they are the same object (or one was declared equal to the other with
:meth:`Dim.declare_same_as`). The name is for humans and error messages only;
two different dims may share a name, and mixing them in one operation is an
error (it is almost always a bug).

Kinds of dims:

* static: a fixed size, ``Dim("feat", 40)``;
* dynamic: a padded axis with a length per batch entry, ``Dim("time")``. The
  lengths are themselves a tensor over the dim's ``length_dims`` (by default
  ``(batch_dim,)``), given with the data when a program is called;
* batch-like: ``batch_dim`` and any ``Dim(name, batch=True)``: a size known only
  at run time, never padded;
* derived: ``T + 1``, ``T - 2``, ``T * 2``, ``T // 2`` (rounded *up*, as
  ``T.ceildiv(2)``), ``a + b`` (the concatenation of two dims) and ``a * b``
  (two dims merged). A derived dim remembers its origin and computes its size
  and lengths from it. Deriving twice gives the same object, so
  ``model + enc`` written in two places is one dim.

Why identity and not names: in a sequence model the same size (say 256) and
even the same name ("time") occur on unrelated axes; a dim mixed up by position
or name silently computes nonsense. Identity makes every axis unambiguous.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

from .errors import ArgumentError, DimError, entry_methods

__all__ = ["Dim", "batch_dim", "run_time_beam", "sized_like"]


class Dim:
    """A named axis. See the module docstring for the kinds of dims.

    Args:
        name: for humans and error messages.
        size: an int for a static dim; ``None`` for a dynamic (or batch) dim.
        batch: a batch-like dim: its size is known only at run time and it
            has no padding.
        length_dims: for a dynamic dim, the dims its lengths tensor runs over
            (default: ``(batch_dim,)``).
    """

    __slots__ = ("name", "_size", "batch", "_length_dims", "origin", "_derived",
                 "_same_as", "_size_rule", "_lengths_rule", "__weakref__")

    def __init__(self, name: str, size: int | None = None, *, batch: bool = False,
                 length_dims: Sequence[Dim] | None = None):
        if not isinstance(name, str) or not name:
            hint = " (the name comes first: Dim(name, size))" if isinstance(size, str) else ""
            raise ArgumentError(f"Dim name must be a non-empty str, got {name!r}{hint}")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int):
                raise ArgumentError(f"Dim {name!r}: size must be an int (static) or None (dynamic), got {size!r} "
                                    f"of type {type(size).__name__}" + (" (use int(size))" if hasattr(size, "__index__")
                                                                        or isinstance(size, float) else ""))
            if size < 0:
                raise DimError(f"Dim {name!r}: size must be >= 0, got {size}")
            if batch:
                raise DimError(f"Dim {name!r}: a batch dim has no static size (leave size=None)")
        if length_dims is not None and not all(isinstance(d, Dim) for d in _as_tuple(length_dims)):
            raise ArgumentError(f"Dim {name!r}: length_dims must be a sequence of Dims, got {length_dims!r}")
        self.name = name
        self._size = size
        self.batch = batch
        self._length_dims = _as_tuple(length_dims) if length_dims is not None else None
        #: (operation, operands) this dim was derived from, or None.
        self.origin: tuple[str, tuple] | None = None
        self._derived: dict = {}
        self._same_as: Dim | None = None
        self._size_rule: Callable | None = None
        self._lengths_rule: Callable | None = None

    # -- kinds ---------------------------------------------------------------

    @property
    def size(self) -> int | None:
        """The static size, or None for dynamic and batch dims."""
        return self._size if self._same_as is None else self.canonical()._size

    @property
    def is_static(self) -> bool:
        return self.size is not None

    @property
    def is_dynamic(self) -> bool:
        """A padded dim with a length per batch entry."""
        c = self.canonical()
        return c._size is None and not c.batch

    @property
    def length_dims(self) -> tuple[Dim, ...]:
        """The dims the lengths of this dynamic dim run over."""
        c = self.canonical()
        if not c.is_dynamic:
            return ()
        if c._length_dims is None:
            if c.origin is not None:
                dims: list[Dim] = []
                for part in _dim_operands(c.origin):
                    for d in part.length_dims:
                        if d not in dims:
                            dims.append(d)
                return tuple(dims)
            return (batch_dim,)
        return c._length_dims

    def set_length_dims(self, dims: Iterable[Dim]) -> None:
        """Declare the dims the lengths of this dynamic dim run over."""
        self.canonical()._length_dims = tuple(dims)

    # -- identity ------------------------------------------------------------

    def canonical(self) -> Dim:
        """The representative of the dims declared equal to this one."""
        d = self
        while d._same_as is not None:
            d = d._same_as
        return d

    def declare_same_as(self, other: Dim) -> None:
        """Declare that this dim and `other` are the same axis.

        Do it before tracing: tensors created earlier keep the dims they had.
        """
        if not isinstance(other, Dim):
            raise ArgumentError(f"declare_same_as needs a Dim, got {other!r}")
        a, b = self.canonical(), other.canonical()
        if a is b:
            return
        if a._size != b._size or a.batch != b.batch:
            raise DimError(f"cannot declare {a!r} the same as {b!r}: their kinds or sizes differ")
        a._same_as = b

    # -- derived dims ---------------------------------------------------------

    def derived(self, key, make: Callable[[], Dim]) -> Dim:
        """The dim derived from this one under `key` (e.g. ``("//", 2)``), made by ``make()`` the first time:
        a derived dim is the same object each time it is asked for."""
        c = self.canonical()
        dim = c._derived.get(key)
        if dim is None:
            dim = c._derived[key] = make()
        return dim

    def __add__(self, other: int | Dim) -> Dim:
        if isinstance(other, Dim):
            return _sum_dim(self, other)
        n = _int(other, "+")
        if n == 0:
            return self
        return self.derived(("+", n), lambda: _affine(self, "+", n))

    def __radd__(self, other: int) -> Dim:
        return self + other

    def __sub__(self, other: int) -> Dim:
        return self + (-_int(other, "-"))

    def __mul__(self, other: int | Dim) -> Dim:
        if isinstance(other, Dim):
            return _product_dim(self, other)
        k = _int(other, "*")
        if k == 1:
            return self
        if k < 1:
            raise DimError(f"{self!r} * {k}: the factor must be >= 1")
        return self.derived(("*", k), lambda: _affine(self, "*", k))

    def __rmul__(self, other: int) -> Dim:
        return self * other

    def ceildiv(self, k: int) -> Dim:
        """The dim of ``ceil(size / k)`` (e.g. after a strided conv)."""
        k = _int(k, "//")
        if k == 1:
            return self
        if k < 1:
            raise DimError(f"{self!r}.ceildiv({k}): the divisor must be >= 1")
        return self.derived(("//", k), lambda: _affine(self, "//", k))

    def alias(self) -> Dim:
        """Another axis of this dim's size and lengths (derived: the same object each time), e.g. the keys
        of self-attention over a sequence, so queries and keys are two dims of one score tensor."""
        def make() -> Dim:
            base = self.canonical()
            dim = Dim(f"{self.name}_alias", base._size, batch=base.batch)
            dim.origin = ("alias", (base,))
            dim._size_rule = lambda size: size
            dim._lengths_rule = lambda n: n
            return dim
        return self.derived(("alias",), make)

    def history(self) -> Dim:
        """The history dim of ``cum_concat`` over this dim: at step t of a loop over it, length t + 1.

        Outside the loop its lengths run over this dim (frame t has a history
        of t + 1 frames): a causal mask, as self-attention over the past needs.
        """
        def make() -> Dim:
            dim = Dim(f"{self.name}_history", batch=False, length_dims=(self.canonical(),))
            dim.origin = ("history", (self.canonical(),))
            dim._size_rule = lambda size: size
            dim._lengths_rule = None  # computed by the runtime from the step (see Env)
            return dim
        return self.derived(("history",), make)

    def masked(self, mask, length_dims: Sequence[Dim]) -> Dim:
        """``T'``: the frames of this dim where the bool tensor `mask` (over this dim and `length_dims`) is True.

        Made by :func:`looplift.compress`; its lengths (the number of True
        frames per entry) are known once the compress has run. It remembers
        this dim and the mask, so a ``T'`` tensor meeting a ``T`` tensor is
        unmasked automatically (:func:`looplift.unmask`). One dim per mask.
        """
        def make() -> Dim:
            dim = Dim(f"{self.name}'", length_dims=tuple(length_dims))
            dim.origin = ("masked", (self.canonical(), mask))
            dim._size_rule = dim._lengths_rule = None   # set by the compress that makes it (see Env)
            return dim
        return self.derived(("masked", id(mask)), make)

    @property
    def masked_from(self) -> tuple[Dim, object] | None:
        """(T, mask) if this dim is ``T.masked(mask)``, else None."""
        c = self.canonical()
        return c.origin[1] if c.origin is not None and c.origin[0] == "masked" else None

    def __floordiv__(self, k: int) -> Dim:
        """``T // k`` is ``T.ceildiv(k)``: rounded up, so no frame is dropped."""
        return self.ceildiv(k)

    def __truediv__(self, k):
        raise ArgumentError(f"{self!r} / {k!r}: a dim's size is an int; use {self.name} // {k!r} (rounded up: "
                            f"{self.name}.ceildiv({k!r}))")

    # -- sizes at run time ------------------------------------------------------

    def derive_size(self, operand_sizes: Sequence[int]) -> int:
        """The padded size of a derived dim from the padded sizes of its operands."""
        return self.canonical()._size_rule(*operand_sizes)

    def derive_lengths(self, operand_lengths: Sequence):
        """The lengths of a derived dim from the lengths (or sizes) of its operands."""
        return self.canonical()._lengths_rule(*operand_lengths)

    @property
    def operands(self) -> tuple[Dim, ...]:
        """The dims this derived dim was computed from (empty for a plain dim)."""
        c = self.canonical()
        return _dim_operands(c.origin) if c.origin is not None else ()

    # -- misc ----------------------------------------------------------------

    def __repr__(self) -> str:
        c = self.canonical()
        if c.batch:
            return f"Dim({c.name!r}, batch)"
        if c._size is None:
            return f"Dim({c.name!r}, dynamic)"
        return f"Dim({c.name!r}, {c._size})"

    def __str__(self) -> str:
        return self.canonical().name

    # Identity semantics: the default object __eq__/__hash__, through canonical().
    def __eq__(self, other) -> bool:
        return isinstance(other, Dim) and self.canonical() is other.canonical()

    def __hash__(self) -> int:
        return id(self.canonical())


def _int(value, op: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentError(f"Dim {op} expects an int or a Dim, got {value!r}")
    return value


def _dim_operands(origin: tuple[str, tuple]) -> tuple[Dim, ...]:
    return tuple(x for x in origin[1] if isinstance(x, Dim))


def _affine(base: Dim, op: str, k: int) -> Dim:
    """T + n, T * k or ceil(T / k)."""
    fn = {"+": lambda s: s + k, "*": lambda s: s * k, "//": lambda s: -(-s // k)}[op]
    name = {"+": f"{base.name}{k:+d}", "*": f"{base.name}*{k}", "//": f"ceil({base.name}/{k})"}[op]
    if base.is_static:
        size = fn(base.size)
        if size < 0:
            raise DimError(f"{base!r} {op} {k} would have negative size {size}")
        dim = Dim(name, size)
    else:
        dim = Dim(name, batch=base.canonical().batch)
    dim.origin = (op, (base, k))
    # The padded size never goes below 0 (as the lengths): `T - 2` of a batch padded to 1 frame is empty.
    dim._size_rule = (lambda s: max(s + k, 0)) if op == "+" else fn
    if op == "+":
        dim._lengths_rule = lambda n: (n + k).clamp(min=0)
    elif op == "*":
        dim._lengths_rule = lambda n: n * k
    else:
        dim._lengths_rule = lambda n: (n + (k - 1)).div(k, rounding_mode="floor")
    return dim


def _flatten(op: str, dims: Sequence[Dim]) -> tuple[Dim, ...]:
    out: list[Dim] = []
    for d in dims:
        c = d.canonical()
        if c.origin is not None and c.origin[0] == op:
            out.extend(c.origin[1])
        else:
            out.append(c)
    return tuple(out)


def _composite(op: str, parts: tuple[Dim, ...], sep: str, combine: Callable) -> Dim:
    first, rest = parts[0], parts[1:]

    def make() -> Dim:
        name = sep.join(p.name for p in parts)
        if all(p.is_static for p in parts):
            dim = Dim(name, combine([p.size for p in parts]))
        else:
            dim = Dim(name, batch=all(p.canonical().batch for p in parts))
        dim.origin = (op, parts)
        dim._size_rule = lambda *sizes: combine(sizes)
        dim._lengths_rule = lambda *lengths: combine(lengths)
        return dim

    return first.derived((op, rest), make)


def _sum_dim(a: Dim, b: Dim) -> Dim:
    """The dim of the concatenation of an `a` axis and a `b` axis."""
    return _composite("concat", _flatten("concat", (a, b)), "+", lambda xs: sum(xs[1:], xs[0]))


def _product_dim(a: Dim, b: Dim) -> Dim:
    """The dim of `a` and `b` merged into one axis (`a` outer, `b` inner)."""
    return _composite("merge", _flatten("merge", (a, b)), "*", lambda xs: math.prod(xs[1:], start=xs[0]))


#: The batch dim: the utterances of a mini-batch.
batch_dim = Dim("batch", batch=True)


def run_time_beam(name: str = "beam") -> Dim:
    """The beam dim of a search whose number of hypotheses changes per step: a batch-like dim sized at run
    time, 1 at the start (the loop sets its size at each step from the previous step's prune)."""
    beam = Dim(name, batch=True)
    beam.origin = ("beam", ())
    beam._size_rule = lambda: 1
    return beam


def sized_like(name: str, dim: Dim) -> Dim:
    """A dim of the size of `dim`: a static one if `dim` is static, else sized at run time as `dim` is."""
    if dim.is_static:
        return Dim(name, dim.size)
    out = Dim(name, batch=True)
    out.origin = ("sized_like", (dim,))
    out._size_rule = lambda size: size
    return out


def _as_tuple(dims) -> tuple:
    return (dims,) if isinstance(dims, Dim) else tuple(dims)


entry_methods(Dim, "__init__", "declare_same_as", "set_length_dims", "__add__", "__radd__", "__sub__", "__mul__",
              "__rmul__", "ceildiv", "__floordiv__", "__truediv__")
