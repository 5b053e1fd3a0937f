"""Sampling cache of the gated PixelCNN (built by ``GatedPixelCNN.sampling_cache``).

The vertical stack at row ``i`` reads rows ``<= i`` of its input, and the horizontal stack only
needs it one row down, so at the start of row ``i`` every vertical layer is computed for row
``i - 1`` (one row, ``W`` columns); per pixel every horizontal layer is computed at column
``j`` only, from its ``r + 1`` cached input columns ``j - r .. j``. See
[`SamplingCache`][discretelik.SamplingCache] for the contract.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..nn.cached_conv import CachedConv, PaddedMap, Position, select
from ..nn.gated import gated_activation
from .sampling_cache import SamplingCache, check_image_shape

if TYPE_CHECKING:
    from .base import Conditioning
    from .gated_pixelcnn import GatedPixelCNN

__all__ = ["GatedPixelCNNCache"]


class GatedPixelCNNCache(SamplingCache):
    """Sampling cache of the gated PixelCNN (built by ``GatedPixelCNN.sampling_cache``).

    Per layer ``l`` it keeps the vertical stack's input (all rows, padded like
    ``VerticalConv2d``), the horizontal stack's input for the current row (padded like
    ``HorizontalConv2d``) and the vertical stack's contribution ``link(down_shift(v_pre))`` to
    the current row. At the start of row ``i`` every vertical layer is computed at row
    ``i - 1``; at pixel ``(i, j)`` every horizontal layer is computed at column ``j``. Its
    features equal the backbone's up to floating-point rounding (the same operations on
    smaller inputs).

    Args:
        net: The backbone (in evaluation mode; it has no dropout anyway).
        n: Batch size.
        image_shape: ``(H, W)``.
        cond: Conditioning for the ``n`` images, as for ``net.forward``.

    Raises:
        ValueError, TypeError: Bad ``n``, ``image_shape`` or ``cond`` (as ``forward`` would).
    """

    @torch.no_grad()
    def __init__(
        self, net: "GatedPixelCNN", n: int, image_shape: tuple[int, int], cond: "Conditioning"
    ) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        h, w = check_image_shape(image_shape, 1, type(net).__name__)
        super().__init__(n, net.in_channels, h, w)
        label, cmap = net.split_cond(cond, n)
        like = next(net.parameters()).detach()
        r = net.config.kernel_size // 2
        p = net.config.hidden_channels
        self.r = r
        self.layers = []
        self.v_in: list[PaddedMap] = []  # layer l's vertical input, all rows
        self.h_in: list[PaddedMap] = []  # layer l's horizontal input, the current row
        for idx, layer in enumerate(net.layers):
            cin = net.in_channels if idx == 0 else p
            c_v = c_h = None
            if layer.cond is not None:
                # Computed once at full size, exactly as forward does, then sliced per row.
                c = layer.cond(label, cmap, (h, w))
                if c is not None:
                    # A label-only term is (n, 4p, 1, 1); a broadcast view indexes like a map.
                    c_v, c_h = c.expand(n, 4 * p, h, w).chunk(2, dim=1)
            self.layers.append(
                dict(
                    vertical=CachedConv(layer.vertical),
                    horizontal=CachedConv(layer.horizontal),
                    link=CachedConv(layer.link),
                    h_out=CachedConv(layer.h_out),
                    skip=CachedConv(layer.skip) if layer.skip is not None else None,
                    residual=layer.residual,
                    c_v=c_v,
                    c_h=c_h,
                )
            )
            self.v_in.append(PaddedMap(like, n, cin, h, w, r, r, r))
            self.h_in.append(PaddedMap(like, n, cin, 1, w, 0, r, 0))
        self.output = CachedConv(net.output)
        # down_shift puts zeros in row 0, so row 0's vertical contribution is link(0); each
        # row's contribution is written in place (a captured step reads this memory).
        zeros = like.new_zeros(n, 2 * p, 1, w)
        self.v_link = [lay["link"].rows(zeros)[:, :, 0].clone() for lay in self.layers]  # (n, 2p, W)

    def plan(self, i: int, j: int) -> Hashable:
        # (a new row after the first: compute the vertical stack; a pixel to the left)
        return (j == 0 and i > 0, j > 0)

    def advance(
        self, canvas: Tensor, i: Position, j: Position, plan: Hashable, features: bool
    ) -> Tensor | None:
        new_row, has_left = plan  # type: ignore[misc]
        if new_row:
            self._vertical_row(canvas, i - 1)
        if has_left:
            # Pixel (i, j - 1) is final now: the first horizontal layer may read it.
            self.h_in[0].write_px(0, j - 1, select(select(canvas, 2, i), 2, j - 1))
        skips = None
        y = None
        last = len(self.layers) - 1
        r = self.r
        for l, lay in enumerate(self.layers):
            if l == 0:
                window = self.h_in[0].window(0, j - 1, 1, r)  # type A: columns j - r .. j - 1
            else:
                window = self.h_in[l].window(0, j, 1, r + 1)  # columns j - r .. j
            h_pre = lay["horizontal"].at(window) + select(self.v_link[l], 2, j)  # (n, 2p)
            if lay["c_h"] is not None:
                h_pre = h_pre + select(select(lay["c_h"], 2, i), 2, j)
            gated = gated_activation(h_pre)  # (n, p)
            h_new = lay["h_out"].at(gated)
            if lay["residual"]:
                h_new = self.h_in[l].px(0, j) + h_new
            if lay["skip"] is not None:
                s = lay["skip"].at(gated)
                skips = s if skips is None else skips + s
            if l < last:
                self.h_in[l + 1].write_px(0, j, h_new)
            else:
                y = h_new
        if not features:
            return None
        y = y if skips is None else skips
        return F.relu(self.output.at(F.relu(y)))

    def _vertical_row(self, canvas: Tensor, t: Position) -> None:
        """Compute every vertical layer at row ``t`` (all of rows ``<= t`` are final)."""
        r = self.r
        self.v_in[0].write_row(t, select(canvas, 2, t).unsqueeze(2))
        last = len(self.layers) - 1
        for l, lay in enumerate(self.layers):
            v_pre = lay["vertical"].rows(self.v_in[l].rows(t, r + 1))  # (n, 2p, 1, W)
            # forward's down_shift(v_pre) puts row t at row t + 1: the next row's contribution.
            self.v_link[l].copy_(lay["link"].rows(v_pre)[:, :, 0])
            if l < last:  # the last layer's vertical output feeds nothing
                if lay["c_v"] is not None:
                    v_pre = v_pre + select(lay["c_v"], 2, t).unsqueeze(2)
                self.v_in[l + 1].write_row(t, gated_activation(v_pre))
