"""Clamps (ReLU6, Hardtanh, clamp) and lookup-table activations (Hardswish, SiLU, GELU, ...)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxq
from fxq.graphs import records
from fxq.integers.affine import ActQParams
from fxq.ops.activations import UNARY_MATH
from fxq.ops.lookup import QClamp, QLookup
from tests.helpers import assert_deploys_bit_exact, check_quantized, quantize_whole


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


def test_a_function_undefined_on_the_grid_stays_in_float_and_an_infinity_saturates():
    class Logs(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            h = self.conv(x)
            return torch.log(h.abs() + 1) + 1 / h + h % h  # h % h: 0 % 0 on the grid's zero

    with pytest.warns(fxq.FloatFallbackWarning):
        qmodel = fxq.quantize(Logs().eval(), _data())
    reasons = {n.name: records.get(n, records.FloatOp).reason for n in qmodel.graph.nodes
               if records.has(n, records.FloatOp)}
    assert list(reasons) == ["mod"]  # h % h, while 1 / 0 saturates
    assert "not a number" in next(iter(reasons.values()))


class Scaled(nn.Module):
    """ConvNeXt's layer scale (a learned per-channel factor) and a per-channel shift, as parameters;
    or in place, as timm's ``LayerScale(inplace=True)`` and CSATv2 write them."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gamma = nn.Parameter(torch.tensor([0.5, -2.0, 1e-3, 3.0]).reshape(4, 1, 1))
        self.register_buffer("shift", torch.tensor([1.0, 0.0, -1.0, 2.0]).reshape(4, 1, 1))
        self.inplace = inplace

    def forward(self, x):
        if self.inplace:
            return self.conv(x).mul_(self.gamma).add_(self.shift).mean((2, 3))
        y = self.gamma * self.conv(x)
        return (y + self.shift).mean((2, 3))


@pytest.mark.parametrize("inplace", [False, True], ids=["operators", "in-place"])
def test_an_op_with_a_constant_tensor_is_a_table_per_element(inplace, tmp_path):
    torch.manual_seed(0)
    model = Scaled(inplace).eval()
    qmodel = fxq.quantize(model, _data())
    assert not any(records.has(n, records.FloatOp) for n in qmodel.graph.nodes)
    tables = [m for m in qmodel.modules() if type(m).__name__ == "QConstantLookup"]
    assert len(tables) == 2 and tables[0].table.numel() == 4 * 256
    assert check_quantized(qmodel, model, torch.randn(32, 3, 8, 8), tmp_path) > 25


class PReLUs(nn.Module):
    """PReLU per channel and with one slope, as a module and as F.prelu, after convs and a linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.Linear(6, 5)
        self.per_channel, self.shared, self.after_fc = nn.PReLU(6), nn.PReLU(), nn.PReLU(5)
        with torch.no_grad():
            self.per_channel.weight.copy_(torch.linspace(-0.8, 1.2, 6))
        self.slope = nn.Parameter(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]))

    def forward(self, x):
        x = F.prelu(self.shared(self.per_channel(self.conv1(x))), self.slope)
        return self.after_fc(self.fc(self.conv2(x).mean((2, 3))))


def test_prelu_is_a_table_per_channel_on_integers_and_saves_and_deploys(tmp_path):
    torch.manual_seed(0)
    model = PReLUs().eval()
    qmodel = fxq.quantize(model, _data(), fxq.QConfig(requantize="onnxruntime"))
    assert not any(records.has(n, records.FloatOp) for n in qmodel.graph.nodes)
    tables = {n.name: qmodel.get_submodule(n.target) for n in qmodel.graph.nodes
              if n.op == "call_module" and type(qmodel.get_submodule(n.target)).__name__ == "QChannelLookup"}
    assert sorted(t.table.numel() // 256 for t in tables.values()) == [1, 5, 6, 6]
    x = torch.randn(32, 3, 8, 8)
    assert check_quantized(qmodel, model, x, tmp_path) > 25
    assert_deploys_bit_exact(qmodel, x, tmp_path / "model.fxq")


def test_a_prelu_table_is_quantize_of_prelu_of_every_grid_value_per_channel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.PReLU(4)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([-1.0, 0.0, 0.25, 2.0]))
    qmodel = fxq.quantize(model, _data())
    node = next(n for n in qmodel.graph.nodes if n.op == "call_module" and n.target.startswith("1"))
    before, after = records.get(node.args[0], ActQParams), records.get(node, ActQParams)
    q = torch.arange(256).reshape(1, 1, 1, 256).expand(1, 4, 1, 256)
    values = (q.double() - before.zero_point) * before.scale
    slopes = model[1].weight.double().reshape(1, 4, 1, 1)
    expected = after.quantize(torch.where(values >= 0, values, slopes * values))
    assert torch.equal(qmodel.get_submodule(node.target)(q).long(), expected.long())


class UnaryMath(nn.Module):
    """Every elementwise math function of one tensor, each its own output: on values in (0.05, 0.95)
    where a function is finite only on positives, in [-1, 1] or short of π/2, else in (-3, 3)."""

    INSIDE = frozenset({"log", "log1p", "log2", "log10", "sqrt", "rsqrt", "reciprocal", "acos", "asin", "tan"})

    def __init__(self, as_methods: bool):
        super().__init__()
        self.conv, self.as_methods = nn.Conv2d(3, 4, 3, padding=1), as_methods

    def forward(self, x):
        h = self.conv(x)
        inside, wide = torch.sigmoid(h) * 0.9 + 0.05, torch.tanh(h) * 3
        outs = []
        for name in UNARY_MATH:
            v = inside if name in self.INSIDE else wide
            outs.append(getattr(v, name)() if self.as_methods else getattr(torch, name)(v))
        return (*outs, wide // 2, wide % 1.5)  # each output at its own parameters


@pytest.mark.parametrize("as_methods", [False, True], ids=["functions", "methods"])
def test_elementwise_math_of_one_tensor_is_a_table_each(as_methods, tmp_path):
    """YOLO-OBB's cos/sin of its angles and the rest of torch's one-tensor math run on integers,
    deploy bit-exact; the discontinuous ones (floor, round, sign) flip where an input rounds across
    a step, hence the lower SQNR bound."""
    torch.manual_seed(0)
    qmodel = quantize_whole(UnaryMath(as_methods).eval(), _data(), torch.randn(16, 3, 8, 8), tmp_path, min_sqnr=10)
    assert sum(isinstance(m, QLookup) for m in qmodel.modules()) >= len(UNARY_MATH) + 2
