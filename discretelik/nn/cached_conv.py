"""Incremental convolution for fast raster-order sampling: weights read once, padded ring maps.

A sampling cache (Ramachandran et al. 2017, "Fast Generation for Convolutional Autoregressive
Models", https://arxiv.org/abs/1704.06001) keeps every layer's input inside the zero padding
its convolution uses and, per new pixel, evaluates each convolution only where its output just
became computable. The two pieces here do that for any shifted or masked convolution:

* [`CachedConv`][discretelik.nn.CachedConv]: a convolution's weights, read once,
  applied to whole rows or to the one input window of a single output position.
* [`PaddedMap`][discretelik.nn.PaddedMap]: a feature map stored inside its zero
  padding, written position by position (or row by row) and read as padded windows.

Positions (``Position``) are Python ints, or int64 tensors of shape ``(1,)`` on the map's
device. With ints the maps are sliced (views, the fastest eager path); with tensors every read
and write is an ``index_select`` / ``index_copy_`` whose index is computed on the device, so a
step written once against these maps can be captured in a CUDA graph and replayed for every
pixel with the position in a static buffer (no host synchronisation, no Python branch on a
tensor value). Both give bitwise the same values.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CachedConv", "PaddedMap", "Position", "select"]

#: A row or column index: an ``int``, or an int64 tensor of shape ``(1,)`` on the map's device.
Position = Union[int, Tensor]


def select(x: Tensor, dim: int, index: Position) -> Tensor:
    """``x.select(dim, index)`` for an int or a ``(1,)`` int64 tensor index.

    Args:
        x: Any tensor.
        dim: Dimension to index.
        index: ``int`` (a view) or int64 ``(1,)`` tensor on ``x``'s device (a gathered copy).

    Returns:
        ``x`` without dimension ``dim``, at ``index``.
    """
    if isinstance(index, int):
        return x.select(dim, index)
    return x.index_select(dim, index).squeeze(dim)


class CachedConv:
    """A convolution's weights, read once, applied where a sampling cache needs it.

    Reading ``weight`` of a weight-normed layer recomputes ``g v / ||v||``, so it is read once
    per cache. Whole rows go through ``F.conv2d`` / ``F.conv_transpose2d``; a single output
    position is a matrix product of the flattened input window, which for these tiny inputs is
    several times cheaper than a convolution call.

    Args:
        conv: An ``nn.Conv2d`` or ``nn.ConvTranspose2d`` (possibly weight-normed), without
            padding of its own (the caller's ``PaddedMap`` holds the padding).
    """

    def __init__(self, conv: nn.Module) -> None:
        if not isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)):
            raise TypeError(f"conv must be an nn.Conv2d or nn.ConvTranspose2d, got {type(conv).__name__}")
        self.weight = conv.weight.detach()
        self.bias = conv.bias.detach() if conv.bias is not None else None
        self.stride = conv.stride
        self.transposed = isinstance(conv, nn.ConvTranspose2d)
        if self.transposed:
            self.output_padding = conv.output_padding
            self.matrix = self.weight.reshape(self.weight.shape[0], -1)  # (in, out kh kw)
        else:
            self.matrix = self.weight.reshape(self.weight.shape[0], -1).t()  # (in kh kw, out)

    def rows(self, x: Tensor) -> Tensor:
        """The unpadded (transposed) convolution of ``x`` ``(n, in, rows, cols)``."""
        if self.transposed:
            return F.conv_transpose2d(
                x, self.weight, self.bias, self.stride, output_padding=self.output_padding
            )
        return F.conv2d(x, self.weight, self.bias, self.stride)

    def at(self, window: Tensor) -> Tensor:
        """Output ``(n, out)`` at the one position whose input window is ``(n, in, kh, kw)``
        (or ``(n, in)`` for a 1x1 kernel)."""
        flat = window.reshape(window.shape[0], -1)
        if self.bias is None:
            return flat @ self.matrix
        return torch.addmm(self.bias, flat, self.matrix)

    def spread(self, x: Tensor) -> Tensor:
        """Transposed with kernel = stride: the block ``(n, out, kh, kw)`` that the single
        input position ``x`` ``(n, in)`` writes (no other input overlaps it)."""
        n = x.shape[0]
        out = (x @ self.matrix).reshape(n, *self.weight.shape[1:])
        return out if self.bias is None else out + self.bias[:, None, None]


class PaddedMap:
    """A feature map ``(n, C, h, w)`` stored inside the zero padding a shifted convolution uses.

    Positions are written as they become final; windows are read as padded slices, so a
    convolution without padding on a window gives the padded convolution's output there. Rows
    ``a`` and columns ``b`` are ints, or int64 ``(1,)`` tensors on the map's device (see
    ``discretelik.nn.cached_conv``); a window may start in the padding (``a - kh + 1 < 0``).

    Args:
        like: Tensor whose dtype and device the buffer takes.
        n: Batch size.
        c: Channels.
        h: Rows of the map.
        w: Columns of the map.
        top: Zero rows above the map.
        left: Zero columns left of the map.
        right: Zero columns right of the map.
    """

    def __init__(
        self, like: Tensor, n: int, c: int, h: int, w: int, top: int, left: int, right: int
    ) -> None:
        self.data = like.new_zeros(n, c, h + top, w + left + right)
        self.flat = self.data.view(n, c, -1)  # the same memory, one spatial index
        self.top, self.left, self.w = top, left, w
        self.padded_width = w + left + right
        # Index offsets, made on first use (the first step of each kind runs eagerly, so they
        # exist before any graph capture).
        self._steps: dict[tuple[int, int], Tensor] = {}

    def _offsets(self, kh: int, kw: int) -> Tensor:
        """Flat offsets ``(kh kw,)`` of a ``kh x kw`` window from its top-left position;
        ``kw = 0``: the row offsets ``0 .. kh - 1``."""
        key = (kh, kw)
        if key not in self._steps:
            rows = torch.arange(kh, device=self.data.device)
            if kw == 0:
                self._steps[key] = rows
            else:
                cols = torch.arange(kw, device=self.data.device)
                self._steps[key] = (rows[:, None] * self.padded_width + cols).reshape(-1)
        return self._steps[key]

    def write_row(self, a: Position, row: Tensor) -> None:
        """Store row ``a`` (``row``: ``(n, C, 1, w)``)."""
        t, l = self.top, self.left
        if isinstance(a, int):
            self.data[:, :, a + t : a + t + 1, l : l + self.w] = row
        else:
            self.data[:, :, :, l : l + self.w].index_copy_(2, a + t, row)

    def write_px(self, a: Position, b: Position, px: Tensor) -> None:
        """Store position ``(a, b)`` (``px``: ``(n, C)``)."""
        r, c = a + self.top, b + self.left
        if isinstance(r, int) and isinstance(c, int):
            self.data[:, :, r, c] = px
        else:
            self.flat.index_copy_(2, r * self.padded_width + c, px[:, :, None])

    def rows(self, a: Position, kh: int) -> Tensor:
        """Rows ``a - kh + 1 .. a`` with their side padding: ``(n, C, kh, left + w + right)``."""
        start = a + self.top - kh + 1
        if isinstance(start, int):
            return self.data[:, :, start : start + kh]
        return self.data.index_select(2, start + self._offsets(kh, 0))

    def window(self, a: Position, b: Position, kh: int, kw: int) -> Tensor:
        """Rows ``a - kh + 1 .. a`` x columns ``b - kw + 1 .. b``: ``(n, C, kh, kw)``."""
        r, c = a + self.top - kh + 1, b + self.left - kw + 1
        if isinstance(r, int) and isinstance(c, int):
            return self.data[:, :, r : r + kh, c : c + kw]
        start = r * self.padded_width + c
        window = self.flat.index_select(2, start + self._offsets(kh, kw))
        return window.view(*self.data.shape[:2], kh, kw)

    def row(self, a: Position) -> Tensor:
        """Row ``a`` without padding: ``(n, C, 1, w)``."""
        t, l = self.top, self.left
        if isinstance(a, int):
            return self.data[:, :, a + t : a + t + 1, l : l + self.w]
        return self.data[:, :, :, l : l + self.w].index_select(2, a + t)

    def px(self, a: Position, b: Position) -> Tensor:
        """Position ``(a, b)``: ``(n, C)``."""
        r, c = a + self.top, b + self.left
        if isinstance(r, int) and isinstance(c, int):
            return self.data[:, :, r, c]
        return self.flat.index_select(2, r * self.padded_width + c).squeeze(2)
