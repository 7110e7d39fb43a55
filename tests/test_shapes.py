"""Models whose Python code computes with sizes trace with the calibration input's sizes
(`fxq.graphs.shapes`), keep any batch size, and refuse another image size clearly; submodules that
still cannot be traced are kept in float, all of them in one call."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxq
from fxq.analysis.comparison import sensitivity
from fxq.graphs.qmodules import Quantize
from fxq.graphs.runtime import count_ops
from tests.helpers import assert_deploys_bit_exact, check_quantized


class SamePadConv(nn.Conv2d):
    """TensorFlow's "same" padding computed from the input's size, as timm's ``Conv2dSame``."""

    def forward(self, x):
        ih, iw = x.size()[-2:]
        pad_h = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - ih, 0)
        pad_w = max((math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + self.kernel_size[1] - iw, 0)
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Patches(nn.Module):
    """MobileViT's unfolding: a resize decided by comparing sizes, reshapes by computed sizes."""

    def __init__(self, c: int, patch: int = 2):
        super().__init__()
        self.patch, self.mix = patch, nn.Linear(c, c)

    def forward(self, x):
        b, c, h, w = x.shape
        new_h, new_w = math.ceil(h / self.patch) * self.patch, math.ceil(w / self.patch) * self.patch
        if new_h != h or new_w != w:
            x = F.interpolate(x, size=(new_h, new_w), mode="nearest")
        nh, nw = new_h // self.patch, new_w // self.patch
        x = x.reshape(b * c * nh, self.patch, nw, self.patch).transpose(1, 2)
        x = x.reshape(b, c, nh * nw, self.patch * self.patch).transpose(1, 3)
        x = self.mix(x).transpose(1, 3)
        return x.reshape(b, c, new_h, new_w)


def _same_pad_net():
    torch.manual_seed(0)
    return nn.Sequential(SamePadConv(3, 8, 3, stride=2), nn.ReLU(), Patches(8), SamePadConv(8, 8, 3, stride=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


def _calib(size=(13, 13)):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(6, 3, *size, generator=g) for _ in range(4)]


def test_size_computing_code_traces_with_the_calibration_sizes_and_runs_on_integers(tmp_path):
    model = _same_pad_net()
    qmodel = fxq.quantize(model, _calib(), fxq.QConfig(requantize="onnxruntime"))
    x = torch.randn(3, 3, 13, 13)  # a batch size calibration never used
    counts = count_ops(qmodel, x)
    assert counts.float == 0 and counts.integer > 0
    assert check_quantized(qmodel, model, x, tmp_path) > 20
    assert_deploys_bit_exact(qmodel, x, tmp_path / "model.fxq")
    inputs = [m for m in qmodel.modules() if isinstance(m, Quantize) and m.sample_shape is not None]
    assert [m.fixed_shape for m in inputs] == [True]


def test_the_studies_of_a_quantized_model_trace_the_float_one_with_the_same_sizes():
    model = _same_pad_net()
    qmodel = fxq.quantize(model, _calib())
    x = torch.randn(8, 3, 13, 13)
    labels = torch.arange(8) % 5
    compared = fxq.compare(model, qmodel, x)
    layers = [name for name, _, _ in compared.rows]
    assert len(layers) == 4 and all(isolated > 20 for _, _, isolated in compared.rows)
    evaluated = fxq.evaluate(qmodel, [(x, labels)], model)
    assert [name for name, _, _ in evaluated.layers.rows] == layers
    assert len(sensitivity(model, qmodel, x, labels).rows) == 4


def test_a_model_traced_for_one_size_refuses_another_naming_why(tmp_path):
    qmodel = fxq.quantize(_same_pad_net(), _calib())
    with pytest.raises(ValueError, match=r"computes with its input's size.*quantize again"):
        qmodel(torch.randn(2, 3, 16, 16))
    fxq.save(qmodel, tmp_path / "model.fxq")
    with pytest.raises(ValueError, match="computes with its input's size"):
        fxq.load(tmp_path / "model.fxq")(torch.randn(2, 3, 16, 16))


def test_calibration_on_mixed_sizes_names_the_batch():
    calib = _calib() + _calib((17, 17))
    with pytest.raises(ValueError, match=r"calibration batch 4 .*\(3, 17, 17\).*\(3, 13, 13\)"):
        fxq.quantize(_same_pad_net(), calib)


def test_a_model_that_traces_symbolically_keeps_any_size():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    qmodel = fxq.quantize(model, _calib())
    assert qmodel(torch.randn(2, 3, 20, 20)).shape == (2, 4)
    assert not any(getattr(m, "fixed_shape", False) for m in qmodel.modules())


class ValueBranch(nn.Module):
    """Control flow on a tensor's values: no trace can follow it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        if x.mean() > 100:
            return x
        return self.conv(x)


class TwoUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.first, self.mid = nn.Conv2d(3, 4, 3), ValueBranch(), nn.Conv2d(4, 4, 3)
        self.second, self.head = ValueBranch(), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.second(F.relu(self.mid(self.first(F.relu(self.stem(x)))))))


def test_every_untraceable_submodule_is_found_in_one_call_and_named():
    torch.manual_seed(0)
    with pytest.raises(TypeError) as refused:
        fxq.quantize(TwoUntraceable().eval(), _calib())
    lines = str(refused.value).splitlines()
    islands = [line for line in lines if line.startswith("  '")]
    assert len(islands) == 2 and "'first'" in islands[0] and "'second'" in islands[1]
    assert all("if x.mean() > 100" in line for line in islands)
    assert "overrides={'first': None, 'second': None}" in lines[-1]


def test_overrides_keep_untraceable_submodules_whole_and_the_rest_quantizes():
    torch.manual_seed(0)
    model = TwoUntraceable().eval()
    with pytest.raises(TypeError, match="'second'") as refused:
        fxq.quantize(model, _calib(), overrides={"first": None})
    assert "'first'" not in str(refused.value)
    qmodel = fxq.quantize(model, _calib(), overrides={"first": None, "second": None})
    x = torch.randn(2, 3, 13, 13)
    assert set(count_ops(qmodel, x).float_ops) == {"first", "second"}
    with torch.no_grad():
        assert (qmodel(x) - model(x)).abs().max() < 0.1


def test_untraceable_code_outside_any_submodule_still_raises_with_the_line():
    class Top(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(TypeError, match=r"top-level module.*x.sum\(\) > 0"):
        fxq.quantize(Top(), _calib())


class DeviceBranch(nn.Module):
    """EfficientViT's attention branches on ``v.device.type`` and casts back to ``v.dtype``;
    EdgeNeXt builds a positional mask with ``torch.zeros(..., device=...)`` and a bool cast."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        v = self.conv(x)
        if v.device.type != "meta":
            v = torch.relu(v.float()).to(v.dtype)
        mask = ~torch.zeros((v.size(0), 1, 1, 1), device=v.device).to(dtype=torch.bool)
        return self.head(v) * mask.cumsum(0, dtype=torch.float32)


def test_device_and_dtype_queries_trace_as_calibration_ran_and_save(tmp_path):
    torch.manual_seed(0)
    model = DeviceBranch().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FloatFallbackWarning)
        qmodel = fxq.quantize(model, _calib())
    assert check_quantized(qmodel, model, torch.randn(4, 3, 13, 13), tmp_path) > 20
