"""Elementwise ops: arithmetic, comparisons, logic, ``where``, activations, ``cast``.

Elementwise ops broadcast by dim identity: the result has the union of the
operands' dims. They never need masking: padding stays padding.
"""

from __future__ import annotations

import functools
import numbers
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import rules as _rules
from .. import trace as _trace
from .._align import aligner, broadcast_shapes
from ..errors import ConfigError, DTypeError
from ..tensor import Tensor
from ._core import as_tensor, broadcast_dims, emit, nonfinite_padding, require_float, result_dtype, to_dtype
from .masking import meet_masked

#: ``where`` over at least this many elements, on CPU without autograd, first checks whether its condition is the
#: same everywhere (two reductions over the condition, cheap beside a pass over both branches)
UNIFORM_CHECK = 4096

__all__ = [
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "abs", "minimum", "maximum",
    "clip", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_xor",
    "logical_not", "where", "cast", "exp", "log", "sqrt", "rsqrt", "square", "sin", "cos",
    "relu", "gelu", "silu", "swish", "sigmoid", "log_sigmoid", "tanh", "softplus", "elu",
    "leaky_relu", "identity",
]


def _sparse_of(*tensors: Tensor):
    sparse = {t.sparse_dim for t in tensors if t.sparse_dim is not None}
    return sparse.pop() if len(sparse) == 1 else None


def _binary(name: str, fn: Callable, a, b, *, out_dtype: torch.dtype | None = None,
            keep_sparse: bool = False, finite: bool = False, in_place: Callable | None = None,
            commutes: bool = False) -> Tensor:
    """`finite`: finite numbers give a finite result (see :func:`looplift.ops._core.nonfinite_padding`);
    `in_place`: ``fn`` into its first operand (``operator.iadd``), for an operand the kernel may overwrite
    (`commutes`: either operand)."""
    a, b = meet_masked(as_tensor(a), as_tensor(b))
    dims = broadcast_dims(name, a, b)
    dtype = out_dtype or result_dtype(a, b)
    al, bl = aligner(a.dims, dims), aligner(b.dims, dims)
    sparse = _sparse_of(a, b) if keep_sparse else None

    def kernel(env, x, y):
        return fn(al(x), bl(y))

    def into(env, x, y, *, first: bool):
        # (without gradients, into an operand of the result's shape and dtype that is this kernel's to overwrite)
        x, y = al(x), bl(y)
        mine, other = (x, y) if first else (y, x)
        if (isinstance(mine, torch.Tensor) and mine.dtype == dtype
                and tuple(mine.shape) == broadcast_shapes(mine.shape, getattr(other, "shape", ()))
                and not (torch.is_grad_enabled() and (mine.requires_grad or getattr(other, "requires_grad", False)))):
            return in_place(mine, other)
        return fn(x, y)

    kernel.fresh = True   # (a new tensor: see looplift.graph.Kernel)
    if in_place is not None:
        kernel.for_owned = lambda owned: (functools.partial(into, first=True) if owned[0] else
                                          functools.partial(into, first=False) if owned[1] and commutes else kernel)
    return emit(name, (a, b), kernel, dims, dtype, sparse_dim=sparse,
                nonfinite_padding=nonfinite_padding(a, b, dims=dims) if finite else None)


def add(a, b) -> Tensor:
    """``a + b``, broadcasting by dim identity."""
    return _binary("add", operator.add, a, b, keep_sparse=True, finite=True, in_place=operator.iadd, commutes=True)


def sub(a, b) -> Tensor:
    """``a - b``."""
    return _binary("sub", operator.sub, a, b, keep_sparse=True, finite=True, in_place=operator.isub)


def mul(a, b) -> Tensor:
    """``a * b``."""
    return _binary("mul", operator.mul, a, b, finite=True, in_place=operator.imul, commutes=True)


def truediv(a, b) -> Tensor:
    """``a / b`` (always floating point, as in torch)."""
    a, b = as_tensor(a), as_tensor(b)
    dtype = result_dtype(a, b)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    return _binary("truediv", torch.true_divide, a, b, out_dtype=dtype)


def floordiv(a, b) -> Tensor:
    """``a // b`` (rounding toward minus infinity, as Python)."""
    return _binary("floordiv", lambda x, y: torch.div(x, y, rounding_mode="floor")
                   if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor) else x // y, a, b)


def mod(a, b) -> Tensor:
    """``a % b`` (sign of the divisor, as Python)."""
    return _binary("mod", operator.mod, a, b)


def pow(a, b) -> Tensor:  # noqa: A001 - the user-facing name
    """``a ** b``."""
    return _binary("pow", operator.pow, a, b)


def minimum(a, b) -> Tensor:
    """Elementwise minimum."""
    a, b = as_tensor(a), as_tensor(b)
    return _binary("minimum", _scalar_safe(torch.minimum, result_dtype(a, b)), a, b, finite=True)


def maximum(a, b) -> Tensor:
    """Elementwise maximum."""
    a, b = as_tensor(a), as_tensor(b)
    return _binary("maximum", _scalar_safe(torch.maximum, result_dtype(a, b)), a, b, finite=True)


