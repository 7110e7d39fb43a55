"""Observers: identity modules that record statistics of the tensor flowing through them, and
turn them into a range (``qparams``) with one of the rules of `fxq.integers.ranges`.

    observer             memory                 range
    minmax               2 floats               [min, max]
    moving_average       2 floats               EMA of per-batch min and max
    percentile           2·`histogram_bins`     clips (100 − p) % of each tail
    mse                  2·`histogram_bins`     least expected squared error
    entropy              2·`histogram_bins`     least KL divergence (TensorRT)

Every observer reads the calibration data once. A histogram observer's bins lie on a
power-of-two grid that only ever coarsens (pairs of bins merge) as wider values arrive, so the
final histogram is the one a single pass over the final grid would count, whatever the batch
order. Two observers of the same value merge (``a.merge(b)``) into exactly what one observer of
both would hold, so calibration can be split across workers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fxq import distributed, ops
from fxq.config import QConfig
from fxq.integers import ranges
from fxq.integers.affine import ActQParams
from fxq.integers.gram import add_conv_gram, add_gram, same_conv_kernel


class Observer(nn.Module):
    """An identity that records statistics of what passes through it.

    Subclasses implement ``observe``, ``merge`` and ``range``; each reads the calibration data once.
    """

    recording = True  # False: pass data through untouched (`passes.calibrate.paused`)

    def __init__(self, label: str, bits: int = 8):
        super().__init__()
        self.label, self.bits = label, bits
        self.sample_shape: tuple[int, ...] | None = None  # one sample's shape (batch dim dropped)
        # The values a clamp that alone reads this one keeps (a ReLU: [0, ∞)): the rest all land
        # on the clamp's bound whatever their integer, so a range need not spend levels on them.
        self.domain: tuple[float, float] = (-math.inf, math.inf)
        self.chosen: ActQParams | None = None  # parameters learned after calibration (`passes.reconstruct`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.recording or not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
            return x  # sizes, indices, tuples: nothing a float range describes (no qparams)
        x_ = _in_memory_order(x.detach()).float()
        lo, hi = torch.aminmax(x_)  # NaN propagates into both, ±Inf shows in one: no extra pass
        if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
            raise ValueError(
                f"{self.label} holds NaN or Inf during calibration: check the calibration data "
                "(every input must be finite) and the model's weights"
            )
        self.observe(x_, lo, hi)
        self.sample_shape = tuple(x.shape[1:])
        return x

    def observe(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Record ``x``, whose least and greatest values are ``lo`` and ``hi``."""
        raise NotImplementedError

    def synchronize(self) -> None:
        """Make this observer, on every rank of a process group, hold what one observer of every
        rank's data would (`fxq.distributed`; a collective: every rank calls it)."""
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
        if self.chosen is not None:
            return self.chosen
        return ActQParams.from_range(*self.range(self.bits), self.bits)

    def extra_repr(self) -> str:
        return f"{self.label}, min={self.min_val.item():.4g}, max={self.max_val.item():.4g}"


