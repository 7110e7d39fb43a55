"""`fxq.deploy(..., runtime="openvino")`: the exported file run by OpenVINO, float in, float out in the model's
structure, its threads honoured, float32 where the graph is float, and never called bit-exact."""
import io
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fxq
from fxq.analysis.comparison import sqnr_db
from fxq.deployment import runtimes
from fxq.graphs.outputs import named
from tests.helpers import Residual, randomize_bn

pytest.importorskip("openvino")


class TwoHeads(nn.Module):
    """A dict of a feature map and a tuple of logits, as segmentation and detection models return."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head, self.fc = nn.Conv2d(8, 4, 1), nn.Linear(8, 5)

    def forward(self, x):
        y = self.body(x)
        return {"map": self.head(y), "scores": (self.fc(y.mean((2, 3))),)}


def _quantized(model):
    torch.manual_seed(0)
    calibration = [torch.randn(8, 3, 8, 8) for _ in range(4)]
    return fxq.quantize(randomize_bn(model), calibration, fxq.QConfig(requantize="onnxruntime"))


@pytest.mark.parametrize("model", [Residual, TwoHeads])
def test_openvino_runs_the_exported_integers_close_to_fxq_and_never_claims_exact(model):
    qmodel = _quantized(model())
    x = torch.randn(16, 3, 8, 8)
    deployed = fxq.deploy(qmodel, x[:1], runtime="openvino")
    ours, theirs = named(qmodel(x)), named(deployed(x))
    assert [name for name, _ in theirs] == [name for name, _ in ours]
    assert all(b.dtype == torch.float32 and b.shape == a.shape for (_, a), (_, b) in zip(ours, theirs))
    assert all(sqnr_db(a, b) > 30 for (_, a), (_, b) in zip(ours, theirs))
    assert not deployed.bit_exact and "OpenVINO" in repr(deployed) and "NOT exact" in repr(deployed)
    assert fxq.deploy(qmodel, runtime="onnxruntime").bit_exact  # the same model: exact where it can be


def test_openvino_takes_the_threads_it_is_given_and_keeps_float_values_in_float32():
    deployed = fxq.deploy(_quantized(Residual()), threads=1, runtime="openvino")
    compiled = deployed.session().compiled
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"


def test_an_unknown_or_missing_runtime_is_refused_with_the_fix(monkeypatch):
    qmodel = _quantized(Residual())
    with pytest.raises(ValueError, match="runtime='tvm': fxq deploys to 'onnxruntime' or 'openvino'"):
        fxq.deploy(qmodel, runtime="tvm")
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ImportError, match=r"pip install 'fxq\[openvino\]'.*runtime='onnxruntime'"):
        fxq.deploy(qmodel, torch.randn(1, 3, 8, 8), runtime="openvino")


OPENVINO_ON_AVX2 = """
import torch
from fxq.analysis.comparison import sqnr_db
from fxq.deployment import saturation
from fxq.graphs.outputs import named
from tests.test_openvino import TwoHeads, _quantized, fxq
torch.manual_seed(0)
qmodel, x = _quantized(TwoHeads()), torch.randn(16, 3, 8, 8)
deployed = fxq.deploy(qmodel, runtime="openvino")
print(saturation.runtime_saturates("openvino"), deployed.saturating, deployed.weight_format,
      min(sqnr_db(a, b) for (_, a), (_, b) in zip(named(qmodel(x)), named(deployed(x)))))
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN's ISA cap is an x86 setting")
def test_openvino_probes_its_own_kernels_and_takes_exact_weights_where_they_saturate():
    """OpenVINO's oneDNN held to AVX2 (no VNNI) adds uint8 × int8 products in saturating 16-bit pairs
    while this process's onnxruntime may not: OpenVINO's own probe, not onnxruntime's, picks the weights."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", OPENVINO_ON_AVX2], env=env, capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[1]).stdout.split()
    assert out[:3] == ["True", "True", "u8u8"]
    assert float(out[3]) > 30


class Downsample(nn.Module):
    """ResNet's downsampling block: a 3×3 stride-2 conv beside a 1×1 stride-2 conv, odd sizes included."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16))
        self.downsample = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))

    def forward(self, x):
        y = self.stem(x)
        return torch.relu(self.conv(y) + self.downsample(y))


def test_a_strided_1x1_conv_reads_every_other_integer_and_runs_in_int8_on_openvino():
    """OpenVINO runs a strided 1×1 conv of an input with a zero point in float32; written as a
    subsample of the integers and a stride-1 conv it runs in u8, and computes the same integers."""
    calibration = [torch.randn(8, 3, 9, 9) for _ in range(4)]
    # pair-safe weights: int8 kernels on every CPU (a CPU without VNNI takes uint8 weights otherwise,
    # which OpenVINO runs in float32)
    qmodel = fxq.quantize(randomize_bn(Downsample()), calibration, fxq.QConfig(pair_safe=True))
    x = torch.randn(16, 3, 9, 9)
    files = {}
    for runtime in ("onnxruntime", "openvino"):
        buffer = io.BytesIO()
        fxq.export_onnx(qmodel, buffer, runtime=runtime)
        files[runtime] = buffer.getvalue()
    assert files["openvino"] != files["onnxruntime"]
    on_onnxruntime = [runtimes.onnxruntime(f, 1)(x.numpy())[0] for f in files.values()]
    assert (on_onnxruntime[0] == on_onnxruntime[1]).all()  # the same integers, either form
    assert torch.equal(torch.from_numpy(on_onnxruntime[1]), qmodel(x))
    compiled = fxq.deploy(qmodel, runtime="openvino").session().compiled
    convs = [op.get_rt_info()["runtimePrecision"].astype(str) for op in compiled.get_runtime_model().get_ordered_ops()
             if op.get_rt_info()["layerType"].astype(str) == "Convolution"]
    assert len(convs) == 3 and set(convs) == {"u8"}
