"""Discretized logistic mixture head, and the mixture machinery it shares with the Gaussian head.

* An independent float64 reference (scipy.stats, loops over components and channels, direct
  probabilities) decodes the documented parameter layout on its own; ``test_gaussian.py``
  imports it with ``scipy.stats.norm``.
* openai/pixel-cnn's ``discretized_mix_logistic_loss``, re-implemented in numpy from its formula
  in its NHWC layout, must agree with the head on the same parameters moved to NCHW.
* High-precision (mpmath) bin masses check the log-space formulas from the centre to ~1e7
  scales out, for bins of width down to 1e-30; ``test_gaussian.py`` reuses them.
* Layout, coupling, sampling and mean are shared code, so those tests run on both heads.

Generic properties (normalization, chi-square goodness of fit, bad inputs, autocast) are in
``test_heads_properties.py``.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats

from discretelik import create_head
from discretelik.heads.gaussian import DiscretizedGaussian, DiscretizedGaussianDistribution
from discretelik.heads.logistic import (
    DiscretizedLogisticMixture,
    DiscretizedLogisticMixtureDistribution,
)

HEADS = {"dlm": DiscretizedLogisticMixture, "gaussian": DiscretizedGaussian}
BINS = [2, 3, 32, 256, 65536]


# -- independent reference --------------------------------------------------------------------
def reference_layout(params: np.ndarray, channels: int, mixtures: int, coupling: bool):
    """Decode ``params (P, ...)`` by the documented layout.

    Returns ``(logits (K, ...), loc [C] of (K, ...), log_scale [C] of (K, ...), alpha)``
    with ``alpha[(c, j)]`` the raw coefficient block of channel ``c`` on channel ``j < c``.
    """
    k = mixtures
    pairs = [(c, j) for c in range(1, channels) for j in range(c)] if coupling else []
    per_slot = [len(chunk) for chunk in np.array_split(np.arange(len(pairs)), channels)]
    pairs_left = iter(pairs)
    loc, log_scale, alpha = [], [], {}
    pos = k
    for c in range(channels):
        loc.append(params[pos : pos + k])
        log_scale.append(params[pos + k : pos + 2 * k])
        pos += 2 * k
        for _ in range(per_slot[c]):
            alpha[next(pairs_left)] = params[pos : pos + k]
            pos += k
    assert pos == params.shape[0], "layout does not use every parameter channel"
    return params[:k], loc, log_scale, alpha


def reference_log_prob(
    params: np.ndarray,
    x: np.ndarray,
    *,
    bins: int,
    mixtures: int,
    coupling: bool,
    family,
    min_log_scale: float = -7.0,
) -> np.ndarray:
    """``log p(x_c | x_<c)`` of every sub-pixel, float64 ``(B, C, H, W)``.

    ``params (B, P, H, W)``, ``x (B, C, H, W)`` integers; ``family`` is ``scipy.stats.logistic``
    or ``scipy.stats.norm``.
    """
    channels = x.shape[1]
    logits, loc, log_scale, alpha = reference_layout(
        np.moveaxis(params, 1, 0), channels, mixtures, coupling
    )
    x = np.moveaxis(x, 1, 0).astype(np.float64)  # (C, B, H, W)
    centre = 2 * x / (bins - 1) - 1
    half = 1.0 / (bins - 1)
    weights = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)
    joint = [weights[k] for k in range(mixtures)]  # pi_k * prod_{j<=c} P_k(x_j | x_<j)
    partial = []
    for c in range(channels):
        for k in range(mixtures):
            mu = loc[c][k] + sum(
                np.tanh(alpha[(c, j)][k]) * centre[j] for j in range(c) if coupling
            )
            s = np.exp(np.maximum(log_scale[c][k], min_log_scale))
            upper = (centre[c] + half - mu) / s
            lower = (centre[c] - half - mu) / s
            # Direct differences; on the right of the mean of survival functions, so that
            # nothing is lost to 1 - 1.
            middle = np.where(
                lower > 0,
                family.sf(lower) - family.sf(upper),
                family.cdf(upper) - family.cdf(lower),
            )
            prob = np.where(
                x[c] == 0, family.cdf(upper), np.where(x[c] == bins - 1, family.sf(lower), middle)
            )
            joint[k] = joint[k] * prob
        partial.append(np.log(sum(joint)))
    partial = np.stack(partial)
    conditional = np.concatenate([partial[:1], np.diff(partial, axis=0)])
    return np.moveaxis(conditional, 0, 1)


def random_case(seed: int, channels: int, mixtures: int, bins: int, coupling: bool, lo: float):
    """Moderate raw parameters ``(2, P, 2, 3)`` and levels ``(2, C, 2, 3)`` with both edges."""
    rng = np.random.default_rng(seed)
    k = mixtures
    n_coeff = channels * (channels - 1) // 2 if coupling else 0
    p = k * (1 + 2 * channels + n_coeff)
    params = np.empty((2, p, 2, 3))
    params[:, :k] = rng.uniform(-3, 3, (2, k, 2, 3))
    logits, loc, log_scale, alpha = reference_layout(
        np.moveaxis(params, 1, 0), channels, mixtures, coupling
    )
    for c in range(channels):  # views into params
        loc[c][...] = rng.uniform(-1.2, 1.2, loc[c].shape)
        log_scale[c][...] = rng.uniform(lo, 0.5, log_scale[c].shape)
    for block in alpha.values():
        block[...] = rng.uniform(-2, 2, block.shape)
    x = rng.integers(0, bins, (2, channels, 2, 3))
    x[0, :, 0, 0], x[0, :, 0, 1] = 0, bins - 1
    return params, x


def ours(head_cls, params, x, *, channels, mixtures, bins, coupling, dtype):
    head = head_cls(channels=channels, mixtures=mixtures, bins=bins, coupling=coupling)
    dist = head.distribution(torch.tensor(params, dtype=dtype))
    return dist.elementwise_log_prob(torch.tensor(x)).double().numpy()


def check_against_reference(head_cls, family, lo, seed, channels, mixtures, bins, coupling):
    params, x = random_case(seed, channels, mixtures, bins, coupling, lo)
    ref = reference_log_prob(
        params, x, bins=bins, mixtures=mixtures, coupling=coupling, family=family
    )
    assert np.isfinite(ref).all()
    kw = dict(channels=channels, mixtures=mixtures, bins=bins, coupling=coupling)
    got64 = ours(head_cls, params, x, dtype=torch.float64, **kw)
    np.testing.assert_allclose(got64, ref, rtol=1e-7, atol=1e-9)
    got32 = ours(head_cls, params, x, dtype=torch.float32, **kw)
    np.testing.assert_allclose(got32, ref, rtol=2e-4, atol=2e-4)


configs = st.tuples(
    st.integers(0, 2**31),  # seed
    st.integers(1, 4),  # channels
    st.integers(1, 4),  # mixtures
    st.sampled_from(BINS),
    st.booleans(),  # coupling
)


@settings(max_examples=40)
@given(config=configs)
def test_matches_scipy_reference(config) -> None:
    check_against_reference(DiscretizedLogisticMixture, stats.logistic, -3.0, *config)


# -- openai/pixel-cnn -------------------------------------------------------------------------
def openai_pixel_log_prob(x: np.ndarray, l: np.ndarray):
    """openai/pixel-cnn's ``discretized_mix_logistic_loss`` per pixel, before summing, NHWC.

    ``x (B, H, W, 3)`` rescaled to ``[-1, 1]``, ``l (B, H, W, 10 K)``. Returns the log-likelihood
    of each pixel ``(B, H, W)`` and where its ``cdf_delta < 1e-5`` fallback would fire (that
    branch is not reproduced: the head is exact there).
    """
    nr_mix = l.shape[-1] // 10
    logit_probs = l[..., :nr_mix]
    l = l[..., nr_mix:].reshape(x.shape + (3 * nr_mix,))
    means = l[..., :nr_mix]
    log_scales = np.maximum(l[..., nr_mix : 2 * nr_mix], -7.0)
    coeffs = np.tanh(l[..., 2 * nr_mix : 3 * nr_mix])
    x = x[..., None] + np.zeros(nr_mix)
    m2 = means[..., 1, :] + coeffs[..., 0, :] * x[..., 0, :]
    m3 = means[..., 2, :] + coeffs[..., 1, :] * x[..., 0, :] + coeffs[..., 2, :] * x[..., 1, :]
    means = np.stack([means[..., 0, :], m2, m3], axis=-2)
    centered_x = x - means
    inv_stdv = np.exp(-log_scales)
    plus_in = inv_stdv * (centered_x + 1.0 / 255.0)
    min_in = inv_stdv * (centered_x - 1.0 / 255.0)
    log_cdf_plus = plus_in - np.logaddexp(0, plus_in)
    log_one_minus_cdf_min = -np.logaddexp(0, min_in)
    cdf_delta = special.expit(plus_in) - special.expit(min_in)
    middle = np.log(np.maximum(cdf_delta, 1e-12))
    log_probs = np.where(
        x < -0.999, log_cdf_plus, np.where(x > 0.999, log_one_minus_cdf_min, middle)
    )
    fallback = (x >= -0.999) & (x <= 0.999) & (cdf_delta <= 1e-5)
    log_probs = log_probs.sum(axis=-2) + special.log_softmax(logit_probs, axis=-1)
    return special.logsumexp(log_probs, axis=-1), fallback.any(axis=(-2, -1))


@settings(max_examples=15)
@given(seed=st.integers(0, 2**31), mixtures=st.integers(1, 10))
def test_matches_openai_pixel_cnn(seed: int, mixtures: int) -> None:
    rng = np.random.default_rng(seed)
    l = rng.normal(0.0, 1.0, (2, 4, 4, 10 * mixtures))  # NHWC
    x = rng.integers(0, 256, (2, 4, 4, 3))
    x[0, 0, :2] = 0
    x[0, 1, :2] = 255
    ref, fallback = openai_pixel_log_prob(2 * x / 255 - 1, l)
    assert (~fallback).sum() >= 8, "too few pixels where openai's loss is exact"
    head = create_head("dlm", channels=3, mixtures=mixtures, bins=256)
    dist = head.distribution(torch.tensor(l).permute(0, 3, 1, 2))
    got = dist.elementwise_log_prob(torch.tensor(x).permute(0, 3, 1, 2)).sum(1).numpy()
    np.testing.assert_allclose(got[~fallback], ref[~fallback], rtol=1e-9, atol=1e-9)


def test_openai_coefficient_slots() -> None:
    """RGB slot c = K + 3Kc holds [means, log-scales, coefficients]; the coefficients in the
    R, G, B slots couple G on R, B on R and B on G (openai's coeffs[0], [1], [2])."""
    k = 2
    head = DiscretizedLogisticMixture(channels=3, mixtures=k)
    raw = torch.zeros(1, 10 * k, 1, 1, dtype=torch.float64)
    x = torch.tensor([[[[230]], [[20]], [[128]]]])  # R and G far from 0 on [-1, 1]
    base = head.distribution(raw).elementwise_log_prob(x).flatten()
    for slot, (coupled, on) in enumerate([(1, 0), (2, 0), (2, 1)]):
        moved = raw.clone()
        moved[0, k + 3 * k * slot + 2 * k : k + 3 * k * (slot + 1)] = 1.0
        changed = head.distribution(moved).elementwise_log_prob(x).flatten()
        assert ((changed - base).abs() > 1e-9).tolist() == [c == coupled for c in range(3)]
        # The shift is tanh(1) * x_on on the mean of channel `coupled`: compare with moving
        # that mean by hand.
        by_hand = raw.clone()
        by_hand[0, k + 3 * k * coupled : k + 3 * k * coupled + k] = math.tanh(1.0) * (
            2 * x.flatten()[on].item() / 255 - 1
        )
        torch.testing.assert_close(
            changed, head.distribution(by_hand).elementwise_log_prob(x).flatten()
        )


# -- high-precision bin masses ----------------------------------------------------------------
def logistic_cdf(z):
    return 1 / (1 + mpmath.exp(-z))


def mp_log_mass(cdf, level: int, bins: int, loc, log_scale: float):
    """``log P(x = level)`` in mpmath (call inside ``mpmath.workdps``), edges included.

    ``cdf`` is the standard CDF of a symmetric family (``logistic_cdf``, ``mpmath.ncdf``).
    """
    n = bins - 1
    scale = mpmath.exp(max(mpmath.mpf(log_scale), -7))
    upper = (mpmath.mpf(2 * level + 1 - n) / n - loc) / scale
    lower = (mpmath.mpf(2 * level - 1 - n) / n - loc) / scale
    if level == 0:
        return mpmath.log(cdf(upper))
    if level == n:
        return mpmath.log(cdf(-lower))
    if lower > 0:  # right of the mean: the same mass from the mirrored, small CDFs
        upper, lower = -lower, -upper
    return mpmath.log(cdf(upper) - cdf(lower))


def high_precision_cases() -> list[tuple[int, int, float, float]]:
    """``(level, bins, loc, log_scale)``: centre, tails up to ~1e7 scales, narrow bins down to
    width ~1e-30 (below float32's range, reached only through the log-scale), bins straddling
    the mean, both sides of the Gaussian's narrow-bin series threshold, and an edge exactly on
    the mean."""
    cases = []
    for bins in (3, 256, 65536):
        n = bins - 1
        for level in sorted({0, 1, n // 2, n - 1, n}):
            centre = (2 * level - n) / n
            for offset in (0.0, 1e-3, -0.4, 0.9, -3.0, 40.0, -1e4, 1e4):
                for log_scale in (-7.0, -3.0, 0.0, 2.0, 30.0, 65.0):
                    cases.append((level, bins, centre - offset, log_scale))
    n = 255
    for factor in (0.999, 1.001):  # h (1 + |m|) = 0.05 (1 -+ 1e-3)
        for m in (0.0, -3.0, 12.0):
            scale = (1 / n) / (0.05 * factor / (1 + abs(m)))
            cases.append((100, 256, (2 * 100 - n) / n - m * scale, math.log(scale)))
    cases.append((3, 8, 1 / 7, -7.0))  # the upper edge of level 3 of 8 is 0
    return cases


def our_log_masses(head_cls, dtype: torch.dtype, cases):
    """Our ``log P(x = level)`` and its derivative wrt the location, float64 ``(len(cases),)``."""
    out, grads = [], []
    for bins in sorted({case[1] for case in cases}):
        rows = [case for case in cases if case[1] == bins]
        params = torch.tensor([[0.0, loc, ls] for _, _, loc, ls in rows], dtype=dtype)
        params = params.reshape(-1, 3, 1, 1).requires_grad_(True)
        levels = torch.tensor([level for level, *_ in rows]).reshape(-1, 1, 1, 1)
        lp = head_cls(channels=1, mixtures=1, bins=bins).distribution(params).log_prob(levels)
        (grad,) = torch.autograd.grad(lp.sum(), params)
        out.append(lp.detach().double())
        grads.append(grad[:, 1, 0, 0].double())
    order = sorted(range(len(cases)), key=lambda i: cases[i][1])  # the grouping above
    inverse = torch.empty(len(cases), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(cases))
    return torch.cat(out)[inverse], torch.cat(grads)[inverse]


def check_high_precision(head_cls, cdf, dtype: torch.dtype, rtol: float) -> None:
    cases = high_precision_cases()
    got, _ = our_log_masses(head_cls, dtype, cases)
    # The reference sees the parameters as the model does (rounded to dtype).
    as_model = [
        (level, bins, float(torch.tensor(loc, dtype=dtype)), float(torch.tensor(ls, dtype=dtype)))
        for level, bins, loc, ls in cases
    ]
    with mpmath.workdps(60):
        ref = [float(mp_log_mass(cdf, lv, b, mpmath.mpf(loc), ls)) for lv, b, loc, ls in as_model]
    ref = torch.tensor(ref, dtype=torch.float64)
    assert torch.isfinite(got).all()
    err = (got - ref).abs() / ref.abs().clamp(min=1.0)
    worst = int(err.argmax())
    assert err.max() <= rtol, (as_model[worst], got[worst].item(), ref[worst].item())


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-13), (torch.float32, 1e-5)])
def test_bin_masses_match_high_precision(dtype: torch.dtype, rtol: float) -> None:
    check_high_precision(DiscretizedLogisticMixture, logistic_cdf, dtype, rtol)


