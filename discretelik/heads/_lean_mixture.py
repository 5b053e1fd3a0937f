r"""Memory-lean log-likelihood of a discretized location-scale mixture: one autograd node.

The eager path (``LocationScaleMixtureDistribution._elementwise_log_prob``) builds every
``(K, C)`` component-channel quantity at once, and autograd keeps dozens of
``sample_shape + batch_shape + (K, C, H, W)`` tensors for backward. Here a single
``torch.autograd.Function`` (``LeanMixtureLogProb``) walks the ``K`` components one at a time
(a few at a time for small inputs, see ``_STEP_ELEMENTS``), in forward and again in backward,
recomputing the bin masses:

* autograd saves only the raw parameters, the levels and one per-channel tensor
  ``sample_shape + batch_shape + (C, H, W)`` (the maximum below);
* the working set of forward and backward is that of one step's components, ``O(C H W)`` per
  image and component, not ``O(K C H W)``.

The loop, the online log-sum-exp and the posterior algebra are the same for every family; the
log bin masses of one step's components and their pullback to the raw parameters come from a
``ComponentMasses``:

* ``AutogradMasses`` (any ``LocationScaleMixtureDistribution`` subclass, used by the
  discretized Gaussian): the masses come from the family's own ``_log_bin_mass_at`` (the very
  formulas of the eager path), and backward recomputes each step's masses under autograd and
  pulls the incoming gradient back with ``torch.autograd.grad``. The gradients are therefore
  the eager path's (same formulas, same branches) up to the order of summation; the graph of a
  step lives only while that step is differentiated;
* ``discretelik.heads._fused_dlm`` (the discretized logistic mixture): analytic derivatives,
  which save the recomputation under autograd.

The price is compute: forward evaluates the bin masses once, backward twice (once for the
posterior normalisers, once with derivatives; under autograd that second evaluation also runs
the family's backward), where the eager path evaluates them once and differentiates through
autograd's saved intermediates.

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
* ``L_kc ->`` the location, log-scale and coupling parameters of component ``k``: the
  ``ComponentMasses``' pullback. The levels are data and get no gradient.
"""

from __future__ import annotations

import abc
from typing import Any, Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._mixture import LocationScaleMixtureDistribution, MixtureLayout, coupled_loc

__all__ = ["lean_elementwise_log_prob", "AutogradMasses", "ComponentMasses", "LeanMixtureLogProb"]

# Elements of one temporary, ``components_per_step * value.numel()``, up to which several
# components go through the loops at once: small inputs (few images, small images) then take
# fewer steps, where per-operation overhead would dominate, while large ones keep one
# component per step and a working set of O(value.numel()).
_STEP_ELEMENTS = 2**16


def step_size(value: Tensor, mixtures: int, components_per_step: int | None, budget: int) -> int:
    """Components per loop step: as asked, or as many as keep a temporary within ``budget``."""
    if components_per_step is None:
        components_per_step = budget // max(1, value.numel())
    return max(1, min(mixtures, components_per_step))


def lean_elementwise_log_prob(
    params: Tensor,
    value: Tensor,
    family: type[LocationScaleMixtureDistribution],
    layout: MixtureLayout,
    bins: int,
    min_log_scale: float,
    components_per_step: int | None = None,
) -> Tensor:
    """``log p(x_c | x_<c)`` of every sub-pixel under a discretized mixture of ``family``.

    Equal (up to rounding) to the eager ``family(...).elementwise_log_prob``, with the same
    gradients, but without ``K``-fold temporaries; not twice differentiable.

    Args:
        params: Raw parameters, float32 or float64 ``batch_shape + (P, H, W)`` in ``layout``.
        value: int64 levels in ``[0, bins - 1]``, ``sample_shape + batch_shape + (C, H, W)``
            (already validated).
        family: The distribution class whose ``_log_bin_mass_at`` gives a component's log bin
            mass (e.g. ``DiscretizedGaussianDistribution``).
        layout: The parameter layout (channels, mixtures, coupling).
        bins: Levels per sub-pixel.
        min_log_scale: Lower clamp of the log-scales.
        components_per_step: Components handled by one step of the loops (the temporaries are
            that many times ``value``'s size). ``None``: as many as keep a temporary within
            ``_STEP_ELEMENTS`` elements, at least one. The result is the same up to rounding.

    Returns:
        ``params.dtype`` tensor of ``value``'s shape.
    """
    step = step_size(value, layout.mixtures, components_per_step, _STEP_ELEMENTS)
    masses = AutogradMasses(family, layout, bins, min_log_scale)
    return LeanMixtureLogProb.apply(params, value, masses, step)


