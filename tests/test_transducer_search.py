"""The seeds' transducer searched: alignment-synchronous, hypotheses reaching the same frame with the same
labels merged (``looplift.search.merge`` on ``label_history``), at most `limit` labels per frame.

The same module trains (the loop is gone, as in test_transducer.py) and searches. The search is compared
with exhaustive enumeration of all alignments (a beam that keeps everything: each label sequence's score is
the log-sum-exp, or the max, over its alignments) and with a plain Python alignment-synchronous beam search
with the same merge rule (a narrow beam)."""

import itertools
import math
from dataclasses import dataclass, replace

import pytest
import torch
from torch.testing import assert_close

import looplift as ll
from looplift import Dim
from looplift import batch_dim as B

DTYPE = torch.float64
BLANK = 0
F, V = Dim("feat", 3), Dim("vocab", 3)            # vocab: blank and two labels
EMB, SLOW, JOINT = Dim("emb", 4), Dim("slow", 5), Dim("joint", 6)


class Transducer(ll.Module):
    """The slow label LSTM advances where the previous label is not blank (it starts as blank: the slow
    output is zeros until the first label); the fast network reads the frame at the position `t` and the slow
    output. In search mode: at most `limit` labels per frame, hypotheses merged by (t, label history, labels
    in this frame)."""

    def __init__(self, *, seed: int = 0, beam: int = 4, limit: int = 1, mode: str = "logsumexp"):
        super().__init__()
        torch.manual_seed(seed)
        self.beam, self.limit, self.mode = beam, limit, mode
        self.embed = ll.nn.Embedding(V, EMB)
        self.slow = ll.nn.LSTM(EMB, SLOW)
        self.from_frame = ll.nn.Linear(F, JOINT)
        self.from_slow = ll.nn.Linear(SLOW, JOINT)
        self.readout = ll.nn.Linear(JOINT, V)
        self.to(DTYPE)

    def forward(self, enc, alignment=None, *, enc_time, align):
        loop = ll.Loop(axis=align, max_seq_len=(self.limit + 1) * ll.length(enc_time))
        loop.state.t = ll.zeros([], dtype="int64")
        loop.state.label = ll.full(BLANK, sparse_dim=V)
        loop.state.slow = self.slow.default_initial_state()
        loop.state.emitted = ll.zeros([], dtype="int64")
        loop.state.history = ll.search.label_history_start()
        with loop:
            x_t = ll.gather(enc, index=loop.state.t, axis=enc_time)
            with ll.MaskedComputation(mask=loop.state.label != BLANK):
                slow, loop.state.slow = self.slow(self.embed(loop.state.label), state=loop.state.slow)
            fast = ll.tanh(self.from_frame(x_t) + self.from_slow(slow))
            log_probs = ll.log_softmax(self.readout(fast), axis=V)
            log_probs = ll.search.limit_labels_per_frame(log_probs, loop.state.emitted, limit=self.limit,
                                                         blank=BLANK, axis=V)
            loop.state.label = ll.choice(log_probs, target=alignment, beam_size=self.beam)
            loop.state.t = loop.state.t + ll.cast(loop.state.label == BLANK, "int64")
            loop.state.emitted = ll.search.labels_since_blank(loop.state.emitted, loop.state.label, blank=BLANK)
            loop.state.history = ll.search.label_history(loop.state.history, loop.state.label, ignore=BLANK)
            if self.mode is not None:
                # (hypotheses differing in the labels of this frame so far differ in what the limit allows next)
                ll.search.merge([loop.state.t, loop.state.history, loop.state.emitted], mode=self.mode)
            loop.end(loop.state.t >= ll.length(enc_time), include_eos=True)
            labels = loop.stack(loop.state.label)
            scores = loop.stack(ll.gather(log_probs, index=loop.state.label, axis=V))
        if ll.is_search():
            return labels, loop.search.scores, loop.search.valid, loop.search.lengths
        return -ll.sum(scores, axis=[align, B])


