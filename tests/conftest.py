import os

import pytest
from hypothesis import HealthCheck, settings

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# Hypothesis profiles (tests/test_properties.py). "ci", the default: derandomized (the same examples on
# every run) and small enough that the property file stays within about a minute and a half on two
# cores. "thorough" (HYPOTHESIS_PROFILE=thorough): random examples, ten times as many. Neither writes
# an example database.
_COMMON = dict(database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=25, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("thorough", max_examples=250, print_blob=True, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def native_or_skip(device: str) -> None:
    """Skips the test unless compiled kernels serve tensors on `device`."""
    import pyprune_fast

    info = pyprune_fast.backend_info()
    if not info[f"{device}_ops"]:
        pytest.skip(f"no compiled {device} kernels loaded ({info['reason'] or info.get('cuda_reason')})")
