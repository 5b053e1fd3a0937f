"""Reusable checks for heads and backbones, for our tests and for plugin authors.

```python
from discretelik.testing import check_causality
check_causality(my_backbone, (3, 8, 8))
```
"""

from .causality import check_causality, dependency_map, receptive_field
from .heads import (
    check_channel_groups,
    check_head_contract,
    check_head_finite,
    check_head_mean,
    check_head_normalization,
    check_samples_match_log_prob,
    check_sampling_matches_log_prob,
    enumerate_levels,
)

__all__ = [
    "check_causality",
    "check_channel_groups",
    "check_head_contract",
    "check_head_finite",
    "check_head_mean",
    "check_head_normalization",
    "check_samples_match_log_prob",
    "check_sampling_matches_log_prob",
    "dependency_map",
    "enumerate_levels",
    "receptive_field",
]
