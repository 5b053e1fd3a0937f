"""Atomic checkpoints that load without running code, carry a digest, and the RNG state.

``save_checkpoint`` writes to a temporary file in the destination directory, flushes it to
disk, then renames it over the destination (``os.replace`` is atomic on POSIX and Windows), so
an interrupted write leaves the previous checkpoint intact. ``load_checkpoint`` uses
``torch.load(..., weights_only=True)``: only tensors and plain containers/numbers/strings can
come back, so a checkpoint from an untrusted source cannot execute code. Everything we store is
therefore kept to those types (RNG states as uint8 tensors, configs as dicts).

Every checkpoint also carries a SHA-256 digest of its whole content (each tensor's dtype, shape
and bytes, and the plain values, in a fixed order), checked on load: a flipped bit in a weight,
which ``torch.load`` reads without complaint, is refused. The digest guards against corruption
and mix-ups, not against a forger (anyone can recompute it), so values that reach file names
are still checked ([`checkpoint_step`][discretelik.train.checkpoint_step]).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._io import atomic_write

__all__ = [
    "capture_rng_state",
    "check_finite_tensors",
    "checkpoint_digest",
    "checkpoint_step",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

# The key under which save_checkpoint stores the digest; it is left out of the digest itself.
DIGEST_KEY = "digest"
_DIGEST_PREFIX = "sha256:"


def _feed(h: Any, value: Any, where: str) -> None:
    """Add ``value`` to the hash ``h``: a type tag, then the value, containers recursively."""
    if isinstance(value, Tensor):
        t = value.detach()
        h.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
        t = t.cpu().contiguous().reshape(-1)
        if t.numel():
            # The raw bytes, whatever the dtype (bfloat16 has no numpy type: view as bytes).
            h.update(memoryview(t.view(torch.uint8).numpy()))
    elif isinstance(value, Mapping):
        # Sorted by (key type, key text): int keys (optimiser state) and str keys both order.
        items = sorted(value.items(), key=lambda kv: (type(kv[0]).__name__, repr(kv[0])))
        h.update(f"D{len(items)}|".encode())
        for k, v in items:
            _feed(h, k, where)
            _feed(h, v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}|".encode())
        for i, v in enumerate(value):
            _feed(h, v, f"{where}[{i}]")
    elif value is None or isinstance(value, (bool, int, float, str, bytes)):
        text = repr(value).encode()
        h.update(f"{type(value).__name__}{len(text)}|".encode() + text)
    elif isinstance(value, (torch.dtype, torch.device)):
        h.update(f"{type(value).__name__}|{value}|".encode())
    else:
        raise TypeError(
            f"checkpoint entry {where} has type {type(value).__name__}: only tensors, "
            "mappings, lists/tuples, numbers, strings, bytes, None, dtypes and devices can be "
            "stored (what torch.load(weights_only=True) reads back)"
        )


def checkpoint_digest(state: Mapping[str, Any]) -> str:
    """The digest ``"sha256:<hex>"`` of a checkpoint mapping (its ``"digest"`` entry left out).

    Args:
        state: What [`save_checkpoint`][discretelik.train.save_checkpoint] writes.

    Returns:
        SHA-256 over every tensor's dtype, shape and bytes and every plain value, mapping keys
        in sorted order, so equal content gives an equal digest on any device.

    Raises:
        TypeError: An entry is not a tensor or a plain value.
    """
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != DIGEST_KEY}, "state")
    return _DIGEST_PREFIX + h.hexdigest()


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` and its digest with ``torch.save`` atomically (temp file, fsync, rename).

    Args:
        state: A mapping of tensors, state dicts and plain Python values (what
            ``weights_only=True`` can load back). Its ``"digest"`` entry, if any, is replaced by
            [`checkpoint_digest`][discretelik.train.checkpoint_digest]'s.
        path: Destination file; its directory is created if needed.

    Returns:
        The path written.

    Raises:
        TypeError: ``state`` is not a mapping, or holds a value that is not a tensor or a
            plain value (nothing is written).
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping, got {type(state).__name__}")
    state = dict(state)
    state[DIGEST_KEY] = checkpoint_digest(state)
    return atomic_write(path, lambda fh: torch.save(state, fh))


def load_checkpoint(
    path: str | os.PathLike[str],
    map_location: str | torch.device | None = "cpu",
    verify: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint written by [`save_checkpoint`][discretelik.train.save_checkpoint].

    Args:
        path: The checkpoint file.
        map_location: Where tensors go (default CPU; state dicts are copied onto the model's
            device by ``load_state_dict``).
        verify: Check the stored digest against the content (default). ``False`` also loads
            files without one (e.g. from other tools); they are still loaded with
            ``weights_only=True``.

    Returns:
        The saved mapping (with its ``"digest"`` entry).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file is not a checkpoint (truncated, garbage), holds objects other
            than tensors and plain values (refused by ``weights_only=True``), has no digest, or
            its content does not match its digest (corrupted or modified); the message names
            the file.
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
    if verify:
        stored = state.get(DIGEST_KEY)
        if not isinstance(stored, str) or not stored.startswith(_DIGEST_PREFIX):
            raise ValueError(
                f"{path}: the checkpoint has no integrity digest (not written by "
                "discretelik.train.save_checkpoint, or by a version before digests); "
                "load_checkpoint(..., verify=False) loads it unchecked"
            )
        try:
            actual = checkpoint_digest(state)
        except TypeError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        if actual != stored:
            raise ValueError(
                f"{path}: the checkpoint is corrupted or was modified: its content does not "
                f"match its digest (stored {stored[:23]}..., computed {actual[:23]}...)"
            )
    return state


def checkpoint_step(state: Mapping[str, Any], path: str | os.PathLike[str] | None = None) -> int:
    """The checkpoint's ``step`` entry, checked to be an int ``>= 0``.

    The step goes into file names (sample grids); checkpoint content is never trusted for that.

    Raises:
        ValueError: ``step`` is missing or not a non-negative int (the message names ``path``).
    """
    where = f"{path}: " if path is not None else ""
    if "step" not in state:
        raise ValueError(f"{where}the checkpoint has no 'step' entry")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{where}the checkpoint's step must be an int >= 0, got {step!r:.80}")
    return step


def check_finite_tensors(tensors: Iterable[tuple[str, Tensor]], what: str) -> None:
    """Raise ``ValueError`` naming the first floating tensor with a NaN or an infinity.

    Args:
        tensors: ``(name, tensor)`` pairs, e.g. ``state_dict().items()``.
        what: How the message calls them, e.g. ``"model weights of run/checkpoint.pt"``.

    Raises:
        ValueError: A floating-point tensor holds a non-finite value.
    """
    named = [(n, t) for n, t in tensors if isinstance(t, Tensor) and t.is_floating_point()]
    if not named:
        return
    # One reduction per tensor but a single device-to-host read for all of them.
    ok = torch.stack([torch.isfinite(t).all() for _, t in named]).cpu()
    if not bool(ok.all()):
        name = named[int((~ok).nonzero()[0, 0])][0]
        raise ValueError(f"{what}: {name!r} holds non-finite values (NaN or infinity)")


def state_dict_mismatch(exc: BaseException) -> str:
    """``load_state_dict``'s multi-line error as one line: the first two problems, shortened."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    problems = lines[1:] or lines  # the first line is "Error(s) in loading state_dict for X:"
    text = "; ".join(p if len(p) <= 300 else p[:297] + "..." for p in problems[:2])
    return text + (f" (and {len(problems) - 2} more)" if len(problems) > 2 else "")


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
