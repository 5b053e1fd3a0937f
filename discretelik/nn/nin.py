"""Network-in-network layer: a per-pixel dense layer (1x1 convolution)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .weight_norm import apply_weight_norm

__all__ = ["NIN"]


class NIN(nn.Module):
    """Per-pixel linear map of the channels (``nin`` in openai/pixel-cnn).

    openai applies a weight-normed dense layer to the last (channel) axis; a 1x1 convolution
    on ``NCHW`` is the same map and keeps the layout. A 1x1 kernel sees only its own pixel, so
    it cannot break causality.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        weight_norm: Weight-normalise the kernel (``g`` per output channel).
        init_scale: See [`apply_weight_norm`][discretelik.nn.weight_norm.apply_weight_norm].

    Shapes:
        float ``(B, in_channels, H, W) -> (B, out_channels, H, W)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        weight_norm: bool = True,
        init_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        if weight_norm:
            apply_weight_norm(self.conv, init_scale)
        elif init_scale != 1.0:
            with torch.no_grad():
                self.conv.weight.mul_(init_scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)
