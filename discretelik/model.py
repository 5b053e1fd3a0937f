"""A backbone and a head composed into one autoregressive image model, and ``build``."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ._checks import (
    check_int,
    check_integer_dtype,
    check_levels,
    check_ndim,
    check_tensor,
    value_checks_enabled,
)
from .backbones.base import Backbone, Conditioning
from .heads.base import DiscreteImageDistribution, Head
from .metrics import bits_per_dim
from .registry import create_backbone, create_head, get_backbone, get_head

__all__ = ["AutoregressiveModel", "build"]


class AutoregressiveModel(nn.Module):
    """An autoregressive model ``p(x) = prod_i p(x_i | x_<i)`` over integer images.

    The backbone turns the (scaled) image into features, the head turns features into a
    distribution. Build one with [`build`][discretelik.build].

    Args:
        backbone: A [`Backbone`][discretelik.Backbone] with ``in_channels == head.channels``.
        head: A [`Head`][discretelik.Head] whose ``in_channels`` equals ``backbone.out_channels``.

    Raises:
        TypeError: ``backbone`` is not a ``Backbone`` or ``head`` not a ``Head``.
        ValueError: Their channel counts or channel groups do not match.

    Attributes:
        build_spec: How [`build`][discretelik.build] made the model, as a JSON-able dict with
            keys ``backbone``, ``head``, ``channels``, ``bins``, ``preset``, ``head_kwargs``
            and ``backbone_kwargs`` (``build(**spec)`` with the two kwargs dicts spread makes
            the same model again); ``None`` for a model composed by hand or built with an
            option that is not JSON-able. Per-process choices such as the head's
            ``log_prob_backend`` are not recorded. The trainer stores it in checkpoints as
            ``model_spec``, which [`from_checkpoint`][discretelik.AutoregressiveModel.from_checkpoint]
            reads.
    """

    def __init__(self, backbone: Backbone, head: Head) -> None:
        super().__init__()
        if not isinstance(backbone, Backbone):
            raise TypeError(
                f"backbone must be a discretelik Backbone, got {type(backbone).__name__}"
            )
        if not isinstance(head, Head):
            raise TypeError(f"head must be a discretelik Head, got {type(head).__name__}")
        if backbone.in_channels != head.channels:
            raise ValueError(
                f"backbone.in_channels ({backbone.in_channels}) must equal head.channels "
                f"({head.channels})"
            )
        if head.in_channels != backbone.out_channels:
            raise ValueError(
                f"head.in_channels ({head.in_channels}) must equal backbone.out_channels "
                f"({backbone.out_channels})"
            )
        if backbone.channel_groups != head.feature_groups:
            raise ValueError(
                f"backbone.channel_groups ({backbone.channel_groups}) must equal "
                f"head.feature_groups ({head.feature_groups})"
            )
        self.backbone = backbone
        self.head = head
        # How build() made this model (JSON-able), or None for a model composed by hand; the
        # trainer stores it in checkpoints as "model_spec" for from_checkpoint.
        self.build_spec: dict[str, Any] | None = None

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        weights: str = "ema",
        map_location: str | torch.device = "cpu",
        head_kwargs: Mapping[str, Any] | None = None,
    ) -> AutoregressiveModel:
        """Rebuild a trained model from a checkpoint written by the trainer.

        The checkpoint's digest is verified, the model is rebuilt with
        [`build`][discretelik.build] from the ``model_spec`` the trainer stored (the model's
        ``build_spec``), the chosen weights are loaded and the model is returned in eval mode.

        Args:
            path: A checkpoint of [`Trainer.save`][discretelik.train.Trainer.save].
            weights: ``"ema"`` for the Polyak-averaged weights (what the trainer evaluates and
                samples with) or ``"raw"`` for the last training weights.
            map_location: Device of the returned model, e.g. ``"cpu"`` or ``"cuda"``.
            head_kwargs: Extra head options for this process that are not part of the model,
                e.g. ``{"log_prob_backend": "lean"}``; merged into the recorded ones.

        Returns:
            The model on ``map_location``, in eval mode, with ``build_spec`` set.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: Unknown ``weights``; the file is not a checkpoint, is corrupted
                (digest mismatch), has no ``model_spec`` (a model not made by ``build``) or
                lacks the chosen weights; the weights do not fit the model the spec builds; or
                they hold NaN/infinity. The message names the file.

        Example:
            >>> model = AutoregressiveModel.from_checkpoint("run/checkpoint.pt")  # doctest: +SKIP
            >>> images = model.sample(4, (3, 32, 32))  # doctest: +SKIP
        """
        # Imported here: discretelik.train builds on this module.
        from .train.checkpoint import check_finite_tensors, load_checkpoint, state_dict_mismatch

        if weights not in ("ema", "raw"):
            raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
        if head_kwargs is not None and not isinstance(head_kwargs, Mapping):
            raise TypeError(
                f"head_kwargs must be a mapping of head options, got {type(head_kwargs).__name__}"
            )
        ckpt = load_checkpoint(path, map_location="cpu")
        spec = ckpt.get("model_spec")
        if spec is None:
            raise ValueError(
                f"{path}: the checkpoint has no 'model_spec' (the model was not made by "
                "discretelik.build, or the file was not written by discretelik.train)"
            )
        model = _build_from_spec(spec, head_kwargs, path)
        raw = ckpt.get("model")
        if not isinstance(raw, Mapping):
            raise ValueError(f"{path}: the checkpoint has no 'model' state dict")
        try:
            model.load_state_dict(raw)
        except RuntimeError as exc:  # missing/unexpected keys or shapes
            raise ValueError(
                f"{path}: the weights do not fit the model its model_spec builds: "
                f"{state_dict_mismatch(exc)}"
            ) from exc
        if weights == "ema":
            ema = ckpt.get("ema")
            shadow = ema.get("shadow") if isinstance(ema, Mapping) else None
            if not isinstance(shadow, Mapping):
                raise ValueError(f"{path}: the checkpoint has no named EMA weights ('ema')")
            params = dict(model.named_parameters())
            expected = {n for n, p in params.items() if p.is_floating_point()}
            if set(shadow) != expected:
                missing = sorted(expected - set(shadow))[:5]
                extra = sorted(set(shadow) - expected)[:5]
                raise ValueError(
                    f"{path}: the EMA weights do not fit the model: missing {missing}, "
                    f"unexpected {extra}"
                )
            with torch.no_grad():
                for name in sorted(expected):
                    value = shadow[name]
                    if not isinstance(value, Tensor) or value.shape != params[name].shape:
                        got = tuple(value.shape) if isinstance(value, Tensor) else type(value)
                        raise ValueError(
                            f"{path}: EMA weight {name!r} has shape {got}, the model has "
                            f"{tuple(params[name].shape)}"
                        )
                    params[name].copy_(value)
        check_finite_tensors(model.state_dict().items(), f"{path}: {weights} weights")
        return model.to(map_location).eval()

    @property
    def channels(self) -> int:
        """Image channels ``C``."""
        return self.head.channels

    @property
    def bins(self) -> int:
        """Levels per sub-pixel."""
        return self.head.bins

    def check_image(self, x: Tensor, name: str = "x", validate_args: bool | None = None) -> None:
        """Validate an integer image ``(B, C, H, W)`` with levels in ``[0, bins - 1]``.

        The range check reads the tensor (and so synchronises a GPU); it runs when
        ``validate_args`` is true, or when it is ``None`` and
        ``torch.distributions.Distribution``'s global default is on; never while
        ``torch.compile`` traces. Type and shape checks always run.
        """
        check_tensor(x, name)
        check_integer_dtype(x, name)
        check_ndim(x, 4, name, "(B, C, H, W)")
        if x.shape[1] != self.channels:
            raise ValueError(
                f"{name} must have {self.channels} channels, got shape {tuple(x.shape)}"
            )
        values = value_checks_enabled() if validate_args is None else validate_args
        if values and not torch.compiler.is_compiling():
            check_levels(x, self.bins, name)

    def scale(self, x: Tensor) -> Tensor:
        """Map integer levels ``(B, C, H, W)`` to ``[-1, 1]`` (level 0 -> -1).

        In the dtype of the backbone's parameters (float32 for a float32 model, also under
        autocast, which casts as it needs; float64 or bf16 for a model converted to those).
        """
        first = next(self.backbone.parameters(), None)
        float_params = first is not None and first.is_floating_point()
        dtype = first.dtype if float_params else torch.float32
        return x.to(dtype) * (2.0 / (self.bins - 1)) - 1.0

    def params(
        self, x: Tensor, cond: Conditioning = None, *, validate_args: bool | None = None
    ) -> Tensor:
        """Raw head parameters ``(B, head.param_channels, H, W)`` for integer images ``x``.

        Under an autocast the caller opened, the backbone and the head's projection run in
        its dtype (e.g. bf16 parameters); ``validate_args`` as in
        [`check_image`][discretelik.AutoregressiveModel.check_image].
        """
        self.check_image(x, validate_args=validate_args)
        return self.head.params(self.backbone(self.scale(x), cond))

    def forward(
        self, x: Tensor, cond: Conditioning = None, *, validate_args: bool | None = None
    ) -> DiscreteImageDistribution:
        """The model's distribution given integer images ``x`` ``(B, C, H, W)``.

        Args:
            x: Integer levels in ``[0, bins - 1]``; the distribution's parameters at pixel
                ``(i, j)`` depend only on the pixels of ``x`` before it (and on earlier channels
                of the same pixel where the head allows it).
            cond: Optional conditioning (see [`Conditioning`][discretelik.Conditioning]).
            validate_args: Check the levels of ``x`` and the parameters' values (reads them,
                so synchronises a GPU); ``None`` follows ``torch.distributions``' global
                default. Type and shape checks always run.

        Returns:
            A distribution with ``batch_shape (B,)`` and ``event_shape (C, H, W)``.
        """
        return self.head.distribution(
            self.params(x, cond, validate_args=validate_args), validate_args=validate_args
        )

    def log_prob(
        self, x: Tensor, cond: Conditioning = None, *, validate_args: bool | None = None
    ) -> Tensor:
        """Log-likelihood (nats) of each image, float32 ``(B,)`` (float64 for a float64 model).

        This is the training loss's path too: under an autocast the caller opened (e.g.
        ``torch.autocast("cuda", torch.bfloat16)``) the backbone and the head's projection run
        in the autocast dtype, while the distribution and its log-likelihood run with autocast
        off on float32 parameters.

        Args:
            x: Integer images ``(B, C, H, W)`` with levels in ``[0, bins - 1]``.
            cond: Optional conditioning (see [`Conditioning`][discretelik.Conditioning]).
            validate_args: As in [`forward`][discretelik.AutoregressiveModel.forward]; the
                trainer passes ``False`` (its data is checked once, and per-step checks would
                synchronise the GPU and break compiled graphs).
        """
        params = self.params(x, cond, validate_args=validate_args)
        # The head casts bf16/fp16 parameters to float32; with autocast off its log-likelihood
        # then stays float32 end to end (autocast would run some of its ops in bf16).
        with torch.autocast(device_type=params.device.type, enabled=False):
            dist = self.head.distribution(params, validate_args=validate_args)
            return dist.log_prob(x)

    def bits_per_dim(
        self, x: Tensor, cond: Conditioning = None, *, validate_args: bool | None = None
    ) -> Tensor:
        """Negative log-likelihood in bits per sub-pixel of each image, float32 ``(B,)``.

        float64 for a float64 model. Arguments and precision as in
        [`log_prob`][discretelik.AutoregressiveModel.log_prob]; the training loss of
        [`LikelihoodLoss`][discretelik.train.LikelihoodLoss] and the evaluation call it.
        """
        return bits_per_dim(self.log_prob(x, cond, validate_args=validate_args), x.shape[1:])

    @torch.no_grad()
    def sample(
        self,
        n: int,
        image_shape: tuple[int, ...],
        cond: Conditioning = None,
        known: tuple[Tensor, Tensor] | None = None,
        generator: torch.Generator | None = None,
        cached: bool | None = None,
        cuda_graph: str = "auto",
    ) -> Tensor:
        """Raster-order ancestral sampling; see [`sample_raster`][discretelik.sample_raster].

        Args:
            n: Number of images.
            image_shape: ``(H, W)`` or ``(C, H, W)``.
            cond: Conditioning for the ``n`` images.
            known: Optional ``(image, mask)``: integer ``(n, C, H, W)`` and bool ``(n, H, W)``;
                pixels where ``mask`` is true are kept as given.
            generator: Optional ``torch.Generator`` for reproducible draws.
            cached: ``None`` uses the backbone's activation cache when it has one (fast
                sampling), ``False`` forces full recomputation, ``True`` requires the cache.
            cuda_graph: ``"auto"`` replays the cached step from CUDA graphs on a CUDA device;
                ``"off"``, ``"require"``, ``"uncaptured"`` as in ``sample_raster``.

        Returns:
            int64 images ``(n, C, H, W)``.
        """
        from .sampling import sample_raster

        return sample_raster(
            self, n, image_shape, cond=cond, known=known, generator=generator, cached=cached,
            cuda_graph=cuda_graph,
        )


def build(
    backbone: str,
    head: str = "dlm",
    *,
    channels: int = 3,
    bins: int = 256,
    preset: str | None = None,
    head_kwargs: Mapping[str, Any] | None = None,
    **backbone_kwargs: Any,
) -> AutoregressiveModel:
    """Compose any registered backbone with any registered head.

    Args:
        backbone: Registered backbone name (see [`list_backbones`][discretelik.list_backbones]).
        head: Registered head name (see [`list_heads`][discretelik.list_heads]).
        channels: Image channels ``C``.
        bins: Levels per sub-pixel (256 for 8-bit images).
        preset: Backbone preset (see [`backbone_presets`][discretelik.backbone_presets]), e.g.
            ``"tiny"`` (a few thousand parameters, for tests) or ``"paper"``. ``None`` builds
            the backbone config's own defaults, which for every built-in backbone are the
            paper's size (``"gated_pixelcnn"``: 116M parameters, ``"pixelcnn++"``: 54M); pass
            a preset, or explicit sizes in ``backbone_kwargs``, for anything smaller.
        head_kwargs: Extra head options, e.g. ``{"mixtures": 5}``.
        **backbone_kwargs: Backbone config overrides; ``None`` values are dropped.

    Returns:
        The composed model. When both the backbone and the head support ordered channel groups
        (e.g. ``"pixelcnn"`` + ``"softmax"``) the backbone is built with ``channel_groups =
        channels`` so that G depends on R and B on R and G within a pixel; otherwise the
        backbone conditions on whole previous pixels only.

    Example:
        >>> model = build("pixelcnn++", "dlm", preset="tiny")
        >>> x = torch.randint(0, 256, (2, 3, 8, 8))
        >>> model.bits_per_dim(x).shape
        torch.Size([2])
    """
    check_int(channels, "channels", 1)
    check_int(bins, "bins", 2)
    if head_kwargs is not None and not isinstance(head_kwargs, Mapping):
        raise TypeError(
            f"head_kwargs must be a mapping of head options, got {type(head_kwargs).__name__}"
        )
    spec = _build_spec(backbone, head, channels, bins, preset, head_kwargs, backbone_kwargs)
    head_cls = get_head(head)
    backbone_cls = get_backbone(backbone)
    grouped = (
        channels > 1
        and getattr(head_cls, "supports_channel_groups", False)
        and getattr(backbone_cls, "supports_channel_groups", False)
    )
    if grouped:
        backbone_kwargs.setdefault("channel_groups", channels)
    net = create_backbone(backbone, preset=preset, in_channels=channels, **backbone_kwargs)
    kwargs = dict(head_kwargs or {})
    # build sets these itself; one given in head_kwargs would be silently overwritten.
    taken = sorted({"channels", "bins", "in_channels", "feature_groups"} & set(kwargs))
    if taken:
        raise ValueError(
            f"head_kwargs must not set {taken}: build derives them (pass channels= and bins= "
            f"to build itself), got head_kwargs={dict(head_kwargs or {})}"
        )
    kwargs.update(channels=channels, bins=bins, in_channels=net.out_channels)
    if net.channel_groups != 1:
        kwargs["feature_groups"] = net.channel_groups
    model = AutoregressiveModel(net, create_head(head, **kwargs))
    model.build_spec = spec
    return model


# Head options that choose how this process computes, not what the model is: left out of
# build_spec, so a checkpoint trained with e.g. a GPU-only kernel reloads anywhere.
_RUNTIME_HEAD_OPTIONS = ("log_prob_backend",)


def _build_spec(
    backbone: str,
    head: str,
    channels: int,
    bins: int,
    preset: str | None,
    head_kwargs: Mapping[str, Any] | None,
    backbone_kwargs: Mapping[str, Any],
) -> dict[str, Any] | None:
    """build's arguments as a JSON-able dict, or None when an option is not JSON-able."""
    spec = {
        "backbone": backbone,
        "head": head,
        "channels": channels,
        "bins": bins,
        "preset": preset,
        "head_kwargs": {
            k: v
            for k, v in dict(head_kwargs or {}).items()
            if k not in _RUNTIME_HEAD_OPTIONS
        },
        "backbone_kwargs": {k: v for k, v in backbone_kwargs.items() if v is not None},
    }
    try:
        json.dumps(spec)
    except (TypeError, ValueError):  # e.g. a tensor or a callable as an option
        return None
    return spec


