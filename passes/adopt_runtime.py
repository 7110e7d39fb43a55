"""adopt_runtime: the integer graph computes exactly what onnxruntime's int8 kernels compute."""
from __future__ import annotations

from torch import fx

from fxq.context import PassContext
from fxq.ops.arithmetic import QAdd
from fxq.ops.layers import QLayer
from fxq.ops.pooling import QAvgPool2d
from fxq.qmodules import Derived, Quantize

ADOPTERS = (QLayer, QAdd, QAvgPool2d, Quantize)


def adopt_runtime(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """With ``QConfig.requantize="onnxruntime"``; otherwise ``gm`` is returned as it is.

    Before: ``QConv2d``/``QLinear`` requantize with a fixed-point multiplier (ties away from
    zero), ``QAdd`` is the table of the fixed-point add, a global ``QAvgPool2d`` divides exactly
    and rounds ties away from zero, as ``Quantize`` does.
    After: the same modules, the same integers, scales and zero points, computing what
    onnxruntime runs for their ONNX form (`fxq.export_onnx`): a float32 multiplier per channel
    rounded half to even, QLinearAdd's float32 fused multiply-adds, QLinearGlobalAveragePool's
    float32 1/N, QuantizeLinear's ties to even (`fxq.intmath.runtime_requantize`, `runtime_add`,
    `runtime_global_mean`). Every other integer op already exports
    as the very table or integer op fxq runs, so `fxq.deploy` of the result is bit-exact.
    """
    if ctx.config.requantize != "onnxruntime":
        return gm
    for module in gm.modules():
        if isinstance(module, ADOPTERS):
            module.requantize_as = "onnxruntime"
            if isinstance(module, Derived):
                module.prepare()
    return gm
