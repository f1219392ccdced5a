"""The seeds' pipeline (Zeyer et al. 2020), end to end on a small synthetic task: full-sum train an RNN-T
written over named dims (``rnnt_loss``), take its Viterbi alignments (``rnnt_align``), train the seeds'
slow/fast transducer loop with cross entropy on them, and decode with its alignment-synchronous search.

The task: each frame carries (with noise) one of 3 labels or nothing; the labels are those of the frames, in
order (0 to 6 per sequence, so U = 0 occurs)."""

import torch

import looplift as ll
from looplift import nn

BLANK = 0
ENC_TIME, LABELS, ALIGN = ll.Dim("enc_time"), ll.Dim("labels"), ll.Dim("align")
FEAT, VOCAB = ll.Dim("feat", 4), ll.Dim("vocab", 4)          # vocab: blank and labels 1..3
EMB, HIDDEN = ll.Dim("emb", 8), ll.Dim("hidden", 16)


def task(n: int, seed: int):
    """`n` sequences of 3 to 7 frames: the features, the labels, and the labels per entry as lists."""
    g = torch.Generator().manual_seed(seed)
    t_len = torch.randint(3, 8, (n,), generator=g)
    classes = torch.randint(0, 4, (n, int(t_len.max())), generator=g) * (torch.rand(n, int(t_len.max()),
                                                                                  generator=g) < 0.6)
    classes[torch.arange(classes.shape[1]) >= t_len[:, None]] = 0
    feats = torch.nn.functional.one_hot(classes, 4).float() * 3 + 0.3 * torch.randn(*classes.shape, 4, generator=g)
    wanted = [[c for c in row.tolist() if c] for row in classes]
    u_len = torch.tensor([len(w) for w in wanted])
    labels = torch.zeros(n, max(1, int(u_len.max())), dtype=torch.int64)
    for b, w in enumerate(wanted):
        labels[b, :len(w)] = torch.tensor(w, dtype=torch.int64)
    x = ll.Named(feats, (ll.batch_dim, ENC_TIME, FEAT), {ENC_TIME: t_len})
    y = ll.Named(labels, (ll.batch_dim, LABELS), {LABELS: u_len}, sparse_dim=VOCAB)
    return x, y, wanted


class RNNT(ll.Module):
    """Full-sum: the encoder over ``enc_time``, the prediction LSTM over the prefixes, the joint broadcast."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.LSTM(FEAT, HIDDEN, bidirectional=True)
        self.embed, self.pred = nn.Embedding(VOCAB, EMB), nn.LSTM(EMB, HIDDEN)
        self.out = nn.Linear(HIDDEN, VOCAB)

    def joint(self, x, labels):
        enc, _ = self.encoder(x, axis=ENC_TIME)
        prefix = LABELS + 1
        inputs = ll.pad(labels, axis=LABELS, left=1, value=BLANK)
        loop = ll.Loop(axis=prefix)
        loop.state.lstm = self.pred.default_initial_state()
        with loop:
            h, loop.state.lstm = self.pred(self.embed(loop.unstack(inputs)), state=loop.state.lstm)
            pred = loop.stack(h)
        return self.out(ll.tanh(enc + pred)), prefix

    def forward(self, x, labels):
        logits, prefix = self.joint(x, labels)
        loss = ll.rnnt_loss(logits, labels, blank=BLANK, enc_time=ENC_TIME, prefix=prefix, axis=VOCAB)
        return ll.sum(loss, axis=ll.batch_dim)

    def align(self, x, labels):
        logits, prefix = self.joint(x, labels)
        return ll.rnnt_align(logits, labels, blank=BLANK, enc_time=ENC_TIME, prefix=prefix, axis=VOCAB,
                             out_dim=ALIGN)


class SlowFast(ll.Module):
    """The seeds' transducer: a loop over alignment steps, the frame gathered at the position ``t``, the slow
    label LSTM under ``MaskedComputation``, a fast joint; cross entropy on a fixed alignment in training."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.LSTM(FEAT, HIDDEN, bidirectional=True)
        self.embed, self.slow = nn.Embedding(VOCAB, EMB), nn.LSTM(EMB, HIDDEN)
        self.frame, self.from_slow = nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.out = nn.Linear(HIDDEN, VOCAB)

    def forward(self, x, alignment=None):
        enc, _ = self.encoder(x, axis=ENC_TIME)
        loop = ll.Loop(axis=ALIGN, max_seq_len=3 * ll.length(ENC_TIME))
        loop.state.t, loop.state.emitted = ll.zeros([], dtype="int64"), ll.zeros([], dtype="int64")
        loop.state.label = ll.full(BLANK, sparse_dim=VOCAB)
        loop.state.started = ll.full(False)
        loop.state.slow = self.slow.default_initial_state()
        loop.state.history = ll.search.label_history_start()
        with loop:
            x_t = ll.gather(enc, index=loop.state.t, axis=ENC_TIME)
            with ll.MaskedComputation(mask=(loop.state.label != BLANK) | ~loop.state.started):
                s, loop.state.slow = self.slow(self.embed(loop.state.label), state=loop.state.slow)
            loop.state.started = ll.full(True)
            log_probs = ll.log_softmax(self.out(ll.tanh(self.frame(x_t) + self.from_slow(s))), axis=VOCAB)
            log_probs = ll.search.limit_labels_per_frame(log_probs, loop.state.emitted, limit=2, blank=BLANK,
                                                         axis=VOCAB)
            label = loop.state.label = ll.choice(log_probs, target=alignment, beam_size=3)
            loop.state.t = loop.state.t + ll.cast(label == BLANK, "int64")
            loop.state.emitted = ll.search.labels_since_blank(loop.state.emitted, label, blank=BLANK)
            loop.state.history = ll.search.label_history(loop.state.history, label, ignore=BLANK)
            ll.search.merge([loop.state.t, loop.state.history, loop.state.emitted], mode="logsumexp")
            loop.end(loop.state.t >= ll.length(ENC_TIME), include_eos=True)
            logp = loop.stack(ll.gather(log_probs, index=label, axis=VOCAB))
            labels = loop.stack(label)
        if ll.is_search():
            return labels, loop.search.lengths
        return -ll.sum(logp, axis=[ll.batch_dim, ALIGN])


