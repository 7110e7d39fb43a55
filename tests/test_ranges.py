"""Activation range rules on synthetic histograms whose answer is known."""
import pytest
import torch

from fxq.integers import ranges
from fxq.integers.ranges import Histogram


def histogram_of(x: torch.Tensor, bins: int = 2048) -> Histogram:
    lo, hi = x.min().item(), x.max().item()
    return Histogram(torch.histc(x, bins, lo, hi).double(), lo, hi)


def brute_force_mse(hist: Histogram, bits: int) -> float:
    """The least E(l, h) over the full 100 × 100 grid of candidate pairs."""
    fractions = torch.arange(1, 101, dtype=torch.float64) / 100
    pairs = torch.cartesian_prod(min(hist.lo, 0) * fractions, max(hist.hi, 0) * fractions)
    return ranges.expected_squared_error(hist, pairs[:, 0], pairs[:, 1], bits).min().item()


def error_of(hist, lo, hi, bits):
    return ranges.expected_squared_error(hist, torch.tensor([lo]), torch.tensor([hi]), bits).item()


def test_percentile_clips_the_stated_share_of_each_tail():
    hist = Histogram(torch.ones(1000, dtype=torch.float64), 0.0, 100.0)  # uniform on [0, 100]
    lo, hi = ranges.percentile_range(hist, 99.0)  # the 1st and the 99th percentile
    assert lo == pytest.approx(1.0, abs=0.11) and hi == pytest.approx(99.0, abs=0.11)


def test_mse_clips_a_gaussian_with_an_outlier_far_inside_the_outlier():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(200_000), torch.tensor([40.0])])
    hist = histogram_of(x)
    lo, hi = ranges.mse_range(hist, 4)
    # 4-bit optimum for a unit Gaussian clips near ±2.5σ–3σ; the outlier at 40 is ignored
    assert 2.0 < hi < 4.0 and -4.0 < lo < -2.0
    assert error_of(hist, lo, hi, 4) < 0.05 * error_of(hist, hist.lo, hist.hi, 4)


@pytest.mark.parametrize("bits", [4, 8])
def test_mse_coordinate_search_finds_the_grid_optimum(bits):
    torch.manual_seed(1)
    x = torch.cat([torch.randn(50_000) * 0.5 - 1, torch.randn(50_000) * 2 + 3])  # skewed, two-sided
    hist = histogram_of(x)
    lo, hi = ranges.mse_range(hist, bits)
    assert error_of(hist, lo, hi, bits) <= brute_force_mse(hist, bits) * 1.01


def test_mse_on_a_one_sided_distribution_keeps_zero_as_the_lower_end():
    torch.manual_seed(2)
    hist = histogram_of(torch.relu(torch.randn(100_000)))
    lo, hi = ranges.mse_range(hist, 8)
    assert lo == 0.0 and 0 < hi <= hist.hi


def test_entropy_keeps_a_clean_uniform_distribution_whole():
    hist = Histogram(torch.ones(2048, dtype=torch.float64), 0.0, 1.0)
    assert ranges.entropy_range(hist, 8) == pytest.approx((0.0, 1.0))


def test_entropy_clips_rare_far_outliers():
    counts = torch.zeros(2048, dtype=torch.float64)
    counts[:204] = 1000.0  # the bulk on [0, 1)
    counts[-1] = 1.0       # one value near 10
    lo, hi = ranges.entropy_range(Histogram(counts, 0.0, 10.0), 8)
    assert lo == 0.0 and 1.0 <= hi <= 2.0


def test_kl_is_zero_when_nothing_is_clipped_and_bins_equal_levels():
    hist = Histogram(torch.rand(256, dtype=torch.float64) + 0.1, 0.0, 1.0)
    assert ranges.kl_divergence_of_range(hist, 0.0, 1.0, 8) == pytest.approx(0.0, abs=1e-12)


