"""An ensemble of G2P models (looplift.recipes.g2p.ensemble): one model given twice decodes exactly as that
model alone; two different models (an attention LSTM and a Transformer) score each hypothesis with the mean
of their own log-likelihoods of it. The same for transducers (TransducerEnsemble): one given twice decodes as
it alone; two different ones, searching with a beam of one, score the alignment they pick with the mean of
their own log-probabilities of it (each member's from its lattice, computed as in its training)."""

from __future__ import annotations

import pytest
import torch

import looplift as ll
from looplift.recipes.g2p import recipe
from looplift.recipes.g2p.ensemble import Ensemble, TransducerEnsemble
from looplift.recipes.g2p.model import G2P, Config
from looplift.recipes.g2p.recipe import SRC, TGT
from looplift.recipes.g2p.transducer import BLANK, TransducerConfig, TransducerG2P
from looplift.recipes.g2p.transformer import TransformerConfig, TransformerG2P

WORDS = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9], [3, 2]]


def lstm(seed: int) -> G2P:
    torch.manual_seed(seed)
    return G2P(Config(n_chars=12, n_phonemes=9, emb=6, enc=10, enc_layers=1, dec=8)).double()


def transformer(seed: int) -> TransformerG2P:
    torch.manual_seed(seed)
    return TransformerG2P(TransformerConfig(n_chars=12, n_phonemes=9, model=8, heads=2, ff=12, layers=1)).double()


@pytest.mark.parametrize("make", [lstm, transformer], ids=["lstm", "transformer"])
@pytest.mark.parametrize("beam", [1, 4])
def test_one_model_given_twice_decodes_exactly_as_the_model_alone(make, beam):
    model = make(0)
    alone = recipe.decode(model, WORDS, beam=beam)
    twice = recipe.decode(Ensemble([model, model]), WORDS, beam=beam)
    assert twice == alone          # the same n-best, phonemes and scores (the mean of x and x is x)
    assert all(len(nbest) == beam for nbest in alone)


def test_an_ensembles_scores_are_the_mean_of_its_members_log_likelihoods():
    members = [lstm(1), transformer(2)]
    ensemble = Ensemble(members)
    nbest = recipe.decode(ensemble, WORDS, beam=3)
    for word, hyps in zip(WORDS, nbest):
        for phonemes, score in hyps:
            x, y = recipe.char_batch(ensemble, [word]), recipe.phoneme_batch(ensemble, [phonemes])
            with torch.no_grad():     # (the loss of one word: minus its log-likelihood, the end symbol included)
                losses = [float(ll.compile(m, mode="eval")(x, y, src=SRC, tgt=TGT).tensor) for m in members]
            assert score == pytest.approx(-sum(losses) / 2, rel=1e-9, abs=1e-9)


def test_members_must_share_their_vocabularies():
    other = G2P(Config(n_chars=12, n_phonemes=10, emb=6, enc=10, enc_layers=1, dec=8))
    with pytest.raises(ValueError, match="differ in their vocabularies"):
        Ensemble([lstm(0), other])


# -- transducers ---------------------------------------------------------------------------------------------


def transducer(seed: int, blank: float = 0.5, context: int = 0) -> TransducerG2P:
    """A small random transducer; `blank` added to the blank's bias (about as likely as a phoneme at 0.5);
    `context`: its prediction network's (0: an LSTM)."""
    torch.manual_seed(seed)
    model = TransducerG2P(TransducerConfig(n_chars=12, n_phonemes=9, emb=6, enc=10, enc_layers=1, pred=8,
                                           joint=8, pred_context=context)).double()
    with torch.no_grad():
        model.readout.bias[BLANK] += blank
    return model


