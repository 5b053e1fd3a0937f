"""Masked 2D convolution (PixelCNN, van den Oord et al. 2016), with colour-channel groups.

For a 5x5 kernel the masks are (``1`` = weight used, ``c`` = centre tap, see below)::

    type A               type B
    1 1 1 1 1            1 1 1 1 1
    1 1 1 1 1            1 1 1 1 1
    1 1 A 0 0            1 1 B 0 0
    0 0 0 0 0            0 0 0 0 0
    0 0 0 0 0            0 0 0 0 0

Everything above the centre row and left of the centre pixel is visible. At the centre,
input and output channels are split into ``groups`` contiguous blocks (R, G, B when
``groups=3``): output block ``o`` sees input block ``i`` when ``i < o`` (type A) or ``i <= o``
(type B). With ``groups=1`` type A sees nothing of the centre pixel (whole previous pixels
only) and type B sees all of it.

The mask is a buffer multiplied into the weight inside ``forward``
(``F.conv2d(x, weight * mask)``), so ``weight`` is never mutated and optimizers, weight norm
and ``state_dict`` see the plain parameter.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MaskedConv2d", "causal_mask"]


def causal_mask(
    out_channels: int,
    in_channels: int,
    kernel_size: tuple[int, int],
    mask_type: Literal["A", "B"],
    groups: int = 1,
) -> Tensor:
    """Build the ``(out_channels, in_channels, kh, kw)`` float mask described above."""
    if mask_type not in ("A", "B"):
        raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
    kh, kw = kernel_size
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernel_size must be odd in both dimensions, got {kernel_size}")
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"in_channels ({in_channels}) and out_channels ({out_channels}) must be multiples "
            f"of groups ({groups})"
        )
    ch, cw = kh // 2, kw // 2
    mask = torch.zeros(out_channels, in_channels, kh, kw)
    mask[:, :, :ch, :] = 1.0
    mask[:, :, ch, :cw] = 1.0
    out_group = torch.arange(out_channels) // (out_channels // groups)
    in_group = torch.arange(in_channels) // (in_channels // groups)
    if mask_type == "A":
        centre = in_group[None, :] < out_group[:, None]
    else:
        centre = in_group[None, :] <= out_group[:, None]
    mask[:, :, ch, cw] = centre.float()
    return mask


class MaskedConv2d(nn.Conv2d):
    """``nn.Conv2d`` with a PixelCNN causal mask of type ``"A"`` or ``"B"``.

    Args:
        in_channels: Input channels; a multiple of ``groups``.
        out_channels: Output channels; a multiple of ``groups``.
        kernel_size: Odd kernel size (int or pair).
        mask_type: ``"A"`` (first layer: the centre pixel's own block is hidden) or ``"B"``.
        groups: Colour groups for the centre-pixel ordering (not a grouped convolution).
        bias: Whether to add a bias.

    Shapes:
        ``(B, in_channels, H, W) -> (B, out_channels, H, W)`` ("same" padding).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        mask_type: Literal["A", "B"] = "B",
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        super().__init__(
            in_channels, out_channels, ks, padding=(ks[0] // 2, ks[1] // 2), bias=bias
        )
        self.mask_type = mask_type
        self.colour_groups = groups
        self.register_buffer(
            "mask", causal_mask(out_channels, in_channels, ks, mask_type, groups), persistent=False
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mask_type={self.mask_type}, colour_groups={self.colour_groups}"
