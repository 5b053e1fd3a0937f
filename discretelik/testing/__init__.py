"""Reusable checks for heads and backbones, for our tests and for plugin authors.

```python
from discretelik.testing import check_causality
check_causality(my_backbone, (3, 8, 8))
```
"""

from .causality import check_causality, dependency_map, receptive_field
from .heads import (
    CONTRACT_CHECKS,
    check_bad_input,
    check_channel_groups,
    check_expand,
    check_head_contract,
    check_head_finite,
    check_head_mean,
    check_head_normalization,
    check_log_prob_shapes,
    check_mean,
    check_not_provided,
    check_pixel_independence,
    check_samples_match_log_prob,
    check_sampling,
    check_sampling_matches_log_prob,
    check_shapes,
    check_support,
    check_validation,
    enumerate_levels,
)

__all__ = [
    "CONTRACT_CHECKS",
    "check_bad_input",
    "check_causality",
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
    "dependency_map",
    "enumerate_levels",
    "receptive_field",
]
