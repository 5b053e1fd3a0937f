"""Reusable training pieces: batches, loss, train step, EMA, checkpoints, evaluation, PNG grids.

The CIFAR-10 reference run (``examples/train_cifar10.py``) is a thin script over these. One
module per job: ``batches`` (random index batches per rank), ``step`` (the loss module and one
optimisation step), ``schedule`` (learning-rate decay), ``precision`` (autocast, true float32),
``evaluation`` (bits/dim over a split), ``compiling`` (whole or regional
``torch.compile``), ``config`` and ``trainer`` (the trainer and its
settings), ``ema``, ``checkpoint``, ``metrics``, ``images`` and ``distributed``.
"""

from .batches import RandomBatches
from .checkpoint import (
    capture_rng_state,
    check_finite_tensors,
    checkpoint_digest,
    checkpoint_step,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .compiling import compile_regions, set_compile_cache_dir
from .config import TrainConfig
from .distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    init_distributed,
)
from .ema import EMA
from .evaluation import evaluate_bpd
from .images import encode_png, image_grid, save_image_grid, write_png
from .metrics import MetricsLog, read_metrics
from .precision import autocast_context, eval_precision_context, full_float32
from .schedule import ExponentialDecay, WarmupCosine
from .step import LikelihoodLoss, train_step
from .trainer import Trainer

__all__ = [
    "EMA",
    "DistInfo",
    "ExponentialDecay",
    "LikelihoodLoss",
    "MetricsLog",
    "RandomBatches",
    "TrainConfig",
    "Trainer",
    "WarmupCosine",
    "all_gather_objects",
    "all_reduce_sum",
    "autocast_context",
    "barrier",
    "capture_rng_state",
    "check_finite_tensors",
    "checkpoint_digest",
    "checkpoint_step",
    "cleanup_distributed",
    "compile_regions",
    "encode_png",
    "eval_precision_context",
    "evaluate_bpd",
    "full_float32",
    "image_grid",
    "init_distributed",
    "load_checkpoint",
    "read_metrics",
    "restore_rng_state",
    "save_checkpoint",
    "save_image_grid",
    "set_compile_cache_dir",
    "train_step",
    "write_png",
]
