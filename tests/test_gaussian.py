"""Discretized Gaussian head: agreement with scipy and with high-precision bin masses.

Layout, coupling, sampling, mean and extreme-parameter checks are shared with the logistic
mixture and run for both heads in ``test_dlm.py``, which also holds the float64 reference used
here (with ``scipy.stats.norm``) and the high-precision bin masses (with ``mpmath.ncdf``).
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from scipy import stats
from test_dlm import (
    check_against_reference,
    check_high_precision,
    configs,
    high_precision_cases,
    mp_log_mass,
    our_log_masses,
)

from discretelik.heads.gaussian import DiscretizedGaussian


@settings(max_examples=40)
@given(config=configs)
def test_matches_scipy_reference(config) -> None:
    # log-stds >= -1.2 keep every reference probability far from float64 underflow.
    check_against_reference(DiscretizedGaussian, stats.norm, -1.2, *config)


# -- high-precision bin masses ----------------------------------------------------------------
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-13), (torch.float32, 1e-5)])
def test_bin_masses_match_high_precision(dtype: torch.dtype, rtol: float) -> None:
    check_high_precision(DiscretizedGaussian, mpmath.ncdf, dtype, rtol)


def test_far_tail_gradients() -> None:
    """d log P / d loc keeps full precision far in the tails, in float32 too.

    For a bin ``z`` standard deviations from the mean the slope is ~``z / std``;
    ``torch.special.log_ndtr``'s own backward would give ~0.4 / std at ``z ~ 1e7``.
    """
    far = [case for case in high_precision_cases() if abs(case[2]) >= 1e3]
    _, grad32 = our_log_masses(DiscretizedGaussian, torch.float32, far)
    _, grad64 = our_log_masses(DiscretizedGaussian, torch.float64, far)
    assert torch.isfinite(grad32).all() and torch.isfinite(grad64).all()
    torch.testing.assert_close(grad32, grad64, rtol=1e-4, atol=1e-6)
    # float64 against a high-precision derivative, on a spread of the cases.
    for (level, bins, loc, log_std), slope in list(zip(far, grad64.tolist()))[::7]:
        with mpmath.workdps(120):  # slopes down to ~1e-53 next to log-masses of ~-80
            exact = float(
                mpmath.diff(
                    lambda t: mp_log_mass(mpmath.ncdf, level, bins, t, log_std), mpmath.mpf(loc)
                )
            )
        assert abs(slope - exact) <= 1e-9 * max(1.0, abs(exact)), (level, bins, loc, log_std)


def test_log_std_is_a_standard_deviation() -> None:
    """With fine bins the mass of a bin is its width times the normal density of std e^l."""
    bins, loc, log_std = 65536, 0.1, -2.0
    head = DiscretizedGaussian(channels=1, bins=bins)
    levels = torch.tensor([20000, 36000, 40000])
    params = torch.tensor([0.0, loc, log_std], dtype=torch.float64).reshape(1, 3, 1, 1)
    lp = head.distribution(params).log_prob(levels.reshape(3, 1, 1, 1, 1))[:, 0]
    centres = 2 * levels.double().numpy() / (bins - 1) - 1
    density = stats.norm.logpdf(centres, loc=loc, scale=math.exp(log_std))
    np.testing.assert_allclose(lp.numpy(), density + math.log(2 / (bins - 1)), rtol=1e-6)
