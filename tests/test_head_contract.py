"""The head contract over every (registered head, log-likelihood implementation) pair.

The pairs come from the registry (``list_heads()`` and each head's
``distribution_class.log_prob_backends``), so a new head or a new backend gets this battery with
nobody editing the file. For every pair, on small configurations (channels 1 and 3, bins 2 to
8, 1 to 3 components, coupling on and off, with and without a projection):

* each named check of ``discretelik.testing`` (``CONTRACT_CHECKS``) is its own test;
* normalization over all ``bins ** C`` values of a pixel and the enumerated mean;
* agreement with the eager implementation, values and gradients: float64 to rounding where the
  backend takes float64, and float32 against the float64 eager path within the float32 error
  model (a few ulps of the magnitudes involved);
* leading sample dimensions (or, where the backend refuses them, a ``ValueError`` naming the
  reason) and expanded (stride 0) parameters;
* hypothesis property tests at extreme parameters (means up to ``+-1e4``, log-scales down to
  ``min_log_scale = -80``, edge levels, odd shapes): finite log_prob and finite gradients;
* issue 11's two regression cases (a component far outside the data range with the smallest
  scale; every component at the smallest scale).

An independent float64 reference, written here from the documented formulas (direct CDF
differences, loops over components and channels), pins the eager path itself. The last
section makes sure the new checks can fail.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch.distributions import Distribution

import discretelik.heads  # noqa: F401  (registers the built-in heads)
from discretelik import create_head, get_head, list_heads
from discretelik.heads.softmax import DiscreteSoftmax, DiscreteSoftmaxDistribution
from discretelik.testing import (
    CONTRACT_CHECKS,
    check_expand,
    check_head_mean,
    check_head_normalization,
    check_mean,
    check_not_provided,
    check_validation,
)

HEADS = list_heads()
EPS32 = torch.finfo(torch.float32).eps


def backends(name: str) -> tuple[str, ...]:
    return tuple(get_head(name).distribution_class.log_prob_backends)


PAIRS = [(name, backend) for name in HEADS for backend in backends(name)]


def takes(name: str, option: str) -> bool:
    """Whether head ``name``'s constructor takes ``option``."""
    return option in inspect.signature(get_head(name)).parameters


MIXTURE_HEADS = [name for name in HEADS if takes(name, "mixtures")]


def configs(name: str) -> list[dict]:
    """Small configurations: every pixel value enumerable (``bins ** C <= 512``)."""
    out = [{"channels": 1, "bins": 8}, {"channels": 3, "bins": 4, "in_channels": 6}, {"channels": 3, "bins": 2}]
    if takes(name, "mixtures"):
        for kw, (k, coupling) in zip(out, [(3, True), (2, True), (1, False)]):
            kw.update(mixtures=k, coupling=coupling)
    return out


def config_id(kw: dict) -> str:
    short = {"channels": "C", "bins": "bins", "mixtures": "K", "coupling": "cpl", "in_channels": "F"}
    return "-".join(f"{short[k]}{int(v) if isinstance(v, bool) else v}" for k, v in kw.items())


def make(name: str, backend: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)  # projection weights
    return create_head(name, log_prob_backend=backend, **kw)


def refusal(name: str, backend: str, dtype=torch.float32, sample=()) -> str | None:
    """Why ``backend`` refuses a tiny call with ``dtype`` parameters and ``sample`` dims."""
    head = make(name, backend, channels=1, bins=4)
    dist = head.distribution(torch.zeros(1, head.param_channels, 1, 1, dtype=dtype))
    x = torch.zeros(*sample, 1, 1, 1, 1, dtype=torch.long)
    return dist.log_prob_backends[backend].unsupported(dist, x)


def float_dtypes(name: str, backend: str) -> list[torch.dtype]:
    return [d for d in (torch.float64, torch.float32) if refusal(name, backend, d) is None]


CONTRACT = [
    pytest.param(name, backend, kw, check, id=f"{name}-{backend}-{config_id(kw)}-{check.__name__}")
    for name, backend in PAIRS
    for kw in configs(name)
    for check in CONTRACT_CHECKS
]
PER_CONFIG = [
    pytest.param(name, backend, kw, id=f"{name}-{backend}-{config_id(kw)}")
    for name, backend in PAIRS
    for kw in configs(name)
]
PER_PAIR = [pytest.param(name, backend, id=f"{name}-{backend}") for name, backend in PAIRS]
OTHER_THAN_EAGER = [p for p in PER_PAIR if p.values[1] != "eager"]
MIXTURE_PAIRS = [p for p in PER_PAIR if p.values[0] in MIXTURE_HEADS]


