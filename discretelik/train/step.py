"""One optimisation step: the likelihood loss module and the step that applies it.

* [`LikelihoodLoss`][discretelik.train.LikelihoodLoss]: the ``nn.Module`` that DDP wraps and
  ``torch.compile`` compiles; backbone and head projection under autocast, the likelihood in
  float32.
* [`train_step`][discretelik.train.train_step]: zero grad, forward, backward, optimiser,
  scheduler and EMA in one call.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..model import AutoregressiveModel
from .ema import EMA
from .precision import autocast_context

__all__ = ["LikelihoodLoss", "train_step"]


class LikelihoodLoss(nn.Module):
    """Per-image bits/dim of integer images: the module that DDP wraps and compile compiles.

    A thin wrapper of the model's own
    [`bits_per_dim`][discretelik.AutoregressiveModel.bits_per_dim] (one loss path for
    training, evaluation and users): the backbone and the head's projection run under
    whatever autocast the caller opened, the distribution and its log-likelihood with autocast
    off on float32 parameters. Nothing is value-checked here (``validate_args=False``: a check
    would synchronise with the GPU every step and break compiled graphs): uint8 data with
    ``bins=256`` cannot be out of range; other data should be checked once, as the trainer does.

    Args:
        model: The [`AutoregressiveModel`][discretelik.AutoregressiveModel].

    Shapes:
        ``forward(x, cond)``: ``x`` integer ``(B, C, H, W)``, ``cond`` as for the model ->
        float32 ``(B,)`` bits per sub-pixel.
    """

    def __init__(self, model: AutoregressiveModel) -> None:
        super().__init__()
        if not isinstance(model, AutoregressiveModel):
            raise TypeError(f"model must be an AutoregressiveModel, got {type(model).__name__}")
        self.model = model

    def forward(self, x: Tensor, cond: Any = None) -> Tensor:
        return self.model.bits_per_dim(x, cond, validate_args=False)


def train_step(
    loss_fn: Callable[..., Tensor],
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    cond: Any = None,
    *,
    scheduler: Any = None,
    ema: EMA | None = None,
    autocast_dtype: torch.dtype | None = None,
    grad_clip: float | None = None,
) -> Tensor:
    """One optimisation step on one batch; returns the batch's mean bits/dim (not synced).

    Args:
        loss_fn: Maps ``(x, cond)`` to per-image losses ``(B,)``, e.g. a
            [`LikelihoodLoss`][discretelik.train.LikelihoodLoss], possibly DDP-wrapped or
            compiled.
        optimizer: Optimiser over the model's parameters.
        x: Integer images ``(B, C, H, W)`` on the model's device.
        cond: Conditioning (e.g. labels int64 ``(B,)``) or ``None``.
        scheduler: Learning-rate scheduler stepped once after the update, or ``None``.
        ema: [`EMA`][discretelik.train.EMA] updated after the optimiser step, or ``None``.
        autocast_dtype: e.g. ``torch.bfloat16`` for mixed precision; ``None`` for full precision.
        grad_clip: Maximum global gradient norm, or ``None`` for no clipping.

    Returns:
        Detached float32 scalar, the mean loss of this process's batch (reading it with
        ``.item()`` synchronises; do that only when logging).
    """
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(x.device, autocast_dtype):
        loss = loss_fn(x, cond).mean()
    loss.backward()
    if grad_clip is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    if ema is not None:
        ema.update()
    return loss.detach()
