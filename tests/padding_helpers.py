"""Helpers for ``test_padding.py``: run a looplift program with garbage in the padding of its inputs.

A :class:`Case` is a program (a function or a :class:`looplift.Module`) and the
specs of its inputs. The checks:

* :func:`check_invariance`: the valid outputs (per ``Named.mask()``), their
  lengths, and the gradients of a loss over the valid outputs w.r.t. the valid
  input positions are the same whatever the padding of the inputs holds
  (zeros, values of 1e6 scale, +-inf, NaN; for integer inputs, large and
  out-of-range integers);
* :func:`check_batch_vs_alone`: each sequence run alone (a batch of one,
  padded exactly to its lengths) gives the valid outputs and input gradients
  it gets inside a batch of sequences of other lengths whose padding is NaN
  (1e6-scale values for the cases of ``Case.broadcast_grad_fills``).

Everything runs in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import looplift as ll

B = ll.batch_dim
DTYPE = torch.float64
FILLS = ("large", "inf", "nan")
INT_GARBAGE = 10 ** 6


@dataclass
class Inp:
    """The spec of one program input."""

    dims: tuple
    kind: str = "float"  # "float" or "int"
    low: int = 0  # ints: valid values in [low, high)
    high: int | None = None
    sparse_dim: ll.Dim | None = None
    grad: bool = True  # floats: differentiate w.r.t. this input


@dataclass
class Case:
    """A program over inputs with dynamic dims, and what to expect of its padding.

    Args:
        pad_grad: the expected gradient at the padding positions of the float inputs:
            ``"zero"`` (the op masks them away: exactly 0, whatever they hold),
            ``"finite_zero"`` (exactly 0 when the padding is finite; a per-position op such as
            ``log_softmax`` over a static dim gives ``0 * nan = nan`` for non-finite padding),
            or None (not checked: per-position ops such as ``exp`` may give ``0 * inf = nan``
            at padding positions, which never reaches a valid one).
        alone: run the batch-vs-alone check (False for results that mix the batch entries).
        min_len: the smallest length drawn for each dynamic dim (by dim).
        fix_lengths: maps the drawn lengths (dim -> list) to lengths the case can take.
        param_pad_grad_fills: the padding fills under which the parameter gradients of a
            module must stay the same (see the test module's docstring).
        broadcast_grad_fills: the padding fills under which the gradients w.r.t. the inputs
            *without* a dynamic dim must stay the same. All fills, unless such an input is
            multiplied with a padded tensor per position (``dot(q, k, reduce=feat)``, ``x * q``):
            then its gradient sums ``0 * padding`` over the padding, which is NaN for non-finite
            padding (the known limitation documented in ``test_padding.py``).
    """

    name: str
    fn: Callable
    inputs: Sequence[Inp]
    pad_grad: str | None = "zero"
    alone: bool = True
    min_len: dict = field(default_factory=dict)
    fix_lengths: Callable | None = None
    param_pad_grad_fills: tuple = ("large",)
    broadcast_grad_fills: tuple = FILLS
    _prog: Any = None

    def __str__(self) -> str:
        return self.name

    @property
    def program(self) -> ll.Program:
        if self._prog is None:
            self._prog = ll.compile(self.fn, mode="eval")
        return self._prog

    @property
    def params(self) -> list[torch.nn.Parameter]:
        if isinstance(self.fn, torch.nn.Module):
            return [p for p in self.fn.parameters() if p.requires_grad]
        return []

    def dynamic_dims(self) -> list[ll.Dim]:
        out: list[ll.Dim] = []
        for inp in self.inputs:
            for d in inp.dims:
                if d.is_dynamic and d not in out:
                    out.append(d)
        return out


def Wrap(module: ll.Module, call: Callable) -> ll.Module:
    """A root module calling `call(module, *inputs)` (e.g. to pass ``axis=``), in float64."""

    class Root(ll.Module):
        def __init__(self):
            super().__init__()
            self.m = module

        def forward(self, *xs):
            return call(self.m, *xs)

    return Root().to(DTYPE)


# -- data ------------------------------------------------------------------------------------

def sizes_for(case: Case, lengths: dict, extra: int) -> dict:
    batch = len(next(iter(lengths.values()))) if lengths else 1
    sizes = {B: batch}
    for d, n in lengths.items():
        sizes[d] = (max(n) if n else 0) + extra
    return sizes


def named_of(inp: Inp, raw: torch.Tensor, lengths_t: dict) -> ll.Named:
    return ll.Named(raw, inp.dims, {d: lengths_t[d] for d in inp.dims if d.is_dynamic},
                    sparse_dim=inp.sparse_dim)


def valid_data(case: Case, lengths: dict, extra: int, gen: torch.Generator) -> tuple[list, list, dict]:
    """Random inputs for `case` (padding still random and valid), their masks, and the lengths tensors."""
    sizes = sizes_for(case, lengths, extra)
    lengths_t = {d: torch.tensor(n, dtype=torch.int64) for d, n in lengths.items()}
    raws, masks = [], []
    for inp in case.inputs:
        shape = [d.size if d.is_static else sizes[d] for d in inp.dims]
        if inp.kind == "float":
            raw = torch.randn(shape, generator=gen, dtype=DTYPE)
        else:
            raw = torch.randint(inp.low, inp.high, shape, generator=gen)
        raws.append(raw)
        masks.append(named_of(inp, raw, lengths_t).mask())
    return raws, masks, lengths_t


def fill_padding(raw: torch.Tensor, mask: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """`raw` with its padding (where `mask` is False) replaced by garbage of the given kind."""
    if raw.dtype.is_floating_point:
        if kind == "zero":
            garbage = torch.zeros_like(raw)
        elif kind == "large":
            garbage = torch.randn(raw.shape, generator=gen, dtype=raw.dtype) * 1e6
        elif kind == "inf":
            sign = torch.randint(0, 2, raw.shape, generator=gen).to(raw.dtype) * 2 - 1
            garbage = sign * float("inf")
        elif kind == "nan":
            garbage = torch.full_like(raw, float("nan"))
        else:
            raise ValueError(kind)
    else:
        if kind == "zero":
            garbage = torch.zeros_like(raw)
        else:
            garbage = torch.randint(-INT_GARBAGE, INT_GARBAGE, raw.shape, generator=gen).to(raw.dtype)
    return torch.where(mask, raw, garbage)


# -- running ---------------------------------------------------------------------------------

def _as_dict(out) -> dict:
    if isinstance(out, ll.Named):
        return {"out": out}
    if isinstance(out, dict):
        return dict(out)
    if isinstance(out, (tuple, list)):
        return {str(i): v for i, v in enumerate(out)}
    raise TypeError(type(out))


def run(case: Case, raws: list, lengths_t: dict, *, reference: bool = False, batch_outputs_only: bool = False):
    """Run the case; return its outputs (name -> Named), the gradients w.r.t. the float
    inputs (None where not differentiated) and w.r.t. the module parameters.

    The loss is ``sum(sin(y) + y)`` over the valid, finite positions of every float output.
    """
    leaves = []
    for inp, raw in zip(case.inputs, raws):
        if inp.kind == "float" and inp.grad:
            raw = raw.detach().clone().requires_grad_(True)
        leaves.append(raw)
    named = [named_of(inp, raw, lengths_t) for inp, raw in zip(case.inputs, leaves)]
    prog = case.program
    outs = _as_dict((prog.reference if reference else prog)(*named))
    loss = None
    for o in outs.values():
        if not o.tensor.dtype.is_floating_point or not o.tensor.requires_grad:
            continue
        if batch_outputs_only and B not in o.dims:
            continue
        v = o.tensor
        keep = o.mask() & torch.isfinite(v.detach())
        v = v[keep]
        term = (torch.sin(v) + v).sum()
        loss = term if loss is None else loss + term
    wrt = [x for x in leaves if x.requires_grad] + case.params
    grads = [None] * len(wrt)
    if loss is not None and wrt:
        grads = list(torch.autograd.grad(loss, wrt, allow_unused=True))
    it = iter(grads)
    in_grads = [next(it) if x.requires_grad else None for x in leaves]
    param_grads = list(it)
    in_grads = [torch.zeros_like(x) if g is None and x.requires_grad else g for g, x in
                zip(in_grads, leaves)]
    return outs, in_grads, param_grads


def assert_same_valid(a: ll.Named, b: ll.Named, what: str) -> None:
    """`a` and `b` have the same dims, lengths, mask and values at valid positions."""
    assert a.dims == b.dims, f"{what}: dims {a.dims} != {b.dims}"
    assert a.tensor.shape == b.tensor.shape, f"{what}: shape {a.tensor.shape} != {b.tensor.shape}"
    assert a.lengths.keys() == b.lengths.keys(), what
    for d in a.lengths:
        assert torch.equal(a.lengths[d], b.lengths[d]), f"{what}: lengths of {d}: {a.lengths[d]} != {b.lengths[d]}"
    m = a.mask()
    assert torch.equal(m, b.mask()), what
    torch.testing.assert_close(b.tensor.detach()[m], a.tensor.detach()[m], equal_nan=True, rtol=1e-7, atol=1e-7,
                               msg=lambda s: f"{what}: valid outputs differ: {s}")


# -- the checks ------------------------------------------------------------------------------

def check_invariance(case: Case, lengths: dict, extra: int = 2, seed: int = 0,
                     fills: Sequence[str] = FILLS) -> None:
    """Valid outputs and gradients do not depend on what the padding of the inputs holds."""
    gen = torch.Generator().manual_seed(seed)
    raws, masks, lengths_t = valid_data(case, lengths, extra, gen)
    base_raws = [fill_padding(r, m, "zero", gen) for r, m in zip(raws, masks)]
    base, base_grads, base_pgrads = run(case, base_raws, lengths_t)
    # The reference interpreter agrees with the executor.
    ref, ref_grads, _ = run(case, base_raws, lengths_t, reference=True)
    for name in base:
        assert_same_valid(base[name], ref[name], f"{case}: output {name!r}, executor vs reference")
    for _inp, g, m in zip(case.inputs, base_grads, masks):
        if g is not None:
            assert torch.isfinite(g[m]).all(), f"{case}: non-finite gradient at valid input positions"
    for kind in fills:
        filled = [fill_padding(r, m, kind, gen) for r, m in zip(raws, masks)]
        outs, grads, pgrads = run(case, filled, lengths_t)
        assert outs.keys() == base.keys()
        for name in base:
            assert_same_valid(base[name], outs[name], f"{case}: output {name!r} with padding {kind!r}")
        for i, (inp, g0, g, m) in enumerate(zip(case.inputs, base_grads, grads, masks)):
            if g is None:
                continue
            if not any(d.is_dynamic for d in inp.dims) and kind not in case.broadcast_grad_fills:
                continue
            what = f"{case}: gradient w.r.t. input {i} with padding {kind!r}"
            assert torch.isfinite(g[m]).all(), f"{what}: not finite at valid positions"
            torch.testing.assert_close(g[m], g0[m], rtol=1e-7, atol=1e-7,
                                       msg=lambda s, what=what: f"{what}: differs at valid positions: {s}")
            if case.pad_grad == "zero" or (case.pad_grad == "finite_zero" and kind == "large"):
                bad = g[~m] != 0
                assert not bad.any(), (f"{what}: the padding gets the gradient {g[~m][bad][:5].tolist()} "
                                       f"(expected exactly 0)")
        if kind in case.param_pad_grad_fills:
            for _p, g0, g in zip(case.params, base_pgrads, pgrads):
                if g0 is None:
                    assert g is None
                    continue
                torch.testing.assert_close(
                    g, g0, rtol=1e-7, atol=1e-7,
                    msg=lambda s, kind=kind: f"{case}: parameter gradient with padding {kind!r}: {s}")


def _alone_input(inp: Inp, raw: torch.Tensor, i: int, lengths: dict) -> torch.Tensor:
    if B not in inp.dims:
        return raw
    raw = raw.narrow(inp.dims.index(B), i, 1)
    for pos, d in enumerate(inp.dims):
        if d.is_dynamic:
            raw = raw.narrow(pos, 0, lengths[d][i])
    return raw.contiguous()


def _entry(x: torch.Tensor, dims: tuple, i: int) -> torch.Tensor:
    return x.select(dims.index(B), i)


def _front(x: torch.Tensor, shape) -> torch.Tensor:
    assert all(a >= b for a, b in zip(x.shape, shape)), f"shape {tuple(x.shape)} smaller than {tuple(shape)}"
    return x[tuple(slice(0, s) for s in shape)]


def check_batch_vs_alone(case: Case, lengths: dict, extra: int = 1, seed: int = 0) -> None:
    """Each sequence alone gives the valid outputs and input gradients it gets inside the batch."""
    gen = torch.Generator().manual_seed(seed)
    raws, masks, lengths_t = valid_data(case, lengths, extra, gen)
    garbage = "nan" if "nan" in case.broadcast_grad_fills else "large"
    raws = [fill_padding(r, m, garbage, gen) for r, m in zip(raws, masks)]
    batch, grads, _ = run(case, raws, lengths_t, batch_outputs_only=True)
    n_batch = sizes_for(case, lengths, extra)[B]
    for i in range(n_batch):
        alone_lengths = {d: [n[i]] for d, n in lengths.items()}
        alone_raws = [_alone_input(inp, r, i, lengths) for inp, r in zip(case.inputs, raws)]
        alone_t = {d: torch.tensor(n, dtype=torch.int64) for d, n in alone_lengths.items()}
        outs, a_grads, _ = run(case, alone_raws, alone_t, batch_outputs_only=True)
        for name, ob in batch.items():
            if B not in ob.dims:
                continue
            oa = outs[name]
            what = f"{case}: output {name!r} of entry {i} (lengths {alone_lengths}) alone vs in the batch"
            assert oa.dims == ob.dims, what
            for d, n in ob.lengths.items():
                if B in d.length_dims:
                    nb = n.select(d.length_dims.index(B), i)
                    na = oa.lengths[d].select(d.length_dims.index(B), 0)
                    assert torch.equal(na, nb), f"{what}: lengths of {d}: {na} alone, {nb} in the batch"
            va, ma = _entry(oa.tensor, oa.dims, 0).detach(), _entry(oa.mask(), oa.dims, 0)
            vb, mb = _entry(ob.tensor, ob.dims, i).detach(), _entry(ob.mask(), ob.dims, i)
            assert int(mb.sum()) == int(ma.sum()), f"{what}: {int(ma.sum())} valid positions alone, {int(mb.sum())}"
            vb, mb = _front(vb, va.shape), _front(mb, va.shape)
            assert torch.equal(ma, mb), what
            torch.testing.assert_close(vb[ma], va[ma], equal_nan=True, rtol=1e-7, atol=1e-7,
                                       msg=lambda s, what=what: f"{what}: {s}")
        for k, (inp, gb, ga, m) in enumerate(zip(case.inputs, grads, a_grads, masks)):
            if gb is None or B not in inp.dims:
                continue
            what = f"{case}: gradient w.r.t. input {k} of entry {i} alone vs in the batch"
            gb_i = _front(_entry(gb, inp.dims, i), _entry(ga, inp.dims, 0).shape)
            ga_i = _entry(ga, inp.dims, 0)
            assert torch.isfinite(ga_i).all(), f"{what}: not finite alone"
            m_i = _front(_entry(m, inp.dims, i), ga_i.shape)
            assert m_i.all()
            torch.testing.assert_close(gb_i, ga_i, rtol=1e-7, atol=1e-7, msg=lambda s, what=what: f"{what}: {s}")
