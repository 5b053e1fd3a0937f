"""Shared inputs for the mixture heads' backend tests (lean, Triton, the contract suite).

``case`` draws moderate raw parameters and levels with both edge bins, ``extreme_case`` raw
parameters up to ``+-1e4`` at edge and near-edge levels, ``LargestOutput`` records the size of
every tensor an aten operation returns (for the memory tests).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from discretelik.heads.mixture.layout import MixtureLayout

__all__ = ["EXTREMES", "LargestOutput", "_LargestOutput", "case", "extreme_case"]

EXTREMES = torch.tensor([-1e4, -1e3, -30.0, -7.5, -1.0, 0.0, 0.5, 7.0, 30.0, 1e3, 1e4])


def extreme_case(channels: int, mixtures: int, bins: int, coupling: bool, n: int):
    """``3 n`` images of 1x2 pixels: ``n`` with raw parameters drawn from ``EXTREMES``, ``n``
    uniform in ``[-1e4, 1e4]`` and ``n`` typical (``N(0, 4)``), at levels ``0, 1, bins // 2,
    bins - 2, bins - 1``; seeded by ``bins`` and ``channels``. Returns ``(params, x)``."""
    p = MixtureLayout(channels, mixtures, coupling).param_channels
    gen = torch.Generator().manual_seed(10 * bins + channels)
    pick = EXTREMES[torch.randint(0, len(EXTREMES), (n, p, 1, 2), generator=gen)]
    uniform = (torch.rand(n, p, 1, 2, generator=gen) * 2 - 1) * 1e4
    typical = torch.randn(n, p, 1, 2, generator=gen) * 2
    params = torch.cat([pick, uniform, typical])
    levels = torch.tensor([0, 1, bins // 2, bins - 2, bins - 1]).clamp(0, bins - 1)
    x = levels[torch.randint(0, 5, (3 * n, channels, 1, 2), generator=gen)]
    return params, x


def case(
    seed, channels, mixtures, bins, coupling, batch=(2,), sample=(), hw=(2, 3), dtype=torch.float64
):
    """Moderate random raw parameters (some log-scales below the clamp) and levels with edges.

    Returns ``(params, x, weights)``: ``params`` ``batch + (P, H, W)``, ``x``
    ``sample + batch + (C, H, W)`` with levels ``0`` and ``bins - 1`` present, and ``weights``
    of ``x``'s shape in ``[0.5, 1.5)`` (a generic upstream gradient).
    """
    gen = torch.Generator().manual_seed(seed)
    p = MixtureLayout(channels, mixtures, coupling).param_channels
    params = torch.randn(*batch, p, *hw, generator=gen, dtype=dtype) * 1.5
    x = torch.randint(0, bins, (*sample, *batch, channels, *hw), generator=gen)
    flat = x.view(-1, *hw)
    flat[0, 0, 0], flat[-1, -1, -1] = 0, bins - 1  # both open edge bins
    weights = torch.rand(x.shape, generator=gen, dtype=dtype) + 0.5  # a generic upstream grad
    return params, x, weights


class LargestOutput(TorchDispatchMode):
    """Records the element count of every tensor that an aten operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.sizes.append((str(func), t.numel()))
        return out


_LargestOutput = LargestOutput  # the name the older test modules imported
