"""Row LSTM vs Diagonal BiLSTM vs PixelCNN: test bits/dim after the same short CPU budget.

Every backbone gets the same width and depth (``hidden_channels``, ``n_layers``,
``out_channels`` on top of its ``"tiny"`` preset), the same head, seed, batches, optimiser and
number of steps on the bundled 1,000-image training subset; bits/dim is then measured on all
250 bundled test images (8-bit levels, 256 bins).

    python examples/pixelrnn_compare.py                       # MNIST, softmax, ~10 min on 1 core
    python examples/pixelrnn_compare.py --head dlm --dataset cifar10
    python examples/pixelrnn_compare.py --tiny                # seconds

A short budget says how fast each model learns at the start, not where it ends; the paper's
ordering (Diagonal BiLSTM < Row LSTM < PixelCNN in bits/dim) comes from long runs of much
larger models.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import discretelik as dl
from discretelik.data import load_bundled

BACKBONES = ("row_lstm", "diagonal_bilstm", "pixelcnn")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a few steps on 8x8 crops (smoke test)")
    p.add_argument("--dataset", default="mnist", choices=("mnist", "cifar10"))
    p.add_argument("--head", default="softmax")
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    p.add_argument("--hidden", type=int, default=24, help="hidden_channels of every backbone")
    p.add_argument("--layers", type=int, default=4, help="n_layers of every backbone")
    p.add_argument("--out", type=int, default=96, help="out_channels of every backbone")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


@torch.no_grad()
def test_bits_per_dim(model: dl.AutoregressiveModel, x: torch.Tensor, batch: int = 50) -> float:
    model.eval()
    total = sum(model.bits_per_dim(x[i : i + batch]).sum().item() for i in range(0, len(x), batch))
    model.train()
    return total / len(x)


def run(name: str, args: argparse.Namespace, x_train: torch.Tensor, x_test: torch.Tensor) -> dict:
    torch.manual_seed(args.seed)
    size = dict(hidden_channels=args.hidden, n_layers=args.layers, out_channels=args.out)
    model = dl.build(name, args.head, channels=x_train.shape[1], preset="tiny", **size)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    order = torch.Generator().manual_seed(args.seed)  # the same batches for every backbone
    start = time.perf_counter()
    for _ in range(args.steps):
        xb = x_train[torch.randint(0, len(x_train), (args.batch,), generator=order)]
        opt.zero_grad()
        model.bits_per_dim(xb).mean().backward()
        opt.step()
    wall = time.perf_counter() - start
    return {
        "backbone": name,
        "params": sum(p.numel() for p in model.parameters()),
        "groups": model.backbone.channel_groups,
        "wall": wall,
        "test": test_bits_per_dim(model, x_test),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    x_train, _ = load_bundled(args.dataset, "train")
    x_test, _ = load_bundled(args.dataset, "test")
    x_train, x_test = x_train.long(), x_test.long()
    if args.tiny:
        args.steps, args.hidden, args.layers, args.out = 3, 6, 1, 12
        x_train, x_test = x_train[:32, :, 10:18, 10:18], x_test[:8, :, 10:18, 10:18]
    missing = [b for b in args.backbones if b not in dl.list_backbones()]
    if missing:
        print(f"not registered (skipped): {missing}")
    print(
        f"{args.dataset} {tuple(x_train.shape[1:])}, head {args.head}, {args.steps} steps x "
        f"batch {args.batch}, Adam lr {args.lr}, hidden {args.hidden}, layers {args.layers}, "
        f"out {args.out}, seed {args.seed}, torch {torch.__version__}, {args.threads} thread(s), "
        f"{platform.processor() or platform.machine()}"
    )
    print("| backbone | params | channel groups | train wall (s) | s/step | test bits/dim |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in args.backbones:
        if name in missing:
            continue
        r = run(name, args, x_train, x_test)
        print(
            f"| {r['backbone']} | {r['params']:,} | {r['groups']} | {r['wall']:.1f} | "
            f"{r['wall'] / args.steps:.3f} | {r['test']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
