"""`fxq.simulate`: the float twin of a quantized model, for looking at real-valued tensors.

Every value of the twin is the float64 ``s · (q − z)`` of the integer the quantized graph holds
at that point, and the twin agrees with the integer graph bit for bit (``twin(x)`` equals
``qmodel(x)`` up to the last dequantization's float32 rounding). It gets there by another road:

    integer graph                              twin
    im2col + int8 GEMM (torch._int_mm)         float64 conv2d/linear on the values' steps
                                               (q − z) and the integer weights: exact, every
                                               partial sum is an integer below 2^53
    requantize, add, requantize tables         the same `fxq.integers.intmath` formula, on int64
    max(q, z), max-pool on integers            relu, max-pool on values (monotone maps)
    integer window sum, rounding division      float64 window sum of steps, one division

so a disagreement points at the integer kernels (layout, padding, stride, the GEMM), while the
rounding rule is written once. A value's integer is recovered as ``round(x / s)``: exact, since
``x / s`` is within one ulp of an integer below 2^17.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxq.graphs import records
from fxq.graphs.graph import replace_module
from fxq.integers.affine import ActQParams, round_half_away


class SnapToGrid(nn.Module):
    """float → float: ``s·(clamp(round(x/s) + z, 0, 2^b − 1) − z)``, the value an integer holds."""

    def __init__(self, qparams: ActQParams, half_even: bool = False):
        super().__init__()
        self.qparams, self.half_even = qparams, half_even

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in the precision the integer graph's Quantize uses, so both round the same way
        q = self.qparams.quantize(x.to(torch.promote_types(x.dtype, torch.float32)), self.half_even)
        return _values(q, self.qparams)

    def extra_repr(self) -> str:
        return f"scale={self.qparams.scale:.6g}, zero_point={self.qparams.zero_point}, bits={self.qparams.bits}"


def _values(q: torch.Tensor, qp: ActQParams) -> torch.Tensor:
    return (q.to(torch.float64) - qp.zero_point) * qp.scale


def _steps(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``q − z`` of a value ``x = s·(q − z)``, as float64 integers."""
    return torch.round(x.to(torch.float64) / scale)


class FloatLayer(nn.Module):
    """A weighted layer in float64 on ``q − z_I`` with the integer weights and bias: the accumulator
    of formula (1), exact, then formula (2) with the layer's own fixed-point multiplier."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.layer
        centred = _steps(x, float(m.input_scale))
        acc, positions = m.as_positions(m.float_op(centred, m.weight.to(torch.float64), m.bias.to(torch.float64)))
        return _values(m.to_output(m.requantize(acc.to(torch.int64)), positions), m.output_qparams)


class OnIntegers(nn.Module):
    """Recovers each input value's integer, runs ``compute`` (an integer kernel) and returns values.
    Arguments past the quantized inputs (a size read from a shape) are handed on as they are."""

    def __init__(self, compute, inputs: list[ActQParams], output: ActQParams):
        super().__init__()
        self.compute, self.inputs, self.output = compute, inputs, output

    def forward(self, *values: torch.Tensor) -> torch.Tensor:
        integers = [(_steps(v, qp.scale) + qp.zero_point).to(torch.int64)
                    for v, qp in zip(values, self.inputs)]
        return _values(self.compute(*integers, *values[len(self.inputs):]), self.output)


def on_integers(compute, node: fx.Node) -> nn.Module:
    """The twin of an integer kernel of ``node``'s inputs: run it on the integers they stand for."""
    inputs = [records.get(a, ActQParams) for a in node.args]
    return OnIntegers(compute, inputs, records.get(node, ActQParams))


class FromIntegers(nn.Module):
    """Recovers the integer a value stands for and runs ``module`` on it: where the integer graph
    leaves integers (a dequantize before a float op), the twin hands on the very same floats."""

    def __init__(self, module: nn.Module, qparams: ActQParams):
        super().__init__()
        self.module, self.qparams = module, qparams

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module((_steps(x, self.qparams.scale) + self.qparams.zero_point).to(torch.int64))


class FloatAvgPool(nn.Module):
    """Average pooling of real values on their grid, by torch's own float pooling with the
    layer's parameters: ``s·round(avg_pool(x/s))``.

    The window mean of grid values is a multiple of 1/divisor, so its ties (k + ½) are exact and
    would be broken by float noise if the mean were formed from ``s·k`` and divided by ``s``
    again; taking the steps first (``round(x/s)``, exact) keeps the rounding rule's ties.
    """

    def __init__(self, pool: nn.Module, qparams: ActQParams):
        super().__init__()
        self.pool, self.qparams = pool, qparams

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pool
        steps = _steps(x, self.qparams.scale)
        if p.kind == "adaptive":
            size = [s if o is None else o for o, s in zip(p.output_size, x.shape[-2:])]
            mean = F.adaptive_avg_pool2d(steps, size)
        else:
            mean = F.avg_pool2d(steps, p.kernel, p.stride, p.padding, p.ceil_mode, p.count_include_pad,
                                p.divisor_override)
        low, high = -self.qparams.zero_point, self.qparams.qmax - self.qparams.zero_point
        out = round_half_away(mean).clamp_(low, high) * self.qparams.scale
        return out if p.keepdim else out.reshape(out.shape[:-2])


def simulate(qmodel: fx.GraphModule) -> fx.GraphModule:
    """A float twin of ``qmodel`` (which is left as it is): same graph, same names, float values.

    Each integer module of the graph names its own twin (``module.twin(node)``, a facet of its
    op's registry entry, `fxq.ops`); calls the integer graph keeps as they are (view, flatten,
    max-pool on integers, float ops between dequantize and quantize) mean the same on values.
    """
    twin = copy.deepcopy(qmodel)
    for node in list(twin.graph.nodes):
        module = twin.get_submodule(node.target) if node.op == "call_module" else None
        if module is not None and hasattr(module, "twin"):
            replace_module(twin, node.target, module.twin(node))
    twin.delete_all_unused_submodules()
    twin.graph.lint()
    twin.recompile()
    return twin
