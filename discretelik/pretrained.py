"""Load PixelCNN++ weights trained with the popular PyTorch port (pclucas14/pixel-cnn-pp).

The port (https://github.com/pclucas14/pixel-cnn-pp) publishes a CIFAR-10 model as a plain
``state_dict`` (its README reports 2.95 test bits/dim). Its network is the same as ours (both
follow openai/pixel-cnn), but its parameters are named and laid out differently:

* Names: ``u_init``, ``ul_init.0`` / ``ul_init.1``, ``up_layers.{i}.{u,ul}_stream.{j}``,
  ``down_layers.{i}.{u,ul}_stream.{j}`` (gated residual layers with ``conv_input``,
  ``nin_skip``, ``conv_out``), ``downsize_{u,ul}_stream.{i}``, ``upsize_{u,ul}_stream.{i}`` and
  ``nin_out``; with ``module.`` in front of every name when it was saved from
  ``nn.DataParallel``.
* Weight normalisation by ``torch.nn.utils.weight_norm`` with its default ``dim=0``: tensors
  ``weight_g`` and ``weight_v``. For convolutions and the linear ``nin`` layers dimension 0 is
  the output channel, as ours. For the *transposed* convolutions, whose weight is
  ``(in, out, kh, kw)``, dimension 0 is the **input** channel: one ``g`` per input channel,
  where ours has one per output channel. There is no exact mapping between the two ``(g, v)``
  pairs, so those layers are converted through the weight they produce:
  ``w = g v / ||v||`` (norm over all but the input dimension), then our ``v = w`` and
  ``g = ||w||`` (norm over all but the output dimension), which gives back the same ``w``.
  Every other weight-normed layer keeps the port's ``g`` and ``v`` as they are.
* ``nin`` layers are ``nn.Linear`` over the channels of each pixel (weight ``(out, in)``); ours
  are 1x1 convolutions (``(out, in, 1, 1)``), the same map.
* ``nin_out``, the last layer, becomes the head's 1x1 projection (a plain convolution: its
  weight is ``g v / ||v||``). The port's output channels are openai's mixture layout, which is
  ours for 1 and 3 channels; the converter still derives the channel order from both layouts
  instead of assuming it.

Everything else already agrees: the input scaled to ``[-1, 1]`` with an extra all-ones channel,
``concat_elu``, the shifted convolutions, their paddings and crops, the order of the U-Net
short-cuts and the likelihood (log-scales clamped at ``-7``). Our likelihood is exact where
the port's falls back to the density at the bin centre for bin masses below ``1e-5``.

Departure that matters only for further training: the port's dropout (rate 0.5, fixed) drops
whole channels (``nn.Dropout2d``); ours drops elements. Evaluation is unaffected.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .model import AutoregressiveModel, build
from .nn.weight_norm import is_weight_normed

__all__ = ["load_port_pixelcnn_pp", "port_pixelcnn_pp_shapes"]

# Head options the port fixes: a user value would silently change the model.
_FIXED_HEAD_OPTIONS = frozenset({"mixtures", "coupling", "min_log_scale", "channels", "bins"})


def load_port_pixelcnn_pp(
    state_dict: Mapping[str, Tensor] | str | os.PathLike[str],
    *,
    nr_resnet: int = 5,
    nr_filters: int = 160,
    nr_logistic_mix: int = 10,
    input_channels: int = 3,
    dropout: float = 0.5,
    head_kwargs: Mapping[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> AutoregressiveModel:
    """Our PixelCNN++ with the weights of a pclucas14/pixel-cnn-pp ``PixelCNN``.

    Builds ``build("pixelcnn++", "dlm", ...)`` of the port's size and loads ``state_dict``
    into it (names and layouts mapped as in the module docstring), so that for integer images
    ``x`` the model's head parameters equal the port's ``model(x / 255 * 2 - 1)`` and its
    ``log_prob`` the port's ``-discretized_mix_logistic_loss`` per image. Every key of
    ``state_dict`` must be used and every tensor must have the expected shape.

    Args:
        state_dict: The port's ``model.state_dict()`` (tensors on any device, any float
            dtype; they are copied into the float32 model on the CPU), or the path of a file
            saved with ``torch.save(model.state_dict(), path)``, read with
            ``torch.load(..., weights_only=True, map_location="cpu")``. Names may all carry the
            ``module.`` prefix of ``nn.DataParallel``.
        nr_resnet: The port's ``--nr_resnet`` (5 for its published CIFAR-10 model).
        nr_filters: The port's ``--nr_filters`` (160).
        nr_logistic_mix: The port's ``--nr_logistic_mix`` (10).
        input_channels: Image channels: 3 (CIFAR-10, coupled RGB mixture of ``10 K``
            parameters) or 1 (MNIST, ``3 K``), the two the port's likelihoods cover.
        dropout: Dropout rate of our model for further training (element-wise; the port's is
            0.5 over whole channels). No effect in evaluation mode.
        head_kwargs: Further options of the head (e.g. its log-likelihood backend); the
            mixture options come from the port and cannot be set here.
        map_location: Device of the returned model, e.g. ``"cpu"`` or ``"cuda"``.

    Returns:
        An [`AutoregressiveModel`][discretelik.AutoregressiveModel] over 256-level images
        ``(B, input_channels, H, W)`` (``H``, ``W`` multiples of 4), float32 on
        ``map_location``, in evaluation mode (call ``.train()`` to fine-tune). Its
        ``build_spec`` is set as for any model of ``build``, so checkpoints of further
        training reload with ``AutoregressiveModel.from_checkpoint``.

    Raises:
        TypeError: ``state_dict`` is not a mapping or a path, a key is not a string or a value
            not a floating-point tensor, or a size argument has the wrong type.
        ValueError: A key is missing or unexpected, a tensor has the wrong shape or
            non-finite values, ``input_channels`` is not 1 or 3, or ``head_kwargs`` sets a
            mixture option. The message names the key.

    Example:
        >>> model = load_port_pixelcnn_pp("pixel-cnn-pp_cifar10.pth")  # doctest: +SKIP
        >>> model.bits_per_dim(x_test).mean()  # doctest: +SKIP
    """
    sd = _as_state_dict(state_dict)
    if isinstance(input_channels, bool) or input_channels not in (1, 3):
        raise ValueError(
            "input_channels must be 1 or 3 (the port's likelihoods cover MNIST and RGB), "
            f"got {input_channels!r}"
        )
    if head_kwargs is not None and not isinstance(head_kwargs, Mapping):
        raise TypeError(f"head_kwargs must be a mapping, got {type(head_kwargs).__name__}")
    fixed = sorted(_FIXED_HEAD_OPTIONS & set(head_kwargs or {}))
    if fixed:
        raise ValueError(f"head_kwargs must not set {fixed}: the port's weights fix them")
    model = build(
        "pixelcnn++",
        "dlm",
        channels=input_channels,
        bins=256,
        nr_filters=nr_filters,
        nr_resnet=nr_resnet,
        dropout=dropout,
        head_kwargs={**(head_kwargs or {}), "mixtures": nr_logistic_mix},
    )
    sizes = (
        f"nr_resnet={nr_resnet}, nr_filters={nr_filters}, nr_logistic_mix={nr_logistic_mix}, "
        f"input_channels={input_channels}"
    )
    used: set[str] = set()
    with torch.no_grad():
        for prefix, module, kind in _layer_map(model):
            _load_layer(sd, prefix, module, kind, used, sizes)
        _load_output_layer(sd, model, used, sizes)
    unexpected = sorted(set(sd) - used)
    if unexpected:
        raise ValueError(
            f"state_dict has {len(unexpected)} unexpected key(s) for a port PixelCNN with "
            f"{sizes}: {_preview(unexpected)}"
        )
    return model.to(map_location).eval()


def port_pixelcnn_pp_shapes(
    *,
    nr_resnet: int = 5,
    nr_filters: int = 160,
    nr_logistic_mix: int = 10,
    input_channels: int = 3,
) -> dict[str, tuple[int, ...]]:
    """The keys and tensor shapes of a pclucas14/pixel-cnn-pp ``PixelCNN`` state dict.

    What [`load_port_pixelcnn_pp`][discretelik.load_port_pixelcnn_pp] expects for these sizes
    (every layer weight-normalised, as in the port's current code, without the
    ``nn.DataParallel`` prefix): compare with the keys of a file that does not load.

    Args:
        nr_resnet: The port's ``--nr_resnet``.
        nr_filters: The port's ``--nr_filters``.
        nr_logistic_mix: The port's ``--nr_logistic_mix``.
        input_channels: 3 or 1.

    Returns:
        ``{name: shape}`` in the order of the network's layers, e.g.
        ``"u_init.conv.weight_v": (160, 4, 2, 3)``.

    Example:
        >>> shapes = port_pixelcnn_pp_shapes(nr_resnet=1, nr_filters=8, nr_logistic_mix=2)
        >>> shapes["upsize_u_stream.0.deconv.weight_g"]  # one g per *input* channel
        (8, 1, 1, 1)
    """
    if isinstance(input_channels, bool) or input_channels not in (1, 3):
        raise ValueError(f"input_channels must be 1 or 3, got {input_channels!r}")
    model = build(
        "pixelcnn++", "dlm", channels=input_channels, nr_filters=nr_filters,
        nr_resnet=nr_resnet, dropout=0.0, head_kwargs={"mixtures": nr_logistic_mix},
    )
    shapes: dict[str, tuple[int, ...]] = {}
    layers = [(p, m, k) for p, m, k in _layer_map(model)]
    layers.append(("nin_out.lin_a", model.head.proj, "linear"))
    for prefix, module, kind in layers:
        w = _port_weight_shape(module, kind)
        shapes[f"{prefix}.weight_g"] = (w[0],) + (1,) * (len(w) - 1)
        shapes[f"{prefix}.weight_v"] = w
        shapes[f"{prefix}.bias"] = (module.bias.shape[0],)
    return shapes


def _as_state_dict(state_dict: object) -> dict[str, Tensor]:
    """The mapping (read from a file if given a path), without a DataParallel prefix."""
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = torch.load(state_dict, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            "state_dict must be a mapping of parameter names to tensors or a path, got "
            f"{type(state_dict).__name__}"
        )
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict keys must be strings, got {key!r}")
        if not isinstance(value, Tensor) or not value.is_floating_point():
            what = value.dtype if isinstance(value, Tensor) else type(value).__name__
            raise TypeError(f"state_dict[{key!r}] must be a floating-point tensor, got {what}")
    prefix = "module."
    # nn.DataParallel prefixes every name; strip it only when all names have it.
    if state_dict and all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix) :]: value for key, value in state_dict.items()}
    return dict(state_dict)


def _preview(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _layer_map(model: AutoregressiveModel) -> Iterator[tuple[str, nn.Module, str]]:
    """``(port name prefix, our layer, port layer kind)`` for every backbone layer."""
    net = model.backbone
    yield "u_init.conv", net.u_init.conv, "conv"
    yield "ul_init.0.conv", net.ul_init_above.conv, "conv"
    yield "ul_init.1.conv", net.ul_init_left.conv, "conv"
    for passname, u_blocks, ul_blocks in (
        ("up_layers", net.up_u, net.up_ul),
        ("down_layers", net.down_u, net.down_ul),
    ):
        for i, (u_block, ul_block) in enumerate(zip(u_blocks, ul_blocks)):
            for stream, block in (("u_stream", u_block), ("ul_stream", ul_block)):
                for j, layer in enumerate(block):
                    name = f"{passname}.{i}.{stream}.{j}"
                    yield f"{name}.conv_input.conv", layer.conv1.conv, "conv"
                    if layer.aux is not None:
                        yield f"{name}.nin_skip.lin_a", layer.aux.conv, "linear"
                    yield f"{name}.conv_out.conv", layer.conv2.conv, "conv"
    for i in range(2):
        yield f"downsize_u_stream.{i}.conv", net.downsample_u[i].conv, "conv"
        yield f"downsize_ul_stream.{i}.conv", net.downsample_ul[i].conv, "conv"
        yield f"upsize_u_stream.{i}.deconv", net.upsample_u[i].conv, "deconv"
        yield f"upsize_ul_stream.{i}.deconv", net.upsample_ul[i].conv, "deconv"


def _our_weight_shape(module: nn.Module) -> torch.Size:
    if is_weight_normed(module):
        return module.parametrizations.weight.original1.shape
    return module.weight.shape


def _port_weight_shape(module: nn.Module, kind: str) -> tuple[int, ...]:
    """The port's weight shape for the layer that maps onto ``module``."""
    shape = tuple(_our_weight_shape(module))
    return shape[:2] if kind == "linear" else shape  # Linear (out, in) vs 1x1 conv


