"""Argument checks shared by heads, distributions, backbones and the model.

Every check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind, wrong
shape or range) with a message that names the argument, says what was expected and what was
received. Nothing here casts, clamps or broadcasts.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.distributions import Distribution

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def value_checks_enabled() -> bool:
    """Whether to run value checks that read tensor contents (and so synchronise a GPU).

    They follow ``torch.distributions``' global switch
    (``Distribution.set_default_validate_args(False)`` turns them off for speed) and are
    skipped while ``torch.compile`` traces, where they would break the graph. Shape and dtype
    checks always run.
    """
    if torch.compiler.is_compiling():
        return False
    return bool(Distribution._validate_args)


def check_tensor(value: object, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_integer_dtype(value: Tensor, name: str) -> None:
    if value.dtype not in _INTEGER_DTYPES:
        raise TypeError(
            f"{name} must be an integer tensor of pixel levels "
            f"(uint8, int8, int16, int32 or int64), got dtype {value.dtype}"
        )


def check_float_dtype(value: Tensor, name: str) -> None:
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")


def check_ndim(value: Tensor, ndim: int, name: str, layout: str) -> None:
    if value.dim() != ndim:
        raise ValueError(
            f"{name} must have {ndim} dimensions {layout}, got shape {tuple(value.shape)}"
        )


def check_levels(value: Tensor, bins: int, name: str) -> None:
    """Check that integer ``value`` lies in ``[0, bins - 1]`` (this synchronises on GPU)."""
    if value.numel() == 0:
        return
    lo, hi = int(value.min()), int(value.max())
    if lo < 0 or hi > bins - 1:
        raise ValueError(
            f"{name} must hold levels in [0, {bins - 1}] (bins={bins}), "
            f"got values in [{lo}, {hi}]"
        )


def check_trailing_shape(value: Tensor, expected: Sequence[int], name: str, layout: str) -> None:
    expected = tuple(expected)
    n = len(expected)
    if value.dim() < n or tuple(value.shape[-n:]) != expected:
        raise ValueError(
            f"{name} must have trailing shape {expected} {layout}, got shape {tuple(value.shape)}"
        )


def check_finite(value: Tensor, name: str) -> None:
    """Check that float ``value`` holds no NaN or infinity (this synchronises on GPU).

    The message counts the offending entries and gives the first one's index, without printing
    the tensor (a parameter map can hold millions of values).
    """
    value = value.detach()  # a check: nothing of it belongs in an autograd graph
    if value.numel() == 0:
        return
    # min and max propagate NaN and show +-inf: two numbers, no temporary of value's size
    # (torch.isfinite needs ~0.75x of it in float32, more than the lean paths' whole budget).
    extremes = torch.stack(torch.aminmax(value))
    if bool(torch.isfinite(extremes).all()):
        return
    bad = ~torch.isfinite(value)
    n_nan = int(torch.isnan(value).sum())
    n_inf = int(bad.sum()) - n_nan
    first = tuple(int(i) for i in bad.nonzero()[0].tolist())
    raise ValueError(
        f"{name} must be finite, got {n_nan} NaN and {n_inf} infinite values out of "
        f"{value.numel()} (shape {tuple(value.shape)}; the first at index {first}: "
        f"{float(value[first])})"
    )
