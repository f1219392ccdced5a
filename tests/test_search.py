"""Beam search (``looplift.search``, ``looplift.choice``) against brute force and plain PyTorch.

What is checked, each on tiny random float64 models with fixed seeds (the model is a one-layer RNN decoder
fed back its previous label, BOS = EOS = label 0, see :class:`Decoder`; its step is also written in plain
PyTorch, :meth:`Decoder.torch_step`, which is all the expectations are computed with):

* exhaustive search (beam >= number of all outcomes): the valid n-best is exactly the brute-force
  enumeration of all sequences ending at EOS within ``max_seq_len`` plus those cut at ``max_seq_len``,
  in the same order, with the same scores (sums of the step log-probs) -- with ``include_eos`` True
  (EOS in the length and the labels) and False (not in them; its log-prob still in the score);
  a property test over seeds, vocab sizes and max lengths;
* beam size 1 is greedy decoding; smaller beams equal a plain Python beam search (:func:`py_beam_search`,
  same rules: an ended hypothesis is carried along with its score, top-k over all extensions);
* batch entries are independent (an attention decoder over an encoder input with lengths per entry);
* the atomic ops (``expand``/``prune`` with the score in the user's state) equal ``choice``;
* filtering with any op (a forced prefix, a bigram lexicon) and "cheating" (keeping the reference
  hypothesis in the beam by pruning on a boosted key and keeping the real scores with ``Pruned.take``);
* ``prune(threshold=...)``, ``prune(sample=True)``, ``recombine`` (max and logsumexp, against a dynamic
  program over the steps keyed by the last label), several score components (AM + LM fusion),
  length normalization, a frame-synchronous search over an input axis without label feedback, the cut
  at ``max_seq_len``, the reference interpreter, and the errors of misuse (naming the user's line).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from error_helpers import marked_line
from hypothesis import given, settings
from hypothesis import strategies as st
from loop_helpers import align_to
from torch.utils._python_dispatch import TorchDispatchMode

import looplift as ll

B = ll.batch_dim
H = ll.Dim("hidden", 3)
DT = torch.float64
NEG_INF = float("-inf")
TOL = 1e-9


# ---------------------------------------------------------------------------------------------------------
# the model, in looplift and in plain PyTorch

class Decoder(ll.Module):
    """``h' = tanh(emb[prev] + rec(h))``, ``log_probs = log_softmax(out(h'))`` over the vocab; random
    weights (scaled up so scores are well separated, no ties), float64."""

    def __init__(self, n_vocab: int, seed: int, *, scale: float = 1.5, eos_bias: float = 0.0):
        super().__init__()
        self.V = ll.Dim("vocab", n_vocab)
        self.emb = ll.nn.Embedding(self.V, H)
        self.rec = ll.nn.Linear(H, H)
        self.out = ll.nn.Linear(H, self.V)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            self.out.bias[0] += eos_bias
        self.double()

    def step(self, label, h):
        h = ll.tanh(self.emb(label) + self.rec(h))
        return h, ll.log_softmax(self.out(h), axis=self.V)

    def torch_step(self, label: int, h: torch.Tensor):
        with torch.no_grad():
            h = torch.tanh(self.emb.weight[label] + F.linear(h, self.rec.weight, self.rec.bias))
            return h, torch.log_softmax(F.linear(h, self.out.weight, self.out.bias), -1)


def initial_states(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, H.size, generator=torch.Generator().manual_seed(1000 + seed), dtype=DT)


def search_program(dec: Decoder, *, beam: int, max_len, include_eos: bool = True,
                   length_normalization=False):
    """The usual search loop with ``choice``: returns (labels, scores, lengths, valid)."""
    V = dec.V

    def run(x):
        loop = ll.Loop(max_seq_len=max_len)
        loop.state.label = ll.full(0, sparse_dim=V)
        loop.state.h = x
        with loop:
            h, lp = dec.step(loop.state.label, loop.state.h)
            loop.state.h = h
            label = ll.choice(lp, beam_size=beam, axis=V, length_normalization=length_normalization)
            loop.state.label = label
            loop.end(label == 0, include_eos=include_eos)
            ys = loop.stack(label)
        return ys, loop.search.scores, loop.search.lengths, loop.search.valid

    return ll.compile(run, mode="search")


# ---------------------------------------------------------------------------------------------------------
# reading the n-best list

def nbest(ys: ll.Named, scores: ll.Named, lengths: ll.Named, valid: ll.Named):
    """Per batch entry, the valid hypotheses in beam order: [(labels tuple, score)]. (A value without the
    batch dim, e.g. of a model that ignores its input, is the same for every entry.)"""
    (beam,) = [d for d in valid.dims if d is not B]
    (T,) = [d for d in ys.dims if d is not B and d is not beam]
    n_batch = max([x.tensor.shape[x.dims.index(B)] for x in (ys, scores, lengths, valid) if B in x.dims],
                  default=1)
    width = beam.size if beam.is_static else valid.tensor.shape[valid.dims.index(beam)]   # (a changing beam)
    sizes = {B: n_batch, beam: width}
    y = align_to(ys, B, beam, T, sizes=sizes)
    s = align_to(scores, B, beam, sizes=sizes).detach()
    n, v = align_to(lengths, B, beam, sizes=sizes), align_to(valid, B, beam, sizes=sizes)
    # the stacked labels' dim has the hypotheses' lengths
    lens = ys.lengths[T]
    assert torch.equal(align_to(ll.Named(lens, T.length_dims), B, beam, sizes=sizes), n)
    out = []
    for b in range(n_batch):
        out.append([(tuple(int(t) for t in y[b, k, :int(n[b, k])]), float(s[b, k]))
                    for k in range(width) if bool(v[b, k])])
    return out


def assert_same_nbest(got, want, *, ordered: bool = True, tol: float = TOL):
    """`got` and `want`: [(labels, score)] per entry; same sequences (in the same order if `ordered`,
    else sorted by score) and scores within `tol`."""
    assert len(got) == len(want)
    for b, (g, w) in enumerate(zip(got, want)):
        if not ordered:
            g = sorted(g, key=lambda x: -x[1])
            w = sorted(w, key=lambda x: -x[1])
        assert [q for q, _ in g] == [q for q, _ in w], f"entry {b}:\n got  {g}\n want {w}"
        for (q, sg), (_, sw) in zip(g, w):
            assert abs(sg - sw) <= tol, f"entry {b}, {q}: score {sg} != {sw}"


# ---------------------------------------------------------------------------------------------------------
# expectations in plain Python / PyTorch

def enumerate_outcomes(step, h0, n_vocab: int, max_len: int, *, allowed=None):
    """All outcomes of decoding up to `max_len` steps: [(labels incl. the final EOS if any, ended, score)],
    by depth-first search sharing prefixes. `step(prev, h) -> (h, log_probs)`; `allowed(prefix, v)`
    restricts the labels (a filtered label is never taken)."""
    out = []

    def rec(prefix, prev, h, score):
        if len(prefix) == max_len:
            out.append((prefix, False, score))
            return
        h2, lp = step(prev, h)
        for v in range(n_vocab):
            if allowed is not None and not allowed(prefix, v):
                continue
            s = score + float(lp[v])
            if v == 0:
                out.append((prefix + (0,), True, s))
            else:
                rec(prefix + (v,), v, h2, s)

    rec((), 0, h0, 0.0)
    return out


def brute_force_nbest(outcomes, *, include_eos: bool = True):
    """The outcomes as an n-best list sorted by score: [(labels, score)]."""
    res = [((q if include_eos or not ended else q[:-1]), s) for q, ended, s in outcomes]
    return sorted(res, key=lambda x: -x[1])


def py_beam_search(step, h0, n_vocab: int, beam: int, max_len: int, *, threshold=None, include_eos=True,
                   allowed=None, widths: list | None = None):
    """Plain beam search: at each step, every live hypothesis extends by every label (that `allowed`), an
    ended one is carried along unchanged; keep the `beam` best (and, with a threshold, those within it of
    the best); stop when all ended or after `max_len` steps. Returns [(labels, score)] best first.
    `widths`, if given, gets the number of hypotheses kept at each step."""
    hyps = [(0.0, (), False, h0, 0)]
    for _ in range(max_len):
        if all(e for _, _, e, _, _ in hyps):
            break
        cands = []
        for s, q, ended, h, prev in hyps:
            if ended:
                cands.append((s, q, True, h, prev))
                continue
            h2, lp = step(prev, h)
            for v in range(n_vocab):
                if allowed is None or allowed(q, v):
                    cands.append((s + float(lp[v]), q + (v,), v == 0, h2, v))
        cands.sort(key=lambda c: -c[0])
        hyps = cands[:beam]
        if threshold is not None:
            best = hyps[0][0]
            hyps = [c for c in hyps if c[0] >= best - threshold]
        if widths is not None:
            widths.append(len(hyps))
    return [((q if include_eos or not e else q[:-1]), s) for s, q, e, _, _ in hyps]


def score_of(step, h0, labels) -> float:
    h, prev, s = h0, 0, 0.0
    for v in labels:
        h, lp = step(prev, h)
        s, prev = s + float(lp[v]), v
    return s


def n_outcomes(n_vocab: int, max_len: int) -> int:
    return sum((n_vocab - 1) ** k for k in range(max_len)) + (n_vocab - 1) ** max_len


def run_nbest(prog, x, *, reference=False):
    out = (prog.reference if reference else prog)(ll.Named(x, (B, H)))
    return nbest(*out)


# ---------------------------------------------------------------------------------------------------------
# exhaustive search equals brute force

def check_exhaustive(seed, n_vocab, max_len, include_eos, *, reference=False, extra_beam=0):
    dec = Decoder(n_vocab, seed)
    x = initial_states(2, seed)
    beam = n_outcomes(n_vocab, max_len) + extra_beam
    prog = search_program(dec, beam=beam, max_len=max_len, include_eos=include_eos)
    got = run_nbest(prog, x, reference=reference)
    want = [brute_force_nbest(enumerate_outcomes(dec.torch_step, x[b], n_vocab, max_len),
                              include_eos=include_eos) for b in range(2)]
    assert_same_nbest(got, want)
    return got


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n_vocab=st.integers(2, 4), max_len=st.integers(1, 4),
       extra_beam=st.integers(0, 2))
def test_exhaustive_search_equals_brute_force(seed, n_vocab, max_len, extra_beam):
    """Beam >= all outcomes: the valid n-best is every outcome, best first, scores to 1e-9 (slots beyond
    the outcomes are invalid)."""
    check_exhaustive(seed, n_vocab, max_len, True, extra_beam=extra_beam)


@pytest.mark.parametrize("n_vocab,max_len", [(2, 3), (3, 3), (4, 2)])
def test_exhaustive_search_without_eos_in_length(n_vocab, max_len):
    """include_eos=False: an ended hypothesis's length and labels stop before its EOS (so the first
    outcome, EOS at once, is the empty sequence); its score still has the EOS log-prob."""
    got = check_exhaustive(7 + n_vocab, n_vocab, max_len, False)
    for entry in got:
        assert () in [q for q, _ in entry]   # (EOS at once)
        assert all(0 not in q for q, _ in entry)


def test_reference_interpreter_gives_the_same_nbest():
    """prog.reference (the literal step-by-step interpreter) equals brute force (exhaustive) and equals the
    compiled program with a small beam."""
    check_exhaustive(3, 3, 3, True, reference=True)
    dec = Decoder(4, 11)
    x = initial_states(3, 11)
    prog = search_program(dec, beam=3, max_len=4)
    got, ref = run_nbest(prog, x), run_nbest(prog, x, reference=True)
    assert_same_nbest(got, ref)
    assert_same_nbest(got, [py_beam_search(dec.torch_step, x[b], 4, 3, 4) for b in range(3)])



def test_the_first_step_runs_on_one_slot_of_the_beam():
    """At the start every hypothesis is the first one repeated: the optimized run computes the first step's
    decoder on one slot per entry (the reference on all), and the n-best is the same."""
    dec = Decoder(4, 11)
    x = initial_states(3, 11)
    prog = search_program(dec, beam=3, max_len=4)
    rows = {}

    class Tanh(TorchDispatchMode):   # (the decoder's tanh: its rows, call by call)
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.tanh.default:
                rows.setdefault(self.run, []).append(args[0].numel() // H.size)
            return func(*args, **(kwargs or {}))

    for run in ("optimized", "reference"):
        mode = Tanh()
        mode.run = run
        with mode:
            got = run_nbest(prog, x, reference=run == "reference")
        assert_same_nbest(got, [py_beam_search(dec.torch_step, x[b], 4, 3, 4) for b in range(3)])
    assert rows["optimized"][0] == 3 and rows["reference"][0] == 3 * 3, rows
    assert rows["optimized"][1:] == rows["reference"][1:] == [3 * 3] * (len(rows["reference"]) - 1), rows


# ---------------------------------------------------------------------------------------------------------
# beam 1 is greedy; small beams are the plain beam search

def test_beam_size_1_is_greedy_decoding():
    """Beam 1 equals argmax decoding in plain PyTorch (stop at EOS or after max_seq_len steps)."""
    for seed in range(4):
        dec = Decoder(4, 20 + seed, eos_bias=-1.0)
        x = initial_states(3, seed)
        got = run_nbest(search_program(dec, beam=1, max_len=5), x)
        want = []
        for b in range(3):
            h, prev, labels, score = x[b], 0, (), 0.0
            for _ in range(5):
                h, lp = dec.torch_step(prev, h)
                prev = int(lp.argmax())
                labels, score = labels + (prev,), score + float(lp[prev])
                if prev == 0:
                    break
            want.append([(labels, score)])
        assert_same_nbest(got, want)


@pytest.mark.parametrize("beam", [2, 3, 5])
def test_small_beam_equals_plain_beam_search(beam):
    """Beams smaller than the outcomes: the n-best is the plain beam search's (py_beam_search)."""
    dec = Decoder(4, 5, eos_bias=-0.5)
    x = initial_states(3, 5)
    got = run_nbest(search_program(dec, beam=beam, max_len=5), x)
    assert_same_nbest(got, [py_beam_search(dec.torch_step, x[b], 4, beam, 5) for b in range(3)])
    assert all(len(entry) == beam for entry in got)