def _take(
    sd: Mapping[str, Tensor], key: str, shape: tuple[int, ...], used: set[str], sizes: str
) -> Tensor:
    if key not in sd:
        raise ValueError(
            f"state_dict has no key {key!r} (expected for a port PixelCNN with {sizes}; "
            "another size needs the matching arguments)"
        )
    value = sd[key]
    if tuple(value.shape) != shape:
        raise ValueError(
            f"state_dict[{key!r}] has shape {tuple(value.shape)}, expected {shape} for a port "
            f"PixelCNN with {sizes}"
        )
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"state_dict[{key!r}] has non-finite values")
    used.add(key)
    return value


def _norm_except(w: Tensor, dim: int) -> Tensor:
    """L2 norm over every dimension but ``dim``, kept for broadcasting."""
    return torch.linalg.vector_norm(w, dim=[d for d in range(w.dim()) if d != dim], keepdim=True)


def _port_weight(
    sd: Mapping[str, Tensor], prefix: str, shape: tuple[int, ...], used: set[str], sizes: str
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(w, g, v)`` of one port layer: weight-normed (``g``, ``v`` given) or plain."""
    if f"{prefix}.weight" in sd and f"{prefix}.weight_v" not in sd:
        # A layer without weight norm (older versions of the port's nin).
        return _take(sd, f"{prefix}.weight", shape, used, sizes).double(), None, None
    v = _take(sd, f"{prefix}.weight_v", shape, used, sizes)
    g_shape = (shape[0],) + (1,) * (len(shape) - 1)  # torch.nn.utils.weight_norm, dim=0
    g = _take(sd, f"{prefix}.weight_g", g_shape, used, sizes)
    w = g.double() * v.double() / _norm_except(v.double(), 0)
    return w, g, v


def _load_layer(
    sd: Mapping[str, Tensor], prefix: str, module: nn.Module, kind: str, used: set[str], sizes: str
) -> None:
    """Copy one port layer into ``module`` (weight-normed, as every backbone layer here)."""
    shape = _port_weight_shape(module, kind)
    w, g, v = _port_weight(sd, prefix, shape, used, sizes)
    bias = _take(sd, f"{prefix}.bias", (module.bias.shape[0],), used, sizes)
    ours = module.parametrizations.weight
    our_shape = ours.original1.shape
    if g is not None and kind in ("conv", "linear") and ours[0].dim == 0:
        # Same normalisation (per output channel): keep the trained g and v themselves.
        ours.original0.copy_(g.reshape(ours.original0.shape))
        ours.original1.copy_(v.reshape(our_shape))
    else:
        # Transposed convolutions (port: g per input channel) and plain port layers: carry the
        # weight itself over and re-normalise it along our dimension.
        w = w.reshape(our_shape)
        ours.original1.copy_(w)
        ours.original0.copy_(_norm_except(w, ours[0].dim))
    module.bias.copy_(bias)


def _port_channel_order(model: AutoregressiveModel) -> Tensor:
    """``order[p]``: the port output channel that becomes our head parameter ``p``.

    The port (openai's layout, NHWC last axis): ``K`` logits, then per image channel ``c`` a
    block of ``S`` channels: ``K`` means, ``K`` log-scales and, for RGB, ``K`` coefficients of
    the ``c``-th coupling pair in the order ``(G, R), (B, R), (B, G)``; ``S = 3 K`` for RGB,
    ``2 K`` for one channel. Our positions come from the head's own layout.
    """
    layout = model.head.layout
    k, c, m = layout.mixtures, layout.channels, layout.coefficients
    n = layout.param_channels
    stride = (3 if m else 2) * k
    ours = torch.arange(n).view(n, 1, 1)  # our channel indices, cut up by role below
    logits, loc, log_scale, coeff = layout.split(ours)  # (K,1,1), (K,C,1,1), ..., (K,M,1,1)
    comp = torch.arange(k).view(k, 1)
    order = torch.full((n,), -1, dtype=torch.long)
    order[logits.flatten()] = torch.arange(k)
    slots = torch.arange(c).view(1, c)
    order[loc.reshape(k, c).flatten()] = (k + slots * stride + comp).flatten()
    order[log_scale.reshape(k, c).flatten()] = (k + slots * stride + k + comp).flatten()
    if m:
        pairs = torch.arange(m).view(1, m)  # our pair order (1,0), (2,0), (2,1) = the port's
        order[coeff.reshape(k, m).flatten()] = (k + pairs * stride + 2 * k + comp).flatten()
    if not torch.equal(order.sort().values, torch.arange(n)):  # pragma: no cover  (invariant)
        raise RuntimeError("internal error: the port's output layout is not a permutation")
    return order


def _load_output_layer(
    sd: Mapping[str, Tensor], model: AutoregressiveModel, used: set[str], sizes: str
) -> None:
    """The port's ``nin_out`` (linear, weight-normed) into the head's plain 1x1 projection."""
    proj = model.head.proj
    n, f = proj.weight.shape[:2]
    w, _, _ = _port_weight(sd, "nin_out.lin_a", (n, f), used, sizes)
    bias = _take(sd, "nin_out.lin_a.bias", (n,), used, sizes)
    order = _port_channel_order(model)
    proj.weight.copy_(w[order].reshape(proj.weight.shape))
    proj.bias.copy_(bias[order])
