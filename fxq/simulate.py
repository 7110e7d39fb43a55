"""`fxq.simulate`: the float twin of a quantized model, for looking at real-valued tensors.

Every value of the twin is the float64 ``s · (q − z)`` of the integer the quantized graph holds
at that point; each op that makes new integers is emulated in float and then snapped to its grid,
``x ↦ s·(clamp(round(x/s) + z, 0, 2^b − 1) − z)``, with the same parameters and the
same rounding (half away from zero).

Where the two may differ: the twin rescales by the real ``s_I·s_W/s_O`` where the integer graph
multiplies by the 31-bit fixed-point ``m·2^(shift−31)``, and float64 sums round where int32 sums
are exact. Both errors are ~10^-9 of a step, so a value differs only when it lands that close to
a rounding boundary (k + ½), where it moves by one step; such a flip rarely reaches a logit.
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxq import intmath
from fxq.affine import ActQParams, round_half_away
from fxq.graph import add_module_near, replace_module
from fxq.qmodules import Dequantize, QAdd, QAvgPool2d, QConv2d, QLayer, QLinear, QRequantize, Quantize
from passes.convert import META as QPARAMS


class SnapToGrid(nn.Module):
    """float → float: ``s·(clamp(round(x/s) + z, 0, 2^b − 1) − z)``, the value an integer holds."""

    def __init__(self, qparams: ActQParams):
        super().__init__()
        self.qparams = qparams

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.qparams.quantize(x)  # in x's own precision, as the integer graph's Quantize does
        return (q.to(torch.float64) - self.qparams.zero_point) * self.qparams.scale

    def extra_repr(self) -> str:
        return f"scale={self.qparams.scale:.6g}, zero_point={self.qparams.zero_point}, bits={self.qparams.bits}"


def _float_layer(m: QLayer) -> nn.Module:
    """The conv/linear, in float64, with its dequantized weight ``W_q·s_W`` and bias ``b_q·s_I·s_W``."""
    weight = m.weight.double() * m.weight_scale.reshape(-1, *([1] * (m.weight.dim() - 1)))
    bias = m.bias.double() * m.input_scale * m.weight_scale
    if isinstance(m, QConv2d):
        layer = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), m.stride,
                          m.padding, m.dilation)
    else:
        layer = nn.Linear(weight.shape[1], weight.shape[0])
    return _loaded(layer, weight, bias)


def _loaded(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    layer = layer.to(torch.float64).eval().requires_grad_(False)
    layer.weight.copy_(weight)
    layer.bias.copy_(bias)
    return layer


class FloatAvgPool(nn.Module):
    """Average pooling of real values on their grid: ``s·round(mean(x/s))``.

    The window mean of grid values is a multiple of 1/count, so its ties (k + ½) are exact and
    would be broken by float noise if the mean were formed from ``s·k`` and divided by ``s``
    again; taking the steps first (``round(x/s)``, exact) keeps the rounding rule's ties.
    """

    def __init__(self, pool: QAvgPool2d, qparams: ActQParams):
        super().__init__()
        self.kernel, self.stride, self.qparams = pool.kernel, pool.stride, qparams

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel or tuple(x.shape[-2:])
        steps = torch.round(x / self.qparams.scale)  # exact: x is s·k
        total = F.avg_pool2d(steps, kernel, self.stride or kernel, divisor_override=1)
        mean = total / (kernel[0] * kernel[1])  # one correctly rounded division: ties stay exact
        return round_half_away(mean) * self.qparams.scale


def simulate(qmodel: fx.GraphModule) -> fx.GraphModule:
    """A float twin of ``qmodel`` (which is left as it is): same graph, same names, float values."""
    twin = copy.deepcopy(qmodel)
    modules = dict(twin.named_modules())
    for node in list(twin.graph.nodes):
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, QRequantize):  # on values: a snap to the new grid
            replace_module(twin, node.target, SnapToGrid(node.meta[QPARAMS]))
            continue
        if isinstance(module, (Quantize, Dequantize)):
            replace_module(twin, node.target, SnapToGrid(module.qparams) if isinstance(module, Quantize)
                           else nn.Identity())
            continue
        if node.target is intmath.relu:  # max(q, z) on integers is max(x, 0) on their values
            node.target, node.args = torch.relu, node.args[:1]
            continue
        if isinstance(module, QAdd):
            node.op, node.target = "call_function", operator.add
        elif isinstance(module, (QConv2d, QLinear)):
            replace_module(twin, node.target, _float_layer(module))
        elif isinstance(module, QAvgPool2d):
            replace_module(twin, node.target, FloatAvgPool(module, node.meta[QPARAMS]))
            continue
        else:
            continue
        _snap_after(twin, node)
    twin.delete_all_unused_submodules()
    twin.graph.lint()
    twin.recompile()
    return twin


def _snap_after(twin: fx.GraphModule, node: fx.Node) -> None:
    leaf = node.target.rpartition(".")[2] if node.op == "call_module" else node.name
    path = add_module_near(twin, node, f"{leaf}_snap_to_grid", SnapToGrid(node.meta[QPARAMS]))
    with twin.graph.inserting_after(node):
        snapped = twin.graph.call_module(path, (node,))
    node.replace_all_uses_with(snapped, delete_user_cb=lambda user: user is not snapped)
