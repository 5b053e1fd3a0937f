"""Reusable training pieces: batches, loss, train step, EMA, checkpoints, evaluation, PNG grids.

The CIFAR-10 reference run (``examples/train_cifar10.py``) is a thin script over these.
"""

from .checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from .distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    init_distributed,
)
from .ema import EMA
from .images import encode_png, image_grid, save_image_grid, write_png
from .loop import (
    ExponentialDecay,
    LikelihoodLoss,
    RandomBatches,
    TrainConfig,
    Trainer,
    autocast_context,
    evaluate_bpd,
    full_float32,
    train_step,
)
from .metrics import MetricsLog, read_metrics

__all__ = [
    "DistInfo",
    "EMA",
    "ExponentialDecay",
    "LikelihoodLoss",
    "MetricsLog",
    "RandomBatches",
    "TrainConfig",
    "Trainer",
    "all_gather_objects",
    "all_reduce_sum",
    "autocast_context",
    "barrier",
    "capture_rng_state",
    "cleanup_distributed",
    "encode_png",
    "evaluate_bpd",
    "full_float32",
    "image_grid",
    "init_distributed",
    "load_checkpoint",
    "read_metrics",
    "restore_rng_state",
    "save_checkpoint",
    "save_image_grid",
    "train_step",
    "write_png",
]
