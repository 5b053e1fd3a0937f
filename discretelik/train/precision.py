"""Numeric precision: the autocast dtype of each precision setting, autocast and true float32.

A train step runs the backbone under [`autocast_context`][discretelik.train.autocast_context]
(bf16 when asked for); the reported evaluation opens no autocast and runs inside
[`full_float32`][discretelik.train.full_float32] (TF32 off), a fast evaluation inside
[`eval_precision_context`][discretelik.train.eval_precision_context].
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["AUTOCAST_DTYPES", "EVAL_PRECISIONS", "autocast_context", "eval_precision_context", "full_float32"]

# TrainConfig.precision -> the dtype autocast runs in (None: no autocast, plain float32).
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}
# Evaluation precisions: "fp32" is the figure to report; "tf32" and "bf16" are fast passes
# (the likelihood stays float32 in all three).
EVAL_PRECISIONS = ("fp32", "tf32", "bf16")


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast(device.type, dtype)``, or a no-op context for ``dtype=None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """TF32 for CUDA matmuls and convolutions on or off inside the context, then as before."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def full_float32() -> contextlib.AbstractContextManager:
    """Disable TF32 for CUDA matmuls and convolutions inside the context (true float32)."""
    return _tf32(False)


def allow_tf32() -> contextlib.AbstractContextManager:
    """Enable TF32 for CUDA matmuls and convolutions inside the context (no-op on CPU)."""
    return _tf32(True)


def eval_precision_context(
    device: torch.device, precision: str
) -> contextlib.AbstractContextManager:
    """The numeric context of an evaluation pass in ``precision`` (one of ``EVAL_PRECISIONS``).

    ``"fp32"``: [`full_float32`][discretelik.train.full_float32]; ``"tf32"``: TF32 on;
    ``"bf16"``: bf16 autocast on ``device`` with TF32 off for whatever autocast leaves in
    float32.

    Raises:
        ValueError: Unknown ``precision``.
    """
    if precision == "fp32":
        return full_float32()
    if precision == "tf32":
        return allow_tf32()
    if precision == "bf16":
        stack = contextlib.ExitStack()
        stack.enter_context(full_float32())
        stack.enter_context(torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16))
        return stack
    raise ValueError(f"precision must be one of {list(EVAL_PRECISIONS)}, got {precision!r}")
