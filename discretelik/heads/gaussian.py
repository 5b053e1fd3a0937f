r"""Discretized Gaussian (mixture) likelihood.

The same binning, open edge bins, channel coupling and parameter layout as the discretized
logistic mixture (all shared in ``_mixture``), with the normal CDF in place of the logistic
one. With ``mixtures=1`` and ``coupling=False`` it is the discretized Gaussian decoder common in
VAEs on integer images.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..registry import register_head
from ._lean_mixture import lean_elementwise_log_prob
from ._mixture import LocationScaleMixtureDistribution, MixtureHead

__all__ = ["DiscretizedGaussian", "DiscretizedGaussianDistribution"]

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


class DiscretizedGaussianDistribution(LocationScaleMixtureDistribution):
    r"""Mixture of discretized Gaussians per pixel, with linearly coupled channels.

    **Binning.** A level $x \in \{0, \dots, B-1\}$ ($B$ = ``bins``) sits at the bin centre
    $\tilde x = 2x/(B-1) - 1 \in [-1, 1]$; bins have half-width $\delta = 1/(B-1)$, and the edge
    bins are open: level $0$ covers $(-\infty, -1 + \delta]$ and level $B - 1$ covers
    $[1 - \delta, \infty)$.

    **Likelihood of a pixel.** With $\pi = \mathrm{softmax}(\text{logits})$ over $K$ components
    shared by the $C$ channels of the pixel,

    $$
    p(x_0, \dots, x_{C-1}) = \sum_{k=1}^{K} \pi_k \prod_{c=0}^{C-1} P_k(x_c \mid x_{<c}),
    $$

    $$
    P_k(x_c \mid x_{<c}) =
    \begin{cases}
    \Phi\!\left(\frac{\tilde x_c + \delta - \mu_{kc}}{s_{kc}}\right) & x_c = 0, \\
    1 - \Phi\!\left(\frac{\tilde x_c - \delta - \mu_{kc}}{s_{kc}}\right) & x_c = B - 1, \\
    \Phi\!\left(\frac{\tilde x_c + \delta - \mu_{kc}}{s_{kc}}\right)
    - \Phi\!\left(\frac{\tilde x_c - \delta - \mu_{kc}}{s_{kc}}\right) & \text{otherwise},
    \end{cases}
    $$

    with the standard normal CDF $\Phi$, standard deviation
    $s_{kc} = \exp(\max(\ell_{kc}, \ell_{\min}))$ ($\ell$ is a log-std; $\ell_{\min}$ =
    ``min_log_scale``, clamped exactly like the logistic mixture's log-scales: part of the model,
    no gradient below it), and the coupled location

    $$
    \mu_{kc} = m_{kc} + \sum_{j<c} \tanh(\alpha_{k,cj})\, \tilde x_j
    $$

    (no $\alpha$ terms with ``coupling=False``: channels are then independent given the
    component).

    ``elementwise_log_prob`` gives channel $c$ the conditional
    $\log p(x_{\le c}) - \log p(x_{<c})$ (the component marginalised out), so the channels of a
    pixel sum to $\log p(x_0, \dots, x_{C-1})$.

    **Parameter layout** (channel axis of ``params``, $M = C(C-1)/2$ with coupling, else 0):
    $P = K(1 + 2C + M)$, the same as the discretized logistic mixture.

    - channels $[0, K)$: the logits;
    - then one slot per image channel $c = 0, \dots, C-1$, in order: $K$ locations
      $m_{\cdot c}$, $K$ log-stds $\ell_{\cdot c}$, then $n_c$ blocks of $K$ coefficients.

    The $M$ coefficient blocks are ordered by pair $(c, j)$, $j < c$:
    $\alpha_{10}, \alpha_{20}, \alpha_{21}, \alpha_{30}, \dots$ (block $c(c-1)/2 + j$), and dealt
    out in that order over the slots, $n_c = \lfloor M/C \rfloor + [c < M \bmod C]$ (for RGB:
    $\alpha_{GR}, \alpha_{BR}, \alpha_{BG}$ in the R, G, B slots, as openai/pixel-cnn).

    **Sampling** draws a component per pixel (Gumbel-max), then channel by channel a normal by
    inverse CDF, coupled on the already drawn levels, rounded to the nearest level (beyond the
    edges: the edge level). All randomness comes from ``generator`` when given.

    **Mean** (in levels, $E[X] = \sum_{k=1}^{B-1} P(X \ge k)$, summed in chunks): exact for
    channel 0 and without coupling; with coupling exact while $B^C \le 2^{16}$ (the joint of
    the earlier channels is enumerated), otherwise channel $c$'s location uses each component's
    mean of the earlier channels in place of their values (plug-in approximation).

    !!! note "Numerics"
        Everything is in log space and finite, with finite gradients, for any finite
        parameters whose log-mass is representable: beyond standardised edges of about
        $\pm 2.6 \cdot 10^{19}$ (float32) $-u^2/2$ itself overflows to $-\infty$.
        $\log\Phi$ is computed as $\log(\mathrm{erfcx}(-u/\sqrt2)/2) - u^2/2$ on the
        left, which also keeps its gradient exact far in the tail. A middle bin is reflected to
        the left half ($\Phi(a) - \Phi(b) = \Phi(-b) - \Phi(-a)$), then computed either by a
        midpoint series in $h = \delta/s$ (narrow bins, including near-flat components whose
        $h$ underflows) or as $\log\Phi(a) + \log(1 - \Phi(b)/\Phi(a))$ with the ratio taken in
        log space.

    Args:
        params: Raw parameters, float ``batch_shape + (P, H, W)`` (bf16/fp16 promoted to
            float32).
        channels: Image channels ``C``.
        mixtures: Components ``K``.
        bins: Levels per sub-pixel (``>= 2``).
        coupling: Couple each channel's location on the earlier channels of the pixel.
        min_log_scale: Lower clamp $\ell_{\min}$ of the log-stds (``>= -80``).
        validate_args: As in ``torch.distributions``.

    Raises:
        TypeError: A non-float ``params`` or wrongly typed option.
        ValueError: ``params`` without ``P`` channels, or an out-of-range option (and
            ``log_prob`` with an unknown ``log_prob_backend``).

    Attributes:
        log_prob_backend: Which implementation computes ``log_prob`` (both give the same values
            and gradients up to rounding; set it on the class or on one instance):

            - ``"eager"``: the reference path, all components at once with plain autograd;
              twice differentiable, but it builds and saves many
              ``sample_shape + batch_shape + (K, C, H, W)`` temporaries;
            - ``"lean"``: one autograd node (``discretelik.heads._lean_mixture``) that loops over
              the components and keeps no ``K``-fold temporaries (any device, float32/64): it
              saves only ``params``, the levels and one ``sample_shape + batch_shape +
              (C, H, W)`` tensor, and backward recomputes one component's bin masses at a time
              under autograd (a few at a time for small inputs). It evaluates the bin masses
              three times: on one CPU thread at ``K = 10`` about 1.7x the eager time for a sixth
              of the peak memory;
            - ``None`` (default): ``"lean"`` on CPU with ``K > 1`` components, else ``"eager"``
              (on a GPU the lean path's many small kernels would be launch-bound; with one
              component there is no ``K``-fold tensor to avoid, and the lean path's
              recomputation would cost about twice the time for no lower peak). Under
              ``torch.compile`` the eager path is always used.

            The lean path is not twice differentiable.
    """

    def __init__(
        self,
        params: Tensor,
        channels: int = 3,
        mixtures: int = 1,
        bins: int = 256,
        coupling: bool = True,
        min_log_scale: float = -7.0,
        validate_args: bool | None = None,
    ) -> None:
        super().__init__(params, channels, mixtures, bins, coupling, min_log_scale, validate_args)

    log_prob_backends = (None, "eager", "lean")

    def _default_backend(self, value: Tensor) -> str:
        # With one component the lean path saves nothing (measured on CPU, B=16: 2.3x the
        # eager time and a higher peak), so it is the default only for mixtures.
        lean = self.params.device.type == "cpu" and self.mixtures > 1
        return "lean" if lean else "eager"

    def _elementwise_log_prob(self, value: Tensor) -> Tensor:
        if self._resolve_backend(value) == "lean":
            return lean_elementwise_log_prob(
                self.params, value, type(self), self.layout, self.bins, self.min_log_scale
            )
        return super()._elementwise_log_prob(value)

    @staticmethod
    def _log_cdf(z: Tensor) -> Tensor:
        return _log_ndtr(z)

    @staticmethod
    def _log_sf(z: Tensor) -> Tensor:
        return _log_ndtr(-z)

    @staticmethod
    def _log_interval(upper: Tensor, lower: Tensor, h: Tensor, log_h: Tensor) -> Tensor:
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
    def _icdf(u: Tensor) -> Tensor:
        return torch.special.ndtri(u)


@register_head("gaussian", aliases=("discretized_gaussian",))
class DiscretizedGaussian(MixtureHead):
    """Discretized Gaussian (mixture) head.

    Maps features ``(B, F, H, W)`` (through a 1x1 projection when ``in_channels`` is set) to a
    [`DiscretizedGaussianDistribution`][discretelik.DiscretizedGaussianDistribution] with
    ``batch_shape (B,)`` and ``event_shape (C, H, W)``. It needs the same
    ``param_channels = K (1 + 2C + C(C-1)/2)`` (coupling) or ``K (1 + 2C)`` (no coupling) as
    the discretized logistic mixture.

    Args:
        channels: Image channels ``C``.
        mixtures: Gaussian components ``K`` per pixel.
        bins: Levels per sub-pixel (256 for 8-bit images).
        coupling: Couple each channel's location linearly on the earlier channels of the pixel.
        in_channels: Feature channels ``F`` of the 1x1 projection, or ``None`` when the input
            already is the raw parameters ``(B, param_channels, H, W)``.
        min_log_scale: Lower clamp of the log-stds (``>= -80``).
        feature_groups: Must be 1: the channels of a pixel share one mixture component, so
            the head cannot read per-channel feature blocks.

    Raises:
        TypeError: An option of the wrong type (the message names it).
        ValueError: An option out of range (the message names it).

    Example:
        >>> head = DiscretizedGaussian(channels=1, in_channels=32)
        >>> dist = head(torch.randn(4, 32, 28, 28))
        >>> dist.sample().shape
        torch.Size([4, 1, 28, 28])
    """

    distribution_class = DiscretizedGaussianDistribution

    def __init__(
        self,
        channels: int = 3,
        mixtures: int = 1,
        bins: int = 256,
        coupling: bool = True,
        in_channels: int | None = None,
        min_log_scale: float = -7.0,
        feature_groups: int = 1,
    ) -> None:
        super().__init__(
            channels, mixtures, bins, coupling, in_channels, min_log_scale, feature_groups
        )
