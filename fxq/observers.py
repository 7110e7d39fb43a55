"""Observers: identity modules that record statistics of the tensor flowing through them, and
turn them into a range (``qparams``) with one of the rules of `fxq.ranges`.

    observer             passes   memory               range
    minmax               1        2 floats             [min, max]
    moving_average       1        2 floats             EMA of per-batch min and max
    percentile           2        `histogram_bins`     clips (100 − p) % of each tail
    mse                  2        `histogram_bins`     least expected squared error
    entropy              2        `histogram_bins`     least KL divergence (TensorRT)

Histogram observers look at the data twice: the first pass finds the extent, the second fills a
fixed-edge histogram over it. Two observers of the same value merge (``a.merge(b)``) after each
pass, so calibration can be split across workers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxq import ranges
from fxq.affine import ActQParams
from fxq.config import QConfig
from fxq.qmodules import explicit_padding


class Observer(nn.Module):
    """An identity that records statistics of what passes through it.

    Subclasses implement ``observe``, ``merge`` and ``range``; ``passes`` says how many times the
    calibration data must go through (``begin_pass`` is called before each).
    """

    passes = 1

    def __init__(self, label: str, bits: int = 8):
        super().__init__()
        self.label, self.bits = label, bits
        self.pass_index = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
            return x  # sizes, indices, tuples: nothing a float range describes (no qparams)
        x_ = x.detach()
        if not torch.isfinite(x_).all():
            raise ValueError(
                f"{self.label} holds NaN or Inf during calibration: check the calibration data "
                "(every input must be finite) and the model's weights"
            )
        self.observe(x_.float())
        return x

    def begin_pass(self, index: int) -> None:
        self.pass_index = index

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def merge(self, other: "Observer") -> "Observer":
        raise NotImplementedError

    def range(self, bits: int) -> tuple[float, float]:
        raise NotImplementedError

    @property
    def observed(self) -> bool:
        return bool(self.min_val <= self.max_val)

    def qparams(self) -> ActQParams:
        if not self.observed:
            raise ValueError(f"{self.label} saw no data: calibrate before converting")
        return ActQParams.from_range(*self.range(self.bits), self.bits)

    def extra_repr(self) -> str:
        return f"{self.label}, min={self.min_val.item():.4g}, max={self.max_val.item():.4g}"


class MinMaxObserver(Observer):
    """Running min and max of every tensor seen: two floats of memory."""

    def __init__(self, label: str, bits: int = 8):
        super().__init__(label, bits)
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x)
        self.min_val = torch.minimum(self.min_val, lo)
        self.max_val = torch.maximum(self.max_val, hi)

    def merge(self, other: "MinMaxObserver") -> "MinMaxObserver":
        self.min_val = torch.minimum(self.min_val, other.min_val)
        self.max_val = torch.maximum(self.max_val, other.max_val)
        return self

    def range(self, bits: int) -> tuple[float, float]:
        return self.min_val.item(), self.max_val.item()


class MovingAverageObserver(MinMaxObserver):
    """Exponential moving average of each batch's min and max: ``v ← v + c·(batch − v)``.

    Merging two averages weights them by the batches each saw.
    """

    def __init__(self, label: str, bits: int, averaging_constant: float):
        super().__init__(label, bits)
        self.averaging_constant = averaging_constant
        self.batches = 0

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x)
        if self.batches == 0:
            self.min_val, self.max_val = lo, hi
        else:
            c = self.averaging_constant
            self.min_val = self.min_val + c * (lo - self.min_val)
            self.max_val = self.max_val + c * (hi - self.max_val)
        self.batches += 1

    def merge(self, other: "MovingAverageObserver") -> "MovingAverageObserver":
        total = self.batches + other.batches
        if other.batches:
            w = other.batches / total
            self.min_val = self.min_val * (1 - w) + other.min_val * w
            self.max_val = self.max_val * (1 - w) + other.max_val * w
        self.batches = total
        return self


class HistogramObserver(MinMaxObserver):
    """Pass 0: the extent (min, max). Pass 1: ``bins`` counts over that extent. ``rule`` picks the
    range from the histogram (percentile, mse or entropy)."""

    passes = 2

    def __init__(self, label: str, bits: int, rule: str, bins: int, percentile: float):
        super().__init__(label, bits)
        self.rule, self.bins, self.percentile = rule, bins, percentile
        self.register_buffer("counts", torch.zeros(bins, dtype=torch.float64))

    def observe(self, x: torch.Tensor) -> None:
        if self.pass_index == 0:
            super().observe(x)
        elif self.max_val > self.min_val:
            lo, hi = self.min_val.item(), self.max_val.item()
            self.counts += torch.histc(x.clamp(lo, hi), self.bins, lo, hi).double()

    def merge(self, other: "HistogramObserver") -> "HistogramObserver":
        if self.pass_index == 0:
            return super().merge(other)
        if not (torch.equal(self.min_val, other.min_val) and torch.equal(self.max_val, other.max_val)):
            raise ValueError(f"{self.label}: histograms over different extents cannot be merged; "
                             "merge the observers after the first pass, then run the second")
        self.counts += other.counts
        return self

    def histogram(self) -> ranges.Histogram:
        return ranges.Histogram(self.counts, self.min_val.item(), self.max_val.item())

    def range(self, bits: int) -> tuple[float, float]:
        if self.counts.sum() == 0:  # a constant tensor, or the second pass never ran
            return super().range(bits)
        hist = self.histogram()
        if self.rule == "percentile":
            return ranges.percentile_range(hist, self.percentile)
        return {"mse": ranges.mse_range, "entropy": ranges.entropy_range}[self.rule](hist, bits)


def make_observer(config: QConfig, label: str) -> Observer:
    """The observer for ``config.act_range``."""
    bits = config.act_bits
    if config.act_range == "minmax":
        return MinMaxObserver(label, bits)
    if config.act_range == "moving_average":
        return MovingAverageObserver(label, bits, config.averaging_constant)
    return HistogramObserver(label, bits, config.act_range, config.histogram_bins, config.percentile)


class InputGram(nn.Module):
    """Statistics of a conv/linear layer's input columns (the im2col rows ``x``, length K): their
    mean, which bias correction uses, and, with ``gram=True``, the Gram matrix ``H = Σ x·xᵀ``
    (``[K, K]``, float64), which ``weight_range="output_aware"`` uses to measure ‖ΔW·X‖².

    An identity on the layer's input edge; it reads its data in the first calibration pass only.
    A grouped conv's channels read their group's inputs only: its statistics are kept per group,
    ``[groups, K]`` and ``[groups, K, K]`` with K = C_in/groups·k_h·k_w.
    """

    passes = 1

    def __init__(self, layer: nn.Module, label: str, gram: bool = True):
        super().__init__()
        self.label = label
        self.pass_index = 0
        self.geometry = None
        self.groups = getattr(layer, "groups", 1)
        if isinstance(layer, nn.Conv2d):
            self.geometry = dict(kernel_size=layer.kernel_size, dilation=layer.dilation,
                                 padding=explicit_padding(layer), stride=layer.stride)
        size = layer.weight[0].numel()
        self.register_buffer("gram", torch.zeros(self.groups, size, size, dtype=torch.float64) if gram else None)
        self.register_buffer("column_sum", torch.zeros(self.groups, size, dtype=torch.float64))
        self.count = 0

    @property
    def mean(self) -> torch.Tensor:
        """The mean input column, float64 ``[K]`` (``[groups, K]`` for a grouped conv)."""
        mean = self.column_sum / max(self.count, 1)
        return mean[0] if self.groups == 1 else mean

    @property
    def gram_matrix(self) -> torch.Tensor | None:
        """``H``, float64 ``[K, K]`` (``[groups, K, K]`` for a grouped conv)."""
        if self.gram is None:
            return None
        return self.gram[0] if self.groups == 1 else self.gram

    def begin_pass(self, index: int) -> None:
        self.pass_index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pass_index == 0:
            size = self.column_sum.shape[1]
            if self.geometry is None:
                columns = x.detach().reshape(-1, 1, x.shape[-1])
            else:  # im2col: [N, groups·K, L] → [N·L, groups, K], each group in weight.reshape(C_out, -1)'s order
                unfolded = F.unfold(x.detach(), **self.geometry)
                columns = unfolded.reshape(x.shape[0], self.groups, size, -1).permute(0, 3, 1, 2).reshape(-1, self.groups, size)
            self.column_sum += columns.sum(0).double()
            self.count += columns.shape[0]
            if self.gram is not None:
                self.gram += torch.einsum("ngk,ngl->gkl", columns, columns).double()
        return x

    def merge(self, other: "InputGram") -> "InputGram":
        if self.gram is not None:
            self.gram += other.gram
        self.column_sum += other.column_sum
        self.count += other.count
        return self


CALIBRATED = (Observer, InputGram)  # the modules calibration runs data through