# ---------------------------------------------------------------------------------------------------------
# batch entries are independent

ENC_T = ll.Dim("enc_time")


class AttentionDecoder(Decoder):
    """The RNN decoder plus dot attention over an encoder (B, enc_time, hidden) with lengths per entry; the
    initial state is the encoder's mean over its valid frames."""

    def step(self, label, h, enc):
        h = ll.tanh(self.emb(label) + self.rec(h))
        att = ll.softmax(ll.dot(h, enc, reduce=H), axis=ENC_T)
        ctx = ll.dot(att, enc, reduce=ENC_T)
        return h, ll.log_softmax(self.out(h + ctx), axis=self.V)

    def torch_step_on(self, enc):   # enc: (T, H), the valid frames only
        def step(label, h):
            with torch.no_grad():
                h = torch.tanh(self.emb.weight[label] + F.linear(h, self.rec.weight, self.rec.bias))
                ctx = torch.softmax(enc @ h, 0) @ enc
                return h, torch.log_softmax(F.linear(h + ctx, self.out.weight, self.out.bias), -1)
        return step


def attention_program(dec: AttentionDecoder, beam: int, max_len: int, threshold=None):
    V = dec.V

    def run(enc):
        loop = ll.Loop(max_seq_len=max_len)
        loop.state.label = ll.full(0, sparse_dim=V)
        loop.state.h = ll.mean(enc, axis=ENC_T)
        with loop:
            h, lp = dec.step(loop.state.label, loop.state.h, enc)
            loop.state.h = h
            label = ll.choice(lp, beam_size=beam, axis=V, threshold=threshold)
            loop.state.label = label
            loop.end(label == 0, include_eos=True)
            ys = loop.stack(label)
        return ys, loop.search.scores, loop.search.lengths, loop.search.valid

    return ll.compile(run, mode="search")


