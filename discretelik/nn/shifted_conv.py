"""Shifted convolutions of PixelCNN++ (Salimans et al. 2017, openai/pixel-cnn ``nn.py``).

Instead of masking a centred kernel, PixelCNN++ pads the input asymmetrically so that a plain
convolution only looks up, or up and to the left. ``o`` marks the output position, ``x`` the
inputs it reads (with the default kernel sizes)::

    down-shifted 2x3          down-right-shifted 2x2
    x x x                     x x
    x o x                     x o

Both include the output's own row (and, for the down-right one, its own position), so on their
own they are not strictly causal: the PixelCNN++ network applies them to the image only once,
followed by [`down_shift`][discretelik.nn.shifted_conv.down_shift] (everything moves one row
down) or [`right_shift`][discretelik.nn.shifted_conv.right_shift] (one column right), and after
that every feature at ``(i, j)`` already depends only on pixels before ``(i, j)``; the stacked
shifted convolutions keep it that way.

With ``stride=2`` the convolutions halve the resolution (``H -> ceil(H / 2)``); the
transposed versions double it (``H -> 2 H``) and are cropped as in openai (``output_padding =
stride - 1`` reproduces TensorFlow's ``VALID`` target shape ``H * stride + kh - 1`` before the
crop), so low-resolution row ``i`` feeds high-resolution rows ``2i`` and ``2i + 1`` only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .weight_norm import apply_weight_norm

__all__ = [
    "DownRightShiftedConv2d",
    "DownRightShiftedConvTranspose2d",
    "DownShiftedConv2d",
    "DownShiftedConvTranspose2d",
    "down_shift",
    "right_shift",
]

def down_shift(x: Tensor) -> Tensor:
    """Shift a feature map one row down, filling the top row with zeros.

    Args:
        x: Float ``(B, C, H, W)``.

    Returns:
        Same shape and dtype; ``out[..., i, :] = x[..., i - 1, :]`` and ``out[..., 0, :] = 0``.
    """
    return F.pad(x[:, :, :-1, :], (0, 0, 1, 0))


def right_shift(x: Tensor) -> Tensor:
    """Shift a feature map one column right, filling the left column with zeros.

    Args:
        x: Float ``(B, C, H, W)``.

    Returns:
        Same shape and dtype; ``out[..., j] = x[..., j - 1]`` and ``out[..., 0] = 0``.
    """
    return F.pad(x[:, :, :, :-1], (1, 0, 0, 0))


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair)
    if len(pair) != 2 or not ok:
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair  # type: ignore[return-value]


def _finish(layer: nn.Module, weight_norm: bool, init_scale: float) -> None:
    """Weight-normalise ``layer`` or, without weight norm, still honour ``init_scale``."""
    if weight_norm:
        apply_weight_norm(layer, init_scale)
    else:
        layer.init_scale = float(init_scale)
        if init_scale != 1.0:
            with torch.no_grad():
                layer.weight.mul_(init_scale)


class _Shifted(nn.Module):
    """Shared constructor: validated kernel/stride, the inner (weight-normed) layer."""

    transposed = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int],
        weight_norm: bool,
        init_scale: float,
    ) -> None:
        super().__init__()
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        if self.transposed:
            # PyTorch's transposed output is (H - 1) s + kh; TensorFlow's VALID target that
            # openai crops from is H s + kh - 1: one extra (never written) row/column per s - 1.
            out_pad = (self.stride[0] - 1, self.stride[1] - 1)
            self.conv: nn.Module = nn.ConvTranspose2d(
                in_channels, out_channels, self.kernel_size, self.stride, output_padding=out_pad
            )
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, self.kernel_size, self.stride)
        _finish(self.conv, weight_norm, init_scale)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class DownShiftedConv2d(_Shifted):
    """Convolution that sees its own row and the ``kh - 1`` rows above, centred horizontally.

    The input is padded by ``kh - 1`` rows on top and ``(kw - 1) / 2`` columns on each side,
    then convolved without padding (openai ``down_shifted_conv2d``).

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: ``(kh, kw)`` with odd ``kw``; openai uses ``(2, 3)`` (and ``(1, 3)`` for
            the first layer of the up-left stream).
        stride: ``1``, or ``2`` to halve the resolution.
        weight_norm: Weight-normalise the kernel.
        init_scale: See [`apply_weight_norm`][discretelik.nn.weight_norm.apply_weight_norm].

    Shapes:
        float ``(B, in_channels, H, W) -> (B, out_channels, ceil(H / s), ceil(W / s))``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = (2, 3),
        stride: int | tuple[int, int] = 1,
        weight_norm: bool = True,
        init_scale: float = 1.0,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, weight_norm, init_scale)
        kh, kw = self.kernel_size
        if kw % 2 == 0:
            raise ValueError(f"kernel_size width must be odd (centred), got {self.kernel_size}")
        self.padding = ((kw - 1) // 2, (kw - 1) // 2, kh - 1, 0)  # (left, right, top, bottom)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, self.padding))


class DownRightShiftedConv2d(_Shifted):
    """Convolution that sees its own position, ``kh - 1`` rows up and ``kw - 1`` columns left.

    The input is padded by ``kh - 1`` rows on top and ``kw - 1`` columns on the left (openai
    ``down_right_shifted_conv2d``).

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: ``(kh, kw)``; openai uses ``(2, 2)`` (and ``(2, 1)`` for the first layer).
        stride: ``1``, or ``2`` to halve the resolution.
        weight_norm: Weight-normalise the kernel.
        init_scale: See [`apply_weight_norm`][discretelik.nn.weight_norm.apply_weight_norm].

    Shapes:
        float ``(B, in_channels, H, W) -> (B, out_channels, ceil(H / s), ceil(W / s))``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = (2, 2),
        stride: int | tuple[int, int] = 1,
        weight_norm: bool = True,
        init_scale: float = 1.0,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, weight_norm, init_scale)
        kh, kw = self.kernel_size
        self.padding = (kw - 1, 0, kh - 1, 0)  # (left, right, top, bottom)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, self.padding))


class DownShiftedConvTranspose2d(_Shifted):
    """Transposed convolution, cropped to keep the down-shifted geometry (up-sampling).

    Input pixel ``(i, j)`` writes output rows ``s i, ..., s i + kh - 1`` and columns centred on
    ``s j``; the crop removes the ``kh - 1`` bottom rows and ``(kw - 1) / 2`` columns on each
    side (openai ``down_shifted_deconv2d``).

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: ``(kh, kw)`` with odd ``kw``; openai uses ``(2, 3)``.
        stride: Up-sampling factor (2 in PixelCNN++).
        weight_norm: Weight-normalise the kernel (``g`` per output channel: ``dim=1``).
        init_scale: See [`apply_weight_norm`][discretelik.nn.weight_norm.apply_weight_norm].

    Shapes:
        float ``(B, in_channels, H, W) -> (B, out_channels, s H, s W)``.
    """

    transposed = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = (2, 3),
        stride: int | tuple[int, int] = 2,
        weight_norm: bool = True,
        init_scale: float = 1.0,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, weight_norm, init_scale)
        if self.kernel_size[1] % 2 == 0:
            raise ValueError(f"kernel_size width must be odd (centred), got {self.kernel_size}")

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)  # (B, out, s H + kh - 1, s W + kw - 1)
        kh, kw = self.kernel_size
        h, w = out.shape[-2:]
        side = (kw - 1) // 2
        return out[:, :, : h - kh + 1, side : w - side]


class DownRightShiftedConvTranspose2d(_Shifted):
    """Transposed convolution, cropped to keep the down-right-shifted geometry (up-sampling).

    Input pixel ``(i, j)`` writes the ``kh x kw`` block whose top-left corner is ``(s i, s j)``;
    the crop removes the ``kh - 1`` bottom rows and ``kw - 1`` right columns (openai
    ``down_right_shifted_deconv2d``).

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: ``(kh, kw)``; openai uses ``(2, 2)``.
        stride: Up-sampling factor (2 in PixelCNN++).
        weight_norm: Weight-normalise the kernel (``g`` per output channel: ``dim=1``).
        init_scale: See [`apply_weight_norm`][discretelik.nn.weight_norm.apply_weight_norm].

    Shapes:
        float ``(B, in_channels, H, W) -> (B, out_channels, s H, s W)``.
    """

    transposed = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = (2, 2),
        stride: int | tuple[int, int] = 2,
        weight_norm: bool = True,
        init_scale: float = 1.0,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, weight_norm, init_scale)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)  # (B, out, s H + kh - 1, s W + kw - 1)
        kh, kw = self.kernel_size
        h, w = out.shape[-2:]
        return out[:, :, : h - kh + 1, : w - kw + 1]
