"""Observers: identity modules that record the range of the tensor flowing through them."""
from __future__ import annotations

import torch
from torch import nn

from fxq.affine import ActQParams


class Observer(nn.Module):
    """An identity that records statistics of what passes through; ``qparams`` turns them into a
    range. Subclasses override ``forward``, ``merge`` and ``qparams``."""

    def qparams(self, bits: int) -> ActQParams:
        raise NotImplementedError


class MinMaxObserver(Observer):
    """Running min and max of every tensor it sees; passes the tensor through unchanged.

    ``label`` names the observed value (the graph node) in errors. Memory is two floats, and two
    observers of the same value merge (``a.merge(b)``), so calibration can be split across workers.
    """

    def __init__(self, label: str):
        super().__init__()
        self.label = label
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = torch.aminmax(x.detach())
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise ValueError(
                f"{self.label} holds NaN or Inf during calibration: check the calibration data "
                "(every input must be finite) and the model's weights"
            )
        self.min_val = torch.minimum(self.min_val, lo.float())
        self.max_val = torch.maximum(self.max_val, hi.float())
        return x

    @property
    def observed(self) -> bool:
        return bool(self.min_val <= self.max_val)

    def merge(self, other: "MinMaxObserver") -> "MinMaxObserver":
        self.min_val = torch.minimum(self.min_val, other.min_val)
        self.max_val = torch.maximum(self.max_val, other.max_val)
        return self

    def qparams(self, bits: int) -> ActQParams:
        if not self.observed:
            raise ValueError(f"{self.label} saw no data: calibrate before converting")
        return ActQParams.from_range(self.min_val.item(), self.max_val.item(), bits)

    def extra_repr(self) -> str:
        return f"{self.label}, min={self.min_val.item():.4g}, max={self.max_val.item():.4g}"


def make_observer(act_range: str, label: str) -> Observer:
    """The observer for ``QConfig.act_range``."""
    observers = {"minmax": MinMaxObserver}
    return observers[act_range](label)
