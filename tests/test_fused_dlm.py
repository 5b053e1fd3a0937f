"""The memory-lean (fused) log-likelihood of the DLM head against its eager reference path.

* float64: values and gradients equal the eager path to rounding, and
  ``torch.autograd.gradcheck`` passes on small shapes (both edge bins, clamped log-scales,
  coupling on and off, sample_shape leading dimensions).
* float32 at random and extreme raw parameters (up to ``1e4``), edge bins, bins 2 to 65536,
  1/3/4 channels, with and without coupling: values equal the eager path's; gradients are
  checked against the eager path in float64 on the same (float32-rounded) parameters, since in
  float32 both paths round differently where the partial joints are huge.
* Memory: autograd saves only the parameters, the levels and one ``(..., C, H, W)`` tensor,
  and no operation in forward or backward makes a ``K``-fold ``(..., K, C, H, W)`` tensor (the
  eager path does both, which shows the checks can fail).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from discretelik.heads import _fused_dlm
from discretelik.heads._fused_dlm import fused_elementwise_log_prob
from discretelik.heads._mixture import MixtureLayout
from discretelik.heads.logistic import (
    DiscretizedLogisticMixture,
    DiscretizedLogisticMixtureDistribution,
)

EXTREMES = torch.tensor([-1e4, -1e3, -30.0, -7.5, -1.0, 0.0, 0.5, 7.0, 30.0, 1e3, 1e4])


def extreme_case(channels: int, mixtures: int, bins: int, coupling: bool, n: int):
    """``3 n`` images of 1x2 pixels: ``n`` with raw parameters drawn from ``EXTREMES``, ``n``
    uniform in ``[-1e4, 1e4]`` and ``n`` typical (``N(0, 4)``), at levels ``0, 1, bins // 2,
    bins - 2, bins - 1``; seeded by ``bins`` and ``channels``. Returns ``(params, x)``."""
    p = MixtureLayout(channels, mixtures, coupling).param_channels
    gen = torch.Generator().manual_seed(10 * bins + channels)
    pick = EXTREMES[torch.randint(0, len(EXTREMES), (n, p, 1, 2), generator=gen)]
    uniform = (torch.rand(n, p, 1, 2, generator=gen) * 2 - 1) * 1e4
    typical = torch.randn(n, p, 1, 2, generator=gen) * 2
    params = torch.cat([pick, uniform, typical])
    levels = torch.tensor([0, 1, bins // 2, bins - 2, bins - 1]).clamp(0, bins - 1)
    x = levels[torch.randint(0, 5, (3 * n, channels, 1, 2), generator=gen)]
    return params, x


@pytest.fixture(params=["one component per step", "all components at once"])
def steps(request, monkeypatch) -> None:
    """Run a test with one component per loop step, and with the small-input default, which
    takes every component of these small cases at once."""
    if request.param == "one component per step":
        monkeypatch.setattr(_fused_dlm, "_STEP_ELEMENTS", 1)


def dist(params, channels, mixtures, bins, coupling, fused, **kw):
    d = DiscretizedLogisticMixtureDistribution(
        params, channels=channels, mixtures=mixtures, bins=bins, coupling=coupling, **kw
    )
    d.log_prob_backend = "lean" if fused else "eager"
    return d


def value_and_grad(params, x, weights, fused, **kw):
    """``elementwise_log_prob`` and the gradient of its ``weights``-weighted sum."""
    params = params.detach().requires_grad_(True)
    elp = dist(params, fused=fused, **kw).elementwise_log_prob(x)
    (grad,) = torch.autograd.grad((elp * weights).sum(), params)
    return elp.detach(), grad


def case(
    seed, channels, mixtures, bins, coupling, batch=(2,), sample=(), hw=(2, 3), dtype=torch.float64
):
    """Moderate random raw parameters (some log-scales below the clamp) and levels with edges."""
    gen = torch.Generator().manual_seed(seed)
    p = MixtureLayout(channels, mixtures, coupling).param_channels
    params = torch.randn(*batch, p, *hw, generator=gen, dtype=dtype) * 1.5
    x = torch.randint(0, bins, (*sample, *batch, channels, *hw), generator=gen)
    flat = x.view(-1, *hw)
    flat[0, 0, 0], flat[-1, -1, -1] = 0, bins - 1  # both open edge bins
    weights = torch.rand(x.shape, generator=gen, dtype=dtype) + 0.5  # a generic upstream grad
    return params, x, weights


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("bins", [2, 32, 256, 65536])
@pytest.mark.parametrize("coupling", [True, False])
def test_float64_matches_eager(channels: int, bins: int, coupling: bool, steps) -> None:
    kw = dict(channels=channels, mixtures=3, bins=bins, coupling=coupling)
    params, x, weights = case(bins + channels, sample=(2,), **kw)
    fused = value_and_grad(params, x, weights, True, **kw)
    eager = value_and_grad(params, x, weights, False, **kw)
    torch.testing.assert_close(fused[0], eager[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused[1], eager[1], rtol=1e-10, atol=1e-12)


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
        return fused_elementwise_log_prob(p, x, layout, bins, -7.0)

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
    # The exact gradient of the float32-rounded parameters, per image relative to its largest
    # entry (the fused path stays within ~1e-3; the eager float32 path is sometimes far worse).
    _, truth = value_and_grad(params.double(), x, weights.double(), False, **kw)
    err = (grad.double() - truth).abs().flatten(1).amax(1)
    assert (err <= 5e-3 * truth.abs().flatten(1).amax(1) + 1e-6).all(), err.max()


def test_sample_shape_and_expanded_params(steps) -> None:
    """Leading sample dimensions and ``expand``-ed (stride 0) parameters."""
    kw = dict(channels=3, mixtures=4, bins=256, coupling=True)
    params, x, weights = case(3, batch=(1, 2), sample=(3,), **kw)
    params = params.expand(2, 2, *params.shape[2:])  # batch (2, 2), stride 0 in dim 0
    x = torch.cat([x, x.flip(1)], dim=1)  # (3, 2, 2, C, H, W)
    weights = torch.cat([weights, weights], dim=1)
    fused = value_and_grad(params, x, weights, True, **kw)
    eager = value_and_grad(params, x, weights, False, **kw)
    assert fused[0].shape == x.shape and fused[1].shape == params.shape
    torch.testing.assert_close(fused, eager, rtol=1e-10, atol=1e-12)
    big = dist(params[0, :1], fused=True, **kw).expand((4, 1))
    assert big.log_prob(x[0, :1, 0].expand(4, 1, *x.shape[3:])).shape == (4, 1)


def test_head_defaults_to_the_fused_path() -> None:
    head = DiscretizedLogisticMixture(channels=3, mixtures=2, bins=256)
    params = torch.randn(1, head.param_channels, 2, 2, requires_grad=True)
    x = torch.randint(0, 256, (1, 3, 2, 2))
    fused = head.distribution(params).log_prob(x)
    assert "FusedDLMLogProb" in type(fused.grad_fn.next_functions[0][0]).__name__
    eager_dist = head.distribution(params)
    eager_dist.log_prob_backend = "eager"
    eager = eager_dist.log_prob(x)
    torch.testing.assert_close(fused, eager)
    # bf16 parameters are promoted to float32 on both paths.
    lp = head.distribution(params.detach().bfloat16()).log_prob(x)
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all()


def test_no_grad_and_single_component(steps) -> None:
    kw = dict(channels=3, mixtures=1, bins=256, coupling=True)
    params, x, weights = case(4, **kw)
    fused = value_and_grad(params, x, weights, True, **kw)
    eager = value_and_grad(params, x, weights, False, **kw)
    torch.testing.assert_close(fused, eager, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        lp = dist(params, fused=True, **kw).log_prob(x)
    torch.testing.assert_close(lp, eager[0].sum((-3, -2, -1)))


# -- memory -----------------------------------------------------------------------------------
class _LargestOutput(TorchDispatchMode):
    """Records the element count of every tensor that an aten operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.sizes.append((str(func), t.numel()))
        return out


