"""One raster-order sampler for every backbone x head combination.

The sampler never looks inside the backbone: for each pixel in raster order it runs the full
model on the canvas drawn so far, reads the head's distribution at that pixel and draws it.
Backbones with ordered channel groups (``channel_groups == C``) are run once per channel so
that G is drawn given R and B given R and G. Pixels given in ``known`` are written into the
canvas before anything is drawn and never changed, which gives inpainting and completion.

Backbones that provide ``sampling_cache(n, image_shape, cond)`` (gated PixelCNN, PixelCNN++)
are sampled through it instead: it caches every layer's activations and computes only what
each new pixel changes (Ramachandran et al. 2017, see
[`SamplingCache`][discretelik.SamplingCache]). Its features equal the full model's up to
floating-point rounding, so with the same generator it draws the same images
(``cached=False`` forces the full recomputation). On a CUDA device the cached one-pixel step is
captured in CUDA graphs and replayed per pixel (``discretelik.sampling_graph``), drawing
exactly what the eager cached step draws from the same generator.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._checks import check_int, check_integer_dtype, check_levels, check_tensor
from .backbones.base import Conditioning
from .sampling_graph import StaticSteps

if TYPE_CHECKING:
    from .model import AutoregressiveModel

__all__ = ["sample_raster"]

# cuda_graph: "auto" captures on CUDA (falls back with a warning), "require" raises instead,
# "off" runs the eager step, "uncaptured" runs the graphs' static-buffer step eagerly.
_CUDA_GRAPH_MODES = ("auto", "require", "off", "uncaptured")


def _image_shape(model: "AutoregressiveModel", image_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if not isinstance(image_shape, (tuple, list, torch.Size)) or any(
        isinstance(s, bool) or not hasattr(type(s), "__index__") for s in image_shape
    ):
        # int() would silently truncate 4.5 to 4 (and take True as 1); __index__ is for integers.
        raise TypeError(
            f"image_shape must be a tuple of ints (H, W) or (C, H, W), got {image_shape!r}"
        )
    shape = tuple(operator.index(s) for s in image_shape)
    if len(shape) == 2:
        shape = (model.channels, *shape)
    if len(shape) != 3 or shape[0] != model.channels or min(shape) < 1:
        raise ValueError(
            f"image_shape must be (H, W) or ({model.channels}, H, W), got {tuple(image_shape)}"
        )
    return shape  # type: ignore[return-value]


def _check_known(
    known: tuple[Tensor, Tensor], n: int, shape: tuple[int, int, int], bins: int
) -> tuple[Tensor, Tensor]:
    if not isinstance(known, (tuple, list)) or len(known) != 2:
        raise TypeError("known must be a pair (image, mask)")
    image, mask = known
    check_tensor(image, "known image")
    check_integer_dtype(image, "known image")
    if tuple(image.shape) != (n, *shape):
        raise ValueError(f"known image must have shape {(n, *shape)}, got {tuple(image.shape)}")
    check_levels(image, bins, "known image")
    check_tensor(mask, "known mask")
    if mask.dtype != torch.bool:
        raise TypeError(f"known mask must be a bool tensor, got dtype {mask.dtype}")
    if tuple(mask.shape) != (n, *shape[1:]):
        raise ValueError(
            f"known mask must have shape {(n, *shape[1:])} (one flag per pixel), "
            f"got {tuple(mask.shape)}"
        )
    return image, mask


def _cache_factory(backbone: torch.nn.Module) -> Any:
    """The backbone's ``sampling_cache`` method, or ``None`` when it has none or is unsafe.

    A subclass that overrides ``forward`` but inherits ``sampling_cache`` would get the
    parent's features from the cache, so it is sampled by full recomputation instead.
    """
    make = getattr(backbone, "sampling_cache", None)
    if make is None:
        return None
    owner = next((c for c in type(backbone).__mro__ if "sampling_cache" in vars(c)), None)
    if owner is None:  # set on the instance: its owner vouches for it
        return make
    return make if type(backbone).forward is owner.forward else None


@torch.no_grad()
def sample_raster(
    model: "AutoregressiveModel",
    n: int,
    image_shape: tuple[int, ...],
    cond: Conditioning = None,
    known: tuple[Tensor, Tensor] | None = None,
    generator: torch.Generator | None = None,
    cached: bool | None = None,
    cuda_graph: str = "auto",
    return_params: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Draw ``n`` images pixel by pixel in raster order.

    Args:
        model: An [`AutoregressiveModel`][discretelik.AutoregressiveModel]; it is put in eval
            mode for the draw (dropout off) and restored afterwards.
        n: Number of images.
        image_shape: ``(H, W)`` or ``(C, H, W)``.
        cond: Conditioning for the ``n`` images, as for the model's ``forward``.
        known: Optional ``(image, mask)``: ``image`` integer ``(n, C, H, W)``, ``mask`` bool
            ``(n, H, W)``; pixels where ``mask`` is true are copied from ``image`` and never
            drawn, so the result equals ``image`` there (inpainting / completion).
        generator: Optional ``torch.Generator`` on the model's device; the same seed gives the
            same images.
        cached: ``None`` (default): use the backbone's ``sampling_cache`` when it has one and
            ``channel_groups == 1``, else recompute the whole model per pixel; ``False``:
            always recompute (the reference the cache is tested against); ``True``: require
            the cache.
        cuda_graph: How the cached step runs. ``"auto"``: on a CUDA device, captured in CUDA
            graphs (one per kind of pixel) and replayed per pixel; if a capture fails, one
            ``RuntimeWarning`` and the eager step for the rest of the draw; elsewhere the
            eager step. ``"require"``: capture, raising instead of falling back (a
            ``ValueError`` off CUDA or without the cache). ``"off"``: the eager step.
            ``"uncaptured"``: the graphs' static-buffer step, run eagerly on any device (it
            draws what the eager step draws; for checking the captured code). Without the
            cache (``cached=False``, or no ``sampling_cache``) only ``"auto"`` and ``"off"``
            apply. With the same generator every mode draws the same images up to the
            features' rounding.
        return_params: Also return the raw head parameters each pixel was drawn from.

    Returns:
        ``int64`` images ``(n, C, H, W)`` with levels in ``[0, bins - 1]``; with
        ``return_params``, the pair ``(images, params)``, ``params`` float
        ``(n, head.param_channels, H, W)`` in the model's dtype: at each drawn pixel the
        parameters of its distribution (with ordered channel groups, those of the last
        channel's pass, which every channel's parameters equal); NaN where the pixel was
        known in every image and not drawn.

    Raises:
        TypeError: ``cached`` is not ``None`` or a bool, ``cuda_graph`` or ``return_params``
            of the wrong type, or ``image_shape`` holds a non-integer size.
        ValueError: ``cached=True`` but the backbone has no ``sampling_cache`` or orders
            channel groups; ``cuda_graph`` not one of its values, or ``"require"`` or
            ``"uncaptured"`` where the cache is not used, or ``"require"`` off CUDA.
    """
    check_int(n, "n", 1)
    if cached is not None and not isinstance(cached, bool):
        raise TypeError(f"cached must be None or a bool, got {cached!r}")
    if not isinstance(cuda_graph, str):
        raise TypeError(f"cuda_graph must be one of {_CUDA_GRAPH_MODES}, got {cuda_graph!r}")
    if cuda_graph not in _CUDA_GRAPH_MODES:
        raise ValueError(f"cuda_graph must be one of {_CUDA_GRAPH_MODES}, got {cuda_graph!r}")
    if not isinstance(return_params, bool):
        raise TypeError(f"return_params must be a bool, got {return_params!r}")
    shape = _image_shape(model, image_shape)
    device = next(model.parameters()).device
    canvas = torch.zeros((n, *shape), dtype=torch.long, device=device)
    mask = None
    skip: list[list[bool]] | None = None
    if known is not None:
        image, mask = _check_known(known, n, shape, model.bins)
        # Pixels known in every image are skipped; read once here, not once per pixel (a
        # device sync per pixel on a GPU).
        skip = mask.all(dim=0).tolist()
        mask = mask.to(device)
        canvas = torch.where(mask[:, None], image.to(device).long(), canvas)
    steps = model.backbone.channel_groups  # 1: whole pixels at once; C: one channel at a time
    make_cache = _cache_factory(model.backbone)
    # A cache computes whole pixels; ordered channel groups need one pass per channel.
    use_cache = make_cache is not None and steps == 1 and cached is not False
    if cached and not use_cache:
        raise ValueError(
            f"cached=True but {type(model.backbone).__name__} has no usable sampling_cache"
            + ("" if make_cache is None else " for channel_groups > 1")
        )
    if cuda_graph in ("require", "uncaptured") and not use_cache:
        raise ValueError(
            f"cuda_graph={cuda_graph!r} needs the cached sampler, which is not used here "
            "(cached=False, no sampling_cache, or channel_groups > 1)"
        )
    if cuda_graph == "require" and device.type != "cuda":
        raise ValueError(f"cuda_graph='require' needs a CUDA device, the model is on {device}")
    static = use_cache and (
        cuda_graph == "uncaptured" or (cuda_graph in ("auto", "require") and device.type == "cuda")
    )
    params_out = None
    if return_params:
        dtype = model.scale(canvas[:1, :, :1, :1]).dtype
        params_out = torch.full(
            (n, model.head.param_channels, *shape[1:]), float("nan"), dtype=dtype, device=device
        )
    was_training = model.training
    model.eval()
    try:
        cache = make_cache(n, shape[1:], cond) if use_cache else None
        # The cache reads the scaled canvas; keep it in step with the integer one.
        scaled = model.scale(canvas) if cache is not None else None
        if static:
            runner = StaticSteps(
                model, cache, canvas, scaled, mask, generator, params_out,
                capture=cuda_graph != "uncaptured", strict=cuda_graph == "require",
            )
            for i in range(shape[1]):
                for j in range(shape[2]):
                    runner.step(i, j, draw=skip is None or not skip[i][j])
            return (canvas, params_out) if return_params else canvas
        for i in range(shape[1]):
            for j in range(shape[2]):
                if skip is not None and skip[i][j]:
                    continue
                for step in range(steps):
                    if cache is not None:
                        feats = cache.step(scaled, i, j)  # (n, F)
                        params = model.head.params(feats[:, :, None, None])
                    else:
                        params = model.params(canvas, cond)[:, :, i : i + 1, j : j + 1]
                    draw = model.head.distribution(params).sample(generator=generator)[:, :, 0, 0]
                    if params_out is not None:  # the last pass's: final for every channel
                        params_out[:, :, i, j] = params[:, :, 0, 0]
                    chans = slice(None) if steps == 1 else slice(step, step + 1)
                    new = canvas[:, chans, i, j].clone()
                    new.copy_(draw[:, chans])
                    if mask is not None:
                        new = torch.where(mask[:, i, j, None], canvas[:, chans, i, j], new)
                    canvas[:, chans, i, j] = new
                    if scaled is not None:
                        scaled[:, :, i, j] = model.scale(canvas[:, :, i, j])
    finally:
        model.train(was_training)
    return (canvas, params_out) if return_params else canvas
