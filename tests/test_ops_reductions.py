"""Sums along a dim and the softmax across two branches run on integers (`fxq.ops.reductions`):
split attention (SKNet, ResNeSt) quantizes whole and deploys bit-exact."""

import pytest
import torch
from torch import nn

from fxq.integers.affine import ActQParams
from fxq.ops.reductions import QMean, QSum
from fxq.ops.softmax import QSoftmax, QSoftmaxPair
from tests.helpers import quantize_whole


class SplitAttention(nn.Module):
    """SKNet's selective kernel: two branches stacked, their sum pooled into attention, a softmax
    across the branches, the weighted branches summed."""

    def __init__(self):
        super().__init__()
        self.near, self.far = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 5, padding=2)
        self.attend = nn.Conv2d(8, 16, 1)

    def forward(self, x):
        branches = torch.stack([torch.relu(self.near(x)), torch.relu(self.far(x))], dim=1)
        weights = self.attend(branches.sum(dim=1).mean((2, 3), keepdim=True))
        weights = weights.view(x.shape[0], 2, 8, 1, 1).softmax(dim=1)
        return torch.sum(branches * weights, dim=1)


def _calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 10, 10, generator=g) for _ in range(4)]


@pytest.mark.parametrize("requantize", ["fixed_point", "onnxruntime"])
def test_split_attention_runs_whole_on_integers_saves_and_deploys(requantize, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(5, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    qmodel = quantize_whole(SplitAttention().eval(), _calib(), x, tmp_path, requantize)
    assert {QSum, QSoftmaxPair} <= {type(m) for m in qmodel.modules()}


def test_the_pair_softmax_is_the_quantized_softmax_of_every_pair():
    before, after = ActQParams(0.07, 120, 8), ActQParams(1 / 255, 0, 8)
    pair = QSoftmaxPair(1, before, after)
    grid = torch.arange(256)
    a, b = torch.meshgrid(grid, grid, indexing="ij")
    q = torch.stack([a.flatten(), b.flatten()], 1).to(torch.uint8)
    real = before.scale * (q.to(torch.float64) - before.zero_point)
    assert torch.equal(pair(q).to(torch.int64), after.quantize(torch.softmax(real, 1)).to(torch.int64))


def test_the_sum_is_the_rounded_sum_within_one_step():
    torch.manual_seed(0)
    before, after = ActQParams(0.05, 100, 8), ActQParams(0.11, 30, 8)
    q = torch.randint(0, 256, (64, 3, 7, 7), dtype=torch.uint8)
    exact = after.quantize(before.scale * (q.to(torch.float64) - before.zero_point).sum(1))
    got = QSum((1,), False, before, after)(q)
    assert (got.to(torch.int64) - exact.to(torch.int64)).abs().max() <= 1
    assert float((got.to(torch.int64) == exact.to(torch.int64)).float().mean()) > 0.99


def test_a_softmax_over_more_than_two_values_runs_on_integers(tmp_path):
    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(x).softmax(dim=1)

    torch.manual_seed(0)
    qmodel = quantize_whole(Wide().eval(), _calib(), torch.randn(2, 3, 10, 10), tmp_path)
    assert QSoftmax in {type(m) for m in qmodel.modules()}


class ChannelsLastHead(nn.Module):
    """MambaOut's head: channels-last features averaged over dims (1, 2), and a mean over
    channels (dim 1, kept) and over the last dim by a negative index."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        pooled = self.fc(h.permute(0, 2, 3, 1).mean((1, 2)))
        return pooled + h.mean(1, keepdim=True).mean(-1).sum(-1)


@pytest.mark.parametrize("requantize", ["fixed_point", "onnxruntime"])
def test_means_over_any_dims_run_on_integers_and_deploy_bit_exact(requantize, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(5, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    qmodel = quantize_whole(ChannelsLastHead().eval(), _calib(), x, tmp_path, requantize)
    assert sum(type(m) is QMean for m in qmodel.modules()) == 3


def test_a_mean_is_the_rounded_mean_of_the_integers():
    q = torch.randint(0, 256, (3, 4, 5, 6), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    mean = QMean((1, -1), False, ActQParams(0.1, 100, 8))
    exact = (q.double() - 100).mean((1, 3))
    # half away from zero, as requantization rounds
    expected = exact.sign() * (exact.abs() + 0.5).floor() + 100
    assert torch.equal(mean(q).double(), expected)
    with pytest.raises(ValueError, match="not the batch's"):
        QMean((-4,), False, ActQParams(0.1, 100, 8))(q)
