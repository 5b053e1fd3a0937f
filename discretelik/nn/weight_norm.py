"""Weight normalisation and the data-dependent initialisation of PixelCNN++.

Weight normalisation (Salimans & Kingma, 2016) writes each output unit's weight vector as
``w = g * v / ||v||``. We use PyTorch's own ``torch.nn.utils.parametrizations.weight_norm``, so
the parameters are ``parametrizations.weight.original0`` (``g``) and ``original1`` (``v``) and
``state_dict``, optimizers and ``torch.compile`` all see ordinary parameters.
[`apply_weight_norm`][discretelik.nn.weight_norm.apply_weight_norm] picks the output dimension
for the layer type (``dim=0`` for ``Conv*d`` and ``Linear``, ``dim=1`` for
``ConvTranspose*d``, whose weight is ``(in, out, ...)``).

[`data_dependent_init`][discretelik.nn.weight_norm.data_dependent_init] is the initialisation of
openai/pixel-cnn (``init=True`` pass in ``pixel_cnn_pp/nn.py``): one batch goes through the
model and every weight-normed layer, in the order it is first called, sets ``g`` and the bias
``b`` so that its output has zero mean and variance ``init_scale**2`` per channel over that
batch. Layers after it already see the initialised outputs of the layers before it, exactly as
in the single TensorFlow init pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize

__all__ = ["apply_weight_norm", "data_dependent_init", "is_weight_normed", "share_parametrized_classes"]

_WeightNorm = getattr(parametrizations, "_WeightNorm", None)


def _is_weight_norm(p: nn.Module) -> bool:
    if _WeightNorm is not None:
        return isinstance(p, _WeightNorm)
    return type(p).__name__ == "_WeightNorm"  # pragma: no cover  (older/newer torch layouts)


def apply_weight_norm(module: nn.Module, init_scale: float = 1.0) -> nn.Module:
    """Weight-normalise ``module.weight`` in place and return ``module``.

    Args:
        module: An ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` or ``nn.Linear``.
        init_scale: Target standard deviation of the layer's outputs for
            [`data_dependent_init`][discretelik.nn.weight_norm.data_dependent_init] (openai
            uses 0.1 for the last convolution of each gated residual block so that the residual
            branches start small). It also scales the default initialisation (``g`` is multiplied by
            it) so that a model used without data-dependent init starts the same way.

    Returns:
        The same module, with ``g`` of shape ``(out, 1, ...)`` (``(1, out, 1, ...)`` for a
        transposed convolution) and ``v`` of the weight's shape.

    Raises:
        TypeError: ``module`` is not one of the layer types above.
        ValueError: ``module.weight`` is already parametrized.
    """
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        dim = 1  # transposed-conv weight is (in, out, *kernel): the output units are dim 1
    elif isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        dim = 0
    else:
        raise TypeError(
            f"module must be a convolution, transposed convolution or Linear layer, got "
            f"{type(module).__name__}"
        )
    if parametrize.is_parametrized(module, "weight"):
        raise ValueError(f"module.weight of {type(module).__name__} is already parametrized")
    parametrizations.weight_norm(module, name="weight", dim=dim)
    module.init_scale = float(init_scale)  # read by data_dependent_init
    if init_scale != 1.0:
        with torch.no_grad():
            module.parametrizations.weight.original0.mul_(init_scale)
    return module


def is_weight_normed(module: nn.Module) -> bool:
    """Whether ``module.weight`` is parametrized by weight normalisation alone."""
    if not parametrize.is_parametrized(module, "weight"):
        return False
    plist = module.parametrizations.weight
    return len(plist) == 1 and _is_weight_norm(plist[0])


def share_parametrized_classes(model: nn.Module) -> int:
    """Give the weight-normed layers of one layer class one class object; returns how many moved.

    ``torch.nn.utils.parametrize`` turns each parametrized module into an instance of a class
    of its own (``ParametrizedConv2d``, created per module, holding the ``weight`` property).
    ``torch.compile`` guards on a module's class, so a block compiled for one instance
    recompiles for every other one: regional compilation would compile each PixelCNN++ layer
    separately. The per-module classes differ only in identity (same base, same property
    functions of the instance), so pointing every such module at the first one's class changes
    nothing else. Do not call ``parametrize.remove_parametrizations`` on a module afterwards:
    it deletes the property from the module's class, which is then shared.
    """
    shared: dict[tuple[type, tuple[str, ...]], type] = {}
    moved = 0
    for module in model.modules():
        cls = type(module)
        if not is_weight_normed(module) or len(cls.__bases__) != 1:
            continue
        if not cls.__name__.startswith("Parametrized"):  # pragma: no cover  (torch layout change)
            continue
        props = tuple(sorted(k for k, v in vars(cls).items() if isinstance(v, property)))
        key = (cls.__bases__[0], props)
        target = shared.setdefault(key, cls)
        if target is not cls:
            module.__class__ = target
            moved += 1
    return moved


def _channel_dim(module: nn.Module, output: Tensor) -> int:
    # Convolutions put channels second (B, C, ...); Linear puts them last (..., C).
    return -1 if isinstance(module, nn.Linear) else 1


@torch.no_grad()
def data_dependent_init(
    model: nn.Module, x: Tensor, cond: Any = None, eps: float = 1e-8
) -> int:
    """Initialise every weight-normed layer of ``model`` from one batch (PixelCNN++ style).

    Each weight-normed layer (see
    [`is_weight_normed`][discretelik.nn.weight_norm.is_weight_normed]) is initialised the first
    time it is called during one forward pass of ``model``: with ``g = 1`` and ``b = 0`` it
    computes ``t = conv(input, v / ||v||)``; then per output channel
    ``g = init_scale / sqrt(var(t) + eps)`` and ``b = -mean(t) * g`` (mean and variance over
    the batch and spatial positions), and the layer passes on ``g * t + b`` so that later layers
    are initialised on already-normalised inputs. ``v`` keeps its (random) direction.

    The model's mode is left as it is: openai runs the init pass with dropout on (train mode);
    call ``model.eval()`` first for an init that does not depend on dropout draws.

    Args:
        model: Any module tree; layers that are not weight-normed are left untouched.
        x: The batch ``model`` takes as first argument, e.g. float ``(B, C, H, W)`` for a
            backbone or integer levels for an
            [`AutoregressiveModel`][discretelik.AutoregressiveModel]. Use a batch large enough
            for stable statistics (openai: 16 images per GPU at 32x32).
        cond: Optional second argument of ``model`` (e.g. class labels ``(B,)`` int64).
        eps: Added to the variance before the square root.

    Returns:
        The number of layers that were initialised (layers that ``model`` never calls on this
        input are not).

    Example:
        >>> net = discretelik.create_backbone("pixelcnn++", preset="tiny")
        >>> data_dependent_init(net, torch.rand(16, 3, 32, 32) * 2 - 1)
        56
    """
    done: set[int] = set()
    handles = []

    def pre_hook(module: nn.Module, args: Any) -> None:
        if id(module) in done:
            return
        module.parametrizations.weight.original0.fill_(1.0)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()

    def post_hook(module: nn.Module, args: Any, output: Tensor) -> Tensor | None:
        if id(module) in done:
            return None
        done.add(id(module))
        ch = _channel_dim(module, output)
        n_ch = output.shape[ch]
        t = output.movedim(ch, -1).reshape(-1, n_ch)  # (N, C), N = batch x positions
        mean = t.mean(0)
        var = t.var(0, unbiased=False)  # population variance, as tf.nn.moments
        scale = getattr(module, "init_scale", 1.0) / torch.sqrt(var + eps)
        g = module.parametrizations.weight.original0
        g.copy_(scale.reshape(g.shape).to(g.dtype))
        shape = [1] * output.dim()
        shape[ch] = n_ch
        if getattr(module, "bias", None) is not None:
            module.bias.copy_((-mean * scale).to(module.bias.dtype))
            return output * scale.view(shape) + module.bias.view(shape)
        return output * scale.view(shape)  # no bias: only the scale can be set

    for module in model.modules():
        if is_weight_normed(module):
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(post_hook))
    try:
        if cond is None:
            model(x)
        else:
            model(x, cond)
    finally:
        for handle in handles:
            handle.remove()
    return len(done)