def check_entries_independent(beam: int, threshold=None):
    """A batch of 3 (encoder lengths 4, 1, 3; large garbage in the padding): each entry's n-best equals that
    of the entry run alone (batch of 1, no padding) and the plain beam search's. Returns the batch's."""
    dec = AttentionDecoder(4, 3, eos_bias=-1.0)
    lengths = torch.tensor([4, 1, 3])
    g = torch.Generator().manual_seed(3)
    enc = torch.randn(3, 4, H.size, generator=g, dtype=DT)
    pad = torch.arange(4)[None, :, None] >= lengths[:, None, None]
    enc = torch.where(pad, 1e3 * torch.randn(enc.shape, generator=g, dtype=DT), enc)
    prog = attention_program(dec, beam=beam, max_len=4, threshold=threshold)
    together = nbest(*prog(ll.Named(enc, (B, ENC_T, H), {ENC_T: lengths})))
    for b in range(3):
        n = int(lengths[b])
        alone = nbest(*prog(ll.Named(enc[b:b + 1, :n], (B, ENC_T, H), {ENC_T: lengths[b:b + 1]})))
        assert_same_nbest([together[b]], alone)
        valid = enc[b, :n]
        want = py_beam_search(dec.torch_step_on(valid), valid.mean(0), 4, beam, 4, threshold=threshold)
        assert_same_nbest(alone, [want])
    return together


def test_batch_entries_are_independent():
    """The n-best of a batch of 3 (encoder lengths 4, 1, 3; large garbage in the padding) equals that of
    each entry run alone (batch of 1, no padding), and the plain beam search with the same attention."""
    together = check_entries_independent(3)
    assert together[0] != together[2]   # (the entries do differ)


# ---------------------------------------------------------------------------------------------------------
# the atomic ops

def atomic_program(dec: Decoder, *, beam: int, max_len: int, filter_fn=None, recombine=None,
                   threshold=None, sample=False, widths=False):
    """The search step written with expand / prune, the score in the user's state ``loop.state.score``.
    `filter_fn(loop, log_probs, *extra_inputs)` may change the label scores (before expand). `widths`: also
    return the number of beam slots of each step (the pruned beam's size), stacked."""
    V = dec.V

    def run(x, *extra):
        loop = ll.Loop(max_seq_len=max_len)
        loop.state.label = ll.full(0, sparse_dim=V)
        loop.state.h = x
        loop.state.score = ll.zeros([])
        loop.state.t = ll.full(0)
        with loop:
            h, lp = dec.step(loop.state.label, loop.state.h)
            loop.state.h = h
            if filter_fn is not None:
                lp = filter_fn(loop, lp, *extra)
            cand = ll.search.expand(loop.state.score, lp, axis=V)
            pruned = ll.search.prune(cand, beam_size=beam, axis=V, threshold=threshold, sample=sample)
            scores = pruned.scores
            if recombine is not None:
                scores = ll.search.recombine(scores, keys=pruned.labels, mode=recombine)
            loop.state.score = scores
            loop.state.label = pruned.labels
            loop.end(pruned.labels == 0, include_eos=True)
            ys = loop.stack(pruned.labels)
            if widths:
                width = loop.stack(ll.max(ll.range_over_dim(pruned.beam), axis=pruned.beam) + 1)
        if widths:
            return ys, loop.state.score, loop.search.lengths, loop.search.valid, width
        return ys, loop.state.score, loop.search.lengths, loop.search.valid

    return ll.compile(run, mode="search")


def test_atomic_ops_equal_choice():
    """expand + prune with the score kept in ``loop.state.score`` give the n-best of ``choice`` (and of the
    plain beam search), for small and exhaustive beams."""
    dec = Decoder(3, 8, eos_bias=-1.0)
    x = initial_states(4, 8)
    for beam in (2, 4, n_outcomes(3, 4)):
        a = run_nbest(atomic_program(dec, beam=beam, max_len=4), x)
        c = run_nbest(search_program(dec, beam=beam, max_len=4), x)
        assert_same_nbest(a, c)
        assert_same_nbest(a, [py_beam_search(dec.torch_step, x[b], 3, beam, 4) for b in range(4)])


# ---------------------------------------------------------------------------------------------------------
# filtering with any op, and "cheating"

def step_counter(loop):
    """The step number, counted in a state of the user's (what loop.index should give)."""
    t = loop.state.t
    loop.state.t = t + 1
    return t


@pytest.mark.parametrize("how", [
    "loop.index", "counter state"])
def test_forced_prefix(how):
    """Label scores other than prefix[t] set to -inf at the steps t < len(prefix) (t: ``loop.index``, or a
    step counter kept in a state): with an exhaustive beam the valid n-best is exactly brute force over the
    sequences with that prefix (the other beam slots invalid); with a small beam every hypothesis has the
    prefix, and it is the plain beam search with the same filter."""
    n_vocab, max_len, prefix = 4, 4, (2, 1)
    dec = Decoder(n_vocab, 12, eos_bias=-1.0)
    x = initial_states(2, 12)

    def force(loop, lp):
        labels = ll.range_over_dim(dec.V)
        t = loop.index if how == "loop.index" else step_counter(loop)
        ok = t >= len(prefix)
        for i, p in enumerate(prefix):
            ok = ok | ((t == i) & (labels == p))
        return ll.where(ok, lp, NEG_INF)

    def allowed(q, v):
        return len(q) >= len(prefix) or v == prefix[len(q)]

    want = [brute_force_nbest(enumerate_outcomes(dec.torch_step, x[b], n_vocab, max_len, allowed=allowed))
            for b in range(2)]
    assert len(want[0]) == n_outcomes(n_vocab, max_len - 2)
    got = run_nbest(atomic_program(dec, beam=n_outcomes(n_vocab, max_len), max_len=max_len, filter_fn=force), x)
    assert_same_nbest(got, want)
    small = run_nbest(atomic_program(dec, beam=3, max_len=max_len, filter_fn=force), x)
    for entry in small:
        assert len(entry) == 3 and all(q[:2] == prefix for q, _ in entry)
    assert_same_nbest(small, [py_beam_search(dec.torch_step, x[b], n_vocab, 3, max_len, allowed=allowed)
                              for b in range(2)])


def test_bigram_lexicon():
    """A lexicon as allowed (previous label, label) pairs (an input, gathered by the fed-back label; BOS is
    label 0): every hypothesis is in the lexicon, and with an exhaustive beam the n-best is brute force over
    the lexicon's sequences."""
    n_vocab, max_len = 4, 4
    dec = Decoder(n_vocab, 13, eos_bias=-1.0)
    x = initial_states(2, 13)
    prev_dim = ll.Dim("prev", n_vocab)
    allowed_pairs = torch.tensor([[0, 1, 1, 0],    # after BOS: 1 or 2
                                  [1, 0, 1, 1],    # after 1: EOS, 2 or 3
                                  [0, 1, 0, 1],    # after 2: 1 or 3
                                  [1, 0, 1, 0]], dtype=torch.bool)   # after 3: EOS or 2

    def lexicon(loop, lp, mask):
        ok = ll.gather(mask, index=loop.state.label, axis=prev_dim)
        return ll.where(ok, lp, NEG_INF)

    def allowed(q, v):
        return bool(allowed_pairs[q[-1] if q else 0, v])

    mask = ll.Named(allowed_pairs, (prev_dim, dec.V))
    want = [brute_force_nbest(enumerate_outcomes(dec.torch_step, x[b], n_vocab, max_len, allowed=allowed))
            for b in range(2)]
    prog = atomic_program(dec, beam=n_outcomes(n_vocab, max_len), max_len=max_len, filter_fn=lexicon)
    got = nbest(*prog(ll.Named(x, (B, H)), mask))
    assert_same_nbest(got, want)
    prog = atomic_program(dec, beam=2, max_len=max_len, filter_fn=lexicon)
    small = nbest(*prog(ll.Named(x, (B, H)), mask))
    for entry in small:
        assert len(entry) == 2
        for q, _ in entry:
            assert all(allowed_pairs[a, b] for a, b in zip((0,) + q, q)), q
    assert_same_nbest(small, [py_beam_search(dec.torch_step, x[b], n_vocab, 2, max_len, allowed=allowed)
                              for b in range(2)])


