r"""Memory-lean log-likelihood of the discretized logistic mixture: one autograd node.

The eager path (``LocationScaleMixtureDistribution._elementwise_log_prob``) builds every
``(K, C)`` component-channel quantity at once, and autograd keeps dozens of
``sample_shape + batch_shape + (K, C, H, W)`` tensors for backward. Here a single
``torch.autograd.Function`` walks the ``K`` components one at a time, in forward and again in
backward (recomputing the bin masses), so that:

* autograd saves only the raw parameters, the levels and three per-channel results
  ``sample_shape + batch_shape + (C, H, W)``;
* the working set of forward and backward is ``O(C H W)`` per image, not ``O(K C H W)``;
* the gradients of the log bin masses are analytic, branch by branch, from the same stable
  formulas the eager path evaluates (``DiscretizedLogisticMixtureDistribution._log_interval``).

**Forward.** With ``v_kc = log pi_k + sum_{j<c} L_kj`` (``L_kc`` the log mass of component
``k`` at channel ``c``), channel ``c``'s conditional is
``out_c = logsumexp_k(v_kc + L_kc) - logsumexp_k(v_kc)``. Both log-sum-exps run online over
``k`` with a shared running maximum ``M_c`` of ``v_kc``, and ``L_kc`` is added only to
``v_kc - M_c``: that keeps the eager path's precision when every partial joint is huge
(``~ -1e7`` in float32, where ``v + L`` alone would keep only ``ulp(1e7) = 1``).

**Backward.** With the posteriors before and after channel ``c``,
``q_kc = softmax_k(v_kc)`` and ``r_kc = softmax_k(v_kc + L_kc)``, and the incoming gradient
``g_c``:

* ``d out / d log pi_k = sum_c g_c (r_kc - q_kc)``, then through ``log_softmax`` to the logits;
* ``d out / d L_kc = g_c r_kc + sum_{c' > c} g_c' (r_kc' - q_kc')`` (``L_kc`` enters every
  later ``v_kc'``);
* ``L_kc -> (mu_kc, ls_kc)`` by the analytic derivatives below, ``mu -> `` location and
  coupling coefficients (times ``1 - tanh^2``), ``ls ->`` raw log-scale where it is not below
  the clamp (as ``clamp``'s gradient). The levels are data and get no gradient.

Derivatives of the log bin mass with standardised edges ``u = (e_+ - mu) / s`` and
``l = (e_- - mu) / s`` (``du/dmu = -1/s``, ``du/d log s = -u``, alike for ``l``):

* level 0, ``log sigma(u)``: ``d/du = sigma(-u)``;
* level ``bins - 1``, ``log sigma(-l)``: ``d/dl = -sigma(l)``;
* middle bins, folded to ``a = u, b = l`` (or ``a = -l, b = -u`` when ``u + l < 0``):
    * wide branch ``log sigma(a) + log(1 - rho)``, ``rho = sigma(b) / sigma(a)``:
      ``d/da = sigma(-a) / (1 - rho)``, ``d/db = -rho sigma(-b) / (1 - rho)``;
    * narrow branch ``log sinh(h) - log 2 - log cosh(a/2) - log cosh(b/2)`` with the
      half-width ``h = 1 / ((bins - 1) s)`` taken from the log-scale:
      ``d/da = -tanh(a/2) / 2``, ``d/db = -tanh(b/2) / 2``, and through ``h`` directly
      ``d/d log s = -h coth(h)`` (``-1`` where ``h`` is tiny and ``log(sinh h) = log h``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._mixture import MixtureLayout, coupled_loc

__all__ = ["fused_elementwise_log_prob"]

# The same constants as the eager path (logistic.py): the branches must switch at the same points.
_LOG2 = math.log(2.0)
_TINY_LOG_HALF_WIDTH = -20.0
_FAR_TAIL = 40.0


def fused_elementwise_log_prob(
    params: Tensor, value: Tensor, layout: MixtureLayout, bins: int, min_log_scale: float
) -> Tensor:
    """``log p(x_c | x_<c)`` of every sub-pixel under a discretized logistic mixture.

    Equal (up to rounding) to the eager
    ``DiscretizedLogisticMixtureDistribution.elementwise_log_prob``, with the same gradients,
    but without ``K``-fold temporaries; not twice differentiable.

    Args:
        params: Raw parameters, float32 or float64 ``batch_shape + (P, H, W)`` in ``layout``.
        value: int64 levels in ``[0, bins - 1]``, ``sample_shape + batch_shape + (C, H, W)``
            (already validated).
        layout: The parameter layout (channels, mixtures, coupling).
        bins: Levels per sub-pixel.
        min_log_scale: Lower clamp of the log-scales.

    Returns:
        ``params.dtype`` tensor of ``value``'s shape.
    """
    return _FusedDLMLogProb.apply(params, value, layout, bins, min_log_scale)


class _Geometry:
    """Everything about the levels and the layout that forward and backward both need."""

    def __init__(self, params: Tensor, value: Tensor, layout: MixtureLayout, bins: int) -> None:
        n = bins - 1
        dtype, device = params.dtype, params.device
        self.n = n
        self.layout = layout
        # Bin centres and edges, each rounded once from an exact integer numerator (as eager).
        self.centre = (2 * value - n).to(dtype) / n
        self.upper_edge = (2 * value - (n - 1)).to(dtype) / n
        self.lower_edge = (2 * value - (n + 1)).to(dtype) / n
        self.first = value == 0
        self.last = value == n
        loc, log_scale, coeff = layout._block_starts()
        k = torch.arange(layout.mixtures, device=device)[:, None]
        # (K, C) / (K, C) / (K, M) parameter channels of component k.
        self.loc_index = torch.tensor(loc, device=device) + k
        self.scale_index = torch.tensor(log_scale, device=device) + k
        self.coeff_index = torch.tensor(coeff, dtype=torch.long, device=device).reshape(1, -1) + k
        # Pairs (c, j), j < c, in coefficient-block order c (c - 1) / 2 + j.
        self.pairs = [(c, j) for c in range(1, layout.channels) for j in range(c)]
        if not layout.coupling:
            self.pairs = []
        self.sample_dims = tuple(range(value.dim() - params.dim()))


def _component(
    params: Tensor, geo: _Geometry, k: int, min_log_scale: float, with_grad: bool
) -> tuple[Tensor, ...]:
    """Log bin masses of component ``k`` at every channel, and optionally their derivatives.

    Returns:
        ``L`` (``value``'s shape, float); with ``with_grad`` also ``dL/dmu``, ``dL/dls`` (same
        shape, ``ls`` the clamped log-scale), the raw log-scales ``batch + (C, H, W)`` and the
        ``tanh``-ed coefficients ``batch + (M, H, W)``.
    """
    raw_ls = params.index_select(-3, geo.scale_index[k])  # batch + (C, H, W)
    ls = raw_ls.clamp(min=min_log_scale)
    loc = params.index_select(-3, geo.loc_index[k])
    coeff = torch.tanh(params.index_select(-3, geo.coeff_index[k]))  # batch + (M, H, W)
    channels = geo.layout.channels
    mu = torch.stack(
        torch.broadcast_tensors(
            *[coupled_loc(c, loc, coeff, geo.centre, -3) for c in range(channels)],
            geo.centre[..., 0, :, :],  # broadcast channel 0 over sample_shape too
        )[:channels],
        dim=-3,
    )  # sample + batch + (C, H, W)
    inv_scale = torch.exp(-ls)
    upper = (geo.upper_edge - mu) * inv_scale  # standardised bin edges
    lower = (geo.lower_edge - mu) * inv_scale
    h = inv_scale / geo.n  # standardised half-width
    log_h = -math.log(geo.n) - ls

    # Middle bins: the eager formula, op for op (same values), folded to the right half.
    flip = upper + lower < 0
    a, b = torch.where(flip, -lower, upper), torch.where(flip, -upper, lower)
    wide = (h > 1.0) & (b < _FAR_TAIL)
    aw = torch.where(wide, a, torch.full_like(a, 2.0))
    bw = torch.where(wide, b, torch.full_like(b, -2.0))
    log_a = F.logsigmoid(aw)
    log_ratio = F.logsigmoid(bw) - log_a  # log rho, rho = sigma(b) / sigma(a) < 1
    one_minus_rho = -torch.expm1(log_ratio)
    log_wide = log_a + torch.log(one_minus_rho)
    tiny = log_h < _TINY_LOG_HALF_WIDTH
    safe_h = torch.where(tiny, torch.ones_like(h), h)
    neg_expm1 = -torch.expm1(-2.0 * safe_h)  # 1 - exp(-2h)
    log_sinh = torch.where(tiny, log_h, safe_h + torch.log(neg_expm1) - _LOG2)
    log_narrow = log_sinh - _LOG2 - _log_cosh(a / 2) - _log_cosh(b / 2)
    middle = torch.where(wide, log_wide, log_narrow)
    log_mass = torch.where(
        geo.first, F.logsigmoid(upper), torch.where(geo.last, F.logsigmoid(-lower), middle)
    )
    if not with_grad:
        return (log_mass,)

    # d middle / d(a, b), per branch.
    d_a = torch.where(wide, torch.sigmoid(-aw) / one_minus_rho, -0.5 * torch.tanh(a / 2))
    d_b = torch.where(
        wide, -torch.exp(log_ratio) * torch.sigmoid(-bw) / one_minus_rho, -0.5 * torch.tanh(b / 2)
    )
    # Narrow branch through h = exp(-ls) / n: d log sinh(h) / d ls = -h coth(h), or -1 if tiny.
    h_coth = safe_h * (1.0 + torch.exp(-2.0 * safe_h)) / neg_expm1
    d_ls_h = torch.where(wide, torch.zeros_like(h), torch.where(tiny, -torch.ones_like(h), -h_coth))
    # Unfold: a = -lower, b = -upper where flipped.
    d_upper = torch.where(flip, -d_b, d_a)
    d_lower = torch.where(flip, -d_a, d_b)
    # Edge bins (open on one side): log sigma(upper) and log sigma(-lower).
    zero = torch.zeros_like(d_upper)
    d_upper = torch.where(geo.first, torch.sigmoid(-upper), torch.where(geo.last, zero, d_upper))
    d_lower = torch.where(geo.first, zero, torch.where(geo.last, -torch.sigmoid(lower), d_lower))
    d_ls_h = torch.where(geo.first | geo.last, zero, d_ls_h)
    d_mu = -(d_upper + d_lower) * inv_scale
    d_ls = d_ls_h - upper * d_upper - lower * d_lower
    return log_mass, d_mu, d_ls, raw_ls, coeff


def _log_cosh(y: Tensor) -> Tensor:
    """``log(cosh(y))`` without overflow (as logistic.py)."""
    a = y.abs()
    return a + torch.log1p(torch.exp(-2.0 * a)) - _LOG2


def _before(log_mass: Tensor) -> Tensor:
    """Exclusive cumulative sum over the channel axis ``-3``: ``sum_{j<c} L_j``."""
    return torch.cat(
        [torch.zeros_like(log_mass[..., :1, :, :]), log_mass[..., :-1, :, :].cumsum(dim=-3)],
        dim=-3,
    )


class _FusedDLMLogProb(torch.autograd.Function):
    """Per-channel conditional log-likelihood; see the module docstring for the math."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        params: Tensor,
        value: Tensor,
        layout: MixtureLayout,
        bins: int,
        min_log_scale: float,
    ) -> Tensor:
        geo = _Geometry(params, value, layout, bins)
        log_weights = torch.log_softmax(params.narrow(-3, 0, layout.mixtures), dim=-3)
        top = s_v = peak = s_y = None  # running max of v, sums, max of y (relative to top)
        for k in range(layout.mixtures):
            (log_mass,) = _component(params, geo, k, min_log_scale, with_grad=False)
            v = log_weights[..., k : k + 1, :, :] + _before(log_mass)  # log pi_k + sum_{j<c} L
            if top is None:
                top, s_v = v, torch.ones_like(v)
                peak, s_y = log_mass, torch.ones_like(v)  # y = (v - top) + L = L
                continue
            new_top = torch.maximum(top, v)
            shift = top - new_top  # <= 0: rescales everything kept relative to the old top
            s_v = s_v * torch.exp(shift) + torch.exp(v - new_top)
            y = (v - new_top) + log_mass  # L added to a moderate number: precision kept
            new_peak = torch.maximum(peak + shift, y)
            s_y = s_y * torch.exp(peak + shift - new_peak) + torch.exp(y - new_peak)
            top, peak = new_top, new_peak
        # Only the running maximum is kept: backward recomputes the sums relative to it.
        ctx.save_for_backward(params, value, top)
        ctx.layout, ctx.bins, ctx.min_log_scale = layout, bins, min_log_scale
        return (peak + torch.log(s_y)) - torch.log(s_v)  # logsumexp(v + L) - logsumexp(v)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        params, value, top = ctx.saved_tensors
        layout = ctx.layout
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        geo = _Geometry(params, value, layout, ctx.bins)
        k_all = layout.mixtures
        log_weights = torch.log_softmax(params.narrow(-3, 0, k_all), dim=-3)

        def centred_terms(k: int, log_mass: Tensor) -> tuple[Tensor, Tensor]:
            """``v - top`` and ``y = (v - top) + L`` of component ``k``, op for op alike."""
            centred = (log_weights[..., k : k + 1, :, :] + _before(log_mass)) - top
            return centred, centred + log_mass

        # First pass: the normalisers of both posteriors, from the very ``y`` values that the
        # second pass recomputes. Reusing the forward's sums is not enough: forward formed
        # ``y`` against the running maximum, and where every partial joint is huge (~1e7 in
        # float32) a one-ulp difference in ``y - lse`` scales a posterior by e.
        s_v = peak = s_y = None
        for k in range(k_all):
            (log_mass,) = _component(params, geo, k, ctx.min_log_scale, with_grad=False)
            centred, y = centred_terms(k, log_mass)
            if s_v is None:
                s_v, peak, s_y = torch.exp(centred), y, torch.ones_like(y)
                continue
            s_v = s_v + torch.exp(centred)
            new_peak = torch.maximum(peak, y)
            s_y = s_y * torch.exp(peak - new_peak) + torch.exp(y - new_peak)
            peak = new_peak
        log_s_v, log_s_y = torch.log(s_v), torch.log(s_y)
        # Dense, whatever params' strides (an expanded params has stride-0 dimensions).
        out = torch.zeros(params.shape, dtype=params.dtype, device=params.device)
        d_log_weights = []

        def reduce(t: Tensor) -> Tensor:  # sum over sample_shape: back to batch_shape
            return t.sum(geo.sample_dims) if geo.sample_dims else t

        for k in range(k_all):
            log_mass, d_mu, d_ls, raw_ls, coeff = _component(
                params, geo, k, ctx.min_log_scale, with_grad=True
            )
            centred, y = centred_terms(k, log_mass)
            before = torch.exp(centred - log_s_v)  # q_kc: posterior before channel c
            after = torch.exp((y - peak) - log_s_y)  # r_kc: posterior after it
            g_v = grad * (after - before)  # d out_c / d v_kc, times g_c
            d_log_weights.append(reduce(g_v.sum(dim=-3)))
            # L_kc enters out_c directly and every later channel's v_kc'.
            later = g_v.flip(-3).cumsum(-3).flip(-3)  # sum_{c' >= c}
            later = torch.cat([later[..., 1:, :, :], torch.zeros_like(later[..., :1, :, :])], -3)
            d_mass = grad * after + later
            d_mu = d_mass * d_mu
            d_ls = reduce(d_mass * d_ls)
            d_ls = torch.where(raw_ls >= ctx.min_log_scale, d_ls, torch.zeros_like(d_ls))
            out.index_copy_(-3, geo.scale_index[k], d_ls)
            out.index_copy_(-3, geo.loc_index[k], reduce(d_mu))
            if geo.pairs:
                # mu_kc = loc + sum_j tanh(alpha_{k,cj}) x_j: d alpha = d mu_c x_j (1 - tanh^2).
                d_coeff = torch.stack(
                    [d_mu[..., c, :, :] * geo.centre[..., j, :, :] for c, j in geo.pairs], dim=-3
                )
                out.index_copy_(-3, geo.coeff_index[k], reduce(d_coeff) * (1.0 - coeff * coeff))
        d_log_weights = torch.stack(d_log_weights, dim=-3)  # batch + (K, H, W)
        # Through log_softmax: d logits = d lw - softmax * sum_k d lw.
        d_logits = d_log_weights - log_weights.exp() * d_log_weights.sum(-3, keepdim=True)
        out.narrow(-3, 0, k_all).copy_(d_logits)
        return out, None, None, None, None
