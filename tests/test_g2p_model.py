"""The G2P recipe's model: its training loss and gradients equal the same architecture written by hand in
plain PyTorch (``benchmarks/g2p_training.py``'s ``HandG2P``, the benchmark's baseline), on real CMUdict
words with padding; label smoothing; the loop keeps only the recurrent core."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

import looplift as ll
from looplift.recipes.g2p import data, recipe
from looplift.recipes.g2p.model import G2P, Config

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
