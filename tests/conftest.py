import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fxq  # noqa: E402


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state: models built in a test are the same each run."""
    torch.manual_seed(0)


@pytest.fixture
def ctx():
    """A pass context with the default config and a small random calibration set."""
    torch.manual_seed(0)
    return fxq.PassContext(fxq.QConfig(), [torch.randn(4, 3, 8, 8) for _ in range(3)])
