r"""Discretized Gaussian (mixture) likelihood.

The same binning, open edge bins, channel coupling and parameter layout as the discretized
logistic mixture (all shared in ``_mixture``), with the normal CDF in place of the logistic
one. With ``mixtures=1`` and ``coupling=False`` it is the discretized Gaussian decoder common in
VAEs on integer images.
"""

from __future__ import annotations

from torch import Tensor

from ..registry import register_head
from .backend import AUTO
from .mixture.distribution import LocationScaleMixtureDistribution, MixtureHead
from .mixture.gaussian import Gaussian

__all__ = ["DiscretizedGaussian", "DiscretizedGaussianDistribution"]


class DiscretizedGaussianDistribution(LocationScaleMixtureDistribution):
    r"""Mixture of discretized Gaussians per pixel, with linearly coupled channels.

    The binning, the mixture over components shared by the channels of a pixel, the channel
    coupling, the parameter layout (the same as the discretized logistic mixture's), sampling
    and the per-sub-pixel summaries are those of every discretized mixture head: see
    [`LocationScaleMixtureDistribution`][discretelik.LocationScaleMixtureDistribution]. Here the
    component's CDF is the standard normal $\Phi$:

    $$
    P_k(x_c \mid x_{<c}) =
    \begin{cases}
    \Phi\!\left(\frac{\tilde x_c + \delta - \mu_{kc}}{s_{kc}}\right) & x_c = 0, \\
    1 - \Phi\!\left(\frac{\tilde x_c - \delta - \mu_{kc}}{s_{kc}}\right) & x_c = B - 1, \\
    \Phi\!\left(\frac{\tilde x_c + \delta - \mu_{kc}}{s_{kc}}\right)
    - \Phi\!\left(\frac{\tilde x_c - \delta - \mu_{kc}}{s_{kc}}\right) & \text{otherwise},
    \end{cases}
    $$

    with standard deviation $s_{kc} = \exp(\max(\ell_{kc}, \ell_{\min}))$ ($\ell$ is a log-std).
    With ``mixtures=1`` and ``coupling=False`` it is the discretized Gaussian decoder common in
    VAEs on integer images.

    !!! note "Numerics"
        Everything is in log space and finite, with finite gradients, for any finite
        parameters. $\log\Phi$ is computed as $\log(\mathrm{erfcx}(-u/\sqrt2)/2) - u^2/2$ on
        the left, which also keeps its gradient exact far in the tail. A middle bin is
        reflected to the left half, then computed either by a midpoint series in $h = \delta/s$
        (narrow bins, including near-flat components whose $h$ underflows) or as
        $\log\Phi(a) + \log(1 - \Phi(b)/\Phi(a))$ with the ratio taken in log space. A bin
        lying wholly beyond $\pm 2^{50}$ standardised units is moved in to that limit, keeping
        its width: its log-mass is then about $-2^{99} \approx -6 \cdot 10^{29}$ instead of
        overflowing. The formula is written once, in ``discretelik/heads/mixture/formula.py``
        and ``mixture/gaussian.py``.

    **Implementations** (``log_prob_backend``): ``"eager"`` and ``"lean"`` as for every mixture
    head; ``"auto"`` (default) picks ``"lean"`` on CPU with ``K > 1`` components, else
    ``"eager"`` (on a GPU the lean path's many small kernels would be launch-bound; with one
    component there is no ``K``-fold tensor to avoid).

    Args:
        params: Raw parameters, float ``batch_shape + (P, H, W)`` (bf16/fp16 promoted to
            float32).
        channels: Image channels ``C``.
        mixtures: Components ``K``.
        bins: Levels per sub-pixel (``>= 2``).
        coupling: Couple each channel's location on the earlier channels of the pixel.
        min_log_scale: Lower clamp $\ell_{\min}$ of the log-stds (``>= -80``).
        validate_args: As in ``torch.distributions``.
        log_prob_backend: ``"auto"``, ``"eager"`` or ``"lean"`` (above).

    Raises:
        TypeError: A non-float ``params`` or wrongly typed option.
        ValueError: ``params`` without ``P`` channels, or an out-of-range option (and
            non-finite ``params`` with validation on).
    """

    family = Gaussian

    def __init__(
        self,
        params: Tensor,
        channels: int = 3,
        mixtures: int = 1,
        bins: int = 256,
        coupling: bool = True,
        min_log_scale: float = -7.0,
        validate_args: bool | None = None,
        log_prob_backend: str = AUTO,
    ) -> None:
        super().__init__(
            params, channels, mixtures, bins, coupling, min_log_scale, validate_args,
            log_prob_backend,
        )  # fmt: skip

    def _auto_backend(self, value: Tensor) -> str:
        # With one component the lean path saves nothing and recomputes, so it is the default
        # only for mixtures.
        lean = self.params.device.type == "cpu" and self.mixtures > 1
        return "lean" if lean else "eager"


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
        log_prob_backend: ``"auto"``, ``"eager"`` or ``"lean"`` (see
            [`DiscretizedGaussianDistribution`][discretelik.DiscretizedGaussianDistribution]).

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
        log_prob_backend: str = AUTO,
    ) -> None:
        super().__init__(
            channels, mixtures, bins, coupling, in_channels, min_log_scale, feature_groups,
            log_prob_backend,
        )  # fmt: skip
