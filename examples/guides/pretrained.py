"""Use a trained model: load PixelCNN++ weights of pclucas14/pixel-cnn-pp, score and sample.

    python examples/guides/pretrained.py --weights PORT_FILE.pth   # the port's CIFAR-10 model
    python examples/guides/pretrained.py --tiny                     # what CI runs (no file)

``--weights`` takes a state dict saved by the port (``torch.save(model.state_dict(), ...)``,
e.g. its published CIFAR-10 model: nr_resnet 5, nr_filters 160, nr_logistic_mix 10, the
defaults here). Without a file, ``--tiny`` loads a random stand-in with the port's names and
shapes at a tiny size: it shows the calls, not a trained model's figures.

The guide that walks through this file is ``docs/guides/pretrained.md``.
"""

from __future__ import annotations

import argparse
import os

import torch

import discretelik as dl
from discretelik.data import load_bundled
from discretelik.train import save_image_grid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", default=bool(os.environ.get("DISCRETELIK_TINY")),
                   help="tiny stand-in weights and 8x8 crops, for CI (also DISCRETELIK_TINY)")
    p.add_argument("--weights", default=None, help="the port's state dict file (.pth)")
    p.add_argument("--nr-resnet", type=int, default=5)
    p.add_argument("--nr-filters", type=int, default=160)
    p.add_argument("--nr-logistic-mix", type=int, default=10)
    p.add_argument("--n-test", type=int, default=None,
                   help="bundled CIFAR-10 test images to score (default: 250, tiny: 16)")
    p.add_argument("--samples", type=int, default=None,
                   help="images to draw (default: 0, tiny: 2; 32x32 at the paper size is slow "
                        "on a CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the samples as a PNG grid here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    torch.manual_seed(0)
    if args.weights is None and not args.tiny:
        raise SystemExit("pass --weights PORT_FILE.pth (the port's state dict) or --tiny")
    sizes = {"nr_resnet": args.nr_resnet, "nr_filters": args.nr_filters,
             "nr_logistic_mix": args.nr_logistic_mix}
    if args.weights is not None:
        state_dict = args.weights  # a path: read with torch.load(weights_only=True)
    else:
        # A random stand-in in the port's format (its names and shapes), tiny.
        sizes = {"nr_resnet": 1, "nr_filters": 8, "nr_logistic_mix": 2}
        shapes = dl.port_pixelcnn_pp_shapes(**sizes)
        state_dict = {name: torch.randn(shape) * 0.1 for name, shape in shapes.items()}

    # The port's weights into our PixelCNN++ (eval mode, on the chosen device).
    model = dl.load_port_pixelcnn_pp(state_dict, map_location=args.device, **sizes)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"loaded the port's weights into pixelcnn++ + dlm: {n_params:,} parameters")

    # Score: exact bits/dim of the bundled CIFAR-10 test subset (uint8 levels, no scaling).
    size = 8 if args.tiny else 32
    n_test = args.n_test if args.n_test is not None else (16 if args.tiny else 250)
    x_test, _ = load_bundled("cifar10", "test")
    x_test = x_test[:n_test, :, :size, :size].to(args.device)
    with torch.no_grad():
        bpd = torch.cat([model.bits_per_dim(xb) for xb in x_test.split(16)]).mean().item()
    print(f"bits/dim on {len(x_test)} bundled test images ({size}x{size}): {bpd:.4f}")

    # Sample: raster order with the PixelCNN++ activation cache.
    n_samples = args.samples if args.samples is not None else (2 if args.tiny else 0)
    if n_samples:
        gen = torch.Generator(device=args.device).manual_seed(0)
        samples = model.sample(n_samples, (3, size, size), generator=gen)
        print(f"samples: shape {tuple(samples.shape)}, dtype {samples.dtype}")
        if args.out:
            print(f"wrote {save_image_grid(args.out, samples.cpu())}")
    return {"bits_per_dim": bpd}


if __name__ == "__main__":
    main()
