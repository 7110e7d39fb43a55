import pytest
import torch

from fxq.integers.observers import MinMaxObserver


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
from fxq.integers.observers import HistogramObserver, MovingAverageObserver, make_observer  # noqa: E402


def test_moving_average_follows_the_ema_formula():
    obs = MovingAverageObserver("x", 8, averaging_constant=0.5)
    for lo, hi in [(-1.0, 1.0), (-3.0, 5.0), (0.0, 1.0)]:
        obs(torch.tensor([lo, hi]))
    # min: -1 → -1 + .5(-3 + 1) = -2 → -2 + .5(0 + 2) = -1 ; max: 1 → 3 → 2
    assert (obs.min_val.item(), obs.max_val.item()) == (-1.0, 2.0)


def test_histogram_observer_reads_the_data_once_whatever_the_order():
    torch.manual_seed(0)
    data = [torch.randn(1000) * 0.1, torch.randn(1000) * 2 + 1, torch.rand(1000) * 9]
    forward, backward = (HistogramObserver(n, 8, "mse", 256, 99.9) for n in "fb")
    for x in data:
        forward(x)
    for x in reversed(data):
        backward(x)
    assert torch.equal(forward.counts, backward.counts) and forward.qparams() == backward.qparams()
    assert forward.counts.sum() == 3000 and forward.counts.numel() == 512  # bounded memory
    hist = forward.histogram()  # occupied bins span the extent, at least `bins` of them
    assert len(hist.counts) >= 256 and hist.lo <= -0.5 and hist.hi >= 9.0


def test_merged_shards_equal_one_observer_of_everything():
    torch.manual_seed(1)
    data = [torch.randn(500) * s + m for s, m in ((0.01, 0.0), (1.0, -3.0), (5.0, 2.0), (0.5, 40.0))]
    whole = HistogramObserver("whole", 8, "entropy", 256, 99.9)
    a, b = HistogramObserver("a", 8, "entropy", 256, 99.9), HistogramObserver("b", 8, "entropy", 256, 99.9)
    for x in data:
        whole(x)
    a(data[0]), b(data[1]), a(data[3]), b(data[2])
    merged = a.merge(b)
    assert torch.equal(merged.counts, whole.counts) and merged.qparams() == whole.qparams()


def test_a_histogram_of_one_repeated_value_gives_that_value():
    obs = HistogramObserver("c", 8, "percentile", 256, 99.9)
    obs(torch.full((100,), 3.0))
    assert obs.range(8) == (3.0, 3.0)
    obs(torch.tensor([-1.0]))  # the grid grows from a single point
    assert obs.counts.sum() == 101 and obs.histogram().lo <= -1.0


@pytest.mark.parametrize("act_range, kind", [
    ("minmax", "MinMaxObserver"), ("moving_average", "MovingAverageObserver"),
    ("percentile", "HistogramObserver"), ("mse", "HistogramObserver"),
    ("entropy", "HistogramObserver")])
def test_make_observer_follows_the_config(act_range, kind):
    obs = make_observer(QConfig(act_range=act_range, act_bits=6), "v")
    assert type(obs).__name__ == kind and obs.bits == 6
