"""Compare the heads on one backbone: bits/dim on the bundled CIFAR-10 test split and step time.

Every head gets the same small PixelCNN, the same seed, data order, optimiser and number of
steps on the bundled 1,000-image training subset; the test bits/dim is measured on all 250
bundled test images. The script prints a markdown table (the one in
``docs/guides/choosing_a_head.md`` was produced by it; the command is given there).

    python examples/guides/choosing_a_head.py                  # a few minutes per head on a CPU
    python examples/guides/choosing_a_head.py --bits 8 5       # also at 5-bit depth (32 bins)
    python examples/guides/choosing_a_head.py --tiny           # seconds (CI)

The figures from a short CPU budget say how fast each head learns at the start, not where
it ends: a long run can order the heads differently.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

import discretelik as dl
from discretelik.data import load_bundled

# ``name`` or ``name:option=value,...`` (head options, e.g. the number of mixture components).
HEADS = ("softmax", "dlm", "dlm:coupling=False", "gaussian", "gaussian:mixtures=10")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", default=bool(os.environ.get("DISCRETELIK_TINY")),
                   help="tiny sizes for CI (also set by the DISCRETELIK_TINY env var)")
    p.add_argument("--heads", nargs="+", default=list(HEADS),
                   help="heads to compare, as name or name:option=value,...")
    p.add_argument("--bits", nargs="+", type=int, default=[8], help="bit depths to compare")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def reduce_depth(x: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 levels 0..255 -> int64 levels 0..2**bits - 1 (drop the low bits)."""
    return (x.long() >> (8 - bits)) if bits < 8 else x.long()


def parse_head(spec: str) -> tuple[str, dict]:
    """``"dlm:mixtures=5,coupling=False"`` -> ``("dlm", {"mixtures": 5, "coupling": False})``."""
    name, _, opts = spec.partition(":")
    kwargs = {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        kwargs[key] = {"True": True, "False": False}[value] if value in ("True", "False") else int(value)
    return name, kwargs


def run(spec: str, bits: int, x_train: torch.Tensor, x_test: torch.Tensor, steps: int,
        batch: int, seed: int, tiny: bool) -> dict[str, float | str | int]:
    torch.manual_seed(seed)
    size = {} if tiny else dict(hidden_channels=24, n_layers=4, out_channels=96)
    head, head_kwargs = parse_head(spec)
    model = dl.build("pixelcnn", head, bins=2 ** bits, preset="tiny", head_kwargs=head_kwargs, **size)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    order = torch.Generator().manual_seed(seed)        # the same batches for every head
    xtr, xte = reduce_depth(x_train, bits), reduce_depth(x_test, bits)
    times = []
    for step in range(steps):
        xb = xtr[torch.randint(0, len(xtr), (batch,), generator=order)]
        t0 = time.perf_counter()
        loss = model.bits_per_dim(xb).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        bpd = float(torch.cat([model.bits_per_dim(xb) for xb in xte.split(50)]).mean())
    # The median step skips the first (warm-up) steps and other users' load spikes.
    step_ms = 1e3 * sorted(times)[len(times) // 2]
    return {"head": spec, "bits": bits, "bpd": bpd, "step_ms": step_ms,
            "params": sum(p.numel() for p in model.parameters()),
            "groups": model.backbone.channel_groups}


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    steps = args.steps or (2 if args.tiny else 300)
    batch = args.batch or (4 if args.tiny else 32)
    x_train, _ = load_bundled("cifar10", "train")   # uint8 (1000, 3, 32, 32)
    x_test, _ = load_bundled("cifar10", "test")     # uint8 (250, 3, 32, 32)
    if args.tiny:
        x_train, x_test = x_train[:32, :, :8, :8], x_test[:8, :, :8, :8]
    rows = []
    for b in args.bits:
        for h in args.heads:
            rows.append(run(h, b, x_train, x_test, steps, batch, args.seed, args.tiny))
            print(f"{h} at {b} bits: {rows[-1]['bpd']:.3f} bits/dim, {rows[-1]['step_ms']:.0f} ms/step",
                  file=sys.stderr, flush=True)
    print(f"pixelcnn backbone, {steps} steps of batch {batch}, images {tuple(x_train.shape[1:])}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print()
    print("| head | bit depth | test bits/dim | train step (ms) | parameters | channel groups |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| `{r['head']}` | {r['bits']} | {r['bpd']:.3f} | {r['step_ms']:.0f} | "
              f"{r['params']:,} | {r['groups']} |")
    return rows


if __name__ == "__main__":
    main()
