"""Integer modules that join tensors: ops of two tensors as tables of every input pair (`PairOp`: the
product here, the add in `fxq.ops.arithmetic`), and a concatenation of several."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fxq.config import Rounding
from fxq.files import schema as sc
from fxq.files.schema import Schema
from fxq.graphs import records
from fxq.graphs.qmodules import Derived, NotRepresentable
from fxq.graphs.twin import OnIntegers, on_integers
from fxq.integers import intmath
from fxq.integers.affine import ActQParams


def _grid(bits: int) -> torch.Tensor:
    """Every integer of a ``bits``-wide value."""
    return torch.arange(1 << bits, dtype=torch.int64)


# tables by what they are computed from: a model loaded again, or ops with equal parameters,
# share one (64 kB each at 8 bits; never written to)
_TABLES: dict[tuple, torch.Tensor] = {}
_TABLES_KEPT = 256


class PairOp(Derived):
    """An integer op of two tensors (``compute(a, b)``) that, with inputs of up to 8 bits each,
    runs as a lookup in the table of its answer for every input pair (broadcasting like the op);
    wider inputs compute it. ``input_bits`` and ``output_bits`` are set by the op."""

    input_bits: tuple[int, int]
    output_bits: int

    def compute(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def tabulated(self) -> bool:
        return sum(self.input_bits) <= 16

    def prepare(self) -> None:
        table = None
        if self.tabulated:
            key = self._table_key()
            table = _TABLES.get(key)
            if table is None:
                a, b = torch.meshgrid(*(_grid(bits) for bits in self.input_bits), indexing="ij")
                table = _TABLES.setdefault(key, self.compute(a, b).flatten())
                if len(_TABLES) > _TABLES_KEPT:
                    del _TABLES[next(iter(_TABLES))]
        self.register_buffer("table", table, persistent=False)

    def _table_key(self) -> tuple:
        """Everything ``compute`` reads: the op, its widths and rounding, its saved integers."""
        state = tuple((name, tuple(t.flatten().tolist())) for name, t in sorted(self.state_dict().items()))
        return type(self), self.input_bits, self.output_bits, getattr(self, "requantize_as", None), state

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if not self.tabulated:
            return self.compute(a, b)
        return intmath.lookup(self.table, torch.add(b, a.to(torch.int32), alpha=1 << self.input_bits[1]))

    def twin(self, node) -> nn.Module:
        return on_integers(self.compute, node)

    def to_onnx(self, b, node, inputs):
        """``table[a·2^b_B + b]``, fxq's own table looked up exactly."""
        if not self.tabulated:
            raise ValueError(f"node '{node.name}': {type(self).__name__} of 16-bit inputs does not export yet")
        return _pair_table(b, self.table, inputs[0], inputs[1], 1 << self.input_bits[1], node.name)


