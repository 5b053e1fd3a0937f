r"""Memory-lean log-likelihood of the discretized logistic mixture: one autograd node.

The eager path (``LocationScaleMixtureDistribution._elementwise_log_prob``) builds every
``(K, C)`` component-channel quantity at once, and autograd keeps dozens of
``sample_shape + batch_shape + (K, C, H, W)`` tensors for backward. Here a single
``torch.autograd.Function`` walks the ``K`` components one at a time (a few at a time for small
inputs, see ``_STEP_ELEMENTS``), in forward and again in backward, recomputing the bin masses:

* autograd saves only the raw parameters, the levels and one per-channel tensor
  ``sample_shape + batch_shape + (C, H, W)`` (the maximum below);
* the working set of forward and backward is ``O(C H W)`` per image, not ``O(K C H W)``;
* the gradients of the log bin masses are analytic, branch by branch, from the same stable
  formulas the eager path evaluates (``DiscretizedLogisticMixtureDistribution._log_interval``).

The price is compute: forward evaluates the bin masses once, backward twice (once for the
posterior normalisers, once with derivatives), where the eager path evaluates them once and
differentiates through autograd's saved intermediates.

**Forward.** With ``v_kc = log pi_k + sum_{j<c} L_kj`` (``L_kc`` the log mass of component
``k`` at channel ``c``), channel ``c``'s conditional is
``out_c = logsumexp_k(v_kc + L_kc) - logsumexp_k(v_kc)``. Both log-sum-exps run online over
``k`` with a shared running maximum ``M_c`` of ``v_kc``, and ``L_kc`` is added only to
``v_kc - M_c``: that keeps the eager path's precision when every partial joint is huge
(``~ -1e7`` in float32, where ``v + L`` alone would keep only ``ulp(1e7) = 1``).

**Backward.** A first pass recomputes both normalisers against the final ``M_c``, so that the
posteriors of the second pass are normalised over exactly the values it recomputes. With the
posteriors before and after channel ``c``,
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
# Elements of one temporary, ``components_per_step * value.numel()``, up to which several
# components go through the loops at once: small inputs (few images, small images) then take
# fewer steps, where per-operation overhead would dominate, while large ones keep one
# component per step and a working set of O(value.numel()).
_STEP_ELEMENTS = 2**16


def fused_elementwise_log_prob(
    params: Tensor,
    value: Tensor,
    layout: MixtureLayout,
    bins: int,
    min_log_scale: float,
    components_per_step: int | None = None,
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
        components_per_step: Components handled by one step of the loops (the temporaries are
            that many times ``value``'s size). ``None``: as many as keep a temporary within
            ``_STEP_ELEMENTS`` elements, at least one. Larger steps launch fewer, bigger
            kernels; the result is the same up to rounding.

    Returns:
        ``params.dtype`` tensor of ``value``'s shape.
    """
    k = layout.mixtures
    if components_per_step is None:
        components_per_step = _STEP_ELEMENTS // max(1, value.numel())
    step = max(1, min(k, components_per_step))
    return _FusedDLMLogProb.apply(params, value, layout, bins, min_log_scale, step)


class _Geometry:
    """Everything about the levels and the layout that forward and backward both need."""

    def __init__(self, params: Tensor, value: Tensor, layout: MixtureLayout, bins: int) -> None:
        n = bins - 1
        dtype, device = params.dtype, params.device
        self.n = n
        self.layout = layout
        self.sample_dims = tuple(range(value.dim() - params.dim()))
        value = value.unsqueeze(-4)  # (..., 1, C, H, W): broadcasts over a step's components
        # Bin centres and edges, each rounded once from an exact integer numerator (as eager).
        self.centre = (2 * value - n).to(dtype) / n
        self.upper_edge = (2 * value - (n - 1)).to(dtype) / n
        self.lower_edge = (2 * value - (n + 1)).to(dtype) / n
        self.first = _chooser(value == 0, dtype)
        self.last = _chooser(value == n, dtype)
        self.either = _chooser((value == 0) | (value == n), dtype)
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

    def gather(self, params: Tensor, index: Tensor, ks: slice) -> Tensor:
        """Channels ``index[ks]`` (``(k, X)``) of ``params`` as ``batch + (k, X, H, W)``."""
        rows = index[ks]
        return params.index_select(-3, rows.flatten()).unflatten(-3, rows.shape)


