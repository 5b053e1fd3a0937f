r"""Writing, registering and checking a plugin head and a plugin backbone.

The head is a discretized Laplace distribution (one location and scale per sub-pixel, channels
independent); the backbone is a three-layer masked-convolution network built from
``discretelik.nn.MaskedConv2d``. Both are registered with the decorators, so ``build`` composes
them with each other and with the built-in components, and the ``discretelik.testing`` checks
run on them. In a separate package you would register them through entry points instead, in
that package's ``pyproject.toml``::

    [project.entry-points."discretelik.heads"]
    laplace = "mypkg.heads:DiscretizedLaplaceHead"

    [project.entry-points."discretelik.backbones"]
    tiny_masked = "mypkg.backbones:TinyMasked"

    python examples/guides/plugins.py           # ~10 s on a CPU
    python examples/guides/plugins.py --tiny    # seconds (CI)

The guide that walks through this file is ``docs/guides/plugins.md``.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import discretelik as dl
from discretelik.data import load_bundled
from discretelik.nn import MaskedConv2d
from discretelik.testing import (
    check_causality,
    check_head_contract,
    check_head_finite,
    check_head_mean,
    check_head_normalization,
    check_sampling_matches_log_prob,
)


# -- a plugin head ------------------------------------------------------------------------------
# --8<-- [start:head]
class DiscretizedLaplace(dl.DiscreteImageDistribution):
    r"""Discretized Laplace: level ``k`` gets the Laplace mass of its bin on ``[-1, 1]``.

    With bin centres $c_k = 2k/(K-1) - 1$, half-width $h = 1/(K-1)$ and Laplace CDF $F$,
    $p(k) = F(c_k + h) - F(c_k - h)$, where the first and last bins reach to $\mp\infty$.

    Args:
        params: float ``batch_shape + (2C, H, W)``: ``C`` locations, then ``C`` log-scales.
        channels: Image channels ``C``.
        bins: Levels ``K``.
        validate_args: As in ``torch.distributions``.
    """

    def __init__(self, params: Tensor, channels: int, bins: int, validate_args: bool | None = None) -> None:
        super().__init__(params, channels, bins, validate_args=validate_args)
        self.loc, log_scale = self.params.split(channels, dim=-3)       # batch + (C, H, W) each
        self.scale = log_scale.clamp(-7.0, 7.0).exp()            # keeps scales and gradients finite

    def param_channels_for(self) -> int:
        return 2 * self.channels

    def _elementwise_log_prob(self, value: Tensor) -> Tensor:
        h = 1.0 / (self.bins - 1)
        centre = value.to(self.loc.dtype) * (2 * h) - 1.0
        u_lo = (centre - h - self.loc) / self.scale
        u_hi = (centre + h - self.loc) / self.scale
        # log F(u) and log(1 - F(u)), each written with the branch that cannot overflow.
        def log_cdf(u: Tensor) -> Tensor:
            return torch.where(u < 0, u.clamp(max=0) - math.log(2), torch.log1p(-0.5 * torch.exp(-u.clamp(min=0))))

        def log_sf(u: Tensor) -> Tensor:
            return torch.where(u > 0, -u.clamp(min=0) - math.log(2), torch.log1p(-0.5 * torch.exp(u.clamp(max=0))))

        # Interior bins: subtract in whichever tail keeps precision (right of loc: survival).
        right = centre - h >= self.loc
        a = torch.where(right, log_sf(u_lo), log_cdf(u_hi))              # larger term
        b = torch.where(right, log_sf(u_hi), log_cdf(u_lo))              # smaller term
        mid = a + torch.log(-torch.expm1((b - a).clamp(max=-1e-12)))
        first, last = value == 0, value == self.bins - 1
        return torch.where(first, log_cdf(u_hi), torch.where(last, log_sf(u_lo), mid))

    def _sample(self, sample_shape: torch.Size, generator: torch.Generator | None) -> Tensor:
        shape = sample_shape + self.loc.shape
        u = torch.rand(shape, generator=generator, device=self.loc.device, dtype=self.loc.dtype) - 0.5
        y = self.loc - self.scale * u.sign() * torch.log1p(-2 * u.abs())  # inverse Laplace CDF
        # Rounding to the nearest centre, then clamping, is exactly the binning above.
        return ((y + 1) * (self.bins - 1) / 2).round().clamp(0, self.bins - 1).long()

    @property
    def mean(self) -> Tensor:
        """Expected level (float, in ``[0, bins - 1]``), summed over all levels."""
        levels = torch.arange(self.bins, device=self.loc.device)
        value = levels.view(-1, *([1] * self.loc.dim())).expand(-1, *self.loc.shape)
        p = self._elementwise_log_prob(value).exp()
        return (p * levels.view(-1, *([1] * self.loc.dim()))).sum(0)


@dl.register_head("laplace")
class DiscretizedLaplaceHead(dl.Head):
    """A head with two parameters (location, log-scale) per sub-pixel."""

    def __init__(self, channels: int = 3, bins: int = 256, in_channels: int | None = None,
                 feature_groups: int = 1) -> None:
        super().__init__(channels, bins, in_channels, feature_groups)
        self._make_projection()   # the 1x1 features -> parameters convolution

    @property
    def param_channels(self) -> int:
        return 2 * self.channels

    def distribution(self, params: Tensor, validate_args: bool | None = None) -> DiscretizedLaplace:
        return DiscretizedLaplace(params, self.channels, self.bins, validate_args=validate_args)
# --8<-- [end:head]


# -- a plugin backbone --------------------------------------------------------------------------
# --8<-- [start:backbone]
@dataclass
class TinyMaskedConfig:
    in_channels: int = 3     # image channels C (build() sets it)
    width: int = 32          # hidden and output feature channels
    layers: int = 3          # one type-A layer, then type-B layers
    kernel_size: int = 5


@dl.register_backbone("tiny_masked", config=TinyMaskedConfig,
                      presets={"tiny": {"width": 16, "layers": 2, "kernel_size": 3}})
class TinyMasked(dl.Backbone):
    """A plain stack of masked convolutions (PixelCNN without gates or residuals)."""

    def __init__(self, config: TinyMaskedConfig) -> None:
        super().__init__()
        self.in_channels, self.out_channels = config.in_channels, config.width
        k = config.kernel_size
        layers: list[nn.Module] = [MaskedConv2d(config.in_channels, config.width, k, "A")]
        for _ in range(config.layers - 1):
            layers += [nn.ReLU(), MaskedConv2d(config.width, config.width, k, "B")]
        self.net = nn.Sequential(*layers, nn.ReLU())

    def forward(self, x: Tensor, cond: dl.Conditioning = None) -> Tensor:
        self.check_input(x)
        self.split_cond(cond, x.shape[0])   # rejects conditioning: this backbone takes none
        return self.net(x)
# --8<-- [end:backbone]


# -- using and checking them --------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", default=bool(os.environ.get("DISCRETELIK_TINY")),
                   help="tiny sizes for CI (also set by the DISCRETELIK_TINY env var)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    steps = args.steps or (3 if args.tiny else 200)
    size = 8 if args.tiny else 16
    print("heads:", dl.list_heads())
    print("backbones:", dl.list_backbones())

    # --8<-- [start:checks]
    # The contract checks a plugin should pass, from discretelik.testing. The head checks
    # enumerate all bins**C values of a pixel, so they run at a small bit depth.
    head = dl.create_head("laplace", channels=3, bins=8, in_channels=4)
    for check in (check_head_contract, check_head_normalization, check_head_mean,
                  check_head_finite, check_sampling_matches_log_prob):
        check(head)
    print("head checks: ok")
    torch.manual_seed(args.seed)
    check_causality(dl.build("tiny_masked", "laplace", preset="tiny"), (3, 5, 5))
    check_causality(dl.create_backbone("tiny_masked", preset="tiny", in_channels=1), (1, 4, 4))
    print("causality: ok")
    # --8<-- [end:checks]

    x_train, _ = load_bundled("cifar10", "train")
    x_test, _ = load_bundled("cifar10", "test")
    x_train, x_test = x_train[..., :size, :size], x_test[:64, :, :size, :size]
    results = {}
    # Any head on the plugin backbone, the plugin head on any backbone.
    for backbone, head in [("tiny_masked", "laplace"), ("tiny_masked", "dlm"), ("pixelcnn", "laplace")]:
        torch.manual_seed(args.seed)
        model = dl.build(backbone, head, preset="tiny")
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(steps):
            loss = model.bits_per_dim(x_train[torch.randint(0, len(x_train), (16,))]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            bpd = float(model.eval().bits_per_dim(x_test).mean())
        results[f"{backbone}+{head}"] = bpd
        print(f"{backbone:>12} + {head:<8} test bits/dim after {steps} steps: {bpd:.3f}")
    return results


if __name__ == "__main__":
    main()