def test_every_pair_is_covered() -> None:
    """The parametrization follows the registry: every head, every implementation."""
    assert {(p.values[0], p.values[1]) for p in PER_PAIR} == {
        (name, backend)
        for name in list_heads()
        for backend in get_head(name).distribution_class.log_prob_backends
    }
    assert all("eager" in backends(name) for name in HEADS)


# -- the named checks, normalization, mean ------------------------------------------------------
@pytest.mark.parametrize(("name", "backend", "kw", "check"), CONTRACT)
def test_contract(name: str, backend: str, kw: dict, check) -> None:
    check(make(name, backend, **kw))


@pytest.mark.parametrize(("name", "backend", "kw"), PER_CONFIG)
def test_normalization_and_mean(name: str, backend: str, kw: dict) -> None:
    head = make(name, backend, **kw)
    check_head_normalization(head, atol=1e-5)
    check_head_mean(head)


# -- agreement with the eager implementation ----------------------------------------------------
def random_case(name: str, seed: int, batch=(2,), sample=(), hw=(2, 3), **kw):
    """A head, moderate raw parameters ``batch + (P, H, W)`` (float64) and levels with both
    edges ``sample + batch + (C, H, W)``, and a generic upstream gradient of the levels' shape."""
    head = make(name, "eager", **kw)
    gen = torch.Generator().manual_seed(seed)
    params = torch.randn(*batch, head.param_channels, *hw, generator=gen, dtype=torch.float64)
    params = params * 1.5
    x = torch.randint(0, head.bins, (*sample, *batch, head.channels, *hw), generator=gen)
    flat = x.view(-1, *hw)
    flat[0, 0, 0], flat[-1, -1, -1] = 0, head.bins - 1
    weights = torch.rand(x.shape, generator=gen, dtype=torch.float64) + 0.5
    return head, params, x, weights


def value_and_grad(head, backend: str, params, x, weights):
    head.log_prob_backend = backend
    params = params.detach().requires_grad_(True)
    elp = head.distribution(params).elementwise_log_prob(x)
    (grad,) = torch.autograd.grad((elp * weights).sum(), params)
    return elp.detach(), grad


def agreement_configs(name: str) -> list[dict]:
    out = [{"channels": 1, "bins": 2}, {"channels": 3, "bins": 256}, {"channels": 4, "bins": 65536}]
    if takes(name, "mixtures"):
        for kw, coupling in zip(out, [True, True, False]):
            kw.update(mixtures=3, coupling=coupling)
    return out


def image_max(t: torch.Tensor) -> torch.Tensor:
    """``max |t|`` per image (the first dimension), ``(B,)``."""
    return t.abs().flatten(1).amax(1)


ULPS = 8  # the float32 error bound, in units of EPS32 times an image's magnitudes


@pytest.mark.parametrize(("name", "backend"), OTHER_THAN_EAGER)
def test_matches_eager(name: str, backend: str) -> None:
    """float64 to rounding where the backend takes float64; float32 against the float64 eager
    path on the same (float32-rounded) parameters, within a few ulps of the image's magnitudes."""
    dtypes = float_dtypes(name, backend)
    assert dtypes, f"{backend} takes neither float32 nor float64 parameters"
    for i, kw in enumerate(agreement_configs(name)):
        head, params, x, weights = random_case(name, i, **kw)
        for dtype in dtypes:
            p = params.to(dtype)
            ref, ref_grad = value_and_grad(head, "eager", p.double(), x, weights)
            got, grad = value_and_grad(head, backend, p, x, weights.to(dtype))
            assert got.dtype == grad.dtype == dtype
            if dtype == torch.float64:
                torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
                continue
            # float32 error model: every log-mass and posterior term of an image is rounded a
            # few times relative to the largest magnitude involved.
            scale = 1.0 + image_max(ref)  # (B,)
            err = image_max(got.double() - ref)
            assert (err <= ULPS * EPS32 * scale).all(), (kw, err / (EPS32 * scale))
            grad_err = image_max(grad.double() - ref_grad)
            grad_bound = ULPS * EPS32 * scale * (1.0 + image_max(ref_grad))
            assert (grad_err <= grad_bound).all(), (kw, grad_err / (EPS32 * scale * (1.0 + image_max(ref_grad))))


