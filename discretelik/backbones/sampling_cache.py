"""The contract of a backbone's sampling cache (fast raster-order sampling).

Reference: P. Ramachandran, T. L. Paine, P. Khorrami, M. Babaeizadeh, S. Chang, Y. Zhang,
M. A. Hasegawa-Johnson, R. H. Campbell, T. S. Huang, "Fast Generation for Convolutional
Autoregressive Models", ICLR 2017 workshop, https://arxiv.org/abs/1704.06001.

The generic sampler ([`sample_raster`][discretelik.sample_raster]) runs the whole network once
per pixel, although a new pixel only changes the activations that lie "after" it. A backbone
that can do better provides ``sampling_cache(n, image_shape, cond)``, returning a
[`SamplingCache`][discretelik.SamplingCache]: it keeps every layer's activations and, when the
sampler moves to pixel ``(i, j)``, computes each layer only at the positions that have just
become computable. Each cache lives beside its backbone
(``backbones/gated_pixelcnn_cache.py``, ``backbones/pixelcnn_pp_cache.py``), built from the
incremental convolution pieces [`CachedConv`][discretelik.nn.CachedConv] and
[`PaddedMap`][discretelik.nn.PaddedMap].

The step at ``(i, j)`` runs the same operations for every pixel of one *plan*
(``plan(i, j)``, e.g. "first column of a row divisible by 4"), and reads its position either
as Python ints or from int64 tensors on the device; the sampler replays one CUDA graph per
plan with the position in a static buffer. Used directly::

    net = create_backbone("pixelcnn++", preset="tiny").eval()
    cache = net.sampling_cache(n, (H, W))
    for i in range(H):
        for j in range(W):
            features = cache.step(canvas, i, j)  # (n, F) == net(canvas)[:, :, i, j]
            canvas[:, :, i, j] = ...  # draw pixel (i, j) from the head at these features
"""

from __future__ import annotations

import abc
from collections.abc import Hashable

import torch
from torch import Tensor

from ..nn.cached_conv import Position

__all__ = ["SamplingCache", "check_image_shape"]


def check_image_shape(image_shape: object, multiple: int, name: str) -> tuple[int, int]:
    """``(H, W)`` as two positive ints, multiples of ``multiple`` (``name`` for the message).

    Raises:
        TypeError: ``image_shape`` is not a pair.
        ValueError: Sizes not positive ints, or not multiples of ``multiple``.
    """
    if not isinstance(image_shape, (tuple, list)) or len(image_shape) != 2:
        raise TypeError(f"image_shape must be a pair (H, W), got {image_shape!r}")
    h, w = image_shape
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"image_shape must be two positive ints, got {tuple(image_shape)}")
    if h % multiple or w % multiple:
        raise ValueError(
            f"image_shape must be multiples of {multiple} for {name}, got {h}x{w}"
        )
    return h, w


class SamplingCache(abc.ABC):
    """Incremental features of a backbone for ``n`` images filled in raster order.

    Call ``step`` with strictly increasing raster positions. When it is called for
    ``(i, j)``, every pixel before ``(i, j)`` in the canvas must be final; positions the caller
    skips (e.g. known pixels) are caught up on the next call, reading their final values from
    the canvas then. A cache serves one draw of one image size; build a new one per draw.

    Subclasses implement ``plan`` and ``advance``; ``advance`` keeps all its state in tensors
    allocated by the constructor and updates them in place, so that a captured ``advance``
    reads and writes the same memory on every replay.

    Args:
        n: Batch size.
        channels: Image channels ``C``.
        height: Image height ``H``.
        width: Image width ``W``.
    """

    def __init__(self, n: int, channels: int, height: int, width: int) -> None:
        self.n, self.channels, self.height, self.width = n, channels, height, width
        self._next = 0  # raster index of the next position to compute

    @torch.no_grad()
    def step(self, canvas: Tensor, i: int, j: int) -> Tensor:
        """Features at pixel ``(i, j)``.

        Args:
            canvas: float ``(n, C, H, W)``, the scaled image (as the backbone's ``forward``
                takes it); only pixels before ``(i, j)`` are read.
            i: Row, ``0 <= i < H``.
            j: Column, ``0 <= j < W``.

        Returns:
            ``(n, F)`` features, the backbone's ``forward(canvas, cond)[:, :, i, j]`` (up to
            rounding), in the cache's dtype.

        Raises:
            TypeError: ``canvas`` is not a float tensor, or ``i``/``j`` not ints.
            ValueError: ``canvas`` has the wrong shape, ``(i, j)`` is outside the image or not
                after the previous call's position.
        """
        if not isinstance(canvas, Tensor) or not canvas.is_floating_point():
            raise TypeError(f"canvas must be a float tensor, got {type(canvas).__name__}")
        expected = (self.n, self.channels, self.height, self.width)
        if tuple(canvas.shape) != expected:
            raise ValueError(f"canvas must have shape {expected}, got {tuple(canvas.shape)}")
        for name, v, size in (("i", i, self.height), ("j", j, self.width)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {v!r}")
            if not 0 <= v < size:
                raise ValueError(f"{name} must lie in [0, {size - 1}], got {v}")
        target = i * self.width + j
        if target < self._next:
            raise ValueError(
                f"(i, j) = ({i}, {j}) comes before a position already computed: call step in "
                "increasing raster order"
            )
        while self._next < target:  # catch up skipped positions; their features are unused
            a, b = divmod(self._next, self.width)
            self.advance(canvas, a, b, self.plan(a, b), features=False)
            self._next += 1
        out = self.advance(canvas, i, j, self.plan(i, j), features=True)
        self._next += 1
        return out  # type: ignore[return-value]

    @abc.abstractmethod
    def plan(self, i: int, j: int) -> Hashable:
        """What the step at ``(i, j)`` computes, as a hashable key: ``advance`` runs the same
        operations (on other positions) for every pixel with the same key."""

    @abc.abstractmethod
    def advance(
        self, canvas: Tensor, i: Position, j: Position, plan: Hashable, features: bool
    ) -> Tensor | None:
        """Compute everything that becomes computable at ``(i, j)``, without checks.

        The step ``step`` runs, for callers that manage the order themselves (the CUDA-graph
        sampler calls it for every pixel in raster order).

        Args:
            canvas: float ``(n, C, H, W)``, pixels before ``(i, j)`` final.
            i: Row, an int or an int64 ``(1,)`` tensor on the cache's device.
            j: Column, likewise.
            plan: ``plan(i, j)`` of the integer position.
            features: Whether to compute and return the features at ``(i, j)``.

        Returns:
            ``(n, F)`` features when ``features``, else ``None``.
        """
