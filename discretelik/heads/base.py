"""The two base classes every head builds on.

[`DiscreteImageDistribution`][discretelik.DiscreteImageDistribution] fixes the shape contract
shared by every head's distribution; [`Head`][discretelik.Head] is the ``nn.Module`` that turns
feature maps into such a distribution through an optional 1x1 projection.
"""

from __future__ import annotations

import abc
from types import MappingProxyType
from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, constraints

from .._checks import (
    check_finite,
    check_float_dtype,
    check_int,
    check_integer_dtype,
    check_levels,
    check_ndim,
    check_tensor,
    check_trailing_shape,
)
from .backend import AUTO, LogProbBackend, check_backend_name, resolve_backend

__all__ = ["DiscreteImageDistribution", "Head"]


class DiscreteImageDistribution(Distribution, abc.ABC):
    """Base class: a distribution over integer images with levels ``{0, ..., bins - 1}``.

    Shapes follow ``torch.distributions``: parameters ``params`` have shape
    ``batch_shape + (P, H, W)`` (``P`` = the head's ``param_channels``), ``event_shape`` is
    ``(C, H, W)``, ``log_prob(x)`` takes ``x`` of shape ``sample_shape + batch_shape + (C, H, W)``
    and returns ``sample_shape + batch_shape``, and ``sample(sample_shape)`` returns ``int64``
    levels of shape ``sample_shape + batch_shape + (C, H, W)``. The math always runs in float32
    or wider (bf16/fp16 parameters are promoted to float32).

    **Validation.** With ``validate_args`` on (``None`` follows ``torch.distributions``' global
    default, which is on), the constructor rejects non-finite parameters (NaN or +-inf) with a
    ``ValueError`` that counts them and gives the first one's index, and ``log_prob`` rejects
    levels outside ``[0, bins - 1]``. With it off nothing reads the tensors' contents (no GPU
    synchronisation): a NaN parameter then gives NaN log-probabilities, an infinite one gives
    undefined results (NaN or a meaningless finite number), and ``sample`` may return any level
    for the affected sub-pixels. Types and shapes are always checked. Note that the first
    ``torch.compile`` call in a process turns torch's global default off (torch's own choice,
    when its compiler initialises), so after it ``None`` means no value checks; pass
    ``validate_args=True`` to keep them in eager code.

    **Log-likelihood implementations.** ``log_prob_backend`` picks one of the family's entries
    in ``log_prob_backends`` (a table of
    [`LogProbBackend`][discretelik.LogProbBackend]), or ``"auto"`` for the
    family's choice by device, dtype and compilation. All of a family's implementations are
    translations of its one formula and agree up to rounding; only ``"eager"`` is twice
    differentiable. While ``torch.compile`` traces, an implementation that cannot be traced is
    answered by ``"eager"``.

    **Methods that a discrete image distribution does not provide** raise
    ``NotImplementedError`` with the reason and what to use instead: ``rsample`` (no
    reparameterisation of integer levels), ``cdf`` and ``icdf`` (images are not ordered),
    ``enumerate_support`` (``bins ** (C H W)`` values), and, where the family has no exact
    closed form, ``entropy`` (estimate it from samples).

    Subclasses implement ``param_channels_for``, ``_sample`` and ``mean``, and either list their
    implementations in ``log_prob_backends`` (the base class dispatches) or override
    ``_elementwise_log_prob`` directly (a plugin with a single implementation).

    Args:
        params: Raw head parameters, float tensor ``batch_shape + (P, H, W)``.
        channels: Number of image channels ``C``.
        bins: Number of levels per sub-pixel (``>= 2``).
        validate_args: As in ``torch.distributions``: ``None`` follows the global default.
        log_prob_backend: ``"auto"`` or a name in ``log_prob_backends``.

    Raises:
        TypeError: ``params`` is not a float tensor, or ``log_prob_backend`` not a string.
        ValueError: ``params`` has the wrong shape, or (with validation on) non-finite values;
            ``log_prob_backend`` is not one of the family's names.
    """

    arg_constraints = {"params": constraints.real}
    has_rsample = False
    has_enumerate_support = False
    #: The family's log-likelihood implementations by name (an immutable class table).
    log_prob_backends: ClassVar[Mapping[str, LogProbBackend]] = MappingProxyType(
        {"eager": LogProbBackend("eager", lambda dist, value: dist._eager_log_prob(value),
                                 twice_differentiable=True)}
    )

    def __init__(
        self,
        params: Tensor,
        channels: int,
        bins: int,
        validate_args: bool | None = None,
        log_prob_backend: str = AUTO,
    ) -> None:
        check_tensor(params, "params")
        check_float_dtype(params, "params")
        if params.dim() < 3:
            raise ValueError(
                f"params must have shape batch_shape + (P, H, W), got shape {tuple(params.shape)}"
            )
        self.channels = check_int(channels, "channels", 1)
        self.bins = check_int(bins, "bins", 2)
        self.log_prob_backend = log_prob_backend
        expected = self.param_channels_for()
        if params.shape[-3] != expected:
            raise ValueError(
                f"params must have {expected} channels (dimension -3) for "
                f"{type(self).__name__}({self._describe()}), got shape {tuple(params.shape)}"
            )
        validate = Distribution._validate_args if validate_args is None else validate_args
        if validate and not torch.compiler.is_compiling():
            # Our own check instead of torch's constraint check, whose message prints the whole
            # tensor and which lets +-inf through (``constraints.real`` only rejects NaN).
            check_finite(params, "params")
        if params.dtype in (torch.float16, torch.bfloat16):
            # Likelihoods are computed in float32 even under autocast (documented promotion).
            params = params.float()
        self.params = params
        height, width = params.shape[-2:]
        super().__init__(
            batch_shape=params.shape[:-3],
            event_shape=torch.Size((channels, height, width)),
            validate_args=False,  # the parameters were checked above
        )
        self._validate_args = bool(validate)

    @property
    def log_prob_backend(self) -> str:
        """``"auto"`` or the name of the implementation that computes ``log_prob`` (validated
        when set; kept by ``expand``)."""
        return self._log_prob_backend

    @log_prob_backend.setter
    def log_prob_backend(self, name: str) -> None:
        self._log_prob_backend = check_backend_name(
            name, self.log_prob_backends, type(self).__name__
        )

    # -- to implement ----------------------------------------------------------------------
    @abc.abstractmethod
    def param_channels_for(self) -> int:
        """Number of parameter channels ``P`` this configuration needs."""

    def _elementwise_log_prob(self, value: Tensor) -> Tensor:
        """Log-probability per sub-pixel for validated ``int64`` ``value``.

        ``value`` has shape ``sample_shape + batch_shape + (C, H, W)``; returns float32 (or
        wider) of the same shape. Dispatches to the implementation ``log_prob_backend`` picks.
        """
        return resolve_backend(self, value, self._auto_backend).compute(self, value)

    def _eager_log_prob(self, value: Tensor) -> Tensor:
        """The reference implementation (plain autograd); families with a table override it."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement _elementwise_log_prob (or _eager_log_prob)"
        )

    def _auto_backend(self, value: Tensor) -> str:
        """The implementation ``"auto"`` picks for this call (a name in the table)."""
        return "eager"

    @abc.abstractmethod
    def _sample(self, sample_shape: torch.Size, generator: torch.Generator | None) -> Tensor:
        """Draw ``int64`` levels of shape ``sample_shape + batch_shape + (C, H, W)``."""

    def _describe(self) -> str:
        return f"channels={self.channels}, bins={self.bins}"

    def _init_kwargs(self) -> dict[str, Any]:
        """Keyword arguments (besides ``params``) that rebuild this distribution."""
        return {"channels": self.channels, "bins": self.bins}

    # -- what a discrete image distribution does not provide --------------------------------
    def _not_provided(self, what: str, why: str) -> NotImplementedError:
        return NotImplementedError(f"{type(self).__name__}.{what} is not provided: {why}")

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = torch.Size()) -> Tensor:
        """Not provided: integer levels have no reparameterisation.

        Raises:
            NotImplementedError: Always; use ``sample`` with a score-function (REINFORCE) or a
                straight-through estimator.
        """
        raise self._not_provided(
            "rsample",
            "integer levels have no reparameterised (differentiable) draw; use sample() with "
            "a score-function or straight-through gradient estimator",
        )

    def cdf(self, value: Tensor) -> Tensor:
        """Not provided: images (vectors of sub-pixels) have no total order.

        Raises:
            NotImplementedError: Always; use ``elementwise_log_prob`` (per sub-pixel
                conditionals).
        """
        raise self._not_provided(
            "cdf",
            "a CDF needs a total order and images are vectors of sub-pixels; use "
            "elementwise_log_prob for the per-sub-pixel conditionals",
        )

    def icdf(self, value: Tensor) -> Tensor:
        """Not provided: images have no total order (see ``cdf``).

        Raises:
            NotImplementedError: Always; use ``sample``.
        """
        raise self._not_provided(
            "icdf", "images are vectors of sub-pixels with no total order; use sample()"
        )

    def enumerate_support(self, expand: bool = True) -> Tensor:
        """Not provided: the support has ``bins ** (C H W)`` images.

        Raises:
            NotImplementedError: Always; ``discretelik.testing.enumerate_levels`` lists the
                ``bins ** C`` values of one pixel.
        """
        raise self._not_provided(
            "enumerate_support",
            f"the support holds bins ** (C H W) = {self.bins} ** {self.event_shape.numel()} "
            "images; discretelik.testing.enumerate_levels(channels, bins) lists the values of "
            "one pixel",
        )

    def entropy(self) -> Tensor:
        """Not provided where the family has no exact closed form (the mixtures).

        Raises:
            NotImplementedError: Estimate it as ``-dist.log_prob(dist.sample((n,))).mean(0)``.
        """
        raise self._not_provided(
            "entropy",
            "it has no closed form for this family; estimate it from samples as "
            "-dist.log_prob(dist.sample((n,))).mean(0)",
        )

    @property
    def stddev(self) -> Tensor:
        """Standard deviation of every sub-pixel: ``variance.sqrt()``, float
        ``batch_shape + (C, H, W)`` in levels."""
        return self.variance.sqrt()

    # -- torch.distributions contract ------------------------------------------------------
    @constraints.dependent_property(is_discrete=True, event_dim=3)
    def support(self) -> constraints.Constraint:  # type: ignore[override]
        return constraints.independent(constraints.integer_interval(0, self.bins - 1), 3)

    def expand(self, batch_shape: Any, _instance: Any = None) -> "DiscreteImageDistribution":
        batch_shape = torch.Size(batch_shape)
        params = self.params.expand(batch_shape + self.params.shape[-3:])
        # Validation is carried over as a flag (the parameters were already checked), and the
        # implementation choice is set afterwards, so that a plugin's constructor need not
        # take it.
        new = type(self)(params, validate_args=False, **self._init_kwargs())
        new.log_prob_backend = self.log_prob_backend
        return new._with_validation(self._validate_args)

    def _with_validation(self, flag: bool) -> "DiscreteImageDistribution":
        self._validate_args = flag
        return self

    def _check_value(self, value: Tensor) -> Tensor:
        check_tensor(value, "value")
        check_integer_dtype(value, "value")
        expected = tuple(self.batch_shape) + tuple(self.event_shape)
        check_trailing_shape(
            value, expected, "value", "(sample_shape + batch_shape + (C, H, W))"
        )
        if self._validate_args:
            check_levels(value, self.bins, "value")
        return value.long()

    def elementwise_log_prob(self, value: Tensor) -> Tensor:
        """Log-probability of every sub-pixel.

        Args:
            value: Integer levels in ``[0, bins - 1]``, shape
                ``sample_shape + batch_shape + (C, H, W)``; any integer dtype.

        Returns:
            float32 (or float64 for float64 parameters) tensor of the same shape as ``value``;
            for sub-pixel ``(c, i, j)`` it is ``log p(x[c, i, j] | x[<c, i, j])`` under this
            distribution's parameters.

        Raises:
            TypeError: ``value`` is not an integer tensor.
            ValueError: ``value`` has the wrong trailing shape, or (with validation on) levels
                outside ``[0, bins - 1]``.
        """
        return self._elementwise_log_prob(self._check_value(value))

    def log_prob(self, value: Tensor) -> Tensor:
        """Log-probability of whole images, summed over ``(C, H, W)``.

        Args:
            value: Integer levels, shape ``sample_shape + batch_shape + (C, H, W)``.

        Returns:
            float tensor of shape ``sample_shape + batch_shape`` (natural log).
        """
        return self.elementwise_log_prob(value).sum(dim=(-3, -2, -1))

    def sample(  # type: ignore[override]
        self, sample_shape: torch.Size | tuple[int, ...] = torch.Size(), generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw integer images.

        Args:
            sample_shape: Leading shape of the draw.
            generator: Optional ``torch.Generator`` on the parameters' device, for reproducible
                draws.

        Returns:
            ``int64`` tensor of shape ``sample_shape + batch_shape + (C, H, W)`` with values in
            ``[0, bins - 1]``.

        Raises:
            TypeError: ``sample_shape`` is not a shape (e.g. a bare int), or ``generator`` is
                not a ``torch.Generator``.
            ValueError: ``sample_shape`` holds a negative size, or ``generator`` is on another
                device type than the parameters.
        """
        try:
            shape = torch.Size(sample_shape)
        except TypeError:
            raise TypeError(
                f"sample_shape must be a torch.Size or tuple of ints, got {sample_shape!r}"
            ) from None
        if any(s < 0 for s in shape):
            raise ValueError(f"sample_shape must not hold negative sizes, got {tuple(shape)}")
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(
                    f"generator must be a torch.Generator or None, got {type(generator).__name__}"
                )
            if generator.device.type != self.params.device.type:
                device = str(self.params.device)
                raise ValueError(
                    f"generator is on {generator.device} but the parameters are on {device}; "
                    f"pass torch.Generator(device={device!r})"
                )
        with torch.no_grad():
            return self._sample(shape, generator)

    def bin_centers(self) -> Tensor:
        """The ``bins`` level values rescaled to ``[-1, 1]``: shape ``(bins,)``, params' dtype."""
        return torch.linspace(-1.0, 1.0, self.bins, device=self.params.device, dtype=self.params.dtype)


