r"""The Gaussian family of the discretized Gaussian (mixture): its formula, once.

$\log\Phi$ is computed as $\log(\mathrm{erfcx}(-u/\sqrt2)/2) - u^2/2$ on the left, which
also keeps its gradient exact far in the tail. A middle bin is reflected to the left half
($\Phi(a) - \Phi(b) = \Phi(-b) - \Phi(-a)$), then computed either by a midpoint series in
$h = \delta/s$ (narrow bins, including near-flat components whose $h$ underflows) or as
$\log\Phi(a) + \log(1 - \Phi(b)/\Phi(a))$ with the ratio taken in log space.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .formula import Family

__all__ = ["Gaussian", "Z_LIMIT"]

_LOG2 = math.log(2.0)
_SQRT2 = math.sqrt(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
# Bins narrower than this, h (1 + |m|) < 0.05, use the midpoint series below; its first omitted
# term is below 1e-13 relative there, and wider bins leave Phi(a)/Phi(b) far enough from 1 for
# log(-expm1(.)) to keep ~full precision.
_SERIES_LIMIT = 0.05


def _log_ndtr_left(x: Tensor) -> Tensor:
    """``log Phi(x)`` for ``x <= 0`` as ``log(erfcx(-x / sqrt 2) / 2) - x^2 / 2``.

    Unlike ``torch.special.log_ndtr``, whose backward loses all precision in the far left tail
    (it returns ~0.4 instead of ~1e7 at ``x = -1e7`` in float32), this gives the gradient
    ``-x + O(1/x)`` accurately.
    """
    return torch.log(torch.special.erfcx(-x / _SQRT2)) - _LOG2 - 0.5 * x * x


def _log_ndtr(x: Tensor) -> Tensor:
    """``log Phi(x)`` with accurate value and gradient for every finite ``x``."""
    left = x <= 0
    zero = torch.zeros_like(x)
    # Each branch sees only inputs on its own side, so neither produces inf/nan gradients.
    log_left = _log_ndtr_left(torch.where(left, x, zero))
    log_right = torch.log1p(-0.5 * torch.special.erfc(torch.where(left, zero, x) / _SQRT2))
    return torch.where(left, log_left, log_right)


def _log_bin_series(m: Tensor, h: Tensor, log_h: Tensor) -> Tensor:
    """``log(Phi(m + h) - Phi(m - h))`` for narrow bins, by expanding around the midpoint.

    ``(Phi(m+h) - Phi(m-h)) / (2 h phi(m)) = sum_{n even} He_n(m) h^n / (n+1)!`` with the
    Hermite polynomials ``He_n``; written in ``t = h m`` and ``q = h^2`` so that huge ``m`` with
    tiny ``h`` cannot overflow.
    """
    t, q = h * m, h * h
    t2 = t * t
    series = (
        (t2 - q) / 6.0
        + (t2 * t2 - 6.0 * t2 * q + 3.0 * q * q) / 120.0
        + (t2 * t2 * t2 - 15.0 * t2 * t2 * q + 45.0 * t2 * q * q - 15.0 * q * q * q) / 5040.0
    )
    return _LOG2 + log_h - 0.5 * m * m - _HALF_LOG_2PI + torch.log1p(series)


def _log_bin_wide(a: Tensor, b: Tensor, h: Tensor) -> Tensor:
    """``log(Phi(a) - Phi(b))`` for a bin ``[b, a]`` with ``a + b <= 0`` that is not narrow.

    ``log Phi(a) + log(1 - Phi(b) / Phi(a))``. While ``a <= 0`` the log-ratio is
    ``r(b) - r(a) + h (a + b)`` with ``r(x) = log Phi(x) + x^2 / 2`` (a slowly varying
    ``log erfcx``) and ``(a^2 - b^2) / 2 = h (a + b)``: no cancelling of two huge ``-x^2 / 2``.
    """
    tail = a <= 0
    a_left = torch.where(tail, a, torch.zeros_like(a))

    def r(x: Tensor) -> Tensor:
        return torch.log(torch.special.erfcx(-x / _SQRT2)) - _LOG2

    log_ratio = torch.where(tail, r(b) - r(a_left) + h * (a + b), _log_ndtr(b) - _log_ndtr(a))
    return _log_ndtr(a) + torch.log(-torch.expm1(log_ratio))


# Saturation of the standardised edges (formula.standardised_edges): -z^2 / 2 at 2^50 is about
# -6e29, the logistic's floor; beyond about 2.6e19 it would overflow float32.
Z_LIMIT = 2.0**50


class Gaussian(Family):
    """The standard normal: ``F(z) = Phi(z)``."""

    Z_LIMIT = Z_LIMIT

    @staticmethod
    def log_cdf(z: Tensor) -> Tensor:
        return _log_ndtr(z)

    @staticmethod
    def log_sf(z: Tensor) -> Tensor:
        return _log_ndtr(-z)

    @staticmethod
    def log_interval(upper: Tensor, lower: Tensor, h: Tensor, log_h: Tensor) -> Tensor:
        # Symmetry: Phi(a) - Phi(b) = Phi(-b) - Phi(-a); fold the bin to the left half, where
        # both CDFs are small and their ratio can be formed in log space.
        flip = upper + lower > 0
        a, b = torch.where(flip, -lower, upper), torch.where(flip, -upper, lower)
        m = 0.5 * (a + b)
        narrow = h * (1.0 - m) < _SERIES_LIMIT
        # Double ``where``: each formula gets harmless inputs where it is not used, so its
        # (discarded) gradient there is finite and cannot turn into nan.
        zero = torch.zeros_like(m)
        series = _log_bin_series(
            torch.where(narrow, m, zero),
            torch.where(narrow, h, zero),
            torch.where(narrow, log_h, zero),
        )
        wide = _log_bin_wide(
            torch.where(narrow, zero, a),
            torch.where(narrow, zero - 2.0, b),
            torch.where(narrow, zero + 1.0, h),
        )
        return torch.where(narrow, series, wide)

    @staticmethod
    def icdf(u: Tensor) -> Tensor:
        return torch.special.ndtri(u)
