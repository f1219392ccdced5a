"""Training support: checkpoints and the training driver."""

from .checkpoint import load, save
from .driver import Trainer, bucketed_batches, load_model

__all__ = ["load", "save", "Trainer", "bucketed_batches", "load_model"]