# -- layout and coupling (both heads) ---------------------------------------------------------
@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("channels", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("coupling", [True, False])
def test_param_channels_formula(name: str, channels: int, coupling: bool) -> None:
    head = create_head(
        name, channels=channels, bins=256, in_channels=None, mixtures=3, coupling=coupling
    )
    m = channels * (channels - 1) // 2 if coupling else 0
    assert head.param_channels == 3 * (1 + 2 * channels + m)
    params = np.arange(head.param_channels, dtype=np.float64)
    logits, loc, log_scale, coeff = head.layout.split(torch.tensor(params)[None, :, None, None])
    ref_logits, ref_loc, ref_log_scale, ref_alpha = reference_layout(
        params, channels, 3, coupling
    )
    assert logits.flatten().tolist() == ref_logits.tolist()
    for c in range(channels):
        assert loc[0, :, c, 0, 0].tolist() == ref_loc[c].tolist()
        assert log_scale[0, :, c, 0, 0].tolist() == ref_log_scale[c].tolist()
    pairs = [(c, j) for c in range(1, channels) for j in range(c)] if coupling else []
    for i, pair in enumerate(pairs):
        assert coeff[0, :, i, 0, 0].tolist() == ref_alpha[pair].tolist()


@pytest.mark.parametrize("name", HEADS)
def test_defaults_through_the_registry(name: str) -> None:
    head = create_head(name, channels=3, bins=256, in_channels=None)
    assert head.param_channels == (100 if name == "dlm" else 10)
    alias = {"dlm": "discretized_logistic_mixture", "gaussian": "discretized_gaussian"}[name]
    assert type(create_head(alias)) is type(head)


@pytest.mark.parametrize("name", HEADS)
def test_uncoupled_is_product_of_channels_given_component(name: str) -> None:
    channels, k, bins = 3, 3, 16
    head = HEADS[name](channels=channels, mixtures=k, bins=bins, coupling=False)
    gen = torch.Generator().manual_seed(0)
    params = torch.randn(2, head.param_channels, 2, 2, generator=gen, dtype=torch.float64)
    x = torch.randint(0, bins, (2, channels, 2, 2), generator=gen)
    logits, loc, log_scale, _ = head.layout.split(params)
    single = HEADS[name](channels=1, mixtures=1, bins=bins)
    per_component = []
    for kk in range(k):
        total = torch.log_softmax(logits, 1)[:, kk]
        for c in range(channels):
            zero = torch.zeros_like(loc[:, kk, c])
            p1 = torch.stack([zero, loc[:, kk, c], log_scale[:, kk, c]], 1)  # K=1, C=1 layout
            total = total + single.distribution(p1).elementwise_log_prob(x[:, c : c + 1])[:, 0]
        per_component.append(total)
    expected = torch.logsumexp(torch.stack(per_component), 0).sum((-2, -1))
    torch.testing.assert_close(head.distribution(params).log_prob(x), expected)


@pytest.mark.parametrize("name", HEADS)
def test_zero_coefficients_equal_no_coupling(name: str) -> None:
    channels, k, bins = 4, 2, 32
    coupled = HEADS[name](channels=channels, mixtures=k, bins=bins, coupling=True)
    plain = HEADS[name](channels=channels, mixtures=k, bins=bins, coupling=False)
    gen = torch.Generator().manual_seed(1)
    params = torch.randn(3, coupled.param_channels, 2, 2, generator=gen, dtype=torch.float64)
    index = torch.arange(float(coupled.param_channels))[None, :, None, None]
    coeff_channels = coupled.layout.split(index)[3].flatten().long()
    params[:, coeff_channels] = 0.0  # tanh(0) = 0
    keep = [i for i in range(coupled.param_channels) if i not in coeff_channels.tolist()]
    x = torch.randint(0, bins, (3, channels, 2, 2), generator=gen)
    torch.testing.assert_close(
        coupled.distribution(params).elementwise_log_prob(x),
        plain.distribution(params[:, keep]).elementwise_log_prob(x),
    )


@pytest.mark.parametrize("name", HEADS)
def test_channel_conditionals_are_chain_rule_terms(name: str) -> None:
    """Channel c gets log p(x_c | x_<c): summing exp over x_c gives one for every x_<c."""
    bins = 6
    head = HEADS[name](channels=2, mixtures=3, bins=bins)
    gen = torch.Generator().manual_seed(2)
    params = torch.randn(1, head.param_channels, 1, 1, generator=gen, dtype=torch.float64) * 3
    x = torch.cartesian_prod(torch.arange(bins), torch.arange(bins))
    x = x.reshape(bins, bins, 1, 2, 1, 1)
    elp = head.distribution(params).elementwise_log_prob(x)[..., 0, :, 0, 0]  # (x0, x1, C)
    torch.testing.assert_close(elp[..., 1].exp().sum(1), torch.ones(bins, dtype=torch.float64))
    torch.testing.assert_close(elp[:, 0, 0].exp().sum(), torch.tensor(1.0, dtype=torch.float64))


# -- extremes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("bins", BINS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_finite_at_extreme_parameters_and_edge_bins(name: str, bins: int, dtype) -> None:
    channels, k = 3, 2
    head = HEADS[name](channels=channels, mixtures=k, bins=bins)
    gen = torch.Generator().manual_seed(bins)
    levels = torch.tensor([-1e4, -1e3, -30.0, -7.5, -1.0, 0.0, 0.5, 7.0, 30.0, 1e3, 1e4])
    n = 32
    pick = levels[torch.randint(0, len(levels), (n, head.param_channels, 1, 2), generator=gen)]
    uniform = (torch.rand(n, head.param_channels, 1, 2, generator=gen) * 2 - 1) * 1e4
    raw = torch.cat([pick, uniform]).to(dtype).requires_grad_(True)
    edge_levels = torch.tensor([0, 1, bins // 2, bins - 2, bins - 1]).clamp(0, bins - 1)
    x = edge_levels[torch.randint(0, 5, (2 * n, channels, 1, 2), generator=gen)]
    dist = head.distribution(raw)
    lp = dist.log_prob(x)
    assert lp.dtype in (torch.float32, torch.float64)
    assert torch.isfinite(lp).all()
    assert (dist.elementwise_log_prob(x) <= 1e-5).all()
    (grad,) = torch.autograd.grad(lp.sum(), raw)
    assert torch.isfinite(grad).all()
    sample = dist.sample(generator=torch.Generator().manual_seed(0))
    assert sample.min() >= 0 and sample.max() <= bins - 1
    few = head.distribution(raw.detach()[::8])  # the mean sums over up to 65535 levels
    assert torch.isfinite(few.mean).all()


def test_tiny_and_huge_scales_keep_bin_masses_exact() -> None:
    """A near-flat component (huge scale): the mass of a middle bin is 2h * pdf(0)."""
    bins = 256
    head = DiscretizedLogisticMixture(channels=1, mixtures=1, bins=bins)
    for log_scale in (50.0, 1e3, 1e4):
        params = torch.tensor([0.0, 0.0, log_scale]).reshape(1, 3, 1, 1)
        lp = head.distribution(params).log_prob(torch.tensor([[[[100]]]]))
        expected = math.log(2 / (bins - 1)) - log_scale + math.log(0.25)  # pdf(0) = 1/4
        assert abs(lp.item() - expected) <= 1e-6 * abs(expected)


def test_min_log_scale_clamp() -> None:
    head = DiscretizedLogisticMixture(channels=1, mixtures=1, bins=256)
    x = torch.tensor([[[[30]]]])
    lp = {}
    for raw in (-7.0, -50.0):
        params = torch.tensor([0.0, 0.1, raw]).reshape(1, 3, 1, 1).requires_grad_(True)
        lp[raw] = head.distribution(params).log_prob(x)
        lp[raw].backward()
        if raw < -7:
            assert params.grad[0, 2].item() == 0.0  # clamped: no gradient below the clamp
    assert lp[-7.0].item() == lp[-50.0].item()
    looser = DiscretizedLogisticMixture(channels=1, mixtures=1, min_log_scale=-60.0)
    params = torch.tensor([0.0, 0.1, -50.0]).reshape(1, 3, 1, 1)
    assert looser.distribution(params).log_prob(x).item() != lp[-7.0].item()


# -- sampling (both heads) --------------------------------------------------------------------
@pytest.mark.parametrize("name", HEADS)
def test_sample_joint_follows_coupled_log_prob(name: str) -> None:
    """The drawn (x0, x1) pairs follow the joint, coupling included (20000 draws, chi-square)."""
    bins = 4
    head = HEADS[name](channels=2, mixtures=2, bins=bins)
    # logits | slot R: means, log-scales, a_10 | slot G: means, log-scales (K = 2 each)
    params = [0.3, -0.2, -0.5, 0.4, -1.0, -1.5, 2.5, -2.0, 0.0, -0.3, -1.2, -0.8]
    dist = head.distribution(torch.tensor(params, dtype=torch.float64).reshape(1, -1, 1, 1))
    draws = dist.sample((20000,), generator=torch.Generator().manual_seed(3))[:, 0, :, 0, 0]
    counts = torch.bincount(draws[:, 0] * bins + draws[:, 1], minlength=bins * bins).double()
    values = torch.cartesian_prod(torch.arange(bins), torch.arange(bins)).reshape(-1, 1, 2, 1, 1)
    expected = dist.log_prob(values)[:, 0].exp() * len(draws)
    statistic = ((counts - expected) ** 2 / expected).sum().item()
    assert stats.chi2.sf(statistic, bins * bins - 1) > 1e-4
    # Coupling matters here: the product of the marginals is clearly rejected.
    table = counts.reshape(bins, bins) + 0.5  # (+0.5: no empty cells)
    _, p_independent, _, _ = stats.chi2_contingency(table.numpy())
    assert p_independent < 1e-6


@pytest.mark.parametrize("name", HEADS)
def test_sampling_is_reproducible_and_uses_only_the_generator(name: str) -> None:
    head = HEADS[name](channels=3, mixtures=4, bins=256)
    params = torch.randn(2, head.param_channels, 3, 3, generator=torch.Generator().manual_seed(0))
    dist = head.distribution(params)
    torch.manual_seed(123)
    first = dist.sample((5,), generator=torch.Generator().manual_seed(7))
    torch.manual_seed(456)  # the global state must not matter
    again = dist.sample((5,), generator=torch.Generator().manual_seed(7))
    other = dist.sample((5,), generator=torch.Generator().manual_seed(8))
    assert first.shape == (5, 2, 3, 3, 3) and first.dtype == torch.int64
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("name", HEADS)
def test_sampling_edges_and_point_masses(name: str) -> None:
    """Locations far outside [-1, 1] land in the edge bins; a tiny scale hits the nearest level."""
    bins = 32
    head = HEADS[name](channels=2, mixtures=1, bins=bins, coupling=False)
    x = torch.tensor([3, 17])
    centres = (2 * x / (bins - 1) - 1).tolist()
    params = torch.tensor(
        [[0.0, -50.0, -7.0, 50.0, -7.0], [0.0, centres[0], -7.0, centres[1], -7.0]]
    )  # logit | R: mean, log-scale | G: mean, log-scale
    draws = head.distribution(params.reshape(2, 5, 1, 1)).sample((50,))[..., 0, 0]
    assert (draws[:, 0] == torch.tensor([0, bins - 1])).all()
    assert (draws[:, 1] == x).all()


# -- mean (both heads) ------------------------------------------------------------------------
def brute_force_mean(dist, channels: int, bins: int) -> torch.Tensor:
    values = torch.cartesian_prod(*[torch.arange(bins)] * channels).reshape(-1, channels)
    shaped = values.reshape(-1, *([1] * len(dist.batch_shape)), channels, 1, 1)
    shaped = shaped.expand(-1, *dist.batch_shape, channels, *dist.event_shape[1:])
    prob = dist.log_prob(shaped).exp()  # (V, batch)
    return torch.einsum("vb,vc->bc", prob.reshape(len(values), -1), values.double())


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize(
    ("channels", "bins", "coupling"), [(3, 5, True), (2, 40, True), (3, 7, False), (1, 65536, True)]
)
def test_mean_is_exact_when_enumerable(name: str, channels: int, bins: int, coupling: bool) -> None:
    head = HEADS[name](channels=channels, mixtures=3, bins=bins, coupling=coupling)
    gen = torch.Generator().manual_seed(5)
    params = torch.randn(4, head.param_channels, 1, 1, generator=gen, dtype=torch.float64) * 1.5
    dist = head.distribution(params)
    expected = brute_force_mean(dist, channels, bins)
    torch.testing.assert_close(dist.mean[..., 0, 0], expected, rtol=1e-9, atol=1e-6)


@pytest.mark.parametrize("name", HEADS)
def test_mean_beyond_enumeration(name: str) -> None:
    """bins**C > 2**16: channel 0 stays exact, coupled channels use the plug-in approximation."""
    bins = 41  # 41**3 > 2**16
    head = HEADS[name](channels=3, mixtures=2, bins=bins)
    gen = torch.Generator().manual_seed(6)
    params = torch.randn(3, head.param_channels, 1, 1, generator=gen, dtype=torch.float64) * 0.5
    index = torch.arange(float(head.param_channels))[None, :, None, None]
    params[:, head.layout.split(index)[2].flatten().long()] = -3.0  # narrow, inside the range
    dist = head.distribution(params)
    expected = brute_force_mean(dist, 3, bins)
    mean = dist.mean[..., 0, 0]
    torch.testing.assert_close(mean[:, 0], expected[:, 0], rtol=1e-9, atol=1e-6)
    assert (mean - expected).abs().max() < 0.5  # levels


# -- construction -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize(
    ("kwargs", "error", "word"),
    [
        ({"mixtures": 0}, ValueError, "mixtures"),
        ({"mixtures": 2.0}, TypeError, "mixtures"),
        ({"coupling": 1}, TypeError, "coupling"),
        ({"min_log_scale": "low"}, TypeError, "min_log_scale"),
        ({"min_log_scale": float("nan")}, ValueError, "min_log_scale"),
        ({"channels": 0}, ValueError, "channels"),
        ({"bins": 1}, ValueError, "bins"),
        ({"in_channels": 0}, ValueError, "in_channels"),
        ({"feature_groups": 3, "in_channels": 6}, ValueError, "feature_groups"),
    ],
)
def test_bad_constructor_arguments(name: str, kwargs: dict, error: type, word: str) -> None:
    with pytest.raises(error, match=word):
        HEADS[name](**kwargs)


@pytest.mark.parametrize(
    "dist_cls", [DiscretizedLogisticMixtureDistribution, DiscretizedGaussianDistribution]
)
def test_distribution_rebuilds_through_expand(dist_cls) -> None:
    params = torch.randn(1, 2 * (1 + 2 * 2 + 1), 2, 2)
    dist = dist_cls(params, channels=2, mixtures=2, bins=16, coupling=True, min_log_scale=-3.0)
    big = dist.expand((4,))
    assert (big.mixtures, big.coupling, big.min_log_scale, big.bins) == (2, True, -3.0, 16)
    x = torch.randint(0, 16, (4, 2, 2, 2))
    torch.testing.assert_close(big.log_prob(x), dist.log_prob(x[:, None])[:, 0])
    with pytest.raises(ValueError, match="params"):
        dist_cls(params, channels=2, mixtures=2, bins=16, coupling=False)


@pytest.mark.parametrize("name", HEADS)
def test_projection_from_features(name: str) -> None:
    head = HEADS[name](channels=3, mixtures=2, bins=256, in_channels=8)
    dist = head(torch.randn(2, 8, 3, 4))
    assert dist.batch_shape == (2,) and dist.event_shape == (3, 3, 4)
    assert head.proj.out_channels == head.param_channels
    assert "mixtures=2" in repr(head)