def encoder(frames: list[int], *, seed: int):
    g = torch.Generator().manual_seed(seed)
    enc_time = Dim("enc_time")
    x = torch.randn(len(frames), max(frames) + 1, F.size, generator=g, dtype=DTYPE)
    return ll.Named(x, (B, enc_time, F), {enc_time: torch.tensor(frames)}), enc_time


# -- the model by hand -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hyp:
    """A hypothesis of the plain Python search: its score, position, labels, the slow LSTM's state and
    output, the last label, the labels since the last blank, whether it ended."""

    score: float
    t: int
    labels: tuple
    h: torch.Tensor
    c: torch.Tensor
    slow_out: torch.Tensor
    label: int = BLANK
    emitted: int = 0
    ended: bool = False


class ByHand:
    def __init__(self, model: Transducer, enc: torch.Tensor):
        self.model, self.enc = model, enc
        self.cell = torch.nn.LSTMCell(EMB.size, SLOW.size).to(DTYPE)
        self.cell.load_state_dict({k.replace("_l0", ""): v for k, v in model.slow.state_dict().items()})

    def start(self) -> Hyp:
        zeros = torch.zeros(SLOW.size, dtype=DTYPE)
        return Hyp(0.0, 0, (), zeros, zeros, zeros)

    def log_probs(self, hyp: Hyp) -> tuple[list[float], Hyp]:
        """The step's label log-probs (the limit applied) and the hypothesis with its slow LSTM advanced."""
        m = self.model
        if hyp.label != BLANK:
            h, c = self.cell(m.embed.weight[hyp.label][None], (hyp.h[None], hyp.c[None]))
            hyp = replace(hyp, h=h[0], c=c[0], slow_out=h[0])
        lin = torch.nn.functional.linear
        fast = torch.tanh(lin(self.enc[hyp.t], m.from_frame.weight, m.from_frame.bias)
                          + lin(hyp.slow_out, m.from_slow.weight, m.from_slow.bias))
        lp = torch.log_softmax(lin(fast, m.readout.weight, m.readout.bias), -1).tolist()
        if hyp.emitted >= m.limit:
            lp = [v if k == BLANK else -math.inf for k, v in enumerate(lp)]
        return lp, hyp

    def extend(self, hyp: Hyp, score: float, label: int) -> Hyp:
        t = hyp.t + (label == BLANK)
        return replace(hyp, score=score, t=t, labels=hyp.labels if label == BLANK else hyp.labels + (label,),
                       label=label, emitted=0 if label == BLANK else hyp.emitted + 1, ended=t >= len(self.enc))


def exhaustive(model: Transducer, enc: torch.Tensor) -> dict[tuple, float]:
    """Every label sequence with the log-sum-exp (or max) of its alignments' scores."""
    hand, alignments = ByHand(model, enc), {}

    def walk(hyp: Hyp):
        if hyp.ended:
            alignments.setdefault(hyp.labels, []).append(hyp.score)
            return
        lp, hyp = hand.log_probs(hyp)
        for label, p in enumerate(lp):
            if p > -math.inf:
                walk(hand.extend(hyp, hyp.score + p, label))

    walk(hand.start())
    combine = (lambda s: torch.logsumexp(torch.tensor(s, dtype=DTYPE), 0).item()) if model.mode == "logsumexp" \
        else max
    return {labels: combine(scores) for labels, scores in alignments.items()}


