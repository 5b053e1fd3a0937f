r"""The discretized location-scale mixture likelihood, written once for every family and backend.

A family (``logistic.py``, ``gaussian.py``) supplies the four functions of its standard
continuous distribution (log CDF, log survival function, log mass of an interval, inverse CDF)
and its saturation bound; everything else of the likelihood is here:

* **binning**: level $x \in \{0, \dots, B-1\}$ sits at $\tilde x = (2x - (B-1)) / (B-1)$ with
  half-width $\delta = 1/(B-1)$; level $0$ covers $(-\infty, -1+\delta]$, level $B-1$ covers
  $[1-\delta, \infty)$ (``bins_of``);
* **parameters**: log-scales clamped below at ``min_log_scale`` (part of the model: no gradient
  below it), coupling coefficients through ``tanh`` (``component_parameters``);
* **coupling**: $\mu_{kc} = m_{kc} + \sum_{j<c} \tanh(\alpha_{k,cj})\,\tilde x_j$
  (``coupled_loc``, ``coupled_locations``);
* **one component's log bin mass**, with the standardised edges saturated at the family's
  ``Z_LIMIT`` (``log_bin_mass``);
* **the mixture posterior**: the component is shared by the channels of a pixel, so channel $c$
  sees it through its posterior given $x_{<c}$ (``log_joint_before``,
  ``mixture_log_conditional``).

The eager path is these functions under autograd; the lean path (``lean.py``) calls the same
functions one component at a time and differentiates them by recomputing under autograd; the
Triton kernels (``triton_kernels.py``) are a translation that takes the family's constants from
``logistic.py`` and is tested against this module over one case matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

__all__ = [
    "Bins",
    "Family",
    "bins_of",
    "component_log_mass",
    "component_parameters",
    "coupled_loc",
    "coupled_locations",
    "log_bin_mass",
    "log_joint_before",
    "mixture_log_conditional",
    "scaled_level",
]


class Family:
    """A standard (location 0, scale 1) continuous distribution discretized into bins.

    Subclasses are namespaces of static functions of the standardised variable
    ``z = (v - loc) / scale``; each must be finite with a finite gradient for every finite ``z``
    with ``|z| <= Z_LIMIT``.

    Attributes:
        Z_LIMIT: Standardised bin edges beyond ``+-Z_LIMIT`` are saturated (see
            ``log_bin_mass``); chosen per family so that every log bin mass stays above about
            ``-1e30``, which keeps sums over images finite in float32.
    """

    Z_LIMIT: ClassVar[float]

    @staticmethod
    def log_cdf(z: Tensor) -> Tensor:
        """``log F(z)``."""
        raise NotImplementedError

    @staticmethod
    def log_sf(z: Tensor) -> Tensor:
        """``log(1 - F(z))``."""
        raise NotImplementedError

    @staticmethod
    def log_interval(upper: Tensor, lower: Tensor, h: Tensor, log_h: Tensor) -> Tensor:
        """``log(F(upper) - F(lower))`` for a bin ``[lower, upper]`` of half-width ``h > 0``.

        The edges are each rounded once; ``h`` and ``log_h`` are exact from the log-scale
        (``upper - lower`` would lose the width next to large edges, and ``h`` underflows to 0
        for huge scales while the mass stays positive).
        """
        raise NotImplementedError

    @staticmethod
    def icdf(u: Tensor) -> Tensor:
        """``F^{-1}(u)`` for ``u`` in ``(0, 1)``."""
        raise NotImplementedError


# -- binning ------------------------------------------------------------------------------------
def scaled_level(level: Tensor, n: int, dtype: torch.dtype, shift: int = 0) -> Tensor:
    """Levels -> bin centres ``(2 x - n) / n`` on ``[-1, 1]`` (``n = bins - 1``).

    With ``shift = +1`` / ``-1`` it gives the upper / lower bin edge. The numerator is exact
    for integer levels, so each value is rounded once (an edge computed as centre + half width
    is not, and the error grows by the inverse scale, up to ``e^80``).
    """
    return (2 * level - (n - shift)).to(dtype) / n


@dataclass(frozen=True)
class Bins:
    """The bins of some levels: centres, edges and the open-edge masks (all one shape)."""

    centre: Tensor
    upper_edge: Tensor
    lower_edge: Tensor
    first: Tensor  # bool: level 0, open lower edge
    last: Tensor  # bool: level bins - 1, open upper edge
    n: int  # bins - 1


def bins_of(level: Tensor, n: int, dtype: torch.dtype) -> Bins:
    """The ``Bins`` of integer ``level`` (any shape) for ``n = bins - 1``, in ``dtype``."""
    return Bins(
        centre=scaled_level(level, n, dtype),
        upper_edge=scaled_level(level, n, dtype, +1),
        lower_edge=scaled_level(level, n, dtype, -1),
        first=level == 0,
        last=level == n,
        n=n,
    )


# -- parameters and coupling --------------------------------------------------------------------
def component_parameters(
    raw_log_scale: Tensor, raw_coeff: Tensor, min_log_scale: float
) -> tuple[Tensor, Tensor]:
    """The model's transform of raw log-scales and coupling coefficients.

    Returns:
        ``(log_scale, coeff)``: log-scales clamped below at ``min_log_scale`` (as ``clamp``,
        no gradient below it) and ``tanh`` of the coefficients, each of its input's shape.
    """
    return raw_log_scale.clamp(min=min_log_scale), torch.tanh(raw_coeff)


def coupled_loc(c: int, loc: Tensor, coeff: Tensor, scaled: Tensor, dim: int) -> Tensor:
    """Location of channel ``c`` given the (rescaled) earlier channels of the same pixel.

    ``loc_c + sum_{j < c} tanh(alpha_{c, j}) * scaled_j``; ``dim`` is the channel axis of
    ``loc`` (size ``C``), ``coeff`` (size ``M``, already ``tanh``-ed) and ``scaled`` (at least
    ``c`` entries). Without coupling (``M = 0``) it is ``loc_c``. The result has ``loc``'s
    shape with ``dim`` removed, broadcast against the others.
    """
    base = loc.select(dim, c)
    if c == 0 or coeff.shape[dim] == 0:
        return base
    # The pairs (c, 0..c-1) are contiguous in the coefficient order: block c (c - 1) / 2 + j.
    alphas = coeff.narrow(dim, c * (c - 1) // 2, c)
    return base + (alphas * scaled.narrow(dim, 0, c)).sum(dim)


def coupled_locations(loc: Tensor, coeff: Tensor, centre: Tensor) -> Tensor:
    """``mu_kc`` for every component and channel: ``loc`` ``(..., K, C, H, W)``, ``coeff``
    (``tanh``-ed) ``(..., K, M, H, W)``, ``centre`` the levels' bin centres
    ``(..., 1, C, H, W)``; the result broadcasts them, channel axis ``-3``."""
    channels = loc.shape[-3]
    locs = [coupled_loc(c, loc, coeff, centre, -3) for c in range(channels)]
    return torch.stack(torch.broadcast_tensors(*locs), dim=-3)


# -- one component's bin mass -------------------------------------------------------------------
def standardised_edges(
    bins: Bins, loc: Tensor, log_scale: Tensor, z_limit: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(upper, lower, h, log_h)``: the bin edges standardised by ``loc`` and the scale, and
    the standardised half-width ``h = exp(-log_scale) / n`` with its log (exact from the
    log-scale).

    Saturation: where a whole bin lies beyond ``+-z_limit`` (its inner edge is past it), the
    bin is moved in to the limit keeping its width, ``[z_limit, z_limit + 2h]`` on the right and
    ``[-z_limit - 2h, -z_limit]`` on the left. Its log mass is then that of a bin of the same
    width at the limit, about ``-z_limit`` (logistic) or ``-z_limit^2 / 2`` (Gaussian), instead
    of overflowing; such a bin gets no gradient with respect to the location. Only finite
    parameters far outside the data range with tiny scales reach it.
    """
    inv_scale = torch.exp(-log_scale)
    upper = (bins.upper_edge - loc) * inv_scale
    lower = (bins.lower_edge - loc) * inv_scale
    h = inv_scale / bins.n
    log_h = -math.log(bins.n) - log_scale
    right, left = lower > z_limit, upper < -z_limit
    upper, lower = (
        torch.where(right, z_limit + 2.0 * h, torch.where(left, -z_limit, upper)),
        torch.where(left, -z_limit - 2.0 * h, torch.where(right, z_limit, lower)),
    )
    return upper, lower, h, log_h