def _kl_bin_by_bin(hist: Histogram, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """The entropy rule's KL(P ‖ Q) as its definition reads, one [candidates, bins] matrix per
    quantity (what `ranges.kl_divergences` computes with prefix sums)."""
    levels_n = 1 << bits
    edges = hist.edges
    centers = (edges[:-1] + edges[1:]) / 2
    counts = hist.counts[None, :]
    inside = (centers[None, :] >= lo[:, None]) & (centers[None, :] <= hi[:, None])
    width = inside.sum(1, keepdim=True)
    first = inside.to(torch.int64).argmax(1, keepdim=True)
    position = torch.arange(len(centers))[None, :] - first
    kept = torch.where(inside, counts, torch.zeros_like(counts))
    p = kept.clone()
    rows = torch.arange(len(lo))
    p[rows, first.squeeze(1)] += (counts * (centers[None, :] < lo[:, None])).sum(1)
    p[rows, (first + width - 1).clamp(min=0).squeeze(1)] += (counts * (centers[None, :] > hi[:, None])).sum(1)
    level = torch.div(position.clamp(min=0) * levels_n, width.clamp(min=1), rounding_mode="floor")
    holds_zero = (edges[None, :-1] <= 0) & (edges[None, 1:] > 0)
    level = torch.where(holds_zero, levels_n, level).clamp(max=levels_n)
    slot = rows[:, None] * (levels_n + 1) + torch.where(inside, level, levels_n)
    mass = torch.zeros(len(lo) * (levels_n + 1), dtype=torch.float64).index_add_(0, slot.flatten(), kept.flatten())
    occupied = torch.zeros_like(mass).index_add_(0, slot.flatten(), (kept > 0).double().flatten())
    q = torch.where(kept > 0, mass[slot] / occupied[slot].clamp(min=1), torch.zeros_like(kept))
    p = p / p.sum(1, keepdim=True)
    q = torch.clamp(q / q.sum(1, keepdim=True).clamp(min=1e-300), min=ranges.KL_FLOOR)
    kl = torch.where(p > 0, p * torch.log(p / q), torch.zeros_like(p)).sum(1)
    invalid = (width.squeeze(1) < levels_n) | (kept.sum(1) == 0)
    return torch.where(invalid, torch.full_like(kl, float("inf")), kl)


@pytest.mark.parametrize("seed", range(12))
def test_prefix_sum_kl_equals_the_bin_by_bin_definition(seed):
    g = torch.Generator().manual_seed(seed)
    bins = int(torch.randint(300, 3000, (1,), generator=g))
    counts = torch.randint(0, 50, (bins,), generator=g).double() * (torch.rand(bins, generator=g) > 0.3)
    counts[int(torch.randint(0, bins, (1,), generator=g))] += 5000  # a spike (a ReLU's zeros)
    lo, hi = sorted(float(v) for v in torch.randn(2, generator=g) * 3)
    hist = Histogram(counts, lo if seed % 3 else 0.0, hi)
    fractions = torch.arange(1, 101, dtype=torch.float64) / 100
    c_lo, c_hi = min(hist.lo, 0.0) * fractions, max(hist.hi, 0.0) * fractions
    for bits in (4, 8):
        fast, slow = ranges.kl_divergences(hist, c_lo, c_hi, bits), _kl_bin_by_bin(hist, c_lo, c_hi, bits)
        assert torch.equal(torch.isinf(fast), torch.isinf(slow))
        finite = ~torch.isinf(slow)
        assert torch.allclose(fast[finite], slow[finite], rtol=1e-9, atol=1e-12)
        if finite.any():
            assert int(fast.argmin()) == int(slow.argmin())


@pytest.mark.parametrize("seed", range(6))
def test_prefix_sum_squared_error_equals_the_bin_by_bin_sum(seed):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 100, (1500,), generator=g).double()
    hist = Histogram(counts, -2.0 + seed, 3.0 + seed)
    fractions = torch.arange(1, 101, dtype=torch.float64) / 100
    lo, hi = torch.full((100,), min(hist.lo, 0.0) * 0.7, dtype=torch.float64), max(hist.hi, 0.0) * fractions
    x, n = hist.centers[None, :], hist.counts[None, :]
    step = (hi[:, None] - lo[:, None]) / 255
    inside = (x >= lo[:, None]) & (x <= hi[:, None])
    clipped = torch.minimum(torch.maximum(x, lo[:, None]), hi[:, None])
    direct = (n * ((x - clipped) ** 2 + inside * step**2 / 12)).sum(1)
    fast = ranges.expected_squared_error(hist, lo, hi, 8)
    assert torch.allclose(fast, direct, rtol=1e-9) and int(fast.argmin()) == int(direct.argmin())


def test_clamped_histogram_folds_each_tail_onto_the_bin_holding_the_bound():
    hist = Histogram(torch.tensor([1.0, 2.0, 3.0, 4.0]), -2.0, 2.0)
    relu = hist.clamped(0.0, float("inf"))  # 0 is a bin edge: the bin inside it takes the negatives
    assert (relu.lo, relu.hi) == (0.0, 2.0) and relu.counts.tolist() == [6.0, 4.0]
    capped = hist.clamped(-0.5, 1.0)  # -0.5 inside a bin: that bin holds the bound
    assert (capped.lo, capped.hi) == (-1.0, 1.0) and capped.counts.tolist() == [3.0, 7.0]
    assert hist.clamped(-5.0, 5.0) is hist


def test_mse_range_on_what_a_relu_keeps_starts_at_zero_and_spends_every_level_above():
    torch.manual_seed(0)
    x = torch.randn(100_000, dtype=torch.float64)
    counts = torch.histc(x, 512, -5, 5)
    lo, hi = ranges.mse_range(Histogram(counts, -5.0, 5.0).clamped(0.0, float("inf")), 4)
    whole_lo, whole_hi = ranges.mse_range(Histogram(counts, -5.0, 5.0), 4)
    assert lo == 0.0 and whole_lo < -1.0
    assert hi / 15 < (whole_hi - whole_lo) / 15 * 0.75  # a finer step for the values that matter
