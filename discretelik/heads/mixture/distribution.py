"""The discretized location-scale mixture distribution and head, for any family.

The likelihood itself is in ``formula.py`` (shared) and the family's file (``logistic.py``,
``gaussian.py``); this module holds what turns it into a ``torch.distributions``
distribution: the parameter split, the table of log-likelihood implementations, sampling, and
the per-sub-pixel summaries (mean, variance, mode).

References:
    Salimans, Karpathy, Chen, Kingma, "PixelCNN++: Improving the PixelCNN with Discretized
    Logistic Mixture Likelihood and Other Modifications", ICLR 2017, and its code
    (openai/pixel-cnn, ``discretized_mix_logistic_loss``), whose parameter layout we keep for
    ``channels=3``.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.distributions.utils import lazy_property

from ..backend import AUTO, LogProbBackend
from ..base import DiscreteImageDistribution, Head
from .formula import (
    Family,
    bins_of,
    component_log_mass,
    component_parameters,
    coupled_loc,
    log_bin_mass,
    mixture_log_conditional,
    scaled_level,
)
from .layout import MixtureLayout, check_mixture_args
from .lean import lean_elementwise_log_prob

__all__ = ["LocationScaleMixtureDistribution", "MixtureHead", "mixture_backends"]

# Work budget (number of tensor elements) for the chunked sums of the summaries: ~16 MiB.
_CHUNK_ELEMENTS = 2**22
# The summaries enumerate the joint of the earlier channels exactly up to this many level
# combinations per pixel (and component); beyond it the coupling uses plug-in means.
_MAX_ENUMERATION = 2**16
# Largest log-scale used for a *draw*: exp(80) is finite even in float32 and already sends every
# nonzero standardised draw (|z| >= 1e-16 for float64 uniforms) past the edge bins, so clamping
# changes no outcome but keeps ``scale * z`` from becoming ``inf * 0 = nan`` when z == 0.
_MAX_DRAW_LOG_SCALE = 80.0


def _eager(dist: "LocationScaleMixtureDistribution", value: Tensor) -> Tensor:
    """The formula under plain autograd, all components at once."""
    log_mass = component_log_mass(
        dist.family, bins_of(value.unsqueeze(-4), dist.bins - 1, dist.params.dtype),
        dist._loc, dist._log_scale, dist._coeff,
    )  # fmt: skip
    return mixture_log_conditional(dist._log_weights, log_mass)


def _lean(dist: "LocationScaleMixtureDistribution", value: Tensor) -> Tensor:
    return lean_elementwise_log_prob(
        dist.params, value, dist.family, dist.layout, dist.bins, dist.min_log_scale
    )


EAGER = LogProbBackend("eager", _eager, twice_differentiable=True)
LEAN = LogProbBackend("lean", _lean, traceable=False)


def mixture_backends(*extra: LogProbBackend) -> MappingProxyType:
    """A family's table: ``"eager"``, ``"lean"`` and any ``extra`` implementations."""
    return MappingProxyType({b.name: b for b in (EAGER, LEAN, *extra)})


