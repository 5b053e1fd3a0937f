"""Sampling speed: full recomputation per pixel vs the activation caches of fast sampling.

Ramachandran et al. 2017 ("Fast Generation for Convolutional Autoregressive Models",
https://arxiv.org/abs/1704.06001) cache every layer's activations and compute only what a new
pixel changes; ``discretelik.sample_raster(..., cached=None)`` does that for the gated PixelCNN
and PixelCNN++ backbones (on CUDA replaying the one-pixel step from CUDA graphs),
``cached=False`` runs the whole model once per pixel. For each configuration this script draws
with both (same generator seed) and prints the median wall time of a few repeats and the
speed-up, all measured in this one run. Whether both draw identical images is not a fair test
(rounding near a bin boundary may flip a draw), so it reports instead how far the cached step's
distribution parameters are from the full forward's on the same prefix -- the parameters
each cached step drew from, against one full forward pass over the finished cached sample
(causal, so position ``(i, j)`` sees exactly the prefix the step saw) -- and the bits/dim of
the cached draw under the full model.

* CUDA (default when available): PixelCNN++ in the paper configuration (160 filters, 5 gated
  residual layers per block, 10 logistic mixtures) and the gated PixelCNN "paper" preset,
  16 CIFAR-size (32x32) samples; the cached sampler replays CUDA graphs.
* CPU: small configurations, 4 images of 16x16 (about a minute and a half on one core).

    python examples/benchmarks/sampling.py                  # whatever device there is
    python examples/benchmarks/sampling.py --device cpu --size 8 --repeats 5

``--markdown PATH`` also writes the header and table as a Markdown fragment (see
``_report.py``); ``docs/performance.md`` includes those in ``docs/performance/``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import discretelik as dl

from _report import Run, markdown_table, write_markdown  # this folder, sys.path[0]

# name -> (backbone, backbone kwargs, head kwargs), per device kind.
CONFIGS = {
    "cpu": {
        "pixelcnn++ small (32 filters, 2 resnets)": (
            "pixelcnn++",
            {"nr_filters": 32, "nr_resnet": 2, "dropout": 0.0},
            {"mixtures": 5},
        ),
        "gated small (32 ch, 8 layers)": (
            "gated_pixelcnn",
            {"hidden_channels": 32, "n_layers": 8, "kernel_size": 3, "out_channels": 64},
            {"mixtures": 5},
        ),
    },
    "cuda": {
        "pixelcnn++ paper (160 filters, 5 resnets)": (
            "pixelcnn++",
            {"preset": "paper"},
            {"mixtures": 10},
        ),
        "gated paper (384 ch, 20 layers, 5x5)": (
            "gated_pixelcnn",
            {"preset": "paper"},
            {"mixtures": 10},
        ),
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, help="images per draw (default: 16 on CUDA, 4 on CPU)")
    p.add_argument("--size", type=int, help="image height = width (default: 32 CUDA, 16 CPU)")
    p.add_argument("--repeats", type=int, help="timed draws per sampler (default: 3)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    p.add_argument("--markdown", metavar="PATH", help="also write the results as Markdown here")
    return p.parse_args(argv)


def timed(fn, device: torch.device, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of ``repeats`` calls of ``fn`` and its last result."""
    times = []
    out = None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    run = Run(__file__, argv, device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    torch.set_num_threads(args.threads)
    n = args.n or (16 if kind == "cuda" else 4)
    size = args.size or (32 if kind == "cuda" else 16)
    repeats = args.repeats or 3
    if kind == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.processor() or platform.machine()}, {args.threads} thread(s)"
    print(f"device: {device} ({where}); torch {torch.__version__}")
    sizes = f"{n} images of {size}x{size}x3, 256 levels, DLM head"
    print(f"{sizes}; median of {repeats} draws\n")
    header = (
        f"{'model':44s} {'params':>10s} {'naive s':>9s} {'cached s':>9s} {'speed-up':>9s} "
        f"{'max |d param|':>14s} {'bits/dim':>9s}"
    )
    table = []
    print(header)
    print("-" * len(header))
    for name, (backbone, kwargs, head_kwargs) in CONFIGS[kind].items():
        torch.manual_seed(0)
        model = dl.build(backbone, "dlm", head_kwargs=head_kwargs, **kwargs).to(device).eval()
        params = sum(p.numel() for p in model.parameters())

        def draw(cached: bool):
            gen = torch.Generator(device).manual_seed(0)
            return dl.sample_raster(
                model, n, (size, size), generator=gen, cached=cached, return_params=cached
            )

        draw(True)  # warm-up: allocator, kernels, lazy initialisation
        t_naive, _ = timed(lambda: draw(False), device, repeats)
        t_cached, (images, step_params) = timed(lambda: draw(True), device, repeats)
        with torch.no_grad():
            # Causal: the full forward at (i, j) reads exactly the prefix the step read.
            full_params = model.params(images)
            diff = (step_params - full_params).abs().max().item()
            bpd = model.bits_per_dim(images).mean().item()
        row = [name, f"{params:,d}", f"{t_naive:.3f}", f"{t_cached:.3f}",
               f"{t_naive / t_cached:.1f}x", f"{diff:.1e}", f"{bpd:.3f}"]
        print(f"{row[0]:44s} {row[1]:>10s} {row[2]:>9s} {row[3]:>9s} {row[4]:>9s} "
              f"{row[5]:>14s} {row[6]:>9s}")
        table.append(row)

    if args.markdown:
        write_markdown(
            args.markdown,
            run,
            title=f"Sampling: naive vs cached, on {device.type}",
            header=run.header(torch.get_num_threads(), sizes, f"median of {repeats} draws"),
            table=markdown_table(
                ["model", "params", "naive s", "cached s", "speed-up", "max abs param diff",
                 "bits/dim"],
                table,
                "lrrrrrr",
            ),
            notes=[
                "naive: `sample_raster(..., cached=False)`, the whole model once per pixel; "
                "cached: `cached=None`, the backbone's sampling cache (on CUDA its one-pixel "
                "step replayed from CUDA graphs); speed-up = naive / cached, measured in the "
                "same run",
                "max abs param diff: the largest absolute difference between the raw head "
                "parameters each cached step drew from and one full forward pass over the "
                "finished cached sample (the same prefix at every pixel: the model is causal); "
                "rounding only, a larger figure is a bug",
                "bits/dim: the cached draw's mean negative log-likelihood under the full model, "
                "in bits per sub-pixel",
            ],
        )
        print(f"\nwrote {args.markdown}")


if __name__ == "__main__":
    main()