class Head(nn.Module, abc.ABC):
    """Base class of likelihood heads: features ``(B, F, H, W)`` -> a distribution.

    With ``in_channels`` set, a 1x1 convolution maps the ``F = in_channels`` feature channels to
    the head's ``param_channels``; with ``in_channels=None`` the input must already be the raw
    parameters ``(B, param_channels, H, W)``.

    Heads whose parameters split into one contiguous block per image channel (the softmax head)
    set ``supports_channel_groups = True`` and accept ``feature_groups = C``: the projection is
    then a grouped 1x1 convolution, so the parameters of channel ``c`` read only the ``c``-th
    block of features. That is how a backbone with R -> G -> B sub-pixel masks keeps its
    ordering through the head.

    ``log_prob_backend`` chooses the implementation of the log-likelihood of every
    distribution the head makes (see
    [`DiscreteImageDistribution`][discretelik.DiscreteImageDistribution]); it is an ordinary
    instance attribute, validated when set, so ``head.log_prob_backend = "eager"`` switches one
    head and nothing else.

    Args:
        channels: Image channels ``C``.
        bins: Levels per sub-pixel.
        in_channels: Feature channels ``F`` of the projection, or ``None`` for no projection.
        feature_groups: ``1``, or ``channels`` for heads with ``supports_channel_groups``.
        log_prob_backend: ``"auto"`` (the family's choice per call) or a name in
            ``distribution_class.log_prob_backends``.
    """

    supports_channel_groups: ClassVar[bool] = False
    distribution_class: ClassVar[type[DiscreteImageDistribution]]

    def __init__(
        self,
        channels: int,
        bins: int,
        in_channels: int | None = None,
        feature_groups: int = 1,
        log_prob_backend: str = AUTO,
    ) -> None:
        super().__init__()
        self.log_prob_backend = log_prob_backend
        self.channels = check_int(channels, "channels", 1)
        self.bins = check_int(bins, "bins", 2)
        self.in_channels = None if in_channels is None else check_int(in_channels, "in_channels", 1)
        self.feature_groups = check_int(feature_groups, "feature_groups", 1)
        if feature_groups != 1:
            if not self.supports_channel_groups:
                raise ValueError(
                    f"{type(self).__name__} models the channels of a pixel jointly and needs "
                    f"feature_groups=1, got feature_groups={feature_groups}"
                )
            if feature_groups != channels:
                raise ValueError(
                    f"feature_groups must be 1 or channels={channels}, got {feature_groups}"
                )
            if in_channels is None or in_channels % feature_groups:
                raise ValueError(
                    f"in_channels must be a multiple of feature_groups={feature_groups}, "
                    f"got in_channels={in_channels}"
                )
        self.proj: nn.Conv2d | None = None

    @property
    def log_prob_backend(self) -> str:
        """``"auto"`` or the name of the implementation that computes ``log_prob``."""
        return self._log_prob_backend

    @log_prob_backend.setter
    def log_prob_backend(self, name: str) -> None:
        table = getattr(self, "distribution_class", DiscreteImageDistribution).log_prob_backends
        self._log_prob_backend = check_backend_name(name, table, type(self).__name__)

    def _make_projection(self) -> None:
        """Create the 1x1 projection; call at the end of a subclass ``__init__``."""
        if self.in_channels is not None:
            self.proj = nn.Conv2d(
                self.in_channels, self.param_channels, kernel_size=1, groups=self.feature_groups
            )

    @property
    @abc.abstractmethod
    def param_channels(self) -> int:
        """Number of raw parameter channels ``P`` the distribution takes."""

    @abc.abstractmethod
    def distribution(self, params: Tensor, validate_args: bool | None = None) -> DiscreteImageDistribution:
        """Wrap raw parameters ``(B, P, H, W)`` into this head's distribution."""

    def params(self, features: Tensor) -> Tensor:
        """Raw distribution parameters ``(B, param_channels, H, W)`` for ``features``.

        Args:
            features: float ``(B, in_channels, H, W)``, or ``(B, param_channels, H, W)`` when the
                head has no projection.
        """
        check_tensor(features, "features")
        check_float_dtype(features, "features")
        check_ndim(features, 4, "features", "(B, F, H, W)")
        expected = self.param_channels if self.proj is None else self.in_channels
        if features.shape[1] != expected:
            what = "param_channels (no projection)" if self.proj is None else "in_channels"
            raise ValueError(
                f"features must have {expected} channels (= {type(self).__name__}.{what}), "
                f"got shape {tuple(features.shape)}"
            )
        return features if self.proj is None else self.proj(features)

    def forward(self, features: Tensor) -> DiscreteImageDistribution:
        """Map features ``(B, F, H, W)`` to a distribution over ``(B, C, H, W)`` integer images."""
        return self.distribution(self.params(features))

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, bins={self.bins}, in_channels={self.in_channels}, "
            f"log_prob_backend={self.log_prob_backend!r}"
        )