def python_search(model: Transducer, enc: torch.Tensor) -> dict[tuple, float]:
    """The plain alignment-synchronous beam search: expand every hypothesis (an ended one only by label 0 at
    no cost), keep the `beam` best candidates, merge those with the same position, labels and labels in this
    frame (log-sum-exp or max, into the first of them), until every hypothesis ended."""
    hand = ByHand(model, enc)
    hyps = [hand.start()]
    for _ in range((model.limit + 1) * len(enc)):
        if all(h.ended for h in hyps):
            break
        candidates = []
        for h in hyps:
            if h.ended:
                candidates.append((h.score, h, None))
                continue
            lp, stepped = hand.log_probs(h)
            candidates += [(h.score + p, stepped, label) for label, p in enumerate(lp) if p > -math.inf]
        candidates.sort(key=lambda c: -c[0])
        kept = [h if label is None else hand.extend(h, score, label) for score, h, label in candidates[:model.beam]]
        merged: dict[tuple, list[Hyp]] = {}
        for h in kept:
            merged.setdefault((h.t, h.labels, h.emitted), []).append(h)
        combine = (lambda s: torch.logsumexp(torch.tensor(s, dtype=DTYPE), 0).item()) \
            if model.mode == "logsumexp" else max
        hyps = [replace(group[0], score=combine([g.score for g in group])) for group in merged.values()]
    return {h.labels: h.score for h in hyps}


# -- the search ----------------------------------------------------------------------------------------------


def search(model: Transducer, enc: ll.Named, enc_time: Dim) -> list[list[tuple[tuple, float]]]:
    """Per entry: the valid final hypotheses as (labels with blanks removed, score), in the n-best's order."""
    labels, scores, valid, lengths = ll.compile(model, mode="search")(enc, enc_time=enc_time, align=Dim("align"))
    beam = next(d for d in scores.dims if d is not B)
    axis = next(d for d in labels.dims if d not in (B, beam))
    lab, sc = labels.align(B, beam, axis), scores.align(B, beam).detach()
    ok, n = valid.align(B, beam), lengths.align(B, beam)
    return [[(tuple(int(v) for v in lab[b, k, :int(n[b, k])] if v != BLANK), float(sc[b, k]))
             for k in range(sc.shape[1]) if ok[b, k]] for b in range(sc.shape[0])]


def searched(model: Transducer, frames: list[int], *, seed: int):
    """Per entry: each valid final hypothesis's labels -> its score (each sequence once, best first); and the
    encoder input."""
    enc, enc_time = encoder(frames, seed=seed)
    out = []
    for hyps in search(model, enc, enc_time):
        assert len({labels for labels, _ in hyps}) == len(hyps), f"a label sequence twice: {hyps}"
        assert [sc for _, sc in hyps] == sorted((sc for _, sc in hyps), reverse=True), "the n-best is best first"
        out.append(dict(hyps))
    return out, enc


def assert_same_hyps(got: dict, expected: dict):
    assert set(got) == set(expected), (sorted(got), sorted(expected))
    for labels, score in expected.items():
        assert got[labels] == pytest.approx(score, abs=1e-9), labels


@pytest.mark.parametrize("mode", ["logsumexp", "max"])
@pytest.mark.parametrize("limit", [1, 2])
def test_a_beam_that_keeps_everything_equals_exhaustive_enumeration(mode, limit):
    frames = [3, 1, 2] if limit == 1 else [2, 1]
    model = Transducer(seed=1, beam=64, limit=limit, mode=mode)
    got, enc = searched(model, frames, seed=2)
    for b, n in enumerate(frames):
        expected = exhaustive(model, enc.tensor[b, :n])
        assert len(expected) > 1
        assert_same_hyps(got[b], expected)


@pytest.mark.parametrize("mode", ["logsumexp", "max"])
@pytest.mark.parametrize("beam", [2, 3, 5])
def test_a_narrow_beam_equals_the_plain_python_search(mode, beam):
    frames = [4, 2, 3, 1]
    model = Transducer(seed=3, beam=beam, limit=2, mode=mode)
    got, enc = searched(model, frames, seed=4)
    for b, n in enumerate(frames):
        assert_same_hyps(got[b], python_search(model, enc.tensor[b, :n]))


