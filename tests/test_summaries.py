"""Per-sub-pixel summaries (mean, variance, stddev, mode) and entropy against brute force.

The reference is the joint pmf of a pixel, enumerated over all ``bins ** C`` values through
``log_prob`` in float64: marginals, their moments, and the greedy mode (channel by channel,
the mode of the conditional given the earlier channels' modes) follow from it directly.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import discretelik as dl
from discretelik.testing import enumerate_levels

MIXTURES = [dl.DiscretizedLogisticMixtureDistribution, dl.DiscretizedGaussianDistribution]


def _joint(dist_cls, params: torch.Tensor, channels: int, bins: int, **kw) -> torch.Tensor:
    """``p(x)`` of every value of each pixel: ``(N, bins ** C)`` for params ``(N, P, 1, 1)``."""
    values = enumerate_levels(channels, bins)  # (G, C)
    n, g = params.shape[0], values.shape[0]
    x = values[:, None, :, None, None].expand(g, n, channels, 1, 1)
    d = dist_cls(params, channels=channels, bins=bins, **kw)
    return d.log_prob(x).exp().t()  # (N, G)


def _marginals(joint: torch.Tensor, channels: int, bins: int) -> torch.Tensor:
    table = joint.reshape(-1, *[bins] * channels)
    if channels == 1:
        return table[:, None]
    return torch.stack(
        [table.sum(dim=tuple(d + 1 for d in range(channels) if d != c)) for c in range(channels)],
        dim=1,
    )  # (N, C, bins)


@pytest.mark.parametrize("dist_cls", MIXTURES)
@pytest.mark.parametrize(("channels", "mixtures", "coupling"), [(3, 3, True), (2, 1, False), (1, 2, True)])
def test_mixture_mean_variance_mode_match_the_enumerated_joint(
    dist_cls, channels: int, mixtures: int, coupling: bool
) -> None:
    bins = 6
    layout_p = mixtures * (1 + 2 * channels + (channels * (channels - 1) // 2 if coupling else 0))
    gen = torch.Generator().manual_seed(channels * 10 + mixtures)
    params = (torch.randn(7, layout_p, 1, 1, generator=gen) * 1.5).double()
    kw = dict(mixtures=mixtures, coupling=coupling)
    joint = _joint(dist_cls, params, channels, bins, **kw)
    torch.testing.assert_close(joint.sum(-1), torch.ones(7, dtype=torch.float64))
    marg = _marginals(joint, channels, bins)
    levels = torch.arange(bins, dtype=torch.float64)
    mean = (marg * levels).sum(-1)
    variance = (marg * (levels - mean[..., None]) ** 2).sum(-1)

    d = dist_cls(params, channels=channels, bins=bins, **kw)
    torch.testing.assert_close(d.mean[..., 0, 0], mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(d.variance[..., 0, 0], variance, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(d.stddev[..., 0, 0], variance.sqrt(), rtol=1e-8, atol=1e-9)

    # Greedy mode: argmax of the conditional given the earlier channels at their modes.
    table = joint.reshape(-1, *[bins] * channels)
    expected = torch.zeros(7, channels, dtype=torch.long)
    for i in range(7):
        sub = table[i]
        for c in range(channels):
            given = sub[tuple(expected[i, :c].tolist())]  # (bins,)*(C - c)
            cond = given.sum(dim=tuple(range(1, channels - c))) if channels - c > 1 else given
            expected[i, c] = int(cond.argmax())
    assert torch.equal(d.mode[..., 0, 0], expected)


def test_mixture_mean_stays_in_range_at_extreme_locations() -> None:
    """Locations far outside the data range put all mass on an edge level: the mean is exactly
    at (never beyond) it, though rounding in the survival sums could overshoot."""
    params = torch.zeros(2, 10, 1, 1)
    params[:, 1, 0, 0] = torch.tensor([1e4, -1e4])  # the location of channel 0 (K = 1, C = 3)
    params[:, 2] = -7.0
    d = dl.DiscretizedLogisticMixtureDistribution(params, channels=3, mixtures=1, bins=256)
    mean = d.mean
    assert float(mean.max()) <= 255.0 and float(mean.min()) >= 0.0
    assert mean[0, 0, 0, 0] == 255.0 and mean[1, 0, 0, 0] == 0.0
    assert (d.variance >= 0).all()


def test_softmax_entropy_variance_and_mode_by_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 2 * 7, 3, 2, generator=gen, dtype=torch.float64) * 3
    d = dl.DiscreteSoftmaxDistribution(logits, channels=2, bins=7)
    p = torch.softmax(logits.reshape(4, 2, 7, 3, 2), dim=2)
    levels = torch.arange(7, dtype=torch.float64)[:, None, None]
    mean = (p * levels).sum(2)
    torch.testing.assert_close(d.mean, mean)
    torch.testing.assert_close(d.variance, (p * (levels - mean[:, :, None]) ** 2).sum(2))
    entropy = -(p * p.log()).sum(dim=(1, 2, 3, 4))
    torch.testing.assert_close(d.entropy(), entropy)
    assert d.entropy().shape == (4,)
    assert torch.equal(d.mode, p.argmax(2))
    # A level of probability ~0 contributes nothing (not 0 * -inf = nan).
    peaked = torch.full((1, 5, 1, 1), -1e4)
    peaked[0, 2] = 1e4
    flat = dl.DiscreteSoftmaxDistribution(peaked, channels=1, bins=5)
    assert torch.isfinite(flat.entropy()).all() and float(flat.entropy().abs()) < 1e-6


@pytest.mark.parametrize("name", ["dlm", "gaussian", "softmax"])
def test_methods_not_provided_say_why(name: str) -> None:
    head = dl.create_head(name, channels=3, bins=8)
    d = head(torch.randn(2, head.param_channels, 2, 2))
    x = d.sample()
    calls = {
        "rsample": lambda: d.rsample(),
        "cdf": lambda: d.cdf(x),
        "icdf": lambda: d.icdf(x.float()),
        "enumerate_support": lambda: d.enumerate_support(),
    }
    if name != "softmax":
        calls["entropy"] = lambda: d.entropy()
    for what, call in calls.items():
        with pytest.raises(NotImplementedError, match=f"{what} is not provided: .+; .*"):
            call()


@pytest.mark.parametrize("name", ["dlm", "gaussian", "softmax"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_params_name_what_is_wrong(name: str, bad: float) -> None:
    head = dl.create_head(name, channels=3, bins=8)
    params = torch.randn(2, head.param_channels, 2, 2)
    params[1, 3, 0, 1] = bad
    with pytest.raises(ValueError, match=r"params must be finite, got \d NaN and \d infinite "
                                         r"values out of .* index \(1, 3, 0, 1\)"):
        head.distribution(params)
    head.distribution(params, validate_args=False)  # documented: not checked


def test_backend_is_per_instance_and_reaches_build() -> None:
    """No class-level state: two heads of one class keep their own choices, build passes
    head_kwargs through, and expand keeps a distribution's choice."""
    a = dl.DiscretizedLogisticMixture(mixtures=2, bins=8, log_prob_backend="eager")
    b = dl.DiscretizedLogisticMixture(mixtures=2, bins=8)
    params = torch.randn(1, a.param_channels, 2, 2)
    assert a.distribution(params).log_prob_backend == "eager"
    assert b.distribution(params).log_prob_backend == "auto"
    model = dl.build("pixelcnn", "gaussian", preset="tiny",
                     head_kwargs={"mixtures": 2, "log_prob_backend": "lean"})
    assert model.head.log_prob_backend == "lean"
    dist = model(torch.randint(0, 256, (1, 3, 4, 4)))
    assert dist.log_prob_backend == "lean" and dist.expand((2, 1)).log_prob_backend == "lean"
    with pytest.raises(ValueError, match="log_prob_backend must be one of \\('auto', 'eager', "
                                         "'lean'\\) for DiscreteSoftmax, got 'triton'"):
        dl.create_head("softmax", log_prob_backend="triton")
    for combination in itertools.product(["eager", "lean"], repeat=2):
        head = dl.create_head("softmax", channels=1, bins=4, log_prob_backend=combination[0])
        head.log_prob_backend = combination[1]
        assert head.distribution(torch.zeros(1, 4, 1, 1)).log_prob_backend == combination[1]
