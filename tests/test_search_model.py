"""One decoder definition trains (the loop optimized away) and decodes (beam search), unchanged.

The model: an attention decoder over an encoder output with per-entry lengths (LSTM state and the previous
attention context fed back, label embedding, readout), its step ending on EOS, the label taken by
``looplift.choice``. Checked, in float64:

* train mode: ``choice`` gives the reference labels, the loss equals the same model written in plain
  PyTorch, and the loop keeps only the recurrent core (the label feedback moved out);
* search mode, same module object: with a beam covering every sequence, the n-best equals brute force in
  plain PyTorch (sequences, scores, lengths); the stacked per-step log-probability of the chosen label,
  backtracked with the hypotheses, sums to each hypothesis's score (values of the previous hypotheses meet
  the pruned ones by their sources automatically);
* a batch gives each entry the n-best it gets alone; the reference interpreter agrees.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import looplift as ll

DTYPE = torch.float64
B = ll.batch_dim
SRC = ll.Dim("src")
TGT = ll.Dim("tgt")
E, H, V = ll.Dim("enc", 3), ll.Dim("dec", 4), ll.Dim("vocab", 3)   # label 0: BOS and EOS
EOS = 0


class Decoder(ll.Module):
    def __init__(self, beam_size: int = 4, max_len: int = 3):
        super().__init__()
        self.beam_size, self.max_len = beam_size, max_len
        self.emb = ll.nn.Embedding(V, H)
        self.cell = ll.nn.LSTM(H + E, H)
        self.query = ll.nn.Linear(H, E)
        self.readout = ll.nn.Linear(H + E, V)

    def forward(self, enc, target=None):
        loop = ll.Loop(axis=TGT, max_seq_len=self.max_len)
        loop.state.label = ll.full(EOS, sparse_dim=V)
        loop.state.lstm = self.cell.default_initial_state()
        loop.state.ctx = ll.zeros([E])
        with loop:
            x = ll.concat(self.emb(loop.state.label), loop.state.ctx, axis=[H, E])
            h, loop.state.lstm = self.cell(x, state=loop.state.lstm)
            att = ll.softmax(ll.dot(enc, self.query(h), reduce=E), axis=SRC)
            loop.state.ctx = ll.dot(att, enc, reduce=SRC)
            log_probs = ll.log_softmax(self.readout(ll.concat(h, loop.state.ctx, axis=[H, E])), axis=V)
            label = ll.choice(log_probs, target=target, beam_size=self.beam_size, axis=V)
            loop.state.label = label
            loop.end(ll.eq(label, EOS), include_eos=True)
            chosen = loop.stack(ll.gather(log_probs, index=label, axis=V))   # log p of the chosen label
            labels = loop.stack(label)
        if ll.is_search():
            return labels, chosen, loop.search.scores, loop.search.lengths, loop.search.valid
        return -ll.sum(chosen, axis=[B, loop.axis])


def by_hand_step(m: Decoder, enc_b: torch.Tensor, state, label: int):
    """One step for one entry in plain PyTorch: (log-probs, new state); `enc_b` over (src, enc)."""
    w = dict(m.named_parameters())
    (h, c), ctx = state
    x = torch.cat([w["emb.weight"][label], ctx])
    gates = x @ w["cell.weight_ih_l0"].T + w["cell.bias_ih_l0"] + h @ w["cell.weight_hh_l0"].T + w["cell.bias_hh_l0"]
    i, f, g, o = gates.chunk(4)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    att = torch.softmax(enc_b @ (h @ w["query.weight"].T + w["query.bias"]), 0)
    ctx = att @ enc_b
    lp = torch.log_softmax(torch.cat([h, ctx]) @ w["readout.weight"].T + w["readout.bias"], 0)
    return lp, ((h, c), ctx)


def start(m: Decoder):
    return (torch.zeros(H.size, dtype=DTYPE), torch.zeros(H.size, dtype=DTYPE)), torch.zeros(E.size, dtype=DTYPE)


def brute_force(m: Decoder, enc_b: torch.Tensor) -> list[tuple[float, tuple[int, ...]]]:
    """Every sequence (ending on EOS within max_len, or cut at max_len) with its score, best first."""
    seqs = [pre + (EOS,) for n in range(m.max_len) for pre in itertools.product([1, 2], repeat=n)]
    seqs += list(itertools.product([1, 2], repeat=m.max_len))
    scored = []
    for seq in seqs:
        state, label, total = start(m), EOS, 0.0
        for y in seq:
            lp, state = by_hand_step(m, enc_b, state, label)
            total += float(lp[y].detach())
            label = y
        scored.append((total, seq))
    return sorted(scored, reverse=True)


def data(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    enc = torch.randn(len(lengths), max(lengths), E.size, generator=g, dtype=DTYPE)
    return enc, torch.tensor(lengths)


def nbest(out, b: int):
    labels, chosen, scores, lengths, valid = out
    beam = next(d for d in scores.dims if d is not B)
    t = next(d for d in labels.dims if d not in (B, beam))
    lab, ch = labels.align(B, beam, t), chosen.align(B, beam, t).detach()
    sc, ln, va = scores.align(B, beam).detach(), lengths.align(B, beam), valid.align(B, beam)
    return [(float(sc[b, k]), tuple(int(v) for v in lab[b, k, :int(ln[b, k])]), float(ch[b, k, :int(ln[b, k])].sum()))
            for k in range(beam.size) if va[b, k]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(7)
    return Decoder(beam_size=16, max_len=3).double()


def test_train_mode_uses_the_reference_labels_and_leaves_the_core_in_the_loop(model):
    enc, n_src = data([4, 2, 3])
    tgt = torch.tensor([[2, 1, 0], [1, 0, 0], [2, 2, 1]])
    n_tgt = torch.tensor([3, 2, 3])
    prog = ll.compile(model, mode="train")
    loss = prog(ll.Named(enc, (B, SRC, E), {SRC: n_src}), ll.Named(tgt, (B, TGT), {TGT: n_tgt}, sparse_dim=V))
    expected = 0.0
    for b in range(3):
        state, label = start(model), EOS
        for t in range(int(n_tgt[b])):
            lp, state = by_hand_step(model, enc[b, :int(n_src[b])], state, label)
            expected -= lp[tgt[b, t]]
            label = int(tgt[b, t])
    torch.testing.assert_close(loss.tensor, expected, rtol=1e-10, atol=1e-10)
    report = next(r for r in prog.traces[-1].optimized.reports if r.axis == "tgt")
    assert "label" in " ".join(report.moved_states), prog.explain()   # the fed-back label: the shifted targets
    stayed = {s.split(" ")[0] for s, _ in report.stayed}
    assert "choice" not in stayed and "embedding" not in stayed, prog.explain()


def test_search_mode_nbest_equals_brute_force_and_backtracked_values_are_consistent(model):
    enc, n_src = data([4, 2])
    prog = ll.compile(model, mode="search")
    out = prog(ll.Named(enc, (B, SRC, E), {SRC: n_src}))
    for b in range(2):
        expected = brute_force(model, enc[b, :int(n_src[b])])
        got = nbest(out, b)
        assert [s for _, s, _ in got] == [s for _, s in expected]
        for (score, _, chosen), (exp_score, _) in zip(got, expected):
            assert score == pytest.approx(exp_score, abs=1e-9)
            assert chosen == pytest.approx(score, abs=1e-9)   # the backtracked per-step log-probs


def test_search_batch_equals_each_entry_alone_and_the_reference(model):
    lengths = [4, 1, 3]
    enc, n_src = data(lengths, seed=3)
    prog = ll.compile(model, mode="search")
    out = prog(ll.Named(enc, (B, SRC, E), {SRC: n_src}))
    ref = prog.reference(ll.Named(enc, (B, SRC, E), {SRC: n_src}))
    for b, n in enumerate(lengths):
        alone = prog(ll.Named(enc[b:b + 1, :n], (B, SRC, E), {SRC: n_src[b:b + 1]}))
        got, got_alone, got_ref = nbest(out, b), nbest(alone, 0), nbest(ref, b)
        assert [s for _, s, _ in got] == [s for _, s, _ in got_alone] == [s for _, s, _ in got_ref]
        for (x, _, _), (y, _, _), (z, _, _) in zip(got, got_alone, got_ref):
            assert x == pytest.approx(y, abs=1e-9) and x == pytest.approx(z, abs=1e-9)


def test_a_small_beam_keeps_the_best_hypotheses_in_order(model):
    small = Decoder(beam_size=2, max_len=3).double()
    small.load_state_dict(model.state_dict())
    enc, n_src = data([4, 2], seed=5)
    out = ll.compile(small, mode="search")(ll.Named(enc, (B, SRC, E), {SRC: n_src}))
    for b in range(2):
        got = nbest(out, b)
        assert len(got) == 2 and got[0][0] >= got[1][0]
        best = brute_force(small, enc[b, :int(n_src[b])])[0]
        # beam search may miss the global best, but what it returns is scored exactly
        for score, _seq, chosen in got:
            assert chosen == pytest.approx(score, abs=1e-9)
            assert score <= best[0] + 1e-9
