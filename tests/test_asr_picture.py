"""The picture of an utterance (looplift.recipes.asr.picture): what it shows is what the recognizer computes
(the best path of CTC, the transducer's Viterbi alignment, the attention weights, each against the reference
interpreter or the transcript), and it is written as a PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import looplift as ll
from looplift.recipes.asr import data, picture, recipe
from looplift.recipes.asr.features import num_frames
from looplift.recipes.asr.model import BLANK, Config, build, decode_text

pytest.importorskip("matplotlib")

#: the feature frames of the 0.6-second utterances, and the encoder's frames (a quarter, rounded up)
FEATURE_FRAMES = num_frames(int(0.6 * recipe.FEATURES.sample_rate), recipe.FEATURES)
FRAMES = -(-FEATURE_FRAMES // 4)
TINY = Config(n_mels=recipe.FEATURES.n_mels, conv=8, enc=8, enc_layers=1, dropout=0.0, emb=4, dec=6, joint=5,
              max_labels=2)


def noise_audio(seconds: float = 0.6, seed: int = 0) -> data.Audio:
    n = int(seconds * recipe.FEATURES.sample_rate)
    wave = (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3000).to(torch.int16)
    return data.Audio(wave, torch.tensor([0, n]), [data.Utterance("a b", "", 0, 0, None, 0)])


def tiny(decoder: str, seed: int = 0):
    torch.manual_seed(seed)
    return build(Config(**{**TINY.__dict__, "decoder": decoder}))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ctc_shows_the_best_path_whose_transcript_is_the_greedy_one(seed):
    model, audio = tiny("ctc", seed), noise_audio(seed=seed)
    p = picture.analyze(model, audio, 0)
    assert p.decoder == "ctc" and p.reference == "a b" and p.labels[0] == "∅"
    assert p.detail.shape == (model.labels.size, FRAMES)
    np.testing.assert_allclose(p.detail.sum(0), 1.0, rtol=1e-5)
    assert p.text == recipe.decode(model, audio)[0]
    assert "".join(c for _, c in p.emissions) == p.text
    best = p.detail.argmax(0)
    for t, c in p.emissions:
        assert p.labels[best[t]] == c and (t == 0 or best[t - 1] != best[t])
    assert p.spectrogram.shape == (recipe.FEATURES.n_mels, FEATURE_FRAMES) and FRAMES == 15


@pytest.mark.parametrize("seed", [0, 1])
def test_the_transducer_alignment_spells_the_recognized_transcript_frame_by_frame(seed):
    model, audio = tiny("rnnt", seed), noise_audio(seed=seed)
    p = picture.analyze(model, audio, 0, beam=2)
    assert p.text == recipe.decode(model, audio, beam=2)[0] and p.text
    frames, emitted = p.detail
    assert len(frames) == FRAMES + len(p.text)                         # a blank per frame and each character
    assert frames[0] == 0 and emitted[0] == 0 and frames[-1] == FRAMES - 1 and emitted[-1] == len(p.text)
    assert (np.diff(frames) >= 0).all() and (np.diff(emitted) >= 0).all()
    assert (np.diff(frames) + np.diff(emitted) == 1).all()           # one step: a blank or a character
    assert "".join(c for _, c in p.emissions) == p.text and p.labels[1:] == list(p.text)
    # the alignment is the reference interpreter's Viterbi alignment of that transcript
    x, y = recipe.features(model, audio, [0]), recipe.transcripts(model, [p.text])
    model.eval()
    ref = ll.compile(model, mode="eval").reference(x, y, align=True).tensor[0].tolist()
    got = [BLANK if b else 1 for b in np.diff(frames)] + [BLANK]
    assert [BLANK if s == BLANK else 1 for s in ref] == got
    assert decode_text([s for s in ref if s != BLANK]) == p.text


def test_the_attention_weights_are_the_reference_interpreters_for_the_recognized_transcript():
    model, audio = tiny("aed", 3), noise_audio(seed=3)
    p = picture.analyze(model, audio, 0, beam=2)
    assert p.text == recipe.decode(model, audio, beam=2)[0]
    steps = len(p.text) + 1
    assert p.detail.shape == (steps, FRAMES) and p.labels == [*p.text, "</s>"]
    np.testing.assert_allclose(p.detail.sum(1), 1.0, rtol=1e-5)
    model.eval()
    x, y = recipe.features(model, audio, [0]), recipe.transcripts(model, [p.text])
    ref = ll.compile(model, mode="eval").reference(x, y, attention=True)
    frames = [d for d in ref.dims if d not in (ll.batch_dim, y.dims[1])][0]
    want = ref.align(ll.batch_dim, y.dims[1], frames)[0].detach().numpy()
    np.testing.assert_allclose(p.detail, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decoder", ["ctc", "rnnt", "aed"])
def test_draw_writes_a_png(tmp_path, decoder):
    import matplotlib.image
    p = picture.analyze(tiny(decoder), noise_audio(), 0)
    path = tmp_path / f"{decoder}.png"
    picture.draw(p, str(path))
    image = matplotlib.image.imread(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 400 and image.shape[1] > 400
    assert image[..., :3].std() > 0.05                                # (not blank)
