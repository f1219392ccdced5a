"""A MaskedComputation block that stays in a loop's step runs on the rows where its mask is True.

The executor runs such a block as one kernel: the entries where the mask is
True are taken out of its inputs, its nodes run on them alone, and each value
read after the block is its value before with those rows replaced
(:mod:`looplift.runtime.masked_rows`). The reference interpreter runs the block
on every entry, then the wheres, literally. Checked here, in float64: the
executor equals the reference and a hand-written loop, outputs and gradients;
the block's LSTM product runs on as many rows as the mask has True entries
(counted from the torch calls that read its recurrent weight); a search (a
transducer's, the mask over batch and beam) equals the reference; a block
whose nodes read other entries runs on every entry.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loop_helpers import assert_same_named
from test_masked import (
    DTYPE,
    LENGTHS,
    MASK,
    PADDED,
    Example,
    F,
    check_equivalent,
    example_inputs,
    new_time,
    randn,
    torch_example,
)
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

import looplift as ll
from looplift.runtime.masked_rows import MAX_SHARE

B = ll.batch_dim


class RowsOfProducts(TorchDispatchMode):
    """Records the rows of every matrix product with `weight` (its storage) as an operand."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.storage = weight.untyped_storage().data_ptr()
        self.rows: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        if func in (aten.addmm.default, aten.addmm_.default, aten.mm.default):
            a, b = (args[0], args[1]) if func is aten.mm.default else (args[1], args[2])
            if b.untyped_storage().data_ptr() == self.storage:
                self.rows.append(a.shape[0])
        return func(*args, **(kwargs or {}))


def expected_rows(mask: torch.Tensor, steps: int) -> list[int]:
    """Per step: the entries where the mask is True, or all of them where that is more than MAX_SHARE."""
    n = mask.shape[0]
    return [k if k <= MAX_SHARE * n else n for k in (int(mask[:, t].sum()) for t in range(steps))]


def test_the_block_runs_on_the_rows_where_its_mask_is_true_and_equals_the_literal_loop():
    time = new_time()
    model = Example(time)
    prog = ll.compile(model, optimize=False)   # (optimized, the block leaves the loop)
    x = randn(len(LENGTHS), PADDED, F.size, seed=1)
    inputs = example_inputs(time, x, MASK, LENGTHS)
    with torch.no_grad(), RowsOfProducts(model.slow.weight_hh_l0) as products:
        y, acc, h, c = prog(*inputs)
    steps = int(LENGTHS.max())
    assert products.rows == expected_rows(MASK, steps)
    assert sum(products.rows) < steps * len(LENGTHS)
    want_y, want_acc, want_h, want_c = torch_example(model, x, MASK, LENGTHS)
    valid = (torch.arange(PADDED)[None, :] < LENGTHS[:, None])[..., None]
    assert_close(torch.where(valid, y.align(B, time, model.slow.hidden), 0.0), torch.where(valid, want_y, 0.0),
                 rtol=1e-9, atol=1e-12)
    for got, want in [(acc, want_acc), (h, want_h), (c, want_c)]:
        assert_close(got.align(B, model.slow.hidden), want, rtol=1e-9, atol=1e-12)
    check_equivalent(prog, inputs, model.parameters())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), held=st.sampled_from(["s", "r"]))
def test_on_rows_equals_the_reference_for_random_masks_with_gradients(data, held):
    batch = data.draw(st.integers(1, 6), label="batch")
    frames = data.draw(st.integers(1, 6), label="frames")
    lengths = torch.tensor(data.draw(st.lists(st.integers(0, frames), min_size=batch, max_size=batch),
                                     label="lengths"))
    bits = data.draw(st.lists(st.booleans(), min_size=batch * frames, max_size=batch * frames), label="mask")
    mask = torch.tensor(bits).view(batch, frames)
    time = new_time()
    model = Example(time, held, seed=3)
    x = randn(batch, frames, F.size, seed=4)
    check_equivalent(ll.compile(model, optimize=False), example_inputs(time, x, mask, lengths), model.parameters())


class MixingExample(Example):
    """The block's input is the frame plus the sum of all entries' frames: one entry reads the others."""

    def forward(self, x, m):
        loop = ll.Loop(axis=self.time)
        loop.state.slow = self.slow.default_initial_state([B])
        with loop:
            x_t, m_t = loop.unstack(x), loop.unstack(m)
            with ll.MaskedComputation(mask=m_t):
                s, loop.state.slow = self.slow(x_t + ll.sum(x_t, axis=B), state=loop.state.slow)
            y = loop.stack(s * 2.0)
        return y, loop.state.slow.h


def test_a_block_that_reads_other_entries_runs_on_every_entry():
    time = new_time()
    model = MixingExample(time)
    prog = ll.compile(model, optimize=False)
    x = randn(len(LENGTHS), PADDED, F.size, seed=1)
    inputs = example_inputs(time, x, MASK, LENGTHS)
    with torch.no_grad(), RowsOfProducts(model.slow.weight_hh_l0) as products:
        prog(*inputs)
    assert products.rows == [len(LENGTHS)] * int(LENGTHS.max())
    check_equivalent(prog, inputs, model.parameters())


def test_a_transducer_search_on_rows_equals_the_reference():
    from looplift.recipes.g2p import recipe
    from looplift.recipes.g2p.transducer import TransducerConfig, TransducerG2P

    torch.manual_seed(0)
    model = TransducerG2P(TransducerConfig(n_chars=12, n_phonemes=9, emb=8, enc=16, pred=16, joint=16)).to(DTYPE)
    with torch.no_grad():
        model.readout.bias[0] += 0.5   # (the blank about as likely as a label: the mask is True in part)
    model.eval()
    search = ll.compile(model, mode="search")
    words = [[1, 2, 3, 4, 5, 6], [2, 3, 4, 1], [5, 6], [7, 8, 9, 10, 11], [3]]
    chars = recipe.char_batch(model, words)
    with torch.no_grad(), RowsOfProducts(model.pred.weight_hh_l0) as products:
        got = search(chars, src=recipe.SRC, tgt=recipe.TGT, beam=4)
    want = search.reference(chars, src=recipe.SRC, tgt=recipe.TGT, beam=4)
    for a, b in zip(got, want):
        assert_same_named(a, b)
    # (the first step runs on one slot per word; later steps on the hypotheses whose last symbol was a label)
    assert sum(1 < r < len(words) * 4 for r in products.rows[1:]) >= 2, products.rows
