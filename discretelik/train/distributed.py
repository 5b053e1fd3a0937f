"""Thin helpers over ``torch.distributed`` for runs launched with ``torchrun``.

We do not launch processes ourselves: ``torchrun --nproc_per_node=N script.py`` (or
``python -m torch.distributed.run``; multi-node with ``--nnodes``/``--rdzv-endpoint``) sets
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``, and
[`init_distributed`][discretelik.train.init_distributed] reads them. Without those variables
everything runs as a single process and every helper here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DistInfo",
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "cleanup_distributed",
    "init_distributed",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the run.

    Attributes:
        rank: Global rank ``0 .. world_size - 1``.
        world_size: Number of processes.
        local_rank: Rank on this node (selects the GPU).
        device: This process's device.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on rank 0, which writes logs, checkpoints and sample grids."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one process is active."""
        return self.world_size > 1


def init_distributed(device: str | torch.device | None = None, backend: str | None = None) -> DistInfo:
    """Join the process group set up by ``torchrun`` (if any) and pick this process's device.

    Args:
        device: ``"cuda"``, ``"cpu"``, ``"cuda:1"``... or ``None`` for CUDA when available. With
            a bare ``"cuda"`` each process takes GPU ``LOCAL_RANK``.
        backend: Process-group backend; default NCCL on CUDA, gloo on CPU.

    Returns:
        This process's [`DistInfo`][discretelik.train.DistInfo].

    Raises:
        ValueError: ``device`` is not a CPU or CUDA device, or asks for CUDA but none is
            available.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:  # torch's message lists 20 device types
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if device.type not in ("cpu", "cuda"):
        # The trainer (fused Adam, autocast, synchronisation, RNG states) knows these two.
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {str(device)!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        kwargs: dict[str, Any] = {"backend": backend}
        if backend == "nccl":
            kwargs["device_id"] = device  # binds the communicator to our GPU up front
        try:
            dist.init_process_group(**kwargs)
        except TypeError:  # torch < 2.3-ish without device_id
            kwargs.pop("device_id", None)
            dist.init_process_group(**kwargs)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def cleanup_distributed() -> None:
    """Destroy the process group if one was created."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all processes in place (identity in a single process); returns it."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Gather one picklable object from every process, in rank order (``[obj]`` if alone)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if _active():
        dist.barrier()
