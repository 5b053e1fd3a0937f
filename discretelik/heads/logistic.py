r"""Discretized logistic mixture likelihood (PixelCNN++).

References:
    Salimans, Karpathy, Chen, Kingma, "PixelCNN++: Improving the PixelCNN with Discretized
    Logistic Mixture Likelihood and Other Modifications", ICLR 2017
    (<https://arxiv.org/abs/1701.05517>); code: openai/pixel-cnn (``nn.py``,
    ``discretized_mix_logistic_loss``).

Departures from the reference code: the log-probability is computed exactly and stably in log
space (openai falls back to the log-density at the bin centre when the bin mass is below
``1e-5``); the coupling is generalised from RGB to any number of channels; sampling couples on
the drawn *levels* of earlier channels (openai uses the continuous draws), which is what the
likelihood conditions on.
"""

from __future__ import annotations

from torch import Tensor

from ..registry import register_head
from .backend import AUTO, LogProbBackend
from .mixture.distribution import LocationScaleMixtureDistribution, MixtureHead, mixture_backends
from .mixture.logistic import Logistic
from .mixture.triton import triton_elementwise_log_prob, triton_is_default, triton_unsupported

__all__ = ["DiscretizedLogisticMixture", "DiscretizedLogisticMixtureDistribution"]


def _triton(dist: "DiscretizedLogisticMixtureDistribution", value: Tensor) -> Tensor:
    return triton_elementwise_log_prob(
        dist.params, value, dist.layout, dist.bins, dist.min_log_scale
    )


TRITON = LogProbBackend(
    "triton", _triton, unsupported=lambda dist, value: triton_unsupported(dist.params, value, dist.bins)
)


class DiscretizedLogisticMixtureDistribution(LocationScaleMixtureDistribution):
    r"""Mixture of discretized logistics per pixel, with linearly coupled channels (PixelCNN++).

    The binning, the mixture over components shared by the channels of a pixel, the channel
    coupling $\mu_{kc} = m_{kc} + \sum_{j<c} \tanh(\alpha_{k,cj})\,\tilde x_j$, the parameter
    layout, sampling and the per-sub-pixel summaries are those of every discretized mixture
    head: see [`LocationScaleMixtureDistribution`][discretelik.LocationScaleMixtureDistribution].
    Here the component's CDF is the logistic $\sigma$:

    $$
    P_k(x_c \mid x_{<c}) =
    \begin{cases}
    \sigma\!\left(\frac{\tilde x_c + \delta - \mu_{kc}}{s_{kc}}\right) & x_c = 0, \\
    1 - \sigma\!\left(\frac{\tilde x_c - \delta - \mu_{kc}}{s_{kc}}\right) & x_c = B - 1, \\
    \sigma\!\left(\frac{\tilde x_c + \delta - \mu_{kc}}{s_{kc}}\right)
    - \sigma\!\left(\frac{\tilde x_c - \delta - \mu_{kc}}{s_{kc}}\right) & \text{otherwise},
    \end{cases}
    $$

    with scale $s_{kc} = \exp(\max(\ell_{kc}, \ell_{\min}))$ ($\ell_{\min}$ = ``min_log_scale``,
    $-7$ as in openai/pixel-cnn). For RGB the coupling is PixelCNN++'s
    $\mu_G = m_G + \tanh(\alpha_{GR}) \tilde x_R$,
    $\mu_B = m_B + \tanh(\alpha_{BR}) \tilde x_R + \tanh(\alpha_{BG}) \tilde x_G$, and the
    parameter layout is openai/pixel-cnn's NHWC layout (``l[..., K:]`` reshaped to
    ``(3, 3K)``) moved to NCHW: $P = 10K$.

    !!! note "Numerics"
        Everything is in log space and finite, with finite gradients, for any finite
        parameters: the edges use $\log\sigma(u)$ (log-sigmoid), and the middle bins the exact
        identity $\sigma(a) - \sigma(b) = \sinh(\tfrac{a-b}{2}) / (2\cosh\tfrac a2 \cosh\tfrac b2)$
        with the half-width $(a-b)/2 = \delta/s$ taken from the log-scale, so tiny masses far in
        a tail and near-flat components (huge scale) keep full relative precision. A bin lying
        wholly beyond $\pm 2^{100}$ standardised units (a location far outside the data range
        with a tiny scale) is moved in to that limit, keeping its width: its log-mass is then
        about $-2^{100} \approx -1.3 \cdot 10^{30}$ instead of overflowing, and sums over
        images stay finite. The formula is written once, in
        ``discretelik/heads/mixture/formula.py`` and ``mixture/logistic.py``.

    **Implementations** (``log_prob_backend``): ``"eager"`` and ``"lean"`` as for every mixture
    head, and

    - ``"triton"``: two Triton kernels, a checked translation of the formula, one GPU program
      per block of pixels; float32 on CUDA, levels without sample dimensions;
    - ``"auto"`` (default): ``"triton"`` for float32 on a CUDA GPU of compute capability 7.5
      or newer with an importable Triton (otherwise one warning and the PyTorch paths),
      ``"lean"`` on CPU, ``"eager"`` elsewhere. The Triton kernels are registered
      ``torch.library`` operators, which a compiled graph calls without a graph break.

    Args:
        params: Raw parameters, float ``batch_shape + (P, H, W)`` (bf16/fp16 promoted to
            float32).
        channels: Image channels ``C``.
        mixtures: Components ``K``.
        bins: Levels per sub-pixel (``>= 2``).
        coupling: Couple each channel's location on the earlier channels of the pixel.
        min_log_scale: Lower clamp $\ell_{\min}$ of the log-scales (``>= -80``).
        validate_args: As in ``torch.distributions``.
        log_prob_backend: ``"auto"``, ``"eager"``, ``"lean"`` or ``"triton"`` (above).

    Raises:
        TypeError: A non-float ``params`` or wrongly typed option.
        ValueError: ``params`` without ``P`` channels, non-finite ``params`` (with
            validation on), or an out-of-range option.
    """

    family = Logistic
    log_prob_backends = mixture_backends(TRITON)

    def _auto_backend(self, value: Tensor) -> str:
        if triton_is_default(self.params, value, self.bins):
            return "triton"
        return "lean" if self.params.device.type == "cpu" else "eager"