# -- an independent float64 reference of the eager path -----------------------------------------
def reference_mixture(head, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``log p(x_c | x_<c)`` ``(B, C, H, W)`` of a discretized mixture from the documented
    layout and formula: direct CDF differences in float64, loops over components and channels.

    Layout per pixel: ``K`` logits, then one slot per channel ``c`` holding ``K`` locations,
    ``K`` log-scales and ``n_c`` blocks of ``K`` coupling coefficients, the blocks of the pairs
    ``(1, 0), (2, 0), (2, 1), ...`` dealt out over the slots as ``numpy.array_split``.
    """
    family = head.distribution_class.family.__name__
    cdf = {"Logistic": torch.sigmoid, "Gaussian": _normal_cdf}[family]
    k, channels, bins = head.mixtures, head.channels, head.bins
    pairs = [(c, j) for c in range(1, channels) for j in range(c)] if head.coupling else []
    per_slot = [len(chunk) for chunk in np.array_split(np.arange(len(pairs)), channels)]
    rows = iter(params.unbind(1))
    logits = torch.stack([next(rows) for _ in range(k)])  # (K, B, H, W)
    loc, log_scale, alpha, left = [], [], {}, iter(pairs)
    for c in range(channels):
        loc.append([next(rows) for _ in range(k)])
        log_scale.append([next(rows) for _ in range(k)])
        for _ in range(per_slot[c]):
            alpha[next(left)] = [next(rows) for _ in range(k)]
    assert next(rows, None) is None
    centre = 2 * x.double() / (bins - 1) - 1  # (B, C, H, W)
    half = 1.0 / (bins - 1)
    joint = list(torch.softmax(logits, 0))  # pi_k prod_{j <= c} P_k(x_j | x_<j)
    partial = []
    for c in range(channels):
        for kk in range(k):
            mu = loc[c][kk] + sum(
                torch.tanh(alpha[(c, j)][kk]) * centre[:, j] for j in range(c) if head.coupling
            )
            s = torch.exp(log_scale[c][kk].clamp(min=head.min_log_scale))
            upper = (centre[:, c] + half - mu) / s
            lower = (centre[:, c] - half - mu) / s
            # Right of the mean the same mass from the mirrored CDFs, so nothing is lost to 1 - 1.
            middle = torch.where(
                lower > 0, cdf(-lower) - cdf(-upper), cdf(upper) - cdf(lower)
            )
            first, last = x[:, c] == 0, x[:, c] == bins - 1
            prob = torch.where(first, cdf(upper), torch.where(last, cdf(-lower), middle))
            joint[kk] = joint[kk] * prob
        partial.append(torch.log(sum(joint)))
    partial = torch.stack(partial, 1)  # (B, C, H, W): log p(x_<=c)
    return torch.cat([partial[:, :1], partial.diff(dim=1)], dim=1)


def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    # Not torch.special.ndtr: on CPU it returns 0 below about -8 (1 + erf cancels).
    return 0.5 * torch.special.erfc(-z / math.sqrt(2.0))


def reference_softmax(head, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``log softmax`` of each channel's block of ``bins`` logits, at the level."""
    b, _, h, w = params.shape
    logits = params.reshape(b, head.channels, head.bins, h, w)
    return torch.log_softmax(logits, dim=2).gather(2, x.unsqueeze(2)).squeeze(2)


def moderate_mixture_params(head, gen: torch.Generator, shape=(2, 2, 3)) -> torch.Tensor:
    """Locations in ``[-1.2, 1.2]``, log-scales in ``[-1.2, 0.5]`` (every reference probability
    far from float64 underflow), logits and coefficients in ``[-2, 2]``."""
    b, h, w = shape
    params = (torch.rand(b, head.param_channels, h, w, generator=gen, dtype=torch.float64) * 4) - 2
    index = torch.arange(float(head.param_channels))[None, :, None, None]
    _, loc, log_scale, _ = head.layout.split(index)
    loc, log_scale = loc.flatten().long(), log_scale.flatten().long()
    params[:, loc] = torch.rand(b, len(loc), h, w, generator=gen, dtype=torch.float64) * 2.4 - 1.2
    params[:, log_scale] = (
        torch.rand(b, len(log_scale), h, w, generator=gen, dtype=torch.float64) * 1.7 - 1.2
    )
    return params


@settings(max_examples=20)
@given(
    name=st.sampled_from(HEADS),
    seed=st.integers(0, 2**31),
    channels=st.integers(1, 4),
    mixtures=st.integers(1, 4),
    bins=st.sampled_from([2, 3, 32, 256, 65536]),
    coupling=st.booleans(),
)
def test_independent_reference_matches_eager(name, seed, channels, mixtures, bins, coupling) -> None:
    mixture = name in MIXTURE_HEADS
    kw = {"mixtures": mixtures, "coupling": coupling} if mixture else {}
    head = make(name, "eager", channels=channels, bins=bins, **kw)
    gen = torch.Generator().manual_seed(seed)
    if mixture:
        params = moderate_mixture_params(head, gen)
    else:
        params = torch.randn(2, head.param_channels, 2, 3, generator=gen, dtype=torch.float64) * 3
    x = _levels(head, torch.Generator().manual_seed(seed))
    ref = (reference_mixture if mixture else reference_softmax)(head, params, x)
    assert torch.isfinite(ref).all()
    got = head.distribution(params).elementwise_log_prob(x)
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-9)


