"""Tests specific to the softmax head (the generic battery is in test_heads_properties.py)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import discretelik.heads.softmax as softmax_module
from discretelik import create_head, get_head
from discretelik.heads.softmax import DiscreteSoftmax, DiscreteSoftmaxDistribution
from discretelik.testing.heads import (
    check_channel_groups,
    check_head_contract,
    check_head_normalization,
    check_samples_match_log_prob,
)


def reference_log_prob(params: torch.Tensor, value: torch.Tensor, channels: int) -> torch.Tensor:
    """Independent reference: torch.distributions.Categorical on the channel-major blocks."""
    b, _, h, w = params.shape
    logits = params.double().reshape(b, channels, -1, h, w).movedim(2, -1)  # (B, C, H, W, K)
    return torch.distributions.Categorical(logits=logits).log_prob(value)


def test_registered_with_alias() -> None:
    assert get_head("softmax") is DiscreteSoftmax
    assert get_head("categorical") is DiscreteSoftmax
    head = create_head("categorical", channels=3, bins=256)
    assert isinstance(head, DiscreteSoftmax)
    assert head.param_channels == 3 * 256 and head.proj is None
    assert DiscreteSoftmax.supports_channel_groups


def test_log_prob_matches_categorical_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    params = torch.randn(2, 3 * 5, 4, 3, generator=gen) * 3
    value = torch.randint(0, 5, (7, 2, 3, 4, 3), generator=gen)
    dist = DiscreteSoftmaxDistribution(params, channels=3, bins=5)
    got = dist.elementwise_log_prob(value)
    assert got.dtype == torch.float32 and got.shape == value.shape
    ref = reference_log_prob(params, value, 3)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(dist.log_prob(value), got.sum(dim=(-3, -2, -1)))


def test_channel_major_layout() -> None:
    """Block c of params holds channel c's logits: a peak at level c + 1 in block c."""
    channels, bins = 3, 6
    params = torch.full((1, channels * bins, 1, 1), -5.0)
    for c in range(channels):
        params[0, c * bins + c + 1] = 5.0
    dist = DiscreteSoftmaxDistribution(params, channels, bins)
    assert dist.mode.flatten().tolist() == [1, 2, 3]
    assert dist.logits.shape == (1, channels, bins, 1, 1)
    torch.testing.assert_close(dist.logits[0, :, :, 0, 0], params.reshape(channels, bins))


def test_mean_and_mode() -> None:
    gen = torch.Generator().manual_seed(1)
    params = torch.randn(2, 2 * 7, 3, 3, generator=gen) * 2
    dist = DiscreteSoftmaxDistribution(params, channels=2, bins=7)
    probs = F.softmax(params.double().reshape(2, 2, 7, 3, 3), dim=2)
    expected = (probs * torch.arange(7.0, dtype=torch.float64)[:, None, None]).sum(2)
    assert dist.mean.dtype == torch.float32
    torch.testing.assert_close(dist.mean.double(), expected, atol=1e-5, rtol=1e-6)
    assert torch.equal(dist.mode, probs.argmax(2))
    assert dist.mode.dtype == torch.int64


def test_extreme_logits_are_exact() -> None:
    """Logits around 1e4 keep float32 precision: uniform over equal huge logits."""
    dist = DiscreteSoftmaxDistribution(torch.full((1, 256, 1, 1), 1e4), channels=1, bins=256)
    lp = dist.elementwise_log_prob(torch.arange(256).reshape(256, 1, 1, 1, 1))
    torch.testing.assert_close(lp, torch.full_like(lp, -torch.log(torch.tensor(256.0)).item()))
    assert dist.mean.item() == pytest.approx(127.5, abs=1e-3)


def test_float64_params_stay_float64() -> None:
    dist = DiscreteSoftmaxDistribution(torch.zeros(1, 8, 1, 1, dtype=torch.float64), 2, 4)
    assert dist.log_prob(torch.zeros(1, 2, 1, 1, dtype=torch.long)).dtype == torch.float64
    assert dist.mean.dtype == torch.float64


def test_log_prob_gradient_is_onehot_minus_softmax() -> None:
    params = torch.randn(1, 4, 1, 1, requires_grad=True)
    dist = DiscreteSoftmaxDistribution(params, channels=1, bins=4)
    dist.log_prob(torch.tensor([[[[2]]]])).sum().backward()
    expected = F.one_hot(torch.tensor(2), 4).float() - F.softmax(params.detach().flatten(), 0)
    torch.testing.assert_close(params.grad.flatten(), expected)