class _chooser:  # noqa: N801  (used like a function: ``pick = _chooser(mask); pick(yes, no)``)
    """``torch.where(mask, yes, no)`` with the mask prepared once for several uses.

    On CPU ``torch.where`` has no vectorised kernel and costs ~15 arithmetic ops (measured:
    136 us vs 9 us for ``lerp`` on 49k floats, one thread), and the bin masses need a dozen
    choices per component. There ``torch.lerp(no, yes, w)`` with ``w`` the mask as 0/1 floats
    gives the same values exactly (``no + 0 * (yes - no)`` and ``yes - (yes - no) * 0``) as long
    as ``yes - no`` is finite. Every choice here is between finite values of one sign or close
    to each other (``a = -lower`` is formed as ``lower * -1`` after choosing between
    ``lower`` and ``upper``), which keeps that difference finite. Elsewhere ``torch.where``.
    """

    def __init__(self, mask: Tensor, dtype: torch.dtype) -> None:
        self.mask = mask
        self.weight = mask.to(dtype) if mask.device.type == "cpu" else None

    def __call__(self, yes: Tensor | float, no: Tensor | float) -> Tensor:
        if self.weight is None:
            return torch.where(self.mask, yes, no)
        if not isinstance(yes, Tensor):
            yes = self.weight.new_tensor(yes)
        if not isinstance(no, Tensor):
            no = self.weight.new_tensor(no)
        return torch.lerp(no, yes, self.weight)


def _component(
    params: Tensor, geo: _Geometry, ks: slice, min_log_scale: float, with_grad: bool
) -> tuple[Tensor, ...]:
    """Log bin masses of components ``ks`` at every channel, optionally with derivatives.

    Returns:
        ``L``, float ``sample_shape + batch_shape + (k, C, H, W)`` for the ``k`` components of
        ``ks``; with ``with_grad`` also ``dL/dmu``, ``dL/dls`` (same shape, ``ls`` the clamped
        log-scale), the raw log-scales ``batch_shape + (k, C, H, W)`` and the ``tanh``-ed
        coefficients ``batch_shape + (k, M, H, W)``.
    """
    raw_ls = geo.gather(params, geo.scale_index, ks)  # batch + (k, C, H, W)
    ls = raw_ls.clamp(min=min_log_scale)
    loc = geo.gather(params, geo.loc_index, ks)
    coeff = torch.tanh(geo.gather(params, geo.coeff_index, ks))  # batch + (k, M, H, W)
    channels = geo.layout.channels
    mu = torch.stack(
        torch.broadcast_tensors(
            *[coupled_loc(c, loc, coeff, geo.centre, -3) for c in range(channels)],
            geo.centre[..., 0, :, :],  # broadcast channel 0 over sample_shape too
        )[:channels],
        dim=-3,
    )  # sample + batch + (k, C, H, W)
    inv_scale = torch.exp(-ls)
    upper = (geo.upper_edge - mu) * inv_scale  # standardised bin edges
    lower = (geo.lower_edge - mu) * inv_scale
    h = inv_scale / geo.n  # standardised half-width
    log_h = -math.log(geo.n) - ls
    # The working set is what this file is about: each tensor here is a full
    # ``(..., k, C, H, W)``, so the ones no longer needed go as soon as possible.
    del ls, loc, mu

    # Middle bins: the eager formula (same values), folded to the right half. ``a = -lower``
    # is taken as ``-1 * lower`` so that every choice is between two close values (see _chooser).
    flip = _chooser(upper + lower < 0, upper.dtype)
    sign = flip(-1.0, 1.0)
    a, b = flip(lower, upper) * sign, flip(upper, lower) * sign
    wide = _chooser((h > 1.0) & (b < _FAR_TAIL), upper.dtype)
    aw, bw = wide(a, 2.0), wide(b, -2.0)  # harmless inputs where unused
    log_a = F.logsigmoid(aw)
    log_ratio = F.logsigmoid(bw) - log_a  # log rho, rho = sigma(b) / sigma(a) < 1
    one_minus_rho = -torch.expm1(log_ratio)
    log_wide = log_a + torch.log(one_minus_rho)
    tiny = _chooser(log_h < _TINY_LOG_HALF_WIDTH, upper.dtype)
    safe_h = tiny(1.0, h)
    neg_expm1 = -torch.expm1(-2.0 * safe_h)  # 1 - exp(-2h)
    log_sinh = tiny(log_h, safe_h + torch.log(neg_expm1) - _LOG2)
    log_narrow = log_sinh - _LOG2 - _log_cosh(a / 2) - _log_cosh(b / 2)
    middle = wide(log_wide, log_narrow)
    log_mass = geo.first(F.logsigmoid(upper), geo.last(F.logsigmoid(-lower), middle))
    if not with_grad:
        return (log_mass,)
    del log_a, log_wide, log_sinh, log_narrow, middle, log_h, h

    # d middle / d(a, b), per branch.
    d_a = wide(torch.sigmoid(-aw) / one_minus_rho, -0.5 * torch.tanh(a / 2))
    d_b = wide(
        -torch.exp(log_ratio) * torch.sigmoid(-bw) / one_minus_rho, -0.5 * torch.tanh(b / 2)
    )
    del aw, bw, log_ratio, one_minus_rho, a, b
    # Narrow branch through h = exp(-ls) / n: d log sinh(h) / d ls = -h coth(h), or -1 if tiny.
    h_coth = safe_h * (1.0 + torch.exp(-2.0 * safe_h)) / neg_expm1
    d_ls_h = wide(0.0, tiny(-1.0, -h_coth))
    del safe_h, neg_expm1, h_coth
    # Unfold (a = -lower, b = -upper where flipped), then the open edge bins:
    # log sigma(upper) at level 0 and log sigma(-lower) at the top level.
    d_upper = geo.first(torch.sigmoid(-upper), geo.last(0.0, flip(d_b, d_a) * sign))
    d_lower = geo.first(0.0, geo.last(-torch.sigmoid(lower), flip(d_a, d_b) * sign))
    d_ls_h = geo.either(0.0, d_ls_h)
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


