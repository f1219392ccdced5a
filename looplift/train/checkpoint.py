"""Checkpoints: a model's parameters by name, in safetensors files, written atomically.

Names are the model's ``named_parameters()`` / ``named_buffers()`` names: the
attribute chain from the root module, a shared parameter once under its first
name. A save writes a temporary file beside the target, flushes it to disk and
renames it over the target, so an interrupted save leaves the previous file
intact. A load checks everything first and changes nothing unless the file
matches the model exactly.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as _save_bytes

from ..errors import ArgumentError, CheckpointError, CheckpointWriteError, entry_point

__all__ = ["save", "load", "state_of", "cpu_state", "atomic_write", "mismatches", "copy_into"]


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors saved for `model`: its parameters and persistent buffers, each under one name."""
    state = dict(model.named_parameters())
    non_persistent = {f"{prefix}{'.' if prefix else ''}{name}" for prefix, m in model.named_modules()
                      for name in getattr(m, "_non_persistent_buffers_set", ())}
    state.update({k: v for k, v in model.named_buffers() if k not in non_persistent})
    return state


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """:func:`state_of` `model`, detached, on the CPU and contiguous: what a checkpoint file holds."""
    return {name: t.detach().to("cpu").contiguous() for name, t in state_of(model).items()}


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the complete new one."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _new_file_mode())  # mkstemp makes it 0600; give what open() would
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _new_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: 0o666 less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@entry_point(name="looplift.save")
def save(model: torch.nn.Module, path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None) -> None:
    """Save the parameters and buffers of `model` to the safetensors file `path`, atomically.

    Raises:
        CheckpointWriteError: the file cannot be written (an ``OSError``); a file it would replace is kept.
    """
    _check_arguments("save", model, path)
    if metadata is not None and (not isinstance(metadata, Mapping) or
                                 not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise ArgumentError(f"save: metadata must map strings to strings, got {metadata!r}")
    tensors = cpu_state(model)
    try:
        atomic_write(path, _save_bytes(tensors, metadata=dict(metadata) if metadata else None))
    except OSError as e:
        error = CheckpointWriteError(f"cannot write the checkpoint {os.fspath(path)!r}: {e.strerror or e}"
                                     + _why_not_written(path))
        error.errno, error.strerror, error.filename = e.errno, e.strerror, e.filename
        raise error from e


def _why_not_written(path) -> str:
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        return " (it is a folder: give a file name, e.g. model.safetensors)"
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        return f" ({parent!r} is a file, not a folder)"
    return ""


def _check_arguments(op: str, model, path) -> None:
    if isinstance(model, (str, os.PathLike)) and isinstance(path, torch.nn.Module):
        raise ArgumentError(f"{op} takes the model first: looplift.{op}(model, path)")
    if isinstance(model, Mapping):
        raise ArgumentError(f"{op} takes the model itself, not its state_dict: looplift.{op}(model, path)")
    if isinstance(model, type):
        raise ArgumentError(f"{op} takes a model, not the class {model.__name__}: looplift.{op}("
                            f"{model.__name__}(...), path)")
    if not isinstance(model, torch.nn.Module):
        raise ArgumentError(f"{op} takes a looplift.Module (or torch.nn.Module), got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentError(f"{op}: path must be a file name (str or os.PathLike), got {type(path).__name__}")


@entry_point(name="looplift.load")
def load(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load the safetensors file `path` into `model` (in place, keeping each tensor's device and dtype).

    Raises:
        CheckpointError: the file is missing or unreadable, or its entries do
            not match the model: every missing, unexpected and mis-shaped
            entry is listed. Nothing is changed then.
    """
    _check_arguments("load", model, path)
    try:
        loaded = load_file(os.fspath(path))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read the checkpoint {os.fspath(path)!r}: {e}") from e
    except Exception as e:  # safetensors raises plain errors for some corrupt headers
        raise CheckpointError(f"cannot read the checkpoint {os.fspath(path)!r}: {type(e).__name__}: {e}") from e
    problems = mismatches(model, loaded)
    if problems:
        raise CheckpointError(f"the checkpoint {os.fspath(path)!r} does not match the model "
                              f"({len(problems)} problems):\n  " + "\n  ".join(problems))
    copy_into(model, loaded)


def mismatches(model: torch.nn.Module, loaded: Mapping[str, torch.Tensor]) -> list[str]:
    """Every entry of `loaded` missing for `model`, unexpected by it, or of another shape, described."""
    expected = state_of(model)
    problems = [f"missing: {name} (shape {tuple(expected[name].shape)})"
                for name in sorted(expected.keys() - loaded.keys())]
    problems += [f"unexpected: {name} (shape {tuple(loaded[name].shape)})"
                 for name in sorted(loaded.keys() - expected.keys())]
    problems += [f"mis-shaped: {name}: the checkpoint has {tuple(loaded[name].shape)}, the model "
                 f"{tuple(expected[name].shape)}" for name in sorted(expected.keys() & loaded.keys())
                 if tuple(expected[name].shape) != tuple(loaded[name].shape)]
    return problems


def copy_into(model: torch.nn.Module, loaded: Mapping[str, torch.Tensor]) -> None:
    """Copy the entries of `loaded` (matching, see :func:`mismatches`) into `model`'s tensors in place."""
    with torch.no_grad():
        for name, t in state_of(model).items():
            t.copy_(loaded[name])
