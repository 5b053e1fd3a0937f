"""Quick start: build a model, train it for a few steps, report bits/dim, draw samples.

Runs on a CPU in about a minute at the default sizes; ``--tiny`` (what CI runs) takes seconds.

    python examples/guides/quickstart.py            # PixelCNN++ + logistic mixture, 32x32
    python examples/guides/quickstart.py --tiny     # 8x8 crops, a handful of steps
    python examples/guides/quickstart.py --out samples.png   # also write a PNG grid

The guide that walks through this file is ``docs/guides/quickstart.md``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import discretelik as dl
from discretelik.data import load_bundled
from discretelik.train import save_image_grid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", default=bool(os.environ.get("DISCRETELIK_TINY")),
                   help="tiny sizes for CI (also set by the DISCRETELIK_TINY env var)")
    p.add_argument("--backbone", default="pixelcnn++")
    p.add_argument("--head", default="dlm")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the samples as a PNG grid here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    steps = args.steps or (3 if args.tiny else 150)
    size = 8 if args.tiny else 32  # crop side; 8x8 keeps CI and sampling fast
    batch = 8 if args.tiny else 16

    # 1. Data: the bundled CIFAR-10 subset, uint8 (N, 3, 32, 32). No download needed.
    x_train, _ = load_bundled("cifar10", "train")
    x_test, _ = load_bundled("cifar10", "test")
    x_train, x_test = x_train[..., :size, :size], x_test[..., :size, :size]

    # 2. Model: any registered backbone with any registered head.
    model = dl.build(args.backbone, args.head, preset="tiny")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.backbone} + {args.head}, {n_params:,} parameters")
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    @torch.no_grad()
    def test_bpd() -> float:
        model.eval()
        bpd = torch.cat([model.bits_per_dim(xb) for xb in x_test[:64].split(32)]).mean()
        model.train()
        return float(bpd)

    before = test_bpd()
    print(f"test bits/dim before training: {before:.3f}")

    # 3. Train: the loss is the exact negative log-likelihood in bits per sub-pixel.
    start = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x_train), (batch,))
        loss = model.bits_per_dim(x_train[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, steps // 5) == 0 or step == steps:
            print(f"step {step:4d}  train bits/dim {loss.item():.3f}")
    per_step = (time.perf_counter() - start) / steps

    after = test_bpd()
    print(f"test bits/dim after {steps} steps: {after:.3f}  ({per_step * 1e3:.0f} ms/step)")

    # 4. Sample: raster order, int64 levels in [0, 255], shape (n, 3, H, W).
    hw = 4 if args.tiny else 16
    samples = model.sample(2 if args.tiny else 4, (hw, hw), generator=torch.Generator().manual_seed(0))
    print(f"samples: shape {tuple(samples.shape)}, dtype {samples.dtype}, "
          f"levels {int(samples.min())}..{int(samples.max())}")
    if args.out:
        print(f"wrote {save_image_grid(args.out, samples)}")
    return {"before": before, "after": after, "ms_per_step": per_step * 1e3}


if __name__ == "__main__":
    main()
