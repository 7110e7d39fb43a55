"""placement="pre" | "post" | "both": where a fused conv/add → ReLU unit is quantized."""
import pytest
import torch

import fxq
from fxq.graphs import records
from fxq.graphs.qmodules import Dequantize, Quantize
from fxq.integers.affine import ActQParams
from fxq.ops.activations import QReLU, QRequantize
from fxq.ops.arithmetic import QAdd
from fxq.ops.layers import QConv2d, QLinear
from tests.helpers import ConvBnRelu, Residual, ops, randomize_bn


def _quantize(model, placement, bits=8):
    torch.manual_seed(0)
    calib = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    config = fxq.QConfig(act_bits=bits, placement=placement)
    return fxq.quantize(model, calib, config), calib


def test_post_fuses_the_relu_into_the_conv_clamp_at_zero_point_zero():
    gm, _ = _quantize(randomize_bn(ConvBnRelu()), "post")
    assert ops(gm) == [("call_module", Quantize), ("call_module", QConv2d), ("call_module", Dequantize)]
    conv = next(n for n in gm.graph.nodes if n.name == "conv")
    assert records.get(conv, ActQParams).zero_point == 0


def test_both_quantizes_before_and_after_the_relu():
    gm, _ = _quantize(randomize_bn(ConvBnRelu()), "both")
    assert ops(gm) == [("call_module", Quantize), ("call_module", QConv2d),
                       ("call_module", QReLU), ("call_module", QRequantize),
                       ("call_module", Dequantize)]
    conv = next(n for n in gm.graph.nodes if n.name == "conv")
    after = gm.get_submodule("relu_requantize")
    assert records.get(conv, ActQParams).zero_point > 0 and int(after.output_zero_point) == 0


@pytest.mark.parametrize("placement", ["pre", "post", "both"])
def test_every_placement_tracks_the_float_residual_network(placement):
    model = randomize_bn(Residual())
    gm, calib = _quantize(model, placement)
    x = calib[0]
    with torch.no_grad():
        expected, got = model.eval()(x), gm(x)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_pre_and_post_spend_no_levels_on_what_the_relu_drops():
    """A ReLU maps every negative value to 0 whatever its integer: "pre" chooses the conv output's
    range on what the ReLU keeps, so it gets all 2^b levels for them as "post" does; "both" keeps
    the pre-activation value's own, wider grid (about half its levels below zero)."""
    model = randomize_bn(ConvBnRelu())
    qp = {}
    for placement in ("pre", "post", "both"):
        gm, _ = _quantize(model, placement, bits=4)
        qp[placement] = records.get(next(n for n in gm.graph.nodes if n.name == "conv"), ActQParams)
    assert qp["pre"].zero_point == qp["post"].zero_point == 0 < qp["both"].zero_point
    assert abs(qp["pre"].scale / qp["post"].scale - 1) < 0.1
    assert qp["post"].scale < 0.75 * qp["both"].scale


def test_residual_add_relu_follows_the_placement():
    gm, _ = _quantize(randomize_bn(Residual()), "post")
    add = next(n for n in gm.graph.nodes
               if n.op == "call_module" and isinstance(gm.get_submodule(n.target), QAdd))
    assert records.get(add, ActQParams).zero_point == 0
    assert not any(isinstance(m, QReLU) for m in gm.modules())
    assert isinstance(gm.get_submodule("fc"), QLinear)


def test_requantize_table_matches_the_integer_formula():
    before = fxq.integers.affine.ActQParams(0.05, 100, 8)
    after = fxq.integers.affine.ActQParams(0.03, 0, 8)
    op = QRequantize(before, after)
    q = torch.arange(256, dtype=torch.uint8)
    expected = torch.clamp(torch.round((q.double() - 100) * 0.05 / 0.03), 0, 255)
    assert torch.equal(op(q), op.compute(q))
    assert (op(q).double() - expected).abs().max() == 0
