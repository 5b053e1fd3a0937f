"""Gated PixelCNN backbone (van den Oord, Kalchbrenner, Vinyals, Espeholt, Graves & Kavukcuoglu
2016, "Conditional Image Generation with PixelCNN Decoders", NeurIPS, arXiv:1606.05328).

Two stacks per layer (Figure 2 of the paper), ``p = hidden_channels``, ``k = kernel_size``,
``r = k // 2``::

    v_pre = VerticalConv(v)                      rows i-r..i, cols j-r..j+r     (B, 2p, H, W)
    h_pre = HorizontalConv(h) + 1x1(down_shift(v_pre))                          (B, 2p, H, W)
    v_pre, h_pre += V^T y + V * s                (conditioning, optional)
    v' = tanh(v_pre_f) * sigmoid(v_pre_g)                                       (B, p, H, W)
    h' = h + 1x1(tanh(h_pre_f) * sigmoid(h_pre_g))     (no residual in layer 0)

The vertical stack grows a rectangle above the pixel; moving it one row down before it enters
the horizontal stack keeps the current row out of it, and the horizontal stack adds the pixels
to the left. Together they cover every earlier pixel within reach: there is no blind spot.
Layer 0 reads the image, so its horizontal convolution is type A (columns ``j - r .. j - 1``);
after ``L`` layers output ``(i, j)`` sees exactly rows ``i - 1 - L r .. i - 1`` x columns
``j - L r .. j + L r``, plus row ``i`` columns ``j - L r .. j - 1``. Features at ``(i, j)``
therefore depend on whole previous pixels only (``supports_channel_groups = False``): the
paper's R -> G -> B masks inside a pixel are not implemented, so heads that order channels
get ``channel_groups = 1`` from ``build()``.

Departures from the paper:

* No colour-channel masks (see above); the stacks are written as shifted convolutions.
* The output is ``ReLU -> 1x1 -> ReLU`` to ``out_channels`` features; the head's projection
  is the final layer.
* Optional skip connections (``skip_connections=True``): the sum of a 1x1 projection of every
  layer's gated horizontal output replaces the last horizontal state as the output's input.
* The spatial conditioning map is resized to ``H x W`` (nearest or bilinear) instead of being
  produced at full resolution by a learned deconvolution network; put such a network in
  front if you need one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int
from ..nn.gated import (
    ConditionBias,
    HorizontalConv2d,
    VerticalConv2d,
    check_condition_options,
    gated_activation,
)
from ..nn.shifted_conv import down_shift
from ..registry import register_backbone
from .base import Backbone, Conditioning
from .gated_pixelcnn_cache import GatedPixelCNNCache

__all__ = ["GatedPixelCNN", "GatedPixelCNNConfig"]


@dataclass
class GatedPixelCNNConfig:
    """Options of the ``"gated_pixelcnn"`` backbone.

    Attributes:
        in_channels: Image channels ``C``.
        hidden_channels: ``p``, channels of both stacks (the gates work on ``2p``).
        n_layers: Number of gated layers ``L``; with ``kernel_size = 2r + 1`` the receptive
            field reaches ``L r`` pixels left, right and up (plus one row for the shift).
        kernel_size: Odd ``k >= 3``; vertical kernels are ``(r + 1) x k``, horizontal
            ``1 x (r + 1)``.
        out_channels: Feature channels handed to the head.
        skip_connections: Sum a 1x1 projection of every layer's gated output into the output
            (helps gradients in deep stacks) instead of using only the last layer.
        num_classes: Number of classes for class-conditional modelling (``V^T y`` per layer),
            or ``None``.
        cond_channels: Channels of a spatial map ``(B, cond_channels, h, w)`` (e.g. one-hot
            VQ-VAE codes or a VAE latent), or ``None``. It is resized to ``H x W`` and enters
            every layer's gates through a 1x1 convolution.
        cond_upsample: ``"nearest"`` (discrete codes stay codes) or ``"bilinear"``.
    """

    in_channels: int = 3
    hidden_channels: int = 384
    n_layers: int = 20
    kernel_size: int = 5
    out_channels: int = 1024
    skip_connections: bool = False
    num_classes: int | None = None
    cond_channels: int | None = None
    cond_upsample: str = "nearest"


#: Named presets. ``"paper"``: the configuration the paper gives for its ImageNet models, 20
#: layers of 384 channels with 5x5 filters; the output width 1024 is our choice. ``"tiny"``: a
#: few thousand parameters for CPU tests.
PRESETS = {
    "tiny": dict(hidden_channels=8, n_layers=3, kernel_size=3, out_channels=16),
    "paper": dict(hidden_channels=384, n_layers=20, kernel_size=5, out_channels=1024),
}


def _validate(cfg: GatedPixelCNNConfig) -> None:
    check_int(cfg.in_channels, "in_channels", 1)
    check_int(cfg.hidden_channels, "hidden_channels", 1)
    check_int(cfg.n_layers, "n_layers", 1)
    check_int(cfg.kernel_size, "kernel_size", 3)
    if cfg.kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {cfg.kernel_size}")
    check_int(cfg.out_channels, "out_channels", 1)
    if not isinstance(cfg.skip_connections, bool):
        raise TypeError(f"skip_connections must be a bool, got {cfg.skip_connections!r}")
    check_condition_options(cfg.num_classes, cfg.cond_channels, cfg.cond_upsample)


class GatedLayer(nn.Module):
    """One layer of both stacks (Figure 2 of the paper).

    Args:
        in_channels: Channels of the incoming stacks (``C`` for layer 0, else ``p``).
        hidden_channels: ``p``.
        kernel_size: Odd ``k``.
        first: Layer 0: type-A horizontal convolution and no residual connection (the residual
            would add the current pixel of the image).
        cond: Conditioning term for both stacks' ``2p`` pre-activations (``4p`` channels), or
            ``None``.
        skip: Whether to return a 1x1 skip output.

    Shapes:
        ``v, h: (B, in_channels, H, W) -> v, h: (B, p, H, W)``, skip ``(B, p, H, W)`` or ``None``.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        kernel_size: int,
        first: bool,
        cond: ConditionBias | None,
        skip: bool,
    ) -> None:
        super().__init__()
        p = hidden_channels
        self.vertical = VerticalConv2d(in_channels, 2 * p, kernel_size)
        self.horizontal = HorizontalConv2d(in_channels, 2 * p, kernel_size, "A" if first else "B")
        self.link = nn.Conv2d(2 * p, 2 * p, 1)
        self.h_out = nn.Conv2d(p, p, 1)
        self.skip = nn.Conv2d(p, p, 1) if skip else None
        self.residual = not first
        self.cond = cond

    def forward(
        self, v: Tensor, h: Tensor, label: Tensor | None, cmap: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        v_pre = self.vertical(v)
        # v_pre at row i has read row i (including pixels right of j); one row down it only
        # carries rows < i into the horizontal stack.
        h_pre = self.horizontal(h) + self.link(down_shift(v_pre))
        if self.cond is not None:
            c = self.cond(label, cmap, tuple(v.shape[-2:]))
            if c is not None:
                c_v, c_h = c.chunk(2, dim=1)
                v_pre, h_pre = v_pre + c_v, h_pre + c_h
        gated = gated_activation(h_pre)
        h_new = self.h_out(gated)
        if self.residual:
            h_new = h + h_new
        skip = self.skip(gated) if self.skip is not None else None
        return gated_activation(v_pre), h_new, skip


@register_backbone("gated_pixelcnn", config=GatedPixelCNNConfig, presets=PRESETS)
class GatedPixelCNN(Backbone):
    """Gated PixelCNN: vertical and horizontal stacks of gated layers, no blind spot.

    Causality contract: features at ``(i, j)`` depend only on pixels strictly before ``(i, j)``
    in raster order (whole previous pixels; ``supports_channel_groups = False``, so
    ``channel_groups`` is always 1). Within ``L`` layers of radius ``r`` every such pixel in
    rows ``i - 1 - L r .. i - 1``, columns ``j - L r .. j + L r``, and in row ``i``, columns
    ``j - L r .. j - 1``, influences them.

    Args:
        config: A ``GatedPixelCNNConfig``.

    Raises:
        ValueError: A config field is out of range (the message names the field).
        TypeError: A config field has the wrong type.
    """

    supports_channel_groups = False

    def __init__(self, config: GatedPixelCNNConfig) -> None:
        super().__init__()
        _validate(config)
        self.config = config
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.num_classes = config.num_classes
        self.cond_channels = config.cond_channels
        p = config.hidden_channels
        conditional = config.num_classes is not None or config.cond_channels is not None
        cond_args = (config.num_classes, config.cond_channels, config.cond_upsample)
        self.layers = nn.ModuleList(
            GatedLayer(
                config.in_channels if i == 0 else p,
                p,
                config.kernel_size,
                first=i == 0,
                cond=ConditionBias(4 * p, *cond_args) if conditional else None,
                skip=config.skip_connections,
            )
            for i in range(config.n_layers)
        )
        self.output = nn.Conv2d(p, config.out_channels, 1)

    def forward(self, x: Tensor, cond: Conditioning = None) -> Tensor:
        """Features for every pixel.

        Args:
            x: float ``(B, in_channels, H, W)``, pixel values scaled to ``[-1, 1]``.
            cond: ``None``; int64 labels ``(B,)`` if built with ``num_classes``; a float map
                ``(B, cond_channels, h, w)`` (any ``h, w``; resized to ``H x W``) if built with
                ``cond_channels``; or ``{"label": ..., "map": ...}`` for both.

        Returns:
            float ``(B, out_channels, H, W)``, non-negative (ends with a ReLU).

        Raises:
            ValueError: Wrong image shape or channel count, or ``cond`` missing, unexpected or
                of the wrong shape.
            TypeError: ``x`` or ``cond`` of the wrong type or dtype.
        """
        self.check_input(x)
        label, cmap = self.split_cond(cond, x.shape[0])
        v = h = x
        skips = None
        for layer in self.layers:
            v, h, skip = layer(v, h, label, cmap)
            if skip is not None:
                skips = skip if skips is None else skips + skip
        y = h if skips is None else skips
        return F.relu(self.output(F.relu(y)))

    def sampling_cache(
        self, n: int, image_shape: tuple[int, int], cond: Conditioning = None
    ) -> GatedPixelCNNCache:
        """A cache for fast raster-order sampling of ``n`` images (Ramachandran et al. 2017).

        Its ``step(canvas, i, j)`` returns the features ``forward(canvas, cond)[:, :, i, j]``
        (``(n, out_channels)``) computing only the vertical stack's row ``i - 1`` (once per
        row) and the horizontal stack's column ``j``; see
        ``discretelik.backbones.gated_pixelcnn_cache``.

        Args:
            n: Number of images.
            image_shape: ``(H, W)``.
            cond: Conditioning for the ``n`` images, as for ``forward``.

        Returns:
            A [`GatedPixelCNNCache`][discretelik.GatedPixelCNNCache].
        """
        return GatedPixelCNNCache(self, n, image_shape, cond)