def cheating_program(dec: Decoder, beam: int, max_len: int, ref_dim: ll.Dim):
    """Cheating: the hypothesis that follows the reference labels so far gets its reference label pruned on
    a key boosted by +1e6, so it always stays in the beam; the scores kept are the real ones
    (``pruned.take(candidates)``). ``loop.state.on_ref`` marks it."""
    V = dec.V

    def run(x, ref):
        loop = ll.Loop(max_seq_len=max_len)
        loop.state.label = ll.full(0, sparse_dim=V)
        loop.state.h = x
        loop.state.score = ll.zeros([])
        loop.state.on_ref = ll.full(True)
        loop.state.t = ll.full(0)
        with loop:
            h, lp = dec.step(loop.state.label, loop.state.h)
            loop.state.h = h
            cand = ll.search.expand(loop.state.score, lp, axis=V)
            ref_label = ll.gather(ref, index=step_counter(loop), axis=ref_dim)
            follows = loop.state.on_ref & (ll.range_over_dim(V) == ref_label) & (cand > NEG_INF)
            pruned = ll.search.prune(cand + ll.where(follows, 1e6, 0.0), beam_size=beam, axis=V)
            loop.state.score = pruned.take(cand)
            loop.state.on_ref = pruned.take(follows)
            loop.state.label = pruned.labels
            loop.end(pruned.labels == 0, include_eos=True)
            ys = loop.stack(pruned.labels)
        return ys, loop.state.score, loop.search.lengths, loop.search.valid

    return ll.compile(run, mode="search")


def test_cheating_keeps_the_reference_in_the_beam():
    """The reference is a bad sequence (of the brute-force outcomes, the worst one ending at EOS at the last
    step) that a beam of 2 loses without cheating; with cheating it is in the n-best with its true score,
    and every other hypothesis has its true (brute-force) score too."""
    n_vocab, max_len, beam = 3, 4, 2
    dec = Decoder(n_vocab, 14)
    x = initial_states(2, 14)
    ref_dim = ll.Dim("ref_time", max_len)
    refs, scores_of = [], []
    for b in range(2):
        outcomes = enumerate_outcomes(dec.torch_step, x[b], n_vocab, max_len)
        scores_of.append({q: s for q, _, s in outcomes})
        refs.append(min((s, q) for q, ended, s in outcomes if ended and len(q) == max_len)[1])
    plain = run_nbest(search_program(dec, beam=beam, max_len=max_len), x)
    assert all(ref not in [q for q, _ in entry] for ref, entry in zip(refs, plain))
    prog = cheating_program(dec, beam, max_len, ref_dim)
    got = nbest(*prog(ll.Named(x, (B, H)), ll.Named(torch.tensor(refs), (B, ref_dim), sparse_dim=dec.V)))
    for b, entry in enumerate(got):
        assert len(entry) == beam
        assert refs[b] in [q for q, _ in entry]
        for q, s in entry:
            assert abs(s - scores_of[b][q]) <= TOL, (q, s, scores_of[b][q])


# ---------------------------------------------------------------------------------------------------------
# threshold

def test_threshold_pruning():
    """threshold=t: after each step only hypotheses within t of the step's best stay valid. With t = 0.7
    fewer than the beam size are valid for some entry, every final valid score is within t of the best,
    and the n-best is the plain beam search with the same threshold; with t = 1e9 it is plain top-k."""
    n_vocab, max_len, beam = 4, 4, 6
    dec = Decoder(n_vocab, 17, eos_bias=-0.5)
    x = initial_states(3, 17)
    got = run_nbest(atomic_program(dec, beam=beam, max_len=max_len, threshold=0.7), x)
    assert any(len(entry) < beam for entry in got)
    for entry in got:
        best = max(s for _, s in entry)
        assert all(s >= best - 0.7 - TOL for _, s in entry)
    assert_same_nbest(got, [py_beam_search(dec.torch_step, x[b], n_vocab, beam, max_len, threshold=0.7)
                            for b in range(3)])
    huge = run_nbest(atomic_program(dec, beam=beam, max_len=max_len, threshold=1e9), x)
    assert_same_nbest(huge, [py_beam_search(dec.torch_step, x[b], n_vocab, beam, max_len) for b in range(3)])
    assert all(len(entry) == beam for entry in huge)


def threshold_case(seed: int, n_vocab: int, beam: int, max_len: int, threshold: float, n_batch: int = 3):
    """The atomic search with a threshold, optimized and by the reference interpreter, and the plain beam
    search with its per-step widths per entry."""
    dec = Decoder(n_vocab, seed, eos_bias=-0.5)
    x = initial_states(n_batch, seed)
    prog = atomic_program(dec, beam=beam, max_len=max_len, threshold=threshold, widths=True)
    runs = [prog(ll.Named(x, (B, H))), prog.reference(ll.Named(x, (B, H)))]
    per_entry = []
    want = []
    for b in range(n_batch):
        w: list[int] = []
        want.append(py_beam_search(dec.torch_step, x[b], n_vocab, beam, max_len, threshold=threshold, widths=w))
        per_entry.append(w)
    return runs, want, per_entry


def check_threshold_widths(runs, want, per_entry, beam: int):
    """Each run's n-best is the plain beam search's; the pruned beam of step t has as many slots as the
    most hypotheses any entry keeps at step t (an entry that ended keeps its last ones), never the beam
    size unless needed; the results' beam is that of the last step."""
    n_steps = max(len(w) for w in per_entry)
    expected = [max(w[min(t, len(w) - 1)] for w in per_entry) for t in range(n_steps)]
    for out in runs:
        ys, scores, lengths, valid, width = out
        assert_same_nbest(nbest(ys, scores, lengths, valid), want)
        (T,) = [d for d in width.dims]
        got = [int(v) for v in width.tensor]
        assert got == expected, (got, expected)
        (beam_dim,) = [d for d in valid.dims if d is not B]
        assert valid.tensor.shape[valid.dims.index(beam_dim)] == expected[-1]
        assert all(w <= beam for w in got)


def test_threshold_changes_the_beam_size():
    """prune(threshold=0.7), beam 6: the beam dim is as wide as the hypotheses kept, step by step
    (1 at the first step, fewer than 6 at some step), the n-best is the plain beam search with the same
    threshold, and the reference interpreter computes the same."""
    runs, want, per_entry = threshold_case(17, 4, 6, 4, 0.7)
    check_threshold_widths(runs, want, per_entry, 6)
    widths = [int(v) for v in runs[0][-1].tensor]
    assert widths[0] == 1 and any(w < 6 for w in widths[1:]) and len(set(widths)) > 1


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n_vocab=st.integers(2, 5), beam=st.integers(1, 8),
       max_len=st.integers(1, 5), threshold=st.sampled_from((0.0, 0.3, 1.0, 2.5, 1e9)))
def test_threshold_beam_property(seed, n_vocab, beam, max_len, threshold):
    """Over random models, beam sizes, lengths and thresholds: the same as the plain beam search, per-step
    widths included, optimized and by the reference interpreter."""
    runs, want, per_entry = threshold_case(seed, n_vocab, beam, max_len, threshold)
    check_threshold_widths(runs, want, per_entry, beam)


def test_threshold_with_attention_batch_entries_are_independent():
    """choice(threshold=...) in the attention decoder over encoder inputs of lengths 4, 1, 3 (garbage in the
    padding): each entry's n-best is the same in the batch as alone (where its beam has its own widths),
    and the plain beam search's."""
    together = check_entries_independent(5, threshold=1.0)
    assert any(len(entry) < 5 for entry in together)

