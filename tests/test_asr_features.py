"""The speech recipe's features and subsampling: log-mel features equal a straightforward numpy computation,
padding changes nothing, and the subsampled lengths are ``ceil(T / 4)`` for every input length, with values
equal to the same convolutions on each sequence alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import looplift as ll
from looplift.recipes.asr.encoder import Subsampling
from looplift.recipes.asr.features import FeatureConfig, duration, log_mel, mel_filterbank, num_frames

CONFIG = FeatureConfig(sample_rate=16000, n_mels=40, win_ms=25.0, hop_ms=10.0)


def numpy_log_mel(wave: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """The textbook computation, frame by frame, with its own filterbank."""
    win, hop, n_mels, rate = config.win, config.hop, config.n_mels, config.sample_rate
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)    # periodic Hann
    n_bins = win // 2 + 1
    bin_hz = np.arange(n_bins) * rate / win
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)  # noqa: E731
    edges = hz(np.linspace(0.0, mel(rate / 2), n_mels + 2))
    fbank = np.zeros((n_bins, n_mels))
    for m in range(n_mels):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        for k, f in enumerate(bin_hz):
            if lo <= f <= mid:
                fbank[k, m] = (f - lo) / (mid - lo)
            elif mid < f <= hi:
                fbank[k, m] = (hi - f) / (hi - mid)
    out = []
    for start in range(0, len(wave) - win + 1, hop):
        power = np.abs(np.fft.rfft(wave[start:start + win] * window)) ** 2
        out.append(np.log(power @ fbank + 1e-6))
    return np.array(out).reshape(-1, n_mels)


def test_log_mel_equals_the_numpy_computation_for_each_entry_of_a_padded_batch():
    rng = np.random.default_rng(0)
    lengths = [4000, 2500, 399, 400, 0]
    waves = np.zeros((len(lengths), max(lengths)))
    for i, n in enumerate(lengths):
        waves[i, :n] = rng.standard_normal(n) * 0.1
        waves[i, n:] = 7.0                                   # padding: must change nothing
    feats, frames = log_mel(torch.tensor(waves), torch.tensor(lengths), CONFIG)
    for i, n in enumerate(lengths):
        want = numpy_log_mel(waves[i, :n], CONFIG)
        assert int(frames[i]) == len(want) == num_frames(n, CONFIG)
        np.testing.assert_allclose(feats[i, :len(want)].numpy(), want, rtol=1e-9, atol=1e-9)
        assert torch.all(feats[i, len(want):] == 0)


def test_the_filterbank_is_triangles_even_on_the_mel_scale():
    fb = mel_filterbank(CONFIG.n_fft, CONFIG.n_mels, CONFIG.sample_rate, torch.float64)
    assert fb.shape == (CONFIG.n_fft // 2 + 1, CONFIG.n_mels)
    assert torch.all(fb >= 0) and torch.all(fb <= 1)
    peaks = fb.argmax(0)
    assert torch.all(peaks[1:] >= peaks[:-1])                # the filters' centres rise with m
    assert torch.all(fb.sum(0) > 0)                          # every filter sees some bin


@pytest.mark.parametrize("n", [0, 1, 399, 400, 401, 559, 560, 561, 16000])
def test_num_frames_and_duration(n):
    frames = num_frames(n, CONFIG)
    assert frames == (0 if n < 400 else 1 + (n - 400) // 160)
    assert int(num_frames(torch.tensor([n]), CONFIG)[0]) == frames
    assert duration(frames, CONFIG) <= n / CONFIG.sample_rate


def test_subsampling_lengths_are_ceil_quarter_for_every_length_and_values_equal_each_sequence_alone():
    torch.manual_seed(0)
    B, T, F_, C = ll.batch_dim, ll.Dim("frames"), ll.Dim("feat", 5), ll.Dim("conv", 6)
    sub = Subsampling(F_, C).double()
    lengths = torch.arange(0, 42)
    x = torch.randn(len(lengths), int(lengths.max()), 5, dtype=torch.float64)

    def model(feats):
        y, time = sub(feats, axis=T)
        return y, ll.length(time)

    y, n = ll.compile(model, mode="eval")(ll.Named(x, (B, T, F_), {T: lengths}))
    quarter = [d for d in y.dims if d not in (B, C)][0]
    assert n.tensor.tolist() == [math.ceil(k / 4) for k in lengths.tolist()]
    out = y.align(B, quarter, C)
    w1, b1, w2, b2 = (p.detach() for p in (sub.conv1.weight, sub.conv1.bias, sub.conv2.weight, sub.conv2.bias))
    for i, k in enumerate(lengths.tolist()):
        alone = x[i, :k].T[None]
        h = F.relu(F.conv1d(F.pad(alone, (1, 1)), w1, b1, stride=2))[..., :math.ceil(k / 2)] if k else alone
        want = F.relu(F.conv1d(F.pad(h, (1, 1)), w2, b2, stride=2))[..., :math.ceil(k / 4)] if k else h
        torch.testing.assert_close(out[i, :math.ceil(k / 4)], want[0].T.reshape(-1, 6), rtol=1e-10, atol=1e-10)
