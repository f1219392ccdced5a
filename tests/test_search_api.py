"""The n-best API: score components in ``choice``, sampling with a generator, ``best`` with the lengths of the
hypotheses it picks, ``loop.search`` inside a step, and recombination that keeps ended and live hypotheses
apart. Each against a plain Python beam search written here, or against counts and the distribution."""

from dataclasses import dataclass, field

import pytest
import torch

import looplift as ll
from looplift import nn

B = ll.batch_dim
DTYPE = torch.float64
TOL = 1e-9


class Dec(ll.Module):
    """An RNN decoder, ``h = tanh(emb(prev) + rec(h))``, with two scores per step: the 'am' log-probs of
    ``out(h)`` and a label-only 'lm' (log-probs of ``lm_out(emb(prev))``). `eos` ends a hypothesis."""

    def __init__(self, vocab: int = 4, hidden: int = 5, *, seed: int = 0, eos: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.V, self.H, self.eos = ll.Dim("vocab", vocab), ll.Dim("hidden", hidden), eos
        self.emb, self.rec = nn.Embedding(self.V, self.H), nn.Linear(self.H, self.H)
        self.out, self.lm_out = nn.Linear(self.H, self.V), nn.Linear(self.H, self.V)
        self.to(DTYPE)

    def torch_step(self, prev: int, h: torch.Tensor):
        """(the new h, the am log-probs, the lm log-probs) by hand."""
        lin = torch.nn.functional.linear
        h = h.detach()
        e = self.emb.weight[prev].detach()
        with torch.no_grad():
            h = torch.tanh(e + lin(h, self.rec.weight, self.rec.bias))
            return (h, torch.log_softmax(lin(h, self.out.weight, self.out.bias), -1),
                    torch.log_softmax(lin(e, self.lm_out.weight, self.lm_out.bias), -1))

    def forward(self, h0, *, beam: int, max_len: int, weights=None, sample=False, generator=None,
                recombine=None):
        V = self.V
        loop = ll.Loop(max_seq_len=max_len)
        loop.state.label, loop.state.h = ll.full(0, sparse_dim=V), h0
        if recombine is not None:
            loop.state.score = ll.zeros([])   # (the atomic ops: the running score is a state of the user's)
        with loop:
            e = self.emb(loop.state.label)
            loop.state.h = ll.tanh(e + self.rec(loop.state.h))
            am = ll.log_softmax(self.out(loop.state.h), axis=V)
            scores = am if weights is None else {"am": am, "lm": ll.log_softmax(self.lm_out(e), axis=V)}
            if recombine is None:
                label = ll.choice(scores, beam_size=beam, weights=weights, sample=sample, generator=generator)
                n_ended = loop.stack(ll.sum(ll.cast(loop.search.ended, "int64"), axis=loop.beam))
            else:   # the atomic ops: prune, then merge by the last label
                pruned = ll.search.prune(ll.search.expand(loop.state.score, am, axis=V), beam_size=beam, axis=V)
                loop.state.score = ll.search.recombine(pruned.scores, keys=pruned.labels, mode=recombine)
                label = pruned.labels
                n_ended = loop.stack(ll.sum(ll.cast(loop.search.ended, "int64"), axis=loop.beam))
            loop.state.label = label
            loop.end(label == self.eos, include_eos=True)
            labels = loop.stack(label)
        result = loop.search if recombine is None else None
        scores = result.scores if result is not None else loop.state.score
        return {"labels": labels, "scores": scores, "valid": loop.search.valid, "lengths": loop.search.lengths,
                "n_ended": n_ended, "best": ll.search.best(labels, scores, beam=loop.beam),
                **{f"c_{k}": v for k, v in (result.components if result is not None else {}).items()}}


def search(dec: Dec, h0: torch.Tensor, **kw) -> dict:
    """Run the search and return the outputs by name."""
    return ll.compile(lambda h: dec(h, **kw), mode="search")(ll.Named(h0, (B, dec.H)))


def nbest(out: dict, b: int) -> list[tuple[tuple, float, dict]]:
    """Entry `b`'s valid hypotheses: (labels up to the length, score, {component: total})."""
    labels = out["labels"]
    beam = out["scores"].dims[-1] if out["scores"].dims[-1] is not B else out["scores"].dims[0]
    axis = next(d for d in labels.dims if d not in (B, beam))
    lab = labels.align(B, beam, axis)
    sc, ok, n = out["scores"].align(B, beam).detach(), out["valid"].align(B, beam), out["lengths"].align(B, beam)
    comps = {k[2:]: v.align(B, beam).detach() for k, v in out.items() if k.startswith("c_")}
    return [(tuple(lab[b, k, :int(n[b, k])].tolist()), float(sc[b, k]),
             {c: float(v[b, k]) for c, v in comps.items()}) for k in range(sc.shape[1]) if ok[b, k]]


@dataclass
class Hyp:
    score: float
    labels: tuple
    h: torch.Tensor
    comps: dict = field(default_factory=dict)
    ended: bool = False

    @property
    def prev(self) -> int:
        return self.labels[-1] if self.labels else 0


def py_search(dec: Dec, h0: torch.Tensor, *, beam: int, max_len: int, weights=None, recombine=None):
    """The plain beam search: every live hypothesis extends by every label (an ended one once, by label 0
    at no cost), the `beam` best candidates by the weighted sum of the components stay; with `recombine`,
    the kept ones with the same last label (0 for an ended one's extension) and the same ended status before
    the step merge into the first (max or log-sum-exp). Also returns the number of ended hypotheses before
    each step."""
    hyps, n_ended = [Hyp(0.0, (), h0, {"am": 0.0, "lm": 0.0})], []
    for _ in range(max_len):
        if all(h.ended for h in hyps):
            break
        n_ended.append(sum(h.ended for h in hyps))
        cands = []
        for h in hyps:
            if h.ended:
                cands.append((h.score, h, None))
                continue
            h2, am, lm = dec.torch_step(h.prev, h.h)
            for v in range(dec.V.size):
                step = {"am": float(am[v]), "lm": float(lm[v])}
                comps = {k: h.comps[k] + step[k] for k in step}
                score = h.score + (step["am"] if weights is None else sum(w * step[k] for k, w in weights.items()))
                cands.append((score, Hyp(score, h.labels + (v,), h2, comps, v == dec.eos), v))
        cands.sort(key=lambda c: -c[0])
        kept = [(c[1], c[2]) for c in cands[:beam]]
        if recombine is None:
            hyps = [h for h, _ in kept]
            continue
        groups: dict[tuple, list] = {}
        for h, v in kept:   # (an ended one: its extension's label is 0)
            groups.setdefault((0 if v is None else v, v is None), []).append(h)
        combine = max if recombine == "max" else (lambda s: float(torch.logsumexp(torch.tensor(s, dtype=DTYPE), 0)))
        hyps = [Hyp(combine([g.score for g in members]), members[0].labels, members[0].h, members[0].comps,
                    members[0].ended) for members in groups.values()]
    return [(h.labels, h.score, h.comps) for h in sorted(hyps, key=lambda h: -h.score)], n_ended


def assert_same(got: list, want: list, *, components: bool = False):
    got, want = sorted(got, key=lambda x: x[0]), sorted(want, key=lambda x: x[0])
    assert [g[0] for g in got] == [w[0] for w in want]
    for g, w in zip(got, want):
        assert g[1] == pytest.approx(w[1], abs=TOL), g[0]
        if components:
            for k in w[2]:
                assert g[2][k] == pytest.approx(w[2][k], abs=TOL), (g[0], k)


def h0s(n: int = 3, hidden: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, hidden, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


# -- score components ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [{"am": 1.0, "lm": 0.5}, {"am": 1.0, "lm": -0.3}, {"am": 0.7, "lm": 0.0}])
@pytest.mark.parametrize("beam", [2, 5])
def test_score_components_prune_on_the_weighted_sum_and_keep_each_total(weights, beam):
    """The n-best is the plain beam search on the weighted sum; each component's total is the sum of its own
    log-probs along the hypothesis's labels; the score is the weighted sum of the totals."""
    dec, h0 = Dec(seed=2), h0s()
    out = search(dec, h0, beam=beam, max_len=4, weights=weights)
    for b in range(len(h0)):
        got = nbest(out, b)
        want, _ = py_search(dec, h0[b], beam=beam, max_len=4, weights=weights)
        assert_same(got, want, components=True)
        for labels, score, comps in got:
            h, am_total, lm_total, prev = h0[b], 0.0, 0.0, 0
            for v in labels:   # the components along the labels, by hand
                h, am, lm = dec.torch_step(prev, h)
                am_total, lm_total, prev = am_total + float(am[v]), lm_total + float(lm[v]), v
            assert comps == pytest.approx({"am": am_total, "lm": lm_total}, abs=TOL)
            assert score == pytest.approx(weights["am"] * am_total + weights["lm"] * lm_total, abs=TOL)


def test_score_components_misuse_is_an_error_at_the_line():
    dec, h0 = Dec(), h0s()
    with pytest.raises(ll.errors.DimError, match="weights must give a number for each score component"):
        search(dec, h0, beam=2, max_len=3, weights={"am": 1.0})


# -- sampling --------------------------------------------------------------------------------------------------


class Unigram(ll.Module):
    """One step: a label drawn from softmax(logits), logits a parameter (the same for every entry)."""

    def __init__(self):
        super().__init__()
        self.V = ll.Dim("vocab", 4)
        self.logits = ll.Parameter([self.V])
        with torch.no_grad():
            self.logits.copy_(torch.tensor([0.5, -1.0, 1.2, 0.0]))
        self.generator = torch.Generator()

    def forward(self, x):
        loop = ll.Loop(max_seq_len=1)
        loop.state.label = ll.full(0, sparse_dim=self.V)
        with loop:
            scores = ll.log_softmax(self.logits + ll.zeros([ll.batch_dim]) * 0.0, axis=self.V)
            loop.state.label = ll.choice(scores, beam_size=1, sample=True, generator=self.generator)
            loop.end(loop.state.label >= 0, include_eos=True)
            labels = loop.stack(loop.state.label)
        return labels


def draws(model: Unigram, n: int, seed: int) -> torch.Tensor:
    model.generator.manual_seed(seed)
    x = ll.Named(torch.zeros(n, 1), (B, ll.Dim("one", 1)))
    return ll.compile(model, mode="search")(x).tensor.flatten()


def test_sampling_follows_the_distribution_and_a_seeded_generator_repeats_it():
    model = Unigram()
    labels = draws(model, 4000, seed=0)
    counts = torch.bincount(labels, minlength=4).double()
    expected = torch.softmax(model.logits.detach().double(), 0) * len(labels)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.27, (chi2, counts, expected)   # 3 degrees of freedom: p = 0.001
    assert torch.equal(draws(model, 4000, seed=0), labels)          # the same seed, the same draws
    assert not torch.equal(draws(model, 4000, seed=1), labels)      # another seed, other draws


# -- best, loop.search inside a step, recombination --------------------------------------------------------


def test_best_carries_the_length_of_the_hypothesis_it_picks():
    dec, h0 = Dec(seed=0, eos=3), h0s(6, seed=7)
    out = search(dec, h0, beam=3, max_len=5)
    best = out["best"]
    axis = next(d for d in best.dims if d is not B)
    lengths = best.lengths[axis]
    assert lengths.dim() == 1 and lengths.shape[0] == len(h0)
    for b in range(len(h0)):
        top = max(nbest(out, b), key=lambda x: x[1])
        assert int(lengths[b]) == len(top[0])
        assert tuple(best.align(B, axis)[b, :len(top[0])].tolist()) == top[0]
    assert len(set(lengths.tolist())) > 1, "the entries' best hypotheses differ in length"


@pytest.mark.parametrize("seed", [0, 3, 7])
def test_a_hypothesis_that_ended_keeps_its_state_to_the_end(seed):
    """After the loop, each valid hypothesis' state is the one of its last step: that of its labels, by hand
    (hypotheses end at different steps, and later steps leave their states as they were)."""
    dec, h0 = Dec(seed=seed), h0s(4, seed=seed + 1)

    def final_states(h0):
        loop = ll.Loop(max_seq_len=6)
        loop.state.label, loop.state.h = ll.full(0, sparse_dim=dec.V), h0
        with loop:
            loop.state.h = ll.tanh(dec.emb(loop.state.label) + dec.rec(loop.state.h))
            label = ll.choice(ll.log_softmax(dec.out(loop.state.h), axis=dec.V), beam_size=3)
            loop.state.label = label
            loop.end(label == dec.eos, include_eos=True)
            labels = loop.stack(label)
        return labels, loop.state.h, loop.search.valid, loop.search.lengths

    labels, h, valid, lengths = ll.compile(final_states, mode="search")(ll.Named(h0, (B, dec.H)))
    (beam,) = [d for d in valid.dims if d is not B]
    (axis,) = [d for d in labels.dims if d not in (B, beam)]
    lab, ok, n = labels.align(B, beam, axis), valid.align(B, beam), lengths.align(B, beam)
    hs, ended_early = h.align(B, beam, dec.H), 0
    for b in range(len(h0)):
        for k in range(beam.size):
            if not ok[b, k]:
                continue
            want, prev = h0[b], 0
            for v in lab[b, k, :int(n[b, k])].tolist():
                want, _, _ = dec.torch_step(prev, want)
                prev = v
            ended_early += int(n[b, k]) < int(n.max())
            torch.testing.assert_close(hs[b, k], want, rtol=1e-9, atol=1e-9)
    assert ended_early   # (some hypothesis ended before others went on)


def test_whether_each_hypothesis_has_ended_is_readable_in_the_step():
    dec, h0 = Dec(seed=4, eos=1), h0s(2)
    out = search(dec, h0, beam=4, max_len=5)
    steps = out["n_ended"].align(B, next(d for d in out["n_ended"].dims if d is not B))
    for b in range(len(h0)):
        _, n_ended = py_search(dec, h0[b], beam=4, max_len=5)
        assert steps[b, :len(n_ended)].tolist() == n_ended
        assert max(n_ended) > 0


@pytest.mark.parametrize("mode", ["max", "logsumexp"])
def test_recombination_never_merges_an_ended_hypothesis_with_a_live_one(mode):
    """EOS is label 2, so an ended hypothesis extends by label 0 like live ones choosing 0: keyed on the last
    label they would merge; they must not (the plain search merges by the last label and the ended status)."""
    dec, h0 = Dec(seed=5, eos=2), h0s(3)
    out = search(dec, h0, beam=6, max_len=4, recombine=mode)
    merged_apart = 0
    for b in range(len(h0)):
        want, _ = py_search(dec, h0[b], beam=6, max_len=4, recombine=mode)
        assert_same(nbest(out, b), want)
        merged_apart += sum(1 for labels, _, _ in want if labels and labels[-1] == 2)
    assert merged_apart > 0   # ended hypotheses were there to merge wrongly


def test_each_entry_alone_equals_the_batch():
    dec, h0 = Dec(seed=6, eos=1), h0s(4, seed=3)
    kw = dict(beam=3, max_len=4, weights={"am": 1.0, "lm": 0.4})
    batch = search(dec, h0, **kw)
    for b in range(len(h0)):
        alone = search(dec, h0[b:b + 1], **kw)
        got, want = nbest(alone, 0), nbest(batch, b)
        assert [g[0] for g in got] == [w[0] for w in want]
        for g, w in zip(got, want):
            assert g[1] == pytest.approx(w[1], abs=1e-12) and g[2] == pytest.approx(w[2], abs=1e-12)
        best_len = next(iter(batch["best"].lengths.values()))[b]
        assert int(next(iter(alone["best"].lengths.values()))[0]) == int(best_len)
