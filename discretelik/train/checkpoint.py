"""Atomic checkpoints that load without running code, and the RNG state they carry.

``save_checkpoint`` writes to a temporary file in the destination directory, flushes it to
disk, then renames it over the destination (``os.replace`` is atomic on POSIX and Windows), so
an interrupted write leaves the previous checkpoint intact. ``load_checkpoint`` uses
``torch.load(..., weights_only=True)``: only tensors and plain containers/numbers/strings can
come back, so a checkpoint from an untrusted source cannot execute code. Everything we store is
therefore kept to those types (RNG states as uint8 tensors, configs as dicts).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ._io import atomic_write

__all__ = ["capture_rng_state", "load_checkpoint", "restore_rng_state", "save_checkpoint"]


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` with ``torch.save`` atomically (temp file, fsync, rename).

    Args:
        state: A mapping of tensors, state dicts and plain Python values (what
            ``weights_only=True`` can load back).
        path: Destination file; its directory is created if needed.

    Returns:
        The path written.

    Raises:
        TypeError: ``state`` is not a mapping.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping, got {type(state).__name__}")
    return atomic_write(path, lambda fh: torch.save(dict(state), fh))


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device | None = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint written by [`save_checkpoint`][discretelik.train.save_checkpoint].

    Args:
        path: The checkpoint file.
        map_location: Where tensors go (default CPU; state dicts are copied onto the model's
            device by ``load_state_dict``).

    Returns:
        The saved mapping.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file is not a checkpoint or holds objects other than tensors and plain
            values (refused by ``weights_only=True``); the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    # Garbage bytes make torch's weights-only unpickler raise many types (UnpicklingError,
    # RuntimeError, EOFError, but also KeyError, IndexError, struct.error...).
    except Exception as exc:
        raise ValueError(
            f"{path}: not a loadable checkpoint with weights_only=True "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(state).__name__}")
    return state


def capture_rng_state(device: torch.device | str | None = None) -> dict[str, Any]:
    """The global torch RNG states that training consumes (dropout), as plain tensors.

    Args:
        device: The training device; for a CUDA device its generator state is included.

    Returns:
        ``{"cpu": uint8 tensor, "cuda": uint8 tensor or None}``. Python's ``random`` and numpy's
        global RNG are not included: nothing in the training loop draws from them.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def restore_rng_state(state: Mapping[str, Any], device: torch.device | str | None = None) -> None:
    """Restore what [`capture_rng_state`][discretelik.train.capture_rng_state] returned.

    Args:
        state: ``{"cpu": uint8 tensor, "cuda": uint8 tensor or None}``.
        device: The training device; its CUDA generator is restored when both are CUDA.

    Raises:
        ValueError: ``state`` lacks the ``"cpu"`` entry.
    """
    if "cpu" not in state:
        raise ValueError(f"state must have a 'cpu' RNG entry, got keys {sorted(state)}")
    torch.set_rng_state(state["cpu"].cpu())
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
