"""Building blocks for autoregressive backbones (one concept per module)."""

from .masked_conv import MaskedConv2d, causal_mask

__all__ = ["MaskedConv2d", "causal_mask"]
