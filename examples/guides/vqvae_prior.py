"""A gated PixelCNN prior over VQ-VAE codes, with class or spatial conditioning.

Stage 1 trains a small VQ-VAE on the bundled MNIST subset: 28x28 digits become 7x7 grids of
codebook indices. Stage 2 fits ``build("gated_pixelcnn", "softmax", channels=1, bins=K)`` to
those grids - a K-way softmax per position, where K is the codebook size - conditioned either on
the digit label (``--cond class``) or on a coarse 4x4 version of the image (``--cond spatial``).
Sampling the prior and decoding gives new digits of the requested class.

    python examples/guides/vqvae_prior.py                   # class conditioning, ~1 min on a CPU
    python examples/guides/vqvae_prior.py --cond spatial
    python examples/guides/vqvae_prior.py --tiny            # seconds (CI)

The guide that walks through this file is ``docs/guides/vqvae_prior.md``.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import discretelik as dl
from discretelik import DiscretizedLogisticMixture
from discretelik.data import load_bundled
from discretelik.train import save_image_grid


# --8<-- [start:vqvae]
class VQVAE(nn.Module):
    """uint8 digits (B, 1, 28, 28) <-> int64 codes (B, 1, 7, 7) in [0, codebook_size)."""

    def __init__(self, codebook_size: int = 32, dim: int = 16, width: int = 64, beta: float = 0.25) -> None:
        super().__init__()
        self.beta = beta
        self.encoder = nn.Sequential(
            nn.Conv2d(1, width, 4, stride=2, padding=1), nn.SiLU(),        # 28 -> 14
            nn.Conv2d(width, width, 4, stride=2, padding=1), nn.SiLU(),    # 14 -> 7
            nn.Conv2d(width, dim, 1),
        )
        self.codebook = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        self.decoder = nn.Sequential(
            nn.Conv2d(dim, width, 3, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.SiLU(),  # 7 -> 14
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.SiLU(),  # 14 -> 28
        )
        # Decoder likelihood over 256 grey levels (an exact discrete likelihood, see guide 2).
        self.head = DiscretizedLogisticMixture(channels=1, mixtures=3, in_channels=width)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return continuous latents (B, D, 7, 7) and their nearest codes (B, 7, 7) int64."""
        z = self.encoder(x.float() / 127.5 - 1.0)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])             # (B*49, D)
        codes = torch.cdist(flat, self.codebook.weight).argmin(dim=1)
        return z, codes.view(z.shape[0], z.shape[2], z.shape[3])

    def decode(self, codes: Tensor) -> dl.DiscreteImageDistribution:
        """Codes (B, 7, 7) int64 -> p(x | codes) over (B, 1, 28, 28)."""
        zq = self.codebook(codes).permute(0, 3, 1, 2)                    # (B, D, 7, 7)
        return self.head(self.decoder(zq))

    def loss(self, x: Tensor) -> Tensor:
        z, codes = self.encode(x)
        zq = self.codebook(codes).permute(0, 3, 1, 2)
        vq = F.mse_loss(zq, z.detach()) + self.beta * F.mse_loss(z, zq.detach())
        zq = z + (zq - z).detach()                                       # straight-through
        nll = -self.head(self.decoder(zq)).log_prob(x) / x[0].numel()    # nats per pixel
        return nll.mean() + vq
# --8<-- [end:vqvae]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", default=bool(os.environ.get("DISCRETELIK_TINY")),
                   help="tiny sizes for CI (also set by the DISCRETELIK_TINY env var)")
    p.add_argument("--cond", choices=("class", "spatial"), default="class")
    p.add_argument("--codebook-size", type=int, default=32)
    p.add_argument("--vq-steps", type=int, default=None)
    p.add_argument("--prior-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the samples as a PNG grid here")
    return p.parse_args(argv)


