"""Learning-rate schedules: PixelCNN++'s exponential decay, and warm-up + cosine for budgets.

Both are callable objects (not lambdas) for ``torch.optim.lr_scheduler.LambdaLR``, so that
``LambdaLR.state_dict()`` stores their settings and a resumed run continues exactly.
"""

from __future__ import annotations

import math

from .._checks import check_int

__all__ = ["ExponentialDecay", "WarmupCosine"]


class ExponentialDecay:
    """Learning-rate factor for ``torch.optim.lr_scheduler.LambdaLR``.

    ``factor(step) = decay ** (step + 1) * min(1, (step + 1) / warmup_steps)``. The ``+ 1``
    follows openai/pixel-cnn, which multiplies the rate by ``decay`` before every update, the
    first one included. A callable object (not a lambda) so that ``LambdaLR.state_dict()``
    stores its settings.

    Args:
        decay: Factor per step in ``(0, 1]`` (PixelCNN++: 0.999995).
        warmup_steps: Linear warm-up length in steps (0: none).

    Raises:
        ValueError: ``decay`` outside ``(0, 1]`` or negative ``warmup_steps``.
        TypeError: ``warmup_steps`` is not an int.
    """

    def __init__(self, decay: float = 0.999995, warmup_steps: int = 0) -> None:
        if not 0.0 < float(decay) <= 1.0:
            raise ValueError(f"decay must lie in (0, 1], got {decay!r}")
        check_int(warmup_steps, "warmup_steps", 0)
        self.decay = float(decay)
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        factor = self.decay ** (step + 1)
        if self.warmup_steps:
            factor *= min(1.0, (step + 1) / self.warmup_steps)
        return factor


class WarmupCosine:
    """Linear warm-up to the peak rate, then a cosine decay to ``final`` times the peak.

    ``factor(step)`` is ``(step + 1) / warmup_steps`` during the warm-up, then
    ``final + (1 - final) * (1 + cos(pi * t)) / 2`` with ``t`` going from 0 to 1 over the
    remaining ``total_steps - warmup_steps`` steps, and ``final`` after ``total_steps``. For a
    run with a fixed budget: the rate is high while the model is far from a minimum and low at
    the end, where the averaged weights are evaluated.

    Args:
        total_steps: Steps of warm-up plus decay (``>= 1``).
        warmup_steps: Linear warm-up length in steps, ``< total_steps`` (0: none).
        final: Factor at and after ``total_steps``, in ``[0, 1]``.

    Raises:
        TypeError: A step count is not an int.
        ValueError: Counts out of range or ``final`` outside ``[0, 1]``.
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0, final: float = 0.0) -> None:
        check_int(total_steps, "total_steps", 1)
        check_int(warmup_steps, "warmup_steps", 0)
        if warmup_steps >= total_steps:
            raise ValueError(
                f"warmup_steps must be < total_steps={total_steps}, got {warmup_steps}"
            )
        if not 0.0 <= float(final) <= 1.0:
            raise ValueError(f"final must lie in [0, 1], got {final!r}")
        self.total_steps, self.warmup_steps, self.final = total_steps, warmup_steps, float(final)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        t = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * t))