class Lattice(ll.Module):
    """A transducer's log-probabilities over ``{batch, src, tgt + 1, phonemes}`` for the given phonemes: its
    training forward, up to the loss."""

    def __init__(self, model: TransducerG2P):
        super().__init__()
        self.model = model

    def forward(self, chars, phonemes, *, src: ll.Dim, tgt: ll.Dim):
        m = self.model
        pred, _ = m.predict(phonemes, tgt=tgt)
        return ll.log_softmax(m.joint(m.encode(chars, src=src), pred), axis=m.phonemes)


def path_log_prob(model: TransducerG2P, word: list[int], path: list[int]) -> float:
    """The log-probability of one alignment `path` (phonemes and blanks; a blank moves to the next character)
    of `word` under `model`."""
    phonemes = [s for s in path if s != BLANK]
    x, y = recipe.char_batch(model, [word]), recipe.phoneme_batch(model, [phonemes])
    with torch.no_grad():
        lp = ll.compile(Lattice(model), mode="eval")(x, y, src=SRC, tgt=TGT)
    lp = lp.align(ll.batch_dim, SRC, lp.dims[2], model.phonemes)[0]
    t = u = 0
    total = 0.0
    for s in path:
        total += float(lp[t, u, s])
        t, u = (t + 1, u) if s == BLANK else (t, u + 1)
    assert t == len(word)
    return total


@pytest.mark.parametrize("beam", [1, 4])
@pytest.mark.parametrize("context", [0, 2])
def test_one_transducer_given_twice_decodes_exactly_as_the_transducer_alone(beam, context):
    model = transducer(0, blank=0.0 if context else 0.5, context=context)   # (some blanks, some phonemes)
    alone = recipe.decode(model, WORDS, beam=beam)
    twice = recipe.decode(TransducerEnsemble([model, model]), WORDS, beam=beam)
    assert twice == alone
    assert any(len(phonemes) > 1 for nbest in alone for phonemes, _ in nbest)


@pytest.mark.parametrize("context", [0, 2])
def test_a_transducer_ensembles_alignment_scores_the_mean_of_its_members_log_probabilities(context):
    """(`context`: the second member's prediction network, an LSTM or the last two phonemes.)"""
    members = [transducer(1, blank=0.0), transducer(2, blank=0.0, context=context)]
    ensemble = TransducerEnsemble(members)
    search = ll.compile(ensemble, mode="search")
    with torch.no_grad():
        labels, scores, lengths, valid = search(recipe.char_batch(ensemble, WORDS), src=SRC, tgt=TGT, beam=1)
    (beam,) = [d for d in valid.dims if d is not ll.batch_dim]
    (steps,) = [d for d in labels.dims if d not in (ll.batch_dim, beam)]
    paths = labels.align(ll.batch_dim, beam, steps)[:, 0].tolist()
    n = lengths.align(ll.batch_dim, beam)[:, 0].tolist()
    got = scores.align(ll.batch_dim, beam)[:, 0].tolist()
    alone = [path_log_prob(members[0], w, p[:k]) for w, p, k in zip(WORDS, paths, n)]
    for word, path, k, score in zip(WORDS, paths, n, got):
        want = sum(path_log_prob(m, word, path[:k]) for m in members) / 2
        assert score == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert any(p[:k].count(BLANK) < k for p, k in zip(paths, n))   # (some phonemes among the blanks)
    assert alone != pytest.approx(got)   # (not one member's own scores)


def test_a_transducer_ensemble_only_searches_and_its_members_share_their_vocabularies():
    ensemble = TransducerEnsemble([transducer(0), transducer(1)])
    x, y = recipe.char_batch(ensemble, WORDS[:1]), recipe.phoneme_batch(ensemble, [[1, 2]])
    with pytest.raises(ValueError, match="only searches"):
        ll.compile(ensemble, mode="eval")(x, y, src=SRC, tgt=TGT)
    other = TransducerG2P(TransducerConfig(n_chars=12, n_phonemes=10, emb=6, enc=10, enc_layers=1, pred=8, joint=8))
    with pytest.raises(ValueError, match="differ in their vocabularies"):
        TransducerEnsemble([transducer(0), other])