def test_threshold_with_masked_computation():
    """A search whose state `slow` advances only where the previous label is not 1 (a MaskedComputation)
    with choice(threshold=...): the n-best is the plain beam search of the same step (the slow state kept
    by hand in Python), optimized and by the reference interpreter; with length normalization the two
    runs agree too."""
    n_vocab, beam, max_len = 4, 6, 5
    dec = Decoder(n_vocab, 5, eos_bias=-1.0)
    x = initial_states(3, 5)
    V = dec.V

    def program(threshold, alpha):
        def run(x):
            loop = ll.Loop(max_seq_len=max_len)
            loop.state.label = ll.full(0, sparse_dim=V)
            loop.state.h = x
            loop.state.slow = x
            with loop:
                with ll.MaskedComputation(mask=loop.state.label != 1):
                    slow = ll.tanh(loop.state.slow * 0.5 + dec.emb(loop.state.label))
                    loop.state.slow = slow
                h, lp = dec.step(loop.state.label, loop.state.h + slow)
                loop.state.h = h
                label = ll.choice(lp, beam_size=beam, axis=V, threshold=threshold, length_normalization=alpha)
                loop.state.label = label
                loop.end(label == 0, include_eos=True)
                ys = loop.stack(label)
            return ys, loop.search.scores, loop.search.lengths, loop.search.valid
        return ll.compile(run, mode="search")

    def step(prev, state):
        h, slow = state
        with torch.no_grad():
            if prev != 1:
                slow = torch.tanh(0.5 * slow + dec.emb.weight[prev])
        h, lp = dec.torch_step(prev, h + slow)
        return (h, slow), lp

    for threshold in (0.5, 1.5):
        prog = program(threshold, False)
        want = [py_beam_search(step, (x[b], x[b]), n_vocab, beam, max_len, threshold=threshold) for b in range(3)]
        assert any(len(entry) < beam for entry in want)
        for reference in (False, True):
            assert_same_nbest(run_nbest(prog, x, reference=reference), want)
        normalized = program(threshold, True)
        assert_same_nbest(run_nbest(normalized, x), run_nbest(normalized, x, reference=True))


# ---------------------------------------------------------------------------------------------------------
# sampling

def test_sampling_with_beam_1():
    """prune(sample=True), beam 1, on a batch of N copies of one entry: each sample is an outcome (ends at
    its first EOS or is cut at max_seq_len) with its brute-force score; the same torch seed gives the same
    samples; the outcomes' frequencies are their probabilities exp(score) (to 0.02, N = 20000:
    each standard error is <= 0.0036)."""
    n_vocab, max_len, n = 3, 3, 20000
    dec = Decoder(n_vocab, 18, scale=0.7)
    x0 = initial_states(1, 18)
    x = x0.expand(n, -1).contiguous()
    outcomes = enumerate_outcomes(dec.torch_step, x0[0], n_vocab, max_len)
    outcome_scores = {q: s for q, _, s in outcomes}
    assert abs(sum(math.exp(s) for s in outcome_scores.values()) - 1) < 1e-9
    prog = atomic_program(dec, beam=1, max_len=max_len, sample=True)
    torch.manual_seed(0)
    first = run_nbest(prog, x)
    torch.manual_seed(0)
    again = run_nbest(prog, x)
    assert first == again
    counts = dict.fromkeys(outcome_scores, 0)
    for entry in first:
        ((q, s),) = entry
        assert q in outcome_scores, q
        assert abs(s - outcome_scores[q]) <= TOL
        counts[q] += 1
    for q, c in counts.items():
        assert abs(c / n - math.exp(outcome_scores[q])) < 0.02, (q, c / n, math.exp(outcome_scores[q]))
    torch.manual_seed(1)
    assert run_nbest(prog, x) != first


def test_sampling_with_a_beam_keeps_labels_and_scores_together():
    """prune(sample=True), beam 3, 8 entries that end at different steps: every sampled hypothesis's score is
    the brute-force score of its labels (in a batch of 1 it is; in a batch, entries ending before the
    last step get labels of other hypotheses)."""
    n_vocab, max_len = 3, 5
    dec = Decoder(n_vocab, 18, scale=1.0)
    x = initial_states(8, 18)
    prog = atomic_program(dec, beam=3, max_len=max_len, sample=True)
    torch.manual_seed(3)
    got = run_nbest(prog, x)
    assert len({max(len(q) for q, _ in entry) for entry in got}) > 1   # (entries end at different steps)
    for b, entry in enumerate(got):
        assert len(entry) == 3
        for q, s in entry:
            assert abs(s - score_of(dec.torch_step, x[b], q)) <= TOL, (b, q, s, score_of(dec.torch_step, x[b], q))



def test_a_sampling_search_draws_as_the_reference_interpreter():
    """A search that draws random numbers runs its first step on every slot (on one it would draw fewer):
    with the same seed, the optimized run samples the reference interpreter's hypotheses."""
    dec = Decoder(4, 18, scale=1.0)
    x = initial_states(4, 18)
    prog = atomic_program(dec, beam=3, max_len=5, sample=True)
    torch.manual_seed(5)
    got = run_nbest(prog, x)
    torch.manual_seed(5)
    assert_same_nbest(got, run_nbest(prog, x, reference=True))


# ---------------------------------------------------------------------------------------------------------
# recombination

class BigramLM(ll.Module):
    """log p(label | previous label) from a table (a label-only model: recombining on the last label is
    then exact). Same interface as Decoder (its state h is carried along unchanged)."""

    def __init__(self, vocab: ll.Dim, seed: int, scale: float = 1.5):
        super().__init__()
        self.V = vocab
        self.prev = ll.Dim("prev_label", vocab.size)
        g = torch.Generator().manual_seed(seed)
        self.table = ll.Parameter((self.prev, vocab), init=lambda t: t.copy_(torch.randn(t.shape, generator=g) * scale))
        self.double()

    def step(self, label, h):
        return h, ll.log_softmax(ll.gather(self.table, index=label, axis=self.prev), axis=self.V)

    def torch_step(self, label: int, h):
        with torch.no_grad():
            return h, torch.log_softmax(self.table[label], -1)


def py_recombination(step, h0, n_vocab: int, beam: int, max_len: int, mode: str, threshold=None):
    """The plain beam search plus, after each prune, recombination of the kept hypotheses with the same last
    label (an ended hypothesis's last label is its EOS, 0) and the same ended status before the step (one that
    had ended never merges with one that had not: those ending at this step merge with the ended ones at the
    next): the group's best (its labels and state) stays, with the group's max or logsumexp score; the others
    are dropped. For an exhaustive beam (nothing is pruned by the beam size, asserted); with a threshold,
    those more than it below the best are dropped before the merge. Returns [(labels, score)]."""
    hyps = [(0.0, (), False, h0, 0, False)]
    for _ in range(max_len):
        if all(e for _, _, e, _, _, _ in hyps):
            break
        cands = []   # (score, labels, ended after the step, state, last label, ended before it)
        for s, q, ended, h, prev, _ in hyps:
            if ended:
                cands.append((s, q, True, h, prev, True))
                continue
            h2, lp = step(prev, h)
            cands += [(s + float(lp[v]), q + (v,), v == 0, h2, v, False) for v in range(n_vocab)]
        assert len(cands) <= beam
        cands.sort(key=lambda c: -c[0])
        if threshold is not None:
            cands = [c for c in cands if c[0] >= cands[0][0] - threshold]
        groups: dict[tuple, list] = {}
        for c in cands:
            groups.setdefault((c[4], c[5]), []).append(c)
        hyps = []
        for members in groups.values():
            best = members[0]
            scores = torch.tensor([m[0] for m in members], dtype=DT)
            merged = float(scores.max() if mode == "max" else torch.logsumexp(scores, 0))
            hyps.append((merged,) + best[1:])
    return [(q, s) for s, q, _, _, _, _ in hyps]


