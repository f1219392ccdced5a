"""What a training checkpoint holds besides the model, and reading its model part back.

A checkpoint is one safetensors file: the model's entries under their plain
names, and under the ``trainer/`` prefix (which a module name cannot start
with) the optimizer, scheduler and RNG states, encoded here as tensors plus
JSON metadata.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import safe_open

from ..errors import CheckpointError, entry_point
from .checkpoint import copy_into, mismatches

__all__ = ["load_model"]

LAST_CHECKPOINT = "last.safetensors"
MODEL_FILE = "model.safetensors"
BEST_FILE = "best.safetensors"      # the model at its best evaluation (Trainer(keep_best=...))
AVERAGE_FILE = "average.safetensors"   # the mean of the models at the last epochs' ends (Trainer(average_last=...))
EPOCHS_DIR = "epochs"      # the models at the epochs' ends that the average is made of
PREFIX = "trainer/"        # names and metadata keys of everything in a checkpoint that is not the model
FORMAT = "1"


def class_name(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


# -- model entries --------------------------------------------------------------------------------

@entry_point(name="looplift.train.load_model")
def load_model(model: torch.nn.Module, path: str | os.PathLike) -> dict[str, str]:
    """Load the model's parameters from `path`, a training checkpoint or a model-only file; return its metadata.

    Entries under ``trainer/`` (optimizer, scheduler, RNG states) are
    ignored; the others must match the model exactly, as for
    ``looplift.load``. Returns the user metadata stored with them.

    Raises:
        CheckpointError: the file is unreadable or its model entries do not
            match: every missing, unexpected and mis-shaped entry is listed.
            Nothing is changed then.
    """
    path = os.fspath(path)
    tensors, metadata = read_file(path)
    problems = mismatches(model, {k: v for k, v in tensors.items() if not k.startswith(PREFIX)})
    if problems:
        raise CheckpointError(f"the checkpoint {path!r} does not match the model ({len(problems)} problems):\n  "
                              + "\n  ".join(problems))
    copy_into(model, tensors)
    return {k: v for k, v in metadata.items() if not k.startswith(PREFIX)}


def read_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises plain errors for some corrupt files
        raise CheckpointError(f"cannot read the checkpoint {path!r}: {type(e).__name__}: {e}") from e


# -- state that is not the model: tensors as entries, the rest as JSON ----------------------------

def encode(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` as JSON, its tensors moved into `tensors` under names from `name` and the path to them.

    Dicts become ``{"dict": [[key, value], ...]}`` (keys may be ints),
    tuples ``{"tuple": [...]}``, tensors ``{"tensor": entry name}``; lists,
    numbers, strings and None stay as they are.
    """
    if isinstance(value, torch.Tensor):
        if name in tensors:
            raise CheckpointError(f"two values would be stored as the checkpoint entry {name!r}")
        tensors[name] = value.detach().to("cpu").contiguous()
        return {"tensor": name}
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, (str, int, float, bool, type(None)))]
        if bad:
            raise CheckpointError(f"cannot store {name!r}: its keys {bad!r} are not numbers or strings")
        return {"dict": [[k, encode(v, f"{name}/{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"tuple": [encode(v, f"{name}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, f"{name}/{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise CheckpointError(f"cannot store {name!r}: a {type(value).__name__} (a checkpoint holds tensors, numbers, "
                          f"strings, None, and lists, tuples and dicts of them)")


def decode(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [decode(v, tensors) for v in value]
    if isinstance(value, dict):
        (tag, body), = value.items()
        if tag == "tensor":
            return tensors[body]
        if tag == "tuple":
            return tuple(decode(v, tensors) for v in body)
        if tag == "dict":
            return {k: decode(v, tensors) for k, v in body}
        raise ValueError(f"unknown tag {tag!r}")
    return value


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "python": random.getstate()}


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