class QMul(PairOp):
    """uint8 · uint8 → uint8: ``clamp(z_O + round(M·(A_q − z_A)·(B_q − z_B)))``, ``M = s_A·s_B/s_O``.

    The product of two centred integers is exact in int64 and formula (2) requantizes it — or, with
    ``requantize_as`` onnxruntime's, QLinearMul's float32 arithmetic (`fxq.integers.intmath.runtime_mul`),
    so that it deploys as that kernel, not as a table lookup. With inputs of up to 8 bits the op runs
    as a lookup in the table of every pair (as the add does), broadcasting like ``a * b`` (a
    squeeze-and-excitation gate ``[N, C, 1, 1]`` times ``[N, C, H, W]``).
    """

    schema = Schema({"input_bits": lambda v: sc.bits_tuple(v) and len(v) == 2, "output_bits": sc.act_bits,
                     "requantize_as": sc.REQUANTIZE},
                    {"zero_points": torch.int32, "multiplier": torch.int64, "shift": torch.int64,
                     "scales": torch.float64},
                    optional_tensors=frozenset({"scales"}), optional_attributes=frozenset({"requantize_as"}),
                    ranges=lambda m: m.check_ranges())
    requantize_as = Rounding.FIXED_POINT  # what a file written before the choice existed holds

    def __init__(self, a: ActQParams, b: ActQParams, out: ActQParams, name: str,
                 rounding: Rounding = Rounding.FIXED_POINT):
        super().__init__()
        self.requantize_as = Rounding(rounding)
        self.input_bits, self.output_bits = (a.bits, b.bits), out.bits
        bound = max(a.zero_point, a.qmax - a.zero_point) * max(b.zero_point, b.qmax - b.zero_point)
        try:
            m, shift = intmath.fixed_point(torch.tensor(a.scale * b.scale / out.scale),
                                           intmath.multiplier_precision(bound), max(bound, 1))
        except ValueError:
            raise NotRepresentable(f"{name}: the product's scale s_A·s_B/s_O = {a.scale * b.scale / out.scale:.3g} "
                             "is too large to hold in fixed point: its output was almost constant on the "
                             "calibration data; calibrate on varied inputs") from None
        if self.requantize_as is Rounding.ONNXRUNTIME and a.scale * b.scale / out.scale * max(bound, 1) >= 2**31:
            raise NotRepresentable(f"{name}: the product's scale s_A·s_B/s_O = {a.scale * b.scale / out.scale:.3g} "
                                   "takes products past onnxruntime's int32 conversion: its output was almost "
                                   "constant on the calibration data; calibrate on varied inputs")
        self.register_buffer("zero_points", torch.tensor([a.zero_point, b.zero_point, out.zero_point],
                                                         dtype=torch.int32))
        self.register_buffer("multiplier", m.reshape(()))
        self.register_buffer("shift", shift.reshape(()))
        if self.requantize_as is Rounding.ONNXRUNTIME:
            self.register_buffer("scales", torch.tensor([a.scale, b.scale, out.scale], dtype=torch.float64))
        self.prepare()

    def compute(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The integer product itself, without the table."""
        za, zb, zo = (int(z) for z in self.zero_points)
        if self.requantize_as is Rounding.ONNXRUNTIME:
            return intmath.runtime_mul(a, b, tuple(self.scales.tolist()), (za, zb, zo), (1 << self.output_bits) - 1)
        product = (a.to(torch.int64) - za) * (b.to(torch.int64) - zb)
        return intmath.requantize(product, self.multiplier, self.shift, zo, (1 << self.output_bits) - 1)

    def check_ranges(self) -> None:
        sc.expect(self.zero_points.shape == (3,), "three zero points: a, b and the output")
        for z, bits in zip(self.zero_points.tolist(), self.input_bits + (self.output_bits,)):
            sc.expect(0 <= z < (1 << bits), "a zero point is outside its width")
        sc.fixed_point_fits(self.multiplier, self.shift, "the product's")
        runtime = self.requantize_as is Rounding.ONNXRUNTIME
        sc.expect(runtime == hasattr(self, "scales"), "onnxruntime's arithmetic needs the three scales, and "
                  "only it")
        if runtime:
            sc.expect(self.scales.shape == (3,) and bool((self.scales > 0).all() & self.scales.isfinite().all()),
                      "three positive finite scales")
            # MLAS converts P·r + z_O to int32: beyond 2^31 it would wrap, not saturate
            sc.expect(float(self.scales[0] * self.scales[1] / self.scales[2]) * 2**16 < 2**31,
                      "the product's scale ratio is too large for onnxruntime's int32 conversion")

    def to_onnx(self, b, node, inputs):
        """onnxruntime's arithmetic: DequantizeLinear ×2 → Mul → QuantizeLinear, which it fuses into
        QLinearMul; fxq's fixed point: ``table[a·2^b_B + b]``."""
        if self.requantize_as is not Rounding.ONNXRUNTIME:
            return super().to_onnx(b, node, inputs)
        za, zb, zo = (int(z) for z in self.zero_points)
        sa, sb, so = self.scales.tolist()
        operands = [ActQParams(sa, za, self.input_bits[0]), ActQParams(sb, zb, self.input_bits[1])]
        values = [b.dequantize(q, qp, f"{node.name}_{i}") for i, (q, qp) in enumerate(zip(inputs, operands))]
        return b.quantize(b.node("Mul", values, f"{node.name}_product"), ActQParams(so, zo, self.output_bits),
                          node.name)


def _pair_table(b, table: torch.Tensor, first: str, second: str, width: int, name: str) -> str:
    """``table[first·width + second]`` (broadcasting like the op it stands for)."""
    row = b.node("Mul", [b.as_index(first, f"{name}_a"), b.constant(f"{name}_width", np.int64(width))],
                 f"{name}_row")
    return b.gather(table, b.node("Add", [row, b.as_index(second, f"{name}_b")], f"{name}_pair"), name)


class QCat(Derived):
    """uint8, uint8, ... → uint8 concatenation along ``dim``: each input moved to the output's
    parameters (``clamp(z_O + round(s_i/s_O·(q − z_i)))``, a 2^b-entry table; none for an input
    already at them), then the integers are joined."""

    schema = Schema({"input_bits": sc.bits_tuple, "output_bits": sc.act_bits, "dim": sc.is_int},
                    {"zero_points": torch.int32, "multipliers": torch.int64, "shifts": torch.int64},
                    ranges=lambda m: m.check_ranges())

    def __init__(self, inputs: list[ActQParams], out: ActQParams, dim: int):
        super().__init__()
        self.input_bits, self.output_bits, self.dim = tuple(p.bits for p in inputs), out.bits, dim
        pairs = [intmath.fixed_point(torch.tensor(p.scale / out.scale), bound=p.qmax) for p in inputs]
        self.register_buffer("zero_points", torch.tensor([p.zero_point for p in inputs] + [out.zero_point],
                                                         dtype=torch.int32))
        self.register_buffer("multipliers", torch.stack([m.reshape(()) for m, _ in pairs]))
        self.register_buffer("shifts", torch.stack([s.reshape(()) for _, s in pairs]))
        self.prepare()

    def moved(self, index: int, q: torch.Tensor) -> torch.Tensor:
        """Input ``index``'s integers at the output's parameters (`fxq.integers.intmath.requantize`)."""
        centred = q.to(torch.int64) - int(self.zero_points[index])
        return intmath.requantize(centred, self.multipliers[index], self.shifts[index],
                                  int(self.zero_points[-1]), (1 << self.output_bits) - 1)

    def prepare(self) -> None:
        self.tables = [self.moved(i, _grid(bits)) for i, bits in enumerate(self.input_bits)]
        self.identity = [bool(torch.equal(t.to(torch.int64), _grid(bits)))
                         for t, bits in zip(self.tables, self.input_bits)]

    def compute(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.moved(i, q) for i, q in enumerate(inputs)], self.dim)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        dtype = intmath.storage_dtype(self.output_bits)
        parts = [q.to(dtype) if same else intmath.lookup(table, q)
                 for q, table, same in zip(inputs, self.tables, self.identity)]
        return torch.cat(parts, self.dim)

    def check_ranges(self) -> None:
        count = len(self.input_bits)
        sc.expect(self.zero_points.shape == (count + 1,) and self.multipliers.shape == (count,)
                  and self.shifts.shape == (count,), "one zero point, multiplier and shift per input")
        for z, bits in zip(self.zero_points.tolist(), self.input_bits + (self.output_bits,)):
            sc.expect(0 <= z < (1 << bits), "a zero point is outside its width")
        sc.fixed_point_fits(self.multipliers, self.shifts, "an input's")

    def twin(self, node) -> nn.Module:
        inputs = [records.get(a, ActQParams) for a in node.args]
        return OnIntegers(self.compute, inputs, records.get(node, ActQParams))

    def to_onnx(self, b, node, inputs):
        parts = [q if same else b.gather(table, b.as_index(q, f"{node.name}_{i}"), f"{node.name}_{i}")
                 for i, (q, table, same) in enumerate(zip(inputs, self.tables, self.identity))]
        return b.node("Concat", parts, node.name, axis=self.dim)
