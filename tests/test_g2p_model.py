"""The G2P recipe's models. The LSTM model's training loss and gradients equal the same architecture written
by hand in plain PyTorch (``benchmarks/g2p_training.py``'s ``HandG2P``, the benchmark's baseline), on real
CMUdict words with padding; label smoothing; the loop keeps only the recurrent core; decoding with a
threshold. The Transformer variant trains without a loop, equal to the step-by-step reference, and its
search scores are its own log-probabilities. The transducer variant trains on the full-sum loss with its
prediction loop gone, equal to the step-by-step reference, and learns to decode a handful of words."""

from __future__ import annotations

import functools
import gc
import importlib.util
import pathlib

import pytest
import torch

import looplift as ll
from looplift.recipes.g2p import data, recipe, transducer
from looplift.recipes.g2p.ensemble import Ensemble, TransducerEnsemble
from looplift.recipes.g2p.model import G2P, Config
from looplift.recipes.g2p.transducer import TransducerConfig, TransducerG2P
from looplift.recipes.g2p.transformer import TransformerConfig, TransformerG2P

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("g2p_training", ROOT / "benchmarks" / "g2p_training.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _hand_twin(model: G2P):
    """The benchmark's hand-written model with `model`'s weights (and the benchmark module)."""
    bench = _bench()
    hand = bench.HandG2P(model.config).double()
    with torch.no_grad():
        mine = bench.hand_params_from(model)
        for name, p in hand.named_parameters():
            p.copy_(mine[name])
    return hand, bench


@pytest.fixture(scope="module")
def words():
    entries = data.split(data.load())["train"][:3000:97]   # a spread of lengths
    return entries, recipe.build_vocabs(entries, stress=False)


@pytest.mark.parametrize("layers", [1, 2])
def test_loss_and_gradients_equal_plain_pytorch(words, layers):
    entries, vocabs = words
    torch.manual_seed(layers)
    config = Config(len(vocabs.chars), len(vocabs.phonemes), emb=5, enc=8, enc_layers=layers, dec=6)
    model = G2P(config).double()
    hand, bench = _hand_twin(model)
    examples = recipe.Examples(entries, vocabs)
    batch = list(range(len(examples)))
    loss, count = recipe.loss_function(examples)(model, batch)
    x, xl = data.encode_batch([examples.chars[i] for i in batch])
    y, yl = data.encode_batch([examples.prons[i] + [0] for i in batch])
    want, want_count = hand(x, xl, y, yl)
    assert count == want_count == int(yl.sum())
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-10)
    loss.backward()
    want.backward()
    hand_grads = dict(hand.named_parameters())
    for name, p in bench.hand_params_from(model).items():
        torch.testing.assert_close(p.grad, hand_grads[name].grad, rtol=1e-8, atol=1e-10, msg=name)


def test_eval_mode_loss_with_the_readout_through_the_frames_equals_plain_pytorch(words):
    """Without dropout (eval mode) the readout takes the context through each frame's projection; the loss
    is still the hand-written model's (which reads the context whole)."""
    entries, vocabs = words
    torch.manual_seed(7)
    model = G2P(Config(len(vocabs.chars), len(vocabs.phonemes), emb=5, enc=8, dec=6, dropout=0.3)).double().eval()
    hand, _ = _hand_twin(model)
    hand.eval()
    examples = recipe.Examples(entries, vocabs)
    x = recipe.char_batch(model, examples.chars)
    y = recipe.phoneme_batch(model, examples.prons)
    loss = ll.compile(model, mode="eval")(x, y, src=recipe.SRC, tgt=recipe.TGT).tensor
    xs, xl = data.encode_batch(examples.chars)
    ys, yl = data.encode_batch([p + [0] for p in examples.prons])
    want, _ = hand(xs, xl, ys, yl)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-10)