def log_bin_mass(family: type[Family], bins: Bins, loc: Tensor, log_scale: Tensor) -> Tensor:
    """``log P(x = level)`` of one discretized component; all arguments broadcast.

    Args:
        family: The continuous family.
        bins: The levels' bins.
        loc: Locations (already coupled).
        log_scale: Log-scales (already clamped).
    """
    upper, lower, h, log_h = standardised_edges(bins, loc, log_scale, family.Z_LIMIT)
    # Every branch is finite (with finite gradients) everywhere, so ``where`` is safe.
    return torch.where(
        bins.first,
        family.log_cdf(upper),  # open lower edge: (-inf, upper]
        torch.where(
            bins.last,
            family.log_sf(lower),  # open upper edge: [lower, inf)
            family.log_interval(upper, lower, h, log_h),
        ),
    )


def component_log_mass(
    family: type[Family], bins: Bins, loc: Tensor, log_scale: Tensor, coeff: Tensor
) -> Tensor:
    """``log P_k(x_c | x_<c)`` for every component and channel.

    Args:
        family: The continuous family.
        bins: The levels' bins, ``(..., 1, C, H, W)`` (the singleton is the component axis).
        loc: Raw locations ``(..., K, C, H, W)``.
        log_scale: Clamped log-scales ``(..., K, C, H, W)``.
        coeff: ``tanh``-ed coupling coefficients ``(..., K, M, H, W)``.

    Returns:
        float ``(..., K, C, H, W)``, broadcast over the leading axes.
    """
    mu = coupled_locations(loc, coeff, bins.centre)
    return log_bin_mass(family, bins, mu, log_scale)


