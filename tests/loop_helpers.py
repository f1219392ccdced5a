"""Helpers for ``test_loop.py``: run a program with the executor and the reference interpreter, compare.

Every comparison is on valid positions only (padding values are undefined).
"""

from __future__ import annotations

import torch
from torch.testing import assert_close

import looplift as ll
from looplift._tree import flatten

B = ll.batch_dim
DTYPE = torch.float64


def named_leaves(value) -> list[ll.Named]:
    leaves, _ = flatten(value, lambda v: isinstance(v, ll.Named))
    return [v for v in leaves if isinstance(v, ll.Named)]


def masked(x: ll.Named) -> torch.Tensor:
    """`x` with its padding positions zeroed (so two runs compare by their valid values only)."""
    m = x.mask()
    return torch.where(m, x.tensor, torch.zeros((), dtype=x.tensor.dtype))


def assert_same_named(a: ll.Named, b: ll.Named) -> None:
    """Same dims, same lengths, same values at valid positions."""
    assert a.dims == b.dims, (a.dims, b.dims)
    assert set(a.lengths) == set(b.lengths)
    for d in a.lengths:
        assert torch.equal(a.lengths[d], b.lengths[d]), (d, a.lengths[d], b.lengths[d])
    assert_close(masked(a), masked(b), rtol=1e-10, atol=1e-10)


def run_both(prog: ll.Program, *args, **kwargs):
    """Run `prog` with the executor and the reference interpreter; check they agree; return the executor's."""
    out = prog(*args, **kwargs)
    ref = prog.reference(*args, **kwargs)
    la, lb = named_leaves(out), named_leaves(ref)
    assert len(la) == len(lb)
    for a, b in zip(la, lb):
        assert_same_named(a, b)
    return out


def align_to(x: ll.Named, *dims: ll.Dim, sizes: dict | None = None) -> torch.Tensor:
    """`x` with its axes in the order `dims`; dims it lacks (a value the same for every entry) get size 1,
    or the size given in `sizes` (expanded)."""
    extra = [d for d in x.dims if d not in dims]
    assert not extra, f"{extra} not in {dims}"
    t = x.tensor.permute([x.dims.index(d) for d in dims if d in x.dims])
    t = t.reshape([t.shape[[d for d in dims if d in x.dims].index(d)] if d in x.dims else 1 for d in dims])
    if sizes:
        t = t.expand([sizes.get(d, -1) if d not in x.dims else -1 for d in dims])
    return t