def _levels(head, gen: torch.Generator) -> torch.Tensor:
    x = torch.randint(0, head.bins, (2, head.channels, 2, 3), generator=gen)
    x[0, :, 0, 0], x[0, :, 0, 1] = 0, head.bins - 1
    return x


# -- sample dimensions and expanded parameters --------------------------------------------------
@pytest.mark.parametrize(("name", "backend"), PER_PAIR)
def test_sample_dims(name: str, backend: str) -> None:
    """Levels ``(S, B, C, H, W)`` give the per-draw values, and the gradient of their sum; a
    backend that refuses them says why in a ``ValueError``."""
    kw = dict(channels=3, bins=16, **({"mixtures": 2} if name in MIXTURE_HEADS else {}))
    head, params, x, weights = random_case(name, 3, sample=(3,), **kw)
    head.log_prob_backend = backend
    dtype = float_dtypes(name, backend)[0]
    params, weights = params.to(dtype), weights.to(dtype)
    dist = head.distribution(params)
    reason = dist.log_prob_backends[backend].unsupported(dist, x)
    if reason is not None:
        with pytest.raises(ValueError, match="log_prob_backend") as info:
            head.distribution(params).log_prob(x)
        assert reason in str(info.value)
        return
    got, grad = value_and_grad(head, backend, params, x, weights)
    per_draw = [value_and_grad(head, backend, params, x[i], weights[i]) for i in range(3)]
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(got, torch.stack([v for v, _ in per_draw]), **tol)
    torch.testing.assert_close(grad, sum(g for _, g in per_draw), **tol)


@pytest.mark.parametrize(("name", "backend"), PER_PAIR)
def test_expanded_params(name: str, backend: str) -> None:
    """Stride-0 (``expand``-ed) parameters give the values and gradients of a contiguous copy."""
    kw = dict(channels=3, bins=16, **({"mixtures": 2} if name in MIXTURE_HEADS else {}))
    head, params, x, weights = random_case(name, 4, batch=(1,), **kw)
    dtype = float_dtypes(name, backend)[0]
    base = params.to(dtype).detach().requires_grad_(True)
    x = torch.cat([x, x.flip(-1), x.flip(-2)])  # (3, C, H, W)
    weights = torch.cat([weights] * 3).to(dtype)
    head.log_prob_backend = backend
    results = []
    for expanded in (base.expand(3, *base.shape[1:]), base.expand(3, *base.shape[1:]).clone()):
        assert (expanded.stride(0) == 0) == (len(results) == 0)
        elp = head.distribution(expanded).elementwise_log_prob(x)
        (grad,) = torch.autograd.grad((elp * weights).sum(), base)
        results.append((elp.detach(), grad))
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(results[0], results[1], **tol)


