"""Fast raster-order sampling: cache every layer's activations, compute only what a pixel changes.

Reference: P. Ramachandran, T. L. Paine, P. Khorrami, M. Babaeizadeh, S. Chang, Y. Zhang,
M. A. Hasegawa-Johnson, R. H. Campbell, T. S. Huang, "Fast Generation for Convolutional
Autoregressive Models", ICLR 2017 workshop, https://arxiv.org/abs/1704.06001.

The generic sampler ([`sample_raster`][discretelik.sample_raster]) runs the whole network once
per pixel, although a new pixel only changes the activations that lie "after" it. A sampling
cache keeps every layer's activations (inputs padded as the layer's convolution pads them) and,
when the sampler moves to pixel ``(i, j)``, computes each layer at the few positions that have
just become computable, from the cached inputs:

* **Gated PixelCNN** (``GatedPixelCNNCache``): the vertical stack at row ``i`` reads rows
  ``<= i`` of its input, and the horizontal stack only needs it one row down, so at the start
  of row ``i`` every vertical layer is computed for row ``i - 1`` (one row, ``W`` columns);
  per pixel every horizontal layer is computed at column ``j`` only, from its ``r + 1`` cached
  input columns ``j - r .. j``.
* **PixelCNN++** (``PixelCNNPPCache``): at resolution level ``k`` (``H / 2^k`` rows) the ``u``
  stream's row ``a`` depends on image rows ``< 2^k a`` only, and the ``ul`` stream's position
  ``(a, b)`` on image pixels before ``(2^k a, 2^k b)`` only. So at the start of image row ``i``
  the ``u`` stream is computed for row ``i / 2^k`` of every level that ``i`` is a multiple of
  ``2^k`` for (up pass, then down pass), and at pixel ``(i, j)`` the ``ul`` stream for position
  ``(i / 2^k, j / 2^k)`` of every level that divides both. A stride-2 convolution reads input
  rows ``2a - 1 .. 2a`` (final by then); a stride-2 transposed convolution writes output rows
  ``2a, 2a + 1`` from input row ``a`` alone (kernel height = stride), so its output is written
  as soon as its input row (``u``) or position (``ul``) is done. The U-Net's short-cuts are the
  cached up-pass maps, paired with the down-pass layers exactly as the forward pass pops them.

Both caches give the backbone's features at ``(i, j)`` up to floating-point rounding (the same
operations on smaller inputs), in evaluation mode (dropout off). Per pixel they cost
``O(layers)`` small convolutions instead of a forward pass over the whole image, which is the
speed-up of the paper (``O(L)`` instead of ``O(L H W)`` work per pixel for ``L`` layers).

Backbones opt in by providing ``sampling_cache(n, image_shape, cond)``;
[`sample_raster`][discretelik.sample_raster] falls back to full recomputation for every other
backbone, and for ordered channel groups. Used directly::

    net = create_backbone("pixelcnn++", preset="tiny").eval()
    cache = net.sampling_cache(n, (H, W))
    for i in range(H):
        for j in range(W):
            features = cache.step(canvas, i, j)  # (n, F) == net(canvas)[:, :, i, j]
            canvas[:, :, i, j] = ...  # draw pixel (i, j) from the head at these features

Memory: every layer's input (and, for PixelCNN++, hidden) activations for the whole image,
about what one full forward pass keeps for backpropagation.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nn.activations import concat_elu
from .nn.gated import gated_activation

if TYPE_CHECKING:
    from .backbones.base import Conditioning
    from .backbones.gated_pixelcnn import GatedPixelCNN
    from .backbones.pixelcnn_pp import GatedResNet, PixelCNNPP

__all__ = ["GatedPixelCNNCache", "PixelCNNPPCache", "SamplingCache"]


def _check_image_shape(image_shape: object, multiple: int, name: str) -> tuple[int, int]:
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


class _Conv:
    """A convolution's weights, read once, applied where the cache needs it.

    Reading ``weight`` of a weight-normed layer recomputes ``g v / ||v||``, so it is read once
    per cache. Whole rows go through ``F.conv2d`` / ``F.conv_transpose2d``; a single output
    position is a matrix product of the flattened input window, which for these tiny inputs is
    several times cheaper than a convolution call.

    Args:
        conv: An ``nn.Conv2d`` or ``nn.ConvTranspose2d`` (possibly weight-normed).
    """

    def __init__(self, conv: nn.Module) -> None:
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


class _Padded:
    """A feature map ``(n, C, h, w)`` stored inside the zero padding a shifted convolution uses.

    Positions are written as they become final; windows are read as padded slices, so a
    convolution without padding on a window gives the padded convolution's output there.

    Args:
        like: Tensor whose dtype and device the buffer takes.
        n, c, h, w: Map shape.
        top, left, right: Zero rows above and columns left and right of the map.
    """

    def __init__(
        self, like: Tensor, n: int, c: int, h: int, w: int, top: int, left: int, right: int
    ) -> None:
        self.data = like.new_zeros(n, c, h + top, w + left + right)
        self.top, self.left, self.w = top, left, w

    def write_row(self, a: int, row: Tensor) -> None:
        """Store row ``a`` (``row``: ``(n, C, 1, w)``)."""
        t, l = self.top, self.left
        self.data[:, :, a + t : a + t + 1, l : l + self.w] = row

    def write_px(self, a: int, b: int, px: Tensor) -> None:
        """Store position ``(a, b)`` (``px``: ``(n, C)``)."""
        self.data[:, :, a + self.top, b + self.left] = px

    def rows(self, a: int, kh: int) -> Tensor:
        """Rows ``a - kh + 1 .. a`` with their side padding: ``(n, C, kh, left + w + right)``."""
        t = self.top
        return self.data[:, :, a + t - kh + 1 : a + t + 1]

    def window(self, a: int, b: int, kh: int, kw: int) -> Tensor:
        """Rows ``a - kh + 1 .. a`` x columns ``b - kw + 1 .. b``: ``(n, C, kh, kw)``."""
        t, l = self.top, self.left
        return self.data[:, :, a + t - kh + 1 : a + t + 1, b + l - kw + 1 : b + l + 1]

    def row(self, a: int) -> Tensor:
        """Row ``a`` without padding: ``(n, C, 1, w)``."""
        t, l = self.top, self.left
        return self.data[:, :, a + t : a + t + 1, l : l + self.w]

    def px(self, a: int, b: int) -> Tensor:
        """Position ``(a, b)``: ``(n, C)``."""
        return self.data[:, :, a + self.top, b + self.left]


class SamplingCache(abc.ABC):
    """Incremental features of a backbone for ``n`` images filled in raster order.

    Call ``step`` with strictly increasing raster positions. When it is called for
    ``(i, j)``, every pixel before ``(i, j)`` in the canvas must be final; positions the caller
    skips (e.g. known pixels) are caught up on the next call, reading their final values from
    the canvas then. A cache serves one draw of one image size; build a new one per draw.

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
            self._advance(canvas, *divmod(self._next, self.width), features=False)
            self._next += 1
        out = self._advance(canvas, i, j, features=True)
        self._next += 1
        return out  # type: ignore[return-value]

    @abc.abstractmethod
    def _advance(self, canvas: Tensor, i: int, j: int, features: bool) -> Tensor | None:
        """Compute everything that becomes computable at ``(i, j)``; return its features."""


