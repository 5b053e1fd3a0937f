"""Checks that any likelihood head meets the head/distribution contract.

Every check takes a [`Head`][discretelik.Head] instance (a built-in one, or a plugin's) and uses
only the public contract: ``head.channels``, ``head.bins``, ``head.in_channels``,
``head.param_channels``, ``head(features)``, ``head.distribution(params, validate_args=)`` and,
on the distribution, ``log_prob``, ``elementwise_log_prob``, ``sample(sample_shape,
generator=)``, ``mean``, ``expand``, ``batch_shape``, ``event_shape`` and ``support`` (and,
where the distribution has them, ``variance``, ``stddev``, ``mode``, ``entropy`` and the
``log_prob_backend`` / ``log_prob_backends`` pair).

The contract is split into named checks, each a function of the head (and optional sizes and
seed) that [`check_head_contract`][discretelik.testing.check_head_contract] runs in turn
(``CONTRACT_CHECKS``):

* ``check_shapes``: ``head.params``, ``batch_shape`` and ``event_shape``;
* ``check_support``: the integer-interval support and its ``check``;
* ``check_sampling``: shapes, ``int64``, range, generator reproducibility, global RNG untouched;
* ``check_log_prob_shapes``: ``log_prob`` shapes and dtypes, the sum of
  ``elementwise_log_prob``, integer dtypes of the levels, refusals that name their reason;
* ``check_pixel_independence``: pixels independent given the parameters;
* ``check_mean``: ``mean`` (and ``variance``, ``stddev``, ``mode`` where provided);
* ``check_expand``: ``expand`` keeps shapes, values and ``log_prob_backend``;
* ``check_validation``: ``validate_args`` per instance, after ``expand`` and globally, for
  out-of-range levels and NaN / +-inf parameters;
* ``check_bad_input``: argument errors that name the argument;
* ``check_not_provided``: ``rsample``, ``cdf``, ``icdf``, ``enumerate_support`` (and
  ``entropy`` unless exact) raise ``NotImplementedError`` with a reason.

Beyond the contract: ``check_head_normalization`` and ``check_head_mean`` enumerate every
pixel value, ``check_sampling_matches_log_prob`` / ``check_samples_match_log_prob`` run a
chi-square test of the sampler, ``check_head_finite`` tries extreme parameters and
``check_channel_groups`` a grouped projection.

A failed check raises ``AssertionError`` with a message that says what was expected and what
was found; a bad argument to a check raises ``ValueError``. Our own test-suite runs these on
every registered head and every log-likelihood implementation:

```python
from discretelik import create_head
from discretelik.testing.heads import check_head_contract, check_head_normalization

head = create_head("my_head", channels=3, bins=8)
check_head_contract(head)
check_head_normalization(head)
```
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution, constraints

__all__ = [
    "CONTRACT_CHECKS",
    "check_bad_input",
    "check_channel_groups",
    "check_expand",
    "check_head_contract",
    "check_head_finite",
    "check_head_mean",
    "check_head_normalization",
    "check_log_prob_shapes",
    "check_mean",
    "check_not_provided",
    "check_pixel_independence",
    "check_samples_match_log_prob",
    "check_sampling",
    "check_sampling_matches_log_prob",
    "check_shapes",
    "check_support",
    "check_validation",
    "enumerate_levels",
]


# -- helpers ---------------------------------------------------------------------------------
def _device(head: torch.nn.Module) -> torch.device:
    param = next(head.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _random_params(
    head: torch.nn.Module, shape: tuple[int, int, int], scale: float, seed: int
) -> Tensor:
    """Raw parameters ``(N, P, H, W)``, standard normal times ``scale`` (float32)."""
    n, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    params = torch.randn(n, head.param_channels, h, w, generator=gen) * scale
    return params.to(_device(head))


def _as_params(head: torch.nn.Module, params: Tensor | None, seed: int) -> Tensor:
    if params is None:
        # Three single-pixel sets from flat to peaked: standard normal times 0.5, 1.5, 4.5.
        scales = torch.tensor([0.5, 1.5, 4.5])[:, None, None, None]
        return _random_params(head, (3, 1, 1), 1.0, seed) * scales.to(_device(head))
    if not isinstance(params, Tensor) or params.dim() != 4:
        raise ValueError(
            "params must be a tensor (N, param_channels, H, W), got "
            f"{tuple(params.shape) if isinstance(params, Tensor) else type(params).__name__}"
        )
    if params.shape[1] != head.param_channels:
        raise ValueError(
            f"params must have head.param_channels={head.param_channels} channels, "
            f"got shape {tuple(params.shape)}"
        )
    return params


def _check_outcomes(head: torch.nn.Module, max_outcomes: int) -> int:
    outcomes = head.bins**head.channels
    if outcomes > max_outcomes:
        raise ValueError(
            f"enumerating bins**channels = {head.bins}**{head.channels} = {outcomes} outcomes "
            f"exceeds max_outcomes={max_outcomes}; use a head with fewer bins or channels"
        )
    return outcomes


def enumerate_levels(channels: int, bins: int, device: torch.device | str = "cpu") -> Tensor:
    """Every value of one pixel, ``int64`` ``(bins**channels, channels)``, in lexicographic order.

    Channel 0 varies slowest, so row ``r`` holds the base-``bins`` digits of ``r``.
    """
    axes = [torch.arange(bins, device=device)] * channels
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, channels)


def _expect_error(
    errors: type[Exception] | tuple[type[Exception], ...],
    fragments: Sequence[str],
    fn: Callable[[], object],
    what: str,
) -> None:
    """Assert that ``fn()`` raises ``errors`` with a message containing every fragment."""
    names = errors.__name__ if isinstance(errors, type) else "/".join(e.__name__ for e in errors)
    try:
        fn()
    except errors as err:
        missing = [f for f in fragments if f not in str(err)]
        if missing:
            raise AssertionError(
                f"{what}: the {type(err).__name__} message should mention {missing} (the "
                f"argument, what was expected and what was received), got: {str(err)!r}"
            ) from err
        return
    except Exception as err:
        raise AssertionError(f"{what}: expected {names}, got {type(err).__name__}: {err}") from err
    raise AssertionError(f"{what}: expected {names}, but nothing was raised")


def _close(actual: Tensor, expected: Tensor, what: str, atol: float, rtol: float = 0.0) -> None:
    try:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, check_dtype=False)
    except AssertionError as err:
        raise AssertionError(f"{what}\n{err}") from None


def _joint_log_probs(dist: Distribution, channels: int, bins: int, device: torch.device) -> Tensor:
    """``elementwise_log_prob`` of every pixel value: float64 ``(bins**C, N, C, H, W)``."""
    n, _, h, w = dist.batch_shape + dist.event_shape
    grid = enumerate_levels(channels, bins, device)  # (M, C)
    values = grid[:, None, :, None, None].expand(-1, n, -1, h, w)  # (M, N, C, H, W)
    elp = _elementwise_over(dist, values)
    if tuple(elp.shape) != tuple(values.shape):
        raise AssertionError(
            f"elementwise_log_prob must return the value's shape {tuple(values.shape)}, "
            f"got {tuple(elp.shape)}"
        )
    if torch.isnan(elp).any() or (elp > 1e-6).any():
        bad = elp[torch.isnan(elp) | (elp > 1e-6)]
        raise AssertionError(
            f"log-probabilities must be <= 0 and not NaN, found {bad[:5].tolist()} "
            f"({bad.numel()} of {elp.numel()} entries)"
        )
    return elp.detach().double()


# -- checks ----------------------------------------------------------------------------------
def check_head_normalization(
    head: torch.nn.Module,
    params: Tensor | None = None,
    *,
    atol: float = 1e-5,
    seed: int = 0,
    max_outcomes: int = 4096,
) -> None:
    """Check that the head's distribution sums to one, jointly and channel by channel.

    Enumerates every value of a pixel (``bins**C`` of them) and checks, at every pixel of every
    parameter set:

    * ``sum_x exp(log p(x)) == 1`` within ``atol`` (``log p(x)`` = the channel sum of
      ``elementwise_log_prob``), and no log-probability is NaN or positive;
    * ``elementwise_log_prob`` of channel ``c`` does not depend on channels ``> c`` (it is
      ``log p(x_c | x_<c)``), and sums to one over ``x_c`` for every ``x_<c``.

    Args:
        head: The head; its projection is bypassed (``head.distribution(params)``).
        params: Raw parameters ``(N, head.param_channels, H, W)``; ``None`` draws three random
            single-pixel sets (standard normal times 0.5, 1.5 and 4.5, seeded by ``seed``).
        atol: Tolerance on each total probability.
        seed: Seed for the default ``params``.
        max_outcomes: Refuse (``ValueError``) heads with more than this many pixel values.

    Raises:
        AssertionError: A check failed.
    """
    _check_outcomes(head, max_outcomes)
    params = _as_params(head, params, seed)
    channels, bins = head.channels, head.bins
    elp = _joint_log_probs(head.distribution(params), channels, bins, params.device)
    lp = elp.reshape(*(bins,) * channels, *elp.shape[1:])  # (K,)*C + (N, C, H, W)
    for c in range(channels):
        own = lp.select(channels + 1, c)  # (K,)*C + (N, H, W)
        ref = own
        for later in range(c + 1, channels):
            ref = ref.narrow(later, 0, 1)  # the value with x_later = 0
        _close(
            own,
            ref.expand_as(own),
            f"elementwise_log_prob of channel {c} must not depend on channels > {c} "
            "(it is log p(x_c | x_<c))",
            atol=1e-5,
            rtol=1e-5,
        )
        cond = ref.logsumexp(dim=c).exp()
        cerr = (cond - 1).abs()
        if not bool(cerr.max() <= atol):
            raise AssertionError(
                f"the conditional of channel {c} must sum to 1 over its {bins} levels for every "
                f"value of channels < {c}; worst total {float(cond.flatten()[cerr.argmax()]):.9g}"
            )
    total = elp.sum(dim=2).logsumexp(dim=0).exp()  # (N, H, W)
    err = (total - 1).abs()
    if not bool(err.max() <= atol):
        worst = np.unravel_index(int(err.argmax()), tuple(err.shape))
        raise AssertionError(
            f"probabilities over all {bins}**{channels} pixel values must sum to 1 within "
            f"{atol}; at (parameter set, i, j) = {tuple(int(i) for i in worst)} they sum to "
            f"{float(total[worst]):.9g}"
        )


def check_head_mean(
    head: torch.nn.Module,
    params: Tensor | None = None,
    *,
    atol: float | None = None,
    seed: int = 0,
    max_outcomes: int = 4096,
) -> None:
    """Check that ``dist.mean`` is the expected level ``E[x_c]`` under ``log_prob``.

    The reference is computed by enumerating every pixel value: ``E[x_c] = sum_x x_c p(x)``
    (the marginal mean of channel ``c``, whatever the coupling between channels).

    Args:
        head: The head; its projection is bypassed.
        params: Raw parameters ``(N, head.param_channels, H, W)``; ``None`` draws three random
            single-pixel sets.
        atol: Absolute tolerance; ``None`` means ``1e-4 * (bins - 1)``.
        seed: Seed for the default ``params``.
        max_outcomes: Refuse (``ValueError``) heads with more than this many pixel values.

    Raises:
        AssertionError: ``mean`` has the wrong shape or differs from the enumerated mean.
    """
    _check_outcomes(head, max_outcomes)
    params = _as_params(head, params, seed)
    dist = head.distribution(params)
    elp = _joint_log_probs(dist, head.channels, head.bins, params.device)  # (M, N, C, H, W)
    prob = elp.sum(dim=2).exp()  # (M, N, H, W)
    prob = prob / prob.sum(dim=0)
    grid = enumerate_levels(head.channels, head.bins, prob.device).double()  # (M, C)
    expected = torch.einsum("mnhw,mc->nchw", prob, grid)
    mean = dist.mean
    if tuple(mean.shape) != tuple(expected.shape) or not mean.is_floating_point():
        raise AssertionError(
            f"mean must be a float tensor of shape batch_shape + event_shape "
            f"{tuple(expected.shape)}, got {mean.dtype} {tuple(mean.shape)}"
        )
    tol = 1e-4 * (head.bins - 1) if atol is None else atol
    _close(mean.detach().double(), expected, "mean must equal sum_x x_c p(x)", atol=tol)


def check_samples_match_log_prob(
    dist: Distribution,
    samples: Tensor,
    *,
    p_threshold: float = 1e-4,
    min_expected: float = 5.0,
    max_outcomes: int = 4096,
) -> float:
    """Chi-square goodness-of-fit test of ``samples`` against a one-pixel ``dist``.

    The ``bins**C`` joint pixel values are the cells; their expected counts come from
    ``exp(dist.log_prob(x))``. Cells with expected count below ``min_expected`` are merged into
    one (and that one into the smallest other cell if it is still too small), so the chi-square
    approximation holds. A sample in a value of probability zero fails at once.

    Args:
        dist: A distribution with one pixel: ``batch_shape`` with one element and
            ``event_shape == (C, 1, 1)``; its support must expose ``bins`` as the upper bound
            plus one (through ``dist.support``'s integer interval).
        samples: Integer tensor ``(S,) + batch_shape + (C, 1, 1)``.
        p_threshold: The check fails when the p-value is at or below this.
        min_expected: Smallest expected count of a cell.
        max_outcomes: Refuse (``ValueError``) more than this many joint values.

    Returns:
        The p-value.

    Raises:
        AssertionError: Samples outside the support, or the p-value is ``<= p_threshold``.
    """
    channels, h, w = dist.event_shape
    if (h, w) != (1, 1) or math.prod(dist.batch_shape) != 1:
        raise ValueError(
            "dist must describe one pixel (batch of one, event (C, 1, 1)), got batch_shape "
            f"{tuple(dist.batch_shape)} and event_shape {tuple(dist.event_shape)}"
        )
    support = getattr(dist.support, "base_constraint", dist.support)
    bins = int(support.upper_bound) + 1
    if bins**channels > max_outcomes:
        raise ValueError(f"{bins}**{channels} joint values exceed max_outcomes={max_outcomes}")
    expected_shape = (samples.shape[0], *dist.batch_shape, *dist.event_shape)
    if samples.dim() < 1 or tuple(samples.shape) != expected_shape:
        raise ValueError(f"samples must have shape {expected_shape}, got {tuple(samples.shape)}")
    flat = samples.reshape(samples.shape[0], channels).long().cpu()
    if bool((flat < 0).any() or (flat >= bins).any()):
        raise AssertionError(
            f"samples must lie in [0, {bins - 1}], got values in "
            f"[{int(flat.min())}, {int(flat.max())}]"
        )
    cell = (flat * bins ** torch.arange(channels - 1, -1, -1)).sum(dim=1)
    observed = np.bincount(cell.numpy(), minlength=bins**channels).astype(np.float64)

    grid = enumerate_levels(channels, bins, samples.device)
    values = grid.reshape(-1, *dist.batch_shape, channels, 1, 1)
    prob = _elementwise_over(dist, values).sum(dim=(-3, -2, -1)).detach().double().exp().reshape(-1).cpu().numpy()
    prob = prob / prob.sum()
    n = observed.sum()
    expected = prob * n

    impossible = (expected == 0) & (observed > 0)
    if impossible.any():
        first = grid[int(np.flatnonzero(impossible)[0])].tolist()
        raise AssertionError(
            f"{int(observed[impossible].sum())} samples fell on values of probability 0 "
            f"under log_prob, e.g. {first}"
        )
    small = expected < min_expected
    obs_cells = list(observed[~small])
    exp_cells = list(expected[~small])
    if small.any() and expected[small].sum() > 0:
        rest_obs, rest_exp = observed[small].sum(), expected[small].sum()
        if rest_exp < min_expected and exp_cells:
            k = int(np.argmin(exp_cells))
            obs_cells[k] += rest_obs
            exp_cells[k] += rest_exp
        else:
            obs_cells.append(rest_obs)
            exp_cells.append(rest_exp)
    if len(exp_cells) < 2:
        return 1.0  # one cell holds everything: every sample agrees trivially
    from scipy import stats  # imported here: scipy is a test-only dependency

    result = stats.chisquare(np.asarray(obs_cells), np.asarray(exp_cells))
    p_value = float(result.pvalue)
    if not p_value > p_threshold:
        worst = int(np.argmax((observed - expected) ** 2 / np.maximum(expected, 1e-300)))
        raise AssertionError(
            f"samples do not follow exp(log_prob): chi-square {float(result.statistic):.1f} on "
            f"{len(exp_cells) - 1} degrees of freedom, p = {p_value:.3g} <= {p_threshold}; "
            f"worst value {grid[worst].tolist()}: observed {int(observed[worst])}, expected "
            f"{expected[worst]:.1f} (of {int(n)} samples)"
        )
    return p_value


def check_sampling_matches_log_prob(
    head: torch.nn.Module,
    params: Tensor | None = None,
    *,
    num_samples: int = 20000,
    seed: int = 0,
    p_threshold: float = 1e-4,
    min_expected: float = 5.0,
    max_outcomes: int = 4096,
) -> float:
    """Check that ``sample`` draws from the distribution that ``log_prob`` scores.

    Draws ``num_samples`` values of one pixel with a seeded ``torch.Generator`` and runs
    ``check_samples_match_log_prob`` on them.

    Args:
        head: The head; its projection is bypassed.
        params: Raw parameters ``(1, head.param_channels, 1, 1)``; ``None`` draws random ones
            (standard normal, seeded by ``seed``: larger raw parameters often make a
            location-scale head put all its mass on one level, which tests nothing).
        num_samples: Number of draws.
        seed: Seed of the parameters and of the generator.
        p_threshold: The check fails when the p-value is at or below this.
        min_expected: Smallest expected count of a chi-square cell.
        max_outcomes: Refuse (``ValueError``) heads with more than this many pixel values.

    Returns:
        The p-value.

    Raises:
        AssertionError: The samples do not fit ``log_prob``.
    """
    _check_outcomes(head, max_outcomes)
    params = _random_params(head, (1, 1, 1), 1.0, seed) if params is None else params
    params = _as_params(head, params, seed)
    if params.shape[0] != 1 or tuple(params.shape[2:]) != (1, 1):
        raise ValueError(f"params must have shape (1, P, 1, 1), got {tuple(params.shape)}")
    dist = head.distribution(params)
    gen = torch.Generator(device=params.device).manual_seed(seed)
    samples = dist.sample((num_samples,), generator=gen)
    return check_samples_match_log_prob(
        dist,
        samples,
        p_threshold=p_threshold,
        min_expected=min_expected,
        max_outcomes=max_outcomes,
    )


# -- the contract, one named check per part ----------------------------------------------------
@dataclass(frozen=True)
class _Setup:
    """What every contract check starts from: one distribution from random features."""

    features: Tensor  # (B, F, H, W)
    params: Tensor  # (B, P, H, W), head.params(features)
    dist: Distribution  # head(features)
    x: Tensor  # one sample, int64 (B, C, H, W)
    batch: int
    event: tuple[int, int, int]  # (C, H, W)
    device: torch.device


def _setup(head: torch.nn.Module, batch: int, height: int, width: int, seed: int) -> _Setup:
    if width < 2 or height < 1 or batch < 1:
        raise ValueError(
            f"need batch >= 1, height >= 1 and width >= 2, got {batch}, {height}, {width}"
        )
    device = _device(head)
    gen = torch.Generator().manual_seed(seed)
    f_ch = head.param_channels if head.in_channels is None else head.in_channels
    features = torch.randn(batch, f_ch, height, width, generator=gen).to(device)
    with torch.no_grad():
        dist = head(features)
        params = head.params(features)
    x = dist.sample(generator=torch.Generator(device=device).manual_seed(seed))
    event = (head.channels, height, width)
    return _Setup(features, params, dist, x, batch, event, device)


def _refusal(dist: Distribution, value: Tensor) -> str | None:
    """Why the log-likelihood implementation that ``dist`` names refuses ``value``.

    ``None`` when it computes the call, or when ``dist`` names no implementation (a
    distribution without ``log_prob_backends``, or ``"auto"``, which always finds one).
    """
    table = getattr(dist, "log_prob_backends", None)
    name = getattr(dist, "log_prob_backend", None)
    if not isinstance(table, Mapping) or name not in table:
        return None
    return table[name].unsupported(dist, value)


def _elementwise_over(dist: Distribution, values: Tensor) -> Tensor:
    """``elementwise_log_prob`` of ``values`` with leading sample dimensions; an implementation
    that refuses sample dimensions gets them moved into the batch through ``expand``."""
    if _refusal(dist, values) is None:
        return dist.elementwise_log_prob(values)
    sample = values.shape[: values.dim() - len(dist.batch_shape) - len(dist.event_shape)]
    return dist.expand(sample + dist.batch_shape).elementwise_log_prob(values)


def check_shapes(
    head: torch.nn.Module, *, batch: int = 2, height: int = 3, width: int = 2, seed: int = 0
) -> None:
    """Check ``head.params`` ``(B, P, H, W)``, ``batch_shape (B,)`` and ``event_shape (C, H, W)``.

    Args:
        head: The head to check (with or without projection).
        batch: ``B``.
        height: ``H`` (at least 1).
        width: ``W`` (at least 2, so that pixels can be told apart).
        seed: Seed of the random features and draws.

    Raises:
        AssertionError: A check failed.
    """
    s = _setup(head, batch, height, width, seed)
    want = (batch, head.param_channels, height, width)
    if tuple(s.params.shape) != want or not s.params.is_floating_point():
        raise AssertionError(
            f"head.params must return float (B, param_channels={head.param_channels}, H, W) = "
            f"{want}, got {s.params.dtype} {tuple(s.params.shape)}"
        )
    if tuple(s.dist.batch_shape) != (batch,) or tuple(s.dist.event_shape) != s.event:
        raise AssertionError(
            f"expected batch_shape {(batch,)} and event_shape {s.event}, got "
            f"{tuple(s.dist.batch_shape)} and {tuple(s.dist.event_shape)}"
        )


def check_support(
    head: torch.nn.Module, *, batch: int = 2, height: int = 3, width: int = 2, seed: int = 0
) -> None:
    """Check that ``support`` is ``independent(integer_interval(0, bins - 1), 3)`` and says so.

    ``support.check`` must accept the distribution's own samples and reject levels ``-1`` and
    ``bins``. Arguments as for [`check_shapes`][discretelik.testing.check_shapes].

    Raises:
        AssertionError: A check failed.
    """
    s = _setup(head, batch, height, width, seed)
    bins, support = head.bins, s.dist.support
    base = getattr(support, "base_constraint", None)
    if not (
        support.is_discrete
        and support.event_dim == 3
        and isinstance(base, constraints.integer_interval)
        and (base.lower_bound, base.upper_bound) == (0, bins - 1)
    ):
        raise AssertionError(
            f"support must be independent(integer_interval(0, {bins - 1}), 3), got {support!r}"
        )
    if not bool(support.check(s.x).all()):
        raise AssertionError("support.check rejects the distribution's own samples")
    for bad_level in (-1, bins):
        bad = s.x.clone()
        bad[0, 0, 0, 0] = bad_level
        if bool(support.check(bad)[0]):
            raise AssertionError(f"support.check accepts an image holding level {bad_level}")


def check_sampling(
    head: torch.nn.Module, *, batch: int = 2, height: int = 3, width: int = 2, seed: int = 0
) -> None:
    """Check ``sample``: shape, ``int64``, range, reproducible from a generator, global RNG kept.

    ``sample(sample_shape, generator=)`` must return ``int64`` of shape
    ``sample_shape + (B, C, H, W)`` within ``[0, bins - 1]`` (and ``support.check``), the same
    seed must give the same draw, and the global random state must be left untouched. Arguments
    as for [`check_shapes`][discretelik.testing.check_shapes].

    Raises:
        AssertionError: A check failed.
    """
    s = _setup(head, batch, height, width, seed)
    dist, bins, device = s.dist, head.bins, s.device
    for sample_shape in [(), (4,), (2, 3)]:
        x = dist.sample(sample_shape, generator=torch.Generator(device=device).manual_seed(seed))
        want = (*sample_shape, batch, *s.event)
        if tuple(x.shape) != want or x.dtype != torch.int64:
            raise AssertionError(
                f"sample({sample_shape}) must return int64 of shape {want}, got {x.dtype} "
                f"{tuple(x.shape)}"
            )
        if bool((x < 0).any() or (x > bins - 1).any()):
            raise AssertionError(
                f"samples must lie in [0, {bins - 1}], got [{int(x.min())}, {int(x.max())}]"
            )
        if not bool(dist.support.check(x).all()):
            raise AssertionError("support.check rejects the distribution's own samples")

    rng_state = torch.random.get_rng_state()
    first = dist.sample((3,), generator=torch.Generator(device=device).manual_seed(seed + 1))
    if not torch.equal(torch.random.get_rng_state(), rng_state):
        raise AssertionError(
            "sample(generator=g) must take all its randomness from g, not the global RNG"
        )
    again = dist.sample((3,), generator=torch.Generator(device=device).manual_seed(seed + 1))
    if not torch.equal(first, again):
        raise AssertionError("sample with the same generator seed must give the same values")


def check_log_prob_shapes(
    head: torch.nn.Module, *, batch: int = 2, height: int = 3, width: int = 2, seed: int = 0
) -> None:
    """Check ``log_prob``'s shape and dtype, its sum of ``elementwise_log_prob``, level dtypes.

    For values of shape ``sample_shape + (B, C, H, W)`` ``log_prob`` must return
    ``sample_shape + (B,)``, float32 for float32 parameters (float64 for float64 ones), finite
    and ``<= 0``, equal to ``elementwise_log_prob`` (of the value's shape) summed over
    ``(C, H, W)``, and the same for every integer dtype that holds the levels. An implementation
    that refuses a call (``log_prob_backends[name].unsupported``, e.g. levels with sample
    dimensions for the Triton kernels) must raise a ``ValueError`` that names
    ``log_prob_backend`` and the reason. Arguments as for
    [`check_shapes`][discretelik.testing.check_shapes].

    Raises:
        AssertionError: A check failed.
    """
    s = _setup(head, batch, height, width, seed)
    dist, bins = s.dist, head.bins
    for sample_shape in [(), (4,), (2, 3)]:
        x = dist.sample(sample_shape, generator=torch.Generator(device=s.device).manual_seed(seed))
        want = (*sample_shape, batch, *s.event)
        reason = _refusal(dist, x)
        if reason is not None:
            _expect_error(
                ValueError,
                ["log_prob_backend", reason],
                lambda x=x: dist.log_prob(x),
                f"log_prob of a {want} value that log_prob_backend={dist.log_prob_backend!r} "
                "cannot compute",
            )
            continue
        lp = dist.log_prob(x)
        if tuple(lp.shape) != (*sample_shape, batch):
            raise AssertionError(
                f"log_prob of a {want} value must have shape {(*sample_shape, batch)}, got "
                f"{tuple(lp.shape)}"
            )
        if s.params.dtype == torch.float32 and lp.dtype != torch.float32:
            raise AssertionError(f"log_prob must be float32 for float32 params, got {lp.dtype}")
        if not bool(torch.isfinite(lp).all() and (lp <= 1e-6).all()):
            raise AssertionError(f"log_prob of samples must be finite and <= 0, got {lp}")
        elp = dist.elementwise_log_prob(x)
        if tuple(elp.shape) != want:
            raise AssertionError(
                f"elementwise_log_prob must return the value's shape {want}, got "
                f"{tuple(elp.shape)}"
            )
        _close(
            lp,
            elp.sum(dim=(-3, -2, -1)),
            "log_prob must equal elementwise_log_prob summed over (C, H, W)",
            atol=1e-3,
            rtol=1e-5,
        )

    x = s.x
    for dtype, top in [(torch.int32, 2**31), (torch.int16, 2**15), (torch.uint8, 2**8)]:
        if bins <= top:  # every integer dtype that can hold the levels is accepted as is
            _close(
                dist.log_prob(x.to(dtype)),
                dist.log_prob(x),
                f"log_prob of {dtype} levels must equal that of int64 levels",
                atol=0,
            )
    wide = head.distribution(s.params.double())
    if _refusal(wide, x) is None:
        lp = wide.log_prob(x)
        if lp.dtype != torch.float64:
            raise AssertionError(f"log_prob must be float64 for float64 params, got {lp.dtype}")


def check_pixel_independence(
    head: torch.nn.Module, *, batch: int = 2, height: int = 3, width: int = 2, seed: int = 0
) -> None:
    """Check that pixels are independent given the parameters: changing one pixel's value
    changes only that pixel's ``elementwise_log_prob``. Arguments as for
    [`check_shapes`][discretelik.testing.check_shapes].

    Raises:
        AssertionError: A check failed.
    """
    s = _setup(head, batch, height, width, seed)
    changed = s.x.clone()
    changed[:, :, 0, 0] = (changed[:, :, 0, 0] + 1) % head.bins
    keep = torch.ones_like(s.x, dtype=torch.bool)
    keep[:, :, 0, 0] = False  # every pixel but the changed one
    _close(
        s.dist.elementwise_log_prob(changed)[keep],
        s.dist.elementwise_log_prob(s.x)[keep],
        "elementwise_log_prob at one pixel must not depend on the values of other pixels",
        atol=1e-6,
        rtol=1e-6,
    )


def _provided(dist: Distribution, name: str) -> Tensor | None:
    """``getattr(dist, name)``, or ``None`` where it raises ``NotImplementedError``."""
    try:
        return getattr(dist, name)
    except NotImplementedError:
        return None


def check_mean(
    head: torch.nn.Module, *, batch: int = 2, height: int = 3, width: int = 2, seed: int = 0
) -> None:
    """Check ``mean`` (and ``variance``, ``stddev``, ``mode`` where provided): shape, range.

    ``mean`` must be a finite float ``(B, C, H, W)`` within ``[0, bins - 1]``. Where provided
    (not raising ``NotImplementedError``): ``variance`` finite, of that shape, within
    ``[0, ((bins - 1) / 2)^2]`` (the largest variance on ``[0, bins - 1]``); ``stddev`` its
    square root; ``mode`` ``int64`` levels of that shape. Arguments as for
    [`check_shapes`][discretelik.testing.check_shapes]; [`check_head_mean`][discretelik.testing.check_head_mean]
    checks the mean's value.

    Raises:
        AssertionError: A check failed.
    """
    s = _setup(head, batch, height, width, seed)
    dist, bins = s.dist, head.bins
    want = (batch, *s.event)
    mean = dist.mean
    if tuple(mean.shape) != want or not mean.is_floating_point():
        raise AssertionError(
            f"mean must be a float tensor {want}, got {mean.dtype} {tuple(mean.shape)}"
        )
    slack = 1e-5 * bins
    inside = (mean >= -slack) & (mean <= bins - 1 + slack)
    if not bool(torch.isfinite(mean).all() and inside.all()):
        raise AssertionError(
            f"mean must be finite and within [0, {bins - 1}], got values in "
            f"[{float(mean.min())}, {float(mean.max())}]"
        )
    variance = _provided(dist, "variance")
    if variance is not None:
        top = ((bins - 1) / 2) ** 2
        if tuple(variance.shape) != want or not variance.is_floating_point():
            raise AssertionError(
                f"variance must be a float tensor {want}, got {variance.dtype} "
                f"{tuple(variance.shape)}"
            )
        if not bool(torch.isfinite(variance).all() and (variance >= 0).all()):
            raise AssertionError(f"variance must be finite and >= 0, got min {variance.min()}")
        if not bool((variance <= top * (1 + 1e-5) + 1e-6).all()):
            raise AssertionError(
                f"variance of levels in [0, {bins - 1}] must be <= {top}, got {variance.max()}"
            )
        stddev = _provided(dist, "stddev")
        if stddev is not None:
            _close(stddev, variance.sqrt(), "stddev must be variance.sqrt()", atol=1e-6, rtol=1e-5)
    mode = _provided(dist, "mode")
    if mode is not None:
        if tuple(mode.shape) != want or mode.dtype != torch.int64:
            raise AssertionError(
                f"mode must be int64 levels {want}, got {mode.dtype} {tuple(mode.shape)}"
            )
        if bool((mode < 0).any() or (mode > bins - 1).any()):
            raise AssertionError(f"mode must lie in [0, {bins - 1}]")


def check_expand(
    head: torch.nn.Module, *, batch: int = 2, height: int = 3, width: int = 2, seed: int = 0
) -> None:
    """Check that ``expand((3, B))`` gives ``batch_shape (3, B)``, the same ``log_prob``,
    samples and mean of the new shape, and keeps ``log_prob_backend``. Arguments as for
    [`check_shapes`][discretelik.testing.check_shapes].

    Raises:
        AssertionError: A check failed.
    """
    s = _setup(head, batch, height, width, seed)
    dist, x, event = s.dist, s.x, s.event
    big = dist.expand(torch.Size((3, batch)))
    if tuple(big.batch_shape) != (3, batch) or tuple(big.event_shape) != event:
        raise AssertionError(
            f"expand((3, {batch})) must give batch_shape (3, {batch}) and event_shape {event}, "
            f"got {tuple(big.batch_shape)} and {tuple(big.event_shape)}"
        )
    backend = getattr(dist, "log_prob_backend", None)
    if getattr(big, "log_prob_backend", None) != backend:
        raise AssertionError(
            f"expand must keep log_prob_backend={backend!r}, got "
            f"{getattr(big, 'log_prob_backend', None)!r}"
        )
    _close(
        big.log_prob(x.expand(3, *x.shape)),
        dist.log_prob(x).expand(3, batch),
        "the expanded distribution must give the same log_prob",
        atol=1e-4,
        rtol=1e-5,
    )
    if tuple(big.sample().shape) != (3, batch, *event):
        raise AssertionError(f"the expanded distribution must sample (3, {batch}, *{event})")
    if tuple(big.mean.shape) != (3, batch, *event):
        raise AssertionError(f"the expanded distribution's mean must be (3, {batch}, *{event})")


def check_validation(
    head: torch.nn.Module, *, batch: int = 2, height: int = 3, width: int = 2, seed: int = 0
) -> None:
    """Check that ``validate_args`` is honoured per instance, after ``expand`` and globally.

    With validation on, levels outside ``[0, bins - 1]`` make ``log_prob`` raise a
    ``ValueError`` naming ``value``, the bound and the level (also after ``expand``), and NaN,
    ``+inf`` or ``-inf`` parameters make the constructor raise a ``ValueError`` naming
    ``params``; with it off (``validate_args=False``, or ``None`` while
    ``torch.distributions.Distribution.set_default_validate_args(False)``) non-finite
    parameters are accepted. The global default is restored afterwards. Arguments as for
    [`check_shapes`][discretelik.testing.check_shapes].

    Raises:
        AssertionError: A check failed.
    """
    s = _setup(head, batch, height, width, seed)
    bins, x, params = head.bins, s.x, s.params

    def dist_of(p: Tensor, validate: bool | None = None) -> Distribution:
        return head.distribution(p, validate_args=validate)

    on = dist_of(params, True)
    for bad_level in (-2, bins + 3):
        bad = x.clone()
        bad[0, 0, 0, 0] = bad_level
        _expect_error(
            ValueError,
            ["value", str(bins - 1), str(bad_level)],
            lambda bad=bad: on.log_prob(bad),
            f"log_prob of a value holding level {bad_level} (bins={bins}) with validation on",
        )
        _expect_error(
            ValueError,
            ["value"],
            lambda bad=bad: on.expand(torch.Size((3, batch))).log_prob(bad.expand(3, *bad.shape)),
            "validate_args must survive expand",
        )
    default = Distribution._validate_args
    try:
        for bad_value in (float("nan"), float("inf"), float("-inf")):
            bad_params = params.clone()
            bad_params[0, 0, 0, 0] = bad_value
            _expect_error(
                ValueError,
                ["params"],
                lambda p=bad_params: dist_of(p, True),
                f"{bad_value} params, validate_args=True",
            )
            dist_of(bad_params, False)  # validation off per instance: no check, no error
            Distribution.set_default_validate_args(False)
            dist_of(bad_params)  # follows the global default: no error
            _expect_error(
                ValueError,
                ["params"],
                lambda p=bad_params: dist_of(p, True),
                f"{bad_value} params with validate_args=True while the global default is off",
            )
            Distribution.set_default_validate_args(True)
            _expect_error(
                ValueError,
                ["params"],
                lambda p=bad_params: dist_of(p),
                f"{bad_value} params with validate_args=None while the global default is on",
            )
            Distribution.set_default_validate_args(default)
    finally:
        Distribution.set_default_validate_args(default)


def check_bad_input(
    head: torch.nn.Module, *, batch: int = 2, height: int = 3, width: int = 2, seed: int = 0
) -> None:
    """Check that bad arguments raise with the argument, the expectation and what was received.

    Float or bool values (``TypeError``, with validation on and off: nothing is cast), values
    of the wrong channel count or spatial size, parameters with the wrong channel count
    (``ValueError``), integer parameters (``TypeError``), features with the wrong channel count
    (``ValueError``) or an integer dtype (``TypeError``), and a ``sample_shape`` that is not a
    shape (``TypeError``) or holds a negative size (``ValueError``) or a ``generator`` that is
    not one (``TypeError``). Arguments as for [`check_shapes`][discretelik.testing.check_shapes].

    Raises:
        AssertionError: A check failed.
    """
    s = _setup(head, batch, height, width, seed)
    channels, p_ch, x, params, event = head.channels, head.param_channels, s.x, s.params, s.event
    height, width = event[1:]

    def dist_of(p: Tensor, validate: bool | None = None) -> Distribution:
        return head.distribution(p, validate_args=validate)

    for validate in (True, False):
        for dtype in (torch.float32, torch.bool):
            bad = x.to(dtype)
            _expect_error(
                TypeError,
                ["value", str(dtype)],
                lambda bad=bad, validate=validate: dist_of(params, validate).log_prob(bad),
                f"log_prob of a {dtype} value (validate_args={validate}); nothing is cast",
            )
    on = dist_of(params, True)
    expected_event = ", ".join(map(str, event))  # as in "(C, H, W)" or "(B, C, H, W)"
    wrong_c = torch.zeros(batch, channels + 1, height, width, dtype=torch.long, device=s.device)
    wrong_hw = torch.zeros(batch, channels, height, width + 1, dtype=torch.long, device=s.device)
    for bad in (wrong_c, wrong_hw):
        _expect_error(
            ValueError,
            ["value", expected_event, str(tuple(bad.shape))],
            lambda bad=bad: on.log_prob(bad),
            f"log_prob of a value of shape {tuple(bad.shape)} for event_shape {event}",
        )
    short = params[:, : p_ch - 1]
    _expect_error(
        ValueError,
        ["params", str(p_ch), str(tuple(short.shape))],
        lambda: dist_of(short),
        f"params with {p_ch - 1} instead of {p_ch} channels",
    )
    _expect_error(
        TypeError, ["params", str(torch.int64)], lambda: dist_of(params.long()), "integer params"
    )
    f_ch = s.features.shape[1]
    bad_features = torch.zeros(batch, f_ch + 1, height, width, device=s.device)
    _expect_error(
        ValueError,
        ["features", str(f_ch), str(tuple(bad_features.shape))],
        lambda: head(bad_features),
        f"features with {f_ch + 1} channels for a head expecting {f_ch}",
    )
    _expect_error(
        TypeError, ["features"], lambda: head(s.features.long()), "integer features"
    )
    _expect_error(TypeError, ["sample_shape"], lambda: on.sample(3), "sample(3), a bare int")
    _expect_error(
        ValueError, ["sample_shape", "-1"], lambda: on.sample((2, -1)), "sample((2, -1))"
    )
    _expect_error(
        TypeError, ["generator"], lambda: on.sample(generator=0), "sample(generator=0)"
    )


def check_not_provided(
    head: torch.nn.Module, *, batch: int = 2, height: int = 3, width: int = 2, seed: int = 0
) -> None:
    """Check that what a discrete image distribution cannot offer raises with a reason.

    ``rsample``, ``cdf``, ``icdf`` and ``enumerate_support`` must raise ``NotImplementedError``
    with a non-empty message (why, and what to use instead). ``entropy`` either raises the same
    way or returns a finite float ``(B,)`` tensor within ``[0, C H W log(bins)]``. Arguments as
    for [`check_shapes`][discretelik.testing.check_shapes].

    Raises:
        AssertionError: A check failed.
    """
    s = _setup(head, batch, height, width, seed)
    dist = s.dist
    calls: dict[str, Callable[[], object]] = {
        "rsample": lambda: dist.rsample(),
        "cdf": lambda: dist.cdf(s.x),
        "icdf": lambda: dist.icdf(torch.full(s.x.shape, 0.5, device=s.device)),
        "enumerate_support": lambda: dist.enumerate_support(),
    }
    for name, call in calls.items():
        try:
            call()
        except NotImplementedError as err:
            if not str(err).strip():
                raise AssertionError(
                    f"{name} raises NotImplementedError without a message; say why it is not "
                    "provided and what to use instead"
                ) from err
            continue
        except Exception as err:
            raise AssertionError(
                f"{name} must raise NotImplementedError, got {type(err).__name__}: {err}"
            ) from err
        raise AssertionError(f"{name} must raise NotImplementedError, but nothing was raised")
    try:
        entropy = dist.entropy()
    except NotImplementedError as err:
        if not str(err).strip():
            raise AssertionError(
                "entropy raises NotImplementedError without a message; say why and what to use "
                "instead"
            ) from err
        return
    top = math.prod(s.event) * math.log(head.bins)
    if tuple(entropy.shape) != (batch,) or not entropy.is_floating_point():
        raise AssertionError(
            f"entropy must be a float tensor of batch_shape {(batch,)}, got {entropy.dtype} "
            f"{tuple(entropy.shape)}"
        )
    ok = torch.isfinite(entropy) & (entropy >= -1e-5) & (entropy <= top * (1 + 1e-5))
    if not bool(ok.all()):
        raise AssertionError(
            f"entropy must be finite and within [0, C H W log(bins) = {top:.6g}], got "
            f"{entropy.tolist()}"
        )


CONTRACT_CHECKS: tuple[Callable[..., None], ...] = (
    check_shapes,
    check_support,
    check_sampling,
    check_log_prob_shapes,
    check_pixel_independence,
    check_mean,
    check_expand,
    check_validation,
    check_bad_input,
    check_not_provided,
)
"""The named checks [`check_head_contract`][discretelik.testing.check_head_contract] runs, in
order; each takes ``(head, *, batch, height, width, seed)``."""


def check_head_contract(
    head: torch.nn.Module,
    *,
    batch: int = 2,
    height: int = 3,
    width: int = 2,
    seed: int = 0,
) -> None:
    """Run every named contract check (``CONTRACT_CHECKS``) on ``head``.

    [`check_shapes`][discretelik.testing.check_shapes],
    [`check_support`][discretelik.testing.check_support],
    [`check_sampling`][discretelik.testing.check_sampling],
    [`check_log_prob_shapes`][discretelik.testing.check_log_prob_shapes],
    [`check_pixel_independence`][discretelik.testing.check_pixel_independence],
    [`check_mean`][discretelik.testing.check_mean],
    [`check_expand`][discretelik.testing.check_expand],
    [`check_validation`][discretelik.testing.check_validation],
    [`check_bad_input`][discretelik.testing.check_bad_input] and
    [`check_not_provided`][discretelik.testing.check_not_provided], on features (or raw
    parameters for a head without projection) of shape ``(batch, F, height, width)``.

    Args:
        head: The head to check (with or without projection).
        batch: ``B``.
        height: ``H`` (at least 1).
        width: ``W`` (at least 2, so that pixels can be told apart).
        seed: Seed of the random features and draws.

    Raises:
        AssertionError: A check failed (the first failure).
        ValueError: ``batch``, ``height`` or ``width`` out of range.
    """
    for check in CONTRACT_CHECKS:
        check(head, batch=batch, height=height, width=width, seed=seed)


def check_head_finite(
    head: torch.nn.Module,
    *,
    scales: Sequence[float] = (1.0, 1e4),
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16, torch.float16),
    height: int = 2,
    width: int = 2,
    seed: int = 0,
) -> None:
    """Check finite ``log_prob``, gradients, ``mean`` and valid samples at extreme parameters.

    For every ``scale`` in ``scales`` the raw parameters are standard normal times ``scale``,
    the constants ``+scale`` and ``-scale``, and alternating ``+-scale`` across parameter
    channels; each is tried in every dtype of ``dtypes``. The values scored are all level 0,
    all level ``bins - 1``, a checkerboard of both and random levels. ``log_prob`` must be
    finite and float32 (float32 or wider for float32/float64 parameters) and its gradient with
    respect to the parameters finite. A float16 gradient has the parameters' dtype, so a large
    but correct gradient (above 65504) overflows to ``inf`` there: for float16 parameters the
    gradient must only be free of NaN. For a head with a projection, features in float32 are
    also run under ``torch.autocast(dtype=torch.bfloat16)``: float32, finite ``log_prob`` and
    finite gradients for features and weights.

    Args:
        head: The head to check.
        scales: Magnitudes of the raw parameters (``1e4`` is representable in float16).
        dtypes: Parameter dtypes.
        height: ``H`` of the parameter maps.
        width: ``W`` of the parameter maps.
        seed: Seed of the random parameters and levels.

    Raises:
        AssertionError: Something was not finite or had the wrong dtype.
    """
    channels, bins, p_ch = head.channels, head.bins, head.param_channels
    device = _device(head)
    gen = torch.Generator().manual_seed(seed)
    shape = (1, channels, height, width)
    cc, ii, jj = torch.meshgrid(
        torch.arange(channels), torch.arange(height), torch.arange(width), indexing="ij"
    )
    checker = (cc + ii + jj) % 2  # levels 0 and bins - 1 side by side
    values = torch.cat(
        [
            torch.zeros(shape, dtype=torch.long),
            torch.full(shape, bins - 1, dtype=torch.long),
            (checker * (bins - 1))[None],
            torch.randint(0, bins, shape, generator=gen),
        ]
    ).to(device)
    n = values.shape[0]
    sign = 1.0 - 2.0 * (torch.arange(p_ch) % 2).float()
    for scale in scales:
        patterns = {
            "normal": torch.randn(n, p_ch, height, width, generator=gen) * scale,
            "+scale": torch.full((n, p_ch, height, width), float(scale)),
            "-scale": torch.full((n, p_ch, height, width), -float(scale)),
            "alternating": (sign * scale)[None, :, None, None].expand(n, -1, height, width),
        }
        for name, raw in patterns.items():
            for dtype in dtypes:
                params = raw.detach().to(device=device, dtype=dtype).clone().requires_grad_(True)
                what = f"{name} params at scale {scale:g} in {dtype}"
                dist = head.distribution(params)
                lp = dist.log_prob(values)
                wide = dtype in (torch.float32, torch.float64)
                want = (torch.float32, torch.float64) if wide else (torch.float32,)
                if lp.dtype not in want:
                    raise AssertionError(f"{what}: log_prob must be float32, got {lp.dtype}")
                if not bool(torch.isfinite(lp).all()):
                    raise AssertionError(
                        f"{what}: log_prob must be finite at levels 0, {bins - 1}, mixed and "
                        f"random, got {lp.tolist()}"
                    )
                (grad,) = torch.autograd.grad(lp.sum(), params)
                if dtype == torch.float16 and bool(torch.isnan(grad).any()):
                    raise AssertionError(f"{what}: the gradient of log_prob must not be NaN")
                if dtype != torch.float16 and not bool(torch.isfinite(grad).all()):
                    raise AssertionError(f"{what}: the gradient of log_prob must be finite")
                mean = dist.mean
                if not bool(torch.isfinite(mean).all()):
                    raise AssertionError(f"{what}: mean must be finite")
                x = dist.sample(generator=torch.Generator(device=device).manual_seed(seed))
                if bool((x < 0).any() or (x > bins - 1).any()):
                    raise AssertionError(f"{what}: samples must lie in [0, {bins - 1}]")

    if head.in_channels is None:
        return
    features = (torch.randn(n, head.in_channels, height, width, generator=gen) * 3).to(device)
    features.requires_grad_(True)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        lp = head(features).log_prob(values)
    if lp.dtype != torch.float32 or not bool(torch.isfinite(lp).all()):
        raise AssertionError(
            "under bfloat16 autocast log_prob must be finite float32, got "
            f"{lp.dtype} {lp.tolist()}"
        )
    weights = [p for p in head.parameters() if p.requires_grad]
    grads = torch.autograd.grad(lp.sum(), [features, *weights])
    if not all(bool(torch.isfinite(g).all()) for g in grads):
        raise AssertionError("under bfloat16 autocast the gradients must be finite")


def check_channel_groups(
    head: torch.nn.Module, *, height: int = 2, width: int = 2, seed: int = 0
) -> None:
    """Check that with ``feature_groups = C`` channel ``c`` reads only feature block ``c``.

    The features ``(1, in_channels, H, W)`` are ``C`` contiguous blocks. The gradient of the
    log-probability of channel ``c`` (``elementwise_log_prob[:, c]``, which may also depend on
    the values of channels ``< c``) with respect to the features must be zero outside block
    ``c`` and nonzero inside it. This is what keeps a backbone's R -> G -> B ordering intact.

    Args:
        head: A head built with ``feature_groups == channels > 1``.
        height: ``H``.
        width: ``W``.
        seed: Seed of the features and the scored value.

    Raises:
        AssertionError: Some channel reads another channel's features.
    """
    channels = head.channels
    if getattr(head, "feature_groups", 1) != channels or channels < 2 or head.in_channels is None:
        raise ValueError(
            "check_channel_groups needs a head with in_channels set and feature_groups == "
            f"channels > 1, got channels={channels}, feature_groups="
            f"{getattr(head, 'feature_groups', None)}, in_channels={head.in_channels}"
        )
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(1, head.in_channels, height, width, generator=gen).to(_device(head))
    features.requires_grad_(True)
    dist = head(features)
    x = dist.sample(generator=torch.Generator(device=features.device).manual_seed(seed))
    elp = dist.elementwise_log_prob(x)
    block = head.in_channels // channels
    for c in range(channels):
        (grad,) = torch.autograd.grad(elp[:, c].sum(), features, retain_graph=True)
        per_block = grad.abs().reshape(channels, block, height, width).sum(dim=(1, 2, 3))
        others = [b for b in range(channels) if b != c and float(per_block[b]) != 0]
        if others:
            raise AssertionError(
                f"log p(channel {c}) depends on feature block(s) {others}; with "
                f"feature_groups={channels} it may read only block {c}"
            )
        if float(per_block[c]) == 0:
            raise AssertionError(f"log p(channel {c}) does not depend on its feature block {c}")
