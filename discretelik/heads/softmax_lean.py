r"""Memory-lean log-likelihood of the softmax head: one autograd node.

The eager path (``DiscreteSoftmaxDistribution._elementwise_log_prob`` with
``log_prob_backend = "eager"``) forms the log-normaliser from ``exp(logits - peak)`` with plain
autograd, which keeps those exponentials, a whole ``batch_shape + (C, bins, H, W)`` tensor, for
backward; backward then builds the gradient of the gather and of every slice of the normaliser
as separate full-size tensors and adds them up. At ``bins = 256`` the peak is several times the
logits.

Here one ``torch.autograd.Function`` computes the same values, ``(logit - peak) - log_z`` with
the same (shared) normaliser ``shifted_log_normalizer``, and

* saves only the logits (the input itself, no copy), the gather index (a view of the levels)
  and the per-sub-pixel normaliser ``(peak, log_z)`` of shape ``batch_shape + (C, 1, H, W)``;
* backward writes
  ``d logits = scatter_add(index, g) - softmax(logits) * sum_n g``
  straight into the gradient buffer: ``exp(logits - peak)`` goes into it with ``out=``, is
  scaled in place by ``-sum_n g / Z`` (one number per sub-pixel, ``Z = exp(log_z)``), and the
  upstream gradient of every draw is added at its level. Besides the gradient itself nothing
  larger than a ``(C, 1, H, W)``-per-image tensor is allocated.

Levels with sample dimensions arrive as the eager path passes them: the ``n`` draws moved into
the bins axis, ``index`` of shape ``batch_shape + (C, n, H, W)``, so that ``sum_n g`` sums the
gradient over the draws and the gradient keeps the logits' shape. Expanded (stride-0) logits
are read as they are; the gradient is dense with their (expanded) shape, and autograd sums it
back, as for the eager path.

The node is not twice differentiable (``once_differentiable``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["lean_softmax_log_prob", "shifted_log_normalizer"]


def shifted_log_normalizer(logits: Tensor, slices: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """``(peak, log_z)`` with ``logsumexp(logits) = peak + log_z`` over the bins axis (-3).

    Shared by the eager path (under autograd) and the lean path (without), so that both give
    the same values bit for bit.

    Args:
        logits: float ``batch_shape + (C, bins, H, W)``.
        slices: ``(start, length)`` slices of the bins axis that bound the temporaries.

    Returns:
        Two tensors ``batch_shape + (C, 1, H, W)``: the detached maximum over the bins (``0``
        where it is not finite) and ``log(sum exp(logits - peak))``.
    """
    # The peak is a constant shift: detaching it leaves value and gradient unchanged.
    peak = logits.detach().amax(dim=-3, keepdim=True)
    peak = torch.where(peak.isfinite(), peak, torch.zeros_like(peak))
    total = None
    for s, n in slices:
        shifted = logits.narrow(-3, s, n) - peak
        # In place where nothing differentiates through it (same values either way).
        shifted = shifted.exp() if shifted.requires_grad else shifted.exp_()
        part = shifted.sum(dim=-3, keepdim=True)
        del shifted
        total = part if total is None else total + part
    assert total is not None
    return peak, total.log()


class LeanSoftmaxLogProb(torch.autograd.Function):
    """``apply(logits, index, slices)``: log-probabilities ``batch_shape + (C, n, H, W)`` of the
    levels ``index`` (int64, same shape) under ``softmax(logits)`` over axis -3; see the module
    docstring."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: Tensor, index: Tensor, slices: list[tuple[int, int]]
    ) -> Tensor:
        peak, log_z = shifted_log_normalizer(logits, slices)
        picked = logits.gather(-3, index)
        picked.sub_(peak).sub_(log_z)  # (logit - peak) - log_z, as the eager path rounds it
        ctx.save_for_backward(logits, index, peak, log_z)
        return picked

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None
        logits, index, peak, log_z = ctx.saved_tensors
        # d out_n / d logit_k = [k == index_n] - softmax_k; softmax_k = exp(logit_k - peak) / Z.
        scale = grad.sum(dim=-3, keepdim=True).neg_().div_(log_z.exp())  # -sum_n g / Z
        # Dense, whatever the logits' strides (expanded logits have stride-0 dimensions).
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        torch.sub(logits, peak, out=out)
        out.exp_().mul_(scale)
        out.scatter_add_(-3, index, grad)
        return out, None, None


def lean_softmax_log_prob(logits: Tensor, index: Tensor, slices: list[tuple[int, int]]) -> Tensor:
    """``(logits.gather(-3, index) - peak) - log_z`` through ``LeanSoftmaxLogProb``.

    Args:
        logits: float32/float64 ``batch_shape + (C, bins, H, W)``.
        index: int64 levels ``batch_shape + (C, n, H, W)`` (the ``n`` draws in the bins axis).
        slices: ``(start, length)`` slices of the bins axis for the forward's temporaries.

    Returns:
        The log-probabilities, shape and dtype as ``index`` and ``logits``.
    """
    return LeanSoftmaxLogProb.apply(logits, index, slices)
