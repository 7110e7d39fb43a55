"""Layers with weights: conv and linear become int8 GEMMs with fixed-point requantization."""
from __future__ import annotations

from torch import fx, nn

from fxq import records
from fxq.ops.base import Lowering, Op, Output, output_qparams, qparams_of
from fxq.qmodules import QConv2d, QLinear, explicit_padding


def _conv_accepts(node: fx.Node, conv: nn.Conv2d) -> str | None:
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only zero padding has an integer form)"
    try:
        explicit_padding(conv)
    except ValueError as error:
        return str(error)
    return None


def lower_layer(lo: Lowering, node: fx.Node) -> None:
    """``conv(x)`` → ``QConv2d(q)``: int8 weight, int32 bias and accumulator, requantized output."""
    input_qp = qparams_of(node.args[0], node)
    layer = lo.modules[node.target]
    weights = records.get(node, records.QuantizedWeight)
    make = QConv2d if isinstance(layer, nn.Conv2d) else QLinear
    lo.become(node, make(layer, weights, input_qp, output_qparams(node), node.target),
              node.target, node.args[:1])


CONV = Op("conv2d", "int8 GEMM on im2col columns, int32 accumulator, fixed-point requantization",
          lower_layer, Output.OWN, modules=(nn.Conv2d,), accepts=_conv_accepts,
          integer_modules=(QConv2d,), absorbs_activation=True, weighted=True,
          example=lambda: nn.Conv2d(4, 4, 3, padding=1))
LINEAR = Op("linear", "int8 GEMM, int32 accumulator, fixed-point requantization",
            lower_layer, Output.OWN, modules=(nn.Linear,), integer_modules=(QLinear,),
            absorbs_activation=True, weighted=True, example=lambda: nn.Linear(8, 8))
OPS = (CONV, LINEAR)
