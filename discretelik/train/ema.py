"""Polyak (exponential moving) averaging of a model's parameters.

The average is used for evaluation and sampling, as in PixelCNN++ (decay 0.9995). It is kept
as a list of shadow tensors updated with one fused ``torch._foreach_lerp_`` per step, and is
swapped into the live model for evaluation (``with ema.average_parameters(): ...``) instead of
living in a second copy of the module: the swap works for any module (weight-norm hooks,
compiled or DDP-wrapped training modules share the same parameter tensors) and restores the
training weights bit for bit afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

__all__ = ["EMA"]


class EMA:
    """Exponential moving average of ``model``'s floating-point parameters.

    After each optimiser step call [`update`][discretelik.train.EMA.update]:
    ``shadow <- decay * shadow + (1 - decay) * param``.

    Args:
        model: The module whose parameters are averaged (the unwrapped model, not DDP).
        decay: Decay per update in ``[0, 1)``; PixelCNN++ uses 0.9995.
        warmup: If true, use ``min(decay, (1 + n) / (10 + n))`` at the ``n``-th update (the
            ``num_updates`` rule of TensorFlow's ``ExponentialMovingAverage``), so a short run
            is not dominated by the initial weights. PixelCNN++ did not use it.

    Raises:
        ValueError: ``decay`` outside ``[0, 1)``.
        TypeError: ``model`` is not an ``nn.Module``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9995, warmup: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self._names = [n for n, p in model.named_parameters() if p.is_floating_point()]
        self._params = [p for _, p in model.named_parameters() if p.is_floating_point()]
        self.shadow = [p.detach().clone() for p in self._params]

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the model's current parameters (one fused kernel)."""
        weight = 1.0 - self.current_decay()
        # lerp_(shadow, param, w) = shadow + w * (param - shadow), the EMA update in one op.
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self._params], weight)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> None:
        """Overwrite the parameters of ``model`` (default: the tracked model) with the average.

        Raises:
            ValueError: ``model`` lacks one of the averaged parameters.
        """
        targets = self._params if model is None else self._lookup(model)
        for p, s in zip(targets, self.shadow):
            p.copy_(s)

    def _lookup(self, model: nn.Module) -> list[Tensor]:
        params = dict(model.named_parameters())
        missing = [n for n in self._names if n not in params]
        if missing:
            raise ValueError(f"model lacks averaged parameters {missing[:5]}")
        return [params[n] for n in self._names]

    @contextmanager
    def average_parameters(self) -> Iterator[None]:
        """Context in which the tracked model holds the averaged weights.

        The training weights are copied aside and restored exactly on exit (also on error).
        """
        backup = [p.detach().clone() for p in self._params]
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self._params, backup):
                    p.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        """Plain state: ``decay``, ``warmup``, ``num_updates`` and ``shadow`` (name -> tensor)."""
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": {n: s for n, s in zip(self._names, self.shadow)},
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load [`state_dict`][discretelik.train.EMA.state_dict] output.

        Raises:
            ValueError: The names or shapes of the averaged parameters do not match.
        """
        shadow = state["shadow"]
        if sorted(shadow) != sorted(self._names):
            extra = sorted(set(shadow) - set(self._names))[:5]
            missing = sorted(set(self._names) - set(shadow))[:5]
            raise ValueError(
                f"EMA state does not match the model: missing {missing}, unexpected {extra}"
            )
        for name, s in zip(self._names, self.shadow):
            if tuple(shadow[name].shape) != tuple(s.shape):
                raise ValueError(
                    f"EMA state for {name!r} has shape {tuple(shadow[name].shape)}, "
                    f"the model has {tuple(s.shape)}"
                )
            s.copy_(shadow[name])
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])
