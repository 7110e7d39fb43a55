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


def kl_divergence_of_range(hist: Histogram, lo: float, hi: float, bits: int) -> float:
    """KL(P ‖ Q) of TensorRT's entropy calibration, for the asymmetric range ``[lo, hi]``.

    P: the histogram's bins inside ``[lo, hi]``, the clipped mass folded into the edge bins.
    Q: the same bins *without* the clipped mass, merged into ``2^bits`` equal levels and each
    level's mass spread evenly over its non-empty bins: what the quantized tensor can still say.
    Clipping costs through P's heavy edge bins; too coarse a step costs through Q's flattening.
    """
    centers = hist.centers
    inside = (centers >= lo) & (centers <= hi)
    kept = hist.counts[inside]
    if len(kept) < (1 << bits) or kept.sum() == 0:  # Q = P trivially, or Q has no mass at all
        return float("inf")
    p = kept.clone()
    p[0] += hist.counts[centers < lo].sum()
    p[-1] += hist.counts[centers > hi].sum()
    levels = torch.div(torch.arange(len(kept)) * (1 << bits), len(kept), rounding_mode="floor")
    # Zero is exactly representable (the zero point), so the bin holding 0 — the spike a ReLU
    # leaves — keeps its own mass in Q instead of being spread over its level.
    zero_bin = torch.nonzero((hist.edges[:-1][inside] <= 0) & (hist.edges[1:][inside] > 0)).flatten()
    levels[zero_bin] = 1 << bits
    mass = torch.zeros((1 << bits) + 1, dtype=torch.float64).index_add_(0, levels, kept)
    occupied = torch.zeros((1 << bits) + 1, dtype=torch.float64).index_add_(0, levels, (kept > 0).double())
    q = torch.where(kept > 0, mass[levels] / occupied[levels].clamp(min=1), torch.zeros_like(kept))
    p, q = p / p.sum(), q / q.sum()
    # P has mass where Q has none when outliers fold into an empty edge bin: give Q a floor
    # (as TensorRT and MXNet smooth it) so that costs a finite, mass-proportional amount.
    q = torch.clamp(q, min=KL_FLOOR)
    support = p > 0
    return float((p[support] * torch.log(p[support] / q[support])).sum())


def entropy_range(hist: Histogram, bits: int) -> tuple[float, float]:
    """The range, among the histogram's extent scaled by 1/100 … 1, with the least KL divergence
    between the clipped distribution and its quantized version (TensorRT's int8 calibration, made
    asymmetric)."""
    fractions = _fractions()
    lo, hi = min(hist.lo, 0.0), max(hist.hi, 0.0)
    divergences = [kl_divergence_of_range(hist, lo * f, hi * f, bits) for f in fractions.tolist()]
    best = fractions[int(torch.tensor(divergences).argmin())].item()
    return lo * best, hi * best
