"""Random index batches over a training set that stays on the device, sharded by DDP rank.

[`RandomBatches`][discretelik.train.RandomBatches] draws index batches for a uint8 image tensor
that stays on the device (no DataLoader workers): one permutation per epoch from a seeded
generator, the global batch split into one shard per DDP rank.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from .._checks import check_int

__all__ = ["RandomBatches"]


class RandomBatches:
    """An endless stream of random index batches, one permutation per epoch, sharded by rank.

    Epoch ``e`` uses ``randperm(num_items)`` from a generator seeded with ``(seed, e)``, so the
    whole order is a function of ``(seed, epoch, index)`` and the state to resume is two ints.
    Each step takes the next ``batch_size * world_size`` indices of the permutation (the global
    batch) and rank ``r`` keeps slice ``r``: the union over ranks is exactly the batch a single
    process with ``batch_size * world_size`` would draw. The last incomplete global batch of
    an epoch is dropped, as in openai/pixel-cnn.

    Args:
        num_items: Size of the training set ``N``.
        batch_size: Items per rank per step.
        seed: Seed of the per-epoch permutations.
        rank: This process's rank.
        world_size: Number of processes.

    Raises:
        TypeError: A count is not an int.
        ValueError: ``batch_size * world_size > num_items`` or arguments out of range.
    """

    def __init__(
        self, num_items: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        for name, value, low in (
            ("num_items", num_items, 1),
            ("batch_size", batch_size, 1),
            ("world_size", world_size, 1),
            ("rank", rank, 0),
        ):
            check_int(value, name, low)
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size={world_size}, got {rank}")
        self.num_items, self.batch_size = num_items, batch_size
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = num_items // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"batch_size * world_size ({batch_size} * {world_size}) must be <= num_items "
                f"({num_items})"
            )
        self.epoch = 0
        self.index = 0  # step within the epoch
        self._perm: Tensor | None = None
        self._perm_epoch = -1
        self._device_perm: Tensor | None = None  # the epoch's permutation on a device
        self._device_perm_epoch = -1

    def permutation(self, epoch: int) -> Tensor:
        """The permutation (int64 ``(N,)``, CPU) that epoch ``epoch`` walks through."""
        if self._perm_epoch != epoch:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
            self._perm = torch.randperm(self.num_items, generator=gen)
            self._perm_epoch = epoch
        return self._perm  # type: ignore[return-value]

    def next(self, device: torch.device | str | None = None) -> Tensor:
        """Indices of this rank's next batch, int64 ``(batch_size,)``, on CPU or ``device``.

        With a ``device`` the epoch's permutation is copied there once per epoch and the
        batch is a slice of that copy: no host-to-device copy per step. Same indices.
        """
        start = self.index * self.global_batch + self.rank * self.batch_size
        perm = self.permutation(self.epoch)
        if device is not None:
            device = torch.device(device)
            cached = self._device_perm
            if cached is None or cached.device != device or self._device_perm_epoch != self.epoch:
                self._device_perm = cached = perm.to(device)
                self._device_perm_epoch = self.epoch
            perm = cached
        idx = perm[start : start + self.batch_size]
        self.index += 1
        if self.index == self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return idx

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "index", "seed", "global_batch"}``."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue where ``state`` left off.

        With a different global batch (another ``world_size`` or ``batch_size``) the position
        is converted through the number of items consumed in the epoch; the order is then no
        longer that of the original run.
        """
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        index = int(state["index"])
        if int(state["global_batch"]) != self.global_batch:
            index = index * int(state["global_batch"]) // self.global_batch
            if index >= self.steps_per_epoch:
                self.epoch, index = self.epoch + 1, 0
        self.index = index
