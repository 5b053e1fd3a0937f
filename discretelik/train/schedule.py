"""The PixelCNN++ learning-rate schedule: exponential decay per step, optional linear warm-up."""

from __future__ import annotations

from .._checks import check_int

__all__ = ["ExponentialDecay"]


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