def _scalar_safe(fn: Callable, dtype: torch.dtype) -> Callable:
    # A Python number becomes a 0-d tensor of the dtype the pair promotes to (`dtype`, known when traced: an
    # int tensor vs 2.5 gives float), never truncated to the other operand's dtype.
    def apply(x, y):
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x, dtype=dtype, device=y.device if isinstance(y, torch.Tensor) else None)
        if not isinstance(y, torch.Tensor):
            y = torch.as_tensor(y, dtype=dtype, device=x.device)
        return fn(x, y)
    return apply


def clip(x, min=None, max=None) -> Tensor:  # noqa: A002
    """Clamp `x` into ``[min, max]`` (either bound may be None)."""
    x = as_tensor(x)
    if isinstance(min, numbers.Real) and isinstance(max, numbers.Real) and min > max:
        raise ConfigError(f"clip: min ({min}) is above max ({max})")
    if min is not None:
        x = maximum(x, min)
    if max is not None:
        x = minimum(x, max)
    return x


def _compare(name: str, fn: Callable) -> Callable:
    def compare(a, b) -> Tensor:
        return _binary(name, fn, a, b, out_dtype=torch.bool)
    compare.__name__ = name
    compare.__doc__ = f"Elementwise comparison ``{name}``; the result is bool."
    return compare


eq = _compare("eq", operator.eq)
ne = _compare("ne", operator.ne)
lt = _compare("lt", operator.lt)
le = _compare("le", operator.le)
gt = _compare("gt", operator.gt)
ge = _compare("ge", operator.ge)


def _logical(name: str, fn: Callable) -> Callable:
    def logical(a, b) -> Tensor:
        a, b = as_tensor(a), as_tensor(b)
        for t in (a, b):
            if t.dtype != torch.bool:
                raise DTypeError(f"{name} needs bool tensors, got the {t.describe()}; compare first, "
                                 f"e.g. x != 0")
        return _binary(name, _scalar_safe(fn, torch.bool), a, b, out_dtype=torch.bool)
    logical.__name__ = name
    logical.__doc__ = f"Elementwise ``{name}`` of two bool tensors."
    return logical


logical_and = _logical("logical_and", torch.logical_and)
logical_or = _logical("logical_or", torch.logical_or)
logical_xor = _logical("logical_xor", torch.logical_xor)


def logical_not(x) -> Tensor:
    """Elementwise not of a bool tensor."""
    x = as_tensor(x)
    if x.dtype != torch.bool:
        raise DTypeError(f"logical_not needs a bool tensor, got the {x.describe()}")
    return emit("logical_not", (x,), lambda env, v: torch.logical_not(v) if isinstance(v, torch.Tensor) else not v,
                x.dims, torch.bool)


def where(cond, a, b) -> Tensor:
    """``a`` where `cond` is True, else ``b``; all three broadcast by dim identity."""
    cond, a, b = as_tensor(cond), as_tensor(a), as_tensor(b)
    if cond.dtype != torch.bool:
        raise DTypeError(f"where needs a bool condition, got the {cond.describe()}")
    cond, a, b = meet_masked(cond, a, b)
    dims = broadcast_dims("where", cond, a, b)
    dtype = result_dtype(a, b)
    cl, al, bl = aligner(cond.dims, dims), aligner(a.dims, dims), aligner(b.dims, dims)

    def kernel(env, c, x, y):
        c, x, y = cl(c), al(x), bl(y)
        if not any(isinstance(v, torch.Tensor) for v in (c, x, y)):
            return x if c else y   # Python values: a result without dims
        # A Python bool condition still broadcasts the branches to the result's dims; a Python number gets the
        # result's dtype (torch would give it its default float32).
        x, y = ((v if v.dtype == dtype else v.to(dtype)) if isinstance(v, torch.Tensor)
                else torch.as_tensor(v, dtype=dtype, device=env.device) for v in (x, y))
        if isinstance(c, torch.Tensor) and c.device.type == "cpu" and max(x.numel(), y.numel()) >= UNIFORM_CHECK \
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # (a condition the same everywhere, as a search's "ended" almost always is: the branch itself, where
            # it already has the result's shape, instead of a pass over both)
            shape = broadcast_shapes(c.shape, x.shape, y.shape)
            if tuple(y.shape) == shape and not c.any():
                return y
            if tuple(x.shape) == shape and c.all():
                return x
        return torch.where(c if isinstance(c, torch.Tensor) else torch.as_tensor(c, device=env.device), x, y)

    return emit("where", (cond, a, b), kernel, dims, dtype, sparse_dim=_sparse_of(a, b),
                nonfinite_padding=nonfinite_padding(a, b, dims=dims))


def cast(x, dtype: str | torch.dtype) -> Tensor:
    """`x` converted to `dtype` (a torch dtype or its name, e.g. ``"int32"``)."""
    x = as_tensor(x)
    dt = to_dtype(dtype)
    if dt == x.dtype:
        return x
    sparse = x.sparse_dim if not dt.is_floating_point and dt != torch.bool else None
    return emit("cast", (x,), lambda env, v: v.to(dt) if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=dt),
                x.dims, dt, sparse_dim=sparse, attrs={"dtype": str(dt)},
                nonfinite_padding=nonfinite_padding(x, dims=x.dims))


