"""Loops that end per entry leave the entries that ended out of their later steps (``looplift.runtime.compact``).

The executor's loops do; the reference interpreter's never do (it runs the literal loop). So each test runs a
program both ways and asserts equal results and gradients, and that the executor did leave entries out.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import looplift as ll
from looplift.runtime import compact

B = ll.batch_dim
F = ll.Dim("c_feat", 3)
V = ll.Dim("c_vocab", 5)


@pytest.fixture
def cuts(monkeypatch):
    """The (rows before, rows after) of every time a loop left ended entries out."""
    seen = []
    original = compact.Rows.cut

    def cut(self, alive, states, captured):
        seen.append((self.size, int(alive.sum())))
        return original(self, alive, states, captured)

    monkeypatch.setattr(compact.Rows, "cut", cut)
    return seen


def _valid(named: ll.Named) -> torch.Tensor:
    """The values of `named` at valid positions, over (batch, its loop's dim, the rest); padding (undefined)
    zeroed."""
    axes = [d for d in named.dims if d in named.lengths]
    if not axes:
        return named.tensor
    (axis,) = axes
    rest = [d for d in named.dims if d is not B and d is not axis]
    v = named.align(B, axis, *rest)
    n = named.lengths[axis]
    mask = torch.arange(v.shape[1])[None, :] < n[:, None]
    return v * mask.view(*mask.shape, *[1] * len(rest)).to(v.dtype)


def _assert_equal_trees(got, want):
    for g, w in zip(got, want):
        assert g.dims == w.dims
        assert {d: n.tolist() for d, n in g.lengths.items()} == {d: n.tolist() for d, n in w.lengths.items()}
        torch.testing.assert_close(_valid(g), _valid(w), rtol=0, atol=0)


G = ll.Dim("c_out", 3)


def _recurrence(x, stop, weight, max_len: int = 40):
    """A loop over its own dim carrying a state per entry, ended per entry at step `stop`: the stacked values
    (a function of the state) and the final state."""
    loop = ll.Loop(max_seq_len=max_len)
    loop.state.h = x
    with loop:
        loop.state.h = ll.tanh(ll.replace_dim(ll.dot(loop.state.h, weight, reduce=F), G, F) + x)
        loop.end((loop.index + 1) >= stop, include_eos=True)
        ys = loop.stack(loop.state.h * 2.0)
    return ys, loop.state.h


def _run_both(stop: torch.Tensor, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(F.size, G.size, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(len(stop), F.size, generator=g, dtype=torch.float64, requires_grad=True)
    prog = ll.compile(_recurrence)
    args = (ll.Named(x, (B, F)), ll.Named(stop, (B,)), ll.Named(w, (F, G)))
    got, want = prog(*args), prog.reference(*args)
    _assert_equal_trees(got, want)
    weights = torch.randn(_valid(got[0]).shape, generator=g, dtype=torch.float64)
    grads = [torch.autograd.grad((_valid(out[0]) * weights).sum() + out[1].tensor.sum(), [x, w])
             for out in (got, want)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    return got


def test_a_loop_ended_per_entry_equals_the_literal_loop_with_gradients(cuts):
    stop = torch.tensor([1, 9, 3, 3, 12, 2, 7, 1])
    ys, _ = _run_both(stop)
    (axis,) = [d for d in ys.dims if d is not B and d != F]
    assert ys.lengths[axis].tolist() == stop.tolist()
    assert cuts and all(after < before for before, after in cuts)
    assert cuts[-1][1] == 1   # (at the end, only the longest entry ran)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 10), min_size=1, max_size=12), st.integers(0, 2**16))
def test_leaving_ended_entries_out_changes_nothing_for_any_ends(stops, seed):
    _run_both(torch.tensor(stops), seed)


def test_a_beam_search_leaves_finished_entries_out_and_finds_the_same_n_best(cuts):
    """The G2P model's batched beam search (one entry per word; words end at different steps): the n-best
    labels, scores, lengths and valid slots equal the literal loop's."""
    from looplift.recipes.g2p import recipe
    from looplift.recipes.g2p.model import G2P, Config

    torch.manual_seed(3)
    model = G2P(Config(n_chars=9, n_phonemes=7, emb=6, enc=8, dec=6)).double().eval()
    with torch.no_grad():
        model.readout.weight.mul_(4.0)   # (peaked: hypotheses end at different steps)
    g = torch.Generator().manual_seed(4)
    words = [torch.randint(1, 9, (int(n),), generator=g).tolist() for n in torch.randint(1, 9, (12,), generator=g)]
    x = recipe.char_batch(model, words)
    search = ll.compile(model, mode="search")
    with torch.no_grad():
        got = search(x, src=recipe.SRC, tgt=recipe.TGT, beam=4)
        want = search.reference(x, src=recipe.SRC, tgt=recipe.TGT, beam=4)
    labels, scores, lengths, valid = got
    (beam,) = [d for d in valid.dims if d is not B]
    # the scores to float64 rounding (the executor adds the LSTM's recurrent product into its gates in place,
    # one addmm_, which on some CPUs rounds the last bit unlike the reference's product, then sum), the lengths
    # and valid slots exactly
    torch.testing.assert_close(scores.align(B, beam), want[1].align(B, beam), rtol=1e-12, atol=1e-12)
    for g_, w_ in zip(got[2:], want[2:]):
        assert torch.equal(g_.align(B, beam), w_.align(B, beam))
    (steps,) = [d for d in labels.dims if d is not B and d is not beam]
    n = lengths.align(B, beam)
    pick = torch.arange(labels.align(B, beam, steps).shape[-1]) < n[..., None]
    assert torch.equal(labels.align(B, beam, steps) * pick, want[0].align(B, beam, steps) * pick)
    assert cuts and all(after < before for before, after in cuts)


def test_a_body_that_mixes_entries_runs_every_entry(cuts):
    """A step reading across the batch (the mean of the states over it) cannot leave entries out: none are,
    and the result is the literal loop's (the loop optimizer keeps the ended entries' states frozen too,
    though nothing reads the final states: the step reads them)."""

    def mixing(x, stop):
        loop = ll.Loop(max_seq_len=20)
        loop.state.h = x
        with loop:
            loop.state.h = ll.tanh(loop.state.h + ll.mean(loop.state.h, axis=B))
            loop.end((loop.index + 1) >= stop, include_eos=True)
            ys = loop.stack(loop.state.h)
        return ys

    assert compact.plan(_loop_spec(mixing)) is None
    x = torch.randn(5, F.size, dtype=torch.float64)
    stop = torch.tensor([1, 6, 2, 2, 3])
    prog = ll.compile(mixing)
    args = (ll.Named(x, (B, F)), ll.Named(stop, (B,)))
    _assert_equal_trees([prog(*args)], [prog.reference(*args)])
    assert not cuts


def _loop_spec(fn):
    """The record of the (only) loop of `fn` over (batch, c_feat) features and per-entry ends."""
    prog = ll.compile(fn)
    trace = prog.trace(ll.Named(torch.zeros(2, F.size, dtype=torch.float64), (B, F)),
                       ll.Named(torch.tensor([1, 2]), (B,)))
    (node,) = [n for n in trace.graph.nodes if n.region is not None]
    return node.region