def _in_memory_order(x: torch.Tensor) -> torch.Tensor:
    """The values of ``x`` as a flat view in the order memory holds them (a channels-last batch
    too): a range or a histogram depends on the values only, and reductions over contiguous
    memory are several times faster than over strided views."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        x = x.permute(0, 2, 3, 1)
    return x.reshape(-1)


class MinMaxObserver(Observer):
    """Running min and max of every tensor seen: two floats of memory."""

    def __init__(self, label: str, bits: int = 8):
        super().__init__(label, bits)
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def observe(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.min_val = torch.minimum(self.min_val, lo)
        self.max_val = torch.maximum(self.max_val, hi)

    def synchronize(self) -> None:  # 2 floats each way
        self.min_val, self.max_val = distributed.reduce_min(self.min_val), distributed.reduce_max(self.max_val)

    def merge(self, other: "MinMaxObserver") -> "MinMaxObserver":
        self.min_val = torch.minimum(self.min_val, other.min_val)
        self.max_val = torch.maximum(self.max_val, other.max_val)
        return self

    def range(self, bits: int) -> tuple[float, float]:
        low, high = self.domain
        return min(max(self.min_val.item(), low), high), max(min(self.max_val.item(), high), low)


class MovingAverageObserver(MinMaxObserver):
    """Exponential moving average of each batch's min and max: ``v ← v + c·(batch − v)``.

    Merging two averages weights them by the batches each saw.
    """

    def __init__(self, label: str, bits: int, averaging_constant: float):
        super().__init__(label, bits)
        self.averaging_constant = averaging_constant
        self.batches = 0

    def observe(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.batches == 0:
            self.min_val, self.max_val = lo, hi
        else:
            c = self.averaging_constant
            self.min_val = self.min_val + c * (lo - self.min_val)
            self.max_val = self.max_val + c * (hi - self.max_val)
        self.batches += 1

    def synchronize(self) -> None:
        """The ranks' averages merged in rank order (:meth:`merge`). An average of batches in
        sequence depends on their order, so this is not what one process would compute."""
        states = distributed.gather((self.min_val.item(), self.max_val.item(), self.batches))
        self.batches, self.min_val, self.max_val = 0, self.min_val.new_tensor(0.0), self.max_val.new_tensor(0.0)
        for lo, hi, batches in states:
            other = MovingAverageObserver(self.label, self.bits, self.averaging_constant)
            other.min_val, other.max_val = self.min_val.new_tensor(lo), self.max_val.new_tensor(hi)
            other.batches = batches
            self.merge(other)

    def merge(self, other: "MovingAverageObserver") -> "MovingAverageObserver":
        total = self.batches + other.batches
        if other.batches:
            w = other.batches / total
            self.min_val = self.min_val * (1 - w) + other.min_val * w
            self.max_val = self.max_val * (1 - w) + other.max_val * w
        self.batches = total
        return self


class HistogramObserver(MinMaxObserver):
    """Counts over a power-of-two grid, in one pass; ``rule`` picks the range from the histogram
    (percentile, mse or entropy).

    The grid's bins are ``[k·w, (k+1)·w)`` with ``w = 2^e``: the finest such grid on which
    ``2·bins`` bins hold every value seen so far, so at least ``bins`` of them span the extent.
    A wider value coarsens the grid (``e`` grows); each new bin is the sum of whole old bins, so
    no count is ever split and the histogram equals a count of every value on the final grid —
    which depends on the extent alone, not on batch order or on how the data was sharded.
    """

    def __init__(self, label: str, bits: int, rule: str, bins: int, percentile: float):
        super().__init__(label, bits)
        self.rule, self.bins, self.percentile = rule, bins, percentile
        self.register_buffer("counts", torch.zeros(2 * bins, dtype=torch.float64))
        self.exponent, self.first = None, 0  # the grid: w = 2^exponent, bins first … first + 2·bins − 1

    def _grid(self, lo: float, hi: float) -> tuple[int, int]:
        """The finest ``(e, first)`` whose ``2·bins`` bins of width ``2^e`` cover ``[lo, hi]``."""
        slots = self.counts.numel()
        span = hi - lo if hi > lo else max(abs(lo), 2.0**-100) * 2.0**-30  # a constant: any fine grid
        e = math.frexp(span / slots)[1] - 1  # 2^e ≤ span/slots: one step finer would need 2·slots bins
        while math.floor(hi / 2.0**e) - math.floor(lo / 2.0**e) >= slots:
            e += 1
        return e, math.floor(lo / 2.0**e)

    def _moved(self, e: int, first: int) -> torch.Tensor:
        """The counts on the grid ``(e, first)``, no finer than this one: whole bins summed."""
        if self.exponent is None or (e, first) == (self.exponent, self.first):
            return self.counts
        old = torch.arange(self.counts.numel(), dtype=torch.int64, device=self.counts.device) + self.first
        index = torch.div(old, 2 ** (e - self.exponent), rounding_mode="floor") - first
        index.clamp_(0, self.counts.numel() - 1)  # only empty bins fall outside the new grid
        return torch.zeros_like(self.counts).index_add_(0, index, self.counts)

    def _coarsen(self, e: int, first: int) -> None:
        self.counts = self._moved(e, first)
        self.exponent, self.first = e, first

    def observe(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        super().observe(x, lo, hi)
        self._coarsen(*self._grid(self.min_val.item(), self.max_val.item()))
        width, slots = 2.0**self.exponent, self.counts.numel()
        start = self.first * width  # a power of two times an integer: exact in float32 for |first| < 2^24
        self.counts += torch.histc(x, slots, start, start + slots * width).double()

    def synchronize(self) -> None:
        """The extent over every rank (2 floats), each rank's counts moved to that extent's grid —
        whole bins summed, so no count is split — and summed (``2·bins`` float64): exactly one
        observer's histogram of all the data."""
        super().synchronize()
        if not self.observed:
            return
        self._coarsen(*self._grid(self.min_val.item(), self.max_val.item()))
        self.counts = distributed.reduce_sum(self.counts)

    def merge(self, other: "HistogramObserver") -> "HistogramObserver":
        if other.exponent is None:
            return self
        super().merge(other)
        grid = self._grid(self.min_val.item(), self.max_val.item())
        theirs = other._moved(*grid)
        self._coarsen(*grid)
        self.counts += theirs
        return self

    def histogram(self) -> ranges.Histogram:
        """The occupied bins (first to last non-empty) and their outer edges."""
        occupied = torch.nonzero(self.counts).flatten()
        a, b = int(occupied[0]), int(occupied[-1])
        width = 2.0**self.exponent
        return ranges.Histogram(self.counts[a:b + 1], (self.first + a) * width, (self.first + b + 1) * width)

    def range(self, bits: int) -> tuple[float, float]:
        if self.max_val == self.min_val:  # a constant tensor: one value, nothing to clip
            return super().range(bits)
        hist = self.histogram().clamped(*self.domain)
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

    An identity on the layer's input edge.
    A grouped conv's channels read their group's inputs only: its statistics are kept per group,
    ``[groups, K]`` and ``[groups, K, K]`` with K = C_in/groups·k_h·k_w.
    """

    def __init__(self, layer: nn.Module, label: str, gram: bool = True):
        super().__init__()
        self.label = label
        self.groups = getattr(layer, "groups", 1)
        self.geometry = ops.weights_of(layer).columns(layer)
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

    recording = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.recording:
            return x
        size = self.column_sum.shape[1]
        kernel = same_conv_kernel(self.geometry, x.shape) if self.groups == 1 and self.gram is not None else None
        if kernel is not None:  # the same sums without the k²-times larger columns
            add_conv_gram(self.gram[0], self.column_sum[0], x, kernel)
            self.count += x.shape[0] * x.shape[2] * x.shape[3]
            return x
        if self.geometry is None:
            columns = x.detach().reshape(-1, 1, x.shape[-1])
        else:  # im2col: [N, groups·K, L] → [N·L, groups, K], each group in weight.reshape(C_out, -1)'s order
            unfolded = F.unfold(x.detach(), **self.geometry)
            columns = (unfolded.reshape(x.shape[0], self.groups, size, -1).permute(0, 3, 1, 2)
                       .reshape(-1, self.groups, size))
        # float32 sums added into float64 in place: no float64 copy of a K² product per batch
        self.column_sum += columns.sum(0)
        self.count += columns.shape[0]
        if self.gram is not None and self.groups == 1:
            add_gram(self.gram[0], columns[:, 0])
        elif self.gram is not None:  # a grouped conv: small K per group
            self.gram += torch.einsum("ngk,ngl->gkl", columns, columns)
        return x

    def synchronize(self) -> None:
        """Sums over every rank: the Gram matrix (K² float64: the output-aware rule's statistics),
        the column sums (K) and the count. Summed in float64 as one process sums its batches, in
        a different order: equal up to the last bit of that rounding."""
        if self.gram is not None:
            self.gram = distributed.reduce_sum(self.gram)
        self.column_sum = distributed.reduce_sum(self.column_sum)
        self.count = int(distributed.reduce_sum(torch.tensor(self.count, dtype=torch.int64)))

    def merge(self, other: "InputGram") -> "InputGram":
        if self.gram is not None:
            self.gram += other.gram
        self.column_sum += other.column_sum
        self.count += other.count
        return self
