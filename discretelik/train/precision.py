"""Numeric precision: the autocast dtype of each precision setting, autocast and true float32.

A train step runs the backbone under [`autocast_context`][discretelik.train.autocast_context]
(bf16 when asked for); evaluation opens no autocast and runs inside
[`full_float32`][discretelik.train.full_float32] (TF32 off).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["AUTOCAST_DTYPES", "autocast_context", "full_float32"]

# TrainConfig.precision -> the dtype autocast runs in (None: no autocast, plain float32).
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast(device.type, dtype)``, or a no-op context for ``dtype=None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Disable TF32 for CUDA matmuls and convolutions inside the context (true float32)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