def _steps(k: int, step: int) -> list[slice]:
    """The components ``0 .. k - 1`` in slices of ``step``."""
    return [slice(start, min(k, start + step)) for start in range(0, k, step)]


def _log_joint_before(log_weights: Tensor, ks: slice, log_mass: Tensor) -> Tensor:
    """``v_kc = log pi_k + sum_{j<c} L_kj`` for components ``ks``: ``(..., k, C, H, W)``."""
    return log_weights[..., ks, :, :].unsqueeze(-3) + _before(log_mass)


def _start_lse(y: Tensor) -> tuple[Tensor, Tensor]:
    """Online log-sum-exp over axis ``-4``: ``(max, sum exp(y - max))`` of the first step."""
    peak = y.amax(dim=-4)
    return peak, torch.exp(y - peak.unsqueeze(-4)).sum(-4)


def _add_lse(peak: Tensor, total: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Fold the step ``y`` (``(..., k, C, H, W)``) into the running ``(peak, total)``."""
    new_peak = torch.maximum(peak, y.amax(dim=-4))
    total = total * torch.exp(peak - new_peak) + torch.exp(y - new_peak.unsqueeze(-4)).sum(-4)
    return new_peak, total


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
        step: int,
    ) -> Tensor:
        geo = _Geometry(params, value, layout, bins)
        log_weights = torch.log_softmax(params.narrow(-3, 0, layout.mixtures), dim=-3)
        top = s_v = peak = s_y = None  # running max of v, sums, max of y (relative to top)
        for ks in _steps(layout.mixtures, step):
            (log_mass,) = _component(params, geo, ks, min_log_scale, with_grad=False)
            v = _log_joint_before(log_weights, ks, log_mass)  # (..., k, C, H, W)
            new_top = v.amax(dim=-4) if top is None else torch.maximum(top, v.amax(dim=-4))
            y = (v - new_top.unsqueeze(-4)) + log_mass  # L added to a moderate number
            if top is None:
                s_v = torch.exp(v - new_top.unsqueeze(-4)).sum(-4)
                peak, s_y = _start_lse(y)
            else:
                shift = top - new_top  # <= 0: rescales what was kept relative to the old top
                s_v = s_v * torch.exp(shift) + torch.exp(v - new_top.unsqueeze(-4)).sum(-4)
                peak, s_y = _add_lse(peak + shift, s_y, y)
            top = new_top
        # Only the running maximum is kept: backward recomputes the sums relative to it.
        ctx.save_for_backward(params, value, top)
        ctx.layout, ctx.bins, ctx.min_log_scale, ctx.step = layout, bins, min_log_scale, step
        return (peak + torch.log(s_y)) - torch.log(s_v)  # logsumexp(v + L) - logsumexp(v)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        params, value, top = ctx.saved_tensors
        layout = ctx.layout
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        geo = _Geometry(params, value, layout, ctx.bins)
        k_all = layout.mixtures
        log_weights = torch.log_softmax(params.narrow(-3, 0, k_all), dim=-3)
        top = top.unsqueeze(-4)

        # First pass: the normalisers of both posteriors, from the very ``y`` values that the
        # second pass recomputes. Reusing the forward's sums is not enough: forward formed
        # ``y`` against the running maximum, and where every partial joint is huge (~1e7 in
        # float32) a one-ulp difference in ``y - lse`` scales a posterior by e.
        s_v = peak = s_y = None
        for ks in _steps(k_all, ctx.step):
            (log_mass,) = _component(params, geo, ks, ctx.min_log_scale, with_grad=False)
            centred = _log_joint_before(log_weights, ks, log_mass) - top  # v - top
            y = centred + log_mass
            exp_centred = torch.exp(centred).sum(-4)
            if s_v is None:
                s_v, (peak, s_y) = exp_centred, _start_lse(y)
            else:
                s_v, (peak, s_y) = s_v + exp_centred, _add_lse(peak, s_y, y)
        log_s_v, log_s_y = torch.log(s_v).unsqueeze(-4), torch.log(s_y).unsqueeze(-4)
        peak = peak.unsqueeze(-4)
        grad = grad.unsqueeze(-4)
        # Dense, whatever params' strides (an expanded params has stride-0 dimensions).
        out = torch.zeros(params.shape, dtype=params.dtype, device=params.device)
        d_log_weights = []

        def reduce(t: Tensor) -> Tensor:  # sum over sample_shape: back to batch_shape
            return t.sum(geo.sample_dims) if geo.sample_dims else t

        def put(index: Tensor, ks: slice, t: Tensor) -> None:  # t: batch + (k, X, H, W)
            out.index_copy_(-3, index[ks].flatten(), t.flatten(-4, -3))

        def one_step(ks: slice) -> None:  # a function, so that its tensors go when it returns
            log_mass, d_mu, d_ls, raw_ls, coeff = _component(
                params, geo, ks, ctx.min_log_scale, with_grad=True
            )
            centred = _log_joint_before(log_weights, ks, log_mass) - top  # v - top, op for op
            y = centred + log_mass  # as in the first pass
            before = torch.exp(centred - log_s_v)  # q_kc: posterior before channel c
            after = torch.exp((y - peak) - log_s_y)  # r_kc: posterior after it
            del log_mass, centred, y
            g_v = grad * (after - before)  # d out_c / d v_kc, times g_c
            d_log_weights.append(reduce(g_v.sum(dim=-3)))  # batch + (k, H, W)
            # L_kc enters out_c directly and every later channel's v_kc'.
            later = g_v.flip(-3).cumsum(-3).flip(-3)  # sum_{c' >= c}
            later = torch.cat([later[..., 1:, :, :], torch.zeros_like(later[..., :1, :, :])], -3)
            d_mass = grad * after + later
            del g_v, later, before, after
            d_mu = d_mass * d_mu
            d_ls = reduce(d_mass * d_ls)
            del d_mass
            # Below the clamp the raw log-scale gets no gradient (as clamp's backward).
            put(geo.scale_index, ks, _chooser(raw_ls >= ctx.min_log_scale, d_ls.dtype)(d_ls, 0.0))
            put(geo.loc_index, ks, reduce(d_mu))
            if geo.pairs:
                # mu_kc = loc + sum_j tanh(alpha_{k,cj}) x_j: d alpha = d mu_c x_j (1 - tanh^2).
                d_coeff = torch.stack(
                    [d_mu[..., c, :, :] * geo.centre[..., j, :, :] for c, j in geo.pairs], dim=-3
                )
                put(geo.coeff_index, ks, reduce(d_coeff) * (1.0 - coeff * coeff))

        for ks in _steps(k_all, ctx.step):
            one_step(ks)
        d_log_weights = torch.cat(d_log_weights, dim=-3)  # batch + (K, H, W)
        # Through log_softmax: d logits = d lw - softmax * sum_k d lw.
        d_logits = d_log_weights - log_weights.exp() * d_log_weights.sum(-3, keepdim=True)
        out.narrow(-3, 0, k_all).copy_(d_logits)
        return out, None, None, None, None, None
