"""Extrema over dims on integers (`fxq.ops.extrema`): the integers' own max and min, at the
input's parameters; CBAM-style spatial attention runs whole on integers and deploys bit-exact."""
import pytest
import torch
from torch import nn

from fxq.integers.affine import ActQParams
from fxq.ops.extrema import QExtremum
from tests.helpers import images, quantize_whole


class SpatialAttention(nn.Module):
    """CBAM's (and CSATv2's) spatial gate: the channels' mean and max side by side, a conv, a
    sigmoid; and the range of each row, ``amax − amin`` without keeping dims."""

    def __init__(self):
        super().__init__()
        self.stem, self.gate, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(2, 1, 7, padding=3), nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        x = x * torch.sigmoid(self.gate(pooled))
        return self.head(torch.amax(x, (2, 3)) - x.amin((2, 3)))


@pytest.mark.parametrize("requantize", ["fixed_point", "onnxruntime"])
def test_spatial_attention_runs_on_integers_saves_and_deploys(requantize, tmp_path):
    torch.manual_seed(0)
    calibration, x = images(10)
    qmodel = quantize_whole(SpatialAttention().eval(), calibration, x, tmp_path, requantize)
    assert {m.kind for m in qmodel.modules() if isinstance(m, QExtremum)} == {"amax", "amin"}


def test_the_extremum_of_the_integers_is_the_integer_of_the_extremum():
    qp = ActQParams(0.07, 120, 8)
    q = torch.randint(0, 256, (3, 4, 5, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for kind in ("amax", "amin"):
        out = QExtremum(kind, (1, 3), False)(q)
        expected = qp.quantize(getattr(torch, kind)(qp.dequantize(q), (1, 3)))
        assert torch.equal(out, expected) and out.dtype == torch.uint8
