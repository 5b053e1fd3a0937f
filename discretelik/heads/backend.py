"""Which implementation computes a head's log-likelihood: one argument, one table per family.

Every head and head distribution takes ``log_prob_backend``: ``"auto"`` (the default) lets the
family pick by device, dtype and compilation, any other name asks for that implementation. The
choice is stored on the instance (a head passes it to each distribution it makes, ``expand``
keeps it); there is no class-level or global switch. Each family lists its implementations in
one table of [`LogProbBackend`][discretelik.LogProbBackend] entries, each of which
states in one place what it can compute (``unsupported``) and whether a ``torch.compile`` trace
can call it (``traceable``). All implementations of a family give the same values and
gradients up to rounding: they are checked translations of the family's one formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .base import DiscreteImageDistribution

__all__ = ["AUTO", "LogProbBackend", "check_backend_name", "resolve_backend"]

AUTO = "auto"


def _always(dist: "DiscreteImageDistribution", value: Tensor) -> str | None:
    return None


@dataclass(frozen=True)
class LogProbBackend:
    """One implementation of a family's per-sub-pixel log-likelihood.

    Attributes:
        name: The name users pass as ``log_prob_backend``.
        compute: ``compute(dist, value)``: validated ``int64`` levels
            ``sample_shape + batch_shape + (C, H, W)`` -> float log-probabilities of the same
            shape (float32, or float64 for float64 parameters).
        unsupported: ``unsupported(dist, value)``: ``None`` when this implementation can
            compute the call, else the reason (shown in the error of an explicit request).
        traceable: Whether a ``torch.compile`` trace can call it. A request for one that is
            not (a Python loop over components inside a custom ``autograd.Function``) is
            answered by the family's ``"eager"`` implementation while tracing, which gives the
            same values up to rounding and which the compiler fuses.
        twice_differentiable: Whether its gradient can itself be differentiated.
    """

    name: str
    compute: Callable[["DiscreteImageDistribution", Tensor], Tensor]
    unsupported: Callable[["DiscreteImageDistribution", Tensor], str | None] = _always
    traceable: bool = True
    twice_differentiable: bool = False


def check_backend_name(name: object, table: Mapping[str, LogProbBackend], owner: str) -> str:
    """Validate a ``log_prob_backend`` argument against a family's table.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: ``name`` is neither ``"auto"`` nor in ``table``.
    """
    choices = (AUTO, *table)
    if not isinstance(name, str):
        raise TypeError(f"log_prob_backend must be a str, one of {choices}, got {name!r}")
    if name not in choices:
        raise ValueError(f"log_prob_backend must be one of {choices} for {owner}, got {name!r}")
    return name


def resolve_backend(
    dist: "DiscreteImageDistribution", value: Tensor, auto: Callable[[Tensor], str]
) -> LogProbBackend:
    """The implementation that computes ``dist``'s log-likelihood of ``value``.

    ``"auto"`` asks the family (``auto(value)``); an explicit name is used as it is, except that
    while ``torch.compile`` traces an untraceable one is answered by ``"eager"``.

    Raises:
        ValueError: The requested implementation cannot compute this call (the message says
            why and names the alternatives).
    """
    table = dist.log_prob_backends
    name = dist.log_prob_backend
    backend = table[auto(value) if name == AUTO else name]
    if torch.compiler.is_compiling() and not backend.traceable:
        return table["eager"]
    reason = backend.unsupported(dist, value)
    if reason is not None:
        raise ValueError(
            f"log_prob_backend={backend.name!r} cannot compute this call: {reason}; use "
            f"'auto' or one of {tuple(n for n in table if n != backend.name)}"
        )
    return backend
