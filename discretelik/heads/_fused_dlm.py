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

The component loop, the online log-sum-exp (a shared running maximum ``M_c`` of the partial
joints ``v_kc``, with ``L_kc`` added only to ``v_kc - M_c``, which keeps the eager path's
precision when every partial joint is huge) and the posterior algebra of forward and backward
are shared with the other families: ``discretelik.heads._lean_mixture`` (read its module
docstring for that math). This module supplies the logistic's log bin masses ``L_kc`` and their
pullback ``dout/dL_kc -> (mu_kc, ls_kc)`` by the analytic derivatives below, then ``mu ->``
location and coupling coefficients (times ``1 - tanh^2``), ``ls ->`` raw log-scale where it is
not below the clamp (as ``clamp``'s gradient).

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

import torch
import torch.nn.functional as F
from torch import Tensor

from ._lean_mixture import (
    _STEP_ELEMENTS,
    ComponentMasses,
    Geometry,
    LeanMixtureLogProb,
    Pullback,
    chooser,
    coupled_locations,
    step_size,
)
from ._mixture import MixtureLayout

__all__ = ["fused_elementwise_log_prob"]

# The same constants as the eager path (logistic.py): the branches must switch at the same points.
_LOG2 = math.log(2.0)
_TINY_LOG_HALF_WIDTH = -20.0
_FAR_TAIL = 40.0
# ``_STEP_ELEMENTS``, the element budget of one loop step's temporaries, is imported above and
# read from this module's namespace by ``fused_elementwise_log_prob``.


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
    step = step_size(value, layout.mixtures, components_per_step, _STEP_ELEMENTS)
    masses = _LogisticMasses(layout, bins, min_log_scale)
    return _FusedDLMLogProb.apply(params, value, masses, step)


class _FusedDLMLogProb(LeanMixtureLogProb):
    """``LeanMixtureLogProb`` under its own name (``_FusedDLMLogProbBackward`` in graphs)."""


class _LogisticMasses(ComponentMasses):
    """The logistic's log bin masses with the analytic pullback (module docstring)."""

    def log_mass(self, params: Tensor, geo: Geometry, ks: slice) -> Tensor:
        (log_mass,) = _component(params, geo, ks, self.min_log_scale, with_grad=False)
        return log_mass

    def log_mass_and_pullback(
        self, params: Tensor, geo: Geometry, ks: slice
    ) -> tuple[Tensor, Pullback]:
        log_mass, d_mu, d_ls, raw_ls, coeff = _component(
            params, geo, ks, self.min_log_scale, with_grad=True
        )
        min_log_scale = self.min_log_scale

        def pullback(d_mass: Tensor, out: Tensor) -> None:
            nonlocal d_mu, d_ls  # rebound below, so that the step's derivatives go early
            d_mu = d_mass * d_mu
            d_ls = geo.reduce(d_mass * d_ls)
            del d_mass
            # Below the clamp the raw log-scale gets no gradient (as clamp's backward).
            keep = chooser(raw_ls >= min_log_scale, d_ls.dtype)
            geo.put(out, geo.scale_index, ks, keep(d_ls, 0.0))
            geo.put(out, geo.loc_index, ks, geo.reduce(d_mu))
            if geo.pairs:
                # mu_kc = loc + sum_j tanh(alpha_{k,cj}) x_j: d alpha = d mu_c x_j (1 - tanh^2).
                d_coeff = torch.stack(
                    [d_mu[..., c, :, :] * geo.centre[..., j, :, :] for c, j in geo.pairs], dim=-3
                )
                geo.put(out, geo.coeff_index, ks, geo.reduce(d_coeff) * (1.0 - coeff * coeff))

        return log_mass, pullback


def _component(
    params: Tensor, geo: Geometry, ks: slice, min_log_scale: float, with_grad: bool
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
    mu = coupled_locations(loc, coeff, geo)  # sample + batch + (k, C, H, W)
    inv_scale = torch.exp(-ls)
    upper = (geo.upper_edge - mu) * inv_scale  # standardised bin edges
    lower = (geo.lower_edge - mu) * inv_scale
    h = inv_scale / geo.n  # standardised half-width
    log_h = -math.log(geo.n) - ls
    # The working set is what this file is about: each tensor here is a full
    # ``(..., k, C, H, W)``, so the ones no longer needed go as soon as possible.
    del ls, loc, mu

    # Middle bins: the eager formula (same values), folded to the right half. ``a = -lower``
    # is taken as ``-1 * lower`` so that every choice is between two close values (see chooser).
    flip = chooser(upper + lower < 0, upper.dtype)
    sign = flip(-1.0, 1.0)
    a, b = flip(lower, upper) * sign, flip(upper, lower) * sign
    wide = chooser((h > 1.0) & (b < _FAR_TAIL), upper.dtype)
    aw, bw = wide(a, 2.0), wide(b, -2.0)  # harmless inputs where unused
    log_a = F.logsigmoid(aw)
    log_ratio = F.logsigmoid(bw) - log_a  # log rho, rho = sigma(b) / sigma(a) < 1
    one_minus_rho = -torch.expm1(log_ratio)
    log_wide = log_a + torch.log(one_minus_rho)
    tiny = chooser(log_h < _TINY_LOG_HALF_WIDTH, upper.dtype)
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
