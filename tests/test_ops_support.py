"""Helpers shared by the op tests (``tests/test_ops_*.py``); it holds no tests itself.

Every op test follows one pattern: build small padded data with fixed seeds,
trace the op with :func:`run` (which also checks that the reference
interpreter gives exactly the same result), and compare with the same
computation written in plain PyTorch at the *valid* positions only. Padding
positions are filled with large garbage, so any leak of padding into a valid
result shows up as a large error.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import looplift as ll
from looplift._tree import flatten

__all__ = ["B", "TOL", "gen", "randn", "randint", "seq_mask", "with_garbage", "run", "compile_and_run",
           "assert_valid_close", "masked_weighted_sum", "grads"]

B = ll.batch_dim

#: Tolerances for float64 comparisons with plain PyTorch.
TOL = dict(rtol=1e-10, atol=1e-12)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float64).to(dtype)


def randint(low: int, high: int, shape: Sequence[int], *, seed: int = 0) -> torch.Tensor:
    return torch.randint(low, high, tuple(shape), generator=gen(seed))


def seq_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """(batch, size) bool mask: True at the first ``lengths[b]`` positions of each row."""
    return torch.arange(size)[None, :] < lengths[:, None]


def with_garbage(x: torch.Tensor, lengths: torch.Tensor, *, axis: int = 1, value: float = 50.0,
                 seed: int = 99) -> torch.Tensor:
    """`x` (batch first) with the padding along `axis` replaced by large random garbage around `value`."""
    mask = seq_mask(lengths, x.shape[axis])
    mask = mask.view(mask.shape[0], *([1] * (axis - 1)), mask.shape[1], *([1] * (x.dim() - axis - 1)))
    if x.dtype.is_floating_point:
        garbage = value + torch.randn(x.shape, generator=gen(seed), dtype=torch.float64).to(x.dtype)
    else:
        garbage = torch.full_like(x, int(value))
    return torch.where(mask, x, garbage)


def _assert_same(a, b, where: str) -> None:
    if isinstance(a, ll.Named):
        assert isinstance(b, ll.Named), where
        assert a.dims == b.dims, where
        assert a.tensor.dtype == b.tensor.dtype, where
        torch.testing.assert_close(a.tensor, b.tensor, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"{where}: executor and reference differ: {m}")
        assert set(a.lengths) == set(b.lengths), where
        for d in a.lengths:
            assert torch.equal(a.lengths[d], b.lengths[d]), where
    else:
        assert a == b, where


def compile_and_run(fn, *args, mode: str = "eval", seed: int | None = None):
    """Compile `fn`, run it with the executor and with the reference interpreter, check both agree.

    With `seed`, the torch RNG is seeded to it before each of the two runs (for dropout).
    Returns ``(program, result of the executor)``.
    """
    prog = ll.compile(fn, mode=mode)
    if seed is not None:
        torch.manual_seed(seed)
    out = prog(*args)
    if seed is not None:
        torch.manual_seed(seed)
    ref = prog.reference(*args)
    outs, spec = flatten(out, lambda v: isinstance(v, ll.Named))
    refs, ref_spec = flatten(ref, lambda v: isinstance(v, ll.Named))
    assert spec == ref_spec
    for i, (a, b) in enumerate(zip(outs, refs)):
        _assert_same(a, b, f"output {i}")
    # What the program computes agrees with what tracing promised (the symbolic dims and dtype).
    (trace,) = prog.traces
    for i, (a, sym) in enumerate(zip(outs, trace.out_tensors)):
        assert a.dims == sym.dims, f"output {i}"
        assert a.tensor.dtype == sym.dtype, f"output {i}: traced as {sym.dtype}, computed as {a.tensor.dtype}"
    return prog, out


def run(fn, *args, mode: str = "eval", seed: int | None = None):
    """The result of running `fn` as a program (checked against the reference interpreter)."""
    return compile_and_run(fn, *args, mode=mode, seed=seed)[1]


def assert_valid_close(out: ll.Named, expected: torch.Tensor, dims: Sequence, mask: torch.Tensor | None = None,
                       **tol) -> None:
    """`out`, with its axes in the order `dims`, equals `expected` where `mask` (broadcast) is True.

    Also checks the shape, so a wrong padded size is caught too.
    """
    got = out.align(*dims)
    assert tuple(got.shape) == tuple(expected.shape), (tuple(got.shape), tuple(expected.shape))
    if mask is None:
        torch.testing.assert_close(got, expected.to(got.dtype), **(tol or TOL))
        return
    mask = mask.expand(got.shape)
    torch.testing.assert_close(got[mask], expected.to(got.dtype)[mask], **(tol or TOL))


def masked_weighted_sum(y: torch.Tensor, mask: torch.Tensor | None = None, *, seed: int = 7) -> torch.Tensor:
    """A scalar loss: the sum of `y` times fixed random weights, over the positions where `mask` is True."""
    w = torch.randn(y.shape, generator=gen(seed), dtype=torch.float64).to(y.dtype)
    if mask is None:
        return (y * w).sum()
    return torch.where(mask.expand(y.shape), y * w, torch.zeros((), dtype=y.dtype)).sum()


def grads(loss: torch.Tensor, wrt: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, list(wrt))