_SPEC_KEYS = ("backbone", "head", "channels", "bins", "preset", "head_kwargs", "backbone_kwargs")


def _build_from_spec(
    spec: Any, head_kwargs: Mapping[str, Any] | None, path: str | os.PathLike[str]
) -> AutoregressiveModel:
    """``build(**spec)`` with the checkpoint's file named in every error."""
    if not isinstance(spec, Mapping) or not {"backbone", "head"} <= set(spec):
        raise ValueError(
            f"{path}: model_spec must be a mapping with at least 'backbone' and 'head', got "
            f"{spec!r:.200}"
        )
    unknown = sorted(set(spec) - set(_SPEC_KEYS))
    if unknown:
        raise ValueError(f"{path}: model_spec has unknown keys {unknown}")
    for key in ("head_kwargs", "backbone_kwargs"):
        if not isinstance(spec.get(key) or {}, Mapping):
            raise ValueError(f"{path}: model_spec[{key!r}] must be a mapping, got {spec[key]!r:.200}")
    options = dict(spec.get("head_kwargs") or {}, **dict(head_kwargs or {}))
    try:
        return build(
            spec["backbone"],
            spec["head"],
            channels=spec.get("channels", 3),
            bins=spec.get("bins", 256),
            preset=spec.get("preset"),
            head_kwargs=options,
            **dict(spec.get("backbone_kwargs") or {}),
        )
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: cannot build the model of its model_spec: {exc}") from exc