def fit(program, inputs, params, steps: int, lr: float) -> list[float]:
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = program(*inputs).tensor
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_full_sum_then_align_then_the_slow_fast_transducer_on_the_alignments():
    torch.manual_seed(0)
    x, y, wanted = task(24, seed=1)
    assert any(not w for w in wanted)

    # 1. full-sum training (the prediction loop moved out: one LSTM call)
    rnnt = RNNT()
    train = ll.compile(rnnt, mode="train")
    losses = fit(train, (x, y), rnnt.parameters(), steps=60, lr=0.03)
    assert "nothing left in the loop: it is gone" in train.explain()
    assert losses[-1] < 0.3 * losses[0], losses

    # 2. the Viterbi alignments: each entry's labels in order among T blanks, the last step a blank
    alignment = ll.compile(rnnt.align, mode="eval")(x, y)
    steps = alignment.align(ll.batch_dim, ALIGN)
    n = alignment.lengths[ALIGN]
    for b, w in enumerate(wanted):
        t = int(x.lengths[ENC_TIME][b])
        path = steps[b, :int(n[b])].tolist()
        assert int(n[b]) == t + len(w) and path[-1] == BLANK
        assert [s for s in path if s != BLANK] == w and path.count(BLANK) == t

    # 3. the seeds' transducer, cross entropy on the alignments: the loop is gone, equal to step by step
    seed = SlowFast()
    train_ce = ll.compile(seed, mode="train")
    torch.testing.assert_close(train_ce(x, alignment).tensor, train_ce.reference(x, alignment).tensor)
    assert train_ce.explain().count("nothing left in the loop: it is gone") == 2, train_ce.explain()
    losses = fit(train_ce, (x, alignment), seed.parameters(), steps=60, lr=0.03)
    assert losses[-1] < 0.3 * losses[0], losses

    # 4. decoded by its alignment-synchronous search, it finds the labels of most training sequences
    with torch.no_grad():
        labels, lengths = ll.compile(seed, mode="search")(x)
    (beam,) = [d for d in lengths.dims if d is not ll.batch_dim]
    (steps,) = [d for d in labels.dims if d not in (ll.batch_dim, beam)]
    hyps, n = labels.align(ll.batch_dim, beam, steps), lengths.align(ll.batch_dim, beam)
    best = [[s for s in hyps[b, 0, :int(n[b, 0])].tolist() if s != BLANK] for b in range(len(wanted))]
    correct = sum(h == w for h, w in zip(best, wanted))
    assert correct >= 0.75 * len(wanted), (correct, best, wanted)
