"""The two base classes every head builds on.

[`DiscreteImageDistribution`][discretelik.DiscreteImageDistribution] fixes the shape contract
shared by every head's distribution; [`Head`][discretelik.Head] is the ``nn.Module`` that turns
feature maps into such a distribution through an optional 1x1 projection.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, constraints

from .._checks import (
    check_float_dtype,
    check_int,
    check_integer_dtype,
    check_levels,
    check_ndim,
    check_tensor,
    check_trailing_shape,
)

__all__ = ["DiscreteImageDistribution", "Head"]


class DiscreteImageDistribution(Distribution, abc.ABC):
    """Base class: a distribution over integer images with levels ``{0, ..., bins - 1}``.

    Shapes follow ``torch.distributions``: parameters ``params`` have shape
    ``batch_shape + (P, H, W)`` (``P`` = the head's ``param_channels``), ``event_shape`` is
    ``(C, H, W)``, ``log_prob(x)`` takes ``x`` of shape ``sample_shape + batch_shape + (C, H, W)``
    and returns ``sample_shape + batch_shape``, and ``sample(sample_shape)`` returns ``int64``
    levels of shape ``sample_shape + batch_shape + (C, H, W)``. The math always runs in float32
    or wider (bf16/fp16 parameters are promoted to float32).

    Subclasses implement [`elementwise_log_prob`][discretelik.DiscreteImageDistribution.elementwise_log_prob]
    (through ``_elementwise_log_prob``), ``_sample`` and ``mean``. A head with more than one
    implementation of the log-likelihood lists them in the class tuple ``log_prob_backends``
    (here ``(None, "eager")``), picks its default in ``_default_backend`` and dispatches on
    ``_resolve_backend()``, which checks ``log_prob_backend`` (set on the class, or on one
    instance, which ``expand`` keeps) and returns ``"eager"`` while ``torch.compile`` traces
    unless ``"triton"`` was asked for.

    Args:
        params: Raw head parameters, float tensor ``batch_shape + (P, H, W)``.
        channels: Number of image channels ``C``.
        bins: Number of levels per sub-pixel (``>= 2``).
        validate_args: As in ``torch.distributions``: ``None`` follows the global default.
    """

    arg_constraints = {"params": constraints.real}
    has_rsample = False
    has_enumerate_support = False

    def __init__(
        self,
        params: Tensor,
        channels: int,
        bins: int,
        validate_args: bool | None = None,
    ) -> None:
        check_tensor(params, "params")
        check_float_dtype(params, "params")
        if params.dim() < 3:
            raise ValueError(
                f"params must have shape batch_shape + (P, H, W), got shape {tuple(params.shape)}"
            )
        self.channels = check_int(channels, "channels", 1)
        self.bins = check_int(bins, "bins", 2)
        expected = self.param_channels_for()
        if params.shape[-3] != expected:
            raise ValueError(
                f"params must have {expected} channels (dimension -3) for "
                f"{type(self).__name__}({self._describe()}), got shape {tuple(params.shape)}"
            )
        if params.dtype in (torch.float16, torch.bfloat16):
            # Likelihoods are computed in float32 even under autocast (documented promotion).
            params = params.float()
        self.params = params
        height, width = params.shape[-2:]
        super().__init__(
            batch_shape=params.shape[:-3],
            event_shape=torch.Size((channels, height, width)),
            validate_args=validate_args,
        )

    # -- to implement ----------------------------------------------------------------------
    @abc.abstractmethod
    def param_channels_for(self) -> int:
        """Number of parameter channels ``P`` this configuration needs."""

    @abc.abstractmethod
    def _elementwise_log_prob(self, value: Tensor) -> Tensor:
        """Log-probability per sub-pixel for validated ``int64`` ``value``.

        ``value`` has shape ``sample_shape + batch_shape + (C, H, W)``; return float32 (or wider)
        of the same shape.
        """

    @abc.abstractmethod
    def _sample(self, sample_shape: torch.Size, generator: torch.Generator | None) -> Tensor:
        """Draw ``int64`` levels of shape ``sample_shape + batch_shape + (C, H, W)``."""

    def _describe(self) -> str:
        return f"channels={self.channels}, bins={self.bins}"

    def _init_kwargs(self) -> dict[str, Any]:
        """Keyword arguments (besides ``params``) that rebuild this distribution."""
        return {"channels": self.channels, "bins": self.bins}

    # -- which implementation computes log_prob --------------------------------------------
    # A head documents its choices (``log_prob_backend`` in its docstring's Attributes), lists
    # them in ``log_prob_backends`` and picks its default in ``_default_backend``; its
    # ``_elementwise_log_prob`` dispatches on ``_resolve_backend``. Set ``log_prob_backend`` on
    # the class (every instance) or on one instance (kept by ``expand``).
    log_prob_backend: str | None = None
    log_prob_backends: ClassVar[tuple[str | None, ...]] = (None, "eager")

    def _default_backend(self, value: Tensor) -> str:
        """The backend used when ``log_prob_backend`` is ``None``."""
        return "eager"

    def _resolve_backend(self, value: Tensor) -> str:
        """``log_prob_backend`` checked and resolved: the head's default for ``None``;
        while ``torch.compile`` traces, ``"eager"`` unless ``"triton"`` was asked for (the
        compiler fuses the eager graph itself and traces plain ops more reliably than a custom
        autograd.Function with a Python loop; the Triton kernels are registered operators that
        a compiled graph calls as they are).

        Raises:
            ValueError: ``log_prob_backend`` is not one of ``log_prob_backends``.
        """
        backend = self.log_prob_backend
        if backend not in self.log_prob_backends:
            raise ValueError(
                f"log_prob_backend must be one of {self.log_prob_backends}, got {backend!r}"
            )
        if torch.compiler.is_compiling():
            return "triton" if backend == "triton" else "eager"
        return self._default_backend(value) if backend is None else backend

    # -- torch.distributions contract ------------------------------------------------------
    @constraints.dependent_property(is_discrete=True, event_dim=3)
    def support(self) -> constraints.Constraint:  # type: ignore[override]
        return constraints.independent(constraints.integer_interval(0, self.bins - 1), 3)

    def expand(self, batch_shape: Any, _instance: Any = None) -> "DiscreteImageDistribution":
        batch_shape = torch.Size(batch_shape)
        params = self.params.expand(batch_shape + self.params.shape[-3:])
        new = type(self)(params, validate_args=False, **self._init_kwargs())._with_validation(
            self._validate_args
        )
        if "log_prob_backend" in vars(self):  # a per-instance choice survives expand
            new.log_prob_backend = self.log_prob_backend
        return new

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

    Args:
        channels: Image channels ``C``.
        bins: Levels per sub-pixel.
        in_channels: Feature channels ``F`` of the projection, or ``None`` for no projection.
        feature_groups: ``1``, or ``channels`` for heads with ``supports_channel_groups``.
    """

    supports_channel_groups: ClassVar[bool] = False

    def __init__(
        self,
        channels: int,
        bins: int,
        in_channels: int | None = None,
        feature_groups: int = 1,
    ) -> None:
        super().__init__()
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
        return f"channels={self.channels}, bins={self.bins}, in_channels={self.in_channels}"
