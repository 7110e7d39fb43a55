"""Activation range rules: from a histogram of calibration values to a clipping range ``[lo, hi]``.

Every rule returns ``(lo, hi)``; ``ActQParams.from_range`` then widens it to hold 0 and derives
the scale and zero point. The histogram is the bounded-memory summary every rule works from.
"""
from __future__ import annotations

import math
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

    def clamped(self, low: float, high: float) -> "Histogram":
        """The histogram of ``clamp(x, low, high)``: the bins outside whole, their counts added to
        the bins holding the bounds (a bound on a bin edge: the bin inside it)."""
        bins = len(self.counts)
        width = (self.hi - self.lo) / bins
        edge = 1e-9  # a bound on a bin edge must not reach into the bin beyond it by a rounding
        first = min(max(math.floor((low - self.lo) / width + edge), 0), bins - 1) if low > self.lo else 0
        last = max(min(math.ceil((high - self.lo) / width - edge) - 1, bins - 1), first) if high < self.hi \
            else bins - 1
        if (first, last) == (0, bins - 1):
            return self
        counts = self.counts[first:last + 1].clone()
        counts[0] += self.counts[:first].sum()
        counts[-1] += self.counts[last + 1:].sum()
        return Histogram(counts, self.lo + first * width, self.lo + (last + 1) * width)


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
    """``E(l, h)`` of :func:`mse_range` for a batch of candidate ranges (``lo``, ``hi``: ``[n]``).

    The clipped tails' ``Σ n·(x − c)²`` expand to ``Σn·x² − 2c·Σn·x + c²·Σn`` over the bins beyond
    ``c``, so prefix sums of ``n``, ``n·x`` and ``n·x²`` give every candidate in O(1)."""
    x, n = hist.centers, hist.counts.to(torch.float64)

    def prefix(values: torch.Tensor) -> torch.Tensor:
        return torch.cat([values.new_zeros(1), values.cumsum(0)])

    moments = [prefix(n), prefix(n * x), prefix(n * x * x)]
    start = torch.searchsorted(x, lo.contiguous())  # the first bin with x ≥ lo
    stop = torch.searchsorted(x, hi.contiguous(), right=True)  # one past the last bin with x ≤ hi

    def tail_error(begin: torch.Tensor, end: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s0, s1, s2 = (m[end] - m[begin] for m in moments)
        return s2 - 2 * c * s1 + c * c * s0

    below = tail_error(torch.zeros_like(start), start, lo)
    above = tail_error(stop, torch.full_like(stop, len(x)), hi)
    inside = (moments[0][stop] - moments[0][start]).clamp(min=0)
    step = (hi - lo) / ((1 << bits) - 1)
    return below + above + inside * step**2 / 12


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
    no mass inside scores ``inf``.

    Q is constant over each level's non-empty bins, so with ``K`` the kept mass, ``T`` the total
    and ``w_l`` the P-mass of level l's non-empty bins,
    ``KL = (Σ_j p_j log p_j)/T − log T − (Σ_l w_l log max(m_l/(o_l·K), floor) + folded mass on
    empty edge bins · log floor)/T``: every sum is a difference of prefix sums over the bins, so
    each candidate costs O(2^bits), not O(bins). tests/test_ranges.py checks it against the
    bin-by-bin definition.
    """
    levels_n = 1 << bits
    counts = hist.counts.to(torch.float64)
    bins = len(counts)
    edges = hist.edges
    centers = (edges[:-1] + edges[1:]) / 2
    first = torch.searchsorted(centers, lo.contiguous())  # the first bin whose center is ≥ lo
    last = torch.searchsorted(centers, hi.contiguous(), right=True) - 1
    width = (last - first + 1).clamp(min=0)
    a, b = first.clamp(0, bins - 1), last.clamp(0, bins - 1)

    def prefix(values: torch.Tensor) -> torch.Tensor:
        return torch.cat([values.new_zeros(1), values.cumsum(0)])

    n_log_n = torch.where(counts > 0, counts * torch.log(counts.clamp(min=1e-300)), torch.zeros_like(counts))
    mass_sum, busy_sum, entropy_sum = prefix(counts), prefix((counts > 0).double()), prefix(n_log_n)
    total = float(mass_sum[-1])
    kept = mass_sum[b + 1] - mass_sum[a]
    below, above = mass_sum[a], total - mass_sum[b + 1]

    # level l holds bins a + ceil(l·W/L) … a + ceil((l+1)·W/L) − 1
    bounds = a[:, None] + torch.div(torch.arange(levels_n + 1)[None, :] * width[:, None] + levels_n - 1,
                                    levels_n, rounding_mode="floor")
    bounds = bounds.clamp(max=bins)
    mass = mass_sum[bounds[:, 1:]] - mass_sum[bounds[:, :-1]]
    busy = busy_sum[bounds[:, 1:]] - busy_sum[bounds[:, :-1]]
    weight = mass.clone()  # P-mass of each level's non-empty bins (edges get the folded mass below)
    rows = torch.arange(len(lo))
    zero_bin = int(torch.searchsorted(edges, torch.tensor(0.0, dtype=torch.float64), right=True)) - 1
    has_zero = 0 <= zero_bin < bins
    n_zero = counts[zero_bin] if has_zero else counts.new_zeros(())
    at_zero_bin = (a <= zero_bin) & (zero_bin <= b) & (width > 0) & has_zero  # zero keeps its own slot
    level = torch.div((zero_bin - a) * levels_n, width.clamp(min=1), rounding_mode="floor").clamp(0, levels_n - 1)
    for table, amount in ((mass, n_zero), (busy, (n_zero > 0).double()), (weight, n_zero)):
        table[rows, level] -= torch.where(at_zero_bin, amount, 0.0)
    zero_weight = torch.where(at_zero_bin, n_zero, 0.0)
    # the folded tails: into the edge bin's level, or the zero slot, or (an empty edge bin) at the floor
    floor_weight = torch.zeros_like(kept)
    for edge, folded, edge_level in ((a, below, 0), (b, above, levels_n - 1)):
        is_zero_bin = at_zero_bin & (edge == zero_bin)
        occupied = counts[edge] > 0
        weight[:, edge_level] += torch.where(~is_zero_bin & occupied, folded, 0.0)
        zero_weight = zero_weight + torch.where(is_zero_bin, folded, 0.0)
        floor_weight = floor_weight + torch.where(~is_zero_bin & ~occupied, folded, 0.0)
    scale = kept.clamp(min=1e-300)[:, None]
    level_q = torch.clamp(mass / busy.clamp(min=1) / scale, min=KL_FLOOR)
    cross = torch.where((busy > 0) & (weight > 0), weight * torch.log(level_q), torch.zeros_like(weight)).sum(1)
    zero_q = torch.clamp(n_zero / scale[:, 0], min=KL_FLOOR)
    cross = (cross + torch.where(zero_weight > 0, zero_weight * torch.log(zero_q), 0.0)
             + floor_weight * math.log(KL_FLOOR))

    def x_log_x(v: torch.Tensor) -> torch.Tensor:
        return torch.where(v > 0, v * torch.log(v.clamp(min=1e-300)), torch.zeros_like(v))

    own = (entropy_sum[b + 1] - entropy_sum[a] - n_log_n[a] - n_log_n[b]
           + x_log_x(counts[a] + below) + x_log_x(counts[b] + above))
    kl = (own - cross) / total - math.log(total)
    invalid = (width < levels_n) | (kept <= 0)
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
