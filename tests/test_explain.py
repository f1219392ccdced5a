"""explain() speaks the user's language in every mode, and the optimizer never gives up a whole loop because
one call cannot move: that call stays, the rest moves."""

import re

import torch

import looplift as ll
from looplift import nn
from looplift import trace as _trace
from looplift.errors import DimError
from looplift.ops._core import as_tensor, emit

B = ll.batch_dim
DTYPE = torch.float64


def per_frame_only(x, *, axis: ll.Dim):
    """A stand-in for an op that works on one frame only: an error where `x` has `axis` (a dim rule that knows
    no extra batch dims), else ``2 * x``."""
    x = as_tensor(x)
    if axis in x.dims:
        raise DimError(f"per_frame_only takes a frame, not the whole {axis.name!r}")
    return emit("per_frame_only", (x,), lambda env, v: 2 * v, x.dims, x.dtype)


per_frame_only = _trace.replayable(per_frame_only)


def test_a_call_that_cannot_run_over_the_sequence_stays_and_the_rest_moves():
    time, feat, hidden = ll.Dim("time"), ll.Dim("feat", 3), ll.Dim("hidden", 4)
    torch.manual_seed(0)
    inp, rec, out = nn.Linear(feat, hidden).to(DTYPE), nn.Linear(hidden, hidden).to(DTYPE), \
        nn.Linear(hidden, hidden).to(DTYPE)

    def model(x):
        loop = ll.Loop(axis=time)
        loop.state.h = ll.zeros([hidden])
        with loop:
            a = per_frame_only(inp(loop.unstack(x)), axis=time)     # cannot run over the sequence: stays
            loop.state.h = ll.tanh(a + rec(loop.state.h))
            y = loop.stack(ll.relu(out(loop.state.h)))
        return y, loop.state.h

    prog = ll.compile(model)
    x = ll.Named(torch.randn(3, 5, 3, dtype=DTYPE), (B, time, feat), {time: torch.tensor([5, 2, 0])})
    for got, ref in zip(prog(x), prog.reference(x)):
        torch.testing.assert_close(got.tensor, ref.tensor)
    text = prog.explain()
    assert "not optimized" not in text, text
    moved_in = text.split("moved in:")[1].split("stayed")[0]
    assert "linear {batch, hidden} at" in moved_in, text          # its input still moves in
    assert re.search(r"per_frame_only \{batch, hidden\} at \S+\n +kept by: \(it cannot run over the whole "
                     r"sequence: per_frame_only \{batch, hidden\} at \S+ cannot run over the whole sequence: "
                     r"per_frame_only takes a frame, not the whole 'time'\)", text), text
    assert "relu" in text.split("moved out:")[1], text


README_DECODER_LINES = """
class Decoder(ll.Module):
    def __init__(self, vocab, hidden):
        super().__init__()
        self.vocab = vocab
        self.emb, self.rec, self.out = nn.Embedding(vocab, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, vocab)

    def forward(self, h0, tgt, target=None):
        loop = ll.Loop(axis=tgt, max_seq_len=6)
        loop.state.label, loop.state.h = ll.full(0, sparse_dim=self.vocab), h0
        with loop:
            loop.state.h = ll.tanh(self.emb(loop.state.label) + self.rec(loop.state.h))
            log_probs = ll.log_softmax(self.out(loop.state.h), axis=self.vocab)
            label = loop.state.label = ll.choice(log_probs, target=target, beam_size=4)
            loop.end(label == 0, include_eos=True)
            logp = loop.stack(ll.gather(log_probs, index=label, axis=self.vocab))
            labels = loop.stack(label)
        if ll.is_search():
            return labels, loop.search.scores, logp
        return -ll.sum(logp, axis=[ll.batch_dim, loop.axis])
"""


def test_the_readme_search_example_moves_out_what_is_only_stacked_and_explains_in_the_users_terms():
    scope = {"ll": ll, "nn": nn}
    exec(compile(README_DECODER_LINES, "decoder.py", "exec"), scope)
    tgt, vocab, hidden = ll.Dim("tgt"), ll.Dim("vocab", 5), ll.Dim("hidden", 8)
    torch.manual_seed(1)
    decoder = scope["Decoder"](vocab, hidden)
    h0 = ll.Named(torch.randn(2, 8), (B, hidden))
    prog = ll.compile(decoder, mode="search")
    labels, scores, logp = prog(h0, tgt)
    ref_labels, ref_scores, ref_logp = prog.reference(h0, tgt)
    torch.testing.assert_close(scores.tensor, ref_scores.tensor)
    assert torch.equal(labels.tensor, ref_labels.tensor)
    torch.testing.assert_close(logp.tensor, ref_logp.tensor)
    text = prog.explain()
    assert "not optimized" not in text, text
    # the stacked gather of the log-probs at the chosen labels runs after the loop on the stacked sequences
    after = text.split("moved out: computed after the loop on the stacked sequence:")[1].split("stayed")[0]
    assert "gather {batch, beam'} at decoder.py:16" in after, text
    # the search's own ops are named as what the user wrote, once per section (its parts on constants are
    # computed once before the loop, the rest stays)
    stayed = text.split("stayed in the loop")[1]
    assert stayed.count("    looplift.choice at decoder.py:14\n") == 1, text
    assert "kept by: looplift.choice at decoder.py:14" in stayed, text
    for internal in ("replace_dim", "logical_or", "logical_not", "where {", "CannotMove", "_Search", "prune {"):
        assert internal not in text, (internal, text)
