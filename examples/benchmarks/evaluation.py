"""Test-pass time and bits/dim of PixelCNN++ + DLM: float32 against the fast passes.

One model (weights from the data-dependent init on training images, seeded; no training, so
the bits/dim are those of an untrained model) is evaluated over a whole test split with
``discretelik.train.evaluate_bpd`` in each precision and batch size: ``fp32`` (true float32,
the reported figure), ``tf32`` (TF32 convolutions, CUDA only) and ``bf16`` (the backbone under
bf16 autocast); the likelihood is float32 in all of them. The table gives the time of the
pass (after one untimed pass of one batch, for cuDNN's algorithm search and, with
``--compile``, compilation), images/s and the difference of its bits/dim from the float32
pass at the first batch size: the trainer trusts a fast pass whose difference is at most 1e-3.

* CUDA (default when available): the paper model, 10 mixtures, batches of 250 and 500.
* CPU: the ``tiny`` preset, 5 mixtures, batches of 125 and 250.

    python examples/benchmarks/evaluation.py                        # the bundled 250 test images
    python examples/benchmarks/evaluation.py --data /tmp/cifar      # a CIFAR-10 test split

``--compile`` compiles each gated residual block once (``compile_regions``) before timing.
``--markdown PATH`` also writes the table as a fragment for ``docs/performance/``.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import discretelik as dl
from discretelik.data import load_bundled
from discretelik.data.cifar10 import load_cifar10
from discretelik.nn.weight_norm import data_dependent_init
from discretelik.train import compile_regions, evaluate_bpd

from _report import Run, markdown_table, write_markdown  # this folder, sys.path[0]

PRECISIONS = ("fp32", "tf32", "bf16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", help="CIFAR-10 (as train_cifar10.py --data); default: the bundled "
                                  "250 test images")
    p.add_argument("--preset", help="backbone preset (default: paper on CUDA, tiny on CPU)")
    p.add_argument("--mixtures", type=int, help="default: 10 on CUDA, 5 on CPU")
    p.add_argument("--batch-sizes", help="comma-separated (default: 250,500 on CUDA, 125,250 "
                                         "on CPU)")
    p.add_argument("--precisions", default="fp32,tf32,bf16",
                   help="comma-separated subset of fp32,tf32,bf16 (fp32 always runs first)")
    p.add_argument("--compile", action="store_true", help="regional torch.compile first")
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's)")
    p.add_argument("--markdown", metavar="PATH", help="also write the results as Markdown here")
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    args.preset = args.preset or ("paper" if cuda else "tiny")
    args.mixtures = args.mixtures or (10 if cuda else 5)
    try:
        args.batch_sizes = [int(b) for b in (args.batch_sizes or
                                             ("250,500" if cuda else "125,250")).split(",")]
    except ValueError:
        p.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if any(b < 1 for b in args.batch_sizes):
        p.error(f"--batch-sizes must be >= 1, got {args.batch_sizes}")
    wanted = [x.strip() for x in args.precisions.split(",") if x.strip()]
    unknown = [x for x in wanted if x not in PRECISIONS]
    if unknown:
        p.error(f"--precisions: unknown {unknown}; choose from {list(PRECISIONS)}")
    args.precisions = ["fp32", *(x for x in wanted if x != "fp32")]
    return args


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Run(__file__, argv, device)
    if args.data is None:
        images, what = load_bundled("cifar10", "test")[0], "the bundled 250 test images"
        init = load_bundled("cifar10", "train")[0][:100]
    else:
        images, what = load_cifar10(args.data, "test")[0], f"the test split of {args.data}"
        init = load_cifar10(args.data, "train")[0][:100]
    torch.manual_seed(0)
    model = dl.build("pixelcnn++", "dlm", preset=args.preset,
                     head_kwargs={"mixtures": args.mixtures}).to(device)
    data_dependent_init(model, init.to(device))
    if args.compile:
        compile_regions(model)
    rows: list[dict[str, object]] = []
    reference = None
    for precision in args.precisions:
        if precision == "tf32" and not cuda:
            rows.append({"precision": precision, "note": "skipped on CPU: TF32 is a CUDA mode"})
            continue
        for batch in args.batch_sizes:
            # One untimed batch: cuDNN's algorithm search (and compilation) is not the pass.
            evaluate_bpd(model, images[:batch], batch_size=batch, precision=precision)
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            bpd = evaluate_bpd(model, images, batch_size=batch, precision=precision)
            seconds = time.perf_counter() - start  # evaluate_bpd returned a Python float
            if reference is None:
                reference = bpd
            rows.append({"precision": precision, "batch": batch, "bpd": bpd, "seconds": seconds,
                         "diff": bpd - reference})
    threads = args.threads or torch.get_num_threads()
    where = torch.cuda.get_device_name(device) if cuda else (
        f"CPU ({platform.processor() or platform.machine()}, {threads} threads)")
    sizes = (f"preset {args.preset!r}, {args.mixtures} mixtures, {len(images)} images "
             f"({what}){', regional compile' if args.compile else ''}")
    print(f"PixelCNN++ + DLM test pass, {sizes}; {where}; torch {torch.__version__}")
    print()
    cells = []
    for r in rows:
        if "note" in r:
            cells.append([r["precision"], "-", "-", "-", "-", "-", r["note"]])
            continue
        cells.append([r["precision"], str(r["batch"]), f"{r['bpd']:.5f}", f"{r['diff']:+.1e}",
                      f"{r['seconds']:.2f}", f"{len(images) / r['seconds']:.0f}", ""])
    table = markdown_table(["pass", "batch", "bits/dim", "minus float32", "seconds", "images/s",
                            "note"], cells, "lrrrrrl")
    print(table)
    if args.markdown:
        notes = [
            f"minus float32: bits/dim of the pass minus the float32 pass at batch "
            f"{args.batch_sizes[0]}; the trainer uses a fast pass only if this is within 1e-3",
            "untrained model (data-dependent init on 100 training images): the times are those "
            "of a trained model, the bits/dim are not",
        ]
        write_markdown(args.markdown, run,
                       title=f"PixelCNN++ + DLM test pass, float32 and fast, on {device.type}",
                       header=run.header(threads, sizes, "one timed pass after one untimed batch"),
                       table=table, notes=notes)
        print(f"\nwrote {args.markdown}")
    return rows


if __name__ == "__main__":
    main()
