"""Ops of two tensors: the residual add."""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from fxq.ops.base import Lowering, Op, Output, output_qparams, qparams_of
from fxq.ops.fallback import lower_in_float
from fxq.qmodules import QAdd


def _adds_two_tensors(node: fx.Node, module: nn.Module | None) -> str | None:
    if len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args) and node.kwargs.get("alpha", 1) == 1:
        return None
    return "an add of a tensor and a constant, or with alpha"


def lower_add(lo: Lowering, node: fx.Node) -> None:
    """``a + b`` → ``quantize(dequantize(a) + dequantize(b))``, the island `passes.quantize_add`
    turns into one ``QAdd``."""
    for operand in node.args:
        qparams_of(operand, node)
    output_qparams(node)  # with placement "post", the ReLU's after it
    lower_in_float(lo, node, None)


ADD = Op("add", "both inputs rescaled to the output scale with their own fixed-point multipliers, "
         "one rounding (a lookup in the table of every input pair)", lower_add, Output.OWN,
         functions=(operator.add, operator.iadd, torch.add), methods=("add", "add_"),
         accepts=_adds_two_tensors, integer_modules=(QAdd,), absorbs_activation=True,
         example=lambda: lambda x: x + x.flip(0))
OPS = (ADD,)
