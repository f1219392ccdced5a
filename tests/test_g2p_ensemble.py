"""An ensemble of G2P models (looplift.recipes.g2p.ensemble): one model given twice decodes exactly as that
model alone; two different models (an attention LSTM and a Transformer) score each hypothesis with the mean
of their own log-likelihoods of it."""

from __future__ import annotations

import pytest
import torch

import looplift as ll
from looplift.recipes.g2p import recipe
from looplift.recipes.g2p.ensemble import Ensemble
from looplift.recipes.g2p.model import G2P, Config
from looplift.recipes.g2p.recipe import SRC, TGT
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
