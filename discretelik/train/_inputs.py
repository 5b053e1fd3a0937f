"""Checks of the image sets and labels that training and evaluation take.

Each raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape) with a message
that names the argument; nothing reads tensor contents, so nothing synchronises a GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_images", "check_labels"]


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