# -- the mixture posterior ----------------------------------------------------------------------
def log_joint_before(log_weights: Tensor, log_mass: Tensor) -> Tensor:
    """``v_kc = log pi_k + sum_{j<c} L_kj``: the log joint of the component and the channels
    before ``c``. ``log_weights`` ``(..., K, H, W)``, ``log_mass`` ``(..., K, C, H, W)``."""
    before = torch.cat(
        [torch.zeros_like(log_mass[..., :1, :, :]), log_mass[..., :-1, :, :].cumsum(dim=-3)],
        dim=-3,
    )
    return log_weights.unsqueeze(-3) + before


def mixture_log_conditional(log_weights: Tensor, log_mass: Tensor) -> Tensor:
    """``log p(x_c | x_<c)`` of every channel, the component marginalised out.

    ``log p(x_c | x_<c) = logsumexp_k(log q_kc + L_kc)`` with the posterior
    ``log q_kc = log_softmax_k(v_kc)`` given the earlier channels. Unlike differences of
    partial joints, this stays exact when ``x_<c`` is very improbable (partial joints ~ -1e7 in
    float32 would leave their difference only ``ulp(1e7) = 1`` exact).

    Args:
        log_weights: ``log_softmax`` of the logits, ``(..., K, H, W)``.
        log_mass: ``L_kc``, ``(..., K, C, H, W)``.

    Returns:
        ``(..., C, H, W)``.
    """
    if log_mass.shape[-4] == 1:
        return log_mass.squeeze(-4)
    log_posterior = torch.log_softmax(log_joint_before(log_weights, log_mass), dim=-4)
    return torch.logsumexp(log_posterior + log_mass, dim=-4)