def test_label_smoothing_and_the_loop_core(words):
    """Label smoothing eps: (1 - eps) * NLL + eps * mean over phonemes of -log p, summed; the loop keeps
    the LSTM cell and attention, the readout and loss move out."""
    entries, vocabs = words
    torch.manual_seed(0)
    config = Config(len(vocabs.chars), len(vocabs.phonemes), emb=5, enc=8, enc_layers=1, dec=6)
    plain, smooth = G2P(config).double(), G2P(Config(**{**config.__dict__, "label_smoothing": 0.2})).double()
    smooth.load_state_dict(plain.state_dict())
    examples = recipe.Examples(entries[:8], vocabs)
    x = recipe.char_batch(plain, examples.chars)
    y = recipe.phoneme_batch(plain, examples.prons)
    nll = ll.compile(plain, mode="eval")(x, y, src=recipe.SRC, tgt=recipe.TGT).tensor

    prog = ll.compile(smooth, mode="train")
    got = prog(recipe.char_batch(smooth, examples.chars), recipe.phoneme_batch(smooth, examples.prons),
               src=recipe.SRC, tgt=recipe.TGT).tensor
    report = prog.explain()
    assert "lstm_cell" in report.split("stayed in the loop")[1]
    assert "linear {batch, phonemes}" in report.split("moved out")[-1].split("stayed in the loop")[0]
    # the smoothing term, computed by hand from the eval-mode log-probs
    hand, _ = _hand_twin(plain)
    xt, xl = data.encode_batch(examples.chars)
    yt, yl = data.encode_batch([p + [0] for p in examples.prons])
    logits = _hand_logits(hand, xt, xl, yt)
    lp = torch.log_softmax(logits, -1)
    mask = (torch.arange(yt.shape[1])[None, :] < yl[:, None]).double()
    uniform_term = (-(lp.mean(-1)) * mask).sum()
    torch.testing.assert_close(got, 0.8 * nll + 0.2 * uniform_term, rtol=1e-10, atol=1e-10)


def _hand_logits(hand, x, x_len, y):
    captured = {}
    orig = hand.readout.forward

    def grab(inp):
        out = orig(inp)
        captured["logits"] = out
        return out

    hand.readout.forward = grab
    hand(x, x_len, y, torch.full((y.shape[0],), y.shape[1]))
    hand.readout.forward = orig
    return captured["logits"]


def test_decode_with_a_threshold(words):
    """decode(threshold=...) through the recipe's model: threshold 0 keeps one hypothesis per step, so it is
    greedy decoding (beam 1) exactly; a threshold no score gap reaches is the full beam; in between every
    word keeps between 1 and `beam` hypotheses, all within the threshold of its best."""
    entries, vocabs = words
    torch.manual_seed(5)
    config = Config(len(vocabs.chars), len(vocabs.phonemes), emb=8, enc=12, dec=10)
    model = G2P(config).double()
    with torch.no_grad():   # a peaked readout: some words sure, some not
        model.readout.weight.mul_(6.0)
    encoded = [vocabs.chars.encode(e.word) for e in entries]

    def assert_same(got, want):   # (a narrower beam runs other matmul shapes: scores agree to rounding)
        assert [[q for q, _ in hyps] for hyps in got] == [[q for q, _ in hyps] for hyps in want]
        for g, w in zip(got, want):
            assert torch.allclose(torch.tensor([s for _, s in g]), torch.tensor([s for _, s in w]),
                                  rtol=0, atol=1e-9)

    assert_same(recipe.decode(model, encoded, beam=6, threshold=0.0), recipe.decode(model, encoded, beam=1))
    assert_same(recipe.decode(model, encoded, beam=6, threshold=1e9), recipe.decode(model, encoded, beam=6))
    some = recipe.decode(model, encoded, beam=6, threshold=2.0)
    sizes = [len(h) for h in some]
    assert min(sizes) >= 1 and max(sizes) <= 6 and len(set(sizes)) > 1
    for hyps in some:
        assert all(s >= hyps[0][1] - 2.0 - 1e-9 for _, s in hyps)


def test_decoding_batches_side_by_side_gives_what_one_at_a_time_gives(words):
    """decode(workers=3): the batches searched in threads (one torch thread each) give every word the n-best
    that decoding the batches one after another gives, in the words' order; torch's thread count is
    restored afterwards."""
    entries, vocabs = words
    torch.manual_seed(6)
    model = G2P(Config(len(vocabs.chars), len(vocabs.phonemes), emb=8, enc=12, dec=10)).double()
    encoded = [vocabs.chars.encode(e.word) for e in entries]
    threads = torch.get_num_threads()
    alone = recipe.decode(model, encoded, beam=4, batch_size=3, workers=1)
    together = recipe.decode(model, encoded, beam=4, batch_size=3, workers=3)
    assert torch.get_num_threads() == threads
    assert gc.isenabled()   # (paused while decoding, on again after)
    assert len(encoded) > 3 * 3   # (more batches than workers)
    assert [[q for q, _ in hyps] for hyps in together] == [[q for q, _ in hyps] for hyps in alone]
    for g, w in zip(together, alone):
        assert torch.allclose(torch.tensor([s for _, s in g]), torch.tensor([s for _, s in w]), rtol=0, atol=1e-9)


