import torch
from torch import nn

from fxq.graphs import records
from fxq.graphs.records import FusedUnit
from passes.fold_bn import fold_bn
from passes.fuse import fuse
from passes.trace import trace
from tests.helpers import ConvBnRelu, Residual, randomize_bn


def nodes_by_name(gm):
    return {n.name: n for n in gm.graph.nodes}


def test_conv_relu_is_grouped_into_one_unit(ctx):
    gm = fuse(fold_bn(trace(randomize_bn(ConvBnRelu()), ctx), ctx), ctx)
    nodes = nodes_by_name(gm)
    unit = records.get(nodes["conv"], FusedUnit)
    assert unit == FusedUnit(nodes["conv"], nodes["relu"]) and records.get(nodes["relu"], FusedUnit) is unit


def test_add_relu_is_a_unit_and_the_graph_computes_the_same(ctx):
    model = randomize_bn(Residual())
    gm = fold_bn(trace(model, ctx), ctx)
    x = torch.randn(2, 3, 8, 8)
    before = gm(x)
    gm = fuse(gm, ctx)
    units = {records.get(n, FusedUnit) for n in gm.graph.nodes if records.has(n, FusedUnit)}
    assert {(u.producer.name, u.activation.name) for u in units} == {
        ("unit_conv", "unit_relu"), ("add", "relu")}
    assert torch.equal(gm(x), before)


class SharedPreActivation(nn.Module):
    """conv output read by the relu and by a residual add: no unit."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(y) + y


def test_producer_with_other_users_is_not_fused(ctx):
    gm = fuse(trace(SharedPreActivation(), ctx), ctx)
    assert not any(records.has(n, FusedUnit) for n in gm.graph.nodes)


def test_relu_after_a_pool_is_not_a_unit(ctx):
    gm = fuse(trace(nn.Sequential(nn.MaxPool2d(2), nn.ReLU()), ctx), ctx)
    assert not any(records.has(n, FusedUnit) for n in gm.graph.nodes)
