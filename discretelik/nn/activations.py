"""Activations used by the PixelCNN++ gated residual blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["concat_elu"]


def concat_elu(x: Tensor, dim: int = 1) -> Tensor:
    """Concatenated ELU, ``elu(concat([x, -x], dim))`` (Salimans et al. 2017).

    ELU passes only one side of zero unchanged; applying it to ``x`` and to ``-x`` keeps the
    information of both signs, at the price of doubling the channels.

    Args:
        x: Float tensor of any shape, e.g. ``(B, C, H, W)``.
        dim: The channel dimension to concatenate along (1 for ``NCHW``).

    Returns:
        Tensor of the same dtype as ``x`` with ``x.shape[dim]`` doubled: the first half is
        ``elu(x)``, the second half ``elu(-x)``.
    """
    return F.elu(torch.cat([x, -x], dim=dim))