def _unary(name: str, fn: Callable, *, float_only: bool = True, keep_sparse: bool = False,
           finite: bool = True) -> Callable:
    """An elementwise op; `finite`: finite numbers give finite results (not so ``exp``, ``log``, ``sqrt``)."""

    def unary(x) -> Tensor:
        x = as_tensor(x)
        if float_only:
            require_float(x, name)
        dtype = x.dtype   # (a Python number, as a state's initial value, is computed in the declared dtype)

        def kernel(env, v):
            return fn(v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=dtype, device=env.device))

        kernel.fresh = True   # (a new tensor: see looplift.graph.Kernel)
        in_place = getattr(torch.Tensor, f"{fn.__name__}_", None) if fn.__module__ in ("torch", None) else None
        if in_place is not None:
            def into(env, v):
                # (without gradients, into its operand, a new tensor that is this kernel's to overwrite: the
                # operand is still in cache, where a new result would be written to memory not yet touched)
                if (isinstance(v, torch.Tensor) and v.is_contiguous()
                        and not (torch.is_grad_enabled() and v.requires_grad)):
                    return in_place(v)
                return kernel(env, v)

            kernel.for_owned = lambda owned: into if owned[0] else kernel
        return emit(name, (x,), kernel, x.dims, x.dtype, sparse_dim=x.sparse_dim if keep_sparse else None,
                    nonfinite_padding=nonfinite_padding(x, dims=x.dims) if finite else None)
    unary.__name__ = name
    unary.__doc__ = f"Elementwise ``{name}``."
    return unary


neg = _unary("neg", torch.neg, float_only=False)
abs = _unary("abs", torch.abs, float_only=False)  # noqa: A001
square = _unary("square", torch.square, float_only=False)
exp = _unary("exp", torch.exp, finite=False)
log = _unary("log", torch.log, finite=False)
sqrt = _unary("sqrt", torch.sqrt, finite=False)
rsqrt = _unary("rsqrt", torch.rsqrt, finite=False)
sin = _unary("sin", torch.sin)
cos = _unary("cos", torch.cos)
relu = _unary("relu", torch.relu)
gelu = _unary("gelu", F.gelu)
silu = _unary("silu", F.silu)
swish = silu
sigmoid = _unary("sigmoid", torch.sigmoid)
log_sigmoid = _unary("log_sigmoid", F.logsigmoid)
tanh = _unary("tanh", torch.tanh)
softplus = _unary("softplus", F.softplus)
elu = _unary("elu", F.elu)


def leaky_relu(x, negative_slope: float = 0.01) -> Tensor:
    """Elementwise leaky ReLU."""
    x = as_tensor(x)
    require_float(x, "leaky_relu")
    return emit("leaky_relu", (x,), lambda env, v: F.leaky_relu(v, negative_slope), x.dims, x.dtype,
                attrs={"negative_slope": negative_slope}, nonfinite_padding=nonfinite_padding(x, dims=x.dims))


def identity(x) -> Tensor:
    """`x` itself (a no-op; no node is added)."""
    return as_tensor(x)


def _install_operators() -> None:
    def rev(fn):
        return lambda self, other: fn(other, self)

    ops = {
        "__add__": add, "__radd__": rev(add), "__sub__": sub, "__rsub__": rev(sub),
        "__mul__": mul, "__rmul__": rev(mul), "__truediv__": truediv, "__rtruediv__": rev(truediv),
        "__floordiv__": floordiv, "__rfloordiv__": rev(floordiv), "__mod__": mod, "__rmod__": rev(mod),
        "__pow__": pow, "__rpow__": rev(pow), "__neg__": neg, "__abs__": abs,
        "__eq__": eq, "__ne__": ne, "__lt__": lt, "__le__": le, "__gt__": gt, "__ge__": ge,
        "__and__": logical_and, "__rand__": rev(logical_and), "__or__": logical_or,
        "__ror__": rev(logical_or), "__xor__": logical_xor, "__rxor__": rev(logical_xor),
        "__invert__": logical_not,
    }
    for name, fn in ops.items():
        setattr(Tensor, name, fn)


for _name in __all__:  # every public op records its calls, so passes can replay them
    globals()[_name] = _trace.replayable(globals()[_name])


def _running_sum(args: dict, carried: str, axis):
    """``s = s_prev + x`` over a sequence: the initial value plus the cumulative sum of x."""
    from .reduce import cumsum
    from .shape import expand
    other = as_tensor(args["b" if carried == "a" else "a"])   # (may be a Python number: s = s + 1)
    if axis not in other.dims:
        other = expand(other, [axis])
    return [add(args[carried], cumsum(other, axis=axis))], [None]


# In a loop, a state that is its own previous value plus something that does not depend on any carried
# state is a running sum: over the sequence, a cumulative sum.
_rules.sequence_form(add, _rules.SequenceForm(carried=("a", "b"), sequences=(True,), run=_running_sum,
                                              name="running sum as a cumulative sum"))


_install_operators()
