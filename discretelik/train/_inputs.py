"""Checks of the image sets and labels that training and evaluation take.

Each raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape) with a message
that names the argument; nothing reads tensor contents, so nothing synchronises a GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_images", "check_images_for_model", "check_labels", "check_levels_for_model"]


def check_images(images: object, name: str) -> Tensor:
    """``images`` if it is a uint8 ``(N, C, H, W)`` tensor; ``name`` goes into the message."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"{name} must have dtype torch.uint8, got {images.dtype}")
    if images.dim() != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(images.shape)}")
    return images


def check_labels(labels: object, n: int, name: str) -> Tensor:
    """``labels`` if it is an int64 ``(n,)`` tensor; ``name`` goes into the message."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{name} must have dtype torch.int64, got {labels.dtype}")
    if tuple(labels.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(labels.shape)}")
    return labels


def check_images_for_model(
    images: object, model: object, name: str, nonempty: bool = False
) -> Tensor:
    """``check_images``, then the model's channel count, at least one image where
    ``nonempty``, and ``check_levels_for_model`` (the one read of the tensor)."""
    images = check_images(images, name)
    if nonempty and images.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one image, got shape {tuple(images.shape)}")
    channels = int(model.channels)  # type: ignore[attr-defined]
    if images.shape[1] != channels:
        raise ValueError(
            f"{name} must have {channels} channels for this model, got shape "
            f"{tuple(images.shape)}"
        )
    check_levels_for_model(images, model, name)
    return images


def check_levels_for_model(images: Tensor, model: object, name: str) -> None:
    """Raise ``ValueError`` unless ``images`` (checked uint8) lie in ``[0, model.bins - 1]``.

    Reads the tensor once (a GPU synchronises), so it is called before a run, not per step;
    uint8 data cannot exceed 255, so a model with 256 or more bins needs no read.
    """
    bins = int(model.bins)  # type: ignore[attr-defined]
    if bins >= 256 or images.numel() == 0:
        return
    hi = int(images.max())
    if hi > bins - 1:
        raise ValueError(
            f"{name} must hold levels in [0, {bins - 1}] for this model (bins={bins}), got "
            f"values up to {hi}: quantise the data to {bins} levels or build the model with "
            f"bins={hi + 1 if hi < 255 else 256}"
        )