def recombination_group(labels: tuple, max_len: int):
    """The group of recombination (keyed on the last label) an outcome ends in: its last label, where an
    outcome that ended before the last step is in the group "ended" (an ended hypothesis merges only with
    those ended before the step: one that ends at the last step has no step left to join them)."""
    return "ended" if labels[-1] == 0 and len(labels) < max_len else labels[-1]


def recombination_groups(outcomes, max_len: int):
    """The brute-force outcomes by their recombination group."""
    groups: dict = {}
    for q, _, s in outcomes:
        groups.setdefault(recombination_group(q, max_len), []).append((s, q))
    return groups


def lse(values) -> float:
    return float(torch.logsumexp(torch.tensor(values, dtype=DT), 0))


def bigram_recombination(mode: str):
    n_vocab, max_len = 3, 4
    lm = BigramLM(ll.Dim("vocab", n_vocab), 19)
    x = initial_states(2, 19)
    got = run_nbest(atomic_program(lm, beam=n_vocab * n_vocab, max_len=max_len, recombine=mode), x)
    return got, recombination_groups(enumerate_outcomes(lm.torch_step, None, n_vocab, max_len), max_len)


@pytest.mark.parametrize("mode", ["max", "logsumexp"])
def test_recombination_of_a_label_only_model_is_exact(mode):
    """recombine(keys=last label) on a bigram model with a beam >= V * V (nothing pruned): the final
    hypotheses are one per recombination group -- one for all that ended before the last step, one for
    those ending at it (0), v for those cut at max_seq_len ending in v. With "max" each score is the max over
    the brute-force outcomes of its group (Viterbi) and its labels are that best outcome; with "logsumexp"
    the score of a group is the logsumexp over its outcomes (the forward algorithm) and its labels one of
    them."""
    got, groups = bigram_recombination(mode)
    max_len = 4
    for entry in got:   # (the same for both entries: the model ignores x)
        assert sorted(map(str, (recombination_group(q, max_len) for q, _ in entry))) == sorted(map(str, groups))
        for q, s in entry:
            members = groups[recombination_group(q, max_len)]
            if mode == "max":
                want_s, want_q = max(members)
                assert q == want_q
            else:
                want_s = lse([m[0] for m in members])
                assert q in [m[1] for m in members]
            assert abs(s - want_s) <= TOL, (q, s, want_s)


def test_logsumexp_recombination_keeps_the_mass_of_ended_hypotheses():
    """With "logsumexp" the ended hypotheses' scores together are the log-probability of ending within
    max_seq_len (all ended outcomes), so the final hypotheses' probabilities sum to 1."""
    got, groups = bigram_recombination("logsumexp")
    ended = [m[0] for key in ("ended", 0) for m in groups[key]]
    for entry in got:
        s0 = lse([s for q, s in entry if q[-1] == 0])
        assert abs(s0 - lse(ended)) <= TOL, (s0, lse(ended))
        assert abs(sum(math.exp(s) for _, s in entry) - 1) < 1e-9


@pytest.mark.parametrize("mode", ["max", "logsumexp"])
def test_recombination_of_a_decoder_equals_the_step_by_step_merge(mode):
    """The RNN decoder (the state depends on the whole history): recombine keeps the group's best
    hypothesis (labels and state) with the merged score -- checked against the same merge done step by
    step in plain Python (py_recombination), beam >= V * V so nothing is pruned."""
    n_vocab, max_len = 4, 4
    dec = Decoder(n_vocab, 21, eos_bias=-1.0)
    x = initial_states(2, 21)
    got = run_nbest(atomic_program(dec, beam=n_vocab * n_vocab, max_len=max_len, recombine=mode), x)
    want = [py_recombination(dec.torch_step, x[b], n_vocab, n_vocab * n_vocab, max_len, mode) for b in range(2)]
    for entry in got:   # one per group: per last label, the ended ones as ended before the last step or at it
        groups = [recombination_group(q, max_len) for q, _ in entry]
        assert len(set(groups)) == len(entry) and set(groups) - {"ended"} == set(range(n_vocab)), groups
    assert_same_nbest(got, want, ordered=False)


@pytest.mark.parametrize("mode", ["max", "logsumexp"])
def test_recombination_with_a_threshold(mode):
    """prune(threshold=1.5) then recombine: the beam shrinks to the hypotheses within the threshold, and the
    merge runs over them (its comparison dim sized like the pruned beam, step by step) -- the same as the
    step-by-step merge in plain Python with the same threshold, optimized and by the reference interpreter."""
    n_vocab, max_len = 4, 4
    dec = Decoder(n_vocab, 21, eos_bias=-1.0)
    x = initial_states(2, 21)
    prog = atomic_program(dec, beam=n_vocab * n_vocab, max_len=max_len, recombine=mode, threshold=1.5)
    want = [py_recombination(dec.torch_step, x[b], n_vocab, n_vocab * n_vocab, max_len, mode, threshold=1.5)
            for b in range(2)]
    assert any(len(entry) < n_vocab for entry in want)
    for reference in (False, True):
        got = run_nbest(prog, x, reference=reference)
        assert_same_nbest(got, want, ordered=False)


# ---------------------------------------------------------------------------------------------------------
# several score components (AM + LM fusion)

def test_lm_fusion_with_score_components():
    """Prune on am + w * lm, the components expanded separately and kept with ``pruned.take``: the kept
    components are each hypothesis's brute-force AM and LM scores, they sum back to the total
    (``pruned.scores``), and with an exhaustive beam the n-best is brute force by the combined score."""
    n_vocab, max_len, w = 3, 4, 0.6
    am = Decoder(n_vocab, 22, eos_bias=-0.5)
    lm = BigramLM(am.V, 23)
    x = initial_states(2, 22)
    V = am.V

    def run(x, beam):
        loop = ll.Loop(max_seq_len=max_len)
        loop.state.label = ll.full(0, sparse_dim=V)
        loop.state.h = x
        loop.state.am = ll.zeros([])
        loop.state.lm = ll.zeros([])
        loop.state.total = ll.zeros([])
        with loop:
            h, am_lp = am.step(loop.state.label, loop.state.h)
            _, lm_lp = lm.step(loop.state.label, None)
            loop.state.h = h
            cand_am = ll.search.expand(loop.state.am, am_lp, axis=V)
            cand_lm = ll.search.expand(loop.state.lm, lm_lp, axis=V)
            pruned = ll.search.prune(cand_am + w * cand_lm, beam_size=beam, axis=V)
            loop.state.am = pruned.take(cand_am)
            loop.state.lm = pruned.take(cand_lm)
            loop.state.total = pruned.scores
            loop.state.label = pruned.labels
            loop.end(pruned.labels == 0, include_eos=True)
            ys = loop.stack(pruned.labels)
        return ys, loop.state.total, loop.search.lengths, loop.search.valid, loop.state.am, loop.state.lm

    def fused_step(prev, h):
        h, am_lp = am.torch_step(prev, h)
        return h, am_lp + w * lm.torch_step(prev, None)[1]

    prog = ll.compile(run, mode="search")
    for beam in (n_outcomes(n_vocab, max_len), 3):
        ys, total, lengths, valid, am_s, lm_s = prog(ll.Named(x, (B, H)), beam)
        got = nbest(ys, total, lengths, valid)
        got_am = nbest(ys, am_s, lengths, valid)
        got_lm = nbest(ys, lm_s, lengths, valid)
        for b in range(2):
            for (q, s), (_, sa), (_, sl) in zip(got[b], got_am[b], got_lm[b]):
                assert abs(sa - score_of(am.torch_step, x[b], q)) <= TOL
                assert abs(sl - score_of(lm.torch_step, None, q)) <= TOL
                assert abs(s - (sa + w * sl)) <= TOL
        if beam == 3:
            want = [py_beam_search(fused_step, x[b], n_vocab, beam, max_len) for b in range(2)]
        else:
            want = [brute_force_nbest(enumerate_outcomes(fused_step, x[b], n_vocab, max_len)) for b in range(2)]
        assert_same_nbest(got, want)