class LocationScaleMixtureDistribution(DiscreteImageDistribution):
    r"""A mixture of discretized location-scale components per pixel, with coupled channels.

    What every discretized mixture head shares; a family (the logistic of
    [`DiscretizedLogisticMixtureDistribution`][discretelik.DiscretizedLogisticMixtureDistribution],
    the normal of [`DiscretizedGaussianDistribution`][discretelik.DiscretizedGaussianDistribution])
    supplies its continuous CDF $F$. The formula is written once, in
    ``discretelik/heads/mixture/formula.py``.

    **Binning.** A level $x \in \{0, \dots, B-1\}$ ($B$ = ``bins``) sits at the bin centre
    $\tilde x = 2x/(B-1) - 1 \in [-1, 1]$; bins have half-width $\delta = 1/(B-1)$, and the edge
    bins are open: level $0$ covers $(-\infty, -1 + \delta]$ and level $B - 1$ covers
    $[1 - \delta, \infty)$.

    **Likelihood of a pixel.** With $\pi = \mathrm{softmax}(\text{logits})$ over $K$ components
    shared by the $C$ channels of the pixel,

    $$
    p(x_0, \dots, x_{C-1}) = \sum_{k=1}^{K} \pi_k \prod_{c=0}^{C-1} P_k(x_c \mid x_{<c}),
    $$

    where $P_k(x_c \mid x_{<c})$ is the mass that $F((\cdot - \mu_{kc}) / s_{kc})$ gives the bin
    of $x_c$, with scale $s_{kc} = \exp(\max(\ell_{kc}, \ell_{\min}))$ ($\ell_{\min}$ =
    ``min_log_scale``; the clamp is part of the model: log-scales below it act as $\ell_{\min}$
    and get no gradient) and the coupled location

    $$
    \mu_{kc} = m_{kc} + \sum_{j<c} \tanh(\alpha_{k,cj})\, \tilde x_j
    $$

    (no $\alpha$ terms with ``coupling=False``: the channels are then independent given the
    component). ``elementwise_log_prob`` gives channel $c$ the conditional
    $\log p(x_{\le c}) - \log p(x_{<c})$ (the component marginalised out through its posterior
    given $x_{<c}$), so the channels of a pixel sum to $\log p(x_0, \dots, x_{C-1})$.

    **Parameter layout** (channel axis of ``params``, $M = C(C-1)/2$ with coupling, else 0):
    $P = K(1 + 2C + M)$, i.e. $10K$ for RGB with coupling, $7K$ without, $3K$ for $C = 1$.

    - channels $[0, K)$: the logits;
    - then one slot per image channel $c = 0, \dots, C-1$, in order: $K$ locations
      $m_{\cdot c}$, $K$ log-scales $\ell_{\cdot c}$, then $n_c$ blocks of $K$ coefficients.

    The $M$ coefficient blocks are ordered by pair $(c, j)$, $j < c$:
    $\alpha_{10}, \alpha_{20}, \alpha_{21}, \alpha_{30}, \dots$ (block $c(c-1)/2 + j$), and dealt
    out in that order over the slots, $n_c = \lfloor M/C \rfloor + [c < M \bmod C]$ (for RGB:
    $\alpha_{GR}, \alpha_{BR}, \alpha_{BG}$ in the R, G, B slots, as openai/pixel-cnn).

    **Sampling** draws a component per pixel (Gumbel-max), then channel by channel a draw of
    the family by inverse CDF, coupled on the already drawn levels, rounded to the nearest
    level (beyond the edges: the edge level). All randomness comes from ``generator`` when
    given.

    **Summaries per sub-pixel** (in levels, without gradient: they enumerate levels):

    - ``mean`` and ``variance``: of each sub-pixel's marginal, from
      $E[X] = \sum_{j \ge 1} P(X \ge j)$ and $E[X^2] = \sum_{j \ge 1} (2j - 1) P(X \ge j)$ per
      component. Exact for channel 0 and without coupling; with coupling exact while
      $B^C \le 2^{16}$ (the joint of the earlier channels is enumerated), otherwise channel
      $c$'s location uses each component's mean of the earlier channels in place of their
      values (a plug-in approximation, which leaves out the spread that the earlier channels
      add through the coupling). ``mean`` lies in $[0, B - 1]$; ``stddev`` is
      $\sqrt{\text{variance}}$.
    - ``mode``: channel 0's marginal mode, then for each later channel the mode of its
      conditional given the earlier channels at their modes (the component posterior
      included), i.e. a greedy decoding of each pixel. Without coupling and with one component
      it is each channel's marginal mode; in general it is not the joint mode of the pixel,
      which would need a search over $B^C$ values.
    - ``entropy`` has no closed form for a mixture and raises ``NotImplementedError``.

    **Implementations** (``log_prob_backend``), besides the family's own:

    - ``"eager"``: the formula under plain autograd, all components at once; twice
      differentiable, but it saves many ``sample_shape + batch_shape + (K, C, H, W)``
      temporaries for backward;
    - ``"lean"``: one autograd node that loops over the components in forward and backward
      and keeps no ``K``-fold temporaries (it saves the parameters, the levels and one
      ``sample_shape + batch_shape + (C, H, W)`` tensor); backward recomputes each component's
      masses through the same formula under autograd (any device, float32/64). While
      ``torch.compile`` traces it is answered by ``"eager"``, which the compiler fuses.

    Args:
        params: Raw parameters ``batch_shape + (P, H, W)``; layout above.
        channels: Image channels ``C``.
        mixtures: Components ``K``.
        bins: Levels per sub-pixel.
        coupling: Linear coupling of a channel's location on the earlier channels.
        min_log_scale: Lower clamp of the log-scales (part of the model definition), ``>= -80``.
        validate_args: As in ``torch.distributions``.
        log_prob_backend: ``"auto"`` or a name in ``log_prob_backends``.
    """

    family: ClassVar[type[Family]]
    log_prob_backends = mixture_backends()

    def __init__(
        self,
        params: Tensor,
        channels: int = 3,
        mixtures: int = 10,
        bins: int = 256,
        coupling: bool = True,
        min_log_scale: float = -7.0,
        validate_args: bool | None = None,
        log_prob_backend: str = AUTO,
    ) -> None:
        self.min_log_scale = check_mixture_args(mixtures, coupling, min_log_scale)
        self.mixtures = mixtures
        self.coupling = coupling
        # The base class checks channels/bins, the parameter count, non-finite values (under
        # validation) and the backend name, and promotes half types.
        super().__init__(params, channels, bins, validate_args, log_prob_backend)
        self.layout = MixtureLayout(self.channels, mixtures, coupling)

    # The split parameters are built on first use, not in ``__init__``: an implementation that
    # reads only ``params`` (lean, Triton) then never allocates them.
    @lazy_property
    def _parts(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        logits, loc, raw_log_scale, raw_coeff = self.layout.split(self.params)
        log_scale, coeff = component_parameters(raw_log_scale, raw_coeff, self.min_log_scale)
        # batch + (K, H, W), (K, C, H, W), (K, C, H, W), (K, M, H, W)
        return torch.log_softmax(logits, dim=-3), loc, log_scale, coeff

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

    def _scale(self, level: Tensor, shift: int = 0) -> Tensor:
        return scaled_level(level, self.bins - 1, self.params.dtype, shift)

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
            v = mu + scale * self.family.icdf(u[..., c, :, :])
            # Nearest level; values beyond the edges land in the edge bins (the open edges).
            level = ((v + 1.0) * ((self.bins - 1) / 2.0)).clamp(0, self.bins - 1).round().long()
            levels.append(level)
            scaled.append(self._scale(level))
        return torch.stack(levels, dim=-3).squeeze(-4)

    # -- per-sub-pixel summaries (see the class docstring) ---------------------------------
    @property
    def mean(self) -> Tensor:
        """Mean level of every sub-pixel, float ``batch_shape + (C, H, W)`` in
        ``[0, bins - 1]`` (see the class docstring for the coupled channels). Computed without
        autograd: it has no gradient with respect to the parameters."""
        return self._moments[0]

    @property
    def variance(self) -> Tensor:
        """Variance of every sub-pixel's marginal, float ``batch_shape + (C, H, W)`` in
        levels squared (see the class docstring for the coupled channels); no gradient."""
        return self._moments[1]

    @property
    def mode(self) -> Tensor:
        """Greedy per-pixel mode (see the class docstring): ``int64``
        ``batch_shape + (C, H, W)``."""
        with torch.no_grad():
            return self._greedy_mode()

    def _per_pixel(self) -> tuple[int, Tensor, Tensor, Tensor, Tensor]:
        """``(N, log_w (N, K), loc (N, K, C), log_scale (N, K, C), coeff (N, K, M))`` with the
        ``N = prod(batch_shape) H W`` pixels first."""
        k = self.mixtures
        n_pixels = self.batch_shape.numel() * self.params.shape[-2:].numel()

        def per_pixel(t: Tensor) -> Tensor:  # batch + (K, X, H, W) -> (N, K, X)
            return t.movedim((-4, -3), (-2, -1)).reshape(n_pixels, k, t.shape[-3])

        log_w = self._log_weights.movedim(-3, -1).reshape(n_pixels, k)
        loc, log_scale, coeff = (per_pixel(t) for t in (self._loc, self._log_scale, self._coeff))
        return n_pixels, log_w, loc, log_scale, coeff

    def _image(self, per_pixel: Tensor) -> Tensor:
        """``(N, C)`` -> ``batch_shape + (C, H, W)``."""
        shape = (*self.batch_shape, *self.params.shape[-2:], self.channels)
        return per_pixel.reshape(shape).movedim(-1, -3)

    @lazy_property
    def _moments(self) -> tuple[Tensor, Tensor]:
        """``(mean, variance)``, computed once per distribution."""
        with torch.no_grad():
            n, log_w, loc, log_scale, coeff = self._per_pixel()
            weights = log_w.exp().unsqueeze(-1)  # (N, K, 1)
            enumerable = self.bins**self.channels <= _MAX_ENUMERATION
            first: list[Tensor] = []  # per channel: (N, K)
            second: list[Tensor] = []
            for ch in range(self.channels):
                if ch > 0 and self.coupling and enumerable:
                    m1, m2 = self._enumerated_moments(ch, loc, log_scale, coeff)
                else:
                    # Exact for channel 0 and without coupling; otherwise the plug-in
                    # approximation: the earlier channels enter at their per-component means.
                    earlier = torch.stack(first, dim=-1) if first else loc[..., :0]
                    mu = coupled_loc(ch, loc, coeff, self._scale(earlier), -1)
                    m1, m2 = self._level_moments(mu, log_scale[..., ch])
                first.append(m1)
                second.append(m2)
            mean = (weights * torch.stack(first, dim=-1)).sum(-2)  # (N, C)
            square = (weights * torch.stack(second, dim=-1)).sum(-2)
            # The level probabilities sum to 1 only up to rounding: keep the summaries in range.
            mean = mean.clamp(0, self.bins - 1)
            variance = (square - mean * mean).clamp(min=0)
            return self._image(mean), self._image(variance)

    def _level_moments(self, loc: Tensor, log_scale: Tensor) -> tuple[Tensor, Tensor]:
        """``(E[X], E[X^2])`` of one discretized component, from the survival function at the
        lower edge of each bin ``j >= 1``; ``loc`` and ``log_scale`` broadcast, the results
        have their broadcast shape. Summed in chunks of levels to bound memory."""
        loc, log_scale = torch.broadcast_tensors(loc, log_scale)
        inv_scale = torch.exp(-log_scale).unsqueeze(-1)
        loc = loc.unsqueeze(-1)
        first = torch.zeros(loc.shape[:-1], dtype=loc.dtype, device=loc.device)
        second = torch.zeros_like(first)
        limit = self.family.Z_LIMIT
        step = max(1, _CHUNK_ELEMENTS // max(1, loc.numel()))
        for start in range(1, self.bins, step):
            j = torch.arange(start, min(self.bins, start + step), device=loc.device)
            z = ((self._scale(j, -1) - loc) * inv_scale).clamp(-limit, limit)
            tail = torch.exp(self.family.log_sf(z))  # P(X >= j)
            first = first + tail.sum(-1)
            second = second + (tail * (2 * j - 1).to(tail.dtype)).sum(-1)
        return first, second

    def _enumerated_moments(
        self, ch: int, loc: Tensor, log_scale: Tensor, coeff: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Exact per-component ``(E_k[X_ch], E_k[X_ch^2])`` of coupled channel ``ch >= 1``.

        ``E_k[f(X_ch)] = sum_{x_<ch} P_k(x_<ch) E_k[f(X_ch) | x_<ch]`` over all ``bins ** ch``
        values of the earlier channels, in chunks of pixels.

        Args:
            ch: The channel.
            loc: Locations ``(N, K, C)``.
            log_scale: Clamped log-scales ``(N, K, C)``.
            coeff: Coupling coefficients ``(N, K, M)``, ``tanh``-ed.

        Returns:
            Two ``(N, K)`` tensors.
        """
        grid = torch.cartesian_prod(*[torch.arange(self.bins, device=loc.device)] * ch)
        grid = grid.reshape(-1, ch)  # (G, ch): every value of the earlier channels
        scaled = self._scale(grid)
        step = max(1, _CHUNK_ELEMENTS // (self.mixtures * self.bins ** (ch + 1)))
        first, second = [], []
        for start in range(0, loc.shape[0], step):
            # (n, K, 1, X): the singleton axis broadcasts against the grid.
            lo, ls, co = (t[start : start + step].unsqueeze(-2) for t in (loc, log_scale, coeff))
            log_joint = sum(
                log_bin_mass(
                    self.family, bins_of(grid[:, j], self.bins - 1, loc.dtype),
                    coupled_loc(j, lo, co, scaled, -1), ls[..., j],
                )  # fmt: skip
                for j in range(ch)
            )  # (n, K, G): log P_k(x_<ch)
            m1, m2 = self._level_moments(coupled_loc(ch, lo, co, scaled, -1), ls[..., ch])
            joint = torch.exp(log_joint)
            first.append((joint * m1).sum(-1))
            second.append((joint * m2).sum(-1))
        return torch.cat(first, dim=0), torch.cat(second, dim=0)

    def _greedy_mode(self) -> Tensor:
        n, log_w, loc, log_scale, coeff = self._per_pixel()
        k, n_levels = self.mixtures, self.bins
        chosen = torch.zeros(n, self.channels, dtype=torch.long, device=loc.device)
        step = max(1, _CHUNK_ELEMENTS // (k * n_levels))
        levels = torch.arange(n_levels, device=loc.device)
        all_bins = bins_of(levels, n_levels - 1, loc.dtype)  # (L,)
        for start in range(0, n, step):
            rows = slice(start, start + step)
            lo, ls, co, prior = loc[rows], log_scale[rows], coeff[rows], log_w[rows]
            for ch in range(self.channels):
                mu = coupled_loc(ch, lo, co, self._scale(chosen[rows]).unsqueeze(-2), -1)
                log_mass = log_bin_mass(
                    self.family, all_bins, mu.unsqueeze(-1), ls[..., ch].unsqueeze(-1)
                )  # (n, K, L)
                posterior = torch.log_softmax(prior, dim=-1).unsqueeze(-1)
                conditional = torch.logsumexp(posterior + log_mass, dim=-2)  # (n, L)
                best = conditional.argmax(dim=-1)  # the first of equally likely levels
                chosen[rows, ch] = best
                # The next channel's component posterior includes this channel's mass.
                prior = prior + log_mass.gather(-1, best[:, None, None].expand(-1, k, 1))[..., 0]
        return self._image(chosen)


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
        log_prob_backend: ``"auto"`` or a name in ``distribution_class.log_prob_backends``.
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
        log_prob_backend: str = AUTO,
    ) -> None:
        # feature_groups is accepted only so that the base class can reject anything but 1 with
        # its explanation: the channels of a pixel share one mixture component.
        super().__init__(channels, bins, in_channels, feature_groups, log_prob_backend)
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
            log_prob_backend=self.log_prob_backend,
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, mixtures={self.mixtures}, coupling={self.coupling}, "
            f"min_log_scale={self.min_log_scale}"
        )
