"""Building blocks for autoregressive backbones (one concept per module)."""

from .activations import concat_elu
from .cached_conv import CachedConv, PaddedMap
from .gated import ConditionBias, HorizontalConv2d, VerticalConv2d, gated_activation
from .masked_conv import MaskedConv2d, causal_mask
from .nin import NIN
from .recurrent import DiagonalBiLSTM, RowLSTM, skew, unskew
from .shifted_conv import (
    DownRightShiftedConv2d,
    DownRightShiftedConvTranspose2d,
    DownShiftedConv2d,
    DownShiftedConvTranspose2d,
    down_shift,
    right_shift,
)
from .weight_norm import apply_weight_norm, data_dependent_init, is_weight_normed

__all__ = [
    "CachedConv",
    "ConditionBias",
    "DiagonalBiLSTM",
    "DownRightShiftedConv2d",
    "DownRightShiftedConvTranspose2d",
    "DownShiftedConv2d",
    "DownShiftedConvTranspose2d",
    "HorizontalConv2d",
    "MaskedConv2d",
    "NIN",
    "PaddedMap",
    "RowLSTM",
    "VerticalConv2d",
    "apply_weight_norm",
    "causal_mask",
    "concat_elu",
    "data_dependent_init",
    "down_shift",
    "gated_activation",
    "is_weight_normed",
    "right_shift",
    "skew",
    "unskew",
]
