"""Train PixelCNN++ (``build("pixelcnn++", "dlm")``) on CIFAR-10 and report test bits/dim.

With no arguments this is the demo (``make demo``): a tiny PixelCNN++ with the discretized
logistic mixture head trained for a few minutes on CPU on the bundled 1,000-image CIFAR-10
subset, then test bits/dim on the 250 bundled test images and a PNG grid of 4 samples
(measured at the commit that states this: 2 min 41 s and 2 min 48 s in two runs on one core of
the 2-core dev machine while other jobs ran, test 4.3174 bits/dim in both; torch 2.13 CPU).
A tiny model trained for minutes is far from the paper's 2.92 bits/dim; the demo shows the
pipeline working end to end, honestly measured.

With ``--data`` it trains the paper's model (Salimans et al. 2017; openai/pixel-cnn): 160
filters, 5 residual layers per block, 10 logistic mixtures, dropout 0.5, weight norm with
data-dependent init on 100 images, Adam lr 1e-3 decayed by 0.999995 per step, betas (0.95,
0.9995), Polyak averaging 0.9995 for evaluation and sampling. Recipes (``--recipe``; every
value can be overridden by its flag):

* ``paper``: exactly the original optimisation, 16 images per process in fp32. Run it on 8 GPUs
  for the paper's global batch of 128:
  ``torchrun --nproc_per_node=8 examples/train_cifar10.py --data DIR --recipe paper``.
  (openai's ``train.py`` defaults to 12 images per GPU, 96 in all; ``--batch-size 12`` gives
  that.)
  Multi-node: add ``--nnodes N --node-rank R --rdzv-endpoint HOST:PORT`` (torchrun's own flags).
* ``gpu`` (the default with ``--data`` on one CUDA device): the paper's global batch of 128 on
  one GPU, so the paper's learning rate and decay apply unchanged; bf16 autocast (the
  likelihood stays float32), channels_last and ``torch.compile``; a 500-step linear warm-up
  as a guard for bf16 (openai had none). Memory: forward + backward of the paper model holds
  about 400 MiB per image in fp32 (measured on CPU), so batch 128 needs roughly 50 GiB in fp32
  and less under bf16: it fits an 80 GB H100. On a smaller GPU pass ``--batch-size 64``; the
  learning rate is then scaled by sqrt(64/128) unless ``--lr`` is given. The test set is
  evaluated every 5 epochs (openai: every epoch, on 8 GPUs): a float32 pass over 10,000
  images costs a sizeable fraction of a bf16 training epoch.
* ``demo``: the no-argument CPU run described above.

Test bits/dim is always computed over the whole test split, in float32 (no autocast, no TF32),
with the Polyak-averaged weights; sample grids use those weights too.

Examples::

    python examples/train_cifar10.py                                   # demo (CPU, minutes)
    python examples/train_cifar10.py --data ~/data/cifar-10-batches-py # paper model, one GPU
    python examples/train_cifar10.py --data DIR --conditional          # class-conditional
    python examples/train_cifar10.py --data DIR --resume               # continue runs/.../checkpoint.pt
    python examples/train_cifar10.py --eval-only runs/cifar10-gpu/checkpoint.pt
    torchrun --nproc_per_node=8 examples/train_cifar10.py --data DIR --recipe paper

Outputs in ``--out`` (default ``runs/cifar10-<recipe>``): ``metrics.jsonl`` (one JSON record
per log step: step, train_bpd, test_bpd, images_per_s, lr, wall_s), ``checkpoint.pt`` (model,
EMA, optimiser, scheduler, RNG states, batch position, step; written atomically),
``samples_step<N>.png`` and ``settings.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

import discretelik as dl
from discretelik.data import load_bundled
from discretelik.data.cifar10 import load_cifar10
from discretelik.nn.weight_norm import data_dependent_init
from discretelik.train import (
    EMA,
    MetricsLog,
    TrainConfig,
    Trainer,
    cleanup_distributed,
    evaluate_bpd,
    init_distributed,
    load_checkpoint,
    save_image_grid,
)

# One dict per recipe; a flag given on the command line overrides the recipe's value.
RECIPES: dict[str, dict[str, Any]] = {
    "demo": dict(
        # One CPU thread: the tiny model's tensors gain little from more, and on a shared
        # machine OpenMP threads spinning against other processes made a step 30x slower
        # (16.7 s instead of 0.55 s, measured on the 2-core dev box under load).
        threads=1,
        # Batch 16 and lr 5e-3 gave the lowest test bits/dim for a fixed CPU budget among the
        # settings tried (batch 8/16/32, lr 2e-3 to 1e-2); 1e-2 was slightly better still but
        # leaves less margin against divergence.
        preset="tiny", mixtures=5, batch_size=16, lr=5e-3, lr_decay=0.999995, warmup_steps=0,
        ema_decay=0.995, ema_warmup=True,  # a short run: average over the last ~200 steps
        steps=800, epochs=None, init_batch_size=32, precision="fp32", channels_last=False,
        compile=False, log_every=50, eval_every=0, checkpoint_every=0, sample_every=0,
        samples=4, eval_batch_size=125,
    ),
    "paper": dict(
        preset="paper", mixtures=10, batch_size=16, lr=1e-3, lr_decay=0.999995, warmup_steps=0,
        ema_decay=0.9995, ema_warmup=False, steps=None, epochs=5000, init_batch_size=100,
        precision="fp32", channels_last=False, compile=False, log_every=100, eval_every="epoch",
        checkpoint_every="epoch", sample_every="20 epochs", samples=16, eval_batch_size=250,
    ),
    "gpu": dict(
        preset="paper", mixtures=10, batch_size=128, lr=None, lr_decay=0.999995,
        warmup_steps=500, ema_decay=0.9995, ema_warmup=False, steps=None, epochs=5000,
        init_batch_size=100, precision="bf16", channels_last=True, compile=True, log_every=100,
        eval_every="5 epochs", checkpoint_every="epoch", sample_every="20 epochs", samples=16,
        eval_batch_size=250,
    ),
}
# Settings that are neither in every recipe nor model hyperparameters of a preset.
COMMON: dict[str, Any] = dict(
    backbone="pixelcnn++", head="dlm", nr_filters=None, nr_resnet=None, dropout=None,
    conditional=False, beta1=0.95, beta2=0.9995, grad_clip=None, seed=1, threads=None,
    log_prob_backend=None,
)
PAPER_GLOBAL_BATCH = 128
# Settings that a checkpoint's state (optimiser, scheduler, EMA, batch order) brings back.
RESTORED_ON_RESUME = ("lr", "lr_decay", "warmup_steps", "beta1", "beta2", "ema_decay",
                      "ema_warmup", "seed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults come from the recipe (see the module docstring); flags override them.",
    )
    a = p.add_argument
    a("--data", help="CIFAR-10: a cifar-10-batches-py dir, a dir of data_batch_N.npz, or a .npz "
                     "with x_train/y_train/x_test/y_test (default: the bundled subset, demo)")
    a("--download", action="store_true", help="fetch CIFAR-10 into --data with torchvision")
    a("--recipe", choices=sorted(RECIPES), help="demo without --data; gpu on one CUDA device; "
                                                "else paper")
    a("--out", help="output directory (default runs/cifar10-<recipe>)")
    a("--resume", nargs="?", const="auto", help="continue from a checkpoint (default "
                                                "<out>/checkpoint.pt) with its settings")
    a("--eval-only", metavar="CHECKPOINT", help="evaluate and sample a checkpoint, no training")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", help="registered backbone (default pixelcnn++)")
    g.add_argument("--head", help="registered head (default dlm)")
    g.add_argument("--preset", help="backbone preset: tiny or paper")
    g.add_argument("--nr-filters", type=int)
    g.add_argument("--nr-resnet", type=int)
    g.add_argument("--mixtures", type=int, help="logistic mixture components")
    g.add_argument("--dropout", type=float)
    g.add_argument("--conditional", action="store_true", default=None,
                   help="class-conditional on the CIFAR-10 labels")
    g.add_argument("--init-batch-size", type=int, help="images for the data-dependent init "
                                                       "(0: skip it)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, help="images per process per step")
    g.add_argument("--lr", type=float)
    g.add_argument("--lr-decay", type=float, help="learning-rate factor per step")
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--beta1", type=float)
    g.add_argument("--beta2", type=float)
    g.add_argument("--ema-decay", type=float, help="Polyak averaging decay")
    g.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--grad-clip", type=float)
    g.add_argument("--steps", type=int, help="total optimisation steps")
    g.add_argument("--epochs", type=int, help="total epochs (used when --steps is not set)")
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("performance")
    g.add_argument("--device", help="cuda, cpu, cuda:1 ... (default: cuda if available)")
    g.add_argument("--threads", type=int, help="CPU threads (default: 1 for the demo, else "
                                               "PyTorch's default)")
    g.add_argument("--precision", choices=["fp32", "bf16"])
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--log-prob-backend", choices=["eager", "lean", "triton"],
                   help="the head's log_prob implementation (default: the head's own "
                        "choice; 'triton' also inside --compile)")
    g = p.add_argument_group("logging")
    for name in ("log-every", "eval-every", "checkpoint-every", "sample-every"):
        g.add_argument(f"--{name}", type=int, help="period in steps (0: only at the end)")
    g.add_argument("--samples", type=int, help="images per sample grid")
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar: one line per log")
    args = p.parse_args(argv)
    if args.download and args.data is None:
        p.error("--download needs --data DIR (where to put CIFAR-10)")
    if args.eval_only and args.resume:
        p.error("--eval-only and --resume exclude each other")
    return args


def resolve(args: argparse.Namespace, base: dict[str, Any] | None, cuda: bool, world: int) -> dict[str, Any]:
    """Settings = recipe (or a resumed checkpoint's settings) + the flags given."""
    flags = {k: v for k, v in vars(args).items() if v is not None}
    if base is None:
        recipe = flags.get("recipe") or (
            "demo" if args.data is None else ("gpu" if cuda and world == 1 else "paper")
        )
        base = dict(COMMON, **RECIPES[recipe], recipe=recipe, data=args.data)
    s = dict(base)
    for key in (*COMMON, *RECIPES["demo"], "data"):
        if key in flags:
            s[key] = flags[key]
    if "epochs" in flags and "steps" not in flags:
        s["steps"] = None  # --epochs alone replaces a recipe's step count
    if s["lr"] is None:
        # Scale from the paper's global batch of 128 by sqrt (the usual rule for Adam).
        s["lr"] = 1e-3 * math.sqrt(s["batch_size"] * world / PAPER_GLOBAL_BATCH)
    return s


def load_data(s: dict[str, Any], download: bool) -> tuple[tuple, tuple, str]:
    if s["data"] is None:
        train, test = load_bundled("cifar10", "train"), load_bundled("cifar10", "test")
        what = ("the bundled CIFAR-10 subset (discretelik/data: first 1,000 images of "
                "data_batch_1 for training, first 250 of test_batch for testing)")
    else:
        train = load_cifar10(s["data"], "train", download=download)
        test = load_cifar10(s["data"], "test")
        what = f"CIFAR-10 from {s['data']}"
    return train, test, f"{what}: {len(train[0])} train / {len(test[0])} test images"


def model_spec(s: dict[str, Any]) -> dict[str, Any]:
    """How to rebuild the model: stored in checkpoints so that --eval-only needs nothing else."""
    backbone_kwargs = dict(nr_filters=s["nr_filters"], nr_resnet=s["nr_resnet"],
                           dropout=s["dropout"], num_classes=10 if s["conditional"] else None)
    return dict(backbone=s["backbone"], head=s["head"], preset=s["preset"],
                backbone_kwargs={k: v for k, v in backbone_kwargs.items() if v is not None},
                head_kwargs={"mixtures": s["mixtures"]} if s["head"] == "dlm" else {})


def build_model(spec: dict[str, Any]) -> dl.AutoregressiveModel:
    return dl.build(spec["backbone"], spec["head"], preset=spec["preset"],
                    head_kwargs=spec["head_kwargs"], **spec["backbone_kwargs"])


def set_log_prob_backend(model: dl.AutoregressiveModel, backend: str | None) -> None:
    """Choose the head's log_prob implementation (for this process: on its distribution class).

    ``None`` restores the head's own choice, so that an earlier run in the same process does
    not leave its backend behind.
    """
    cls = getattr(model.head, "distribution_class", None)
    if backend is None:
        if hasattr(cls, "log_prob_backends"):
            cls.log_prob_backend = None
        return
    if backend not in getattr(cls, "log_prob_backends", ()):
        raise ValueError(
            f"--log-prob-backend {backend!r} is not available for head {type(model.head).__name__}"
            f" (choices: {getattr(cls, 'log_prob_backends', 'none')})"
        )
    cls.log_prob_backend = backend


def steps_per_period(value: Any, steps_per_epoch: int) -> int:
    if isinstance(value, str):  # "epoch", "20 epochs"
        count = int(value.split()[0]) if value[0].isdigit() else 1
        return count * steps_per_epoch
    return int(value)


def eval_only(args: argparse.Namespace, dist: Any) -> dict[str, Any]:
    ckpt = load_checkpoint(args.eval_only)
    if "settings" not in ckpt or "model_spec" not in ckpt:
        raise ValueError(f"{args.eval_only}: not a checkpoint written by this script")
    s = resolve(args, ckpt["settings"], dist.device.type == "cuda", dist.world_size)
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    _, (x_test, y_test), what = load_data(s, args.download)
    model = build_model(ckpt["model_spec"]).to(dist.device)
    model.load_state_dict(ckpt["model"])
    ema = EMA(model)
    ema.load_state_dict(ckpt["ema"])
    out = Path(args.out or Path(args.eval_only).parent)
    with ema.average_parameters():
        bpd = evaluate_bpd(model, x_test, y_test if s["conditional"] else None,
                           batch_size=s["eval_batch_size"], dist=dist)
        png = None
        n = s["samples"]
        if dist.is_main and n > 0:
            cond = torch.arange(n, device=dist.device) % 10 if s["conditional"] else None
            gen = torch.Generator(device=dist.device).manual_seed(s["seed"])
            png = save_image_grid(out / f"eval_samples_step{ckpt['step']}.png",
                                  model.sample(n, (3, 32, 32), cond=cond, generator=gen))
    if dist.is_main:
        print(f"checkpoint {args.eval_only} (step {ckpt['step']}), {what}")
        print(f"test bits/dim (EMA weights, float32, all {len(x_test)} test images): {bpd:.4f}")
        if png is not None:
            print(f"samples (EMA weights): {png}")
    return {"test_bpd": bpd, "samples": png and str(png), "step": ckpt["step"]}


def train(args: argparse.Namespace, dist: Any) -> dict[str, Any]:
    cuda = dist.device.type == "cuda"
    ckpt = None
    if args.resume is not None:
        path = Path(args.resume) if args.resume != "auto" else None
        if path is None:  # <out>/checkpoint.pt, with <out> from the flags or the recipe
            out = args.out or f"runs/cifar10-{resolve(args, None, cuda, dist.world_size)['recipe']}"
            path = Path(out) / "checkpoint.pt"
        ckpt = load_checkpoint(path)
        if "settings" not in ckpt:
            raise ValueError(f"{path}: not a checkpoint written by this script")
    s = resolve(args, ckpt["settings"] if ckpt else None, cuda, dist.world_size)
    if ckpt is not None:
        # The optimiser, scheduler, EMA and batch-order states of the checkpoint bring these
        # back whatever the flags say: refuse a change rather than ignore it silently.
        changed = [k for k in RESTORED_ON_RESUME if s[k] != ckpt["settings"].get(k)]
        if changed:
            raise ValueError(
                f"{', '.join('--' + k.replace('_', '-') for k in changed)} cannot be changed on "
                f"resume: the checkpoint's optimiser/EMA state restores "
                + ", ".join(f"{k}={ckpt['settings'].get(k)!r}" for k in changed)
            )
    out = Path(args.out or s.get("out") or f"runs/cifar10-{s['recipe']}")
    s["out"] = str(out)
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    (x_train, y_train), (x_test, y_test), what = load_data(s, args.download)
    spec = model_spec(s)

    torch.manual_seed(s["seed"])  # the same initial weights on every rank
    model = build_model(spec).to(dist.device)
    set_log_prob_backend(model, s.get("log_prob_backend"))  # absent in older checkpoints
    if ckpt is None and s["init_batch_size"] > 0:
        # openai: one init pass on init_batch_size training images, dropout on.
        idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(s["seed"]))
        idx = idx[: s["init_batch_size"]]
        cond = y_train[idx].to(dist.device) if s["conditional"] else None
        data_dependent_init(model, x_train[idx].to(dist.device), cond)
    # Each rank draws its own dropout masks from here on.
    torch.manual_seed(s["seed"] + 1 + dist.rank)
    config = TrainConfig(
        batch_size=s["batch_size"], lr=s["lr"], lr_decay=s["lr_decay"],
        warmup_steps=s["warmup_steps"], beta1=s["beta1"], beta2=s["beta2"],
        ema_decay=s["ema_decay"], ema_warmup=s["ema_warmup"], grad_clip=s["grad_clip"],
        precision=s["precision"], channels_last=s["channels_last"], compile=s["compile"],
        conditional=s["conditional"], seed=s["seed"],
    )
    trainer = Trainer(model, x_train, y_train, config, dist)
    metrics = MetricsLog(out / "metrics.jsonl", enabled=dist.is_main)
    if ckpt is not None:
        trainer.load_state_dict(ckpt)
        metrics.truncate_after(trainer.step)  # drop records the interrupted run wrote later
    elif dist.is_main and metrics.path.exists():
        metrics.path.unlink()  # a fresh run in an old directory starts a fresh log
    spe = trainer.batches.steps_per_epoch
    steps = s["steps"] if s["steps"] is not None else s["epochs"] * spe
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "settings.json").write_text(json.dumps(s, indent=2) + "\n")
        n_params = sum(p.numel() for p in model.parameters())
        print(f"recipe {s['recipe']}: build({spec['backbone']!r}, {spec['head']!r}, "
              f"preset={spec['preset']!r}, {spec['backbone_kwargs']}, {spec['head_kwargs']}) "
              f"-> {n_params:,} parameters on {dist.device} x {dist.world_size}")
        print(f"data: {what}")
        print(f"{steps} steps of {trainer.global_batch} images ({steps / spe:.1f} epochs), "
              f"lr {s['lr']:.3g}, {s['precision']}"
              + (f", resuming at step {trainer.step}" if ckpt else ""))
    extra = {"settings": s, "model_spec": spec}
    records = trainer.fit(
        steps, test_images=x_test, test_labels=y_test,
        eval_every=steps_per_period(s["eval_every"], spe), eval_batch_size=s["eval_batch_size"],
        log_every=s["log_every"], metrics=metrics, checkpoint_path=out / "checkpoint.pt",
        checkpoint_every=steps_per_period(s["checkpoint_every"], spe), checkpoint_extra=extra,
        sample_dir=out if s["samples"] > 0 else None, sample_every=steps_per_period(s["sample_every"], spe),
        num_samples=s["samples"], progress=not args.no_progress,
    )
    final = records[-1] if records else {}
    if dist.is_main:
        if "test_bpd" in final:
            print(f"test bits/dim (EMA weights, float32, all {len(x_test)} test images of "
                  f"{'the bundled subset' if s['data'] is None else s['data']}): "
                  f"{final['test_bpd']:.4f}")
            if final.get("samples"):
                print(f"samples (EMA weights): {final['samples']}")
        else:
            print(f"nothing to do: the checkpoint is already at step {trainer.step} >= {steps}")
        print(f"checkpoint: {out / 'checkpoint.pt'}; metrics: {metrics.path}")
    return final


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    dist = init_distributed(args.device)
    try:
        t0 = time.perf_counter()
        result = eval_only(args, dist) if args.eval_only else train(args, dist)
        if dist.is_main:
            print(f"done in {time.perf_counter() - t0:.1f} s")
        return result
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as exc:
        # Wrong paths, malformed files, bad flag values: the message says what to fix; the
        # traceback only helps when debugging (DISCRETELIK_DEBUG=1 shows it).
        if os.environ.get("DISCRETELIK_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
