"""Progress bars (tqdm, on stderr) for long steps; the command's ``--quiet`` turns them all off here."""
from __future__ import annotations

from typing import Iterable

from tqdm import tqdm

_enabled = True


def enable(on: bool) -> None:
    global _enabled
    _enabled = on


def bar(total: int | None, desc: str, unit: str = "img", show: bool = True):
    """A tqdm bar with throughput in ``unit``/s, or a silent one under ``--quiet`` or without ``show``."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, leave=False, disable=not (_enabled and show),
                dynamic_ncols=True)


def items(iterable: Iterable, desc: str, unit: str = "step"):
    """``iterable`` with a bar counting its items."""
    total = len(iterable) if hasattr(iterable, "__len__") else None
    with bar(total, desc, unit) as b:
        for item in iterable:
            yield item
            b.update(1)


def _count(item) -> int:
    images = item[0] if isinstance(item, (tuple, list)) else item
    return len(images)


class Batches:
    """An iterable of ``(images, labels)`` batches that shows a bar (images/s) each time it is
    read; fxq.quantize reads its calibration data more than once (bias correction, explain)."""

    def __init__(self, batches: Iterable, images: int | None, desc: str):
        self.batches, self.images, self.desc, self.reads = batches, images, desc, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        self.reads += 1
        desc = self.desc if self.reads == 1 else f"{self.desc}, read again"
        with bar(self.images, desc) as b:
            for item in self.batches:
                yield item
                b.update(_count(item))
