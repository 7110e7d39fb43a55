"""timm's own layers quantize as what they compute: its BatchNormAct2d (a BatchNorm2d subclass
whose forward calls F.batch_norm, then an activation) folds into the conv before it or becomes
the per-channel affine conv; its Linear (F.linear) is a layer; the shape assertions its forwards
carry are checked by calibration and then leave the graph, so the model saves and deploys."""
import pytest
import torch
from torch import nn

import fxq
from fxq.graphs import records
from fxq.graphs.runtime import count_ops
from tests.helpers import assert_deploys_bit_exact, check_quantized
from tests.test_canonical import _calib, _settled

# timm takes 3 s to import: these run in `make test`, the unit loop keeps tests/test_canonical.py
pytestmark = pytest.mark.real_data


class TimmBlock(nn.Module):
    """conv → BatchNormAct2d, timm's ConvNormAct, a pre-activation BatchNormAct2d with no conv
    before it, and a timm Linear head."""

    def __init__(self):
        from timm.layers import BatchNormAct2d, ConvNormAct, Linear

        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = BatchNormAct2d(8, act_layer=nn.SiLU)
        self.block = ConvNormAct(8, 8, 3, norm_layer=BatchNormAct2d)
        self.pre = BatchNormAct2d(8)
        self.head = Linear(8, 5)

    def forward(self, x):
        x = self.bn(self.conv(x))
        x = self.pre(self.block(x) + x)
        return self.head(x.mean((2, 3)))


def test_timms_batch_norms_fold_and_its_linear_is_a_layer(tmp_path):
    torch.manual_seed(0)
    model = _settled(TimmBlock())
    qmodel = fxq.quantize(model, _calib(), fxq.QConfig(requantize="onnxruntime"))
    assert not any(records.has(n, records.FloatOp) for n in qmodel.graph.nodes)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qmodel.modules())
    layers = [type(m).__name__ for m in qmodel.modules() if type(m).__name__ in ("QConv2d", "QLinear")]
    assert layers.count("QConv2d") == 3 and layers.count("QLinear") == 1  # two folded, one affine conv
    x = torch.randn(16, 3, 12, 12)
    assert check_quantized(qmodel, model, x, tmp_path) > 25
    assert_deploys_bit_exact(qmodel, x)


def test_the_shape_assertions_are_gone_after_calibration_and_count_as_nothing():
    torch.manual_seed(0)
    qmodel = fxq.quantize(_settled(TimmBlock()), _calib())
    calls = [n for n in qmodel.graph.nodes if n.op in ("call_function", "call_method")]
    assert not any(n.target in (torch._assert, getattr) for n in calls)
    ops = count_ops(qmodel, torch.randn(2, 3, 12, 12))
    calls = [n for n in qmodel.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    assert ops.float == 0 and ops.integer + ops.boundary == len(calls)


class SamePadded(nn.Module):
    """timm's TensorFlow-style convs: ``Conv2dSame`` pads from the input's size at every call."""

    def __init__(self):
        from timm.layers import Conv2dSame, SelectiveKernel

        super().__init__()
        self.stem, self.down = Conv2dSame(3, 8, 3, stride=2), Conv2dSame(8, 8, 3, stride=2, groups=8)
        self.sk = SelectiveKernel(8, 8)

    def forward(self, x):
        return self.sk(torch.relu(self.down(torch.relu(self.stem(x))))).mean((2, 3))


def test_timms_same_padding_and_selective_kernel_run_on_integers_with_no_override(tmp_path):
    torch.manual_seed(0)
    model = _settled(SamePadded())
    qmodel = fxq.quantize(model, _calib(), fxq.QConfig(requantize="onnxruntime"))
    x = torch.randn(7, 3, 12, 12)
    assert count_ops(qmodel, x).float == 0
    assert check_quantized(qmodel, model, x, tmp_path) > 25
    assert_deploys_bit_exact(qmodel, x, tmp_path / "model.fxq")


def test_timms_scaled_weight_standardized_conv_is_a_layer(tmp_path):
    from timm.layers import ScaledStdConv2d

    torch.manual_seed(0)
    model = nn.Sequential(ScaledStdConv2d(3, 8, 3, padding=1), nn.ReLU(), ScaledStdConv2d(8, 4, 1)).eval()
    qmodel = fxq.quantize(model, _calib(), fxq.QConfig(requantize="onnxruntime"))
    x = torch.randn(5, 3, 12, 12)
    assert count_ops(qmodel, x).float == 0
    assert check_quantized(qmodel, model, x, tmp_path) > 25
    assert_deploys_bit_exact(qmodel, x, tmp_path / "model.fxq")


class Normalized(nn.Module):
    """timm's norms with their own forwards: GroupNormAct (BiT), GroupNorm1 (PoolFormer),
    LayerNorm2d (ConvNeXt's stem and downsampling), LayerNorm over channels last (its blocks),
    and BlurPool's reflect-padded blur (resnetblur, TResNet)."""

    def __init__(self):
        from timm.layers import BlurPool2d, GroupNorm1, GroupNormAct, LayerNorm, LayerNorm2d

        super().__init__()
        self.conv, self.mix = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 1)
        self.gn, self.gn1, self.ln2d = GroupNormAct(16, 4), GroupNorm1(16), LayerNorm2d(16)
        self.ln, self.blur = LayerNorm(16), BlurPool2d(16, filt_size=3, stride=2)

    def forward(self, x):
        x = self.ln2d(self.gn1(self.mix(self.gn(self.conv(x)))))
        x = self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.blur(x)


def test_timms_norms_and_blur_pool_run_on_integers_and_deploy_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = Normalized().eval()
    qmodel = fxq.quantize(model, _calib(), fxq.QConfig(requantize="onnxruntime"))
    x = torch.randn(16, 3, 12, 12)
    assert count_ops(qmodel, x).float == 0
    assert sum(type(m).__name__ == "QNorm" for m in qmodel.modules()) == 4
    assert check_quantized(qmodel, model, x, tmp_path) > 25
    assert_deploys_bit_exact(qmodel, x)
