"""fxq.export_onnx / fxq.deploy: every op kind exports, onnx.checker accepts the graph, onnxruntime
runs it at any batch size; table, clamp and pooling ops compute exactly what fxq computes, and
int8 convs differ from fxq's fixed-point requantization by at most a step or two."""
import io
import pickle
import warnings

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxq
from tests.helpers import Residual, randomize_bn
from tests.test_ops_activations import Activations, Scaled
from tests.test_ops_joins import Branches
from tests.test_ops_layers import Grouped
from tests.test_ops_pooling import Pools


def _steps(qmodel, deployed, x) -> torch.Tensor:
    """Per output element, how many output steps the deployed model is from fxq's executor."""
    step = qmodel.get_submodule("dequantize").scale.item()
    with torch.no_grad():
        return ((deployed(x) - qmodel(x)).abs() / step).round()


class Exact(nn.Module):
    """Only ops onnxruntime runs on fxq's own integers: tables, clamps, pools, joins, reshapes."""

    def forward(self, x):
        a = F.hardswish(x) * 0.5
        b = F.relu6(x).clamp(max=4.0)
        joined = torch.cat([a, b], 1) + torch.sigmoid(torch.cat([b, a], 1))
        pooled = F.avg_pool2d(F.max_pool2d(joined, 2, ceil_mode=True), 3, 1, 1, count_include_pad=False)
        gated = pooled * torch.sigmoid(pooled.mean((2, 3), keepdim=True))
        return F.adaptive_avg_pool2d(gated, (3, 2)).flatten(1)


def test_table_clamp_pool_and_join_ops_export_exactly():
    model = Exact().eval()
    qmodel = fxq.quantize(model, [torch.randn(8, 3, 9, 9) for _ in range(4)])
    deployed = fxq.deploy(qmodel, threads=1)
    for batch in (1, 7):  # a dynamic batch dimension
        assert _steps(qmodel, deployed, torch.randn(batch, 3, 9, 9)).max() == 0


MODELS = {
    "residual": (lambda: randomize_bn(Residual()), (3, 8, 8)),
    "activations": (Activations, (3, 8, 8)),
    "constant tables": (Scaled, (3, 8, 8)),
    "branches and shape ops": (Branches, (3, 8, 8)),
    "grouped and depthwise": (Grouped, (3, 12, 12)),
    "pools": (Pools, (3, 12, 12)),
}


@pytest.mark.parametrize("name", MODELS)
def test_every_op_kind_exports_and_runs_in_onnxruntime(name, tmp_path):
    make, shape = MODELS[name]
    model = make().eval()
    qmodel = fxq.quantize(model, [torch.randn(8, *shape) for _ in range(4)])
    fxq.export_onnx(qmodel, tmp_path / "model.onnx")
    onnx.checker.check_model(onnx.load(tmp_path / "model.onnx"))
    deployed = fxq.deploy(qmodel, torch.randn(1, *shape), threads=1)
    x = torch.randn(64, *shape)
    steps = _steps(qmodel, deployed, x)
    assert steps.float().mean() < 0.25 and steps.max() <= 8, (steps.float().mean(), steps.max())
    with torch.no_grad():
        assert (deployed(x).argmax(1) == qmodel(x).argmax(1)).float().mean() >= 0.9
    assert torch.equal(pickle.loads(pickle.dumps(deployed))(x), deployed(x))


def test_a_saved_model_deploys_too(tmp_path):
    qmodel = fxq.quantize(randomize_bn(Residual()).eval(), [torch.randn(8, 3, 8, 8) for _ in range(4)])
    fxq.save(qmodel, tmp_path / "m.fxq")
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(fxq.deploy(fxq.load(tmp_path / "m.fxq"))(x), fxq.deploy(qmodel)(x))


def test_a_float_op_without_an_onnx_form_is_named():
    class Softmaxed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return torch.logsumexp(self.conv(x), 1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FloatFallbackWarning)
        qmodel = fxq.quantize(Softmaxed().eval(), [torch.randn(4, 3, 4, 4)])
    with pytest.raises(ValueError, match="node 'logsumexp'.*no ONNX export"):
        fxq.export_onnx(qmodel, io.BytesIO())
