"""Integer modules of one input integer: a clamp at the input's scale, and a lookup table."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from fxq.files import schema as sc
from fxq.files.schema import Schema
from fxq.graphs import records
from fxq.graphs.qmodules import Derived
from fxq.graphs.twin import OnIntegers
from fxq.integers.affine import ActQParams, round_half_away
from fxq.integers.intmath import lookup, storage_dtype
from fxq.ops.base import hold_parameters


def _per_channel(bound: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scalar bound as it is; one bound per channel shaped to broadcast along dim 1 of ``x``."""
    return bound if bound.dim() == 0 else bound.reshape(-1, *([1] * (x.dim() - 2)))


class QClamp(nn.Module):
    """uint8 → uint8 ``clamp(q, low, high)`` at the input's scale: ReLU6, Hardtanh, clamp, and
    the per-channel clamps cross-layer equalization makes of them (one bound per channel of dim 1).

    The bounds are the real bounds rounded to the grid, ``z + round(b / s)``: for a value on the
    grid this is exactly ``quantize(clamp(dequantize(q)))`` (a grid value below the rounded
    bound is below the real one, and one above it is above the real one).
    """

    schema = Schema({}, {"low": torch.int32, "high": torch.int32}, ranges=lambda m: m.check_ranges())

    def __init__(self, low: torch.Tensor, high: torch.Tensor):
        super().__init__()
        self.register_buffer("low", low.to(torch.int32))
        self.register_buffer("high", high.to(torch.int32))

    @classmethod
    def between(cls, qp: ActQParams, low, high) -> "QClamp":
        """The clamp to real ``low``/``high`` (numbers, per-channel tensors, or None: unbounded)."""
        def bound(value, default: int) -> torch.Tensor:
            if value is None:
                return torch.tensor(default)
            steps = round_half_away(torch.as_tensor(value, dtype=torch.float64) / qp.scale)
            return (qp.zero_point + steps).clamp(0, qp.qmax)
        return cls(bound(low, 0), bound(high, qp.qmax))

    def is_identity(self, qp: ActQParams) -> bool:
        return bool((self.low <= 0).all() and (self.high >= qp.qmax).all())

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if self.low.dim() == 0:
            return torch.clamp(q, int(self.low), int(self.high))
        return torch.clamp(q, _per_channel(self.low, q).to(q.dtype), _per_channel(self.high, q).to(q.dtype))

    def check_ranges(self) -> None:
        sc.expect(self.low.shape == self.high.shape and self.low.dim() <= 1, "low and high disagree in shape")
        sc.expect(bool((0 <= self.low).all() and (self.low <= self.high).all() and (self.high < 2**16).all()),
                  "clamp bounds out of order or range")

    def extra_repr(self) -> str:
        if self.low.dim() == 0:
            return f"clamp(q, {int(self.low)}, {int(self.high)})"
        return (f"clamp per channel, low in [{int(self.low.min())}, {int(self.low.max())}], "
                f"high in [{int(self.high.min())}, {int(self.high.max())}]")

    def twin(self, node) -> nn.Module:
        qp = records.get(node, ActQParams)
        return _ValueClamp(qp.scale * (self.low.double() - qp.zero_point),
                           qp.scale * (self.high.double() - qp.zero_point))

    def to_onnx(self, b, node, inputs):
        return _clamp(b, inputs[0], self.low, self.high, node.name)


def _clamp(b, value: str, low: torch.Tensor, high: torch.Tensor, name: str) -> str:
    """``min(max(q, low), high)`` on uint8; per-channel bounds broadcast along dim 1."""
    if low.dim() == 0 and high.dim() == 0:  # one op, which onnxruntime keeps in NHWC
        bounds = [b.constant(f"{name}_{k}", v.to(torch.uint8)) for k, v in (("low", low), ("high", high))]
        return b.node("Clip", [value, *bounds], name)
    shape = (-1, 1, 1) if low.dim() else ()
    low, high = low.to(torch.uint8).reshape(shape), high.to(torch.uint8).reshape(shape)
    raised = b.node("Max", [value, b.constant(f"{name}_low", low)], f"{name}_max")
    return b.node("Min", [raised, b.constant(f"{name}_high", high)], name)