# -- Gated PixelCNN ---------------------------------------------------------------------------


class GatedPixelCNNCache(SamplingCache):
    """Sampling cache of the gated PixelCNN (built by ``GatedPixelCNN.sampling_cache``).

    Per layer ``l`` it keeps the vertical stack's input (all rows, padded like
    ``VerticalConv2d``), the horizontal stack's input for the current row (padded like
    ``HorizontalConv2d``) and the vertical stack's contribution ``link(down_shift(v_pre))`` to
    the current row. At the start of row ``i`` every vertical layer is computed at row
    ``i - 1``; at pixel ``(i, j)`` every horizontal layer is computed at column ``j``.

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
        h, w = _check_image_shape(image_shape, 1, type(net).__name__)
        super().__init__(n, net.in_channels, h, w)
        label, cmap = net.split_cond(cond, n)
        like = next(net.parameters()).detach()
        r = net.config.kernel_size // 2
        p = net.config.hidden_channels
        self.r = r
        self.layers = []
        self.v_in: list[Tensor] = []  # layer l's vertical input (n, C, r + H, r + W + r)
        self.h_in: list[Tensor] = []  # layer l's horizontal input at the current row (n, C, r + W)
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
                    vertical=_Conv(layer.vertical),
                    horizontal=_Conv(layer.horizontal),
                    link=_Conv(layer.link),
                    h_out=_Conv(layer.h_out),
                    skip=_Conv(layer.skip) if layer.skip is not None else None,
                    residual=layer.residual,
                    c_v=c_v,
                    c_h=c_h,
                )
            )
            self.v_in.append(like.new_zeros(n, cin, h + r, w + 2 * r))
            self.h_in.append(like.new_zeros(n, cin, w + r))
        self.output = _Conv(net.output)
        # down_shift puts zeros in row 0, so row 0's vertical contribution is link(0).
        zeros = like.new_zeros(n, 2 * p, 1, w)
        self.v_link = [lay["link"].rows(zeros)[:, :, 0] for lay in self.layers]  # (n, 2p, W)

    def _advance(self, canvas: Tensor, i: int, j: int, features: bool) -> Tensor | None:
        r = self.r
        if j == 0 and i > 0:
            self._vertical_row(canvas, i - 1)
        if j > 0:
            # Pixel (i, j - 1) is final now: the first horizontal layer may read it.
            self.h_in[0][:, :, r + j - 1] = canvas[:, :, i, j - 1]
        skips = None
        y = None
        last = len(self.layers) - 1
        for l, lay in enumerate(self.layers):
            if l == 0:
                # Type A: columns j - r .. j - 1 (the current pixel is not read).
                window = self.h_in[0][:, :, j : j + r]
            else:
                window = self.h_in[l][:, :, j : j + r + 1]  # columns j - r .. j
            h_pre = lay["horizontal"].at(window) + self.v_link[l][:, :, j]  # (n, 2p)
            if lay["c_h"] is not None:
                h_pre = h_pre + lay["c_h"][:, :, i, j]
            gated = gated_activation(h_pre)  # (n, p)
            h_new = lay["h_out"].at(gated)
            if lay["residual"]:
                h_new = self.h_in[l][:, :, r + j] + h_new
            if lay["skip"] is not None:
                s = lay["skip"].at(gated)
                skips = s if skips is None else skips + s
            if l < last:
                self.h_in[l + 1][:, :, r + j] = h_new
            else:
                y = h_new
        if not features:
            return None
        y = y if skips is None else skips
        return F.relu(self.output.at(F.relu(y)))

    def _vertical_row(self, canvas: Tensor, t: int) -> None:
        """Compute every vertical layer at row ``t`` (all of rows ``<= t`` are final)."""
        r, w = self.r, self.width
        self.v_in[0][:, :, t + r, r : r + w] = canvas[:, :, t]
        last = len(self.layers) - 1
        for l, lay in enumerate(self.layers):
            v_pre = lay["vertical"].rows(self.v_in[l][:, :, t : t + r + 1])  # (n, 2p, 1, W)
            # forward's down_shift(v_pre) puts row t at row t + 1: the next row's contribution.
            self.v_link[l] = lay["link"].rows(v_pre)[:, :, 0]
            if l < last:  # the last layer's vertical output feeds nothing
                if lay["c_v"] is not None:
                    v_pre = v_pre + lay["c_v"][:, :, t : t + 1]
                self.v_in[l + 1][:, :, t + r, r : r + w] = gated_activation(v_pre)[:, :, 0]


# -- PixelCNN++ ---------------------------------------------------------------------------------


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
        self.x_elu = _Padded(like, n, f2, h, w, top, left, right)
        self.c1_elu = _Padded(like, n, f2, h, w, top, left, right)
        self.conv1 = _Conv(conv1.conv)
        self.conv2 = _Conv(conv2.conv)
        self.aux = _Conv(layer.aux.conv) if layer.aux is not None else None
        self.class_term = None  # (n, 2F)
        if layer.class_proj is not None:
            self.class_term = F.embedding(label, layer.class_proj.detach())

    def row(self, a: int, x: Tensor, aux: Tensor | None) -> Tensor:
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

    def pixel(self, a: int, b: int, x: Tensor, aux: Tensor | None) -> Tensor:
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
        h, w = _check_image_shape(image_shape, net.size_multiple, type(net).__name__)
        super().__init__(n, net.in_channels, h, w)
        label, _ = net.split_cond(cond, n)  # int64 already (split_cond)
        like = next(net.parameters()).detach()
        f, nr = net.config.nr_filters, net.config.nr_resnet
        self.filters = f
        sizes = [(h >> k, w >> k) for k in range(self.LEVELS)]

        def resnets(layers: nn.ModuleList, k: int) -> list[_ResNetCache]:
            return [_ResNetCache(m, like, n, *sizes[k], label) for m in layers]

        def u_map(k: int) -> _Padded:  # padded like the stride-2 down-shifted 2x3 conv
            return _Padded(like, n, f, *sizes[k], 1, 1, 1)

        def ul_map(k: int) -> _Padded:  # padded like the stride-2 down-right 2x2 conv
            return _Padded(like, n, f, *sizes[k], 1, 1, 0)

        # The image with its ones channel, padded for the first layers (1 row up, 1 each side).
        self.x_pad = _Padded(like, n, net.in_channels + 1, h, w, 1, 1, 1)
        self.u_init = _Conv(net.u_init.conv)
        self.ul_above = _Conv(net.ul_init_above.conv)
        self.ul_left = _Conv(net.ul_init_left.conv)
        self.ul_above_row = like.new_zeros(n, f, w)  # down_shift(conv_1x3(x)) at this row
        self.down_u = [_Conv(m.conv) for m in net.downsample_u]
        self.down_ul = [_Conv(m.conv) for m in net.downsample_ul]
        self.up_u = [_Conv(m.conv) for m in net.upsample_u]
        self.up_ul = [_Conv(m.conv) for m in net.upsample_ul]
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
        self.u_down: list[list[_Padded]] = []  # u after each down layer (the ul layers read it)
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

    def _advance(self, canvas: Tensor, i: int, j: int, features: bool) -> Tensor | None:
        if (i, j) != (0, 0):
            # The previous pixel is final now (and with it every pixel before (i, j)).
            pi, pj = divmod(i * self.width + j - 1, self.width)
            px = canvas[:, :, pi, pj]
            self.x_pad.write_px(pi, pj, torch.cat([px, px.new_ones(px.shape[0], 1)], dim=1))
        if j == 0:
            self._u_rows(i)
        ul = self._ul_pixels(i, j)
        return F.elu(ul) if features else None

    def _levels(self, *coords: int) -> list[int]:
        """Levels ``k`` whose grid contains image position ``coords`` (all multiples of 2^k)."""
        return [k for k in range(self.LEVELS) if all(c % (1 << k) == 0 for c in coords)]

    def _u_rows(self, i: int) -> None:
        """The ``u`` stream at every level's row that image row ``i`` makes computable."""
        levels = self._levels(i)
        for k in levels:  # up pass, full resolution first
            a = i >> k
            if k == 0:
                if i == 0:  # down_shift fills row 0 with zeros
                    x = self.x_pad.data.new_zeros(self.n, self.filters, 1, self.width)
                    self.ul_above_row = x[:, :, 0]
                else:
                    # down_shift: row i is the 2x3 convolution's row i - 1 (image rows i-2, i-1).
                    x = self.u_init.rows(self.x_pad.rows(i - 1, 2))
                    self.ul_above_row = self.ul_above.rows(self.x_pad.rows(i - 1, 1))[:, :, 0]
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

    def _ul_pixels(self, i: int, j: int) -> Tensor:
        """The ``ul`` stream at every level's position that pixel ``(i, j)`` makes computable;
        returns the full-resolution output ``(n, F)`` at ``(i, j)``."""
        levels = self._levels(i, j)
        for k in levels:  # up pass
            a, b = i >> k, j >> k
            if k == 0:
                # right_shift of the down-right 2x1 conv: its output at (i, j - 1), zero at j = 0.
                x = self.ul_above_row[:, :, j]
                if j > 0:
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