def test_decoding_leaves_the_garbage_collector_as_it_found_it(words):
    entries, vocabs = words
    model = G2P(Config(len(vocabs.chars), len(vocabs.phonemes), emb=8, enc=12, dec=10)).double()
    encoded = [vocabs.chars.encode(e.word) for e in entries[:4]]
    gc.disable()
    try:
        recipe.decode(model, encoded, beam=2, workers=1)
        assert not gc.isenabled()
    finally:
        gc.enable()
    recipe.decode(model, encoded, beam=2, workers=1)
    assert gc.isenabled()


def test_no_collection_runs_while_evaluating(words, monkeypatch):
    """evaluate pauses the cyclic garbage collector until its n-best lists are scored (each collection would
    walk everything alive): a collection may run once it is on again, not before; it is on afterwards."""
    entries, vocabs = words
    model = G2P(Config(len(vocabs.chars), len(vocabs.phonemes), emb=8, enc=12, dec=10)).double()
    scored, early = [], []
    score = recipe.metrics.score

    def score_and_note(*args, **kwargs):
        result = score(*args, **kwargs)
        scored.append(True)
        return result

    def watch(phase, info):
        if phase == "start" and not scored:
            early.append(info["generation"])

    monkeypatch.setattr(recipe.metrics, "score", score_and_note)
    gc.collect()
    gc.callbacks.append(watch)
    try:
        scores = recipe.evaluate(model, entries, vocabs, beam=2, batch_size=4, workers=2)
    finally:
        gc.callbacks.remove(watch)
    assert scored and early == [], early
    assert gc.isenabled()
    assert scores.words == len(entries)


def test_the_default_batch_depends_on_the_search(words):
    """Transducers (alone or together) search 512 words at once by default, the attention models 256."""
    _, vocabs = words
    lstm = G2P(Config(len(vocabs.chars), len(vocabs.phonemes), emb=8, enc=12, dec=10))
    rnnt = TransducerG2P(TransducerConfig(len(vocabs.chars), len(vocabs.phonemes), emb=8, enc=12, pred=10, joint=8))
    assert recipe.default_batch(lstm) == recipe.DECODE_BATCH == 256
    assert recipe.default_batch(rnnt) == recipe.TRANSDUCER_DECODE_BATCH == 512
    assert recipe.default_batch(TransducerEnsemble([rnnt, rnnt])) == 512
    assert recipe.default_batch(Ensemble([lstm, lstm])) == 256
    with pytest.raises(ValueError, match="batch_size must be a positive number of words, got 0"):
        recipe.decode(lstm, [[1, 2]], batch_size=0)


@pytest.mark.parametrize("workers", [2, 3])
def test_the_batches_searched_last_are_cut_finer(workers):
    """With several workers, the batches of the shortest words (searched last) are cut in parts: every word
    once, in the same order, the others unchanged."""
    batches = [list(range(start, min(start + 5, 23))) for start in range(0, 23, 5)]
    cut = recipe._finer_tail(batches, workers)
    assert [i for idx in cut for i in idx] == list(range(23))
    assert cut[-(len(batches) - workers):] == batches[workers:]
    parts = cut[:len(cut) - (len(batches) - workers)]
    assert len(parts) == workers * recipe.TAIL_PARTS
    assert max(len(p) for p in parts) == -(-5 // recipe.TAIL_PARTS)


def _assert_training_equals_the_reference(model, examples):
    """`model`'s train-mode loss and every parameter's gradient on all of `examples` equal the reference
    interpreter's (its loops step by step); returns (the train program, the inputs)."""
    x = recipe.char_batch(model, examples.chars)
    y = recipe.phoneme_batch(model, examples.prons)
    train = ll.compile(model, mode="train")
    loss = train(x, y, src=recipe.SRC, tgt=recipe.TGT).tensor
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref = train.reference(x, y, src=recipe.SRC, tgt=recipe.TGT).tensor
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10, msg=name)
    return train, x, y