def test_gradient_with_sample_shape_has_params_shape() -> None:
    params = torch.randn(2, 6, 2, 2, requires_grad=True)
    dist = DiscreteSoftmaxDistribution(params, channels=2, bins=3)
    value = dist.sample((50,), generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(dist.log_prob(value).sum(), params)
    assert grad.shape == params.shape and torch.isfinite(grad).all()


def test_grouped_projection_reads_only_its_block() -> None:
    """With feature_groups=C the logits of channel c depend only on feature block c."""
    torch.manual_seed(0)
    channels, bins, per_block = 3, 4, 5
    head = DiscreteSoftmax(channels, bins, in_channels=channels * per_block, feature_groups=3)
    features = torch.randn(2, channels * per_block, 2, 2, requires_grad=True)
    logits = head.params(features).reshape(2, channels, bins, 2, 2)
    for c in range(channels):
        (grad,) = torch.autograd.grad(logits[:, c].sum(), features, retain_graph=True)
        blocks = grad.abs().reshape(2, channels, per_block, 2, 2).sum(dim=(0, 2, 3, 4))
        assert blocks[c] > 0
        assert all(blocks[o] == 0 for o in range(channels) if o != c), (c, blocks)
    check_channel_groups(head)


def test_bad_feature_groups() -> None:
    with pytest.raises(ValueError, match="feature_groups must be 1 or channels=3"):
        DiscreteSoftmax(3, 4, in_channels=12, feature_groups=2)
    with pytest.raises(ValueError, match="in_channels must be a multiple"):
        DiscreteSoftmax(3, 4, in_channels=10, feature_groups=3)
    with pytest.raises(ValueError, match="in_channels must be a multiple"):
        DiscreteSoftmax(3, 4, feature_groups=3)


def test_zero_probability_levels_never_drawn_even_at_u_edges(monkeypatch) -> None:
    """Inverse-CDF edge cases: u = 0 and the largest u < 1 skip levels of probability zero."""
    params = torch.tensor([-1e4, 0.0, -1e4, 0.0, -1e4]).reshape(1, 5, 1, 1)
    dist = DiscreteSoftmaxDistribution(params, channels=1, bins=5)
    real_rand = torch.rand
    for u, level in [(0.0, 1), (1.0 - 2.0**-53, 3), (0.49, 1), (0.51, 3)]:
        monkeypatch.setattr(torch, "rand", lambda *a, u=u, **k: real_rand(*a, **k).fill_(u))
        assert dist.sample((3,)).flatten().tolist() == [level] * 3, u
    monkeypatch.undo()
    draws = dist.sample((2000,), generator=torch.Generator().manual_seed(0))
    assert set(draws.unique().tolist()) == {1, 3}


def test_sampling_takes_randomness_from_generator() -> None:
    dist = DiscreteSoftmaxDistribution(torch.randn(3, 2 * 16, 4, 4), channels=2, bins=16)
    a = dist.sample((2,), generator=torch.Generator().manual_seed(5))
    b = dist.sample((2,), generator=torch.Generator().manual_seed(5))
    c = dist.sample((2,), generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sampler_rejected_when_wrong() -> None:
    """A slightly too cold sampler (temperature 0.9) is caught by the chi-square check."""
    gen = torch.Generator().manual_seed(3)
    params = torch.randn(1, 2 * 4, 1, 1, generator=gen) * 2
    right = DiscreteSoftmaxDistribution(params, 2, 4)
    cold = DiscreteSoftmaxDistribution(params / 0.9, 2, 4)
    samples = cold.sample((20000,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError, match="do not follow"):
        check_samples_match_log_prob(right, samples)
    assert check_samples_match_log_prob(cold, samples) > 1e-4


@pytest.mark.parametrize("bins", [2, 3, 1000])
def test_sliced_paths_match_unsliced(monkeypatch, bins: int) -> None:
    """Large bins are processed in slices; forcing tiny slices changes no result."""
    gen = torch.Generator().manual_seed(2)
    params = torch.randn(2, 2 * bins, 2, 3, generator=gen) * 3
    value = torch.randint(0, bins, (4, 2, 2, 2, 3), generator=gen)

    def run() -> tuple[torch.Tensor, ...]:
        p = params.clone().requires_grad_(True)
        dist = DiscreteSoftmaxDistribution(p, 2, bins)
        lp = dist.log_prob(value)
        (grad,) = torch.autograd.grad(lp.sum(), p)
        draw = dist.sample((3,), generator=torch.Generator().manual_seed(0))
        return lp.detach(), grad, dist.mean.detach(), draw

    whole = run()
    monkeypatch.setattr(softmax_module, "_CHUNK_ELEMENTS", 7)
    sliced = run()
    for a, b in zip(whole, sliced):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bins_65536() -> None:
    """The largest supported alphabet: normalised, sampled in range, finite gradients."""
    bins = 65536
    gen = torch.Generator().manual_seed(0)
    params = (torch.randn(1, bins, 1, 1, generator=gen) * 2).requires_grad_(True)
    dist = DiscreteSoftmaxDistribution(params, channels=1, bins=bins)
    lp = dist.elementwise_log_prob(torch.arange(bins).reshape(bins, 1, 1, 1, 1))
    assert lp.double().exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    (grad,) = torch.autograd.grad(lp[:10].sum(), params)
    assert torch.isfinite(grad).all()
    assert 0 <= dist.mean.item() <= bins - 1
    # A few live levels among 65536: the chi-square check enumerates and merges the rest.
    peaked = torch.full((1, bins, 1, 1), -1e4)
    peaked[0, [0, 17, 40000, bins - 1], 0, 0] = torch.tensor([0.0, 1.0, -0.5, 0.5])
    sparse = DiscreteSoftmaxDistribution(peaked, channels=1, bins=bins)
    draws = sparse.sample((5000,), generator=torch.Generator().manual_seed(1))
    assert check_samples_match_log_prob(sparse, draws, max_outcomes=bins) > 1e-4


def test_head_with_projection() -> None:
    torch.manual_seed(0)
    head = DiscreteSoftmax(channels=3, bins=16, in_channels=8)
    assert head.proj is not None and head.proj.out_channels == 48
    dist = head(torch.randn(2, 8, 3, 3))
    assert dist.batch_shape == (2,) and dist.event_shape == (3, 3, 3)
    check_head_contract(head)
    check_head_normalization(DiscreteSoftmax(channels=2, bins=8))


def test_bf16_autocast_features_give_float32() -> None:
    torch.manual_seed(0)
    head = DiscreteSoftmax(channels=3, bins=256, in_channels=16, feature_groups=1)
    features = torch.randn(2, 16, 4, 4)
    x = torch.randint(0, 256, (2, 3, 4, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        params = head.params(features)
        lp = head.distribution(params).log_prob(x)
    assert params.dtype == torch.bfloat16
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all()
    ref = head.distribution(params.float()).log_prob(x)
    torch.testing.assert_close(lp, ref)