class _ValueClamp(nn.Module):
    def __init__(self, low: torch.Tensor, high: torch.Tensor):
        super().__init__()
        self.low, self.high = low, high

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, _per_channel(self.low, x).to(x.dtype), _per_channel(self.high, x).to(x.dtype))


class ChannelClamp(nn.Module):
    """float → float ``clamp(x, low[c], high[c])`` with one bound per channel of dim 1: what a
    ReLU6 becomes when cross-layer equalization scales channel c by 1/s_c (``relu6(x)/s`` is
    ``clamp(x/s, 0, 6/s)``), so the float function stays the same."""

    def __init__(self, low: torch.Tensor, high: torch.Tensor):
        super().__init__()
        self.register_buffer("low", low.to(torch.float32))
        self.register_buffer("high", high.to(torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, _per_channel(self.low, x), _per_channel(self.high, x))


class QLookup(Derived):
    """b-bit → b'-bit: ``table[q]``, the answer for every input integer, computed once as
    ``quantize_out(f(dequantize_in(q)))`` with the float function ``f`` in float64.

    Exact with respect to its definition for any elementwise function of one tensor (Hardswish,
    SiLU, GELU, x·0.5, ...): there are only 2^b inputs. ``function`` names ``f`` for reports.
    """

    schema = Schema({"input_bits": sc.act_bits, "output_bits": sc.act_bits,
                     "function": lambda v: isinstance(v, str) and len(v) <= 80},
                    {"table": torch.int32, "scales": torch.float64, "zero_points": torch.int32},
                    ranges=lambda m: m.check_ranges())

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor], name: str,
                 before: ActQParams, after: ActQParams):
        super().__init__()
        self.tabulate(function, name, before, after)

    def tabulate(self, values_of: Callable[[torch.Tensor], torch.Tensor], name: str,
                 before: ActQParams, after: ActQParams) -> None:
        """The table: ``quantize_out(values_of(every input value))``, flattened."""
        self.input_bits, self.output_bits, self.function = before.bits, after.bits, name
        every = (torch.arange(1 << before.bits, dtype=torch.float64) - before.zero_point) * before.scale
        with torch.no_grad():
            values = values_of(every).to(torch.float64)
        self.register_buffer("table", after.quantize(values).to(torch.int32).flatten())
        hold_parameters(self, before, after)
        self.prepare()

    @property
    def tables(self) -> int:
        return 1

    def prepare(self) -> None:
        """The table in the output's storage dtype, so a lookup returns integers as they are held."""
        self.register_buffer("lookup", self.table.to(storage_dtype(self.output_bits)), persistent=False)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return lookup(self.lookup, q)

    def check_ranges(self) -> None:
        sc.table_fits(self.table, self.tables << self.input_bits, self.output_bits)
        sc.expect(self.scales.shape == (2,) and self.zero_points.shape == (2,), "malformed parameters")

    def extra_repr(self) -> str:
        return f"{self.function}, {len(self.table)} entries"

    def twin(self, node) -> nn.Module:
        source = next(a for a in node.args if records.has(a, ActQParams))
        return OnIntegers(self.forward, [records.get(source, ActQParams)], records.get(node, ActQParams))

    def float_form(self) -> Callable | None:
        """The function as ONNX float ops (:data:`FLOAT_FORMS`), if this table has one."""
        return FLOAT_FORMS.get(self.function) if type(self) is QLookup and self.output_bits <= 8 else None

    def to_onnx(self, b, node, inputs):
        """A Gather in the table; or, where the export is told its runtime computes this table exactly
        (``b.float_tables``, `fxq.deployment.float_tables`), the function's float ops between
        DequantizeLinear and QuantizeLinear: onnxruntime's Gather reads one index at a time."""
        if node.target in b.float_tables:
            return self.float_onnx(b, inputs[0], node.name)
        return b.gather(self.lookup, b.as_index(inputs[0], node.name), node.name)

    def float_onnx(self, b, q: str, name: str) -> str:
        """DequantizeLinear → the function's float ops → QuantizeLinear, from the integers ``q``."""
        before, after = (ActQParams(float(self.scales[i]), int(self.zero_points[i]), bits)
                         for i, bits in enumerate((self.input_bits, self.output_bits)))
        return b.quantize(self.float_form()(b, b.dequantize(q, before, f"{name}_in"), name), after, name)


