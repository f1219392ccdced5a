"""Log-mel features of a batch of waveforms, with the number of frames of each.

Frames of ``win`` samples every ``hop`` samples, without centering: a waveform
of ``n`` samples has ``1 + (n - win) // hop`` frames (none if ``n < win``). Each
frame is weighted by a periodic Hann window, its power spectrum (an FFT of
``win`` points, by ``torch.stft``) is mapped to ``n_mels``
triangular filters, even on the HTK mel scale ``2595 * log10(1 + f / 700)``
from 0 Hz to half the sample rate, and the result is ``log(energy + 1e-6)``.
"""

from __future__ import annotations

import torch

__all__ = ["FeatureConfig", "mel_filterbank", "log_mel", "num_frames", "duration"]


class FeatureConfig:
    """The feature extraction's settings: `sample_rate` (Hz), `n_mels`, the window and hop in milliseconds."""

    def __init__(self, sample_rate: int = 22050, n_mels: int = 80, win_ms: float = 25.0, hop_ms: float = 10.0):
        self.sample_rate, self.n_mels = sample_rate, n_mels
        self.win = round(sample_rate * win_ms / 1000)
        self.hop = round(sample_rate * hop_ms / 1000)
        self.n_fft = self.win


def _hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def _mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``(n_fft // 2 + 1, n_mels)`` matrix of triangular filters: filter m rises from the (m)-th to the
    (m + 1)-th of ``n_mels + 2`` points even on the mel scale and falls to the (m + 2)-th."""
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    points = _mel_to_hz(torch.linspace(0, _hz_to_mel(torch.tensor(sample_rate / 2.0, dtype=torch.float64)).item(),
                                       n_mels + 2,
                                       dtype=torch.float64))
    lower, center, upper = points[:-2], points[1:-1], points[2:]
    rising = (freqs[:, None] - lower) / (center - lower)
    falling = (upper - freqs[:, None]) / (upper - center)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).to(dtype)


def num_frames(samples: torch.Tensor | int, config: FeatureConfig) -> torch.Tensor | int:
    """The number of frames of waveforms of `samples` samples (a tensor of lengths, or an int)."""
    if isinstance(samples, int):
        return 0 if samples < config.win else 1 + (samples - config.win) // config.hop
    return torch.where(samples < config.win, torch.zeros_like(samples),
                       1 + torch.div(samples - config.win, config.hop, rounding_mode="floor"))


def log_mel(waves: torch.Tensor, lengths: torch.Tensor, config: FeatureConfig | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, frames)``: the log-mel features ``(batch, frame, n_mels)`` of the float waveforms
    ``(batch, sample)`` (padded; `lengths` samples each) and the number of frames of each. Frames past an
    entry's own count are zeros."""
    config = config or FeatureConfig()
    if waves.dim() != 2 or lengths.shape != waves.shape[:1]:
        raise ValueError(f"log_mel takes waveforms (batch, sample) and one length each, got {tuple(waves.shape)} "
                         f"and {tuple(lengths.shape)}")
    frames = num_frames(lengths, config)
    longest = num_frames(waves.shape[1], config)
    if longest == 0:
        return waves.new_zeros(waves.shape[0], 0, config.n_mels), frames
    window = torch.hann_window(config.win, periodic=True, dtype=waves.dtype, device=waves.device)
    spectrum = torch.stft(waves, config.n_fft, hop_length=config.hop, win_length=config.win, window=window,
                          center=False, return_complex=True)           # (batch, freq, frame)
    power = spectrum.real.square() + spectrum.imag.square()
    fbank = mel_filterbank(config.n_fft, config.n_mels, config.sample_rate, waves.dtype).to(waves.device)
    feats = torch.log(power.transpose(1, 2) @ fbank + 1e-6)[:, :longest]
    valid = torch.arange(longest, device=waves.device)[None, :] < frames[:, None]
    return feats * valid[..., None], frames


def duration(frames: int, config: FeatureConfig) -> float:
    """Seconds of speech behind `frames` frames."""
    return 0.0 if frames == 0 else (config.win + (frames - 1) * config.hop) / config.sample_rate
