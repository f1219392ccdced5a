"""Training support: checkpoints."""

from .checkpoint import load, save

__all__ = ["load", "save"]
