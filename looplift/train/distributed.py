"""Data parallel over ``torchrun``: the process group, and the module DistributedDataParallel wraps."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["LossOfModel", "init_distributed"]

LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, int | float | torch.Tensor]]


class LossOfModel(torch.nn.Module):
    """What DDP wraps: ``forward(batch)`` is ``loss_fn(model, batch)``, however `loss_fn` uses the parameters."""

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any):
        return self.loss_fn(self.model, batch)


def init_distributed(model: torch.nn.Module) -> tuple[int, int]:
    """(rank, world size), initializing the process group when the environment asks for more than one process."""
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()