# -- the Transformer variant -----------------------------------------------------------------------

def _transformer(vocabs, seed: int = 0):
    torch.manual_seed(seed)
    config = TransformerConfig(len(vocabs.chars), len(vocabs.phonemes), model=8, heads=2, ff=12, layers=2)
    return TransformerG2P(config).double()


def test_transformer_training_equals_the_step_by_step_decoder_and_has_no_loop(words):
    """The Transformer in train mode: the loop optimizer removes the decoder loop (its self-attention
    histories become the whole sequence with a causal history dim), and the loss and every parameter's
    gradient equal the reference interpreter's, which runs the decoder step by step (padded CMUdict words,
    float64)."""
    entries, vocabs = words
    model = _transformer(vocabs)
    train, _, _ = _assert_training_equals_the_reference(model, recipe.Examples(entries, vocabs))
    explained = train.explain()
    assert "it is gone" in explained and "cum_concat as the whole sequence" in explained, explained


def test_transformer_search_scores_are_the_model_s_log_probabilities(words):
    """The same Transformer definition decodes by beam search (its histories following the hypotheses):
    every hypothesis's score equals the log-probability the model gives its phonemes (and EOS) when they are
    fed as targets in eval mode, and the n-best is in descending order."""
    entries, vocabs = words
    model = _transformer(vocabs, seed=1)
    with torch.no_grad():   # (hypotheses end well before max_seq_len)
        model.readout.bias[0] += 2.0
    encoded = [vocabs.chars.encode(e.word) for e in entries[:6]]
    nbest = recipe.decode(model, encoded, beam=4)
    score_of = ll.compile(model, mode="eval")
    for word, hyps in zip(encoded, nbest):
        assert len(hyps) == 4 and [s for _, s in hyps] == sorted((s for _, s in hyps), reverse=True)
        for ids, score in hyps:
            assert len(ids) < 2 * len(word) + 3   # (ended by EOS, not cut)
            nll = score_of(recipe.char_batch(model, [word]), recipe.phoneme_batch(model, [ids]),
                           src=recipe.SRC, tgt=recipe.TGT).tensor
            assert float(nll.detach()) == pytest.approx(-score, abs=1e-9)


# -- the transducer variant ------------------------------------------------------------------------

def _transducer(vocabs, seed: int = 0, **sizes):
    torch.manual_seed(seed)
    config = TransducerConfig(len(vocabs.chars), len(vocabs.phonemes), **{
        "emb": 6, "enc": 8, "enc_layers": 1, "pred": 6, "joint": 10, **sizes})
    return TransducerG2P(config).double()


@pytest.mark.parametrize("context", [0, 2])
def test_transducer_training_is_the_full_sum_over_the_step_by_step_prediction_network(words, context):
    """The transducer in train mode: the prediction loop is gone (one fused LSTM), and the loss and every
    parameter's gradient equal the reference interpreter's (the prediction LSTM step by step) and the sum of
    the per-word losses (padded CMUdict words, float64); the targets have no end symbol. (`context` 2: the
    stateless prediction network over the last two phonemes, no loop at all.)"""
    entries, vocabs = words
    model = _transducer(vocabs, pred_context=context)
    examples = recipe.Examples(entries, vocabs)
    train, _, y = _assert_training_equals_the_reference(model, examples)
    assert y.lengths[recipe.TGT].tolist() == [len(p) for p in examples.prons]
    if not context:
        assert "nothing left in the loop: it is gone" in train.explain()
    alone = sum(train(recipe.char_batch(model, [examples.chars[i]]), recipe.phoneme_batch(model, [examples.prons[i]]),
                      src=recipe.SRC, tgt=recipe.TGT).tensor for i in range(5))
    first = train(recipe.char_batch(model, examples.chars[:5]), recipe.phoneme_batch(model, examples.prons[:5]),
                  src=recipe.SRC, tgt=recipe.TGT).tensor
    torch.testing.assert_close(first, alone, rtol=1e-10, atol=1e-10)


