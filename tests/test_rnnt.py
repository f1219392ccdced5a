"""rnnt_loss and rnnt_align against a plain per-entry dynamic program written here, the closed form of a joint
that ignores t and u, and enumeration of the alignments of tiny lattices."""

import itertools
import math

import pytest
import torch
from error_helpers import check_error
from hypothesis import given, settings
from hypothesis import strategies as st

import looplift as ll
from looplift import Dim

B = ll.batch_dim
DT = torch.float64
BLANK = 0


def dims():
    enc, lab, vocab = Dim("enc_time"), Dim("labels"), Dim("vocab", 5)
    return enc, lab, lab + 1, vocab


def lattice(frames: list[int], n_labels: list[int], *, seed: int, vocab: int = 5, scale: float = 1.0):
    """Random joint logits (padding random too) and labels (1..V-1, padding random) as Named inputs."""
    g = torch.Generator().manual_seed(seed)
    enc, lab, prefix, v = dims()
    v = Dim("vocab", vocab)
    t, u = max(frames), max(n_labels)
    scores = torch.randn(len(frames), t + 1, u + 2, vocab, generator=g, dtype=DT) * scale
    labels = torch.randint(1, vocab, (len(frames), u + 1), generator=g)
    return (ll.Named(scores, (B, enc, prefix, v), {enc: torch.tensor(frames), lab: torch.tensor(n_labels)}),
            ll.Named(labels, (B, lab), {lab: torch.tensor(n_labels)}, sparse_dim=v), enc, prefix, v)


def plain_loss(logp: torch.Tensor, labels: list[int], t: int) -> torch.Tensor:
    """-log P(labels | x) of one entry by the forward algorithm, loops over t and u: `logp` (T, U + 1, V)."""
    u_len = len(labels)
    alpha = [[None] * (u_len + 1) for _ in range(t)]
    for ti in range(t):
        for u in range(u_len + 1):
            terms = []
            if ti == 0 and u == 0:
                terms.append(logp.new_zeros(()))
            if ti > 0:
                terms.append(alpha[ti - 1][u] + logp[ti - 1, u, BLANK])
            if u > 0:
                terms.append(alpha[ti][u - 1] + logp[ti, u - 1, labels[u - 1]])
            alpha[ti][u] = torch.logsumexp(torch.stack(terms), 0)
    return -(alpha[t - 1][u_len] + logp[t - 1, u_len, BLANK])


def loss_program(scores_are="logits"):
    enc, lab, prefix, v = dims()

    def fn(scores, labels, *, enc_time, prefix, vocab):
        return ll.rnnt_loss(scores, labels, blank=BLANK, enc_time=enc_time, prefix=prefix, axis=vocab,
                            scores_are=scores_are)
    return ll.compile(fn)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(entries=st.lists(st.tuples(st.integers(1, 5), st.integers(0, 4)), min_size=1, max_size=4),
       seed=st.integers(0, 10**6))
def test_loss_and_gradients_equal_the_plain_dynamic_program(entries, seed):
    frames, n_labels = [t for t, _ in entries], [u for _, u in entries]
    scores, labels, enc, prefix, v = lattice(frames, n_labels, seed=seed)
    x = scores.tensor.clone().requires_grad_(True)
    loss = loss_program()(ll.Named(x, scores.dims, scores.lengths), labels, enc_time=enc, prefix=prefix, vocab=v)
    assert loss.dims == (B,)
    (grad,) = torch.autograd.grad(loss.tensor.sum(), [x])
    ref = x.detach().clone().requires_grad_(True)
    want = torch.stack([plain_loss(torch.log_softmax(ref[b, :t, :u + 1], -1),
                                   labels.tensor[b, :u].tolist(), t) for b, (t, u) in enumerate(entries)])
    (want_grad,) = torch.autograd.grad(want.sum(), [ref])
    torch.testing.assert_close(loss.tensor, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-10)   # zero in the padding


