"""Modules: parameters created in ``__init__`` with explicit dims, called on symbolic tensors."""

from .conv import Conv1d
from .dropout import Dropout
from .embedding import Embedding
from .feed_forward import FeedForward
from .linear import Linear
from .norm import LayerNorm
from .rnn import GRU, LSTM, LstmState

__all__ = ["Conv1d", "Dropout", "Embedding", "FeedForward", "Linear", "LayerNorm", "LSTM", "GRU", "LstmState"]
