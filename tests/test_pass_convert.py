import torch
from torch import nn

from fxq.graphs import records
from fxq.graphs.qmodules import Dequantize, Quantize
from fxq.integers.affine import ActQParams
from fxq.ops.activations import QReLU
from fxq.ops.layers import QConv2d, QLinear
from fxq.ops.pooling import QAvgPool2d
from passes.calibrate import calibrate
from passes.convert import convert
from passes.fold_bn import fold_bn
from passes.fuse import fuse
from passes.insert_observers import insert_observers
from passes.trace import trace
from tests.helpers import ConvBnRelu, Residual, module_types, ops, randomize_bn


def converted(model, ctx):
    gm = model
    for step in (trace, fold_bn, fuse, insert_observers, calibrate, convert):
        gm = step(gm, ctx)
    return gm


def test_conv_relu_becomes_quantize_qconv_integer_relu_dequantize(ctx):
    gm = converted(randomize_bn(ConvBnRelu()), ctx)
    assert ops(gm) == [("call_module", Quantize), ("call_module", QConv2d),
                       ("call_module", QReLU), ("call_module", Dequantize)]
    conv = gm.get_submodule("conv")
    assert conv.weight.dtype == torch.int8 and conv.bias.dtype == torch.int32
    assert conv.multiplier.dtype == torch.int32
    relu = next(n for n in gm.graph.nodes if n.target == "relu")
    assert relu.name == "relu"
    assert int(gm.get_submodule("relu").zero_point) == records.get(relu.args[0], ActQParams).zero_point


def test_converted_conv_is_within_one_step_of_float_fake_quantization(ctx):
    model = randomize_bn(ConvBnRelu())
    gm = converted(model, ctx)
    x = ctx.calib_loader[0]
    in_qp = gm.get_submodule("quantize_x").qparams
    conv = gm.get_submodule("conv")
    out_qp = records.get(next(n for n in gm.graph.nodes if n.name == "conv"), ActQParams)
    # float reference: the same integers, the real multiplier, float arithmetic
    w = conv.weight.double() * conv.weight_scale.reshape(-1, 1, 1, 1)
    b = conv.bias.double() * in_qp.scale * conv.weight_scale
    x_hat = in_qp.dequantize(in_qp.quantize(x)).double()
    y = torch.nn.functional.conv2d(x_hat, w, b, padding=1)
    expected = torch.clamp(torch.round(y / out_qp.scale) + out_qp.zero_point, 0, 255)
    got = conv(in_qp.quantize(x))
    assert got.dtype == torch.uint8
    assert (got.double() - expected).abs().max() <= 1


def test_every_value_between_quantize_and_dequantize_is_uint8(ctx):
    gm = converted(randomize_bn(Residual()), ctx)
    seen = {}

    class Spy(torch.fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n.op != "output":
                seen[n.name] = result.dtype if isinstance(result, torch.Tensor) else None
            return result

    Spy(gm).run(ctx.calib_loader[0])
    float_nodes = {name for name, dtype in seen.items() if dtype == torch.float32}
    # only the network input, the dequantized operands of the add island and its float sum
    assert float_nodes == {"x", "add_dequantize", "add_dequantize_1", "add", "dequantize"}
    assert module_types(gm).count(QAvgPool2d) == 1 and module_types(gm).count(QLinear) == 1


def test_converted_graph_tracks_the_float_model(ctx):
    model = randomize_bn(Residual())
    gm = converted(model, ctx)
    x = ctx.calib_loader[1]
    assert (gm(x) - model(x)).abs().max() < 0.1 * model(x).abs().max()


def test_identity_and_dropout_disappear(ctx):
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Identity(), nn.Dropout(), nn.ReLU()).eval()
    assert ops(converted(model, ctx)) == [("call_module", Quantize), ("call_module", QConv2d),
                                          ("call_module", QReLU), ("call_module", Dequantize)]
