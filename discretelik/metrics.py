"""Unit conversions for log-likelihoods."""

from __future__ import annotations

import math
import operator
from typing import Sequence

from torch import Tensor

__all__ = ["bits_per_dim"]


def bits_per_dim(log_prob: Tensor, event_shape: Sequence[int]) -> Tensor:
    """Convert log-likelihoods in nats to bits per dimension (negative log2-likelihood).

    Args:
        log_prob: Log-likelihoods in nats of whole images, any shape (typically ``(B,)``).
        event_shape: The shape of one image, e.g. ``(3, 32, 32)``; its product is the number of
            dimensions (sub-pixels) the likelihood covers.

    Returns:
        ``-log_prob / (log(2) * prod(event_shape))``, same shape and dtype as ``log_prob``.
    """
    dims = 1
    for size in event_shape:  # a plain loop, no generator: keeps torch.compile graphs whole
        # int() would silently truncate a float size (2.5 -> 2); __index__ takes integers only.
        if isinstance(size, bool) or not hasattr(type(size), "__index__"):
            raise TypeError(f"event_shape must hold integer sizes, got {tuple(event_shape)}")
        dims *= operator.index(size)
    if dims <= 0:
        raise ValueError(f"event_shape must have a positive number of elements, got {tuple(event_shape)}")
    return -log_prob / (math.log(2.0) * dims)
