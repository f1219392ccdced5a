"""Training support: checkpoints, batches and the training driver."""

from .batches import bucketed_batches
from .checkpoint import load, save
from .driver import Trainer
from .trainer_state import load_model

__all__ = ["load", "save", "Trainer", "bucketed_batches", "load_model"]
