import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fxq  # noqa: E402

# Property tests: the same 200 examples in every run by default; `--hypothesis-profile=thorough` for more.
_QUIET = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=200, derandomize=True, **_QUIET)
settings.register_profile("thorough", max_examples=2000, **_QUIET)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state: models built in a test are the same each run."""
    torch.manual_seed(0)


@pytest.fixture
def ctx():
    """A pass context with the default config and a small random calibration set."""
    torch.manual_seed(0)
    return fxq.PassContext(fxq.QConfig(), [torch.randn(4, 3, 8, 8) for _ in range(3)])
