"""The memory-lean log-likelihood of the discretized Gaussian against its eager reference path.

The lean path (``discretelik.heads._lean_mixture``) shares the component loop and online
log-sum-exp with the logistic head's (``test_fused_dlm.py``) and differentiates each step's bin
masses by recomputing them under autograd. As there:

* float64: values and gradients equal the eager path to rounding, and
  ``torch.autograd.gradcheck`` passes on small shapes (both edge bins, clamped log-scales,
  coupling on and off, sample_shape leading dimensions, expanded parameters, ``K = 1``);
* float32 at random and extreme raw parameters (up to ``1e4``), edge bins, bins 2 to 65536,
  1/3/4 channels, with and without coupling: finite, values equal the eager path's, gradients
  close to the exact (float64) gradient of the same float32-rounded parameters;
* memory: autograd saves only the parameters, the levels and one ``(..., C, H, W)`` tensor,
  and no operation in forward or backward makes a ``K``-fold ``(..., K, C, H, W)`` tensor (the
  eager path does both, which shows the checks can fail).
"""

from __future__ import annotations

import pytest
import torch
from test_fused_dlm import _LargestOutput, case, extreme_case

from discretelik.heads import _lean_mixture
from discretelik.heads._lean_mixture import lean_elementwise_log_prob
from discretelik.heads._mixture import MixtureLayout
from discretelik.heads.gaussian import DiscretizedGaussian, DiscretizedGaussianDistribution
from discretelik.heads.logistic import DiscretizedLogisticMixtureDistribution


@pytest.fixture(params=["one component per step", "all components at once"])
def steps(request, monkeypatch) -> None:
    """Run a test with one component per loop step, and with the small-input default, which
    takes every component of these small cases at once."""
    if request.param == "one component per step":
        monkeypatch.setattr(_lean_mixture, "_STEP_ELEMENTS", 1)


def dist(params, channels, mixtures, bins, coupling, lean, **kw):
    d = DiscretizedGaussianDistribution(
        params, channels=channels, mixtures=mixtures, bins=bins, coupling=coupling, **kw
    )
    d.log_prob_backend = "lean" if lean else "eager"
    return d


