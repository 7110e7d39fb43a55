"""Every op a quantized model keeps in float saves and deploys: fxq's own ONNX forms where it
has them, otherwise the op as torch.onnx exports it, spliced in (`fxq.onnx_splice`)."""
import io
import warnings

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxq
from fxq.runtime import count_ops
from tests.helpers import randomize_bn


class FloatIslands(nn.Module):
    """The float ops timm's CNNs keep: selective-kernel attention (stack, sum, softmax over the
    branches), ECA's channel attention (a Conv1d over pooled channels), bilinear upsampling, a
    batch norm with no conv before it, and a reduction fxq has no form for (logsumexp)."""

    def __init__(self):
        super().__init__()
        self.stem, self.left, self.right = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), \
            nn.Conv2d(8, 8, 1)
        self.attend, self.eca = nn.Conv2d(8, 16, 1), nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.norm, self.head = nn.BatchNorm2d(9), nn.Conv2d(9, 4, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        branches = torch.stack([self.left(x), self.right(x)], dim=1)  # B, 2, C, H, W
        weights = self.attend(branches.sum(dim=1).mean((2, 3), keepdim=True))
        weights = weights.view(x.shape[0], 2, 8, 1, 1).softmax(dim=1)
        x = (branches * weights).sum(dim=1)
        gate = self.eca(x.mean((2, 3)).view(x.shape[0], 1, -1)).view(x.shape[0], -1, 1, 1).sigmoid()
        x = F.interpolate(x * gate, scale_factor=2, mode="bilinear", align_corners=False)
        x = self.norm(torch.cat([x, torch.logsumexp(x, 1, keepdim=True)], 1))
        return self.head(x).mean((2, 3))


def _quantized():
    torch.manual_seed(0)
    model = randomize_bn(FloatIslands()).eval()
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randn(8, 3, 10, 10, generator=g) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FloatFallbackWarning)
        return model, fxq.quantize(model, calibration, fxq.QConfig(requantize="onnxruntime"))


def test_float_islands_save_load_and_deploy_within_a_step_of_fxq(tmp_path):
    model, qmodel = _quantized()
    x = torch.randn(16, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    assert len(count_ops(qmodel, x).float_ops) >= 6
    fxq.save(qmodel, tmp_path / "model.fxq")
    loaded = fxq.load(tmp_path / "model.fxq")
    deployed = fxq.deploy(loaded, x[:1], threads=1, weights="exact")
    assert not deployed.bit_exact and "float op(s)" in repr(deployed)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
        ours, theirs = qmodel(x), deployed(x)
    assert float((ours == theirs).float().mean()) > 0.9
    assert int((ours.argmax(1) == theirs.argmax(1)).sum()) >= 15


def test_the_spliced_graph_passes_the_checker_and_takes_any_batch():
    _, qmodel = _quantized()
    buffer = io.BytesIO()
    fxq.export_onnx(qmodel, buffer)
    graph = onnx.load_from_string(buffer.getvalue()).graph
    kinds = {n.op_type for n in graph.node}
    assert {"Softmax", "Resize", "Conv", "ReduceLogSumExp", "ReduceSum"} <= kinds
    deployed = fxq.deploy(qmodel, threads=1)
    for batch in (1, 5):
        assert deployed(torch.randn(batch, 3, 10, 10)).shape == (batch, 4)


def test_a_float_op_torch_onnx_cannot_export_is_named():
    class Spectral(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return torch.fft.rfft2(self.conv(x)).abs()

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FloatFallbackWarning)
        qmodel = fxq.quantize(Spectral().eval(), [torch.randn(4, 3, 4, 4)])
    with pytest.raises(ValueError, match=r"node 'fft_rfft2' .*torch.onnx .*could not export it"):
        fxq.export_onnx(qmodel, io.BytesIO())
