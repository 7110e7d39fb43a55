"""Clamps (ReLU6, Hardtanh, clamp) and lookup-table activations (Hardswish, SiLU, GELU, ...)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxq
from fxq import records
from fxq.affine import ActQParams
from fxq.ops.lookup import QClamp, QLookup
from tests.helpers import check_quantized


class Activations(nn.Module):
    """A conv between every kind of one-tensor activation, in module, function and method form."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 6, 6, 3, padding=1) for i in range(6))
        self.relu6, self.hardswish, self.silu = nn.ReLU6(), nn.Hardswish(), nn.SiLU()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        c = self.convs
        x = self.relu6(c[0](x))
        x = self.hardswish(c[1](x))
        x = F.gelu(c[2](x) * 0.5 + 1.0)
        x = F.hardtanh(c[3](x), -0.5, 2.0).clamp(min=-0.25)
        x = torch.sigmoid(self.silu(c[4](x))) - 0.5
        x = F.relu6(c[5](x)).tanh()
        return self.fc(x.mean((2, 3)))


def _data():
    return [torch.randn(8, 3, 8, 8) for _ in range(4)]


@pytest.mark.parametrize("placement", ["pre", "post", "both"])
def test_every_activation_runs_on_integers_exactly(placement, tmp_path):
    model = Activations().eval()
    qmodel = fxq.quantize(model, _data(), fxq.QConfig(placement=placement))
    kept = [n.name for n in qmodel.graph.nodes if records.has(n, records.FloatOp)]
    assert kept == []
    kinds = {type(m).__name__ for m in qmodel.modules()}
    assert {"QClamp", "QLookup"} <= kinds
    assert check_quantized(qmodel, model, torch.randn(32, 3, 8, 8), tmp_path) > 25


def test_a_clamp_is_quantize_of_the_clamp_of_every_grid_value():
    qp = ActQParams(0.037, 97, 8)
    q = torch.arange(256, dtype=torch.uint8)
    values = (q.double() - qp.zero_point) * qp.scale
    for low, high in [(0.0, 6.0), (-1.0, 1.0), (-0.3, None), (None, 0.2), (-100.0, 100.0)]:
        expected = qp.quantize(torch.clamp(values, low, high))
        assert torch.equal(QClamp.between(qp, low, high)(q), expected), (low, high)


def test_a_lookup_is_quantize_of_the_function_of_every_grid_value():
    before, after = ActQParams(0.05, 128, 8), ActQParams(0.03, 12, 8)
    lookup = QLookup(nn.Hardswish().double(), "Hardswish", before, after)
    x = (torch.arange(256, dtype=torch.float64) - 128) * 0.05
    by_hand = x * torch.clamp(x + 3, 0, 6) / 6  # Hardswish's definition
    assert torch.equal(lookup(torch.arange(256, dtype=torch.uint8)), after.quantize(by_hand))


def test_a_function_not_finite_on_the_grid_stays_in_float():
    class Sqrt(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return torch.log(self.conv(x).abs() + 1) + 1 / self.conv(x)

    with pytest.warns(fxq.FloatFallbackWarning):
        qmodel = fxq.quantize(Sqrt().eval(), _data())
    reasons = [records.get(n, records.FloatOp).reason for n in qmodel.graph.nodes if records.has(n, records.FloatOp)]
    assert any("not finite" in r for r in reasons)


class Scaled(nn.Module):
    """ConvNeXt's layer scale (a learned per-channel factor) and a per-channel shift, as parameters."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gamma = nn.Parameter(torch.tensor([0.5, -2.0, 1e-3, 3.0]).reshape(4, 1, 1))
        self.register_buffer("shift", torch.tensor([1.0, 0.0, -1.0, 2.0]).reshape(4, 1, 1))

    def forward(self, x):
        y = self.gamma * self.conv(x)
        return (y + self.shift).mean((2, 3))


def test_an_op_with_a_constant_tensor_is_a_table_per_element(tmp_path):
    model = Scaled().eval()
    qmodel = fxq.quantize(model, _data())
    assert not any(records.has(n, records.FloatOp) for n in qmodel.graph.nodes)
    tables = [m for m in qmodel.modules() if type(m).__name__ == "QConstantLookup"]
    assert len(tables) == 2 and tables[0].table.numel() == 4 * 256
    assert check_quantized(qmodel, model, torch.randn(32, 3, 8, 8), tmp_path) > 25