def test_without_merging_alignments_of_one_sequence_take_several_slots():
    """The same beam without merge: a label sequence comes back once per alignment that survived, each scored
    by that alignment alone, below the merged score (the log-sum-exp over them)."""
    enc, enc_time = encoder([3], seed=6)
    merged = dict(search(Transducer(seed=5, beam=64, limit=1), enc, enc_time)[0])
    unmerged = search(Transducer(seed=5, beam=64, limit=1, mode=None), enc, enc_time)[0]
    by_labels: dict[tuple, list[float]] = {}
    for labels, score in unmerged:
        by_labels.setdefault(labels, []).append(score)
    assert set(by_labels) == set(merged)
    assert any(len(v) > 1 for v in by_labels.values())
    for labels, scores in by_labels.items():
        total = torch.logsumexp(torch.tensor(scores, dtype=DTYPE), 0).item()
        assert merged[labels] == pytest.approx(total, abs=1e-9), labels


def test_each_entry_alone_equals_the_batch():
    frames = [4, 2, 3]
    model = Transducer(seed=7, beam=3, limit=2)
    enc, enc_time = encoder(frames, seed=8)
    batch = search(model, enc, enc_time)
    for b, n in enumerate(frames):
        one, one_time = encoder([n], seed=9)
        one.tensor[0, :n] = enc.tensor[b, :n]
        alone = search(model, one, one_time)[0]
        assert [labels for labels, _ in alone] == [labels for labels, _ in batch[b]]
        assert [score for _, score in alone] == pytest.approx([score for _, score in batch[b]], abs=1e-12)


def test_the_limit_and_the_end_at_the_last_frame():
    """Every hypothesis ends at the last frame (as many blanks as frames, the last symbol a blank) and has at
    most `limit` labels between blanks."""
    frames = [3, 2]
    model = Transducer(seed=10, beam=16, limit=2)
    enc, enc_time = encoder(frames, seed=11)
    labels, scores, valid, lengths = ll.compile(model, mode="search")(enc, enc_time=enc_time, align=Dim("align"))
    beam = next(d for d in scores.dims if d is not B)
    axis = next(d for d in labels.dims if d not in (B, beam))
    lab, ok, n = labels.align(B, beam, axis), valid.align(B, beam), lengths.align(B, beam)
    seen = 0
    for b, t in enumerate(frames):
        for k in range(lab.shape[1]):
            if not ok[b, k]:
                continue
            symbols = lab[b, k, :int(n[b, k])].tolist()
            assert symbols.count(BLANK) == t and symbols[-1] == BLANK, symbols
            runs = [len(list(g)) for is_label, g in itertools.groupby(symbols, lambda s: s != BLANK) if is_label]
            assert max(runs, default=0) <= model.limit, symbols
            seen += 1
    assert seen > 4


def test_the_same_module_trains_with_the_loop_gone():
    model = Transducer(seed=12)
    enc, enc_time = encoder([3, 2], seed=13)
    align_dim = Dim("align")
    alignment = ll.Named(torch.tensor([[1, 0, 2, 0, 0], [0, 1, 0, 0, 0]]), (B, align_dim),
                         {align_dim: torch.tensor([5, 3])}, sparse_dim=V)
    prog = ll.compile(model, mode="train")
    loss = prog(enc, alignment, enc_time=enc_time, align=align_dim)
    assert_close(loss.tensor, prog.reference(enc, alignment, enc_time=enc_time, align=align_dim).tensor)
    text = prog.explain()
    assert text.count("nothing left in the loop: it is gone") == 2, text
    hand = [ByHand(model, enc.tensor[b, :n]) for b, n in enumerate([3, 2])]
    expected = 0.0
    for b, align in enumerate([[1, 0, 2, 0, 0], [0, 1, 0]]):
        hyp = hand[b].start()
        for symbol in align:
            lp, hyp = hand[b].log_probs(replace(hyp, emitted=0))   # (training: no limit)
            hyp = hand[b].extend(hyp, hyp.score + lp[symbol], symbol)
        expected -= hyp.score
    assert loss.tensor.item() == pytest.approx(expected, abs=1e-9)


# -- misuse ----------------------------------------------------------------------------------------------------


