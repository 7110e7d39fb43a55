import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# torch and fxq are imported by the fixtures, not here: under pytest-xdist this file is also read by the
# process that only hands tests out to the workers, and importing torch there delays every worker by seconds
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Property tests: the same 200 examples in every run by default; `--hypothesis-profile=thorough` for more.
_QUIET = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=200, derandomize=True, **_QUIET)
settings.register_profile("thorough", max_examples=2000, **_QUIET)
settings.load_profile("ci")


@pytest.fixture(autouse=True, scope="session")
def threads():
    """This process's share of the cores (`tests.helpers.threads`)."""
    import torch

    from tests.helpers import threads
    torch.set_num_threads(threads())


@pytest.fixture(autouse=True)
def seeded(threads):
    """Every test starts from the same random state: models built in a test are the same each run.
    ``torch.manual_seed`` also seeds devices not yet initialized, keeping the call's stack for each: 1 ms
    a test in the unit loop, on a CPU that has none."""
    import torch
    if torch.cuda.is_available():
        torch.manual_seed(0)
    else:
        torch.random.default_generator.manual_seed(0)


@pytest.fixture
def ctx():
    """A pass context with the default config and a small random calibration set."""
    import torch

    import fxq
    torch.manual_seed(0)
    return fxq.PassContext(fxq.QConfig(), [torch.randn(4, 3, 8, 8) for _ in range(3)])
