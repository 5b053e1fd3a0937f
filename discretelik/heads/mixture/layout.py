"""Where a mixture head's parameters sit along the channel axis, and the options' checks.

The layout is shared by every location-scale family (logistic, Gaussian) and by every
implementation of their likelihood: the eager and lean paths cut ``params`` with
[`MixtureLayout.split`][discretelik.heads.mixture.layout.MixtureLayout.split] or the block
starts, the Triton kernels read the same block starts from an offset table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..._checks import check_int

__all__ = ["MIN_LOG_SCALE_BOUND", "MixtureLayout", "check_mixture_args"]

# Lowest accepted ``min_log_scale``: the inverse scale exp(80) ~ 5.5e34 is finite in float32 with
# room for the standardised edges; a bin of width 2 / 65535 is already e^-10 wide.
MIN_LOG_SCALE_BOUND = -80.0


@dataclass(frozen=True)
class MixtureLayout:
    """Where each parameter sits along the channel axis of ``params``.

    ``K`` logits first, then one slot per image channel ``c``: ``K`` locations, ``K`` log-scales
    and ``n_c`` blocks of ``K`` coupling coefficients. The ``M = C (C - 1) / 2`` coefficient
    blocks (``M = 0`` without coupling) are ordered by pair ``(c, j)``, ``j < c``, as
    ``(1, 0), (2, 0), (2, 1), (3, 0), ...`` (block index ``c (c - 1) / 2 + j``) and dealt out in
    that order over the slots, ``n_c = M // C + (c < M % C)`` (as ``numpy.array_split``). For
    ``C = 3`` every slot gets one block: openai/pixel-cnn's layout.

    Args:
        channels: Image channels ``C``.
        mixtures: Mixture components ``K``.
        coupling: Whether the coupling coefficients are present.
    """

    channels: int
    mixtures: int
    coupling: bool

    @property
    def coefficients(self) -> int:
        """Number ``M`` of coupling coefficients per component."""
        c = self.channels
        return c * (c - 1) // 2 if self.coupling else 0

    @property
    def param_channels(self) -> int:
        """``P = K (1 + 2 C + M)``."""
        return self.mixtures * (1 + 2 * self.channels + self.coefficients)

    def _block_starts(self) -> tuple[list[int], list[int], list[int]]:
        """First channel of each location, log-scale and coefficient block (each ``K`` long)."""
        k, c, m = self.mixtures, self.channels, self.coefficients
        loc, log_scale, coeff = [], [], []
        start = k  # the logits come first
        for slot in range(c):
            loc.append(start)
            log_scale.append(start + k)
            n_blocks = m // c + (1 if slot < m % c else 0)
            coeff.extend(start + (2 + b) * k for b in range(n_blocks))
            start += (2 + n_blocks) * k
        return loc, log_scale, coeff

    def split(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Cut raw parameters into their roles.

        Args:
            params: float ``batch_shape + (P, H, W)``.

        Returns:
            ``(logits, loc, log_scale, coeff)``: ``logits`` ``batch_shape + (K, H, W)``;
            ``loc`` and ``log_scale`` ``batch_shape + (K, C, H, W)``; ``coeff`` (raw, before
            ``tanh``) ``batch_shape + (K, M, H, W)``.
        """
        k = self.mixtures

        def gather(starts: list[int]) -> Tensor:
            index = torch.tensor(
                [s + i for s in starts for i in range(k)], dtype=torch.long, device=params.device
            )
            blocks = params.index_select(-3, index)  # (..., n * K, H, W), block-major
            blocks = blocks.unflatten(-3, (len(starts), k))  # (..., n, K, H, W)
            return blocks.transpose(-4, -3)  # (..., K, n, H, W)

        loc, log_scale, coeff = self._block_starts()
        return params.narrow(-3, 0, k), gather(loc), gather(log_scale), gather(coeff)


def check_mixture_args(mixtures: object, coupling: object, min_log_scale: object) -> float:
    """Validate the mixture options shared by heads and distributions; returns the float clamp."""
    check_int(mixtures, "mixtures", 1)
    if not isinstance(coupling, bool):
        raise TypeError(f"coupling must be a bool, got {coupling!r}")
    if isinstance(min_log_scale, bool) or not isinstance(min_log_scale, (int, float)):
        raise TypeError(f"min_log_scale must be a float, got {min_log_scale!r}")
    if not math.isfinite(min_log_scale):
        raise ValueError(f"min_log_scale must be finite, got {min_log_scale}")
    if min_log_scale < MIN_LOG_SCALE_BOUND:
        # exp(-log_scale) would overflow float32 (at about -88.7) and turn every bin edge at
        # the location into 0 * inf = nan.
        raise ValueError(
            f"min_log_scale must be >= {MIN_LOG_SCALE_BOUND} (exp(-min_log_scale) must stay "
            f"finite in float32), got {min_log_scale}"
        )
    return float(min_log_scale)


