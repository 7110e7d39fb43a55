import pytest
import torch

from fxq.observers import MinMaxObserver


def test_minmax_tracks_the_running_range_and_passes_through():
    obs = MinMaxObserver("x")
    a = torch.tensor([-1.0, 2.0])
    assert obs(a) is a
    obs(torch.tensor([0.5, 3.0]))
    assert (obs.min_val.item(), obs.max_val.item()) == (-1.0, 3.0)
    qp = obs.qparams()
    assert qp.scale == pytest.approx(4.0 / 255) and qp.zero_point == 64


def test_merge_equals_observing_everything():
    a, b, both = MinMaxObserver("a"), MinMaxObserver("b"), MinMaxObserver("both")
    x, y = torch.randn(100), torch.randn(100) * 3
    a(x), b(y), both(x), both(y)
    merged = a.merge(b)
    assert merged.qparams() == both.qparams()


def test_nan_is_reported_with_the_label():
    with pytest.raises(ValueError, match="value of 'conv1' holds NaN"):
        MinMaxObserver("the value of 'conv1'")(torch.tensor([1.0, float("nan")]))


def test_unobserved_observer_refuses_to_give_qparams():
    with pytest.raises(ValueError, match="saw no data"):
        MinMaxObserver("x").qparams()


from fxq import QConfig  # noqa: E402
from fxq.observers import HistogramObserver, MovingAverageObserver, make_observer  # noqa: E402


def test_moving_average_follows_the_ema_formula():
    obs = MovingAverageObserver("x", 8, averaging_constant=0.5)
    for lo, hi in [(-1.0, 1.0), (-3.0, 5.0), (0.0, 1.0)]:
        obs(torch.tensor([lo, hi]))
    # min: -1 → -1 + .5(-3 + 1) = -2 → -2 + .5(0 + 2) = -1 ; max: 1 → 3 → 2
    assert (obs.min_val.item(), obs.max_val.item()) == (-1.0, 2.0)


def test_histogram_observer_needs_two_passes_and_merges_per_pass():
    torch.manual_seed(0)
    data = [torch.randn(1000), torch.randn(1000) * 2]
    whole, a, b = (HistogramObserver(n, 8, "mse", 256, 99.9) for n in "wab")
    assert whole.passes == 2
    for p in range(2):
        for obs in (whole, a, b):
            obs.begin_pass(p)
        for x in data:
            whole(x)
        a(data[0]), b(data[1])
        if p == 0:
            a.merge(b)
            b.min_val, b.max_val = a.min_val.clone(), a.max_val.clone()
    a.merge(b)
    assert torch.equal(a.counts, whole.counts) and a.qparams() == whole.qparams()
    assert a.counts.numel() == 256  # bounded memory: the histogram, never the activations


def test_histograms_over_different_extents_refuse_to_merge():
    a, b = HistogramObserver("a", 8, "mse", 256, 99.9), HistogramObserver("b", 8, "mse", 256, 99.9)
    for obs, x in ((a, torch.tensor([0.0, 1.0])), (b, torch.tensor([0.0, 2.0]))):
        obs(x)
        obs.begin_pass(1)
    with pytest.raises(ValueError, match="different extents"):
        a.merge(b)


@pytest.mark.parametrize("act_range, kind", [
    ("minmax", "MinMaxObserver"), ("moving_average", "MovingAverageObserver"),
    ("percentile", "HistogramObserver"), ("mse", "HistogramObserver"),
    ("entropy", "HistogramObserver")])
def test_make_observer_follows_the_config(act_range, kind):
    obs = make_observer(QConfig(act_range=act_range, act_bits=6), "v")
    assert type(obs).__name__ == kind and obs.bits == 6
