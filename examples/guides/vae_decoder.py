"""A discretized logistic mixture as the decoder likelihood of a VAE, on bundled CIFAR-10.

The head is used on its own, with no autoregressive backbone: a small convolutional decoder
maps the latent ``z`` to features ``(B, F, H, W)`` and ``DiscretizedLogisticMixture`` turns
them into a distribution over 8-bit images. ``-log p(x | z)`` is then an exact discrete
likelihood, so the negative ELBO is an upper bound on bits/dim that can be compared with
autoregressive models.

    python examples/guides/vae_decoder.py           # ~2 minutes on a CPU
    python examples/guides/vae_decoder.py --tiny    # seconds (CI)

The guide that walks through this file is ``docs/guides/vae_decoder.md``.
"""

from __future__ import annotations

import argparse
import math
import os

import torch
from torch import Tensor, nn

from discretelik import DiscretizedLogisticMixture
from discretelik.data import load_bundled
from discretelik.train import save_image_grid


# --8<-- [start:model]
class Encoder(nn.Module):
    """uint8 images (B, 3, 32, 32) -> mean and log-variance of q(z | x), each (B, D, 8, 8)."""

    def __init__(self, width: int, latent: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 4, stride=2, padding=1), nn.SiLU(),       # 32 -> 16
            nn.Conv2d(width, width, 4, stride=2, padding=1), nn.SiLU(),   # 16 -> 8
            nn.Conv2d(width, 2 * latent, 3, padding=1),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.net(x.float() / 127.5 - 1.0).chunk(2, dim=1)
        return mu, logvar.clamp(-10, 10)


class Decoder(nn.Module):
    """Latents (B, D, 8, 8) -> features (B, F, 32, 32) for the likelihood head."""

    def __init__(self, width: int, latent: int, features: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(latent, width, 3, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.SiLU(),   # 8 -> 16
            nn.ConvTranspose2d(width, features, 4, stride=2, padding=1), nn.SiLU(),  # 16 -> 32
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class VAE(nn.Module):
    def __init__(self, width: int = 64, latent: int = 8, features: int = 64, mixtures: int = 5) -> None:
        super().__init__()
        self.latent = latent
        self.encoder = Encoder(width, latent)
        self.decoder = Decoder(width, latent, features)
        # The whole likelihood, edge bins and R -> G -> B coupling included, lives in the head.
        self.head = DiscretizedLogisticMixture(channels=3, mixtures=mixtures, in_channels=features)

    def neg_elbo_bpd(self, x: Tensor) -> Tensor:
        """Negative ELBO in bits per sub-pixel, float32 (B,): an upper bound on -log2 p(x)/dims."""
        mu, logvar = self.encoder(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()     # reparameterisation
        rec = self.head(self.decoder(z)).log_prob(x)              # (B,) nats, exact discrete
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))
        return (kl - rec) / (math.log(2.0) * x[0].numel())

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """int64 images (n, 3, 32, 32) drawn from p(z) p(x | z)."""
        z = torch.randn(n, self.latent, 8, 8, generator=generator)
        return self.head(self.decoder(z)).sample(generator=generator)
# --8<-- [end:model]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", default=bool(os.environ.get("DISCRETELIK_TINY")),
                   help="tiny sizes for CI (also set by the DISCRETELIK_TINY env var)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the samples as a PNG grid here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    steps = args.steps or (3 if args.tiny else 400)
    batch = 8 if args.tiny else 32
    width = 16 if args.tiny else 64
    x_train, _ = load_bundled("cifar10", "train")   # uint8 (1000, 3, 32, 32)
    x_test, _ = load_bundled("cifar10", "test")     # uint8 (250, 3, 32, 32)
    if args.tiny:
        x_test = x_test[:16]

    vae = VAE(width=width, features=width)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)

    @torch.no_grad()
    def test_bound() -> float:
        vae.eval()
        bound = torch.cat([vae.neg_elbo_bpd(xb) for xb in x_test.split(50)]).mean()
        vae.train()
        return float(bound)

    print(f"test negative ELBO before training: {test_bound():.3f} bits/dim")
    for step in range(1, steps + 1):
        loss = vae.neg_elbo_bpd(x_train[torch.randint(0, len(x_train), (batch,))]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, steps // 5) == 0 or step == steps:
            print(f"step {step:4d}  train negative ELBO {loss.item():.3f} bits/dim")
    bound = test_bound()
    print(f"test negative ELBO after {steps} steps: {bound:.3f} bits/dim")

    samples = vae.sample(4, generator=torch.Generator().manual_seed(0))
    print(f"samples: shape {tuple(samples.shape)}, dtype {samples.dtype}")
    if args.out:
        print(f"wrote {save_image_grid(args.out, samples)}")
    return {"test_bound": bound}


if __name__ == "__main__":
    main()
