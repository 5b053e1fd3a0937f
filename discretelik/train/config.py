"""The optimisation settings of a trainer (openai/pixel-cnn's CIFAR-10 defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from .._checks import check_int
from .precision import AUTOCAST_DTYPES, EVAL_PRECISIONS

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
    # "exponential" (openai: lr * lr_decay**step after the warm-up) or "cosine" (warm-up, then
    # a cosine from lr to lr * final_lr_fraction at decay_steps: for a fixed budget).
    lr_schedule: str = "exponential"
    # Warm-up plus cosine length in steps ("cosine" only; must exceed warmup_steps).
    decay_steps: int = 0
    # The cosine's end point as a fraction of lr ("cosine" only).
    final_lr_fraction: float = 0.0
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
    # torch.compile: False; "full" (or True) compiles the training forward (after DDP wrapping,
    # so DDP's optimiser splits graphs at bucket boundaries); "regional" compiles each of the
    # backbone's repeated blocks (its ``repeated_blocks``) once and reuses the code for every
    # instance: far less to compile, so the first step comes sooner; evaluation runs the
    # compiled blocks too.
    compile: bool | str = False
    # Precision of intermediate test passes: "fp32" (all of them true float32), or "bf16" /
    # "tf32" (backbone only; the likelihood stays float32), checked against float32 once at
    # the first evaluation; the final evaluation is always float32.
    eval_precision: str = "fp32"
    # Condition on class labels (the model must be built with num_classes).
    conditional: bool = False
    # Seed of the batch order (the dropout RNG is seeded by the caller, see Trainer).
    seed: int = 0

    def __post_init__(self) -> None:
        if self.precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision must be one of {sorted(AUTOCAST_DTYPES)}, got {self.precision!r}")
        if self.compile not in (False, True, "full", "regional"):
            raise ValueError(
                f"compile must be False, True, 'full' or 'regional', got {self.compile!r}"
            )
        if self.eval_precision not in EVAL_PRECISIONS:
            raise ValueError(
                f"eval_precision must be one of {list(EVAL_PRECISIONS)}, got {self.eval_precision!r}"
            )
        if self.lr_schedule not in ("exponential", "cosine"):
            raise ValueError(
                f"lr_schedule must be 'exponential' or 'cosine', got {self.lr_schedule!r}"
            )
        check_int(self.decay_steps, "decay_steps", 0)
        if self.lr_schedule == "cosine" and self.decay_steps <= self.warmup_steps:
            raise ValueError(
                f"decay_steps must exceed warmup_steps={self.warmup_steps} for the cosine "
                f"schedule, got {self.decay_steps}"
            )
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ValueError(f"final_lr_fraction must lie in [0, 1], got {self.final_lr_fraction!r}")
        check_int(self.batch_size, "batch_size", 1)
        check_int(self.warmup_steps, "warmup_steps", 0)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}")

    @property
    def compile_mode(self) -> str | None:
        """``"full"``, ``"regional"`` or ``None`` (``compile=True`` means ``"full"``)."""
        if self.compile is True:
            return "full"
        return self.compile or None
