"""Small real-image sets bundled with the package (provenance in ``data/README.md``)."""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch
from torch import Tensor

__all__ = ["load_bundled", "BUNDLED_DATASETS"]

BUNDLED_DATASETS = ("cifar10", "mnist")
"""Names accepted by [`load_bundled`][discretelik.data.load_bundled]."""


def load_bundled(name: str = "cifar10", split: str = "train") -> tuple[Tensor, Tensor]:
    """Load a bundled subset as integer images.

    Args:
        name: ``"cifar10"`` (1,000 train / 250 test images, 32x32 RGB) or ``"mnist"``
            (1,000 / 250, 28x28 grey).
        split: ``"train"`` or ``"test"``.

    Returns:
        ``(images, labels)``: images uint8 ``(N, C, H, W)`` (``C`` = 3 or 1), labels int64 ``(N,)``.
    """
    if name not in BUNDLED_DATASETS:
        raise ValueError(f"name must be one of {BUNDLED_DATASETS}, got {name!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    with resources.files(__package__).joinpath(f"{name}_subset.npz").open("rb") as fh:
        arrays = np.load(fh)
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    images = torch.from_numpy(np.ascontiguousarray(x))
    images = images[:, None] if images.dim() == 3 else images.permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(y.astype(np.int64))
