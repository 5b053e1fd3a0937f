"""Causality and receptive-field checks for backbones and composed models.

Plugin authors call these on their own backbones; the test suite calls them for every
registered backbone x head. Both work in float64 on a copy of the network in eval mode, so
dropout is off and round-off cannot hide or fake a dependency.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..backbones.base import Backbone, Conditioning

__all__ = ["check_causality", "dependency_map", "receptive_field"]


def _as_function(
    net: nn.Module, cond: Conditioning
) -> tuple[Callable[[Tensor], Tensor], int, int]:
    """Return ``(f, channels, groups)`` with ``f`` mapping float64 images to float64 outputs."""
    from ..model import AutoregressiveModel

    net64 = copy.deepcopy(net).double().eval()
    # The inputs are drawn on the CPU (reproducible for a seed); run them where the network is
    # and bring the outputs back, so a network on a GPU can be checked as it is.
    param = next(net64.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")

    def cast(c: Conditioning) -> Conditioning:
        if isinstance(c, Tensor) and c.is_floating_point():
            return c.double()
        if isinstance(c, Mapping):
            return {k: cast(v) for k, v in c.items()}  # type: ignore[misc]
        return c

    cond64 = cast(cond)

    def repeat(c: Conditioning, n: int) -> Conditioning:
        if isinstance(c, Tensor):
            reps = [n // c.shape[0]] + [1] * (c.dim() - 1)
            return c.repeat(*reps)
        if isinstance(c, Mapping):
            return {k: repeat(v, n) for k, v in c.items()}  # type: ignore[misc]
        return c

    if isinstance(net64, AutoregressiveModel):
        backbone: Backbone = net64.backbone

        def f(x: Tensor) -> Tensor:
            out = net64.head.params(backbone(x.to(device), repeat(cond64, x.shape[0])))
            return out.cpu()

    elif isinstance(net64, Backbone):
        backbone = net64

        def f(x: Tensor) -> Tensor:
            return backbone(x.to(device), repeat(cond64, x.shape[0])).cpu()

    else:
        raise TypeError(
            f"net must be an AutoregressiveModel or a Backbone, got {type(net).__name__}"
        )
    return f, backbone.in_channels, backbone.channel_groups


@torch.no_grad()
def dependency_map(
    net: nn.Module,
    image_shape: tuple[int, int, int],
    position: tuple[int, int],
    channel: int | None = None,
    cond: Conditioning = None,
    seed: int = 0,
    atol: float = 1e-10,
) -> Tensor:
    """Which outputs change when the input at ``position`` changes.

    Args:
        net: A backbone or an [`AutoregressiveModel`][discretelik.AutoregressiveModel] (then the
            outputs are the head's raw parameters).
        image_shape: ``(C, H, W)``.
        position: Input pixel ``(i, j)`` to perturb.
        channel: Perturb only this input channel (``None``: every channel of the pixel).
        cond: Conditioning for a single image (batch 1), if the network needs it.
        seed: Seed for the random base image and perturbation.
        atol: Absolute change (float64) above which an output counts as changed.

    Returns:
        bool ``(P, H, W)``: output channel ``p`` at pixel ``(h, w)`` changed.
    """
    f, _, _ = _as_function(net, cond)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((1, *image_shape), generator=gen, dtype=torch.float64) * 2 - 1
    x2 = x.clone()
    i, j = position
    chans = slice(None) if channel is None else slice(channel, channel + 1)
    x2[0, chans, i, j] = torch.rand(x2[0, chans, i, j].shape, generator=gen, dtype=torch.float64) * 2 - 1
    return ((f(x2) - f(x)).abs() > atol)[0]


@torch.no_grad()
def check_causality(
    net: nn.Module,
    image_shape: tuple[int, int, int],
    positions: Iterable[tuple[int, int]] | None = None,
    cond: Conditioning = None,
    seed: int = 0,
    atol: float = 1e-10,
    batch: int = 64,
) -> None:
    """Assert the autoregressive contract of a backbone or model.

    For every input pixel ``q`` in ``positions`` (default: all) and every input channel ``c``,
    changing ``x[c, q]`` must not change any output at a pixel before ``q`` in raster order, and
    at ``q`` itself it may change only output block ``o > c`` when the backbone has ordered
    channel groups (``channel_groups == C``; the outputs then split into ``C`` contiguous
    blocks), and nothing at all when ``channel_groups == 1``.

    Args:
        net: A [`Backbone`][discretelik.Backbone] or an
            [`AutoregressiveModel`][discretelik.AutoregressiveModel].
        image_shape: ``(C, H, W)`` to test at.
        positions: Input pixels to perturb; default every pixel.
        cond: Conditioning for one image (batch 1), if the network needs it.
        seed: Seed of the random base image and perturbations.
        atol: float64 change treated as a dependency.
        batch: Perturbed images per forward pass.

    Raises:
        AssertionError: Naming the perturbed pixel and channel and the first leaking output.
    """
    f, channels, groups = _as_function(net, cond)
    c_img, height, width = image_shape
    if c_img != channels:
        raise ValueError(f"image_shape must have {channels} channels, got {image_shape}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((1, *image_shape), generator=gen, dtype=torch.float64) * 2 - 1
    base = f(x)
    n_out = base.shape[1]
    if groups > 1 and n_out % groups:
        raise ValueError(f"{n_out} output channels do not split into {groups} groups")
    out_block = torch.arange(n_out) // (n_out // groups)
    pos = list(positions) if positions is not None else [(i, j) for i in range(height) for j in range(width)]
    cases = [(i, j, c) for (i, j) in pos for c in range(channels)]
    raster = torch.arange(height * width).view(height, width)
    for start in range(0, len(cases), batch):
        chunk = cases[start : start + batch]
        xs = x.repeat(len(chunk), 1, 1, 1)
        for k, (i, j, c) in enumerate(chunk):
            # A large, sure change: push the value to the other side of [-1, 1].
            xs[k, c, i, j] = -x[0, c, i, j] + (0.5 if x[0, c, i, j] <= 0 else -0.5)
        changed = (f(xs) - base).abs() > atol  # (n, P, H, W)
        for k, (i, j, c) in enumerate(chunk):
            q = i * width + j
            before = changed[k][:, raster < q]
            if bool(before.any()):
                p_chan, p_idx = before.nonzero()[0].tolist()
                p = (raster < q).nonzero()[p_idx].tolist()
                raise AssertionError(
                    f"causality violated: changing input channel {c} at pixel {(i, j)} changed "
                    f"output channel {p_chan} at earlier pixel {tuple(p)}"
                )
            at_q = changed[k][:, i, j]
            allowed = (out_block > c) if groups > 1 else torch.zeros(n_out, dtype=torch.bool)
            leak = at_q & ~allowed
            if bool(leak.any()):
                raise AssertionError(
                    f"causality violated: changing input channel {c} at pixel {(i, j)} changed "
                    f"output channel {int(leak.nonzero()[0])} at the same pixel "
                    f"(channel_groups={groups}; allowed only output blocks > {c})"
                )


def receptive_field(
    net: nn.Module,
    image_shape: tuple[int, int, int],
    position: tuple[int, int],
    cond: Conditioning = None,
    seed: int = 0,
) -> Tensor:
    """Input pixels that influence the outputs at ``position`` (gradient-based, float64).

    Args:
        net: A backbone or an [`AutoregressiveModel`][discretelik.AutoregressiveModel].
        image_shape: ``(C, H, W)``.
        position: Output pixel ``(i, j)``.
        cond: Conditioning for one image, if needed.
        seed: Seed for the random input.

    Returns:
        bool ``(H, W)``: ``True`` where some input channel has a non-zero gradient.
    """
    f, _, _ = _as_function(net, cond)
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand((1, *image_shape), generator=gen, dtype=torch.float64) * 2 - 1).requires_grad_()
    with torch.enable_grad():
        out = f(x)[0, :, position[0], position[1]]
        # A random projection avoids cancellations that a plain sum could produce.
        w = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        (grad,) = torch.autograd.grad((out * w).sum(), x)
    return grad[0].abs().sum(0) > 0
