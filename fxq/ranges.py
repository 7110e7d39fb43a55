"""Activation range rules: from a histogram of calibration values to a clipping range ``[lo, hi]``.

Every rule returns ``(lo, hi)``; ``ActQParams.from_range`` then widens it to hold 0 and derives
the scale and zero point. The histogram is the bounded-memory summary every rule works from.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CANDIDATES = 100  # clipping fractions tried by the search rules: 1/100, 2/100, ..., 1
KL_FLOOR = 1e-4  # the least probability Q gives a bin in the entropy rule


@dataclass(frozen=True)
class Histogram:
    """Counts of values in ``bins`` equal-width bins over ``[lo, hi]`` (float64 counts)."""

    counts: torch.Tensor
    lo: float
    hi: float

    @property
    def edges(self) -> torch.Tensor:
        return torch.linspace(self.lo, self.hi, len(self.counts) + 1, dtype=torch.float64)

    @property
    def centers(self) -> torch.Tensor:
        edges = self.edges
        return (edges[:-1] + edges[1:]) / 2


def _fractions() -> torch.Tensor:
    return torch.arange(1, CANDIDATES + 1, dtype=torch.float64) / CANDIDATES


def percentile_range(hist: Histogram, percentile: float) -> tuple[float, float]:
    """The ``(100 − p)``-th and ``p``-th percentiles: ``p = 99.99`` clips 0.01 % of each tail."""
    cdf = hist.counts.cumsum(0) / hist.counts.sum()
    tail = 1.0 - percentile / 100.0
    edges = hist.edges
    lo_bin = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=torch.float64)))
    hi_bin = int(torch.searchsorted(cdf, torch.tensor(1.0 - tail, dtype=torch.float64)))
    return float(edges[lo_bin]), float(edges[min(hi_bin + 1, len(edges) - 1)])


def expected_squared_error(hist: Histogram, lo: torch.Tensor, hi: torch.Tensor,
                           bits: int) -> torch.Tensor:
    """``E(l, h)`` of :func:`mse_range` for a batch of candidate ranges (``lo``, ``hi``: ``[n]``)."""
    lo, hi = lo[:, None], hi[:, None]
    x, n = hist.centers[None, :], hist.counts[None, :]
    step = (hi - lo) / ((1 << bits) - 1)
    clipped = torch.minimum(torch.maximum(x, lo), hi)
    inside = (x >= lo) & (x <= hi)
    return (n * ((x - clipped) ** 2 + inside * step**2 / 12)).sum(1)


def mse_range(hist: Histogram, bits: int) -> tuple[float, float]:
    """The range minimizing the expected squared quantization error of the histogram's values.

    For a candidate ``[l, h]`` with step ``Δ = (h − l)/(2^b − 1)``, a value inside costs the
    rounding noise ``Δ²/12`` and a value outside its clipping distance squared:

        E(l, h) = Σ_i n_i · [ (x_i − clamp(x_i, l, h))² + Δ²/12 · 1(l ≤ x_i ≤ h) ]

    ``l`` and ``h`` are fractions 1/100 … 1 of the negative and positive extent, searched one
    end at a time (upper, lower, upper again), each search vectorized over its 100 candidates.
    """
    fractions = _fractions()
    lo_full, hi_full = min(hist.lo, 0.0), max(hist.hi, 0.0)
    lo, hi = lo_full, hi_full
    for end in ("hi", "lo", "hi"):
        if end == "hi":
            candidates = hi_full * fractions
            error = expected_squared_error(hist, torch.full_like(candidates, lo), candidates, bits)
            hi = float(candidates[int(error.argmin())])
        elif lo_full < 0:
            candidates = lo_full * fractions
            error = expected_squared_error(hist, candidates, torch.full_like(candidates, hi), bits)
            lo = float(candidates[int(error.argmin())])
    return lo, hi


def kl_divergences(hist: Histogram, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """KL(P ‖ Q) of TensorRT's entropy calibration for each candidate range ``[lo_i, hi_i]``.

    P: the histogram's bins inside the range, the clipped mass folded into the edge bins.
    Q: the same bins *without* the clipped mass, merged into ``2^bits`` equal levels and each
    level's mass spread evenly over its non-empty bins: what the quantized tensor can still say.
    Clipping costs through P's heavy edge bins; too coarse a step costs through Q's flattening.
    Zero is exactly representable (the zero point), so the bin holding 0 — the spike a ReLU
    leaves — keeps its own mass in Q. A range with fewer bins than levels (Q = P trivially) or
    no mass inside scores ``inf``. All candidates at once: ``[candidates, bins]`` tensors.
    """
    levels_n = 1 << bits
    edges = hist.edges
    centers = (edges[:-1] + edges[1:]) / 2
    counts = hist.counts[None, :]
    inside = (centers[None, :] >= lo[:, None]) & (centers[None, :] <= hi[:, None])
    width = inside.sum(1, keepdim=True)
    first = inside.to(torch.int64).argmax(1, keepdim=True)
    position = torch.arange(len(centers))[None, :] - first  # bin index within the kept range
    kept = torch.where(inside, counts, torch.zeros_like(counts))
    p = kept.clone()
    below = (counts * (centers[None, :] < lo[:, None])).sum(1)
    above = (counts * (centers[None, :] > hi[:, None])).sum(1)
    rows = torch.arange(len(lo))
    p[rows, first.squeeze(1)] += below
    p[rows, (first + width - 1).clamp(min=0).squeeze(1)] += above
    level = torch.div(position.clamp(min=0) * levels_n, width.clamp(min=1), rounding_mode="floor")
    holds_zero = (edges[None, :-1] <= 0) & (edges[None, 1:] > 0)
    level = torch.where(holds_zero, levels_n, level).clamp(max=levels_n)
    slot = rows[:, None] * (levels_n + 1) + torch.where(inside, level, levels_n)
    mass = torch.zeros(len(lo) * (levels_n + 1), dtype=torch.float64).index_add_(0, slot.flatten(), kept.flatten())
    occupied = torch.zeros_like(mass).index_add_(0, slot.flatten(), (kept > 0).double().flatten())
    q = torch.where(kept > 0, mass[slot] / occupied[slot].clamp(min=1), torch.zeros_like(kept))
    p = p / p.sum(1, keepdim=True)
    q = q / q.sum(1, keepdim=True).clamp(min=1e-300)
    # P has mass where Q has none when outliers fold into an empty edge bin: give Q a floor
    # (as TensorRT and MXNet smooth it) so that costs a finite, mass-proportional amount.
    q = torch.clamp(q, min=KL_FLOOR)
    terms = torch.where(p > 0, p * torch.log(p / q), torch.zeros_like(p))
    kl = terms.sum(1)
    invalid = (width.squeeze(1) < levels_n) | (kept.sum(1) == 0)
    return torch.where(invalid, torch.full_like(kl, float("inf")), kl)


def kl_divergence_of_range(hist: Histogram, lo: float, hi: float, bits: int) -> float:
    """:func:`kl_divergences` of one range."""
    return float(kl_divergences(hist, torch.tensor([lo], dtype=torch.float64),
                                torch.tensor([hi], dtype=torch.float64), bits)[0])


def entropy_range(hist: Histogram, bits: int) -> tuple[float, float]:
    """The range, among the histogram's extent scaled by 1/100 … 1, with the least KL divergence
    between the clipped distribution and its quantized version (TensorRT's int8 calibration, made
    asymmetric)."""
    fractions = _fractions()
    lo, hi = min(hist.lo, 0.0), max(hist.hi, 0.0)
    best = fractions[int(kl_divergences(hist, lo * fractions, hi * fractions, bits).argmin())].item()
    return lo * best, hi * best