def value_and_grad(params, x, weights, lean, **kw):
    """``elementwise_log_prob`` and the gradient of its ``weights``-weighted sum."""
    params = params.detach().requires_grad_(True)
    elp = dist(params, lean=lean, **kw).elementwise_log_prob(x)
    (grad,) = torch.autograd.grad((elp * weights).sum(), params)
    return elp.detach(), grad


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("bins", [2, 32, 256, 65536])
@pytest.mark.parametrize("coupling", [True, False])
def test_float64_matches_eager(channels: int, bins: int, coupling: bool, steps) -> None:
    kw = dict(channels=channels, mixtures=3, bins=bins, coupling=coupling)
    params, x, weights = case(bins + channels, sample=(2,), **kw)
    lean = value_and_grad(params, x, weights, True, **kw)
    eager = value_and_grad(params, x, weights, False, **kw)
    torch.testing.assert_close(lean[0], eager[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lean[1], eager[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("channels", "mixtures", "bins", "coupling", "sample"),
    [
        (3, 3, 256, True, ()),
        (1, 2, 2, True, (2,)),
        (4, 2, 32, True, ()),
        (3, 2, 16, False, (2, 1)),
    ],
)
def test_gradcheck(
    channels: int, mixtures: int, bins: int, coupling: bool, sample, steps
) -> None:
    layout = MixtureLayout(channels, mixtures, coupling)
    params, x, _ = case(
        7, channels, mixtures, bins, coupling, batch=(1,), sample=sample, hw=(1, 2)
    )
    # Keep raw log-scales off the clamp at -7, where the gradient jumps (one below, clamped).
    scale_channels = layout.split(torch.arange(float(layout.param_channels))[:, None, None])[2]
    values = torch.tensor([-9.0, -2.0, 0.5, -1.0], dtype=torch.float64)
    n_scales = scale_channels.numel()
    params[:, scale_channels.flatten().long()] = values.repeat(n_scales)[:n_scales, None, None]
    params.requires_grad_(True)

    def fn(p):
        return lean_elementwise_log_prob(
            p, x, DiscretizedGaussianDistribution, layout, bins, -7.0
        )

    assert torch.autograd.gradcheck(fn, (params,))


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("bins", [2, 32, 256, 65536])
@pytest.mark.parametrize("coupling", [True, False])
def test_float32_extreme_parameters(channels: int, bins: int, coupling: bool, steps) -> None:
    """Random and extreme (+-1e4) raw parameters at edge and near-edge bins."""
    k = 3
    params, x = extreme_case(channels, k, bins, coupling, n=12)
    weights = torch.ones(x.shape)
    kw = dict(channels=channels, mixtures=k, bins=bins, coupling=coupling)
    value, grad = value_and_grad(params, x, weights, True, **kw)
    eager_value, _ = value_and_grad(params, x, weights, False, **kw)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(value, eager_value, rtol=1e-6, atol=1e-5)
    # The exact values and gradient of the float32-rounded parameters; gradients per image
    # relative to its largest entry.
    true_value, truth = value_and_grad(params.double(), x, weights.double(), False, **kw)
    torch.testing.assert_close(value.double(), true_value, rtol=1e-5, atol=1e-4)
    _, eager_grad = value_and_grad(params, x, weights, False, **kw)
    bound = 5e-3 * truth.abs().flatten(1).amax(1) + 1e-6
    err = (grad.double() - truth).abs().flatten(1).amax(1)
    eager_err = (eager_grad.double() - truth).abs().flatten(1).amax(1)
    # Far in a tail a Gaussian log-mass reaches ~-6e13 (one float32 ulp ~4e6): where two
    # components' masses differ by less than that, float32 cannot tell their posterior weights,
    # and neither path gets the gradient (seen in 4 of these 864 images, the eager path off by
    # 100 % there). The lean path must be as good as the bound, or no worse than eager.
    assert (err <= torch.maximum(bound, 1.01 * eager_err)).all(), (err / bound).max()
    assert (err > bound).sum() <= 1


def test_sample_shape_and_expanded_params(steps) -> None:
    """Leading sample dimensions and ``expand``-ed (stride 0) parameters."""
    kw = dict(channels=3, mixtures=4, bins=256, coupling=True)
    params, x, weights = case(3, batch=(1, 2), sample=(3,), **kw)
    params = params.expand(2, 2, *params.shape[2:])  # batch (2, 2), stride 0 in dim 0
    x = torch.cat([x, x.flip(1)], dim=1)  # (3, 2, 2, C, H, W)
    weights = torch.cat([weights, weights], dim=1)
    lean = value_and_grad(params, x, weights, True, **kw)
    eager = value_and_grad(params, x, weights, False, **kw)
    assert lean[0].shape == x.shape and lean[1].shape == params.shape
    torch.testing.assert_close(lean, eager, rtol=1e-10, atol=1e-12)
    big = dist(params[0, :1], lean=True, **kw).expand((4, 1))
    assert big.log_prob_backend == "lean"  # a per-instance choice survives expand
    assert big.log_prob(x[0, :1, 0].expand(4, 1, *x.shape[3:])).shape == (4, 1)


def test_no_grad_and_single_component(steps) -> None:
    kw = dict(channels=3, mixtures=1, bins=256, coupling=True)
    params, x, weights = case(4, **kw)
    lean = value_and_grad(params, x, weights, True, **kw)
    eager = value_and_grad(params, x, weights, False, **kw)
    torch.testing.assert_close(lean, eager, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        lp = dist(params, lean=True, **kw).log_prob(x)
    torch.testing.assert_close(lp, eager[0].sum((-3, -2, -1)))


def test_components_per_step() -> None:
    """Any step size gives the same values and gradients (up to rounding)."""
    kw = dict(channels=3, mixtures=5, bins=256, coupling=True)
    layout = MixtureLayout(3, 5, True)
    params, x, weights = case(8, sample=(2,), **kw)
    results = []
    for step in (1, 2, 5, 100):
        p = params.detach().requires_grad_(True)
        elp = lean_elementwise_log_prob(
            p, x, DiscretizedGaussianDistribution, layout, 256, -7.0, components_per_step=step
        )
        (grad,) = torch.autograd.grad((elp * weights).sum(), p)
        results.append((elp.detach(), grad))
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-12, atol=1e-12)


def test_generic_over_the_family(steps) -> None:
    """The machinery takes any location-scale family: the logistic through autograd, too."""
    kw = dict(channels=3, mixtures=3, bins=256, coupling=True)
    layout = MixtureLayout(3, 3, True)
    params, x, weights = case(9, sample=(2,), **kw)
    p = params.detach().requires_grad_(True)
    family = DiscretizedLogisticMixtureDistribution
    elp = lean_elementwise_log_prob(p, x, family, layout, 256, -7.0)
    (grad,) = torch.autograd.grad((elp * weights).sum(), p)
    eager = family(p, **kw)
    eager.log_prob_backend = "eager"
    ref = eager.elementwise_log_prob(x)
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), p)
    torch.testing.assert_close((elp, grad), (ref, ref_grad), rtol=1e-10, atol=1e-12)