def test_log_probs_as_scores_equal_logits():
    scores, labels, enc, prefix, v = lattice([3, 1, 4], [2, 0, 3], seed=1)
    x = scores.tensor.clone().requires_grad_(True)
    logp = torch.log_softmax(x, -1)
    a = loss_program("log_probs")(ll.Named(logp, scores.dims, scores.lengths), labels, enc_time=enc,
                                  prefix=prefix, vocab=v)
    b = loss_program()(scores, labels, enc_time=enc, prefix=prefix, vocab=v)
    torch.testing.assert_close(a.tensor, b.tensor, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(a.tensor.sum(), [x], retain_graph=True)
    (g2,) = torch.autograd.grad(torch.stack([plain_loss(logp[i, :t, :u + 1], labels.tensor[i, :u].tolist(), t)
                                             for i, (t, u) in enumerate([(3, 2), (1, 0), (4, 3)])]).sum(), [x])
    torch.testing.assert_close(g, g2, rtol=1e-9, atol=1e-10)


def test_a_joint_that_ignores_t_and_u_has_the_closed_form():
    """With the same distribution at every node, P(y | x) = C(T - 1 + U, U) p_blank^T prod_u p(y_u): every
    alignment has T blanks (the last one last) and the U labels."""
    frames, n_labels = [4, 2, 1, 3], [3, 0, 2, 1]
    scores, labels, enc, prefix, v = lattice(frames, n_labels, seed=2)
    dist = torch.tensor([0.5, -0.2, 1.0, 0.3, -1.0], dtype=DT)
    const = ll.Named(dist.expand_as(scores.tensor).clone(), scores.dims, scores.lengths)
    loss = loss_program()(const, labels, enc_time=enc, prefix=prefix, vocab=v)
    logp = torch.log_softmax(dist, 0)
    for b, (t, u) in enumerate(zip(frames, n_labels)):
        closed = math.log(math.comb(t - 1 + u, u)) + t * logp[BLANK] + sum(logp[y] for y in labels.tensor[b, :u])
        assert float(loss.tensor[b]) == pytest.approx(-float(closed), abs=1e-10)


def test_each_entry_alone_equals_the_batch():
    frames, n_labels = [4, 1, 3, 2], [3, 0, 1, 2]
    scores, labels, enc, prefix, v = lattice(frames, n_labels, seed=3)
    batch = loss_program()(scores, labels, enc_time=enc, prefix=prefix, vocab=v).tensor
    for b, (t, u) in enumerate(zip(frames, n_labels)):
        one_s, one_l, e1, p1, v1 = lattice([t], [u], seed=4)
        one_s.tensor[0, :t, :u + 1] = scores.tensor[b, :t, :u + 1]
        one_l.tensor[0, :u] = labels.tensor[b, :u]
        alone = loss_program()(one_s, one_l, enc_time=e1, prefix=p1, vocab=v1).tensor
        assert float(alone[0]) == pytest.approx(float(batch[b]), abs=1e-12)


# -- the alignment ---------------------------------------------------------------------------------------------


def alignments(t: int, labels: list[int]):
    """Every alignment of `labels` to `t` frames: the symbols (T blanks, the last one last)."""
    u = len(labels)
    for positions in itertools.combinations(range(t - 1 + u), u):
        path, k = [], 0
        for i in range(t - 1 + u):
            if i in positions:
                path.append(labels[k])
                k += 1
            else:
                path.append(BLANK)
        yield path + [BLANK]


def path_log_prob(logp: torch.Tensor, path: list[int]) -> float:
    t = u = 0
    total = 0.0
    for symbol in path:
        total += float(logp[t, u, symbol])
        if symbol == BLANK:
            t += 1
        else:
            u += 1
    return total


def test_the_alignment_is_the_best_path_by_enumeration():
    frames, n_labels = [3, 1, 4, 2], [2, 0, 3, 2]
    scores, labels, enc, prefix, v = lattice(frames, n_labels, seed=5, scale=2.0)

    def fn(s, lab, *, enc_time, prefix, vocab):
        return ll.rnnt_align(s, lab, blank=BLANK, enc_time=enc_time, prefix=prefix, axis=vocab)

    path = ll.compile(fn)(scores, labels, enc_time=enc, prefix=prefix, vocab=v)
    align = next(d for d in path.dims if d is not B)
    assert path.sparse_dim is v and path.lengths[align].tolist() == [t + u for t, u in zip(frames, n_labels)]
    for b, (t, u) in enumerate(zip(frames, n_labels)):
        logp = torch.log_softmax(scores.tensor[b, :t, :u + 1], -1)
        symbols = path.align(B, align)[b, :t + u].tolist()
        candidates = list(alignments(t, labels.tensor[b, :u].tolist()))
        assert symbols in candidates
        best = max(path_log_prob(logp, p) for p in candidates)
        assert path_log_prob(logp, symbols) == pytest.approx(best, abs=1e-12)


# -- bad input -----------------------------------------------------------------------------------------------


def test_bad_input_is_a_looplift_error_at_the_line():
    other = Dim("other")
    scores, labels, enc, prefix, v = lattice([2, 3], [1, 2], seed=6)

    def not_prefix(s, lab_, *, enc_time, vocab):
        return ll.rnnt_loss(ll.replace_dim(s, prefix, other + 1), lab_, blank=BLANK, enc_time=enc_time,  # <prefix>
                            prefix=other + 1, axis=vocab)

    with pytest.raises(ll.errors.DimError) as info:
        ll.compile(not_prefix)(scores, labels, enc_time=enc, vocab=v)
    check_error(__file__, info, ll.errors.DimError, "prefix", "labels", "other+1")

    for blank in (5, -1, 0.0, True):   # (the vocabulary has 5 symbols)
        with pytest.raises(ll.errors.DimError) as info:
            ll.compile(lambda s, y, b=blank: ll.rnnt_loss(s, y, blank=b, enc_time=enc, prefix=prefix,  # <blank>
                                                          axis=v))(scores, labels)
        check_error(__file__, info, ll.errors.DimError, "blank", "vocab")

    bad = labels.tensor.clone()
    bad[1, 1] = BLANK
    with pytest.raises(ll.errors.ExecutionError) as info:
        loss_program()(scores, ll.Named(bad, labels.dims, labels.lengths, sparse_dim=v), enc_time=enc,
                       prefix=prefix, vocab=v)
    assert "is the blank (0)" in str(info.value) and "labels" in str(info.value)
    assert "test_rnnt.py" in str(info.value)

    lab = labels.dims[1]
    too_long = {lab: torch.tensor([1, 9])}   # (9 labels, but the padded size is 3)
    with pytest.raises(ll.errors.InputError, match="lengths of dim 'labels' must lie in"):
        loss_program()(ll.Named(scores.tensor, scores.dims, {enc: scores.lengths[enc], **too_long}),
                       ll.Named(labels.tensor, labels.dims, too_long, sparse_dim=v),
                       enc_time=enc, prefix=prefix, vocab=v)
