"""Pooling on integers: every average pooling torch defines, adaptive pooling, spatial means."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxq
from fxq.graphs import records
from fxq.integers.affine import ActQParams, round_half_away
from fxq.ops.pooling import QAvgPool2d
from tests.helpers import check_quantized

QP = ActQParams(0.1, 37, 8)


def _torch_reference(q, pool):
    """torch's own float64 pooling of the centred integers, rounded half away from zero."""
    centred = q.double() - QP.zero_point
    mean = pool(centred)
    return (round_half_away(mean) + QP.zero_point).clamp(0, 255)


@pytest.mark.parametrize("kernel,stride,padding,ceil_mode,include_pad,divisor", [
    c for c in itertools.product((2, 3), (1, 2), (0, 1), (False, True), (False, True), (None, 5))
    if c[2] <= c[0] // 2])
def test_window_mean_matches_torchs_average_pooling(kernel, stride, padding, ceil_mode, include_pad, divisor):
    q = torch.randint(0, 256, (2, 3, 7, 6), dtype=torch.uint8)
    integer = QAvgPool2d(QP, "window", (kernel, kernel), (stride, stride), (padding, padding), ceil_mode,
                         include_pad, divisor)
    expected = _torch_reference(q, lambda x: F.avg_pool2d(x, kernel, stride, padding, ceil_mode, include_pad, divisor))
    assert torch.equal(integer(q).double(), expected)


@pytest.mark.parametrize("size,out", [((2, 2), (7, 7)), ((7, 7), (3, 3)), ((5, 6), (None, 4)), ((9, 4), (1, 1))])
def test_adaptive_mean_matches_torchs(size, out):
    q = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8)
    integer = QAvgPool2d(QP, "adaptive", output_size=out)
    expected = _torch_reference(q, lambda x: F.adaptive_avg_pool2d(x, out))
    assert torch.equal(integer(q).double(), expected)


def test_ties_round_half_away_from_zero():
    q = torch.tensor([QP.zero_point + d for d in (1, 2, 0, 0, -1, -2, 0, 0)], dtype=torch.uint8).reshape(1, 2, 2, 2)
    out = QAvgPool2d.global_mean(QP)(q).flatten().tolist()  # centred means 0.75 and -0.75
    assert out == [QP.zero_point + 1, QP.zero_point - 1]
    halves = torch.tensor([QP.zero_point + d for d in (1, 0, -1, 0)], dtype=torch.uint8).reshape(1, 2, 1, 2)
    assert QAvgPool2d.global_mean(QP)(halves).flatten().tolist() == [QP.zero_point + 1, QP.zero_point - 1]


class Pools(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.avg = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.adaptive = nn.AdaptiveAvgPool2d((7, 7))
        self.adaptive_max = nn.AdaptiveMaxPool2d(3)
        self.listed = nn.MaxPool2d([3, 3], [1, 1], [1, 1])  # geometry as lists, as timm's MViTv2 gives it
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.listed(torch.relu(self.conv(x)))
        x = F.max_pool2d(self.avg(x), 3, 2, 1, ceil_mode=True)
        x = F.avg_pool2d(self.adaptive(x), 2, ceil_mode=True, count_include_pad=True, padding=1)
        y = self.adaptive_max(x)
        both = torch.cat([x.mean((2, 3)), torch.mean(y, (-2, -1), keepdim=True).flatten(1)], 1)
        return self.fc(both)


def test_every_pool_runs_on_integers_exactly(tmp_path):
    model = Pools().eval()
    qmodel = fxq.quantize(model, [torch.randn(8, 3, 12, 12) for _ in range(4)])
    kept = [n.name for n in qmodel.graph.nodes if records.has(n, records.FloatOp)]
    assert kept == []
    assert check_quantized(qmodel, model, torch.randn(32, 3, 12, 12), tmp_path) > 25


def test_a_mean_over_dims_2_3_refuses_other_ranks():
    pool = QAvgPool2d.global_mean(QP, rank=4)
    with pytest.raises(ValueError, match="4-d tensor; got a 5-d one"):
        pool(torch.zeros(1, 2, 3, 4, 5, dtype=torch.uint8))