def spatial_cond(x: Tensor) -> Tensor:
    """A coarse view of the digit: float (B, 1, 4, 4) in [0, 1]."""
    return F.adaptive_avg_pool2d(x.float() / 255.0, 4)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    vq_steps = args.vq_steps or (3 if args.tiny else 300)
    prior_steps = args.prior_steps or (3 if args.tiny else 300)
    batch = 8 if args.tiny else 64
    K = args.codebook_size

    x_train, y_train = load_bundled("mnist", "train")   # uint8 (1000, 1, 28, 28), int64 (1000,)
    x_test, y_test = load_bundled("mnist", "test")      # uint8 (250, 1, 28, 28)
    if args.tiny:
        x_train, y_train, x_test, y_test = x_train[:64], y_train[:64], x_test[:16], y_test[:16]

    # Stage 1: the VQ-VAE.
    vqvae = VQVAE(codebook_size=K, width=16 if args.tiny else 64)
    opt = torch.optim.Adam(vqvae.parameters(), lr=2e-3)
    for step in range(1, vq_steps + 1):
        loss = vqvae.loss(x_train[torch.randint(0, len(x_train), (batch,))])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, vq_steps // 3) == 0 or step == vq_steps:
            print(f"vq-vae step {step:4d}  loss {loss.item():.3f}")
    vqvae.eval()
    with torch.no_grad():
        codes_train = vqvae.encode(x_train)[1][:, None]   # int64 (N, 1, 7, 7), one "channel"
        codes_test = vqvae.encode(x_test)[1][:, None]
    used = codes_train.unique().numel()
    print(f"codes: {tuple(codes_train.shape)}, {used} of {K} codebook entries in use")

    # Stage 2: the prior. channels=1 (one code per position), bins = codebook size.
    # --8<-- [start:prior]
    size = {} if args.tiny else dict(hidden_channels=32, n_layers=5, out_channels=64)
    if args.cond == "class":
        prior = dl.build("gated_pixelcnn", "softmax", channels=1, bins=K, preset="tiny",
                         num_classes=10, **size)
        cond_train, cond_test = y_train, y_test                  # int64 (B,)
    else:
        prior = dl.build("gated_pixelcnn", "softmax", channels=1, bins=K, preset="tiny",
                         cond_channels=1, cond_upsample="bilinear", **size)
        cond_train, cond_test = spatial_cond(x_train), spatial_cond(x_test)  # float (B, 1, 4, 4)
    opt = torch.optim.Adam(prior.parameters(), lr=2e-3)
    for step in range(1, prior_steps + 1):
        idx = torch.randint(0, len(codes_train), (batch,))
        loss = prior.bits_per_dim(codes_train[idx], cond_train[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, prior_steps // 3) == 0 or step == prior_steps:
            print(f"prior step {step:4d}  bits per code {loss.item():.3f}")
    with torch.no_grad():
        prior.eval()
        test_bits = float(prior.bits_per_dim(codes_test, cond_test).mean())
    print(f"prior on test codes: {test_bits:.3f} bits per code (uniform: {torch.log2(torch.tensor(float(K))):.3f})")

    # Sample codes for chosen digits (or coarse layouts) and decode them into images.
    n = 2 if args.tiny else 10
    cond = torch.arange(n) % 10 if args.cond == "class" else cond_test[:n]
    gen = torch.Generator().manual_seed(args.seed)
    codes = prior.sample(n, (7, 7), cond=cond, generator=gen)           # int64 (n, 1, 7, 7)
    with torch.no_grad():
        images = vqvae.decode(codes[:, 0]).sample(generator=gen)        # int64 (n, 1, 28, 28)
    # --8<-- [end:prior]
    print(f"sampled codes {tuple(codes.shape)} -> images {tuple(images.shape)} {images.dtype}")
    if args.out:
        print(f"wrote {save_image_grid(args.out, images)}")
    return {"test_bits_per_code": test_bits}


if __name__ == "__main__":
    main()
