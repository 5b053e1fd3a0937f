"""Building blocks of the Gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation
with PixelCNN Decoders", arXiv:1606.05328).

* ``gated_activation``: ``tanh(a) * sigmoid(b)`` over the two halves of the channels.
* ``VerticalConv2d`` / ``HorizontalConv2d``: the two causal stacks, written as shifted
  (padded-then-cropped) convolutions rather than masks, so no weight is wasted on taps that a
  mask would zero. For an odd kernel size ``k = 2r + 1``, the inputs the output at ``[ ]``
  reads (``x`` read, ``.`` not read)::

    vertical (k=3)     horizontal, type B (k=5)     horizontal, type A (k=5)
    x  x  x            .  .  .  .  .                .  .  .  .  .
    x [x] x            x  x [x] .  .                x  x [.] .  .
    .  .  .            .  .  .  .  .                .  .  .  .  .

  The vertical stack reads its own row (``i``) too, including pixels right of the output:
  it is only causal once ``down_shift`` (``discretelik.nn.shifted_conv``) moves it one row down
  before the horizontal stack reads it, which is what the Gated PixelCNN does.
* ``ConditionBias``: the per-layer conditioning term ``V^T y`` (class label ``y``) and
  ``V * s`` (spatial map ``s``, resized to the image) of the Conditional PixelCNN.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int
from .shifted_conv import right_shift

__all__ = [
    "ConditionBias",
    "check_condition_options",
    "HorizontalConv2d",
    "VerticalConv2d",
    "gated_activation",
]

UPSAMPLE_MODES = ("nearest", "bilinear")


def gated_activation(x: Tensor) -> Tensor:
    """Gated activation unit ``tanh(x_f) * sigmoid(x_g)``.

    Args:
        x: Float ``(B, 2P, H, W)``; the first ``P`` channels are the filter ``x_f``, the last
            ``P`` the gate ``x_g``.

    Returns:
        ``(B, P, H, W)``, same dtype as ``x``.

    Raises:
        ValueError: If the channel count is odd.
    """
    if x.shape[1] % 2:
        raise ValueError(
            f"gated_activation needs an even number of channels (filter and gate halves), "
            f"got shape {tuple(x.shape)}"
        )
    f, g = x.chunk(2, dim=1)
    return torch.tanh(f) * torch.sigmoid(g)


def check_condition_options(
    num_classes: object, cond_channels: object, cond_upsample: object
) -> None:
    """Validate the conditioning fields shared by backbone configs.

    Raises:
        TypeError: ``num_classes`` or ``cond_channels`` is neither ``None`` nor an int.
        ValueError: One of them is below 1, or ``cond_upsample`` is not a known mode (the
            message names the field).
    """
    if num_classes is not None:
        check_int(num_classes, "num_classes", 1)
    if cond_channels is not None:
        check_int(cond_channels, "cond_channels", 1)
    if cond_upsample not in UPSAMPLE_MODES:
        raise ValueError(f"cond_upsample must be one of {UPSAMPLE_MODES}, got {cond_upsample!r}")


def _half_width(kernel_size: int) -> int:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        raise TypeError(f"kernel_size must be an odd int >= 3, got {kernel_size!r}")
    if kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd int >= 3, got {kernel_size}")
    return kernel_size // 2


class VerticalConv2d(nn.Conv2d):
    """Vertical-stack convolution: output ``(i, j)`` reads rows ``i - r .. i`` and columns
    ``j - r .. j + r`` (``r = kernel_size // 2``) of its input.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Odd ``k >= 3``; the weight is ``(out, in, r + 1, k)``.

    Shapes:
        ``(B, in_channels, H, W) -> (B, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        r = _half_width(kernel_size)
        super().__init__(in_channels, out_channels, (r + 1, kernel_size))
        self.half = r

    def forward(self, x: Tensor) -> Tensor:
        r = self.half
        # Pad r rows on top only: the kernel's last row lands on row i, nothing below it.
        return super().forward(F.pad(x, (r, r, r, 0)))


class HorizontalConv2d(nn.Conv2d):
    """Horizontal-stack convolution along the current row.

    Type ``"B"``: output ``(i, j)`` reads columns ``j - r .. j`` of row ``i``. Type ``"A"``
    (first layer, where the input is the image): columns ``j - r .. j - 1``, so the current
    pixel is never seen.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Odd ``k >= 3``; ``r = k // 2``.
        mask_type: ``"A"`` or ``"B"``.

    Shapes:
        ``(B, in_channels, H, W) -> (B, out_channels, H, W)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        mask_type: Literal["A", "B"] = "B",
    ) -> None:
        r = _half_width(kernel_size)
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        # Type A has one tap fewer: the current pixel's tap would always read zeros.
        super().__init__(in_channels, out_channels, (1, r + 1 if mask_type == "B" else r))
        self.half = r
        self.mask_type = mask_type

    def forward(self, x: Tensor) -> Tensor:
        if self.mask_type == "A":
            # Read the shifted input, so the rightmost tap lands on j - 1.
            x = F.pad(right_shift(x), (self.half - 1, 0, 0, 0))
        else:
            x = F.pad(x, (self.half, 0, 0, 0))
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mask_type={self.mask_type}"


class ConditionBias(nn.Module):
    """Conditioning term added to one layer's pre-activations: ``V^T y + V * s``.

    ``V^T y`` is a learned vector per class (an embedding, the same at every pixel). ``V * s`` is
    a 1x1 convolution of the spatial map ``s``, resized to the image's ``H x W``. The 1x1
    convolution runs at the map's own resolution before resizing: both are linear and the
    resize weights sum to one, so the order does not change the result, and the small map is
    the cheaper place to do the channel mixing.

    Args:
        out_channels: Channels of the pre-activation the term is added to.
        num_classes: Number of classes, or ``None`` for no label term.
        cond_channels: Channels of the spatial map, or ``None`` for no map term.
        upsample: ``"nearest"`` (keeps one-hot codes, e.g. VQ-VAE indices, piecewise constant)
            or ``"bilinear"`` (smooth latents), as in ``F.interpolate``.

    Raises:
        ValueError: ``upsample`` is not one of the two modes.
    """

    def __init__(
        self,
        out_channels: int,
        num_classes: int | None = None,
        cond_channels: int | None = None,
        upsample: str = "nearest",
    ) -> None:
        super().__init__()
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        self.upsample = upsample
        self.label = None if num_classes is None else nn.Embedding(num_classes, out_channels)
        self.map = None if cond_channels is None else nn.Conv2d(cond_channels, out_channels, 1)

    def forward(
        self, label: Tensor | None, cmap: Tensor | None, size: tuple[int, int]
    ) -> Tensor | None:
        """The conditioning term, or ``None`` when there is nothing to add.

        Args:
            label: int64 ``(B,)`` class labels (already validated), or ``None``.
            cmap: float ``(B, cond_channels, h, w)`` map (already validated), or ``None``.
            size: Image ``(H, W)`` to resize the map to.

        Returns:
            float ``(B, out_channels, H, W)`` (map given), ``(B, out_channels, 1, 1)`` (label
            only; broadcasts over pixels) or ``None``.
        """
        out = None
        if self.label is not None and label is not None:
            out = self.label(label)[:, :, None, None]  # (B, out, 1, 1)
        if self.map is not None and cmap is not None:
            s = self.map(cmap.to(self.map.weight.dtype))
            if tuple(s.shape[-2:]) != tuple(size):
                align = False if self.upsample == "bilinear" else None
                s = F.interpolate(s, size=size, mode=self.upsample, align_corners=align)
            out = s if out is None else out + s
        return out