# -- finite at extreme parameters ---------------------------------------------------------------
EXTREMES = [-1e4, -1e3, -80.0, -30.0, -7.5, -1.0, 0.0, 0.5, 7.0, 30.0, 1e3, 1e4]


@st.composite
def extreme_cases(draw, name: str):
    """An odd-shaped head config, raw float32 parameters of extreme and random magnitude, and
    levels that favour the edge bins."""
    channels = draw(st.sampled_from([1, 3, 5]))
    bins = draw(st.sampled_from([2, 3, 256, 65536]))
    hw = draw(st.sampled_from([(1, 1), (1, 3), (2, 1)]))
    kw = {"channels": channels, "bins": bins}
    if name in MIXTURE_HEADS:
        kw.update(
            mixtures=draw(st.sampled_from([1, 2, 7])),
            coupling=draw(st.booleans()),
            min_log_scale=-80.0,
        )
    p = make(name, "eager", **kw).param_channels
    elements = st.one_of(st.sampled_from(EXTREMES), st.floats(-1e4, 1e4, width=32))
    params = draw(hnp.arrays(np.float32, (2, p, *hw), elements=elements))
    levels = st.one_of(st.sampled_from([0, bins - 1]), st.integers(0, bins - 1))
    x = draw(hnp.arrays(np.int64, (2, channels, *hw), elements=levels))
    return kw, torch.from_numpy(params), torch.from_numpy(x)


@pytest.mark.parametrize(("name", "backend"), PER_PAIR)
def test_finite_at_extremes(name: str, backend: str) -> None:
    # Each new configuration compiles new Triton kernels (slow in the CPU interpreter).
    examples = 6 if "triton" in backend else 25

    @settings(max_examples=examples)
    @given(case=extreme_cases(name))
    def check(case) -> None:
        kw, params, x = case
        head = make(name, backend, **kw)
        params = params.requires_grad_(True)
        lp = head.distribution(params).log_prob(x)
        assert torch.isfinite(lp).all(), (kw, lp)
        (grad,) = torch.autograd.grad(lp.sum(), params)
        assert torch.isfinite(grad).all(), kw

    check()


# -- issue 11's regression cases ----------------------------------------------------------------
def far_component_case(name: str, backend: str, both_tiny: bool):
    """``channels=3, mixtures=2, min_log_scale=-80`` on raw parameters of one pixel: component
    0's mean at ``1e4`` in every channel with log-scales ``-80`` (and, with ``both_tiny``,
    component 1's log-scales at ``-80`` too); data inside the range."""
    head = make(name, backend, channels=3, mixtures=2, bins=256, min_log_scale=-80.0)
    index = torch.arange(float(head.param_channels))[None, :, None, None]
    _, loc, log_scale, _ = (t[0, ..., 0, 0].long() for t in head.layout.split(index))
    params = torch.zeros(1, head.param_channels, 1, 1)
    params[0, [0, 1], 0, 0] = torch.tensor([0.3, -0.2])  # logits
    params[0, loc[0], 0, 0] = 1e4
    params[0, log_scale[0], 0, 0] = -80.0
    params[0, loc[1], 0, 0] = torch.tensor([0.1, -0.3, 0.5])
    params[0, log_scale[1], 0, 0] = -80.0 if both_tiny else -2.0
    x = torch.tensor([100, 128, 200]).reshape(1, 3, 1, 1)
    return head, params, x


@pytest.mark.parametrize(("name", "backend"), MIXTURE_PAIRS)
def test_far_component_with_tiny_scale(name: str, backend: str) -> None:
    """Issue 11: one component at ``1e4`` with scale ``e^-80``: the lean path gave NaN. Its
    mass is ``exp(-huge)``, so the pixel's log-likelihood is that of the other component."""
    head, params, x = far_component_case(name, backend, both_tiny=False)
    params.requires_grad_(True)
    lp = head.distribution(params).log_prob(x)
    (grad,) = torch.autograd.grad(lp.sum(), params)
    assert torch.isfinite(lp).all() and torch.isfinite(grad).all(), (lp, grad)
    # The other component alone (K = 1), weighted by its mixture weight.
    single = make(name, "eager", channels=3, mixtures=1, bins=256, min_log_scale=-80.0)
    expected = single.distribution(_single_params(single, params.detach(), head)).log_prob(x)
    expected = expected + torch.log_softmax(params.detach()[0, :2, 0, 0], 0)[1]
    torch.testing.assert_close(lp.detach(), expected, rtol=1e-5, atol=1e-4)