# -- backend choice ---------------------------------------------------------------------------
def test_default_backend_and_choices(monkeypatch) -> None:
    head = DiscretizedGaussian(channels=3, mixtures=2, bins=256)
    params = torch.randn(1, head.param_channels, 2, 2, requires_grad=True)
    x = torch.randint(0, 256, (1, 3, 2, 2))

    def node(d: DiscretizedGaussianDistribution) -> str:
        return type(d.elementwise_log_prob(x).grad_fn).__name__

    assert node(head.distribution(params)) == "LeanMixtureLogProbBackward"  # CPU default
    eager_dist = head.distribution(params)
    eager_dist.log_prob_backend = "eager"
    assert node(eager_dist) != "LeanMixtureLogProbBackward"
    torch.testing.assert_close(head.distribution(params).log_prob(x), eager_dist.log_prob(x))
    # One component: nothing K-fold to avoid, so the default is the (faster) eager path.
    single = DiscretizedGaussian(channels=3, mixtures=1, bins=256)
    one = single.distribution(torch.randn(1, single.param_channels, 2, 2, requires_grad=True))
    assert node(one) != "LeanMixtureLogProbBackward"
    one.log_prob_backend = "lean"
    assert node(one) == "LeanMixtureLogProbBackward"
    # Under torch.compile the eager path is traced.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert node(head.distribution(params)) != "LeanMixtureLogProbBackward"
    monkeypatch.undo()
    # bf16 parameters are promoted to float32.
    lp = head.distribution(params.detach().bfloat16()).log_prob(x)
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all()
    for bad in ("triton", "fused", 1):
        bad_dist = head.distribution(params)
        bad_dist.log_prob_backend = bad
        with pytest.raises(ValueError, match="log_prob_backend"):
            bad_dist.log_prob(x)


# -- memory -----------------------------------------------------------------------------------
def memory_case(lean: bool):
    b, k, c, hw = 2, 10, 3, (8, 8)
    kw = dict(channels=c, mixtures=k, bins=256, coupling=True)
    params, x, _ = case(5, batch=(b,), hw=hw, dtype=torch.float32, **kw)
    params.requires_grad_(True)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with _LargestOutput() as mode:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = dist(params, lean=lean, **kw).log_prob(x).mean()
        loss.backward()
    return params, x, k, saved, mode.sizes


@pytest.mark.parametrize("lean", [True, False])
def test_no_k_fold_temporaries(lean: bool, monkeypatch) -> None:
    # One component per step (the default for inputs of 2**16 elements and more).
    monkeypatch.setattr(_lean_mixture, "_STEP_ELEMENTS", 1)
    params, x, k, saved, sizes = memory_case(lean)
    big = k * x.numel()  # one (B, K, C, H, W) tensor
    # Saved for backward: the parameters, the levels and one (B, C, H, W) running maximum
    # (plus scalars of the mean), instead of dozens of (B, K, C, H, W) tensors. The graph that
    # backward builds for one component at a time is not saved across the call.
    lean_saved = sum(saved) <= params.numel() + 2 * x.numel() + 16
    # No operation, forward or backward, returns a K-fold tensor; only the parameter gradient
    # (P = 10 K channels, needed anyway) is larger than a (B, K, H, W) or (B, C, H, W) one.
    per_pixel = max(x.numel(), k * x.numel() // x.shape[-3])
    lean_ops = all(n <= per_pixel or n == params.numel() for _, n in sizes)
    assert lean_saved == lean and lean_ops == lean, (sum(saved), max(n for _, n in sizes))
    if lean:
        assert max(n for _, n in sizes if n != params.numel()) < big
