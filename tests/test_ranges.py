"""Activation range rules on synthetic histograms whose answer is known."""
import pytest
import torch

from fxq import ranges
from fxq.ranges import Histogram


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