def memory_case(fused: bool):
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
            loss = dist(params, fused=fused, **kw).log_prob(x).mean()
        loss.backward()
    return params, x, k, saved, mode.sizes


def test_components_per_step() -> None:
    """Any step size gives the same values and gradients (up to rounding)."""
    kw = dict(channels=3, mixtures=5, bins=256, coupling=True)
    layout = MixtureLayout(3, 5, True)
    params, x, weights = case(8, sample=(2,), **kw)
    results = []
    for step in (1, 2, 5, 100):
        p = params.detach().requires_grad_(True)
        elp = fused_elementwise_log_prob(p, x, layout, 256, -7.0, components_per_step=step)
        (grad,) = torch.autograd.grad((elp * weights).sum(), p)
        results.append((elp.detach(), grad))
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fused", [True, False])
def test_no_k_fold_temporaries(fused: bool, monkeypatch) -> None:
    # One component per step (the default for inputs of 2**16 elements and more).
    monkeypatch.setattr(_fused_dlm, "_STEP_ELEMENTS", 1)
    params, x, k, saved, sizes = memory_case(fused)
    big = k * x.numel()  # one (B, K, C, H, W) tensor
    # Saved for backward: the parameters, the levels and one (B, C, H, W) running maximum
    # (plus scalars of the mean), instead of dozens of (B, K, C, H, W) tensors.
    lean_saved = sum(saved) <= params.numel() + 2 * x.numel() + 16
    # No operation, forward or backward, returns a K-fold tensor; only the parameter gradient
    # (P = 10 K channels, needed anyway) is larger than a (B, K, H, W) or (B, C, H, W) one.
    per_pixel = max(x.numel(), k * x.numel() // x.shape[-3])
    lean_ops = all(n <= per_pixel or n == params.numel() for _, n in sizes)
    assert lean_saved == fused and lean_ops == fused, (sum(saved), max(n for _, n in sizes))
    if fused:
        assert max(n for _, n in sizes if n != params.numel()) < big


def test_branch_constants_match_the_eager_path() -> None:
    from discretelik.heads import logistic

    for name in ("_LOG2", "_TINY_LOG_HALF_WIDTH", "_FAR_TAIL"):
        assert getattr(_fused_dlm, name) == getattr(logistic, name), name