class Geometry:
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
        self.first = chooser(value == 0, dtype)
        self.last = chooser(value == n, dtype)
        self.either = chooser((value == 0) | (value == n), dtype)
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

    def reduce(self, t: Tensor) -> Tensor:
        """Sum over ``sample_shape``: ``sample + batch + (...)`` back to ``batch + (...)``."""
        return t.sum(self.sample_dims) if self.sample_dims else t

    @staticmethod
    def put(out: Tensor, index: Tensor, ks: slice, t: Tensor) -> None:
        """Write ``t`` (``batch + (k, X, H, W)``) to the channels ``index[ks]`` of ``out``."""
        out.index_copy_(-3, index[ks].flatten(), t.flatten(-4, -3))


class chooser:  # noqa: N801  (used like a function: ``pick = chooser(mask); pick(yes, no)``)
    """``torch.where(mask, yes, no)`` with the mask prepared once for several uses.

    On CPU ``torch.where`` has no vectorised kernel and costs ~15 arithmetic ops (measured:
    136 us vs 9 us for ``lerp`` on 49k floats, one thread), and the bin masses need a dozen
    choices per component. There ``torch.lerp(no, yes, w)`` with ``w`` the mask as 0/1 floats
    gives the same values exactly (``no + 0 * (yes - no)`` and ``yes - (yes - no) * 0``) as long
    as ``yes - no`` is finite: a caller must only choose between finite values of one sign or
    close to each other. Elsewhere ``torch.where``.
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


def coupled_locations(loc: Tensor, coeff: Tensor, geo: Geometry) -> Tensor:
    """``mu_kc`` of a step's components: ``sample + batch + (k, C, H, W)``.

    ``loc`` ``batch + (k, C, H, W)``, ``coeff`` (``tanh``-ed) ``batch + (k, M, H, W)``.
    """
    channels = geo.layout.channels
    return torch.stack(
        torch.broadcast_tensors(
            *[coupled_loc(c, loc, coeff, geo.centre, -3) for c in range(channels)],
            geo.centre[..., 0, :, :],  # broadcast channel 0 over sample_shape too
        )[:channels],
        dim=-3,
    )


# -- the mixture part: the same for every family ----------------------------------------------
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


Pullback = Callable[[Tensor, Tensor], None]


class ComponentMasses(abc.ABC):
    """The family-specific part of ``LeanMixtureLogProb``: one step's log bin masses.

    Holds only options (no tensors), since autograd keeps it until backward.

    Args:
        layout: The parameter layout (channels, mixtures, coupling).
        bins: Levels per sub-pixel.
        min_log_scale: Lower clamp of the log-scales.
    """

    def __init__(self, layout: MixtureLayout, bins: int, min_log_scale: float) -> None:
        self.layout, self.bins, self.min_log_scale = layout, bins, min_log_scale

    @abc.abstractmethod
    def log_mass(self, params: Tensor, geo: Geometry, ks: slice) -> Tensor:
        """``L``, float ``sample_shape + batch_shape + (k, C, H, W)`` for the components ``ks``."""

    @abc.abstractmethod
    def log_mass_and_pullback(
        self, params: Tensor, geo: Geometry, ks: slice
    ) -> tuple[Tensor, Pullback]:
        """``L`` as ``log_mass`` (the same values), and its pullback.

        The pullback ``(d_mass, out)`` takes ``dout/dL`` (``L``'s shape) and writes the
        gradient of the raw location, log-scale and coupling channels of the components ``ks``
        into ``out`` (``params``' shape, dense); the logits are the caller's.
        """


class AutogradMasses(ComponentMasses):
    """Any family's log bin masses, differentiated by recomputing a step under autograd.

    Args:
        family: The distribution class; its ``_log_bin_mass_at`` gives the masses.
        layout: The parameter layout (channels, mixtures, coupling).
        bins: Levels per sub-pixel.
        min_log_scale: Lower clamp of the log-scales.
    """

    def __init__(
        self,
        family: type[LocationScaleMixtureDistribution],
        layout: MixtureLayout,
        bins: int,
        min_log_scale: float,
    ) -> None:
        super().__init__(layout, bins, min_log_scale)
        self.family = family

    def _indices(self, geo: Geometry) -> list[Tensor]:
        # Without coefficients (no coupling, or one channel) nothing depends on that block.
        indices = [geo.loc_index, geo.scale_index]
        return indices + [geo.coeff_index] if self.layout.coefficients else indices

    def _log_mass(self, geo: Geometry, loc: Tensor, raw_ls: Tensor, *raw_coeff: Tensor) -> Tensor:
        # The eager path's operations (``_parts`` and ``_component_log_mass``) on one step.
        ls = raw_ls.clamp(min=self.min_log_scale)
        coeff = torch.tanh(raw_coeff[0]) if raw_coeff else loc[..., :0, :, :]
        mu = coupled_locations(loc, coeff, geo)
        return self.family._log_bin_mass_at(
            geo.upper_edge, geo.lower_edge, geo.first.mask, geo.last.mask, mu, ls, geo.n
        )

    def log_mass(self, params: Tensor, geo: Geometry, ks: slice) -> Tensor:
        return self._log_mass(geo, *(geo.gather(params, i, ks) for i in self._indices(geo)))

    def log_mass_and_pullback(
        self, params: Tensor, geo: Geometry, ks: slice
    ) -> tuple[Tensor, Pullback]:
        indices = self._indices(geo)
        # This step's parameters as fresh leaves: the graph below covers this step only.
        leaves = [geo.gather(params.detach(), i, ks).requires_grad_(True) for i in indices]
        with torch.enable_grad():
            log_mass = self._log_mass(geo, *leaves)

        def pullback(d_mass: Tensor, out: Tensor) -> None:
            # Sums over sample_shape and any broadcast happen in autograd; the graph (and every
            # intermediate it saved) is released here.
            grads = torch.autograd.grad(log_mass, leaves, d_mass)
            for index, g in zip(indices, grads):
                geo.put(out, index, ks, g)

        return log_mass.detach(), pullback


class LeanMixtureLogProb(torch.autograd.Function):
    """Per-channel conditional log-likelihood; see the module docstring for the math.

    ``apply(params, value, masses, step)``: raw parameters ``batch_shape + (P, H, W)``, int64
    levels ``sample_shape + batch_shape + (C, H, W)``, a ``ComponentMasses`` and the number of
    components per loop step.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, params: Tensor, value: Tensor, masses: ComponentMasses, step: int
    ) -> Tensor:
        layout = masses.layout
        geo = Geometry(params, value, layout, masses.bins)
        log_weights = torch.log_softmax(params.narrow(-3, 0, layout.mixtures), dim=-3)
        top = s_v = peak = s_y = None  # running max of v, sums, max of y (relative to top)
        for ks in _steps(layout.mixtures, step):
            log_mass = masses.log_mass(params, geo, ks)
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
        ctx.masses, ctx.step = masses, step
        return (peak + torch.log(s_y)) - torch.log(s_v)  # logsumexp(v + L) - logsumexp(v)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        params, value, top = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        masses = ctx.masses
        geo = Geometry(params, value, masses.layout, masses.bins)
        k_all = masses.layout.mixtures
        log_weights = torch.log_softmax(params.narrow(-3, 0, k_all), dim=-3)
        top = top.unsqueeze(-4)

        # First pass: the normalisers of both posteriors, from the very ``y`` values that the
        # second pass recomputes. Reusing the forward's sums is not enough: forward formed
        # ``y`` against the running maximum, and where every partial joint is huge (~1e7 in
        # float32) a one-ulp difference in ``y - lse`` scales a posterior by e.
        s_v = peak = s_y = None
        for ks in _steps(k_all, ctx.step):
            log_mass = masses.log_mass(params, geo, ks)
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

        def one_step(ks: slice) -> None:  # a function, so that its tensors go when it returns
            log_mass, pullback = masses.log_mass_and_pullback(params, geo, ks)
            centred = _log_joint_before(log_weights, ks, log_mass) - top  # v - top, op for op
            y = centred + log_mass  # as in the first pass
            before = torch.exp(centred - log_s_v)  # q_kc: posterior before channel c
            after = torch.exp((y - peak) - log_s_y)  # r_kc: posterior after it
            del log_mass, centred, y
            g_v = grad * (after - before)  # d out_c / d v_kc, times g_c
            d_log_weights.append(geo.reduce(g_v.sum(dim=-3)))  # batch + (k, H, W)
            # L_kc enters out_c directly and every later channel's v_kc'.
            later = g_v.flip(-3).cumsum(-3).flip(-3)  # sum_{c' >= c}
            later = torch.cat([later[..., 1:, :, :], torch.zeros_like(later[..., :1, :, :])], -3)
            d_mass = grad * after + later
            del g_v, later, before, after
            pullback(d_mass, out)

        for ks in _steps(k_all, ctx.step):
            one_step(ks)
        d_log_weights = torch.cat(d_log_weights, dim=-3)  # batch + (K, H, W)
        # Through log_softmax: d logits = d lw - softmax * sum_k d lw.
        d_logits = d_log_weights - log_weights.exp() * d_log_weights.sum(-3, keepdim=True)
        out.narrow(-3, 0, k_all).copy_(d_logits)
        return out, None, None, None
