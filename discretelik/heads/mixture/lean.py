r"""Memory-lean log-likelihood of a discretized location-scale mixture: one autograd node.

The eager path (``formula`` under plain autograd) builds every ``(K, C)`` component-channel
quantity at once, and autograd keeps dozens of ``sample_shape + batch_shape + (K, C, H, W)``
tensors for backward. Here a single ``torch.autograd.Function`` (``LeanMixtureLogProb``) walks
the ``K`` components one at a time (a few at a time for small inputs, see ``_STEP_ELEMENTS``),
in forward and again in backward, recomputing the bin masses:

* autograd saves only the raw parameters, the levels and one per-channel tensor
  ``sample_shape + batch_shape + (C, H, W)`` (the maximum below);
* the working set of forward and backward is that of one step's components, ``O(C H W)`` per
  image and component, not ``O(K C H W)``.

It holds no formula of its own: a step's log bin masses are ``formula.component_log_mass``
of the family (the eager path's very functions and branches), and backward recomputes each
step's masses under autograd and pulls the incoming gradient back with
``torch.autograd.grad``. The gradients are therefore the eager path's up to the order of
summation; the graph of a step lives only while that step is differentiated. The price is
compute: forward evaluates the bin masses once, backward twice (once for the posterior
normalisers, once under autograd) and runs their backward once.

**Forward.** With ``v_kc = log pi_k + sum_{j<c} L_kj`` (``formula.log_joint_before``),
channel ``c``'s conditional is ``out_c = logsumexp_k(v_kc + L_kc) - logsumexp_k(v_kc)``, the
eager ``formula.mixture_log_conditional`` regrouped so that it can run over ``k`` online. Both
log-sum-exps share a running maximum ``M_c`` of ``v_kc``, and ``L_kc`` is added only to
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
* ``L_kc ->`` the location, log-scale and coupling parameters of component ``k``: autograd
  through the formula. The levels are data and get no gradient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .formula import bins_of, component_log_mass, component_parameters, log_joint_before
from .layout import MixtureLayout

if TYPE_CHECKING:
    from .formula import Family

__all__ = ["LeanMixtureLogProb", "lean_elementwise_log_prob"]

# Elements of one temporary, ``components_per_step * value.numel()``, up to which several
# components go through the loops at once: small inputs (few images, small images) then take
# fewer steps, where per-operation overhead would dominate, while large ones keep one
# component per step and a working set of O(value.numel()).
_STEP_ELEMENTS = 2**16


def lean_elementwise_log_prob(
    params: Tensor,
    value: Tensor,
    family: type[Family],
    layout: MixtureLayout,
    bins: int,
    min_log_scale: float,
    components_per_step: int | None = None,
) -> Tensor:
    """``log p(x_c | x_<c)`` of every sub-pixel under a discretized mixture of ``family``.

    Equal (up to rounding) to the eager path, with the same gradients, but without ``K``-fold
    temporaries; not twice differentiable.

    Args:
        params: Raw parameters, float32 or float64 ``batch_shape + (P, H, W)`` in ``layout``.
        value: int64 levels in ``[0, bins - 1]``, ``sample_shape + batch_shape + (C, H, W)``
            (already validated).
        family: The continuous family (``formula.Family``).
        layout: The parameter layout (channels, mixtures, coupling).
        bins: Levels per sub-pixel.
        min_log_scale: Lower clamp of the log-scales.
        components_per_step: Components handled by one step of the loops (the temporaries are
            that many times ``value``'s size). ``None``: as many as keep a temporary within
            ``_STEP_ELEMENTS`` elements, at least one. The result is the same up to rounding.

    Returns:
        ``params.dtype`` tensor of ``value``'s shape.
    """
    if components_per_step is None:
        components_per_step = _STEP_ELEMENTS // max(1, value.numel())
    step = max(1, min(layout.mixtures, components_per_step))
    steps = Steps(family, layout, bins, min_log_scale, step, params.device)
    return LeanMixtureLogProb.apply(params, value, steps)


class Steps:
    """The loop over components and one step's log bin masses, from the formula.

    Holds options and the small parameter-channel index tables (on the parameters' device,
    built once per call), since autograd keeps it until backward.
    """

    def __init__(
        self, family: type[Family], layout: MixtureLayout, bins: int, min_log_scale: float,
        step: int, device: torch.device,
    ) -> None:  # fmt: skip
        self.family, self.layout, self.bins = family, layout, bins
        self.min_log_scale, self.step = min_log_scale, step
        loc, log_scale, coeff = layout._block_starts()
        k = torch.arange(layout.mixtures, device=device)[:, None]
        # (K, C) / (K, C) / (K, M) parameter channels of component k; without coefficients
        # (no coupling, or one channel) nothing depends on that block.
        self.indices = [
            torch.tensor(loc, device=device) + k,
            torch.tensor(log_scale, device=device) + k,
        ]
        if layout.coefficients:
            coeff_rows = torch.tensor(coeff, dtype=torch.long, device=device).reshape(1, -1)
            self.indices.append(coeff_rows + k)

    def slices(self) -> list[slice]:
        """The components ``0 .. K - 1`` in slices of ``step``."""
        k = self.layout.mixtures
        return [slice(s, min(k, s + self.step)) for s in range(0, k, self.step)]

    def gather(self, params: Tensor, ks: slice) -> list[Tensor]:
        """Raw location, log-scale (and coefficient) channels of components ``ks``, each
        ``batch + (k, X, H, W)``."""
        out = []
        for index in self.indices:
            rows = index[ks]
            out.append(params.index_select(-3, rows.flatten()).unflatten(-3, rows.shape))
        return out

    def put(self, out: Tensor, ks: slice, grads: list[Tensor]) -> None:
        """Write the gradients of ``gather``'s tensors into the channels of ``out``."""
        for index, g in zip(self.indices, grads):
            rows = index[ks]
            out.index_copy_(-3, rows.flatten(), g.flatten(-4, -3))

    def log_mass(self, bins: Any, loc: Tensor, raw_ls: Tensor, *raw_coeff: Tensor) -> Tensor:
        """The formula: ``L``, ``sample_shape + batch_shape + (k, C, H, W)``."""
        coeff_raw = raw_coeff[0] if raw_coeff else loc[..., :0, :, :]
        log_scale, coeff = component_parameters(raw_ls, coeff_raw, self.min_log_scale)
        return component_log_mass(self.family, bins, loc, log_scale, coeff)


def _start_lse(y: Tensor) -> tuple[Tensor, Tensor]:
    """Online log-sum-exp over axis ``-4``: ``(max, sum exp(y - max))`` of the first step."""
    peak = y.amax(dim=-4)
    return peak, torch.exp(y - peak.unsqueeze(-4)).sum(-4)


def _add_lse(peak: Tensor, total: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Fold the step ``y`` (``(..., k, C, H, W)``) into the running ``(peak, total)``."""
    new_peak = torch.maximum(peak, y.amax(dim=-4))
    total = total * torch.exp(peak - new_peak) + torch.exp(y - new_peak.unsqueeze(-4)).sum(-4)
    return new_peak, total


def _sum_over_samples(t: Tensor, sample_dims: int) -> Tensor:
    """``sample + batch + (...)`` back to ``batch + (...)``."""
    return t.sum(tuple(range(sample_dims))) if sample_dims else t


class LeanMixtureLogProb(torch.autograd.Function):
    """Per-channel conditional log-likelihood; see the module docstring for the math.

    ``apply(params, value, steps)``: raw parameters ``batch_shape + (P, H, W)``, int64 levels
    ``sample_shape + batch_shape + (C, H, W)`` and the ``Steps`` (family, options, loop).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, params: Tensor, value: Tensor, steps: Steps
    ) -> Tensor:
        bins = bins_of(value.unsqueeze(-4), steps.bins - 1, params.dtype)
        log_weights = torch.log_softmax(params.narrow(-3, 0, steps.layout.mixtures), dim=-3)
        top = s_v = peak = s_y = None  # running max of v, sums, max of y (relative to top)
        for ks in steps.slices():
            log_mass = steps.log_mass(bins, *steps.gather(params, ks))
            v = log_joint_before(log_weights[..., ks, :, :], log_mass)  # (..., k, C, H, W)
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
        ctx.steps = steps
        return (peak + torch.log(s_y)) - torch.log(s_v)  # logsumexp(v + L) - logsumexp(v)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        params, value, top = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        steps: Steps = ctx.steps
        bins = bins_of(value.unsqueeze(-4), steps.bins - 1, params.dtype)
        sample_dims = value.dim() - params.dim()
        k_all = steps.layout.mixtures
        log_weights = torch.log_softmax(params.narrow(-3, 0, k_all), dim=-3)
        top = top.unsqueeze(-4)

        # First pass: the normalisers of both posteriors, from the very ``y`` values that the
        # second pass recomputes. Reusing the forward's sums is not enough: forward formed
        # ``y`` against the running maximum, and where every partial joint is huge (~1e7 in
        # float32) a one-ulp difference in ``y - lse`` scales a posterior by e.
        s_v = peak = s_y = None
        for ks in steps.slices():
            log_mass = steps.log_mass(bins, *steps.gather(params, ks))
            centred = log_joint_before(log_weights[..., ks, :, :], log_mass) - top  # v - top
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

        def one_step(ks: slice) -> None:  # a function, so that its tensors go when it returns
            # This step's parameters as fresh leaves: the graph below covers this step only.
            leaves = [t.requires_grad_(True) for t in steps.gather(params.detach(), ks)]
            with torch.enable_grad():
                log_mass = steps.log_mass(bins, *leaves)
            mass = log_mass.detach()
            centred = log_joint_before(log_weights[..., ks, :, :], mass) - top  # as pass one
            y = centred + mass
            before = torch.exp(centred - log_s_v)  # q_kc: posterior before channel c
            after = torch.exp((y - peak) - log_s_y)  # r_kc: posterior after it
            del mass, centred, y
            g_v = grad * (after - before)  # d out_c / d v_kc, times g_c
            d_log_weights.append(_sum_over_samples(g_v.sum(dim=-3), sample_dims))
            # L_kc enters out_c directly and every later channel's v_kc'.
            later = g_v.flip(-3).cumsum(-3).flip(-3)  # sum_{c' >= c}
            later = torch.cat([later[..., 1:, :, :], torch.zeros_like(later[..., :1, :, :])], -3)
            d_mass = grad * after + later
            del g_v, later, before, after
            # Sums over sample_shape and any broadcast happen in autograd; the graph (and
            # every intermediate it saved) is released here.
            steps.put(out, ks, list(torch.autograd.grad(log_mass, leaves, d_mass)))

        for ks in steps.slices():
            one_step(ks)
        d_log_weights = torch.cat(d_log_weights, dim=-3)  # batch + (K, H, W)
        # Through log_softmax: d logits = d lw - softmax * sum_k d lw.
        d_logits = d_log_weights - log_weights.exp() * d_log_weights.sum(-3, keepdim=True)
        out.narrow(-3, 0, k_all).copy_(d_logits)
        return out, None, None