# ---------------------------------------------------------------------------------------------------------
# length normalization

@pytest.mark.parametrize("alpha", [True, 0.7])
def test_length_normalization(alpha):
    """choice(length_normalization=True or alpha): loop.search.scores is each hypothesis's brute-force
    score / length ** alpha (length with the EOS), and with an exhaustive beam the best by it is the
    brute-force best by the normalized score (which here differs from the best by the raw score)."""
    n_vocab, max_len = 3, 4
    dec = Decoder(n_vocab, 30)
    x = initial_states(2, 30)
    a = 1.0 if alpha is True else alpha
    prog = search_program(dec, beam=n_outcomes(n_vocab, max_len), max_len=max_len, length_normalization=alpha)
    got = run_nbest(prog, x)
    differs = False
    for b in range(2):
        outcomes = enumerate_outcomes(dec.torch_step, x[b], n_vocab, max_len)
        raw = {q: s for q, _, s in outcomes}
        assert sorted(q for q, _ in got[b]) == sorted(raw)
        for q, s in got[b]:
            assert abs(s - raw[q] / len(q) ** a) <= TOL, (q, s, raw[q] / len(q) ** a)
        best = max(got[b], key=lambda t: t[1])[0]
        assert best == max(raw, key=lambda q: raw[q] / len(q) ** a)
        differs |= best != max(raw, key=raw.get)
        # the n-best list is in the order of the normalized score
        assert [s for _, s in got[b]] == sorted((s for _, s in got[b]), reverse=True)
        assert got[b][0][0] == best
    assert differs


@pytest.mark.parametrize("alpha", [False, True])
def test_final_states_and_best_follow_the_nbest_order(alpha):
    """After the loop, the states are in the n-best list's order (under length normalization too): the
    final ``label`` state is each hypothesis's last label and the final ``h`` its decoder state, as the
    plain-PyTorch step computes it for the backtracked labels; ``looplift.search.best`` gives the first
    hypothesis's labels and state."""
    n_vocab, max_len = 3, 4
    dec = Decoder(n_vocab, 30)
    x = initial_states(2, 30)
    V = dec.V

    def run(x):
        loop = ll.Loop(max_seq_len=max_len)
        loop.state.label = ll.full(0, sparse_dim=V)
        loop.state.h = x
        with loop:
            h, lp = dec.step(loop.state.label, loop.state.h)
            loop.state.h = h
            label = ll.choice(lp, beam_size=n_outcomes(n_vocab, max_len), axis=V, length_normalization=alpha)
            loop.state.label = label
            loop.end(label == 0, include_eos=True)
            ys = loop.stack(label)
        res = loop.search
        return (ys, res.scores, res.lengths, res.valid, loop.state.label, loop.state.h,
                ll.search.best(loop.state.h, res.scores, beam=res.beam),
                ll.search.best(res.lengths, res.scores, beam=res.beam))

    ys, scores, lengths, valid, last, h, best_h, best_len = ll.compile(run, mode="search")(ll.Named(x, (B, H)))
    got = nbest(ys, scores, lengths, valid)
    (beam,) = [d for d in valid.dims if d is not B]
    sizes = {B: 2, beam: beam.size}
    last_t = align_to(last, B, beam, sizes=sizes)
    h_t = align_to(h, B, beam, H, sizes=sizes)
    for b in range(2):
        for k, (q, _) in enumerate(got[b]):
            assert int(last_t[b, k]) == q[-1]
            want, label = x[b], 0
            for y in q:
                want, _ = dec.torch_step(label, want)
                label = y
            torch.testing.assert_close(h_t[b, k], want, rtol=0, atol=1e-12)
        assert torch.equal(align_to(best_h, B, H, sizes={B: 2}).detach()[b], h_t[b, 0].detach())
        assert int(align_to(best_len, B, sizes={B: 2})[b]) == len(got[b][0][0])


# ---------------------------------------------------------------------------------------------------------
# frame-synchronous search over an input axis, no label feedback

@pytest.mark.parametrize("lengths", [[4, 4, 4], [4, 2, 1]])
def test_frame_synchronous_search_over_an_input_axis(lengths):
    """A loop over the input's time axis (lengths the same, or 4, 2, 1), ``choice`` on each frame's
    log-probs, no loop.end: the n-best per entry is the top k of all V ** length label sequences (exact here: the frames
    are independent) with the sums of the frame log-probs as scores; an entry with fewer sequences than the
    beam has the rest invalid."""
    n_vocab, beam = 3, 5
    V, T = ll.Dim("vocab", n_vocab), ll.Dim("time")
    lengths = torch.tensor(lengths)
    g = torch.Generator().manual_seed(25)
    lp = torch.log_softmax(2 * torch.randn(3, 4, n_vocab, generator=g, dtype=DT), -1)

    def run(frames):
        loop = ll.Loop(axis=T)
        with loop:
            label = ll.choice(loop.unstack(frames), beam_size=beam, axis=V)
            ys = loop.stack(label)
        return ys, loop.search.scores, loop.search.lengths, loop.search.valid

    got = nbest(*ll.compile(run, mode="search")(ll.Named(lp, (B, T, V), {T: lengths})))
    want = []
    for b in range(3):
        n = int(lengths[b])
        seqs = [(q, sum(float(lp[b, t, v]) for t, v in enumerate(q)))
                for q in itertools.product(range(n_vocab), repeat=n)]
        want.append(sorted(seqs, key=lambda t: -t[1])[:beam])
    assert [len(e) for e in got] == [min(beam, n_vocab ** int(n)) for n in lengths]
    assert_same_nbest(got, want)


# ---------------------------------------------------------------------------------------------------------
# max_seq_len

def test_hypotheses_without_eos_are_cut_at_max_seq_len():
    """EOS filtered out (-inf): no hypothesis ever ends; the loop stops after max_seq_len steps without an
    error, every hypothesis has length max_seq_len and no EOS; with an exhaustive beam the n-best is all
    (V-1) ** max_seq_len sequences by brute force, with a small one the plain beam search."""
    n_vocab, max_len = 3, 3
    dec = Decoder(n_vocab, 26)
    x = initial_states(2, 26)

    def no_eos(loop, lp):
        return ll.where(ll.range_over_dim(dec.V) == 0, NEG_INF, lp)

    def allowed(q, v):
        return v != 0

    for beam in ((n_vocab - 1) ** max_len, 3):
        got = run_nbest(atomic_program(dec, beam=beam, max_len=max_len, filter_fn=no_eos), x)
        for entry in got:
            assert len(entry) == beam
            assert all(len(q) == max_len and 0 not in q for q, _ in entry)
        if beam == 3:
            want = [py_beam_search(dec.torch_step, x[b], n_vocab, beam, max_len, allowed=allowed) for b in range(2)]
        else:
            want = [brute_force_nbest(enumerate_outcomes(dec.torch_step, x[b], n_vocab, max_len, allowed=allowed))
                    for b in range(2)]
        assert_same_nbest(got, want)


def test_max_seq_len_per_entry():
    """max_seq_len as a tensor over the batch (2 and 4): each entry's hypotheses are cut at its own max;
    with an exhaustive beam each entry's n-best is its brute force."""
    n_vocab = 3
    dec = Decoder(n_vocab, 27)
    x = initial_states(2, 27)
    V = dec.V

    def run(x, max_len):
        loop = ll.Loop(max_seq_len=max_len)
        loop.state.label = ll.full(0, sparse_dim=V)
        loop.state.h = x
        with loop:
            h, lp = dec.step(loop.state.label, loop.state.h)
            loop.state.h = h
            label = ll.choice(lp, beam_size=n_outcomes(n_vocab, 4), axis=V)
            loop.state.label = label
            loop.end(label == 0, include_eos=True)
            ys = loop.stack(label)
        return ys, loop.search.scores, loop.search.lengths, loop.search.valid

    max_lens = torch.tensor([2, 4])
    got = nbest(*ll.compile(run, mode="search")(ll.Named(x, (B, H)), ll.Named(max_lens, (B,))))
    want = [brute_force_nbest(enumerate_outcomes(dec.torch_step, x[b], n_vocab, int(max_lens[b])))
            for b in range(2)]
    assert_same_nbest(got, want)