def _single_params(single, params, head) -> torch.Tensor:
    """Component 1 of ``head``'s parameters in ``single``'s (``K = 1``) layout."""
    src = head.layout.split(torch.arange(float(head.param_channels))[None, :, None, None])
    dst = single.layout.split(torch.arange(float(single.param_channels))[None, :, None, None])
    out = torch.zeros(1, single.param_channels, 1, 1)
    for s, d in zip(src[1:], dst[1:]):  # locations, log-scales, coefficients
        out[0, d[0, 0, ..., 0, 0].long(), 0, 0] = params[0, s[0, 1, ..., 0, 0].long(), 0, 0]
    return out


@pytest.mark.parametrize(("name", "backend"), MIXTURE_PAIRS)
def test_every_component_at_the_smallest_scale(name: str, backend: str) -> None:
    """Issue 11: with every log-scale at ``-80`` the eager path gave NaN; the true value is a
    finite (hugely negative) float32, and so is its gradient."""
    head, params, x = far_component_case(name, backend, both_tiny=True)
    params.requires_grad_(True)
    lp = head.distribution(params).log_prob(x)
    (grad,) = torch.autograd.grad(lp.sum(), params)
    assert torch.isfinite(lp).all() and torch.isfinite(grad).all(), (lp, grad)
    assert (lp < -1e20).all(), lp  # every bin is e^80 scales away from a location
    eager = make(name, "eager", channels=3, mixtures=2, bins=256, min_log_scale=-80.0)
    torch.testing.assert_close(
        lp.detach(), eager.distribution(params.detach()).log_prob(x), rtol=1e-5, atol=0
    )


# -- the new checks can fail --------------------------------------------------------------------
class _BareNotImplemented(DiscreteSoftmaxDistribution):
    def cdf(self, value):
        raise NotImplementedError


class _ForgetsBackendOnExpand(DiscreteSoftmaxDistribution):
    def expand(self, batch_shape, _instance=None):
        big = super().expand(batch_shape)
        big.log_prob_backend = "eager" if self.log_prob_backend != "eager" else "lean"
        return big


class _LetsInfThrough(DiscreteSoftmaxDistribution):
    def __init__(self, params, channels, bins, validate_args=None, log_prob_backend="auto"):
        clean = torch.nan_to_num(params, nan=math.nan, posinf=0.0, neginf=0.0)  # NaN only
        super().__init__(clean, channels, bins, validate_args, log_prob_backend)


class _WideVariance(DiscreteSoftmaxDistribution):
    @property
    def variance(self):
        return super().variance + self.bins**2


class _EntropyOutOfRange(DiscreteSoftmaxDistribution):
    def entropy(self):
        return -super().entropy()


def _head_with(dist_cls, **kwargs) -> DiscreteSoftmax:
    class Broken(DiscreteSoftmax):
        def distribution(self, params, validate_args=None):
            return dist_cls(
                params, self.channels, self.bins, validate_args=validate_args,
                log_prob_backend=self.log_prob_backend,
            )  # fmt: skip

    torch.manual_seed(0)
    return Broken(**kwargs)


@pytest.mark.parametrize(
    ("dist_cls", "check", "match"),
    [
        (_BareNotImplemented, check_not_provided, "cdf raises NotImplementedError without"),
        (_EntropyOutOfRange, check_not_provided, "entropy must be finite and within"),
        (_ForgetsBackendOnExpand, check_expand, "expand must keep log_prob_backend"),
        (_LetsInfThrough, check_validation, "inf params, validate_args=True"),
        (_WideVariance, check_mean, "variance of levels"),
    ],
)
def test_checks_catch_broken_heads(dist_cls, check, match: str) -> None:
    with pytest.raises(AssertionError, match=match):
        check(_head_with(dist_cls, channels=2, bins=4, log_prob_backend="lean"))
    check(_head_with(DiscreteSoftmaxDistribution, channels=2, bins=4, log_prob_backend="lean"))


def test_validation_check_restores_the_global_default() -> None:
    before = Distribution._validate_args
    check_validation(make(HEADS[0], "eager", channels=2, bins=4))
    assert Distribution._validate_args == before
