"""The acoustic encoder: convolutional subsampling by 4, then a bidirectional LSTM.

The subsampling is two 1-D convolutions of stride 2 over time (kernel 3,
``padding="same"``, ReLU), so its output dim is derived from the input's:
``frames.ceildiv(2).ceildiv(2)``, that is ``ceil(T / 4)`` per entry, with each
entry's frames past its own length zeroed before every convolution, as the
sequence alone would see them.
"""

from __future__ import annotations

import looplift as ll
from looplift import nn

__all__ = ["Subsampling", "Encoder"]


class Subsampling(ll.Module):
    """``(x, axis) -> (y, axis // 4)``: features over `in_dim` to `out_dim`, 4 times fewer frames."""

    def __init__(self, in_dim: ll.Dim, out_dim: ll.Dim, *, kernel: int = 3):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.mid_dim = ll.Dim(f"{out_dim.name}_1", out_dim.size)
        self.conv1 = nn.Conv1d(in_dim, self.mid_dim, kernel, stride=2)
        self.conv2 = nn.Conv1d(self.mid_dim, out_dim, kernel, stride=2)

    def forward(self, x, *, axis: ll.Dim):
        h = ll.relu(self.conv1(x, axis=axis))
        return ll.relu(self.conv2(h, axis=axis.ceildiv(2))), axis.ceildiv(2).ceildiv(2)


class Encoder(ll.Module):
    """Log-mel features over (batch, frames, `feat`) to encodings over (batch, frames // 4, `enc`)."""

    def __init__(self, feat: ll.Dim, enc: ll.Dim, *, conv: int = 256, layers: int = 2, dropout: float = 0.0):
        super().__init__()
        self.conv_dim, self.enc_dim = ll.Dim("conv", conv), enc
        self.subsampling = Subsampling(feat, self.conv_dim)
        self.lstm = nn.LSTM(self.conv_dim, enc, bidirectional=True, num_layers=layers, dropout=dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, feats, *, frames: ll.Dim):
        x, time = self.subsampling(feats, axis=frames)
        enc, _ = self.lstm(self.dropout(x), axis=time)
        return enc, time
