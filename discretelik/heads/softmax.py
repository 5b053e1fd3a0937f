r"""The softmax head: an independent ``bins``-way categorical per sub-pixel.

References:
    van den Oord, Kalchbrenner, Kavukcuoglu. *Pixel Recurrent Neural Networks*, ICML 2016
    (arXiv:1601.06759), section 5.3: a 256-way softmax per colour channel.
    van den Oord et al. *Conditional Image Generation with PixelCNN Decoders*, NeurIPS 2016
    (arXiv:1606.05328).

The head makes no assumption that nearby levels have similar probability (unlike the logistic
and Gaussian heads), at the cost of ``bins`` parameters per channel. Channel ``c`` of a pixel may
depend on channels ``< c`` of the same pixel only through the features: with
``feature_groups = C`` the projection is grouped, so the logits of channel ``c`` read only the
``c``-th block of features, which an R -> G -> B masked backbone computes from the allowed
sub-pixels. Given its logits each channel is independent of the others.

Departures from the papers: none in the likelihood. Sampling uses inverse-CDF draws in float64
(one uniform per sub-pixel) rather than a library multinomial, so that it is exact down to
probabilities far below float32 resolution and reproducible from a ``torch.Generator``.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Callable

import torch
from torch import Tensor

from ..registry import register_head
from .backend import AUTO, LogProbBackend
from .base import DiscreteImageDistribution, Head
from .softmax_lean import lean_softmax_log_prob, shifted_log_normalizer

__all__ = ["DiscreteSoftmax", "DiscreteSoftmaxDistribution"]

# Upper bound on the elements of one temporary: large ``bins`` (up to 65536) are processed in
# slices so that memory stays near the size of the parameters themselves.
_CHUNK_ELEMENTS = 1 << 24


class DiscreteSoftmaxDistribution(DiscreteImageDistribution):
    r"""A categorical distribution over ``bins`` levels for every sub-pixel.

    With logits $\ell_{c,k,i,j}$ for channel $c$, level $k$ and pixel $(i, j)$,

    $$
    p(x_{c,i,j} = k) = \frac{\exp \ell_{c,k,i,j}}{\sum_{k'=0}^{K-1} \exp \ell_{c,k',i,j}},
    \qquad k \in \{0, \dots, K-1\},\ K = \text{bins},
    $$

    independently over channels and pixels given the logits. ``mean`` is the real mean over
    the ordered levels, $\sum_k k\, p(x_{c,i,j} = k)$, ``variance`` and ``stddev`` its spread
    in levels, and ``mode`` the most likely level (the joint mode, since the sub-pixels are
    independent given the logits); ``mean`` carries gradients. ``entropy`` is exact: the sum
    over sub-pixels of $-\sum_k p_k \log p_k$.

    **Implementations** (``log_prob_backend``; both give the same values and gradients up to
    rounding):

    - ``"eager"``: plain autograd; twice differentiable, but it saves ``exp(logits - peak)``,
      a whole ``batch_shape + (C, bins, H, W)`` tensor, for backward, and backward adds up
      several gradients of that size;
    - ``"lean"``: one autograd node with the same values, which saves only the logits, the
      levels and the per-sub-pixel log-normaliser, and whose backward writes
      ``one_hot - softmax`` straight into the gradient (any device, float32/64);
    - ``"auto"`` (default): ``"lean"``; ``"eager"`` while ``torch.compile`` traces.

    Layout of ``params``: channel-major. ``params`` has shape ``batch_shape + (C * bins, H, W)``
    and the logits of channel ``c`` are ``params[..., c * bins:(c + 1) * bins, :, :]``: ``C``
    contiguous blocks of ``bins`` channels, in image-channel order. That is the layout a grouped
    1x1 projection with ``C`` groups produces, so block ``c`` of the features maps to the logits
    of channel ``c`` only.

    All computations run in float32 (bf16/fp16 parameters are promoted) or float64 for float64
    parameters.

    Args:
        params: Logits, float tensor ``batch_shape + (C * bins, H, W)``.
        channels: Number of image channels ``C``.
        bins: Number of levels ``K`` (``2 <= bins``; up to 65536 is tested).
        validate_args: As in ``torch.distributions``: ``None`` follows the global default.

    Raises:
        TypeError: ``params`` is not a floating-point tensor.
        ValueError: ``params`` does not have ``C * bins`` channels in dimension ``-3``, or (with
            validation on) contains NaN (and ``log_prob`` with an unknown
            ``log_prob_backend``).
    """

    log_prob_backends = MappingProxyType({
        "eager": LogProbBackend(
            "eager", lambda dist, value: dist._picked(value, lean=False), twice_differentiable=True
        ),
        "lean": LogProbBackend(
            "lean", lambda dist, value: dist._picked(value, lean=True), traceable=False
        ),
    })  # fmt: skip

    def __init__(
        self,
        params: Tensor,
        channels: int,
        bins: int,
        validate_args: bool | None = None,
        log_prob_backend: str = AUTO,
    ) -> None:
        super().__init__(params, channels, bins, validate_args, log_prob_backend)

    def param_channels_for(self) -> int:
        return self.channels * self.bins

    @property
    def logits(self) -> Tensor:
        """The unnormalised logits as ``batch_shape + (C, bins, H, W)`` (a view when possible)."""
        p = self.params
        return p.reshape(*p.shape[:-3], self.channels, self.bins, *p.shape[-2:])

    def _bin_slices(self, logits: Tensor) -> list[tuple[int, int]]:
        """``(start, length)`` slices of the bins axis (-3) that keep temporaries bounded."""
        per_bin = max(1, logits.numel() // self.bins)
        step = max(1, _CHUNK_ELEMENTS // per_bin)
        return [(s, min(step, self.bins - s)) for s in range(0, self.bins, step)]

    def _shifted_log_normalizer(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """``(peak, log_z)`` with ``logsumexp(logits) = peak + log_z`` over the bins axis.

        Both have shape ``batch_shape + (C, 1, H, W)``. Log-probabilities are formed as
        ``(logit - peak) - log_z``: with logits near 1e4 the float32 difference
        ``logit - logsumexp(logits)`` would keep only about three decimals, while
        ``logit - peak`` is exact near the peak and ``log_z`` lies in ``[0, log(bins)]``.
        The sum runs over slices of the bins axis so that large bins never need a second
        full-size temporary.
        """
        return shifted_log_normalizer(logits, self._bin_slices(logits))

    def _auto_backend(self, value: Tensor) -> str:
        return "lean"

    def _picked(self, value: Tensor, lean: bool) -> Tensor:
        logits = self.logits  # batch + (C, K, H, W)
        lead = value.dim() - len(self.batch_shape) - 3
        n = math.prod(value.shape[:lead])
        # Move the draws into the bins axis so that one gather on the (unexpanded) logits picks
        # every draw's logit; the gradient then never has the sample_shape-times-larger size.
        index = value.reshape(n, *value.shape[lead:]).movedim(0, -3)  # batch + (C, n, H, W)
        if lean:
            picked = lean_softmax_log_prob(logits, index, self._bin_slices(logits))
        else:
            peak, log_z = self._shifted_log_normalizer(logits)
            picked = (logits.gather(-3, index) - peak) - log_z  # batch + (C, n, H, W)
        return picked.movedim(-3, 0).reshape(value.shape)

    def _sample(self, sample_shape: torch.Size, generator: torch.Generator | None) -> Tensor:
        logits = self.logits.movedim(-3, -1)  # batch + (C, H, W, K)
        sub_shape = logits.shape[:-1]
        rows = logits.reshape(-1, self.bins)  # (N, K): one categorical per sub-pixel
        n = math.prod(sample_shape)
        # One float64 uniform per draw and sub-pixel, all from ``generator``.
        u = torch.rand(
            (rows.shape[0], n), generator=generator, dtype=torch.float64, device=rows.device
        )
        out = torch.empty((rows.shape[0], n), dtype=torch.long, device=rows.device)
        step = max(1, _CHUNK_ELEMENTS // self.bins)
        for start in range(0, rows.shape[0], step):
            cdf = torch.softmax(rows[start : start + step].double(), dim=-1).cumsum(dim=-1)
            # Inverse CDF: level k is drawn when cdf[k-1] <= u * total < cdf[k]. Searching the
            # first K-1 boundaries returns 0..K-1 without clamping; right=True skips levels of
            # probability zero (their interval is empty).
            target = u[start : start + step] * cdf[:, -1:]
            edges = cdf[:, :-1].contiguous()
            out[start : start + step] = torch.searchsorted(edges, target, right=True)
        return out.t().reshape(*sample_shape, *sub_shape)

    def _expectation(self, f: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """``sum_k p_k f(k, log p_k)`` per sub-pixel, ``batch_shape + (C, H, W)``, summed over
        slices of the bins axis; ``f`` gets the levels ``(n, 1, 1)`` and ``log p``."""
        logits = self.logits
        peak, log_z = self._shifted_log_normalizer(logits)
        total = torch.zeros_like(log_z.squeeze(-3))
        for s, n in self._bin_slices(logits):
            levels = torch.arange(s, s + n, device=logits.device, dtype=logits.dtype)[:, None, None]
            log_p = (logits.narrow(-3, s, n) - peak) - log_z
            total = total + (log_p.exp() * f(levels, log_p)).sum(dim=-3)
        return total

    @property
    def mean(self) -> Tensor:
        """Expected level per sub-pixel: float ``batch_shape + (C, H, W)`` in ``[0, bins - 1]``."""
        # The probabilities sum to 1 only up to rounding; keep the mean inside the level range.
        return self._expectation(lambda k, log_p: k).clamp(0, self.bins - 1)

    @property
    def variance(self) -> Tensor:
        """Variance of every sub-pixel in levels squared: float ``batch_shape + (C, H, W)``."""
        mean = self.mean.unsqueeze(-3)
        return self._expectation(lambda k, log_p: (k - mean) ** 2)

    def entropy(self) -> Tensor:
        """Exact entropy in nats, ``batch_shape``: the sum over the ``(C, H, W)`` independent
        sub-pixels of ``-sum_k p_k log p_k`` (levels of probability 0 contribute 0)."""
        per_sub_pixel = self._expectation(
            lambda k, log_p: torch.where(log_p.isfinite(), -log_p, torch.zeros_like(log_p))
        )
        return per_sub_pixel.sum(dim=(-3, -2, -1))

    @property
    def mode(self) -> Tensor:
        """Most likely level per sub-pixel: ``int64`` ``batch_shape + (C, H, W)``."""
        return self.logits.argmax(dim=-3)


@register_head("softmax", aliases=("categorical",))
class DiscreteSoftmax(Head):
    """Softmax head: ``bins`` logits per image channel (PixelRNN / PixelCNN).

    Produces [`DiscreteSoftmaxDistribution`][discretelik.DiscreteSoftmaxDistribution]; see there
    for the formula and the channel-major parameter layout (``param_channels = C * bins``).

    Args:
        channels: Image channels ``C``.
        bins: Levels per sub-pixel (``>= 2``; 256 for 8-bit images).
        in_channels: Feature channels ``F`` of a 1x1 projection to the ``C * bins`` logits, or
            ``None`` when the input already is the logits ``(B, C * bins, H, W)``.
        feature_groups: ``1``, or ``channels`` for a grouped projection in which the logits of
            channel ``c`` read only the ``c``-th of ``C`` contiguous feature blocks (keeps the
            R -> G -> B order of a channel-grouped backbone); needs ``in_channels`` divisible by
            ``channels``.
        log_prob_backend: ``"auto"``, ``"eager"`` or ``"lean"`` (see
            [`DiscreteSoftmaxDistribution`][discretelik.DiscreteSoftmaxDistribution]).

    Example:
        >>> head = DiscreteSoftmax(channels=3, bins=256, in_channels=120, feature_groups=3)
        >>> dist = head(torch.randn(2, 120, 8, 8))
        >>> dist.log_prob(torch.randint(0, 256, (2, 3, 8, 8))).shape
        torch.Size([2])
    """

    supports_channel_groups = True

    def __init__(
        self,
        channels: int = 3,
        bins: int = 256,
        in_channels: int | None = None,
        feature_groups: int = 1,
        log_prob_backend: str = AUTO,
    ) -> None:
        super().__init__(channels, bins, in_channels, feature_groups, log_prob_backend)
        self._make_projection()

    distribution_class = DiscreteSoftmaxDistribution

    @property
    def param_channels(self) -> int:
        """``C * bins`` logits per pixel."""
        return self.channels * self.bins

    def distribution(
        self, params: Tensor, validate_args: bool | None = None
    ) -> DiscreteSoftmaxDistribution:
        """Wrap logits ``(B, C * bins, H, W)`` into the head's distribution.

        Args:
            params: float logits ``(B, C * bins, H, W)`` in the channel-major layout.
            validate_args: ``None`` follows the global ``torch.distributions`` default.
        """
        return DiscreteSoftmaxDistribution(
            params, self.channels, self.bins, validate_args, self.log_prob_backend
        )
