"""PixelRNN backbones: ``"row_lstm"`` and ``"diagonal_bilstm"``.

Reference: A. van den Oord, N. Kalchbrenner, K. Kavukcuoglu, "Pixel Recurrent Neural
Networks", ICML 2016, https://arxiv.org/abs/1601.06759 (sections 3.1-3.4 and table 2).

Architecture (table 2 of the paper)::

    x (B, C, H, W) in [-1, 1]
      -> 7x7 convolution, mask A                                   (B, 2h, H, W)
      -> n_layers x [Row LSTM | Diagonal BiLSTM] with residual     (B, 2h, H, W)
      -> ReLU -> 1x1 conv, mask B -> ReLU                         (B, out_channels, H, W)

Each residual block follows section 3.4: the LSTM reads the ``2h`` input features and returns
``h`` features, a 1x1 convolution (mask B) maps them back to ``2h`` and the block's input is
added. The LSTM layers themselves live in
[`discretelik.nn.recurrent`][discretelik.nn.recurrent.RowLSTM].

Colour ordering: with ``channel_groups = C`` every feature map is ``C`` contiguous blocks and
every masked convolution uses ``C`` colour groups, so block ``c`` at a pixel sees channels
``< c`` of that pixel's input (mask A) and blocks ``<= c`` of features (mask B); this is the
paper's R -> G -> B split, used with the ``"softmax"`` head. With ``channel_groups = 1`` the
features at a pixel depend on whole earlier pixels only.

Receptive fields: the Row LSTM sees a triangle above the pixel (one more pixel on each side for
every row further up, plus the reach of the input convolutions) and so misses part of the
context; the Diagonal BiLSTM sees every earlier pixel with one exception that the paper's
architecture shares: the last pixel of the previous row, ``(i - 1, W - 1)``, reaches pixel
``(i, j)`` only through the 7x7 input convolution, i.e. only when ``j >= W - 4``, because
every later layer at an earlier position must not see that pixel's own value.

Departures from the paper:

* The paper ends with two "ReLU + 1x1 conv, mask B" layers and a 256-way softmax. The backbone
  keeps the first (to ``out_channels`` features) and ends with the ReLU; the head's own 1x1
  projection is the second, so any head can sit on top (as in the ``"pixelcnn"`` backbone).
* ``channel_groups=1`` (whole previous pixels only, for heads that model a pixel's channels
  jointly) is not in the paper.
* The paper has no class conditioning; ``num_classes`` adds a learned per-class bias to every
  LSTM layer's gate pre-activations, as the conditional PixelCNN does.
* LSTM details (tanh content gate, forget-gate bias 1, both BiLSTM directions in one loop)
  are listed in [`discretelik.nn.recurrent`][discretelik.nn.recurrent.RowLSTM].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

from torch import Tensor, nn

from .._checks import check_int
from ..nn.masked_conv import MaskedConv2d
from ..nn.recurrent import DiagonalBiLSTM, RowLSTM
from ..registry import register_backbone
from .base import Backbone, Conditioning

__all__ = [
    "DiagonalBiLSTMBackbone",
    "DiagonalBiLSTMConfig",
    "PixelRNN",
    "RowLSTMBackbone",
    "RowLSTMConfig",
]


@dataclass
class DiagonalBiLSTMConfig:
    """Options of the ``"diagonal_bilstm"`` backbone; the defaults are the ``"paper"`` preset.

    Attributes:
        in_channels: Image channels ``C`` (3 for RGB, 1 for grey).
        hidden_channels: LSTM units ``h`` per layer (and per direction); the residual stream
            between layers has ``2h`` channels, as in the paper's section 3.4.
        n_layers: Number of recurrent layers, each with a residual connection.
        out_channels: Feature channels handed to the head.
        channel_groups: ``1`` (features see whole previous pixels only) or ``in_channels``
            (``C`` ordered feature blocks; block ``c`` also sees channels ``< c`` of the current
            pixel). ``build()`` picks ``in_channels`` for heads that support it (``"softmax"``).
        num_classes: Number of classes for class-conditional modelling (labels ``(B,)`` int64
            as ``cond``), or ``None``.
    """

    in_channels: int = 3
    hidden_channels: int = 129
    n_layers: int = 12
    out_channels: int = 1026
    channel_groups: int = 1
    num_classes: int | None = None


@dataclass
class RowLSTMConfig(DiagonalBiLSTMConfig):
    """Options of the ``"row_lstm"`` backbone: those of the Diagonal BiLSTM config, and

    Attributes:
        kernel_size: Odd width ``k`` of the ``1 x k`` input-to-state kernel and of the
            state-to-state kernel over the previous row (3 in the paper). It sets how fast the
            triangular receptive field widens: ``k // 2`` pixels per side per row.
    """

    kernel_size: int = 3


# "paper": 12 layers as in the paper's CIFAR-10 PixelRNNs. h = 129, not the paper's 128: with
# the softmax head every feature map splits into three colour groups, so widths must divide by
# 3 (the same choice as the "pixelcnn" preset, which also uses 1026 output features).
PRESETS: dict[str, dict[str, int]] = {
    "paper": dict(hidden_channels=129, n_layers=12, out_channels=1026),
    # Enough to learn something on the bundled 28x28 / 32x32 subsets on a CPU in minutes.
    "small": dict(hidden_channels=24, n_layers=2, out_channels=48),
    # Divisible by 3 colour groups and fast: for tests.
    "tiny": dict(hidden_channels=6, n_layers=1, out_channels=12),
}


class _ResidualLSTM(nn.Module):
    """LSTM layer on ``2h`` features, 1x1 mask-B projection of its ``h`` outputs, residual add."""

    def __init__(self, lstm: nn.Module, hidden: int, groups: int, num_classes: int | None) -> None:
        super().__init__()
        self.lstm = lstm
        self.proj = MaskedConv2d(hidden, 2 * hidden, 1, "B", groups=groups)
        self.label_bias = None
        if num_classes is not None:
            # Random (N(0, 1)) at init, not zero: with zero biases the labels' gradients are
            # tiny at first and the classes stay almost indistinguishable for many steps.
            self.label_bias = nn.Embedding(num_classes, 4 * hidden)

    def forward(self, x: Tensor, label: Tensor | None) -> Tensor:
        bias = None if label is None or self.label_bias is None else self.label_bias(label)
        return x + self.proj(self.lstm(x, bias))


class PixelRNN(Backbone):
    """The PixelRNN stack shared by both backbones; subclasses choose the LSTM layer.

    Build one through the registry (``create_backbone("row_lstm", preset="tiny")``,
    ``build("diagonal_bilstm", "softmax")``) or as ``RowLSTMBackbone(RowLSTMConfig(...))``.

    Args:
        config: The subclass's config dataclass.
        make_lstm: Returns a new LSTM layer, ``(B, 2h, H, W) -> (B, h, H, W)``; called once
            per layer, after the config has been checked.

    Shapes:
        ``x`` float ``(B, in_channels, H, W)`` in ``[-1, 1]`` -> float
        ``(B, out_channels, H, W)``; ``cond``: class labels ``(B,)`` int64 when built with
        ``num_classes``.

    Raises:
        ValueError: ``channel_groups`` is neither 1 nor ``in_channels``, or ``hidden_channels``
            / ``out_channels`` is not a multiple of ``channel_groups``.
    """

    supports_channel_groups: ClassVar[bool] = True

    def __init__(self, config: DiagonalBiLSTMConfig, make_lstm: Callable[[], nn.Module]) -> None:
        super().__init__()
        cfg = config
        self.in_channels = check_int(cfg.in_channels, "in_channels", 1)
        self.out_channels = check_int(cfg.out_channels, "out_channels", 1)
        hidden = check_int(cfg.hidden_channels, "hidden_channels", 1)
        check_int(cfg.n_layers, "n_layers", 0)
        groups = check_int(cfg.channel_groups, "channel_groups", 1)
        if groups not in (1, cfg.in_channels):
            raise ValueError(
                f"channel_groups must be 1 or in_channels={cfg.in_channels}, got {groups}"
            )
        for name, value in (("hidden_channels", hidden), ("out_channels", cfg.out_channels)):
            if value % groups:
                raise ValueError(
                    f"{name} ({value}) must be a multiple of channel_groups ({groups}): each "
                    "colour gets an equal block of features"
                )
        if cfg.num_classes is not None:
            check_int(cfg.num_classes, "num_classes", 1)
        self.channel_groups = groups
        self.num_classes = cfg.num_classes
        self.config = cfg

        self.input_conv = MaskedConv2d(cfg.in_channels, 2 * hidden, 7, "A", groups=groups)
        self.layers = nn.ModuleList(
            _ResidualLSTM(make_lstm(), hidden, groups, cfg.num_classes)
            for _ in range(cfg.n_layers)
        )
        # The paper's first output layer; the head's projection is its second.
        self.output = nn.Sequential(
            nn.ReLU(),
            MaskedConv2d(2 * hidden, cfg.out_channels, 1, "B", groups=groups),
            nn.ReLU(),
        )

    def forward(self, x: Tensor, cond: Conditioning = None) -> Tensor:
        """Features for the head.

        Args:
            x: float ``(B, in_channels, H, W)``, the image scaled to ``[-1, 1]``.
            cond: Class labels ``(B,)`` int64 (or ``{"label": ...}``) when the backbone was built
                with ``num_classes``; otherwise ``None``.

        Returns:
            float ``(B, out_channels, H, W)``; at pixel ``(i, j)`` a function of the pixels
            before it in raster order (and, with ``channel_groups = C``, block ``c`` also of
            channels ``< c`` of the pixel itself).
        """
        self.check_input(x)
        label, _ = self.split_cond(cond, x.shape[0])
        h = self.input_conv(x)
        for layer in self.layers:
            h = layer(h, label)
        return self.output(h)


# Registered as classes (not factory functions) so that build() can read
# supports_channel_groups from the registered object.
@register_backbone("row_lstm", config=RowLSTMConfig, presets=PRESETS)
class RowLSTMBackbone(PixelRNN):
    """PixelRNN with Row LSTM layers: a triangle of context above each pixel.

    Args:
        config: A [`RowLSTMConfig`][discretelik.backbones.pixelrnn.RowLSTMConfig].
    """

    def __init__(self, config: RowLSTMConfig) -> None:
        width, groups = config.hidden_channels, config.channel_groups
        super().__init__(config, lambda: RowLSTM(2 * width, width, config.kernel_size, groups))


@register_backbone("diagonal_bilstm", config=DiagonalBiLSTMConfig, presets=PRESETS)
class DiagonalBiLSTMBackbone(PixelRNN):
    """PixelRNN with Diagonal BiLSTM layers: every earlier pixel (see the module notes).

    Args:
        config: A [`DiagonalBiLSTMConfig`][discretelik.backbones.pixelrnn.DiagonalBiLSTMConfig].
    """

    def __init__(self, config: DiagonalBiLSTMConfig) -> None:
        width, groups = config.hidden_channels, config.channel_groups
        super().__init__(config, lambda: DiagonalBiLSTM(2 * width, width, groups))
