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
