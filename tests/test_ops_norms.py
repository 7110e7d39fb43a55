"""Group and layer norms run on integers (`fxq.ops.norms`): each sample's statistics as exact
integer sums, the rest in float64 steps that onnxruntime repeats one for one — ConvNeXt's and
BiT's norms quantize, save and deploy bit-exact."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxq
from fxq.integers.affine import ActQParams
from fxq.ops.norms import QNorm
from tests.helpers import assert_deploys_bit_exact, quantize_whole

BEFORE, AFTER = ActQParams(0.05, 131, 8), ActQParams(0.03, 122, 8)


def _affine(channels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(channels, generator=g) * 2 - 0.5, torch.randn(channels, generator=g) * 0.5


def _integers(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed)).to(torch.uint8)


def _steps_from_float(norm: QNorm, float_norm, q: torch.Tensor) -> torch.Tensor:
    """How many output steps the integer norm lies from the float norm of the same input."""
    real = float_norm(BEFORE.scale * (q.to(torch.float64) - BEFORE.zero_point))
    return (norm(q).to(torch.int64) - AFTER.quantize(real).to(torch.int64)).abs()


def test_a_group_norm_is_the_quantized_float_group_norm():
    weight, bias = _affine(12, 0)
    norm = QNorm("group", 3, (), weight, bias, 1e-5, BEFORE, AFTER)
    q = _integers((4, 12, 5, 7), 1)
    steps = _steps_from_float(norm, lambda x: F.group_norm(x, 3, weight.double(), bias.double(), 1e-5), q)
    assert int(steps.max()) <= 1 and float((steps == 0).float().mean()) > 0.999


def test_a_layer_norm_over_channels_last_is_the_quantized_float_layer_norm():
    weight, bias = _affine(16, 2)
    norm = QNorm("layer", 1, (16,), weight, bias, 1e-6, BEFORE, AFTER)
    q = _integers((3, 5, 6, 16), 3)
    steps = _steps_from_float(norm, lambda x: F.layer_norm(x, (16,), weight.double(), bias.double(), 1e-6), q)
    assert int(steps.max()) <= 1 and float((steps == 0).float().mean()) > 0.999


def test_a_constant_group_gives_the_bias_not_a_division_by_zero():
    weight, bias = _affine(4, 4)
    norm = QNorm("group", 2, (), weight, bias, 1e-5, BEFORE, AFTER)
    q = torch.full((2, 4, 3, 3), 77, dtype=torch.uint8)
    expected = AFTER.quantize(bias.double()).to(torch.uint8).reshape(1, 4, 1, 1).expand(2, 4, 3, 3)
    assert torch.equal(norm(q), expected)


class ConvNeXtBlock(nn.Module):
    """torchvision's ConvNeXt block: depthwise conv, layer norm over channels-last, MLP, layer
    scale; and a LayerNorm2d-style norm (permute → F.layer_norm → permute) at the end."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 2, stride=2)
        self.dw = nn.Conv2d(16, 16, 7, padding=3, groups=16)
        self.norm = nn.LayerNorm(16, eps=1e-6)
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)
        self.gamma = nn.Parameter(torch.full((16,), 0.5))
        self.head_weight, self.head_bias = nn.Parameter(torch.rand(16) + 0.5), nn.Parameter(torch.randn(16))

    def forward(self, x):
        x = self.stem(x)
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.down(F.gelu(self.up(y))) * self.gamma
        x = x + y.permute(0, 3, 1, 2)
        return F.layer_norm(x.permute(0, 2, 3, 1), (16,), self.head_weight, self.head_bias, 1e-6).permute(0, 3, 1, 2)


class GroupNormNet(nn.Module):
    """BiT's pattern: conv → GroupNorm → ReLU, and a PoolFormer-style GroupNorm of one group as
    a function."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)

    def forward(self, x):
        x = torch.relu(self.gn(self.conv1(x)))
        return F.group_norm(self.conv2(x), 1, eps=1e-5)


def _calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 12, 12, generator=g) for _ in range(4)]


@pytest.mark.parametrize("build", [ConvNeXtBlock, GroupNormNet])
@pytest.mark.parametrize("requantize", ["fixed_point", "onnxruntime"])
def test_norm_networks_run_whole_on_integers_save_and_deploy(build, requantize, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    qmodel = quantize_whole(build().eval(), _calib(), x, tmp_path, requantize)
    assert QNorm in {type(m) for m in qmodel.modules()}


def test_a_norm_at_4_bits_deploys_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = GroupNormNet().eval()
    qmodel = fxq.quantize(model, _calib(), fxq.QConfig(act_bits=4, requantize="onnxruntime"))
    x = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    assert any(type(m) is QNorm and m.output_bits == 4 for m in qmodel.modules())
    assert_deploys_bit_exact(qmodel, x)


class NoEps(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return F.group_norm(self.conv(x), 2, eps=0.0)


def test_a_norm_without_eps_stays_in_float_saying_why():
    torch.manual_seed(0)
    with pytest.warns(fxq.FloatFallbackWarning, match="eps = 0"):
        qmodel = fxq.quantize(NoEps().eval(), _calib())
    assert QNorm not in {type(m) for m in qmodel.modules()}


def test_a_group_too_large_for_exact_statistics_is_refused_by_name():
    wide = ActQParams(0.1, 3, 16)
    norm = QNorm("group", 1, (), torch.ones(4), torch.zeros(4), 1e-5, wide, wide)
    with pytest.raises(ValueError, match="160000 values at 16 bits overflows"):
        norm(torch.zeros(1, 4, 200, 200, dtype=torch.int32))


class ResponseNorm(nn.Module):
    """ConvNeXt-V2's global response norm (timm's GlobalResponseNorm), channels last: an L2 norm
    over the spatial dims, divided by its channel mean, applied with ``torch.addcmul``."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.weight, self.bias = nn.Parameter(torch.rand(8)), nn.Parameter(torch.randn(8) * 0.1)

    def forward(self, x):
        x = self.conv(x).permute(0, 2, 3, 1)
        x_g = x.norm(p=2, dim=(1, 2), keepdim=True)
        x_n = x_g / (x_g.mean(dim=-1, keepdim=True) + 1e-6)
        return self.head((x + torch.addcmul(self.bias, self.weight, x * x_n)).permute(0, 3, 1, 2))


def test_a_global_response_norm_runs_on_integers_and_deploys_bit_exact(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    qmodel = quantize_whole(ResponseNorm().eval(), _calib(), x, tmp_path)
    assert {"QL2Norm", "QQuotient", "QConstantLookup", "QMean"} <= {type(m).__name__ for m in qmodel.modules()}


def test_an_l2_norm_is_the_quantized_float_norm():
    from fxq.ops.reductions import QL2Norm
    norm = QL2Norm((1, 2), True, BEFORE, AFTER)
    q = _integers((3, 6, 5, 4), 5)
    real = (BEFORE.scale * (q.double() - BEFORE.zero_point)).norm(p=2, dim=(1, 2), keepdim=True)
    assert torch.equal(norm(q).to(torch.int64), AFTER.quantize(real, half_even=True).to(torch.int64))