class _Prediction(ll.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, phonemes, *, tgt: ll.Dim):
        return self.model.predict(phonemes, tgt=tgt)[0]


@pytest.mark.parametrize("context", [1, 2, 3])
def test_the_stateless_prediction_network_reads_the_last_phonemes_alone(words, context):
    """``--pred-context k``: after u phonemes, the prediction is ``from_pred(relu(sum_j E_j[y_(u-1-j)]))``,
    the blank standing for the phonemes before the first (plain PyTorch, per word, float64)."""
    entries, vocabs = words
    model = _transducer(vocabs, seed=3, pred_context=context).eval()
    examples = recipe.Examples(entries[:7], vocabs)
    y = recipe.phoneme_batch(model, examples.prons)
    got = ll.compile(_Prediction(model), mode="eval")(y, tgt=recipe.TGT)
    got = got.align(ll.batch_dim, recipe.TGT + 1, model.joint_dim)
    tables = [getattr(model, f"context{j}").weight for j in range(context)]
    for b, pron in enumerate(examples.prons):
        padded = [transducer.BLANK] * context + list(pron)
        for u in range(len(pron) + 1):
            h = torch.relu(sum(tables[j][padded[context + u - 1 - j]] for j in range(context)))
            want = h @ model.from_pred.weight.T + model.from_pred.bias
            torch.testing.assert_close(got[b, u].detach(), want.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("context", [0, 2])
def test_transducer_trains_on_a_handful_of_words_and_decodes_them(words, context):
    """A few hundred steps on 8 words (through the recipe's loss function): it decodes them, by the
    alignment-synchronous beam search with recombination, into their pronunciations. Each hypothesis's score
    is the log of a sum over some of its alignments (those merged in the beam), so at most the full-sum
    log-probability of its phonemes. (Overfit on 8 words, the model may emit all of a word's phonemes at one
    character, which the full-sum lattice allows: the search's limit per character is raised to match.)"""
    entries, vocabs = words
    few = [e for e in entries if len(e.prons) == 1][:8]
    model = _transducer(vocabs, seed=2, emb=16, enc=32, pred=32, joint=32, max_labels=8, pred_context=context)
    examples = recipe.Examples(few, vocabs)
    loss_fn = recipe.loss_function(examples)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(150):
        loss, count = loss_fn(model, list(range(len(examples))))
        opt.zero_grad()
        (loss / count).backward()
        opt.step()
        losses.append(loss.item() / count)
    assert losses[-1] < 0.1 * losses[0], losses[::10]
    encoded = [vocabs.chars.encode(e.word) for e in few]
    nbest = recipe.decode(model, encoded, beam=4)
    best = [hyps[0][0] for hyps in nbest]
    assert sum(b == p for b, p in zip(best, examples.prons)) >= 7, (best, examples.prons)
    score_of = ll.compile(model, mode="eval")
    for word, hyps in zip(encoded, nbest):
        assert [s for _, s in hyps] == sorted((s for _, s in hyps), reverse=True)
        for ids, score in hyps[:2]:
            nll = score_of(recipe.char_batch(model, [word]), recipe.phoneme_batch(model, [ids]),
                           src=recipe.SRC, tgt=recipe.TGT).tensor
            assert score <= -float(nll.detach()) + 1e-9


def test_transducer_search_through_the_label_table_equals_the_search_through_the_embedding(words, monkeypatch):
    """The search's prediction LSTM reads a label's input projection from a table over the labels (made once,
    with the biases): the same n-best lists, phonemes and scores, as the embedding then the LSTM step (float64,
    40 words, beam 4)."""
    entries, vocabs = words
    model = _transducer(vocabs, seed=1)
    encoded = [vocabs.chars.encode(e.word) for e in entries[:40]]
    with_table = recipe.decode(model, encoded, beam=4, workers=1)
    monkeypatch.setattr(transducer, "alignment_search", functools.partial(transducer.alignment_search, table=False))
    plain = recipe.decode(model, encoded, beam=4, workers=1)
    assert [[ids for ids, _ in hyps] for hyps in with_table] == [[ids for ids, _ in hyps] for hyps in plain]
    for a, b in zip(with_table, plain):
        assert [s for _, s in a] == pytest.approx([s for _, s in b], abs=1e-10)
    assert any(len(hyps) > 1 for hyps in plain)
