"""Sample grids written as PNG with the standard library only (zlib + struct, no Pillow).

A PNG is an 8-byte signature and a list of chunks ``length | type | data | crc32``; we write
``IHDR`` (size, 8-bit depth, colour type), one ``IDAT`` (zlib-compressed rows, each prefixed by
filter type 0 "None") and ``IEND``. That is all a viewer needs for 8-bit grey or RGB.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path

import torch
from torch import Tensor

from .._checks import check_int
from ._io import atomic_write

__all__ = ["encode_png", "image_grid", "save_image_grid", "write_png"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPES = {1: 0, 3: 2}  # channels -> PNG colour type (0 = greyscale, 2 = RGB)


def _chunk(kind: bytes, data: bytes) -> bytes:
    # The CRC covers the chunk type and data, not the length.
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(image: Tensor) -> bytes:
    """Encode one 8-bit image as PNG bytes.

    Args:
        image: uint8 ``(C, H, W)`` with ``C`` = 1 (grey) or 3 (RGB), on any device.

    Returns:
        The PNG file contents.

    Raises:
        TypeError: ``image`` is not a uint8 tensor.
        ValueError: ``image`` is not ``(C, H, W)`` with ``C`` in ``{1, 3}`` and ``H, W >= 1``.
    """
    if not isinstance(image, Tensor):
        raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.dtype != torch.uint8:
        raise TypeError(f"image must have dtype torch.uint8, got {image.dtype}")
    if image.dim() != 3 or image.shape[0] not in _COLOUR_TYPES or min(image.shape[1:]) < 1:
        raise ValueError(
            f"image must have shape (C, H, W) with C in (1, 3), got {tuple(image.shape)}"
        )
    channels, height, width = image.shape
    rows = image.detach().cpu().permute(1, 2, 0).contiguous().view(height, width * channels)
    # Prefix every scanline with filter byte 0 (no prediction): simple and always valid.
    raw = torch.cat([torch.zeros(height, 1, dtype=torch.uint8), rows], dim=1)
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOUR_TYPES[channels], 0, 0, 0)
    return (
        _SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw.numpy().tobytes(), 9))
        + _chunk(b"IEND", b"")
    )


def write_png(path: str | os.PathLike[str], image: Tensor) -> Path:
    """Write one 8-bit image to ``path`` as PNG, atomically (temp file + rename).

    Args:
        path: Destination file; its directory is created if needed.
        image: uint8 ``(C, H, W)``, ``C`` in ``{1, 3}``.

    Returns:
        The path written.
    """
    data = encode_png(image)
    return atomic_write(path, lambda fh: fh.write(data))


def image_grid(
    images: Tensor, nrow: int | None = None, padding: int = 2, pad_value: int = 255
) -> Tensor:
    """Tile a batch of images into one image, row-major.

    Args:
        images: Integer levels ``(N, C, H, W)`` in ``[0, 255]`` (any integer dtype), ``N >= 1``.
        nrow: Images per row; default ``ceil(sqrt(N))`` (a square-ish grid).
        padding: Pixels of border between and around the images.
        pad_value: Level of the border, ``0..255``.

    Returns:
        uint8 ``(C, rows * (H + padding) + padding, nrow * (W + padding) + padding)``.

    Raises:
        TypeError: ``images`` is not an integer tensor.
        ValueError: Wrong shape, levels outside ``[0, 255]``, or bad ``nrow``/``padding``.
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.is_floating_point() or images.is_complex() or images.dtype == torch.bool:
        raise TypeError(f"images must hold integer levels, got dtype {images.dtype}")
    if images.dim() != 4 or images.shape[0] < 1:
        raise ValueError(f"images must have shape (N, C, H, W) with N >= 1, got {tuple(images.shape)}")
    if int(images.min()) < 0 or int(images.max()) > 255:
        raise ValueError(
            f"images must hold levels in [0, 255], got [{int(images.min())}, {int(images.max())}]"
        )
    n, channels, height, width = images.shape
    if nrow is None:
        nrow = math.ceil(math.sqrt(n))
    check_int(nrow, "nrow", 1)
    check_int(padding, "padding", 0)
    if not 0 <= int(pad_value) <= 255:
        raise ValueError(f"pad_value must lie in [0, 255], got {pad_value!r}")
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = torch.full(
        (channels, nrows * (height + padding) + padding, ncol * (width + padding) + padding),
        int(pad_value),
        dtype=torch.uint8,
    )
    images = images.detach().cpu().to(torch.uint8)
    for k in range(n):
        r, c = divmod(k, ncol)
        top, left = padding + r * (height + padding), padding + c * (width + padding)
        grid[:, top : top + height, left : left + width] = images[k]
    return grid


def save_image_grid(
    path: str | os.PathLike[str],
    images: Tensor,
    nrow: int | None = None,
    padding: int = 2,
    pad_value: int = 255,
) -> Path:
    """Tile ``images`` with [`image_grid`][discretelik.train.image_grid] and write a PNG.

    Args:
        path: Destination ``.png``.
        images: Integer levels ``(N, C, H, W)`` in ``[0, 255]``, ``C`` in ``{1, 3}``.
        nrow: Images per row (default: square-ish).
        padding: Border width in pixels.
        pad_value: Border level.

    Returns:
        The path written.
    """
    return write_png(path, image_grid(images, nrow=nrow, padding=padding, pad_value=pad_value))
