"""The softmax on integers, along one axis of a tensor at one scale (SKNet's and ResNeSt's split
attention across two branches, attention's scores across a sequence).

    over 2:   O_q[i] = T[I_q[i] − I_q[j] + q_max]                  softmax(a, b)_a = sigmoid(a − b)
    longer:   O_q = clamp(z_O + round(e / (Σ e · s_O)))           e = T[I_q − max I_q], an int64 exp table

The softmax of two values is the sigmoid of their difference, and with both at one scale that
difference is an integer: one table of 2^(b+1) entries answers every pair exactly.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxq.files import schema as sc
from fxq.files.schema import Schema
from fxq.graphs import records
from fxq.graphs.qmodules import NotRepresentable
from fxq.graphs.twin import OnIntegers
from fxq.integers import intmath
from fxq.integers.affine import ActQParams
from fxq.ops.base import Lowering, Op, Output, hold_parameters, leaf_name, qparams_of
from fxq.ops.lookup import QLookup

SOFTMAX_BITS = 30  # the exp table: 2^30 for e^0


class QSoftmaxPair(QLookup):
    """Integers → integers: softmax along ``dim`` of size 2, ``T[q − q_other + q_max]`` with
    ``T[d] = quantize_out(sigmoid(s_I · (d − q_max)))``."""

    schema = Schema({"input_bits": sc.act_bits, "output_bits": sc.act_bits, "dim": sc.is_int,
                     "function": lambda v: v == "softmax over 2"},
                    {"table": torch.int32, "scales": torch.float64, "zero_points": torch.int32},
                    ranges=lambda m: m.check_ranges())

    def __init__(self, dim: int, before: ActQParams, after: ActQParams):
        nn.Module.__init__(self)
        self.dim = dim
        self.tabulate(torch.sigmoid, "softmax over 2", ActQParams(before.scale, before.qmax, before.bits + 1), after)
        self.input_bits = before.bits

    @property
    def tables(self) -> int:
        return 2  # differences from −q_max to q_max

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if q.shape[self.dim] != 2:
            raise ValueError(f"this softmax runs over a dim of 2 (dim {self.dim}); got shape {tuple(q.shape)}")
        wide = q.to(torch.int64)
        return self.lookup[wide - wide.flip(self.dim) + ((1 << self.input_bits) - 1)]

    def extra_repr(self) -> str:
        return f"softmax over dim {self.dim} of 2, a table of the differences"

    def twin(self, node) -> nn.Module:
        return OnIntegers(self.forward, [records.get(node.args[0], ActQParams)], records.get(node, ActQParams))

    def to_onnx(self, b, node, inputs):
        name = node.name
        wide = b.node("Cast", [inputs[0]], f"{name}_wide", to=b.types.INT64)
        other = b.node("Slice", [wide, *(b.constant(f"{name}_{k}", b.ints([v])) for k, v in
                                        (("start", -1), ("end", -2**63), ("axis", self.dim), ("step", -1)))],
                       f"{name}_other")
        index = b.node("Add", [b.node("Sub", [wide, other], f"{name}_difference"),
                               b.constant(f"{name}_offset", np.int64((1 << self.input_bits) - 1))], f"{name}_index")
        return b.gather(self.table, index, name)


class QSoftmax(nn.Module):
    """Integers → integers: softmax along ``dim`` of any size (attention's scores), from the
    integer differences to the row's largest value:

        e = T[q − max(q)]   T[d] = round(2^30 · exp(s_I·d)), d ≤ 0   (int64)
        O_q = clamp(z_O + round(e / (Σ e · s_O)))

    The sum is exact in int64 and the two float64 steps are single IEEE operations, so the
    exported graph (Gather, ReduceSum, Mul, Div, Round) gives the same integers on every runtime.
    ``T`` carries 30 bits, far finer than any output step."""

    schema = Schema({"dim": sc.is_int, "input_bits": sc.act_bits, "output_bits": sc.act_bits},
                    {"table": torch.int64, "scales": torch.float64, "zero_points": torch.int32},
                    ranges=lambda m: m.check_ranges())

    def __init__(self, dim: int, before: ActQParams, after: ActQParams):
        super().__init__()
        self.dim, self.input_bits, self.output_bits = dim, before.bits, after.bits
        steps = torch.arange(-((1 << before.bits) - 1), 1, dtype=torch.float64)
        self.register_buffer("table", torch.round(torch.exp(steps * before.scale) * (1 << SOFTMAX_BITS)).long())
        hold_parameters(self, before, after)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if q.shape[self.dim] << SOFTMAX_BITS >= 1 << 53:
            raise ValueError(f"a softmax over {q.shape[self.dim]} values passes 2^53 in its exact sums: keep it "
                             "in float with overrides")
        wide = q.to(torch.int64)
        e = self.table[wide - wide.amax(self.dim, keepdim=True) + ((1 << self.input_bits) - 1)]
        total = e.sum(self.dim, keepdim=True).to(torch.float64) * float(self.scales[1])
        out = torch.round(e.to(torch.float64) / total).add_(int(self.zero_points[1]))
        return out.clamp_(0, (1 << self.output_bits) - 1).to(intmath.storage_dtype(self.output_bits))

    def check_ranges(self) -> None:
        sc.expect(self.table.shape == (1 << self.input_bits,), "one table entry per difference")
        sc.expect(bool((self.table >= 0).all() and (self.table <= 1 << SOFTMAX_BITS).all()),
                  f"table entries lie in [0, 2^{SOFTMAX_BITS}]")
        sc.parameters_fit(self, (self.input_bits, self.output_bits))

    def extra_repr(self) -> str:
        return f"softmax over dim {self.dim}: exp table of the differences from the largest, exact sums"

    def twin(self, node) -> nn.Module:
        return OnIntegers(self.forward, [records.get(node.args[0], ActQParams)], records.get(node, ActQParams))

    def to_onnx(self, b, node, inputs):
        """Cast int64 → ReduceMax → Sub → Add offset → Gather T → ReduceSum → the float64 steps
        of `forward` → Round → QuantizeLinear(1, z_O)."""
        name, axis = node.name, b.ints([self.dim])

        def op(kind: str, args: list[str], key: str, **attributes) -> str:
            return b.node(kind, args, f"{name}_{key}", **attributes)

        wide = op("Cast", [inputs[0]], "wide", to=b.types.INT64)
        largest = op("ReduceMax", [wide, b.constant(f"{name}_axis", axis)], "largest", keepdims=1)
        index = op("Add", [op("Sub", [wide, largest], "difference"),
                           b.constant(f"{name}_offset", np.int64((1 << self.input_bits) - 1))], "index")
        e = op("Gather", [b.constant(f"{name}_table", self.table), index], "e")
        total = op("ReduceSum", [e, b.constant(f"{name}_sum_axis", axis)], "total", keepdims=1)
        denominator = op("Mul", [op("Cast", [total], "total_real", to=b.types.DOUBLE),
                                 b.constant(f"{name}_s_out", self.scales[1].numpy())], "denominator")
        ratio = op("Div", [op("Cast", [e], "e_real", to=b.types.DOUBLE), denominator], "ratio")
        rounded = op("Cast", [op("Round", [ratio], "rounded")], "rounded_float", to=b.types.FLOAT)
        return b.quantize(rounded, ActQParams(1.0, int(self.zero_points[1]), self.output_bits), name)


def _softmax_dim(node: fx.Node) -> object:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")


def _along_a_dim(node: fx.Node, module: nn.Module | None) -> str | None:
    """The axis's size is known once calibration saw the values: `lower_softmax` checks it."""
    dim = module.dim if module is not None else _softmax_dim(node)
    extra = {k: v for k, v in node.kwargs.items() if k != "dim" and not (k == "_stacklevel" or v is None)}
    if isinstance(dim, int) and dim != 0 and not extra and len(node.args) <= 2:
        return None
    return "a softmax over the batch, over every value, or with a dtype"


def lower_softmax(lo: Lowering, node: fx.Node) -> None:
    """``softmax(x, dim)`` → ``QSoftmaxPair(q)`` over an axis of 2 (a table of the difference),
    ``QSoftmax(q)`` over a longer one (an exp table of the differences from the largest)."""
    before, after = qparams_of(node.args[0], node), records.get(node, ActQParams)
    dim = lo.module(node).dim if lo.module(node) is not None else _softmax_dim(node)
    shape = getattr(records.get(node, records.SampleShape), "shape", None)
    size = None if shape is None else shape[dim - 1 if dim > 0 else dim]
    if size is None:
        raise NotRepresentable("a softmax whose axis was never seen during calibration")
    form = QSoftmaxPair if size == 2 else QSoftmax
    lo.become(node, form(dim, before, after), leaf_name(node), node.args[:1])


SOFTMAX = Op("softmax", "over an axis of 2, a table of the integer difference (the sigmoid's); over a longer "
             "axis, an exp table of the differences from the largest, exact int64 sums, one float64 division",
             lower_softmax, Output.OWN, modules=(nn.Softmax,), functions=(F.softmax, torch.softmax),
             methods=("softmax",), accepts=_along_a_dim, integer_modules=(QSoftmaxPair, QSoftmax),
             example=lambda: lambda x: x[:, :2].softmax(dim=1))
OPS = (SOFTMAX,)
