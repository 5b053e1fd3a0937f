"""Property tests run on every registered head.

The head list comes from the registry, so a newly registered head (built-in or plugin) gets the
same battery with nobody editing this file. The checks themselves live in
``discretelik.testing.heads``; the last section makes sure each of them can fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import discretelik.heads  # noqa: F401  (registers the built-in heads)
from discretelik import create_head, get_head, list_heads
from discretelik.heads.softmax import DiscreteSoftmax, DiscreteSoftmaxDistribution
from discretelik.testing.heads import (
    check_channel_groups,
    check_head_contract,
    check_head_finite,
    check_head_mean,
    check_head_normalization,
    check_samples_match_log_prob,
    check_sampling_matches_log_prob,
    enumerate_levels,
)

HEADS = list_heads()
GROUPED = [h for h in HEADS if getattr(get_head(h), "supports_channel_groups", False)]

# (channels, bins): every pixel value is enumerable (bins**C small), plus 256 levels for one
# channel and the smallest alphabet, bins = 2.
ENUMERABLE = [(1, 256), (1, 2), (3, 2), (3, 4), (2, 8)]


def make(name: str, channels: int, bins: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)  # projection weights
    return create_head(name, channels=channels, bins=bins, **kwargs)


def raw_params(p: int, n: int = 2, bound: float = 1e4):
    """Raw parameters ``(n, p, 1, 1)``: hypothesis arrays, typical and extreme."""
    shape = (n, p, 1, 1)
    floats = st.floats(-bound, bound, width=32)
    typical = st.floats(-8, 8, width=32)
    return st.one_of(
        hnp.arrays(np.float32, shape, elements=typical),
        hnp.arrays(np.float32, shape, elements=floats),
    )


def extremes(p: int, n: int = 2, bound: float = 1e4) -> list[np.ndarray]:
    """Deterministic extreme parameter sets: constants, alternating signs, one spike."""
    sign = np.where(np.arange(p) % 2 == 0, bound, -bound).astype(np.float32)
    spike = np.full(p, -bound, np.float32)
    spike[p // 2] = bound
    rows = [np.full(p, bound, np.float32), np.full(p, -bound, np.float32), sign, spike]
    return [np.stack([rows[i], rows[(i + 1) % 4]])[..., None, None] for i in range(4)]


def with_extremes(p: int, n: int = 2):
    """Decorator: explicit ``@example``s of :func:`extremes` for a test taking ``params``."""

    def decorate(fn):
        for params in extremes(p, n):
            fn = example(params=params)(fn)
        return fn

    return decorate


# -- normalization and mean ------------------------------------------------------------------
@pytest.mark.parametrize(("channels", "bins"), ENUMERABLE)
@pytest.mark.parametrize("name", HEADS)
def test_normalization(name: str, channels: int, bins: int) -> None:
    head = make(name, channels, bins)

    @settings(max_examples=12)
    @with_extremes(head.param_channels)
    @given(params=raw_params(head.param_channels))
    def check(params: np.ndarray) -> None:
        check_head_normalization(head, torch.from_numpy(params), atol=1e-5)

    check()


@pytest.mark.parametrize("name", HEADS)
def test_normalization_several_pixels(name: str) -> None:
    head = make(name, 3, 4)
    gen = torch.Generator().manual_seed(1)
    params = torch.randn(2, head.param_channels, 3, 2, generator=gen) * 4
    check_head_normalization(head, params)


@pytest.mark.parametrize(("channels", "bins"), [(1, 256), (3, 4), (2, 8)])
@pytest.mark.parametrize("name", HEADS)
def test_mean_is_expected_level(name: str, channels: int, bins: int) -> None:
    head = make(name, channels, bins)

    @settings(max_examples=6)
    @with_extremes(head.param_channels)
    @given(params=raw_params(head.param_channels))
    def check(params: np.ndarray) -> None:
        check_head_mean(head, torch.from_numpy(params))

    check()


# -- sampling agrees with log_prob -----------------------------------------------------------
@pytest.mark.parametrize(("channels", "bins"), [(1, 8), (3, 4), (2, 8), (1, 2)])
@pytest.mark.parametrize("name", HEADS)
def test_sampling_matches_log_prob(name: str, channels: int, bins: int) -> None:
    head = make(name, channels, bins)
    for scale in (1.0, 3.0):  # spread out and peaked
        for seed in (0, 1):
            gen = torch.Generator().manual_seed(seed)
            params = torch.randn(1, head.param_channels, 1, 1, generator=gen) * scale
            check_sampling_matches_log_prob(
                head, params, seed=seed, num_samples=20000, p_threshold=1e-4
            )


def _tv(dist_a, dist_b, channels: int, bins: int) -> float:
    values = enumerate_levels(channels, bins).reshape(-1, 1, channels, 1, 1)
    pa = dist_a.log_prob(values).double().exp()
    pb = dist_b.log_prob(values).double().exp()
    return 0.5 * float((pa - pb).abs().sum())


@pytest.mark.parametrize(("channels", "bins"), [(1, 8), (3, 4)])
@pytest.mark.parametrize("name", HEADS)
def test_sampling_check_rejects_other_params(name: str, channels: int, bins: int) -> None:
    """The chi-square check must reject draws from a clearly different distribution."""
    head = make(name, channels, bins)
    gen = torch.Generator().manual_seed(0)
    params = torch.randn(1, head.param_channels, 1, 1, generator=gen) * 3
    dist = head.distribution(params)
    for _ in range(10):  # deterministic: the first other parameter set at TV distance > 0.2
        other = head.distribution(torch.randn(params.shape, generator=gen) * 3)
        if _tv(dist, other, channels, bins) > 0.2:
            break
    else:
        pytest.fail("no parameter set far enough from the first one")
    samples = other.sample((20000,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError, match="do not follow|probability 0"):
        check_samples_match_log_prob(dist, samples)
    # The same draws pass against their own distribution.
    assert check_samples_match_log_prob(other, samples) > 1e-4


# -- finite values and gradients at extremes -------------------------------------------------
@pytest.mark.parametrize(
    ("channels", "bins", "in_channels"), [(3, 256, None), (1, 2, None), (3, 16, 6)]
)
@pytest.mark.parametrize("name", HEADS)
def test_finite_at_extremes(name: str, channels: int, bins: int, in_channels: int | None) -> None:
    head = make(name, channels, bins, in_channels=in_channels)
    check_head_finite(head, scales=(1.0, 1e4))


@pytest.mark.parametrize("name", HEADS)
def test_finite_random_extreme_params_edge_bins(name: str) -> None:
    head = make(name, 3, 256)
    levels = torch.tensor([[0, 255, 0], [255, 0, 255], [0, 0, 0], [255, 255, 255]])
    values = levels[:, None, :, None, None].expand(4, 2, 3, 1, 1)  # (S, N, C, 1, 1)

    @settings(max_examples=10)
    @given(
        params=raw_params(head.param_channels),
        dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    )
    def check(params: np.ndarray, dtype: torch.dtype) -> None:
        p = torch.from_numpy(params).to(dtype).requires_grad_(True)
        lp = head.distribution(p).log_prob(values)
        assert lp.dtype == torch.float32
        assert torch.isfinite(lp).all(), lp
        (grad,) = torch.autograd.grad(lp.sum(), p)
        # A float16 gradient has the params' dtype: a large true gradient may overflow to inf.
        assert not torch.isnan(grad).any()
        assert dtype == torch.float16 or torch.isfinite(grad).all()

    check()


# -- the contract ----------------------------------------------------------------------------
def _contract_heads() -> list[tuple[str, dict]]:
    cases = []
    for name in HEADS:
        cases += [
            (name, dict(channels=3, bins=256)),
            (name, dict(channels=1, bins=2)),
            (name, dict(channels=3, bins=16, in_channels=10)),
        ]
        if name in GROUPED:
            cases.append((name, dict(channels=3, bins=8, in_channels=12, feature_groups=3)))
    return cases


def _case_id(case: tuple[str, dict]) -> str:
    name, kwargs = case
    return "-".join([name, *(f"{k}={v}" for k, v in kwargs.items())])


@pytest.mark.parametrize(("name", "kwargs"), _contract_heads(), ids=map(_case_id, _contract_heads()))
def test_contract(name: str, kwargs: dict) -> None:
    check_head_contract(make(name, **kwargs))


@pytest.mark.parametrize("name", HEADS)
def test_validate_args_default_restored(name: str) -> None:
    before = torch.distributions.Distribution._validate_args
    check_head_contract(make(name, 2, 4))
    assert torch.distributions.Distribution._validate_args == before


@pytest.mark.parametrize("name", HEADS)
def test_create_head_drops_none_and_rejects_bad_config(name: str) -> None:
    head = create_head(name, channels=2, bins=4, in_channels=None)
    assert head.in_channels is None and head.channels == 2 and head.bins == 4
    with pytest.raises(ValueError, match="bins"):
        create_head(name, channels=2, bins=1)
    with pytest.raises(TypeError, match="channels"):
        create_head(name, channels=2.0, bins=4)


@pytest.mark.parametrize("name", GROUPED)
def test_channel_groups(name: str) -> None:
    check_channel_groups(make(name, 3, 8, in_channels=12, feature_groups=3))


@pytest.mark.parametrize("name", sorted(set(HEADS) - set(GROUPED)))
def test_no_channel_groups_rejected(name: str) -> None:
    # ValueError from Head.__init__, or TypeError from a signature without feature_groups.
    with pytest.raises((ValueError, TypeError), match="feature_groups"):
        make(name, 3, 8, in_channels=12, feature_groups=3)


# -- the checks can fail ---------------------------------------------------------------------
# Deliberately broken softmax variants; each must be caught by the check that targets it.
class _Unnormalized(DiscreteSoftmaxDistribution):
    def _elementwise_log_prob(self, value):
        return super()._elementwise_log_prob(value) - 0.01


class _PeeksAtLaterChannel(DiscreteSoftmaxDistribution):
    def _elementwise_log_prob(self, value):
        out = super()._elementwise_log_prob(value)
        peek = out[..., :1, :, :] + 1e-3 * value[..., 1:2, :, :]  # channel 0 reads channel 1
        return torch.cat([peek, out[..., 1:, :, :]], dim=-3)


class _WrongMean(DiscreteSoftmaxDistribution):
    @property
    def mean(self):
        return self.mode.float()


class _HotSampler(DiscreteSoftmaxDistribution):
    """Samples at temperature 1.25 instead of 1: a subtle sampler bug."""

    def _sample(self, sample_shape, generator):
        cool = DiscreteSoftmaxDistribution(self.params / 1.25, self.channels, self.bins)
        return cool._sample(sample_shape, generator)


class _GlobalRng(DiscreteSoftmaxDistribution):
    def _sample(self, sample_shape, generator):
        return super()._sample(sample_shape, None)


class _Clamps(DiscreteSoftmaxDistribution):
    def _check_value(self, value):
        return super()._check_value(value.clamp(0, self.bins - 1))


class _CastsFloats(DiscreteSoftmaxDistribution):
    def _check_value(self, value):
        return super()._check_value(value.long())


class _Naive(DiscreteSoftmaxDistribution):
    """log softmax as log(exp / sum exp): overflows at large logits."""

    def _elementwise_log_prob(self, value):
        logits = self.logits
        probs = logits.exp() / logits.exp().sum(-3, keepdim=True)
        return probs.gather(-3, value.unsqueeze(-3)).squeeze(-3).log()


def _head_with(dist_cls, **kwargs) -> DiscreteSoftmax:
    class Broken(DiscreteSoftmax):
        def distribution(self, params, validate_args=None):
            return dist_cls(params, self.channels, self.bins, validate_args=validate_args)

    torch.manual_seed(0)
    return Broken(**kwargs)


def test_checks_catch_broken_heads() -> None:
    with pytest.raises(AssertionError, match="sum to 1"):
        check_head_normalization(_head_with(_Unnormalized, channels=1, bins=8))
    with pytest.raises(AssertionError, match="must not depend on channels > 0"):
        check_head_normalization(_head_with(_PeeksAtLaterChannel, channels=2, bins=4))
    with pytest.raises(AssertionError, match="mean must equal"):
        check_head_mean(_head_with(_WrongMean, channels=1, bins=8))
    with pytest.raises(AssertionError, match="do not follow"):
        check_sampling_matches_log_prob(_head_with(_HotSampler, channels=2, bins=4))
    with pytest.raises(AssertionError, match="global RNG"):
        check_head_contract(_head_with(_GlobalRng, channels=2, bins=4))
    with pytest.raises(AssertionError, match="nothing was raised"):
        check_head_contract(_head_with(_Clamps, channels=2, bins=4))
    with pytest.raises(AssertionError, match="nothing is cast"):
        check_head_contract(_head_with(_CastsFloats, channels=2, bins=4))
    with pytest.raises(AssertionError, match="finite"):
        check_head_finite(_head_with(_Naive, channels=1, bins=4), scales=(1e4,))
    # ... while the real head passes all of them.
    check_head_normalization(_head_with(DiscreteSoftmaxDistribution, channels=2, bins=4))


def test_channel_groups_check_catches_leak() -> None:
    head = make("softmax", 3, 4, in_channels=6, feature_groups=3)
    head.proj = torch.nn.Conv2d(6, head.param_channels, 1)  # ungrouped: every block leaks
    with pytest.raises(AssertionError, match="depends on feature block"):
        check_channel_groups(head)


def test_check_arguments_are_validated() -> None:
    head = make("softmax", 3, 256)
    with pytest.raises(ValueError, match="max_outcomes"):
        check_head_normalization(head)
    with pytest.raises(ValueError, match="param_channels"):
        check_head_normalization(make("softmax", 1, 4), torch.zeros(1, 5, 1, 1))
    with pytest.raises(ValueError, match="feature_groups"):
        check_channel_groups(make("softmax", 3, 4))