def _relu6_of_x_plus_3(b, x: str, name: str) -> tuple[str, str]:
    """``clip(x + 3, 0, 6)``, and the constant 6."""
    three, zero, six = (b.constant(f"{name}_{v}", torch.tensor(float(v))) for v in (3, 0, 6))
    return b.node("Clip", [b.node("Add", [x, three], f"{name}_add"), zero, six], f"{name}_clip"), six


def _hardsigmoid(b, x: str, name: str) -> str:
    clipped, six = _relu6_of_x_plus_3(b, x, name)
    return b.node("Div", [clipped, six], f"{name}_hardsigmoid")


def _hardswish(b, x: str, name: str) -> str:
    clipped, six = _relu6_of_x_plus_3(b, x, name)
    return b.node("Div", [b.node("Mul", [x, clipped], f"{name}_mul"), six], f"{name}_hardswish")


def _sigmoid(b, x: str, name: str) -> str:
    return b.node("Sigmoid", [x], f"{name}_sigmoid")


def _silu(b, x: str, name: str) -> str:
    return b.node("Mul", [x, _sigmoid(b, x, name)], f"{name}_silu")


# tables whose function ONNX's float ops write, by the name `QLookup.function` records (a module's class
# or a function's name), so loaded models have them too. Add, Clip, Mul and Div round once as IEEE 754 says;
# a runtime's Sigmoid approximates, differently on each CPU: `fxq.deployment.float_tables` checks each table
# against the runtime it deploys to, so either kind is used only where it gives the table exactly
FLOAT_FORMS: dict[str, Callable] = {"Hardswish": _hardswish, "hardswish": _hardswish, "Hardsigmoid": _hardsigmoid,
                                    "hardsigmoid": _hardsigmoid, "Sigmoid": _sigmoid, "sigmoid": _sigmoid,
                                    ".sigmoid()": _sigmoid, "SiLU": _silu, "silu": _silu}


class QConstantLookup(QLookup):
    """b-bit → b'-bit elementwise op of a tensor and a constant tensor (``x · γ`` with a learned
    per-channel scale, ``x + bias``): one lookup table per element of the constant, each the
    answer for every input integer, ``quantize_out(f(dequantize_in(q), c_k))``, in float64.

    ``shape`` is the constant's; it broadcasts against the input as the constant did.
    """

    schema = Schema({"input_bits": sc.act_bits, "output_bits": sc.act_bits,
                     "function": lambda v: isinstance(v, str) and len(v) <= 80,
                     "shape": lambda v: (isinstance(v, tuple) and len(v) <= 6
                                         and all(sc.is_int(x) and x >= 1 for x in v))},
                    {"table": torch.int32, "scales": torch.float64, "zero_points": torch.int32},
                    ranges=lambda m: m.check_ranges())

    def __init__(self, function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], name: str,
                 constant: torch.Tensor, before: ActQParams, after: ActQParams):
        nn.Module.__init__(self)
        self.shape = tuple(constant.shape)
        per_element = constant.detach().to(torch.float64).reshape(-1, 1)
        self.tabulate(lambda every: function(every[None, :], per_element), name, before, after)

    @property
    def tables(self) -> int:
        return math.prod(self.shape)

    def prepare(self) -> None:
        super().prepare()
        offsets = (torch.arange(self.tables, dtype=torch.int64) << self.input_bits).reshape(self.shape)
        self.register_buffer("offsets", offsets, persistent=False)

    def offsets_for(self, rank: int) -> torch.Tensor:
        """Where each table starts, shaped to broadcast against an input of ``rank`` dims."""
        return self.offsets

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.lookup[self.offsets_for(q.dim()) + q.to(torch.int64)]

    def to_onnx(self, b, node, inputs):
        offsets = b.constant(f"{node.name}_offsets", self.offsets_for(len(b.shape_of(node))))
        index = b.node("Add", [b.as_index(inputs[0], node.name), offsets], f"{node.name}_offset")
        return b.gather(self.lookup, index, node.name)
