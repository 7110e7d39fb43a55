"""fxq.simulate: the float twin tracks the integer graph."""
import pytest
import torch

import fxq
from fxq.graphs.twin import FloatLayer, SnapToGrid
from fxq.ops.layers import QConv2d
from tests.helpers import Residual, output_steps, randomize_bn


def test_twin_has_the_same_layers_in_float_and_leaves_the_integer_model_alone(ctx):
    qmodel = fxq.quantize(randomize_bn(Residual()), ctx.calib_loader)
    code = qmodel.code
    twin = fxq.simulate(qmodel)
    assert qmodel.code == code and isinstance(qmodel.get_submodule("unit.conv"), QConv2d)
    assert type(twin.get_submodule("unit.conv")) is FloatLayer
    assert any(isinstance(m, SnapToGrid) for m in twin.modules())
    values = {}

    class Spy(torch.fx.Interpreter):
        def run_node(self, n):
            values[n.name] = super().run_node(n)
            return values[n.name]

    Spy(twin).run(ctx.calib_loader[0])
    assert all(v.is_floating_point() for v in values.values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("requantize", ["fixed_point", "onnxruntime"])
def test_twin_matches_the_integer_graph_bit_for_bit(ctx, requantize):
    qmodel = fxq.quantize(randomize_bn(Residual()), ctx.calib_loader, fxq.QConfig(requantize=requantize))
    twin = fxq.simulate(qmodel)
    for x in ctx.calib_loader + [10 * torch.randn(16, 3, 8, 8)]:
        integer, simulated = output_steps(qmodel, twin, x)
        assert torch.equal(integer, simulated)


def test_snap_to_grid_rounds_half_away_like_requantization():
    from fxq.integers.affine import ActQParams
    fq = SnapToGrid(ActQParams(0.5, 10, 8))
    x = torch.tensor([0.25, -0.25, 0.75], dtype=torch.float64)  # ±0.5 and 1.5 steps
    assert fq(x).tolist() == [0.5, -0.5, 1.0]
