"""Ops joining tensors: the residual add, the product of two tensors, concatenation."""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from fxq import records
from fxq.affine import ActQParams
from fxq.ops.base import KeepInFloat, Lowering, Op, Output, leaf_name, output_qparams, qparams_of
from fxq.ops.fallback import lower_in_float
from fxq.ops.joins import QCat, QMul
from fxq.qmodules import QAdd


def _computed(value) -> bool:
    """A tensor the network computes (not a constant: a number, or a parameter read by get_attr)."""
    return isinstance(value, fx.Node) and value.op != "get_attr"


def _adds_two_tensors(node: fx.Node, module: nn.Module | None) -> str | None:
    if len(node.args) == 2 and all(map(_computed, node.args)) and node.kwargs.get("alpha", 1) == 1:
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
def _two_tensors(node: fx.Node, module: nn.Module | None) -> str | None:
    if len(node.args) == 2 and all(map(_computed, node.args)) and not node.kwargs:
        return None
    return "a product with a constant, or with keyword arguments"


def lower_mul(lo: Lowering, node: fx.Node) -> None:
    """``a * b`` → ``QMul(a_q, b_q)``: the centred product, requantized once."""
    a, b = node.args
    qparams = [qparams_of(a, node), qparams_of(b, node), output_qparams(node)]
    lo.become(node, QMul(*qparams, f"the product {node.name}"), leaf_name(node), (a, b))


def _tensors_and_dim(node: fx.Node) -> tuple[list, object]:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return (list(tensors) if isinstance(tensors, (list, tuple)) else []), dim


def _a_list_of_tensors(node: fx.Node, module: nn.Module | None) -> str | None:
    tensors, dim = _tensors_and_dim(node)
    if tensors and all(isinstance(t, fx.Node) for t in tensors) and isinstance(dim, int):
        return None
    return "a concatenation of something other than a list of tensors"


def lower_cat(lo: Lowering, node: fx.Node) -> None:
    """``torch.cat([a, b], dim)`` → ``QCat(a_q, b_q)``: each input moved to the output's
    parameters, then joined."""
    tensors, dim = _tensors_and_dim(node)
    inputs = [qparams_of(t, node) for t in tensors]
    out = records.get(node, ActQParams)
    if out is None:
        raise KeepInFloat("its output was never a float tensor during calibration")
    lo.become(node, QCat(inputs, out, dim), leaf_name(node), tuple(tensors))


MUL = Op("mul", "the centred product of two tensors, requantized once (a lookup in the table of "
         "every input pair)", lower_mul, Output.OWN, functions=(operator.mul, torch.mul),
         methods=("mul", "mul_"), accepts=_two_tensors, integer_modules=(QMul,),
         example=lambda: lambda x: x * x.flip(0))
CAT = Op("cat", "each input moved to the output's parameters, then joined", lower_cat, Output.OWN,
         functions=(torch.cat, torch.concat, torch.concatenate), accepts=_a_list_of_tensors,
         integer_modules=(QCat,), example=lambda: lambda x: torch.cat([x, x.flip(0)], 1))
OPS = (ADD, MUL, CAT)
