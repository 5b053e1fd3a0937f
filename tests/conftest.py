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

# Without a GPU, Triton kernels run in Triton's CPU interpreter (tests/test_triton_dlm.py).
# Triton reads the switch when a kernel is defined, so it must be set before the first import
# of a kernel module; nothing imports them before the tests do.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests use tiny tensors: one intra-op thread is as fast, and it avoids OpenMP threads
# spinning against each other (and against the DDP test's processes) on 2-core CI machines.
torch.set_num_threads(1)
