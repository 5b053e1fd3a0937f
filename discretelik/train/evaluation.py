"""Bits/dim of a model over a whole split, sharded over DDP ranks: float32, or a fast pass.

The fast passes (``precision="bf16"`` or ``"tf32"``) run only the backbone and the head's
projection in lower precision; the likelihood is float32 in every mode (see
[`AutoregressiveModel.log_prob`][discretelik.AutoregressiveModel.log_prob]).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_int
from ..model import AutoregressiveModel
from ._inputs import check_images_for_model, check_labels
from .distributed import DistInfo, all_reduce_sum
from .precision import EVAL_PRECISIONS, eval_precision_context

__all__ = ["evaluate_bpd"]


@torch.no_grad()
def evaluate_bpd(
    model: AutoregressiveModel,
    images: Tensor,
    labels: Tensor | None = None,
    *,
    batch_size: int = 250,
    device: torch.device | str | None = None,
    dist: DistInfo | None = None,
    precision: str = "fp32",
) -> float:
    """Mean bits/dim of ``model`` over every image of a split, without grad.

    The model is put in eval mode (dropout off) and restored afterwards. With the default
    ``precision="fp32"`` autocast and TF32 are off (the figure to report). Under DDP each rank evaluates a contiguous shard and the sums are all-reduced, so
    every rank returns the same value over the whole split.

    Args:
        model: The model to evaluate (for Polyak-averaged weights, call inside
            ``EMA.average_parameters()``).
        images: uint8 ``(N, C, H, W)``, on any device.
        labels: int64 ``(N,)`` class labels for a class-conditional model, else ``None``.
        batch_size: Images per forward pass.
        device: Where to run (default: the model's device).
        dist: This process's [`DistInfo`][discretelik.train.DistInfo] (default single process).
        precision: ``"fp32"`` (true float32), ``"tf32"`` (TF32 matmuls and convolutions on
            CUDA; the same as ``"fp32"`` on CPU) or ``"bf16"`` (backbone under bf16
            autocast). The likelihood is float32 in all three; check a fast pass against
            ``"fp32"`` before trusting it (the trainer does, once per run).

    Returns:
        The mean over all ``N`` images of each image's bits per sub-pixel (equal to the
        total negative log2-likelihood divided by ``N * C * H * W``).

    Raises:
        TypeError: ``images``/``labels`` of the wrong type or dtype.
        ValueError: No images, wrong shapes or channels, levels outside
            ``[0, model.bins - 1]`` (checked before the first batch), or an unknown
            ``precision``.
    """
    if precision not in EVAL_PRECISIONS:
        raise ValueError(f"precision must be one of {list(EVAL_PRECISIONS)}, got {precision!r}")
    check_images_for_model(images, model, "images", nonempty=True)
    n = images.shape[0]
    if labels is not None:
        check_labels(labels, n, "labels")
    check_int(batch_size, "batch_size", 1)
    dist = dist or DistInfo()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    shard = math.ceil(n / dist.world_size)
    lo, hi = min(n, dist.rank * shard), min(n, (dist.rank + 1) * shard)
    # float64 accumulators: 10,000 float32 partial sums would lose digits we report.
    total = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        with eval_precision_context(device, precision):
            for start in range(lo, hi, batch_size):
                x = images[start : min(hi, start + batch_size)].to(device, non_blocking=True)
                cond = None if labels is None else labels[start : start + x.shape[0]].to(device)
                # The levels were checked above, once: no per-batch read of the images.
                bpd = model.bits_per_dim(x, cond, validate_args=False)
                total[0] += bpd.double().sum()
                total[1] += bpd.shape[0]
    finally:
        model.train(was_training)
    all_reduce_sum(total)
    return float(total[0] / total[1])
