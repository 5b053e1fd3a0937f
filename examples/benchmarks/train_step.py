"""Training-step throughput and peak memory of PixelCNN++ + DLM: fp32 vs bf16 vs compiled.

Each mode runs the full training step of ``examples/train_cifar10.py`` (forward, float32
likelihood, backward, Adam, learning-rate schedule, Polyak averaging) on bundled CIFAR-10
images, in its own fresh Python process so that peak memory and compile caches of one mode do
not leak into the next. The table gives images/s, peak memory and the speed ratio to eager
fp32 measured in the same invocation.

* CUDA (default when available): the paper model (160 filters, 5 resnets, 10 mixtures) at the
  one-GPU recipe's batch of 128; peak memory is ``torch.cuda.max_memory_allocated``.
* CPU: the ``tiny`` preset at batch 16; peak memory is the process's peak RSS (it includes
  the interpreter and libraries). ``torch.compile`` is skipped on CPU unless ``--cpu-compile``
  is given (its C++ build takes minutes on a small CPU), and the table says so.

"first step" is the wall time from launching the mode's process to the end of its first
training step (interpreter start, imports, model build and compilation included). The
compiled modes compile the whole step ("compile") or each gated residual block once
("regional compile", see ``discretelik.train.compile_regions``). Adam is fused (on CUDA and
CPU), as in the trainer.

The DLM log-likelihood runs on the head's default path (on CUDA its eager graph, fused by the
compiler under ``torch.compile``) except in the two "triton DLM" modes, CUDA only, which set
``log_prob_backend = "triton"``: the Triton kernels, also inside the compiled step.

    python examples/benchmarks/train_step.py                      # whatever device there is
    python examples/benchmarks/train_step.py --batch-size 64 --steps 50

``--markdown PATH`` also writes the header and table as a Markdown fragment (see
``_report.py``); ``docs/performance.md`` includes those in ``docs/performance/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

import discretelik as dl
from discretelik.data import load_bundled
from discretelik.train import EMA, ExponentialDecay, LikelihoodLoss, compile_regions, train_step

from _report import Run, markdown_table, write_markdown  # this folder, sys.path[0]

# name -> (precision, channels_last, compile: False / "full" / "regional", DLM log_prob_backend).
# The rows without "triton DLM" pin the head's eager graph (fused by the compiler under
# compile), so that they measure the same thing on every device; the "triton DLM" modes ask for
# the Triton kernels (the head's "auto" choice on a CUDA GPU with Triton).
MODES = {
    "eager fp32": ("fp32", False, False, "eager"),
    "bf16 autocast": ("bf16", False, False, "eager"),
    "bf16 autocast + triton DLM": ("bf16", False, False, "triton"),
    "bf16 + channels_last + compile": ("bf16", True, "full", "eager"),
    "bf16 + channels_last + regional compile": ("bf16", True, "regional", "eager"),
    "bf16 + channels_last + compile + triton DLM": ("bf16", True, "full", "triton"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", help="backbone preset (default: paper on CUDA, tiny on CPU)")
    p.add_argument("--mixtures", type=int, help="default: 10 on CUDA, 5 on CPU")
    p.add_argument("--batch-size", type=int, help="default: 128 on CUDA, 16 on CPU")
    p.add_argument("--steps", type=int, help="timed steps (default: 20 on CUDA, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, cuDNN)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed windows of --steps steps; images/s is their median (default: 3)")
    p.add_argument("--cpu-compile", action="store_true", help="also compile on CPU")
    p.add_argument("--modes", help="comma-separated subset of the modes to run, e.g. "
                                   "'eager fp32,bf16 + channels_last + regional compile' "
                                   "(default: all; eager fp32 is always run, as the baseline)")
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's)")
    p.add_argument("--markdown", metavar="PATH", help="also write the results as Markdown here")
    p.add_argument("--worker", choices=sorted(MODES), help=argparse.SUPPRESS)
    p.add_argument("--launched-at", type=float, help=argparse.SUPPRESS)  # parent's time.time()
    args = p.parse_args(argv)
    for name in ("repeats", "steps", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.modes is not None:
        wanted = [m.strip() for m in args.modes.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in MODES]
        if unknown or not wanted:
            p.error(f"--modes: unknown {unknown or args.modes!r}; the modes are {list(MODES)}")
        args.modes = ["eager fp32", *(m for m in wanted if m != "eager fp32")]
    cuda = torch.device(args.device).type == "cuda"
    args.preset = args.preset or ("paper" if cuda else "tiny")
    args.mixtures = args.mixtures or (10 if cuda else 5)
    args.batch_size = args.batch_size or (128 if cuda else 16)
    args.steps = args.steps or (20 if cuda else 5)
    return args


def run_mode(args: argparse.Namespace) -> dict[str, float]:
    """One mode in this process: returns images/s and peak memory in bytes."""
    precision, channels_last, compile_, dlm_backend = MODES[args.worker]
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = dl.build("pixelcnn++", "dlm", preset=args.preset,
                     head_kwargs={"mixtures": args.mixtures, "log_prob_backend": dlm_backend}
                     ).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    loss_fn: torch.nn.Module = LikelihoodLoss(model)
    if compile_ == "full":
        loss_fn = torch.compile(loss_fn)
    elif compile_ == "regional":
        compile_regions(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.95, 0.9995), fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, ExponentialDecay(0.999995))
    ema = EMA(model, 0.9995)
    images = load_bundled("cifar10", "train")[0].to(device)
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step() -> torch.Tensor:
        idx = torch.randint(0, len(images), (args.batch_size,), generator=gen).to(device)
        x = images[idx].contiguous(memory_format=fmt)
        return train_step(loss_fn, opt, x, scheduler=sched, ema=ema, autocast_dtype=dtype)

    first_step_s = None
    if args.warmup:
        step().item()  # waits for the first step
        first_step_s = time.time() - args.launched_at if args.launched_at else None
    for _ in range(args.warmup - 1):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    window_seconds = []
    for _ in range(args.repeats):  # each window ends with a sync, so windows do not overlap
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        loss.item()  # waits for the last step
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        window_seconds.append(time.perf_counter() - t0)
    seconds = statistics.median(window_seconds)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:  # ru_maxrss is KiB on Linux, bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = rss if sys.platform == "darwin" else rss * 1024
    return {"images_per_s": args.steps * args.batch_size / seconds, "peak_bytes": peak,
            "loss": float(loss), "first_step_s": first_step_s}


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_mode(args)))
        return []
    run = Run(__file__, argv, torch.device(args.device))
    cuda = torch.device(args.device).type == "cuda"
    rows: list[dict[str, object]] = []
    for name, (_, _, compile_, dlm_backend) in MODES.items():
        if args.modes is not None and name not in args.modes:
            continue
        if dlm_backend == "triton" and not cuda:
            rows.append({"mode": name, "note": "skipped on CPU: the Triton kernels need CUDA"})
            continue
        if compile_ and not cuda and not args.cpu_compile:
            rows.append({"mode": name, "note": "skipped on CPU: compiling the training step "
                                               "took ~2 min on a 2-core CPU (--cpu-compile)"})
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--device",
               args.device, "--preset", args.preset, "--mixtures", str(args.mixtures),
               "--batch-size", str(args.batch_size), "--steps", str(args.steps),
               "--warmup", str(args.warmup),
               "--repeats", str(args.repeats)] + (["--threads", str(args.threads)] if args.threads else [])
        cmd += ["--launched-at", repr(time.time())]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            rows.append({"mode": name, "note": f"failed: {last[:120]}"})
            continue
        rows.append({"mode": name, **json.loads(proc.stdout.strip().splitlines()[-1])})
    base = next((r["images_per_s"] for r in rows if r["mode"] == "eager fp32"
                 and "images_per_s" in r), None)
    threads = args.threads or torch.get_num_threads()
    where = torch.cuda.get_device_name(args.device) if cuda else (
        f"CPU ({platform.processor() or platform.machine()}, {threads} threads)")
    memory = "peak CUDA memory allocated" if cuda else "peak process RSS"
    print(f"PixelCNN++ + DLM training step, preset {args.preset!r}, {args.mixtures} mixtures, "
          f"batch {args.batch_size}, median of {args.repeats} windows of {args.steps} steps after "
          f"{args.warmup} warm-up; "
          f"{where}; torch {torch.__version__}")
    print()
    cells = []
    for r in rows:
        if "images_per_s" not in r:
            cells.append([r["mode"], "-", "-", r["note"], "-"])
            continue
        ratio = f"{r['images_per_s'] / base:.2f}x" if base else "-"
        first = f"{r['first_step_s']:.1f} s" if r.get("first_step_s") is not None else "-"
        cells.append([r["mode"], f"{r['images_per_s']:.1f}", f"{r['peak_bytes'] / 2**30:.2f} GiB",
                      ratio, first])
    table = markdown_table(["mode", "images/s", memory, "speed vs eager fp32",
                            "first step after"], cells, "lrrrr")
    print(table)
    if args.markdown:
        notes = [f"images/s: {args.steps} x {args.batch_size} images over the median wall time "
                 f"of {args.repeats} windows of {args.steps} consecutive steps"]
        notes.append("first step after: wall time from launching the mode's process to the end "
                     "of its first training step (imports, build and compilation included)")
        if not cuda:
            notes.append("peak process RSS includes the interpreter and libraries")
        losses = [f"{r['mode']} {r['loss']:.3f}" for r in rows if "loss" in r]
        if losses:
            notes.append("loss (bits/dim) of the last timed step: " + ", ".join(losses))
        write_markdown(
            args.markdown,
            run,
            title=f"PixelCNN++ + DLM training step, on {torch.device(args.device).type}",
            header=run.header(
                threads,
                f"preset {args.preset!r}, {args.mixtures} mixtures, batch {args.batch_size}",
                f"median of {args.repeats} windows of {args.steps} steps after {args.warmup} "
                "warm-up",
            ),
            table=table,
            notes=notes,
        )
        print(f"\nwrote {args.markdown}")
    return rows


if __name__ == "__main__":
    main()
