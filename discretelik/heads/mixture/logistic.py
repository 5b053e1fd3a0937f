r"""The logistic family of the discretized logistic mixture (PixelCNN++): its formula, once.

Everything in log space, finite with finite gradients for every finite standardised edge up to
``Z_LIMIT``: the open edges use $\log\sigma(u)$ (log-sigmoid), and a middle bin uses one of
two exact forms, chosen by ``WIDE_HALF_WIDTH`` and ``FAR_TAIL``:

* wide bins not far in a tail: $\log\sigma(a) + \log(1 - \sigma(b)/\sigma(a))$;
* elsewhere the identity
  $\sigma(a) - \sigma(b) = \sinh(h) / (2\cosh\tfrac a2 \cosh\tfrac b2)$ with the half-width
  $h = (a - b)/2 = \delta/s$ taken from the log-scale, so that tiny masses far in a tail and
  near-flat components (huge scale, ``h`` below ``TINY_LOG_HALF_WIDTH`` in log) keep full
  relative precision.

The Triton kernels (``triton_kernels.py``) take these constants as compile-time arguments.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .formula import Family

__all__ = ["FAR_TAIL", "LOG2", "Logistic", "TINY_LOG_HALF_WIDTH", "WIDE_HALF_WIDTH", "Z_LIMIT"]

LOG2 = math.log(2.0)
# Below this log half-width, log(sinh(h)) == log(h) to double precision (h^2 / 6 < 1e-18).
TINY_LOG_HALF_WIDTH = -20.0
# Bins of standardised half-width above this use the wide form (unless far in a tail): there
# the sinh form would cancel two terms of size ~h into a result of size ~1.
WIDE_HALF_WIDTH = 1.0
# Bins whose inner edge is further than this into a tail (standardised) use the sinh form even
# when wide: log sigmoid of the edges would underflow to 0 a little further out.
FAR_TAIL = 40.0
# Saturation of the standardised edges (formula.standardised_edges): log masses stay above
# about -2^100 ~ -1.3e30, so that a sum over up to ~1e8 sub-pixels stays finite in float32.
Z_LIMIT = 2.0**100


def log_cosh(y: Tensor) -> Tensor:
    """``log(cosh(y))`` without overflow: ``|y| + log1p(exp(-2|y|)) - log 2``."""
    a = y.abs()
    return a + torch.log1p(torch.exp(-2.0 * a)) - LOG2


def log_sinh(h: Tensor, log_h: Tensor) -> Tensor:
    """``log(sinh(h))`` for ``h > 0``, also when ``h`` itself underflows (then ``log_h``)."""
    tiny = log_h < TINY_LOG_HALF_WIDTH
    safe = torch.where(tiny, torch.ones_like(h), h)  # keeps the unused branch's gradient finite
    # sinh(h) = exp(h) (1 - exp(-2h)) / 2, and -expm1 keeps full precision for small h.
    regular = safe + torch.log(-torch.expm1(-2.0 * safe)) - LOG2
    return torch.where(tiny, log_h, regular)


class Logistic(Family):
    """The standard logistic: ``F(z) = sigmoid(z)``."""

    Z_LIMIT = Z_LIMIT

    @staticmethod
    def log_cdf(z: Tensor) -> Tensor:
        return F.logsigmoid(z)

    @staticmethod
    def log_sf(z: Tensor) -> Tensor:
        return F.logsigmoid(-z)

    @staticmethod
    def log_interval(upper: Tensor, lower: Tensor, h: Tensor, log_h: Tensor) -> Tensor:
        # Symmetry: sigma(a) - sigma(b) = sigma(-b) - sigma(-a); fold the bin to the right half.
        flip = upper + lower < 0
        a, b = torch.where(flip, -lower, upper), torch.where(flip, -upper, lower)
        wide = (h > WIDE_HALF_WIDTH) & (b < FAR_TAIL)
        aw = torch.where(wide, a, torch.full_like(a, 2.0))  # harmless inputs where unused
        bw = torch.where(wide, b, torch.full_like(b, -2.0))
        log_a = F.logsigmoid(aw)
        log_wide = log_a + torch.log(-torch.expm1(F.logsigmoid(bw) - log_a))
        log_narrow = log_sinh(h, log_h) - LOG2 - log_cosh(a / 2) - log_cosh(b / 2)
        return torch.where(wide, log_wide, log_narrow)

    @staticmethod
    def icdf(u: Tensor) -> Tensor:
        return torch.log(u) - torch.log1p(-u)
