import operator

import torch
from torch import nn

import fxq
from fxq.ops.arithmetic import QAdd
from passes.quantize_add import quantize_add
from tests.helpers import Residual, module_types, node_values, ops, randomize_bn
from tests.test_pass_convert import converted


class TorchAdd(nn.Module):
    """torch.add(a, b) with both inputs from convs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return torch.add(self.a(x), self.b(x))


def test_float_island_becomes_one_integer_add(ctx):
    gm = converted(randomize_bn(Residual()), ctx)
    island = next(n for n in gm.graph.nodes if n.target in (operator.add, operator.iadd))
    quantized_sum = next(iter(island.users)).name  # the island's quantize of the float sum
    x = ctx.calib_loader[2]
    before = node_values(gm, x)[quantized_sum]
    gm = quantize_add(gm, ctx)
    assert QAdd in module_types(gm)
    assert all(t not in (operator.add, operator.iadd) for _, t in ops(gm))
    after = node_values(gm, x)[island.name]
    # one rounding of the exact rescaled sum instead of float dequantize + add + round: the
    # integers agree, or differ by one step where the float sum sat at a rounding boundary
    difference = (after.long() - before.long()).abs()
    assert after.dtype == torch.uint8 and difference.max() <= 1 and difference.float().mean() < 0.01


def test_integer_add_within_one_step_of_the_float_island(ctx):
    model = TorchAdd().eval()
    island = converted(model, ctx)
    x = ctx.calib_loader[0]
    integer = quantize_add(converted(model, ctx), ctx)
    assert "add" in dict(integer.named_children())
    step = integer.get_submodule("dequantize").scale.item()
    assert (integer(x) - island(x)).abs().max() <= step + 1e-6


def test_graph_without_adds_is_unchanged(ctx):
    gm = converted(nn.Sequential(nn.Conv2d(3, 3, 1)).eval(), ctx)
    code = gm.code
    assert quantize_add(gm, ctx).code == code


def test_add_output_is_uint8_and_named_after_its_block(ctx):
    qmodel = fxq.quantize(randomize_bn(Residual()), ctx.calib_loader)
    add = next(n for n in qmodel.graph.nodes if n.op == "call_module" and n.target.endswith("add"))
    assert add.target == "add"  # the Residual block is the root here
    assert qmodel.get_submodule("add").a_multiplier.dtype == torch.int64


def test_the_add_table_is_the_integer_add_for_every_pair_and_survives_reloading():
    from fxq.integers.affine import ActQParams
    qadd = QAdd(ActQParams(0.031, 100, 8), ActQParams(0.093, 20, 8), ActQParams(0.047, 60, 8), "add")
    a = torch.arange(256, dtype=torch.uint8).repeat_interleave(256)
    b = torch.arange(256, dtype=torch.uint8).repeat(256)
    assert torch.equal(qadd(a, b), qadd.compute(a, b))
    other = QAdd(ActQParams(0.5, 0, 8), ActQParams(0.5, 0, 8), ActQParams(1.0, 0, 8), "add")
    other.load_state_dict(qadd.state_dict())
    assert torch.equal(other(a, b), qadd.compute(a, b))
    assert "table" not in qadd.state_dict()  # derived, not stored
