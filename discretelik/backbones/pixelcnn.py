"""PixelCNN backbone (van den Oord, Kalchbrenner & Kavukcuoglu 2016, "Pixel Recurrent Neural
Networks", ICML, arXiv:1601.06759; the convolutional variant of Section 3.5 / Figure 5).

Layout, for ``h = hidden_channels``::

    x (B, C, H, W)
    -> 7x7 conv, mask A                              (B, 2h, H, W)
    -> n_layers x residual block:
         ReLU, 1x1 mask B 2h->h, [+ conditioning],
         ReLU, 3x3 mask B h->h,
         ReLU, 1x1 mask B h->2h,  + block input
    -> ReLU, 1x1 mask B 2h->out_channels, ReLU       (B, out_channels, H, W)

Departures from the paper:

* The paper ends with two "ReLU + 1x1 mask B" output layers and a 256-way softmax. Here the
  backbone keeps the first of them and ends with a ReLU; the second is the head's own 1x1
  projection, so any head (softmax, logistic mixture, Gaussian) can sit on top.
* ``channel_groups=1`` gives the whole-pixel variant (no R -> G -> B order inside a pixel),
  which the paper does not use; heads that model a pixel's channels jointly need it.
* Conditioning (class label, spatial map) is not in this paper; it follows the Conditional
  PixelCNN (van den Oord et al. 2016b): a per-block term ``V^T y + V * s`` added to the
  ``h`` features in front of each block's 3x3 convolution.

The plain PixelCNN has a *blind spot*: stacked masked 3x3 convolutions never reach the pixels
up and to the right of the target beyond a diagonal (e.g. ``(i - 1, j + 4)`` is unseen while
``(i - 2, j + 4)`` is seen). The Gated PixelCNN (``"gated_pixelcnn"``) removes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int
from ..nn.gated import ConditionBias, check_condition_options
from ..nn.masked_conv import MaskedConv2d
from ..registry import register_backbone
from .base import Backbone, Conditioning

__all__ = ["PixelCNN", "PixelCNNConfig"]


@dataclass
class PixelCNNConfig:
    """Options of the ``"pixelcnn"`` backbone.

    Attributes:
        in_channels: Image channels ``C`` (3 for RGB, 1 for grey).
        hidden_channels: ``h``. The residual stream has ``2h`` channels and each block narrows
            to ``h`` around its 3x3 convolution, as in the paper's Figure 5. The defaults are the
            ``"paper"`` preset.
        n_layers: Number of residual blocks (the paper's CIFAR-10 PixelCNN has 15).
        out_channels: Feature channels handed to the head (the first of the paper's two 1x1
            output layers; the head's projection is the second).
        first_kernel_size: Odd size of the first, mask-A convolution (7 in the paper): it sets
            the initial receptive field before the 3x3 blocks grow it.
        kernel_size: Odd size of the mask-B convolution inside each block (3 in the paper).
        channel_groups: ``1`` (features see whole previous pixels only) or ``in_channels``
            (features form ``C`` ordered blocks; block ``c`` also sees channels ``< c`` of the
            current pixel). ``build()`` picks ``in_channels`` for heads that support it.
        num_classes: Number of classes for class-conditional modelling, or ``None``.
        cond_channels: Channels of a spatial conditioning map ``(B, cond_channels, h, w)``, or
            ``None``. The map is resized to ``H x W`` and added through a 1x1 convolution per
            block.
        cond_upsample: ``"nearest"`` (discrete codes stay codes) or ``"bilinear"`` resizing of
            the map.
    """

    in_channels: int = 3
    hidden_channels: int = 129
    n_layers: int = 15
    out_channels: int = 1026
    first_kernel_size: int = 7
    kernel_size: int = 3
    channel_groups: int = 1
    num_classes: int | None = None
    cond_channels: int | None = None
    cond_upsample: str = "nearest"


#: Named presets. ``"paper"``: the CIFAR-10 PixelCNN of the paper, 15 residual blocks around a
#: 7x7 mask-A input layer, 3x3 mask-B convolutions. The paper's ``h = 128`` (a 256-channel
#: stream) does not split into three equal colour blocks, so we round up to ``h = 129`` (258
#: channels, 86 per colour); the output width 1026 (about the paper's 1024, a multiple of 3) is
#: our choice. ``"tiny"``: about 3,000 parameters for CPU tests; every width is a multiple of 3
#: so ``channel_groups=3`` works.
PRESETS = {
    "tiny": dict(hidden_channels=6, n_layers=2, out_channels=24),
    "paper": dict(hidden_channels=129, n_layers=15, out_channels=1026),
}


def _check_odd(value: object, name: str) -> int:
    check_int(value, name, 1)
    if value % 2 == 0:  # type: ignore[operator]
        raise ValueError(f"{name} must be odd (the mask has a centre tap), got {value}")
    return value  # type: ignore[return-value]


def _validate(cfg: PixelCNNConfig) -> None:
    check_int(cfg.in_channels, "in_channels", 1)
    check_int(cfg.hidden_channels, "hidden_channels", 1)
    check_int(cfg.n_layers, "n_layers", 0)
    check_int(cfg.out_channels, "out_channels", 1)
    _check_odd(cfg.first_kernel_size, "first_kernel_size")
    _check_odd(cfg.kernel_size, "kernel_size")
    check_int(cfg.channel_groups, "channel_groups", 1)
    if cfg.channel_groups not in (1, cfg.in_channels):
        raise ValueError(
            f"channel_groups must be 1 or in_channels={cfg.in_channels}, got {cfg.channel_groups}"
        )
    for name in ("hidden_channels", "out_channels"):
        if getattr(cfg, name) % cfg.channel_groups:
            raise ValueError(
                f"{name} must be a multiple of channel_groups={cfg.channel_groups} (one block "
                f"of features per colour channel), got {getattr(cfg, name)}"
            )
    check_condition_options(cfg.num_classes, cfg.cond_channels, cfg.cond_upsample)


class ResidualBlock(nn.Module):
    """The paper's residual block: ``2h -> h -> h -> 2h`` with ReLUs, mask B throughout.

    Args:
        hidden_channels: ``h``.
        kernel_size: Odd size of the middle convolution.
        groups: Colour groups of the masks (``1`` or ``C``).
        cond: Conditioning term for the ``h`` features, or ``None``.

    Shapes:
        ``(B, 2h, H, W) -> (B, 2h, H, W)``.
    """

    def __init__(
        self, hidden_channels: int, kernel_size: int, groups: int, cond: ConditionBias | None
    ) -> None:
        super().__init__()
        h = hidden_channels
        # 1x1 convolutions are masked too: with groups > 1 they must not mix a later colour's
        # features into an earlier one's (with groups == 1 the mask is all ones).
        self.reduce = MaskedConv2d(2 * h, h, 1, "B", groups)
        self.conv = MaskedConv2d(h, h, kernel_size, "B", groups)
        self.expand = MaskedConv2d(h, 2 * h, 1, "B", groups)
        self.cond = cond

    def forward(self, x: Tensor, label: Tensor | None, cmap: Tensor | None) -> Tensor:
        y = self.reduce(F.relu(x))
        if self.cond is not None:
            c = self.cond(label, cmap, tuple(x.shape[-2:]))
            if c is not None:
                y = y + c
        y = self.expand(F.relu(self.conv(F.relu(y))))
        return x + y


@register_backbone("pixelcnn", config=PixelCNNConfig, presets=PRESETS)
class PixelCNN(Backbone):
    """PixelCNN of van den Oord et al. (2016): a 7x7 mask-A convolution, residual blocks of
    masked convolutions, a 1x1 output layer.

    Causality contract:

    * ``channel_groups == 1``: features at ``(i, j)`` depend only on pixels strictly before
      ``(i, j)`` in raster order (whole previous pixels); use with heads that model a pixel's
      channels jointly (e.g. ``"dlm"``, ``"gaussian"``).
    * ``channel_groups == C``: features are ``C`` contiguous blocks of ``out_channels // C``;
      block ``c`` at ``(i, j)`` also sees channels ``< c`` of pixel ``(i, j)``, so with the
      ``"softmax"`` head G depends on R, and B on R and G, of the same pixel.

    The receptive field has the PixelCNN blind spot (see the module docstring).

    Args:
        config: A ``PixelCNNConfig``.

    Raises:
        ValueError: A config field is out of range or a channel count is not a multiple of
            ``channel_groups`` (the message names the field).
        TypeError: A config field has the wrong type.
    """

    supports_channel_groups = True

    def __init__(self, config: PixelCNNConfig) -> None:
        super().__init__()
        _validate(config)
        self.config = config
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.channel_groups = config.channel_groups
        self.num_classes = config.num_classes
        self.cond_channels = config.cond_channels
        g, h = config.channel_groups, config.hidden_channels
        conditional = config.num_classes is not None or config.cond_channels is not None
        cond_args = (config.num_classes, config.cond_channels, config.cond_upsample)
        self.input = MaskedConv2d(config.in_channels, 2 * h, config.first_kernel_size, "A", g)
        self.blocks = nn.ModuleList(
            ResidualBlock(
                h,
                config.kernel_size,
                g,
                ConditionBias(h, *cond_args) if conditional else None,
            )
            for _ in range(config.n_layers)
        )
        self.output = MaskedConv2d(2 * h, config.out_channels, 1, "B", g)

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
        y = self.input(x)  # (B, 2h, H, W)
        for block in self.blocks:
            y = block(y, label, cmap)
        return F.relu(self.output(F.relu(y)))
