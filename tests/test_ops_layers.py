"""Grouped and depthwise convolutions, string paddings, and linear layers on any leading dims."""
import pytest
import torch
from torch import nn

import fxq
from fxq.config import Rounding
from fxq.graphs import records
from fxq.integers import gemm
from fxq.integers.reference import reference_output
from fxq.ops.layers import QConv2d
from tests.helpers import EXACT_BACKENDS, check_quantized


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding="same")
        self.depthwise = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=2)
        self.multiplier = nn.Conv2d(12, 24, 3, padding=2, dilation=2, groups=12)  # two outputs per input
        self.valid = nn.Conv2d(24, 16, 1, padding="valid")
        self.channels_last = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.depthwise(x))
        x = nn.functional.relu6(self.grouped(x))
        x = self.valid(torch.relu(self.multiplier(x)))
        x = self.channels_last(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(x.mean((2, 3)))


CONFIGS = {
    "w8a8": fxq.QConfig(),
    "w4a8 output-aware": fxq.QConfig(weight_bits=4),
    "per-tensor cle": fxq.QConfig(per_channel=False, cross_layer_equalization=True, bias_correction=True),
    "a16": fxq.QConfig(act_bits=16),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_grouped_and_depthwise_convs_run_on_integers_exactly(config, tmp_path):
    model = Grouped().eval()
    qmodel = fxq.quantize(model, [torch.randn(8, 3, 12, 12) for _ in range(4)], config)
    assert not any(records.has(n, records.FloatOp) for n in qmodel.graph.nodes)
    groups = sorted(m.groups for m in qmodel.modules() if isinstance(m, QConv2d))
    assert groups == [1, 1, 2, 8, 12]
    floor_db = 15 if config.weight_bits == 4 else 25
    assert check_quantized(qmodel, model, torch.randn(32, 3, 12, 12), tmp_path) > floor_db


@pytest.mark.parametrize("groups,multiplier", [(4, 1), (4, 3), (2, 1)])
def test_the_grouped_accumulator_is_exact_at_the_worst_case(groups, multiplier):
    """±127 weights against inputs at 0 and 255: the largest sums the int32 paths must hold."""
    conv = nn.Conv2d(4, 4 * multiplier, 3, padding=1, groups=groups)
    layer = QConv2d.__new__(QConv2d)
    nn.Module.__init__(layer)
    layer.groups, layer.input_bits, layer.output_bits = groups, 8, 8
    layer.requantize_as = Rounding.FIXED_POINT
    layer.stride, layer.padding, layer.dilation = (1, 1), (1, 1), (1, 1)
    weight = torch.where(torch.rand(conv.weight.shape) < 0.5, -127, 127).to(torch.int8)
    for name, value in [("weight", weight),
                        ("bias", torch.randint(-2**20, 2**20, (4 * multiplier,), dtype=torch.int32)),
                        ("multiplier", torch.full((4 * multiplier,), 2**30, dtype=torch.int32)),
                        ("shift", torch.full((4 * multiplier,), -12, dtype=torch.int8)),
                        ("input_scale", torch.tensor(1.0, dtype=torch.float64)),
                        ("output_scale", torch.tensor(1.0, dtype=torch.float64)),
                        ("weight_scale", torch.ones(4 * multiplier, dtype=torch.float64)),
                        ("input_zero_point", torch.tensor(3, dtype=torch.int32)),
                        ("output_zero_point", torch.tensor(128, dtype=torch.int32))]:
        layer.register_buffer(name, value)
    layer.prepare()
    x = torch.where(torch.rand(2, 4, 6, 6) < 0.5, 0, 255).to(torch.uint8)
    assert torch.equal(layer(x).to(torch.int64), reference_output(layer, x))


@pytest.mark.parametrize("layer", ["depthwise", "grouped", "multiplier", "channels_last"])
def test_explain_recomputes_grouped_layers_exactly(layer):
    model = Grouped().eval()
    qmodel = fxq.quantize(model, [torch.randn(8, 3, 12, 12) for _ in range(4)])
    kernels = {"integer": {"depthwise": "multiply-adds", "multiplier": "multiply-adds", "grouped": "per group (2)",
                           "channels_last": "int8 GEMM"}[layer], "float32": "float32", "float64": "float64"}
    for backend, expected in ((str(b), kernels[str(b)]) for b in EXACT_BACKENDS):
        with gemm.forced(backend):
            explanation = fxq.explain(qmodel, layer, torch.randn(8, 3, 12, 12))
        assert explanation.check.mismatches == 0 and explanation.check.elements > 0
        assert expected in str(explanation) and f"exact ({backend} backend, forced" in str(explanation)
