"""Padding on integers (`fxq.ops.padding`): zeros are the zero point, reflect/replicate/circular
padding copies the input's integers; either way nothing rounds and the export is bit-exact."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxq
from fxq.analysis.comparison import sqnr_db
from fxq.graphs import records
from fxq.graphs.runtime import count_ops
from fxq.integers.affine import ActQParams
from fxq.ops.padding import QPad
from tests.helpers import images, quantize_whole


class Blur(nn.Module):
    """timm's BlurPool (reflect padding, then a fixed depthwise blur with stride 2), and the other
    copying pads, as modules and as functions."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.blur = nn.Conv2d(6, 6, 3, stride=2, groups=6, bias=False)
        self.reflect, self.replicate = nn.ReflectionPad2d(1), nn.ReplicationPad2d((1, 0, 2, 1))
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        x = self.blur(self.reflect(torch.relu(self.conv(x))))
        x = F.pad(self.replicate(x), (1, 1, 1, 1), mode="circular")
        return self.head(F.pad(x, (0, 1, 0, 1), mode="reflect"))


def test_copying_pads_run_on_integers_and_deploy_bit_exact(tmp_path):
    torch.manual_seed(0)
    qmodel = quantize_whole(Blur().eval(), [torch.randn(8, 3, 12, 12) for _ in range(3)], torch.randn(6, 3, 12, 12),
                            tmp_path)
    assert {m.mode for m in qmodel.modules() if isinstance(m, QPad)} == {"reflect", "replicate", "circular"}


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_a_copying_pad_is_the_float_pad_of_the_values(mode):
    qp = ActQParams(0.1, 17, 8)
    q = torch.randint(0, 256, (2, 3, 5, 6), dtype=torch.uint8)
    padded = QPad((2, 1, 1, 2), qp.zero_point, mode)(q)
    assert torch.equal(padded.double(), F.pad(q.double(), (2, 1, 1, 2), mode=mode))


class OnesRow(nn.Module):
    """EfficientViT's linear attention pads its values with a row of ones, so that one product
    gives the weighted sum and the sum of the weights; a pad beyond the range stays float."""

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 4, 1)
        self.value = value

    def forward(self, x):
        return self.head(F.pad(self.conv(x), (0, 0, 0, 1), mode="constant", value=self.value))


def test_a_constant_pad_fills_with_the_inputs_integer_nearest_it_and_deploys_bit_exact(tmp_path):
    torch.manual_seed(0)
    calibration, x = images(12)
    qmodel = quantize_whole(OnesRow().eval(), calibration, x, tmp_path)
    pad = next(m for m in qmodel.modules() if isinstance(m, QPad))
    qp = records.get(next(n for n in qmodel.graph.nodes if n.target == "conv"), ActQParams)
    assert pad.fill != qp.zero_point
    assert abs(qp.scale * (pad.fill - qp.zero_point) - 1.0) <= qp.scale / 2


def test_a_constant_outside_the_inputs_range_keeps_that_pad_in_float():
    torch.manual_seed(0)
    model, (calibration, x) = OnesRow(1000.0).eval(), images(12)
    with pytest.warns(fxq.FloatFallbackWarning, match="padding with 1000.0 is outside its input's range"):
        qmodel = fxq.quantize(model, calibration)
    assert "pad" in count_ops(qmodel, x).float_ops  # and the conv reading its float output
    with torch.no_grad():
        assert sqnr_db(model(x), qmodel(x)) > 20
