"""The optimisation settings of a trainer (openai/pixel-cnn's CIFAR-10 defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from .._checks import check_int
from .precision import AUTOCAST_DTYPES

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """Optimisation settings of a [`Trainer`][discretelik.train.Trainer].

    Defaults are openai/pixel-cnn's CIFAR-10 settings except the batch size, which there is
    16 per GPU on 8 GPUs (a global batch of 128); here ``batch_size`` is per process.
    """

    # Images per process per step; the global batch is batch_size * world_size.
    batch_size: int = 16
    # Adam learning rate (before decay and warm-up).
    lr: float = 1e-3
    # Multiplied into the learning rate every step (openai: 0.999995).
    lr_decay: float = 0.999995
    # Linear warm-up steps; openai has none (data-dependent init keeps early steps stable).
    warmup_steps: int = 0
    # Adam betas (openai: 0.95, 0.9995).
    beta1: float = 0.95
    beta2: float = 0.9995
    # Polyak averaging decay used for evaluation and sampling (openai: 0.9995).
    ema_decay: float = 0.9995
    # Ramp the EMA decay up as (1 + n) / (10 + n): for short runs, see EMA.
    ema_warmup: bool = False
    # Global gradient-norm clip; None (openai) for none.
    grad_clip: float | None = None
    # "fp32" or "bf16" (autocast; the likelihood stays float32).
    precision: str = "fp32"
    # Keep the model and the batches in channels_last memory format.
    channels_last: bool = False
    # torch.compile the training forward (after DDP wrapping, so DDP's optimiser splits graphs
    # at bucket boundaries).
    compile: bool = False
    # Condition on class labels (the model must be built with num_classes).
    conditional: bool = False
    # Seed of the batch order (the dropout RNG is seeded by the caller, see Trainer).
    seed: int = 0

    def __post_init__(self) -> None:
        if self.precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision must be one of {sorted(AUTOCAST_DTYPES)}, got {self.precision!r}")
        check_int(self.batch_size, "batch_size", 1)
        check_int(self.warmup_steps, "warmup_steps", 0)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}")
