import os

import torch
from hypothesis import HealthCheck, settings

# Deterministic, database-free property tests so CI runs are reproducible.
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# CI machines have 2 cores; more threads than cores only slows the small tensors down.
torch.set_num_threads(min(2, torch.get_num_threads()))
