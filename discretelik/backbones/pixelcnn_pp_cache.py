"""Sampling cache of PixelCNN++ (built by ``PixelCNNPP.sampling_cache``).

At resolution level ``k`` (``H / 2^k`` rows) the ``u`` stream's row ``a`` depends on image rows
``< 2^k a`` only, and the ``ul`` stream's position ``(a, b)`` on image pixels before
``(2^k a, 2^k b)`` only. So at the start of image row ``i`` the ``u`` stream is computed for
row ``i / 2^k`` of every level that ``i`` is a multiple of ``2^k`` for (up pass, then down
pass), and at pixel ``(i, j)`` the ``ul`` stream for position ``(i / 2^k, j / 2^k)`` of every
level that divides both. A stride-2 convolution reads input rows ``2a - 1 .. 2a`` (final by
then); a stride-2 transposed convolution writes output rows ``2a, 2a + 1`` from input row ``a``
alone (kernel height = stride), so its output is written as soon as its input row (``u``) or
position (``ul``) is done. The U-Net's short-cuts are the cached up-pass maps, paired with the
down-pass layers exactly as the forward pass pops them. See
[`SamplingCache`][discretelik.SamplingCache] for the contract.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.activations import concat_elu
from ..nn.cached_conv import CachedConv, PaddedMap, Position, select
from .sampling_cache import SamplingCache, check_image_shape

if TYPE_CHECKING:
    from .base import Conditioning
    from .pixelcnn_pp import GatedResNet, PixelCNNPP

__all__ = ["PixelCNNPPCache"]


class _ResNetCache:
    """One ``GatedResNet`` at one resolution: its padded ``concat_elu`` input and hidden maps.

    ``row(a, ...)`` computes output row ``a`` (``u`` stream, down-shifted 2x3 kernels);
    ``pixel(a, b, ...)`` computes position ``(a, b)`` (``ul`` stream, down-right 2x2 kernels).
    Both follow ``GatedResNet.forward`` operation by operation; dropout is the identity
    (evaluation mode).
    """

    def __init__(
        self, layer: "GatedResNet", like: Tensor, n: int, h: int, w: int, label: Tensor | None
    ) -> None:
        conv1, conv2 = layer.conv1, layer.conv2
        self.kh, self.kw = conv1.kernel_size
        left, right, top, _ = conv1.padding  # the same for conv1 and conv2 (same class)
        f2 = conv1.conv.in_channels  # 2 F: concat_elu doubles the channels
        self.x_elu = PaddedMap(like, n, f2, h, w, top, left, right)
        self.c1_elu = PaddedMap(like, n, f2, h, w, top, left, right)
        self.conv1 = CachedConv(conv1.conv)
        self.conv2 = CachedConv(conv2.conv)
        self.aux = CachedConv(layer.aux.conv) if layer.aux is not None else None
        self.class_term = None  # (n, 2F)
        if layer.class_proj is not None:
            self.class_term = F.embedding(label, layer.class_proj.detach())

    def row(self, a: Position, x: Tensor, aux: Tensor | None) -> Tensor:
        """Output row ``a`` ``(n, F, 1, w)`` from input row ``x`` and short-cut row ``aux``
        (``(n, F, 1, w)``, ``(n, A, 1, w)`` or ``None``); the rows above are cached."""
        self.x_elu.write_row(a, concat_elu(x))
        c1 = self.conv1.rows(self.x_elu.rows(a, self.kh))
        if aux is not None:
            c1 = c1 + self.aux.rows(concat_elu(aux))
        self.c1_elu.write_row(a, concat_elu(c1))
        c2 = self.conv2.rows(self.c1_elu.rows(a, self.kh))
        if self.class_term is not None:
            c2 = c2 + self.class_term[:, :, None, None]
        g, h = c2.chunk(2, dim=1)
        return x + g * torch.sigmoid(h)

    def pixel(self, a: Position, b: Position, x: Tensor, aux: Tensor | None) -> Tensor:
        """Output ``(n, F)`` at ``(a, b)`` from input ``x`` ``(n, F)`` and short-cut ``aux``
        ``(n, A)``; the earlier positions are cached."""
        self.x_elu.write_px(a, b, concat_elu(x))
        c1 = self.conv1.at(self.x_elu.window(a, b, self.kh, self.kw))
        if aux is not None:
            c1 = c1 + self.aux.at(concat_elu(aux))
        self.c1_elu.write_px(a, b, concat_elu(c1))
        c2 = self.conv2.at(self.c1_elu.window(a, b, self.kh, self.kw))
        if self.class_term is not None:
            c2 = c2 + self.class_term
        g, h = c2.chunk(2, dim=1)
        return x + g * torch.sigmoid(h)


class PixelCNNPPCache(SamplingCache):
    """Sampling cache of PixelCNN++ (built by ``PixelCNNPP.sampling_cache``).

    Level ``k`` (resolution ``H / 2^k x W / 2^k``, ``k = 0, 1, 2``) keeps, for each stream, the
    up-pass maps the U-Net short-cuts read (``u_list`` / ``ul_list`` of the forward pass), the
    down-pass ``u`` map after every layer (the ``ul`` layers read it), the up-sampled input of
    its down pass, and per gated residual layer its cached ``concat_elu`` maps. See the module
    docstring for when each position is computed.

    Args:
        net: The backbone, in evaluation mode (dropout off).
        n: Batch size.
        image_shape: ``(H, W)``, multiples of 4.
        cond: Class labels ``(n,)`` when ``net`` is class-conditional, else ``None``.

    Raises:
        ValueError: ``net`` is in training mode with dropout, or bad ``n``, ``image_shape`` or
            ``cond``.
        TypeError: ``cond`` of the wrong type.
    """

    LEVELS = 3

    @torch.no_grad()
    def __init__(
        self, net: "PixelCNNPP", n: int, image_shape: tuple[int, int], cond: "Conditioning"
    ) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if net.training and net.config.dropout > 0:
            raise ValueError(
                "net must be in evaluation mode (net.eval()): the cache computes features "
                "without dropout"
            )
        h, w = check_image_shape(image_shape, net.size_multiple, type(net).__name__)
        super().__init__(n, net.in_channels, h, w)
        label, _ = net.split_cond(cond, n)  # int64 already (split_cond)
        like = next(net.parameters()).detach()
        f, nr = net.config.nr_filters, net.config.nr_resnet
        self.filters = f
        sizes = [(h >> k, w >> k) for k in range(self.LEVELS)]

        def resnets(layers: nn.ModuleList, k: int) -> list[_ResNetCache]:
            return [_ResNetCache(m, like, n, *sizes[k], label) for m in layers]

        def u_map(k: int) -> PaddedMap:  # padded like the stride-2 down-shifted 2x3 conv
            return PaddedMap(like, n, f, *sizes[k], 1, 1, 1)

        def ul_map(k: int) -> PaddedMap:  # padded like the stride-2 down-right 2x2 conv
            return PaddedMap(like, n, f, *sizes[k], 1, 1, 0)

        # The image with its ones channel, padded for the first layers (1 row up, 1 each side).
        self.x_pad = PaddedMap(like, n, net.in_channels + 1, h, w, 1, 1, 1)
        self.u_init = CachedConv(net.u_init.conv)
        self.ul_above = CachedConv(net.ul_init_above.conv)
        self.ul_left = CachedConv(net.ul_init_left.conv)
        # down_shift(conv_1x3(x)) at this row, written in place (a captured step reads it).
        self.ul_above_row = like.new_zeros(n, f, w)
        self.down_u = [CachedConv(m.conv) for m in net.downsample_u]
        self.down_ul = [CachedConv(m.conv) for m in net.downsample_ul]
        self.up_u = [CachedConv(m.conv) for m in net.upsample_u]
        self.up_ul = [CachedConv(m.conv) for m in net.upsample_ul]
        # The column crop of DownShiftedConvTranspose2d (centred kernel).
        self.up_u_side = [(m.kernel_size[1] - 1) // 2 for m in net.upsample_u]

        # Up pass: u_up[k][m] is the m-th kept output at level k (m = 0: first layer or
        # down-sampled map), as appended to u_list / ul_list.
        self.u_up = [[u_map(k) for _ in range(nr + 1)] for k in range(self.LEVELS)]
        self.ul_up = [[ul_map(k) for _ in range(nr + 1)] for k in range(self.LEVELS)]
        self.up_u_res = [resnets(net.up_u[k], k) for k in range(self.LEVELS)]
        self.up_ul_res = [resnets(net.up_ul[k], k) for k in range(self.LEVELS)]

        # Down pass (index `level` runs as forward's does: resolution k = 2, 1, 0). Pair each
        # layer with the kept map it pops, in the forward pass's order.
        u_list = [m for k in range(self.LEVELS) for m in self.u_up[k]]
        ul_list = [m for k in range(self.LEVELS) for m in self.ul_up[k]]
        self.u_start, self.ul_start = u_list.pop(), ul_list.pop()
        self.down_u_res, self.down_ul_res, self.u_short, self.ul_short = [], [], [], []
        self.u_down: list[list[PaddedMap]] = []  # u after each down layer (the ul layers read it)
        for level in range(self.LEVELS):
            k = self.LEVELS - 1 - level
            depth = len(net.down_u[level])
            self.down_u_res.append(resnets(net.down_u[level], k))
            self.down_ul_res.append(resnets(net.down_ul[level], k))
            shorts = [(u_list.pop(), ul_list.pop()) for _ in range(depth)]
            self.u_short.append([s[0] for s in shorts])
            self.ul_short.append([s[1] for s in shorts])
            self.u_down.append([u_map(k) for _ in range(depth)])
        if u_list or ul_list:  # pragma: no cover  (structural invariant, as in forward)
            raise RuntimeError("internal error: unused up-pass outputs")
        # Up-sampled inputs of the down pass at levels 0 and 1 (written from the level below).
        self.u_upsampled = [u_map(k) for k in range(self.LEVELS - 1)]
        self.ul_upsampled = [ul_map(k) for k in range(self.LEVELS - 1)]

    def plan(self, i: int, j: int) -> Hashable:
        # (first pixel, first column, levels of the u rows computed, levels of the ul positions)
        row_levels = self._levels(i) if j == 0 else ()
        return ((i, j) == (0, 0), j == 0, i == 0, row_levels, self._levels(i, j))

    def advance(
        self, canvas: Tensor, i: Position, j: Position, plan: Hashable, features: bool
    ) -> Tensor | None:
        first, column0, row0, row_levels, px_levels = plan  # type: ignore[misc]
        if not first:
            # The previous pixel is final now (and with it every pixel before (i, j)).
            pi, pj = (i - 1, self.width - 1) if column0 else (i, j - 1)
            px = select(select(canvas, 2, pi), 2, pj)
            self.x_pad.write_px(pi, pj, torch.cat([px, px.new_ones(px.shape[0], 1)], dim=1))
        if column0:
            self._u_rows(i, row0, row_levels)
        ul = self._ul_pixels(i, j, column0, px_levels)
        return F.elu(ul) if features else None

    def _levels(self, *coords: int) -> tuple[int, ...]:
        """Levels ``k`` whose grid contains image position ``coords`` (all multiples of 2^k)."""
        return tuple(k for k in range(self.LEVELS) if all(c % (1 << k) == 0 for c in coords))

    def _u_rows(self, i: Position, row0: bool, levels: tuple[int, ...]) -> None:
        """The ``u`` stream at every level's row that image row ``i`` makes computable
        (``row0``: ``i == 0``; ``levels``: ``_levels(i)``)."""
        for k in levels:  # up pass, full resolution first
            a = i >> k
            if k == 0:
                if row0:  # down_shift fills row 0 with zeros
                    x = self.x_pad.data.new_zeros(self.n, self.filters, 1, self.width)
                    self.ul_above_row.zero_()
                else:
                    # down_shift: row i is the 2x3 convolution's row i - 1 (image rows i-2, i-1).
                    x = self.u_init.rows(self.x_pad.rows(i - 1, 2))
                    self.ul_above_row.copy_(self.ul_above.rows(self.x_pad.rows(i - 1, 1))[:, :, 0])
            else:
                # Stride 2: row a reads rows 2a - 1 .. 2a of the level above (final by now).
                x = self.down_u[k - 1].rows(self.u_up[k - 1][-1].rows(2 * a, 2))
            self.u_up[k][0].write_row(a, x)
            for m, res in enumerate(self.up_u_res[k]):
                x = res.row(a, x, None)
                self.u_up[k][m + 1].write_row(a, x)
        for level in range(self.LEVELS):  # down pass, lowest resolution first
            k = self.LEVELS - 1 - level
            if k not in levels:
                continue
            a = i >> k
            u = self.u_start.row(a) if level == 0 else self.u_upsampled[k].row(a)
            for m, res in enumerate(self.down_u_res[level]):
                u = res.row(a, u, self.u_short[level][m].row(a))
                self.u_down[level][m].write_row(a, u)
            if k > 0:
                # Kernel height = stride: rows 2a, 2a + 1 above come from row a alone.
                out = self.up_u[level].rows(u)
                side, wide = self.up_u_side[level], 2 * (self.width >> k)
                for d in range(2):
                    row = out[:, :, d : d + 1, side : side + wide]
                    self.u_upsampled[k - 1].write_row(2 * a + d, row)

    def _ul_pixels(
        self, i: Position, j: Position, column0: bool, levels: tuple[int, ...]
    ) -> Tensor:
        """The ``ul`` stream at every level's position that pixel ``(i, j)`` makes computable
        (``column0``: ``j == 0``; ``levels``: ``_levels(i, j)``); returns the full-resolution
        output ``(n, F)`` at ``(i, j)``."""
        for k in levels:  # up pass
            a, b = i >> k, j >> k
            if k == 0:
                # right_shift of the down-right 2x1 conv: its output at (i, j - 1), zero at j = 0.
                x = select(self.ul_above_row, 2, j)
                if not column0:
                    x = x + self.ul_left.at(self.x_pad.window(i, j - 1, 2, 1))
            else:
                x = self.down_ul[k - 1].at(self.ul_up[k - 1][-1].window(2 * a, 2 * b, 2, 2))
            self.ul_up[k][0].write_px(a, b, x)
            for m, res in enumerate(self.up_ul_res[k]):
                x = res.pixel(a, b, x, self.u_up[k][m + 1].px(a, b))
                self.ul_up[k][m + 1].write_px(a, b, x)
        for level in range(self.LEVELS):  # down pass
            k = self.LEVELS - 1 - level
            if k not in levels:
                continue
            a, b = i >> k, j >> k
            ul = self.ul_start.px(a, b) if level == 0 else self.ul_upsampled[k].px(a, b)
            for m, res in enumerate(self.down_ul_res[level]):
                u = self.u_down[level][m].px(a, b)
                aux = torch.cat([u, self.ul_short[level][m].px(a, b)], dim=1)
                ul = res.pixel(a, b, ul, aux)
            if k > 0:
                # Kernel = stride: the 2x2 block at (2a, 2b) above comes from (a, b) alone.
                block = self.up_ul[level].spread(ul)  # (n, F, 2, 2)
                for d in range(2):
                    for e in range(2):
                        self.ul_upsampled[k - 1].write_px(2 * a + d, 2 * b + e, block[:, :, d, e])
        return ul
