"""Shared machinery of the discretized location-scale mixture heads (logistic and Gaussian).

Everything except the continuous family lives here once: the parameter layout, the binning of
levels onto ``[-1, 1]`` with open edge bins, the linear coupling of a channel's location on the
earlier channels of the same pixel, the per-pixel mixture, sampling and the mean. A family
(``DiscretizedLogisticMixtureDistribution``, ``DiscretizedGaussianDistribution``) only
supplies four functions of the standardised variable ``z = (v - loc) / scale``: the log CDF,
the log survival function, the log mass of an interval ``[m - h, m + h]`` and the inverse CDF.

References:
    Salimans, Karpathy, Chen, Kingma, "PixelCNN++: Improving the PixelCNN with Discretized
    Logistic Mixture Likelihood and Other Modifications", ICLR 2017, and its code
    (openai/pixel-cnn, ``discretized_mix_logistic_loss``), whose parameter layout we keep for
    ``channels=3``.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.distributions.utils import lazy_property

from .._checks import check_int
from .base import DiscreteImageDistribution, Head

__all__ = ["MixtureLayout", "LocationScaleMixtureDistribution", "MixtureHead"]

# Work budget (number of tensor elements) for the chunked sums in ``mean``: ~16 MiB in float32.
_CHUNK_ELEMENTS = 2**22
# ``mean`` enumerates the joint of the earlier channels exactly up to this many level
# combinations per pixel (and component); beyond it the coupling uses plug-in means.
_MAX_ENUMERATION = 2**16
# Largest log-scale used for a *draw*: exp(80) is finite even in float32 and already sends every
# nonzero standardised draw (|z| >= 1e-16 for float64 uniforms) past the edge bins, so clamping
# changes no outcome but keeps ``scale * z`` from becoming ``inf * 0 = nan`` when z == 0.
_MAX_DRAW_LOG_SCALE = 80.0
# Lowest accepted ``min_log_scale``: the inverse scale exp(80) ~ 5.5e34 is finite in float32 with
# room for the standardised edges; a bin of width 2 / 65535 is already e^-10 wide.
_MIN_LOG_SCALE_BOUND = -80.0


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
    if min_log_scale < _MIN_LOG_SCALE_BOUND:
        # exp(-log_scale) would overflow float32 (at about -88.7) and turn every bin edge at
        # the location into 0 * inf = nan.
        raise ValueError(
            f"min_log_scale must be >= {_MIN_LOG_SCALE_BOUND} (exp(-min_log_scale) must stay "
            f"finite in float32), got {min_log_scale}"
        )
    return float(min_log_scale)


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


class LocationScaleMixtureDistribution(DiscreteImageDistribution):
    """Base of the discretized mixture distributions; see the family subclasses for the math.

    A subclass implements ``_log_cdf``, ``_log_sf``, ``_log_interval`` and ``_icdf`` for its
    standard (location 0, scale 1) continuous distribution. Everything here calls only those.

    Args:
        params: Raw parameters ``batch_shape + (P, H, W)``; layout as in the subclass docstring.
        channels: Image channels ``C``.
        mixtures: Components ``K``.
        bins: Levels per sub-pixel.
        coupling: Linear coupling of a channel's location on the earlier channels.
        min_log_scale: Lower clamp of the log-scales (part of the model definition), ``>= -80``.
        validate_args: As in ``torch.distributions``.
    """

    def __init__(
        self,
        params: Tensor,
        channels: int = 3,
        mixtures: int = 10,
        bins: int = 256,
        coupling: bool = True,
        min_log_scale: float = -7.0,
        validate_args: bool | None = None,
    ) -> None:
        self.min_log_scale = check_mixture_args(mixtures, coupling, min_log_scale)
        self.mixtures = mixtures
        self.coupling = coupling
        # The base class checks channels/bins, the parameter count, NaNs, and promotes half types.
        super().__init__(params, channels, bins, validate_args=validate_args)
        self.layout = MixtureLayout(self.channels, mixtures, coupling)

    # The split parameters are built on first use, not in ``__init__``: a log-probability that
    # reads only ``params`` (the logistic head's fused path) then never allocates them.
    @lazy_property
    def _parts(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        logits, loc, log_scale, coeff = self.layout.split(self.params)
        return (
            torch.log_softmax(logits, dim=-3),  # batch + (K, H, W)
            loc,  # batch + (K, C, H, W)
            log_scale.clamp(min=self.min_log_scale),  # batch + (K, C, H, W)
            torch.tanh(coeff),  # batch + (K, M, H, W)
        )

    @property
    def _log_weights(self) -> Tensor:
        return self._parts[0]

    @property
    def _loc(self) -> Tensor:
        return self._parts[1]

    @property
    def _log_scale(self) -> Tensor:
        return self._parts[2]

    @property
    def _coeff(self) -> Tensor:
        return self._parts[3]

    # -- the continuous family (standardised variable) --------------------------------------
    @staticmethod
    @abc.abstractmethod
    def _log_cdf(z: Tensor) -> Tensor:
        """``log F(z)``, finite with finite gradient for every finite ``z``."""

    @staticmethod
    @abc.abstractmethod
    def _log_sf(z: Tensor) -> Tensor:
        """``log(1 - F(z))``, finite with finite gradient for every finite ``z``."""

    @staticmethod
    @abc.abstractmethod
    def _log_interval(upper: Tensor, lower: Tensor, h: Tensor, log_h: Tensor) -> Tensor:
        """``log(F(upper) - F(lower))`` for a bin ``[lower, upper]`` of half-width ``h > 0``.

        The edges are each rounded once; ``h`` and ``log_h`` are exact from the log-scale
        (``upper - lower`` would lose the width next to large edges, and ``h`` underflows to 0
        for huge scales while the mass stays positive).
        """

    @staticmethod
    @abc.abstractmethod
    def _icdf(u: Tensor) -> Tensor:
        """``F^{-1}(u)`` for ``u`` in ``(0, 1)``."""

    # -- DiscreteImageDistribution hooks ----------------------------------------------------
    def param_channels_for(self) -> int:
        return MixtureLayout(self.channels, self.mixtures, self.coupling).param_channels

    def _describe(self) -> str:
        return (
            f"channels={self.channels}, mixtures={self.mixtures}, bins={self.bins}, "
            f"coupling={self.coupling}"
        )

    def _init_kwargs(self) -> dict[str, Any]:
        return {
            **super()._init_kwargs(),
            "mixtures": self.mixtures,
            "coupling": self.coupling,
            "min_log_scale": self.min_log_scale,
        }

    # -- shared math ------------------------------------------------------------------------
    def _scale(self, level: Tensor, shift: int = 0) -> Tensor:
        """Levels -> bin centres ``(2 x - (bins - 1)) / (bins - 1)`` on ``[-1, 1]``.

        With ``shift = +1`` / ``-1`` it gives the upper / lower bin edge. The numerator is exact
        for integer levels, so each value is rounded once (an edge computed as centre + half
        width is not, and the error grows by the inverse scale, up to ``e^7``).
        """
        n = self.bins - 1
        return (2 * level - (n - shift)).to(self.params.dtype) / n

    def _log_bin_mass(self, level: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
        """``log P(x = level)`` for one discretized component; all arguments broadcast.

        Args:
            level: int64 levels.
            loc: float locations (already coupled).
            log_scale: float log-scales (already clamped).
        """
        n = self.bins - 1
        upper_edge, lower_edge = self._scale(level, +1), self._scale(level, -1)
        return self._log_bin_mass_at(
            upper_edge, lower_edge, level == 0, level == n, loc, log_scale, n
        )

    @classmethod
    def _log_bin_mass_at(
        cls,
        upper_edge: Tensor,
        lower_edge: Tensor,
        first: Tensor,
        last: Tensor,
        loc: Tensor,
        log_scale: Tensor,
        n: int,
    ) -> Tensor:
        """``_log_bin_mass`` from prepared bins (the lean path prepares them once for all steps).

        Args:
            upper_edge: float upper bin edges ``_scale(level, +1)``.
            lower_edge: float lower bin edges ``_scale(level, -1)``.
            first: bool, ``level == 0`` (open lower edge).
            last: bool, ``level == bins - 1`` (open upper edge).
            loc: float locations (already coupled).
            log_scale: float log-scales (already clamped).
            n: ``bins - 1``.
        """
        inv_scale = torch.exp(-log_scale)
        upper = (upper_edge - loc) * inv_scale  # standardised bin edges
        lower = (lower_edge - loc) * inv_scale
        h = inv_scale / n  # standardised half-width
        log_h = -math.log(n) - log_scale
        # Every branch is finite (with finite gradients) everywhere, so ``where`` is safe.
        return torch.where(
            first,
            cls._log_cdf(upper),  # open lower edge: (-inf, upper]
            torch.where(
                last,
                cls._log_sf(lower),  # open upper edge: [lower, inf)
                cls._log_interval(upper, lower, h, log_h),
            ),
        )

    def _component_log_mass(self, value: Tensor) -> Tensor:
        """``log P_k(x_c | x_<c)`` for every component and channel.

        Args:
            value: int64 ``sample_shape + batch_shape + (C, H, W)``.

        Returns:
            float ``sample_shape + batch_shape + (K, C, H, W)``.
        """
        level = value.unsqueeze(-4)  # (..., 1, C, H, W): broadcast over components
        scaled = self._scale(level)
        locs = [coupled_loc(c, self._loc, self._coeff, scaled, -3) for c in range(self.channels)]
        loc = torch.stack(torch.broadcast_tensors(*locs), dim=-3)  # (..., K, C, H, W)
        return self._log_bin_mass(level, loc, self._log_scale)

    def _elementwise_log_prob(self, value: Tensor) -> Tensor:
        log_mass = self._component_log_mass(value)  # (..., K, C, H, W)
        if self.mixtures == 1:
            return log_mass.squeeze(-4)
        # The component is shared by the channels of a pixel, so channel c sees the component
        # through its posterior given x_<c:
        #   log p(x_c | x_<c) = logsumexp_k(log q_k + log P_k(x_c | x_<c)),
        #   log q = log_softmax_k(log pi_k + sum_{j<c} log P_k(x_j | x_<j)).
        # Unlike differences of partial joints, this stays exact when x_<c is very improbable
        # (partial joints ~ -1e7 in float32 would leave the difference only ulp(1e7) = 1 exact).
        before = torch.cat(
            [torch.zeros_like(log_mass[..., :1, :, :]), log_mass[..., :-1, :, :].cumsum(dim=-3)],
            dim=-3,
        )  # (..., K, C, H, W): sum over the channels before c
        log_posterior = torch.log_softmax(self._log_weights.unsqueeze(-3) + before, dim=-4)
        return torch.logsumexp(log_posterior + log_mass, dim=-4)

    def _sample(self, sample_shape: torch.Size, generator: torch.Generator | None) -> Tensor:
        dtype, device = self._loc.dtype, self._loc.device
        eps = torch.finfo(dtype).eps
        shape = sample_shape + self._log_weights.shape  # S + B + (K, H, W)
        # Component per pixel by Gumbel-max (shared by the channels of the pixel).
        u = torch.rand(shape, generator=generator, dtype=dtype, device=device)
        gumbel = -torch.log(-torch.log(u.clamp(eps, 1.0 - eps)))
        pick = (self._log_weights + gumbel).argmax(dim=-3, keepdim=True).unsqueeze(-3)

        def chosen(t: Tensor) -> Tensor:  # batch + (K, X, H, W) -> S + B + (1, X, H, W)
            t = t.expand(sample_shape + t.shape)
            return t.gather(-4, pick.expand(*t.shape[:-4], 1, *t.shape[-3:]))

        loc, log_scale, coeff = chosen(self._loc), chosen(self._log_scale), chosen(self._coeff)
        u = torch.rand(
            sample_shape + self.batch_shape + self.event_shape,
            generator=generator,
            dtype=dtype,
            device=device,
        ).unsqueeze(-4).clamp(eps, 1.0 - eps)
        levels: list[Tensor] = []
        scaled: list[Tensor] = []
        for c in range(self.channels):
            # Coupling on the *drawn levels* of earlier channels, exactly as log_prob conditions.
            earlier = torch.stack(scaled, dim=-3) if scaled else loc[..., :0, :, :]
            mu = coupled_loc(c, loc, coeff, earlier, -3)
            scale = log_scale[..., c, :, :].clamp(max=_MAX_DRAW_LOG_SCALE).exp()
            v = mu + scale * self._icdf(u[..., c, :, :])
            # Nearest level; values beyond the edges land in the edge bins (the open edges).
            level = ((v + 1.0) * ((self.bins - 1) / 2.0)).clamp(0, self.bins - 1).round().long()
            levels.append(level)
            scaled.append(self._scale(level))
        return torch.stack(levels, dim=-3).squeeze(-4)

    def _expected_level(self, loc: Tensor, log_scale: Tensor) -> Tensor:
        """Mean level of one discretized component: ``E[X] = sum_{k=1}^{bins-1} P(X >= k)``.

        ``P(X >= k)`` is the survival function at the lower edge of bin ``k``,
        ``(2k - bins) / (bins - 1)``; the sum runs in chunks of levels to bound memory.
        ``loc`` and ``log_scale`` broadcast; the result has their broadcast shape.
        """
        loc, log_scale = torch.broadcast_tensors(loc, log_scale)
        inv_scale = torch.exp(-log_scale).unsqueeze(-1)
        loc = loc.unsqueeze(-1)
        total = torch.zeros(loc.shape[:-1], dtype=loc.dtype, device=loc.device)
        step = max(1, _CHUNK_ELEMENTS // max(1, loc.numel()))
        for start in range(1, self.bins, step):
            k = torch.arange(start, min(self.bins, start + step), device=loc.device)
            edges = self._scale(k, -1)
            total = total + torch.exp(self._log_sf((edges - loc) * inv_scale)).sum(-1)
        return total

    @property
    def mean(self) -> Tensor:
        """Mean level of every sub-pixel, float ``batch_shape + (C, H, W)`` (in levels).

        Exact for channel 0 and without coupling. With coupling, exact while
        ``bins ** channels <= 2 ** 16`` (the joint of the earlier channels is enumerated);
        beyond that, channel ``c``'s location uses each component's mean of the earlier
        channels in place of their values (a plug-in approximation).

        Computed without autograd (the enumeration would keep a graph over every level):
        the result has no gradient with respect to the parameters, unlike the softmax head's
        ``mean``.
        """
        with torch.no_grad():
            return self._mean()

    def _mean(self) -> Tensor:
        k, c = self.mixtures, self.channels
        n_pixels = self.batch_shape.numel() * self.params.shape[-2:].numel()

        def per_pixel(t: Tensor) -> Tensor:  # batch + (K, X, H, W) -> (N, K, X)
            return t.movedim((-4, -3), (-2, -1)).reshape(n_pixels, k, t.shape[-3])

        loc, log_scale, coeff = (per_pixel(t) for t in (self._loc, self._log_scale, self._coeff))
        weights = self._log_weights.movedim(-3, -1).reshape(n_pixels, k).exp()  # (N, K)
        enumerable = self.bins**c <= _MAX_ENUMERATION
        component_means: list[Tensor] = []  # per channel: (N, K)
        for ch in range(c):
            if ch > 0 and self.coupling and enumerable:
                component_means.append(self._enumerated_mean(ch, loc, log_scale, coeff))
                continue
            # Exact for channel 0 and without coupling; otherwise the plug-in approximation:
            # the earlier channels enter the coupling at their per-component means.
            earlier = torch.stack(component_means, dim=-1) if component_means else loc[..., :0]
            mu = coupled_loc(ch, loc, coeff, self._scale(earlier), -1)
            component_means.append(self._expected_level(mu, log_scale[..., ch]))
        mean = (weights.unsqueeze(-1) * torch.stack(component_means, dim=-1)).sum(-2)  # (N, C)
        return mean.reshape(*self.batch_shape, *self.params.shape[-2:], c).movedim(-1, -3)

    def _enumerated_mean(self, ch: int, loc: Tensor, log_scale: Tensor, coeff: Tensor) -> Tensor:
        """Exact per-component mean level of coupled channel ``ch >= 1``.

        ``E_k[X_ch] = sum_{x_<ch} P_k(x_<ch) E_k[X_ch | x_<ch]`` over all ``bins ** ch`` values
        of the earlier channels, in chunks of pixels.

        Args:
            ch: The channel.
            loc: Locations ``(N, K, C)``.
            log_scale: Clamped log-scales ``(N, K, C)``.
            coeff: Coupling coefficients ``(N, K, M)``, ``tanh``-ed.

        Returns:
            ``(N, K)``.
        """
        grid = torch.cartesian_prod(*[torch.arange(self.bins, device=loc.device)] * ch)
        grid = grid.reshape(-1, ch)  # (G, ch): every value of the earlier channels
        scaled = self._scale(grid)
        step = max(1, _CHUNK_ELEMENTS // (self.mixtures * self.bins ** (ch + 1)))
        out = []
        for start in range(0, loc.shape[0], step):
            # (n, K, 1, X): the singleton axis broadcasts against the grid.
            lo, ls, co = (t[start : start + step].unsqueeze(-2) for t in (loc, log_scale, coeff))
            log_joint = sum(
                self._log_bin_mass(grid[:, j], coupled_loc(j, lo, co, scaled, -1), ls[..., j])
                for j in range(ch)
            )  # (n, K, G): log P_k(x_<ch)
            given = self._expected_level(coupled_loc(ch, lo, co, scaled, -1), ls[..., ch])
            out.append((torch.exp(log_joint) * given).sum(-1))
        return torch.cat(out, dim=0)


class MixtureHead(Head):
    """Base of the discretized mixture heads: options, layout and the distribution factory.

    Args:
        channels: Image channels ``C``.
        mixtures: Components ``K``.
        bins: Levels per sub-pixel.
        coupling: Linear coupling of each channel's location on the earlier channels.
        in_channels: Feature channels of the 1x1 projection, or ``None`` for raw parameters.
        min_log_scale: Lower clamp of the log-scales, ``>= -80``.
        feature_groups: Must be 1 (the channels of a pixel share the mixture component).
    """

    distribution_class: ClassVar[type[LocationScaleMixtureDistribution]]

    def __init__(
        self,
        channels: int,
        mixtures: int,
        bins: int,
        coupling: bool,
        in_channels: int | None,
        min_log_scale: float,
        feature_groups: int = 1,
    ) -> None:
        # feature_groups is accepted only so that the base class can reject anything but 1 with
        # its explanation: the channels of a pixel share one mixture component.
        super().__init__(channels, bins, in_channels, feature_groups)
        self.min_log_scale = check_mixture_args(mixtures, coupling, min_log_scale)
        self.mixtures = mixtures
        self.coupling = coupling
        self.layout = MixtureLayout(self.channels, mixtures, coupling)
        self._make_projection()

    @property
    def param_channels(self) -> int:
        """``K (1 + 2C + C(C-1)/2)`` with coupling, ``K (1 + 2C)`` without."""
        return self.layout.param_channels

    def distribution(
        self, params: Tensor, validate_args: bool | None = None
    ) -> LocationScaleMixtureDistribution:
        """Wrap raw parameters ``(B, P, H, W)`` into this head's distribution."""
        return self.distribution_class(
            params,
            channels=self.channels,
            mixtures=self.mixtures,
            bins=self.bins,
            coupling=self.coupling,
            min_log_scale=self.min_log_scale,
            validate_args=validate_args,
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, mixtures={self.mixtures}, coupling={self.coupling}, "
            f"min_log_scale={self.min_log_scale}"
        )
