"""Ops joining tensors: the residual add, the difference, product and quotient of two tensors,
concatenation."""
from __future__ import annotations

import math
import operator

import torch
from torch import fx, nn

from fxq.config import Rounding
from fxq.files import schema as sc
from fxq.files.schema import Schema
from fxq.graphs import records
from fxq.graphs.qmodules import NotRepresentable
from fxq.integers import intmath
from fxq.integers.affine import ActQParams
from fxq.ops.base import KeepInFloat, Lowering, Op, Output, hold_parameters, leaf_name, output_qparams, qparams_of
from fxq.ops.fallback import lower_in_float
from fxq.ops.joins import PairOp, QCat, QMul


class QAdd(PairOp):
    """uint8 + uint8 → uint8: ``clamp(z_O + round(M_A·(A_q − z_A) + M_B·(B_q − z_B)))``.

    Inputs of up to 8 bits take at most 2^8 values each, so the op is evaluated once for every
    pair with `fxq.integers.intmath.add` when it is built, and then runs as a lookup in that table (64 KiB
    at 8 bits): the same integers, an order of magnitude fewer passes over the tensors.
    """

    schema = Schema({"input_bits": lambda v: sc.bits_tuple(v) and len(v) == 2, "output_bits": sc.act_bits,
                     "requantize_as": sc.REQUANTIZE},
                    {**{f"{p}_{f}": torch.int64 for p in "ab" for f in ("zero_point", "multiplier", "shift")},
                     "output_zero_point": torch.int64, "scales": torch.float64},
                    ranges=lambda m: m.check_ranges())

    def __init__(self, a: ActQParams, b: ActQParams, out: ActQParams, name: str,
                 rounding: Rounding = Rounding.FIXED_POINT):
        super().__init__()
        self.requantize_as = Rounding(rounding)  # onnxruntime's: QLinearAdd's float32 arithmetic
        operands = [intmath.AddOperand.rescale(p.zero_point, p.scale, out.scale, p.bits) for p in (a, b)]
        gap = intmath.add_max_shift_gap(max(a.bits, b.bits))
        if intmath.add_shift_gap(*operands) > gap:
            raise NotRepresentable(f"{name}: the two inputs' scales ({a.scale:.3g}, {b.scale:.3g}) differ by "
                             f"more than 2^{gap}, beyond what the int64 sum holds at these widths: "
                             "check the calibration data, or keep the block in float with overrides")
        self.input_bits, self.output_bits = (a.bits, b.bits), out.bits
        for prefix, operand in zip("ab", operands):
            for field in ("zero_point", "multiplier", "shift"):
                self.register_buffer(f"{prefix}_{field}", torch.tensor(getattr(operand, field)))
        self.register_buffer("output_zero_point", torch.tensor(out.zero_point))
        self.register_buffer("scales", torch.tensor([a.scale, b.scale, out.scale], dtype=torch.float64))
        self.prepare()

    def operand(self, prefix: str) -> intmath.AddOperand:
        return intmath.AddOperand(*(int(getattr(self, f"{prefix}_{f}"))
                                    for f in ("zero_point", "multiplier", "shift")))

    def compute(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The integer add itself (`fxq.integers.intmath.add`, or `~.runtime_add`), without the table."""
        if self.requantize_as is Rounding.ONNXRUNTIME:
            zero_points = (int(self.a_zero_point), int(self.b_zero_point), int(self.output_zero_point))
            return intmath.runtime_add(a, b, tuple(self.scales.tolist()), zero_points, (1 << self.output_bits) - 1)
        return intmath.add(a, b, self.operand("a"), self.operand("b"), int(self.output_zero_point),
                           (1 << self.output_bits) - 1)

    def check_ranges(self) -> None:
        for prefix, bits in zip("ab", self.input_bits):
            sc.zero_point_fits(self, f"{prefix}_zero_point", bits)
            sc.fixed_point_fits(getattr(self, f"{prefix}_multiplier"), getattr(self, f"{prefix}_shift"), prefix)
        sc.zero_point_fits(self, "output_zero_point", self.output_bits)

    def to_onnx(self, b, node, inputs):
        """DequantizeLinear ×2 → Add → QuantizeLinear, which onnxruntime fuses into QLinearAdd."""
        if not self.tabulated:
            raise ValueError(f"node '{node.name}': adds of 16-bit inputs do not export yet")
        operands = [records.get(a, ActQParams) for a in node.args[:2]]
        return _onnx_add(b, inputs, operands, records.get(node, ActQParams), node.name)


def _onnx_add(b, inputs: list[str], qparams: list[ActQParams], out: ActQParams, name: str) -> str:
    """DequantizeLinear ×2 → Add → QuantizeLinear, which onnxruntime fuses into QLinearAdd."""
    values = [b.dequantize(q, qp, f"{name}_{i}") for i, (q, qp) in enumerate(zip(inputs, qparams))]
    return b.quantize(b.node("Add", values, f"{name}_sum"), out, name)


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
         accepts=_adds_two_tensors, integer_modules=(QAdd,), absorbs_activation=True, residual_join=True,
         example=lambda: lambda x: x + x.flip(0))


def _two_tensors(node: fx.Node, module: nn.Module | None) -> str | None:
    if len(node.args) == 2 and all(map(_computed, node.args)) and not node.kwargs:
        return None
    return "a product with a constant, or with keyword arguments"


def lower_mul(lo: Lowering, node: fx.Node) -> None:
    """``a * b`` → ``QMul(a_q, b_q)``: the centred product, requantized once."""
    a, b = node.args
    qparams = [qparams_of(a, node), qparams_of(b, node), output_qparams(node)]
    lo.become(node, QMul(*qparams, f"the product {node.name}", lo.rounding), leaf_name(node), (a, b))


class QSub(PairOp):
    """uint8 − uint8 → uint8: ``clamp(z_O + round(M_A·(A_q − z_A) − M_B·(B_q − z_B)))``, the add's
    arithmetic (`fxq.integers.intmath.add`) with B reflected about its zero point (``2·z_B − B_q``); it runs,
    and exports, as the table of every input pair, so both roundings give the same integers."""

    schema = Schema({"input_bits": lambda v: sc.bits_tuple(v) and len(v) == 2, "output_bits": sc.act_bits},
                    {"zero_points": torch.int64, "multipliers": torch.int64, "shifts": torch.int64},
                    ranges=lambda m: m.check_ranges())

    def __init__(self, a: ActQParams, b: ActQParams, out: ActQParams, name: str):
        super().__init__()
        operands = [intmath.AddOperand.rescale(p.zero_point, p.scale, out.scale, p.bits) for p in (a, b)]
        gap = intmath.add_max_shift_gap(max(a.bits, b.bits))
        if intmath.add_shift_gap(*operands) > gap:
            raise NotRepresentable(f"{name}: the two inputs' scales ({a.scale:.3g}, {b.scale:.3g}) differ by "
                                   f"more than 2^{gap}, beyond what the int64 difference holds at these widths")
        self.input_bits, self.output_bits = (a.bits, b.bits), out.bits
        self.register_buffer("zero_points", torch.tensor([a.zero_point, b.zero_point, out.zero_point]))
        self.register_buffer("multipliers", torch.tensor([o.multiplier for o in operands]))
        self.register_buffer("shifts", torch.tensor([o.shift for o in operands]))
        self.prepare()

    def compute(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The integer difference itself, without the table."""
        za, zb, zo = (int(z) for z in self.zero_points)
        first, second = (intmath.AddOperand(z, int(m), int(s)) for z, m, s in
                         zip((za, zb), self.multipliers, self.shifts))
        return intmath.add(a, 2 * zb - b.to(torch.int64), first, second, zo, (1 << self.output_bits) - 1)

    def check_ranges(self) -> None:
        sc.expect(self.zero_points.shape == (3,) and self.multipliers.shape == self.shifts.shape == (2,),
                  "three zero points (a, b, the output), two multipliers and shifts")
        for z, bits in zip(self.zero_points.tolist(), self.input_bits + (self.output_bits,)):
            sc.expect(0 <= z < (1 << bits), "a zero point is outside its width")
        for m, shift in zip(self.multipliers, self.shifts):
            sc.fixed_point_fits(m, shift, "an operand's")
        sc.expect(intmath.add_shift_gap(*(intmath.AddOperand(0, int(m), int(s)) for m, s in
                                          zip(self.multipliers, self.shifts)))
                  <= intmath.add_max_shift_gap(max(self.input_bits)), "the operands' scales are too far apart")


def lower_sub(lo: Lowering, node: fx.Node) -> None:
    """``a − b`` → ``QSub(a_q, b_q)``: both rescaled to the output scale, one rounding."""
    a, b = node.args
    qparams = [qparams_of(a, node), qparams_of(b, node), output_qparams(node)]
    lo.become(node, QSub(*qparams, f"the difference {node.name}"), leaf_name(node), (a, b))


class QQuotient(PairOp):
    """uint8 / uint8 → uint8: ``quantize_O(dequantize_A(A_q) / dequantize_B(B_q))`` in float64 for
    every input pair, once (ConvNeXt-V2's response norm divides by a channel mean). A zero
    divisor gives the output's end of the sign of A (0 for 0/0). Only the table runs and exports,
    so every runtime gives the same integers; inputs wider than 8 bits compute it."""

    schema = Schema({"input_bits": lambda v: sc.bits_tuple(v) and len(v) == 2, "output_bits": sc.act_bits},
                    {"scales": torch.float64, "zero_points": torch.int64}, ranges=lambda m: m.check_ranges())

    def __init__(self, a: ActQParams, b: ActQParams, out: ActQParams):
        super().__init__()
        self.input_bits, self.output_bits = (a.bits, b.bits), out.bits
        hold_parameters(self, a, b, out, zero_point_dtype=torch.int64)
        self.prepare()

    def compute(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        (sa, sb, so), (za, zb, zo) = self.scales.tolist(), self.zero_points.tolist()
        quotient = (sa * (a.to(torch.float64) - za)) / (sb * (b.to(torch.float64) - zb))
        out = ActQParams(so, zo, self.output_bits)
        return out.quantize(torch.nan_to_num(quotient, nan=0.0, posinf=math.inf, neginf=-math.inf))

    def check_ranges(self) -> None:
        sc.parameters_fit(self, self.input_bits + (self.output_bits,))


def lower_quotient(lo: Lowering, node: fx.Node) -> None:
    """``a / b`` → ``QQuotient(a_q, b_q)``: the quantized quotient of every input pair."""
    a, b = node.args
    qparams = [qparams_of(a, node), qparams_of(b, node), output_qparams(node)]
    lo.become(node, QQuotient(*qparams), leaf_name(node), (a, b))


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
SUB = Op("sub", "both inputs rescaled to the output scale, B's reflected, one rounding (a lookup in the "
         "table of every input pair)", lower_sub, Output.OWN, functions=(operator.sub, operator.isub, torch.sub),
         methods=("sub", "sub_"), accepts=_two_tensors, integer_modules=(QSub,),
         example=lambda: lambda x: x - x.flip(0))
DIV = Op("div", "the quotient of two tensors: a lookup in the table of every input pair", lower_quotient,
         Output.OWN, functions=(operator.truediv, torch.div), methods=("div", "div_"), accepts=_two_tensors,
         integer_modules=(QQuotient,), example=lambda: lambda x: x / (x.flip(0).abs() + 0.5))
CAT = Op("cat", "each input moved to the output's parameters, then joined", lower_cat, Output.OWN,
         functions=(torch.cat, torch.concat, torch.concatenate), accepts=_a_list_of_tensors,
         integer_modules=(QCat,), concatenates=True, example=lambda: lambda x: torch.cat([x, x.flip(0)], 1))
OPS = (ADD, SUB, MUL, DIV, CAT)
