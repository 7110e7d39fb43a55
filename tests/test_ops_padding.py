"""Padding on integers (`fxq.ops.padding`): zeros are the zero point, reflect/replicate/circular
padding copies the input's integers; either way nothing rounds and the export is bit-exact."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxq.affine import ActQParams
from fxq.ops.padding import QPad
from tests.helpers import quantize_whole


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