# ---------------------------------------------------------------------------------------------------------
# self-attention over the history (cum_concat) in a search

class HistoryDecoder(Decoder):
    """The RNN decoder plus self-attention over its own past states (``cum_concat`` of h, before the prune)
    and, fed back, the mean embedding of the labels chosen so far (``cum_concat`` over the pruned beam, after
    the prune): both histories must follow the hypotheses."""

    def step_with_history(self, loop):
        h = ll.tanh(self.emb(loop.state.label) + self.rec(loop.state.h) + loop.state.summary)
        keys = ll.cum_concat(h)
        (past,) = [d for d in keys.dims if d not in h.dims]
        ctx = ll.dot(ll.softmax(ll.dot(h, keys, reduce=H), axis=past), keys, reduce=past)
        return h, ll.log_softmax(self.out(h + ctx), axis=self.V)

    def summary_after(self, labels):
        chosen = ll.cum_concat(self.emb(labels))
        (past,) = [d for d in chosen.dims if d is not H and d not in labels.dims]
        return ll.mean(chosen, axis=past)

    def torch_step(self, prev: int, state):
        h, states, labels = state
        with torch.no_grad():
            if states:   # (prev is the label chosen at the last step; the first step's is BOS)
                labels = labels + (self.emb.weight[prev],)
            summary = torch.stack(labels).mean(0) if labels else torch.zeros_like(h)
            h = torch.tanh(self.emb.weight[prev] + F.linear(h, self.rec.weight, self.rec.bias) + summary)
            keys = torch.stack(states + (h,))
            ctx = torch.softmax(keys @ h, 0) @ keys
            return (h, states + (h,), labels), torch.log_softmax(F.linear(h + ctx, self.out.weight, self.out.bias), -1)


def history_program(dec: HistoryDecoder, *, beam: int, max_len: int, threshold=None):
    V = dec.V

    def run(x):
        loop = ll.Loop(max_seq_len=max_len)
        loop.state.label = ll.full(0, sparse_dim=V)
        loop.state.h = x
        loop.state.summary = ll.zeros([H], dtype=DT)
        loop.state.score = ll.zeros([])
        with loop:
            h, lp = dec.step_with_history(loop)
            loop.state.h = h
            pruned = ll.search.prune(ll.search.expand(loop.state.score, lp, axis=V), beam_size=beam, axis=V,
                                     threshold=threshold)
            loop.state.score = pruned.scores
            loop.state.label = pruned.labels
            loop.state.summary = dec.summary_after(pruned.labels)
            loop.end(pruned.labels == 0, include_eos=True)
            ys = loop.stack(pruned.labels)
        return ys, loop.state.score, loop.search.lengths, loop.search.valid

    return ll.compile(run, mode="search")


@pytest.mark.parametrize("reference", [False, True], ids=["optimized", "reference"])
def test_histories_follow_the_hypotheses(reference):
    """``cum_concat`` in a search (of a value over the beam before the prune, and of one over the pruned
    beam after it): each hypothesis sees its own past. With a beam >= all outcomes the n-best is brute force
    with per-sequence histories; with beams 2 and 3, and with a threshold that changes the beam size, it is
    the plain beam search of the same step in PyTorch."""
    n_vocab, max_len = 3, 4
    dec = HistoryDecoder(n_vocab, 7, eos_bias=-1.0)
    x = initial_states(2, 7)

    def start(b):
        return x[b], (), ()

    prog = history_program(dec, beam=n_outcomes(n_vocab, max_len), max_len=max_len)
    want = [brute_force_nbest(enumerate_outcomes(dec.torch_step, start(b), n_vocab, max_len)) for b in range(2)]
    assert_same_nbest(run_nbest(prog, x, reference=reference), want)
    for beam, threshold in ((2, None), (3, None), (5, 1.0)):
        prog = history_program(dec, beam=beam, max_len=max_len, threshold=threshold)
        want = [py_beam_search(dec.torch_step, start(b), n_vocab, beam, max_len, threshold=threshold)
                for b in range(2)]
        assert_same_nbest(run_nbest(prog, x, reference=reference), want)


# ---------------------------------------------------------------------------------------------------------
# errors

OTHER = ll.Dim("other", 3)


def bad_prune_axis(loop, lp, V):
    return ll.search.prune(lp, beam_size=2, axis=OTHER).labels  # <prune-axis>


def bad_expand_axis(loop, lp, V):
    return ll.search.prune(ll.search.expand(0.0, lp, axis=OTHER), beam_size=2, axis=V).labels  # <expand-axis>


def bad_beam_size(loop, lp, V):
    return ll.choice(lp, beam_size=0, axis=V)  # <beam-size>


def bad_threshold(loop, lp, V):
    return ll.choice(lp, beam_size=2, axis=V, threshold=-1.0)  # <threshold>


def two_prunes(loop, lp, V):
    ll.search.prune(lp, beam_size=2, axis=V)
    return ll.search.prune(lp, beam_size=2, axis=V).labels  # <two-prunes>


def recombine_first(loop, lp, V):
    scores = ll.search.recombine(lp, keys=ll.range_over_dim(V))  # <recombine-first>
    return ll.choice(scores, beam_size=2, axis=V)


def search_error(body, after=None) -> ll.errors.LoopliftError:
    """The error of tracing a search loop whose label comes from `body(loop, log_probs, V)`; its result is
    the stacked labels, or `after(loop, h)` after the loop."""
    dec = Decoder(3, 30)
    V = dec.V

    def run(x):
        loop = ll.Loop(max_seq_len=3)
        loop.state.label = ll.full(0, sparse_dim=V)
        loop.state.h = x
        with loop:
            h, lp = dec.step(loop.state.label, loop.state.h)
            loop.state.h = h
            label = body(loop, lp, V)
            loop.state.label = label
            loop.end(label == 0, include_eos=True)
            ys = loop.stack(label)
        return ys if after is None else after(loop, h)

    with pytest.raises(ll.errors.LoopliftError) as info:
        ll.compile(run, mode="search")(ll.Named(initial_states(2, 0), (B, H)))
    return info.value


@pytest.mark.parametrize("body,marker,cls,words", [
    (bad_prune_axis, "prune-axis", ll.errors.DimError, ["other", "prune"]),
    (bad_expand_axis, "expand-axis", ll.errors.DimError, ["other", "expand"]),
    (bad_beam_size, "beam-size", ll.errors.DimError, ["beam_size"]),
    (bad_threshold, "threshold", ll.errors.DimError, ["threshold", "-1.0"]),
    (two_prunes, "two-prunes", ll.errors.TraceError, ["prune"]),
    (recombine_first, "recombine-first", ll.errors.TraceError, ["recombine", "prune"]),
])
def test_misuse_raises_a_looplift_error_naming_the_line(body, marker, cls, words):
    """Each misuse raises a LoopliftError (of the expected kind) while tracing, whose message names the
    user's line (this file, the marked line) and what is wrong."""
    error = search_error(body)
    assert isinstance(error, cls), f"{type(error).__name__}: {error}"
    msg = str(error)
    assert marked_line(__file__, marker) in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def test_last_of_a_beam_value_is_an_error_naming_the_line():
    """loop.last of a value over the beam in a search: a TraceError naming the user's line and the fix (a
    loop state)."""
    def choose(loop, lp, V):
        return ll.choice(lp, beam_size=2, axis=V)

    error = search_error(choose, after=lambda loop, h: loop.last(h))  # <last-beam>
    assert isinstance(error, ll.errors.TraceError), f"{type(error).__name__}: {error}"
    msg = str(error)
    assert marked_line(__file__, "last-beam") in msg and "loop.state" in msg and "beam" in msg, msg