def misuse(case: str):
    """A search loop with one mistake in it (marked with a comment naming `case`)."""
    enc, enc_time = encoder([2], seed=0)
    model = Transducer(seed=0)

    def fn(x):
        loop = ll.Loop(axis=Dim("align"), max_seq_len=4)
        loop.state.t = ll.zeros([], dtype="int64")
        loop.state.history = ll.search.label_history_start()
        loop.state.wrong = ll.zeros([], dtype="int64")
        with loop:
            log_probs = ll.log_softmax(model.readout(model.from_frame(ll.gather(x, index=loop.state.t,
                                                                                axis=enc_time))), axis=V)
            if case == "merge-before-choice":
                ll.search.merge([loop.state.t])  # <merge-before-choice>
            limit = ll.search.limit_labels_per_frame
            if case == "negative-limit":
                limit(log_probs, loop.state.t, limit=-1, blank=BLANK, axis=V)  # <negative-limit>
            if case == "limit-without-label-dim":
                limit(loop.state.t, loop.state.t, limit=1, blank=BLANK, axis=V)  # <limit-without-label-dim>
            label = ll.choice(log_probs, beam_size=2)
            if case == "history-of-a-plain-tensor":
                ll.search.label_history(loop.state.wrong, label, ignore=BLANK)  # <history-of-a-plain-tensor>
            if case == "history-of-a-float-label":
                ll.search.label_history(loop.state.history, ll.cast(label, "float64"))  # <history-of-a-float-label>
            loop.state.t = loop.state.t + ll.cast(label == BLANK, "int64")
            loop.end(loop.state.t >= ll.length(enc_time), include_eos=True)
        return loop.search.scores

    return ll.compile(fn, mode="search"), enc


@pytest.mark.parametrize("case, cls, names", [
    ("merge-before-choice", ll.errors.TraceError, ()),
    ("negative-limit", ll.errors.DimError, ()),
    ("limit-without-label-dim", ll.errors.DimError, ("vocab",)),
    ("history-of-a-plain-tensor", ll.errors.DimError, ()),
    ("history-of-a-float-label", ll.errors.DimError, ()),
])
def test_misuse_names_the_line(case, cls, names):
    from error_helpers import check_error
    prog, enc = misuse(case)
    with pytest.raises(cls) as info:
        prog(enc)
    check_error(__file__, info, cls, case, *names)


@pytest.mark.parametrize("mode", ["logsumexp", None])
def test_the_search_loop_is_optimized_and_equals_the_reference(mode):
    """``labels_since_blank`` reads ``emitted + 1`` gathered onto the pruned beam by a gather made while it
    was traced, after its first node: the optimizer places each call after the calls it reads (it used to
    give up on the whole loop), computes the loop-invariant parts once before the loop, and the search finds
    what the reference interpreter finds, on a padded batch."""
    model = Transducer(seed=3, beam=3, limit=2, mode=mode)
    enc, enc_time = encoder([4, 2, 3], seed=4)
    prog = ll.compile(model, mode="search")
    align = Dim("align")
    got = prog(enc, enc_time=enc_time, align=align)
    text = prog.explain()
    assert "not optimized" not in text and "failed" not in text, text
    assert "computed once before the loop" in text, text
    expected = prog.reference(enc, enc_time=enc_time, align=align)
    labels, scores, valid, lengths = got
    ref_labels, ref_scores, ref_valid, ref_lengths = expected
    beam = next(d for d in scores.dims if d is not B)
    assert torch.equal(valid.align(B, beam), ref_valid.align(B, beam))
    assert torch.equal(lengths.align(B, beam), ref_lengths.align(B, beam))
    ok = valid.align(B, beam)
    assert_close(scores.align(B, beam)[ok], ref_scores.align(B, beam)[ok], rtol=0, atol=1e-12)
    axis = next(d for d in labels.dims if d not in (B, beam))
    lab, ref_lab, n = labels.align(B, beam, axis), ref_labels.align(B, beam, axis), lengths.align(B, beam)
    for b, k in ok.nonzero().tolist():
        assert torch.equal(lab[b, k, :n[b, k]], ref_lab[b, k, :n[b, k]]), (b, k)