@register_head("dlm", aliases=("discretized_logistic_mixture",))
class DiscretizedLogisticMixture(MixtureHead):
    """PixelCNN++'s discretized logistic mixture head.

    Maps features ``(B, F, H, W)`` (through a 1x1 projection when ``in_channels`` is set) to a
    [`DiscretizedLogisticMixtureDistribution`][discretelik.DiscretizedLogisticMixtureDistribution]
    with ``batch_shape (B,)`` and ``event_shape (C, H, W)``. It needs
    ``param_channels = K (1 + 2C + C(C-1)/2)`` raw parameters per pixel with coupling
    (``10 K`` for RGB) and ``K (1 + 2C)`` without.

    Args:
        channels: Image channels ``C``.
        mixtures: Logistic components ``K`` per pixel (5 to 10 in PixelCNN++).
        bins: Levels per sub-pixel (256 for 8-bit images).
        coupling: Couple each channel's location linearly on the earlier channels of the pixel.
        in_channels: Feature channels ``F`` of the 1x1 projection, or ``None`` when the input
            already is the raw parameters ``(B, param_channels, H, W)``.
        min_log_scale: Lower clamp of the log-scales (openai/pixel-cnn uses ``-7``; ``>= -80``).
        feature_groups: Must be 1: the channels of a pixel share one mixture component, so
            the head cannot read per-channel feature blocks.
        log_prob_backend: ``"auto"`` or one of the implementations listed in
            [`DiscretizedLogisticMixtureDistribution`][discretelik.DiscretizedLogisticMixtureDistribution].

    Raises:
        TypeError: An option of the wrong type (the message names it).
        ValueError: An option out of range (the message names it).

    Example:
        >>> head = DiscretizedLogisticMixture(channels=3, mixtures=5, in_channels=64)
        >>> dist = head(torch.randn(2, 64, 8, 8))
        >>> dist.log_prob(torch.randint(0, 256, (2, 3, 8, 8))).shape
        torch.Size([2])
    """

    distribution_class = DiscretizedLogisticMixtureDistribution

    def __init__(
        self,
        channels: int = 3,
        mixtures: int = 10,
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
