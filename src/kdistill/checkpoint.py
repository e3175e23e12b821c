"""Crash-safe writing and safe reading of weights and training checkpoints.

Writes go to a temporary file in the same directory, are fsynced, then renamed
over the target (atomic on POSIX), and the directory is fsynced: a crash leaves
either the old file or the new one, never a torn one. Reads use safetensors or
``torch.load(weights_only=True)``, which refuses to unpickle anything but
tensors and plain containers.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kdistill import faults
from kdistill.errors import CheckpointError


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(temporary_path)``, then move the result onto ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    try:
        write(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        faults.reached("checkpoint")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def remove_stale_temporaries(directory: str | Path) -> None:
    """Delete temporary files that a crash in :func:`atomic_write` left behind."""
    for stale in Path(directory).glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def save_weights(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write a state dict as safetensors, atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    atomic_write(path, lambda temporary: save_file(tensors, temporary))


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Write a training checkpoint (tensors, numbers, strings, lists, dicts), atomically."""
    atomic_write(path, lambda temporary: torch.save(payload, temporary))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint with ``weights_only=True``."""
    payload = _torch_load(Path(path))
    if not isinstance(payload, dict) or "format" not in payload:
        raise CheckpointError(f"{path}: not a kdistill training checkpoint")
    return payload


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a ``torch.save``-d dict of tensors.

    A file that holds ``{"state_dict": ...}`` or ``{"model": ...}`` (common checkpoint
    layouts) yields the inner dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path}: not a readable safetensors file ({error}); is it truncated?") from None
    state = _torch_load(path)
    for key in ("state_dict", "model", "student"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict)")
    return state


def _torch_load(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():  # torch notes foreign pickle protocols; we refuse or accept either way
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "unsafe content"
        raise CheckpointError(
            f"{path}: refused to load: it holds Python objects other than tensors "
            f"(loading uses weights_only=True and never runs code from a file): {first}"
        ) from None
    except (EOFError, RuntimeError, OSError, ValueError, KeyError) as error:
        raise CheckpointError(
            f"{path}: cannot read the checkpoint ({type(error).__name__}); is it truncated?"
        ) from None
