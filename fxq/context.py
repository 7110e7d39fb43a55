"""What every pass receives besides the graph."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from fxq.config import QConfig


@dataclass(frozen=True)
class PassContext:
    """The configuration and the calibration data; every pass is ``(gm, ctx) -> gm``."""

    config: QConfig
    calib_loader: Iterable
