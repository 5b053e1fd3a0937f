"""PixelCNN++ backbone: the two-stream U-Net of Salimans et al. (2017).

Reference: T. Salimans, A. Karpathy, X. Chen, D. P. Kingma, "PixelCNN++: Improving the
PixelCNN with Discretized Logistic Mixture Likelihood and Other Modifications", ICLR 2017,
https://arxiv.org/abs/1701.05517, and its code, https://github.com/openai/pixel-cnn
(``pixel_cnn_pp/model.py``, ``pixel_cnn_pp/nn.py``), which fixes details the paper leaves
open. This module is written from that design:

* The image (scaled to ``[-1, 1]``) gets an extra all-ones channel, so the network can tell
  image from zero padding.
* Two streams: ``u`` sees the rows above (2x3 down-shifted convolutions), ``ul`` sees the rows
  above and the pixels to the left (2x2 down-right-shifted convolutions). The first layers are
  ``u = down_shift(conv_2x3(x))`` and
  ``ul = down_shift(conv_1x3(x)) + right_shift(conv_2x1(x))``.
* Six blocks of gated residual layers. Up pass: three blocks of ``nr_resnet`` layers, with a
  stride-2 shifted convolution after the first two; every output (including the first layers
  and the down-sampled maps) is kept. Down pass: blocks of ``nr_resnet``, ``nr_resnet + 1``
  and ``nr_resnet + 1`` layers, with a stride-2 shifted transposed convolution before the last
  two; each layer consumes one kept up-pass output as its short-cut (``u`` layer:
  ``aux = u_list.pop()``; ``ul`` layer: ``aux = concat(u, ul_list.pop())``), so all
  ``3 nr_resnet + 2`` kept outputs after the top one are used.
* Gated residual layer: ``c1 = conv(concat_elu(x)) [+ nin(concat_elu(aux))]``;
  ``c2 = conv(dropout(concat_elu(c1)))`` with ``2F`` channels ``[+ class projection]``;
  ``out = x + a * sigmoid(b)`` for ``a, b = split(c2)``. Dropout is element-wise
  (``tf.nn.dropout``), not channel-wise.
* Weight normalisation on every convolution, transposed convolution and NIN, with openai's
  data-dependent initialisation available as
  [`data_dependent_init`][discretelik.nn.weight_norm.data_dependent_init].

Receptive field (a property of the design, shared with openai): rows well above a pixel are
covered through the low resolutions, but pixels of the *current* row reach it only through the
full-resolution ``ul`` convolutions, ``4 nr_resnet + 2`` columns to the left (the first layer
sees 1, the first up block adds ``2 nr_resnet``, the last down block's first layer reads that
through its short-cut and it and the later layers add ``1 + 2 nr_resnet``); likewise the row
just above is seen ``4 nr_resnet + 2`` columns to the right. With the paper's ``nr_resnet=5``,
pixel ``(31, 31)`` of a 32x32 image does not see pixels ``(31, 0..8)``; ``nr_resnet >= 8``
covers every earlier pixel at 32x32.

Where we depart from openai/pixel-cnn:

* The backbone returns ``elu(ul)`` (``F = nr_filters`` channels); openai's last layer, a
  weight-normed ``nin`` to ``10 K`` mixture parameters, is the head's 1x1 projection here, so
  the same backbone serves every head. The head's projection is a plain ``nn.Conv2d``, which
  has no ``g``: ``build("pixelcnn++", "dlm")`` has ``10 K`` fewer parameters than openai
  (53,658,980 vs 53,659,080 for the paper configuration); weight-normalise the projection with
  [`apply_weight_norm`][discretelik.nn.weight_norm.apply_weight_norm] to match exactly.
* Class conditioning looks up a row of a per-layer ``(num_classes, 2F)`` matrix (openai:
  ``one_hot(label) @ hw``, the same map), initialised ``N(0, 0.05)`` as in openai.
* Without data-dependent init, the layers keep PyTorch's default initialisation (``g`` set to
  ``||v||``), with the residual branch's last convolution scaled by its ``init_scale`` 0.1;
  openai always runs the data-dependent init.
* Training-loop features of openai (Polyak averaging, multi-GPU, the learning-rate decay) are
  not part of a backbone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int
from ..nn.activations import concat_elu
from ..nn.nin import NIN
from ..nn.shifted_conv import (
    DownRightShiftedConv2d,
    DownRightShiftedConvTranspose2d,
    DownShiftedConv2d,
    DownShiftedConvTranspose2d,
    down_shift,
    right_shift,
)
from ..registry import register_backbone
from .base import Backbone, Conditioning
from .pixelcnn_pp_cache import PixelCNNPPCache

__all__ = ["GatedResNet", "PixelCNNPP", "PixelCNNPPConfig"]


@dataclass
class PixelCNNPPConfig:
    """Options of the ``"pixelcnn++"`` backbone; the defaults are the ``"paper"`` preset.

    Attributes:
        in_channels: Image channels ``C`` (``build()`` sets it from the model's channels).
        nr_filters: Features ``F`` of every layer of both streams, and the backbone's
            ``out_channels`` (160 in the paper and openai; the head's 1x1 projection plays the
            part of openai's last ``nin``).
        nr_resnet: Gated residual layers per block (5: "6 blocks of 5 ResNet layers"). The down
            pass has ``nr_resnet``, ``nr_resnet + 1``, ``nr_resnet + 1`` layers per block, as
            in openai.
        dropout: Element-wise dropout on each residual branch's hidden layer (0.5, openai's
            CIFAR-10 setting: the paper notes the model overfits without it).
        num_classes: ``None`` (unconditional), or the number of classes: a learned per-layer
            projection of the one-hot label is added inside every gated residual layer
            (openai's ``h``).
        weight_norm: Weight-normalise every convolution, transposed convolution and NIN as
            openai does; ``False`` gives plain layers (no ``g``, no data-dependent init).
    """

    in_channels: int = 3
    nr_filters: int = 160  # paper
    nr_resnet: int = 5  # paper
    dropout: float = 0.5  # openai CIFAR-10
    num_classes: int | None = None  # unconditional, as the paper's CIFAR-10 results
    weight_norm: bool = True  # openai: every layer

    def __post_init__(self) -> None:
        check_int(self.in_channels, "in_channels", 1)
        check_int(self.nr_filters, "nr_filters", 1)
        check_int(self.nr_resnet, "nr_resnet", 1)
        if self.num_classes is not None:
            check_int(self.num_classes, "num_classes", 1)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise TypeError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if not isinstance(self.weight_norm, bool):
            raise TypeError(f"weight_norm must be a bool, got {self.weight_norm!r}")


PRESETS: dict[str, dict[str, Any]] = {
    # Small and deterministic (no dropout) for tests and CPU demos. Thanks to the three
    # resolutions a middle pixel of a 32x32 image still sees every earlier pixel; the start of
    # the current row is only reached within 4 nr_resnet + 2 = 6 columns (module docstring).
    "tiny": {"nr_filters": 8, "nr_resnet": 1, "dropout": 0.0},
    # Salimans et al. 2017 / openai defaults (the same as the config defaults).
    "paper": {"nr_filters": 160, "nr_resnet": 5, "dropout": 0.5},
}


class GatedResNet(nn.Module):
    """Gated residual layer of PixelCNN++ (openai ``gated_resnet``).

    ``c1 = conv(concat_elu(x))``, plus ``nin(concat_elu(aux))`` when a short-cut input is
    given; ``c2 = conv(dropout(concat_elu(c1)))`` with ``2 F`` channels, plus a per-class row
    when conditional; ``out = x + a * sigmoid(b)`` with ``a, b = split(c2)``.

    Args:
        channels: Features ``F`` of ``x`` and of the output.
        conv: Shifted convolution class (``DownShiftedConv2d`` for the ``u`` stream,
            ``DownRightShiftedConv2d`` for ``ul``); called with its default kernel size.
        aux_channels: Channels of the short-cut input ``aux`` (``0``: none).
        dropout: Element-wise dropout probability.
        num_classes: Number of classes for class conditioning, or ``None``.
        weight_norm: Weight-normalise the convolutions and the NIN.

    Shapes:
        ``x`` float ``(B, F, H, W)``, ``aux`` float ``(B, aux_channels, H, W)``, ``label``
        int64 ``(B,)`` -> float ``(B, F, H, W)``.
    """

    def __init__(
        self,
        channels: int,
        conv: type[nn.Module],
        aux_channels: int = 0,
        dropout: float = 0.0,
        num_classes: int | None = None,
        weight_norm: bool = True,
    ) -> None:
        super().__init__()
        f = channels
        self.conv1 = conv(2 * f, f, weight_norm=weight_norm)  # concat_elu doubles channels
        self.aux = NIN(2 * aux_channels, f, weight_norm=weight_norm) if aux_channels else None
        # Element-wise like tf.nn.dropout; nn.Dropout2d would drop whole feature maps.
        self.dropout = nn.Dropout(dropout)
        # init_scale 0.1 (openai): each residual branch starts small, so the deep stack starts
        # close to the identity.
        self.conv2 = conv(2 * f, 2 * f, weight_norm=weight_norm, init_scale=0.1)
        self.class_proj: nn.Parameter | None = None
        if num_classes is not None:
            # openai: hw ~ N(0, 0.05), no bias, no weight norm; c2 += one_hot(h) @ hw.
            self.class_proj = nn.Parameter(torch.randn(num_classes, 2 * f) * 0.05)

    def forward(self, x: Tensor, aux: Tensor | None = None, label: Tensor | None = None) -> Tensor:
        c1 = self.conv1(concat_elu(x))
        if self.aux is not None:
            if aux is None:
                raise ValueError("aux must be given: this layer was built with a short-cut input")
            c1 = c1 + self.aux(concat_elu(aux))
        c2 = self.conv2(self.dropout(concat_elu(c1)))
        if (self.class_proj is None) != (label is None):
            raise ValueError(
                "label must be given exactly when the layer was built with num_classes "
                f"(num_classes={None if self.class_proj is None else self.class_proj.shape[0]})"
            )
        if self.class_proj is not None:
            c2 = c2 + F.embedding(label, self.class_proj)[:, :, None, None]  # (B, 2F, 1, 1)
        a, b = c2.chunk(2, dim=1)
        return x + a * torch.sigmoid(b)


@register_backbone(
    "pixelcnn++", aliases=("pixelcnn_pp",), config=PixelCNNPPConfig, presets=PRESETS
)
class PixelCNNPP(Backbone):
    """The PixelCNN++ network (see the module docstring for the architecture).

    Args:
        config: A [`PixelCNNPPConfig`][discretelik.backbones.pixelcnn_pp.PixelCNNPPConfig];
            ``None`` for the defaults (the paper model).
        **overrides: Config fields to replace, e.g. ``PixelCNNPP(nr_filters=32)``.

    Shapes:
        ``forward(x, cond)``: ``x`` float ``(B, in_channels, H, W)`` in ``[-1, 1]`` with ``H``
        and ``W`` multiples of 4; ``cond`` class labels int64 ``(B,)`` when built with
        ``num_classes`` (else ``None``) -> features float ``(B, nr_filters, H, W)``; the
        features at ``(i, j)`` depend only on pixels before ``(i, j)`` in raster order.

    Example:
        >>> net = PixelCNNPP(nr_filters=8, nr_resnet=1, dropout=0.0)
        >>> net(torch.rand(2, 3, 8, 8) * 2 - 1).shape
        torch.Size([2, 8, 8, 8])
    """

    supports_channel_groups = False
    # Two stride-2 down-samplings whose outputs must line up with the up-sampled maps.
    size_multiple = 4

    def __init__(self, config: PixelCNNPPConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        config = config if config is not None else PixelCNNPPConfig()
        if not isinstance(config, PixelCNNPPConfig):
            raise TypeError(f"config must be a PixelCNNPPConfig, got {type(config).__name__}")
        if overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.in_channels = config.in_channels
        self.out_channels = config.nr_filters
        self.channel_groups = 1
        self.num_classes = config.num_classes
        self.cond_channels = None

        f, r, wn = config.nr_filters, config.nr_resnet, config.weight_norm
        c_in = config.in_channels + 1  # the all-ones channel

        def resnet(conv: type[nn.Module], aux: int) -> GatedResNet:
            return GatedResNet(f, conv, aux, config.dropout, config.num_classes, wn)

        # First layers (openai: u_list[0], ul_list[0]).
        self.u_init = DownShiftedConv2d(c_in, f, (2, 3), weight_norm=wn)
        self.ul_init_above = DownShiftedConv2d(c_in, f, (1, 3), weight_norm=wn)
        self.ul_init_left = DownRightShiftedConv2d(c_in, f, (2, 1), weight_norm=wn)

        # Up pass: 3 blocks of r layers; the ul layer's short-cut is the u stream (F channels).
        self.up_u = nn.ModuleList(
            nn.ModuleList(resnet(DownShiftedConv2d, 0) for _ in range(r)) for _ in range(3)
        )
        self.up_ul = nn.ModuleList(
            nn.ModuleList(resnet(DownRightShiftedConv2d, f) for _ in range(r)) for _ in range(3)
        )
        self.downsample_u = nn.ModuleList(
            DownShiftedConv2d(f, f, stride=2, weight_norm=wn) for _ in range(2)
        )
        self.downsample_ul = nn.ModuleList(
            DownRightShiftedConv2d(f, f, stride=2, weight_norm=wn) for _ in range(2)
        )

        # Down pass: r, r + 1, r + 1 layers (pops all 3 r + 2 kept up-pass outputs but the top
        # one). The u layer's short-cut is a kept u map (F); the ul layer's is concat(u, kept
        # ul) (2F).
        depths = (r, r + 1, r + 1)
        self.down_u = nn.ModuleList(
            nn.ModuleList(resnet(DownShiftedConv2d, f) for _ in range(n)) for n in depths
        )
        self.down_ul = nn.ModuleList(
            nn.ModuleList(resnet(DownRightShiftedConv2d, 2 * f) for _ in range(n)) for n in depths
        )
        self.upsample_u = nn.ModuleList(
            DownShiftedConvTranspose2d(f, f, stride=2, weight_norm=wn) for _ in range(2)
        )
        self.upsample_ul = nn.ModuleList(
            DownRightShiftedConvTranspose2d(f, f, stride=2, weight_norm=wn) for _ in range(2)
        )

    def forward(self, x: Tensor, cond: Conditioning = None) -> Tensor:
        """Features for a batch of images.

        Args:
            x: float ``(B, in_channels, H, W)`` in ``[-1, 1]``; ``H``, ``W`` multiples of 4.
            cond: int64 class labels ``(B,)`` in ``[0, num_classes - 1]`` when the backbone is
                class-conditional, else ``None``.

        Returns:
            float ``(B, nr_filters, H, W)``: ``elu(ul)``, causal in raster order.

        Raises:
            TypeError: ``x`` is not a float tensor, or ``cond`` has the wrong type or dtype.
            ValueError: Wrong channels, ``H``/``W`` not multiples of 4, or conditioning
                missing, unexpected or of the wrong shape or range.
        """
        self.check_input(x)
        label, _ = self.split_cond(cond, x.shape[0])  # int64 already (split_cond)
        b, _, h, w = x.shape
        # The ones channel tells the network where the image is: zero padding has 0 there.
        x_pad = torch.cat([x, x.new_ones(b, 1, h, w)], dim=1)

        # Up pass. Shifting after the first convolutions makes every feature strictly causal.
        u_list = [down_shift(self.u_init(x_pad))]
        ul_list = [down_shift(self.ul_init_above(x_pad)) + right_shift(self.ul_init_left(x_pad))]
        for level in range(3):
            for u_layer, ul_layer in zip(self.up_u[level], self.up_ul[level]):
                u_list.append(u_layer(u_list[-1], label=label))
                ul_list.append(ul_layer(ul_list[-1], u_list[-1], label=label))
            if level < 2:
                u_list.append(self.downsample_u[level](u_list[-1]))
                ul_list.append(self.downsample_ul[level](ul_list[-1]))

        # Down pass, consuming the kept up-pass outputs in reverse order (U-Net short-cuts).
        u, ul = u_list.pop(), ul_list.pop()
        for level in range(3):
            if level > 0:
                u = self.upsample_u[level - 1](u)
                ul = self.upsample_ul[level - 1](ul)
            for u_layer, ul_layer in zip(self.down_u[level], self.down_ul[level]):
                u = u_layer(u, u_list.pop(), label=label)
                ul = ul_layer(ul, torch.cat([u, ul_list.pop()], dim=1), label=label)
        # Every kept output has been used exactly once (openai asserts the same).
        if u_list or ul_list:  # pragma: no cover  (structural invariant)
            raise RuntimeError("internal error: unused up-pass outputs")
        return F.elu(ul)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"in_channels={c.in_channels}, nr_filters={c.nr_filters}, nr_resnet={c.nr_resnet}, "
            f"dropout={c.dropout}, num_classes={c.num_classes}, weight_norm={c.weight_norm}"
        )

    def sampling_cache(
        self, n: int, image_shape: tuple[int, int], cond: Conditioning = None
    ) -> PixelCNNPPCache:
        """A cache for fast raster-order sampling of ``n`` images (Ramachandran et al. 2017).

        Its ``step(canvas, i, j)`` returns the features ``forward(canvas, cond)[:, :, i, j]``
        (``(n, nr_filters)``) in evaluation mode, computing the ``u`` stream once per row and
        the ``ul`` stream at one position per level; see
        ``discretelik.backbones.pixelcnn_pp_cache``.

        Args:
            n: Number of images.
            image_shape: ``(H, W)``, multiples of 4.
            cond: Class labels ``(n,)`` when class-conditional, else ``None``.

        Returns:
            A [`PixelCNNPPCache`][discretelik.PixelCNNPPCache].

        Raises:
            ValueError: The backbone is in training mode with dropout (call ``eval()``).
        """
        return PixelCNNPPCache(self, n, image_shape, cond)
