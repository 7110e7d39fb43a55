"""The facts passes hand each other, as typed records on ``node.meta`` / ``gm.meta``.

A record is stored under its own type (``fxq.<TypeName>``), so each kind of fact has one
definition, here, and one key that no module spells out:

    records.put(node, Calibration(4, 512, (1, 28, 28)))
    records.get(node, Calibration)            # -> the record, or None

    ActQParams        the integer value a node produces: scale, zero point, bits   (convert)
    QConfig           on the quantized GraphModule: the config it was made with    (quantize)
    Origin            a call site's node: the user's path of the module it runs    (trace)
    FusedUnit         a producer and the activation fused with it                  (fuse)
    Calibration       on the input placeholder: what calibration saw               (calibrate)
    FixedShape        on the input placeholder: the one sample shape the graph holds for (trace)
    QuantizedWeight   a layer's integer weight and scales, chosen once             (correct_bias, convert)
    Observed          what an integer op produced on the calibration data          (record_stats)
    StatsSource       on the quantized GraphModule: the samples Observed is taken from (record_stats)
    FloatOp           an op kept in float, and why                                 (convert)
    SampleShape       an observed value's shape on one sample, batch dim dropped    (convert)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import torch
from torch import fx

from fxq.config import QConfig
from fxq.integers.affine import ActQParams

__all__ = ["ActQParams", "Calibration", "FixedShape", "FloatOp", "FusedUnit", "IntRange", "Observed", "Origin",
           "QConfig", "QuantizedWeight", "SampleShape", "StatsSource", "get", "has", "pop", "put"]

Record = TypeVar("Record")


@dataclass(frozen=True)
class Origin:
    """The path of the module the user's model called at this site (``relu`` for ``relu_1``)."""

    path: str


@dataclass(frozen=True)
class FusedUnit:
    """A producer (conv, linear, add) and the activation that alone consumes its output."""

    producer: fx.Node
    activation: fx.Node


@dataclass(frozen=True, eq=False)
class Calibration:
    """What calibration saw: on the input placeholder."""

    batches: int
    samples: int
    sample_shape: tuple[int, ...]  # one input without its batch dimension, e.g. (1, 28, 28)
    kept: torch.Tensor | None = None  # the first few samples (`passes.calibrate.KEPT_SAMPLES`)
    learning: torch.Tensor | None = None  # the first samples `passes.reconstruct` learns on (if it runs)


@dataclass(frozen=True)
class FixedShape:
    """The graph was traced with this input's sizes as constants (`fxq.graphs.shapes`): it computes the
    model only for samples of this shape."""

    sample_shape: tuple[int, ...]


class QuantizedWeight(NamedTuple):
    """A layer's integer weight and the scales it is at (`fxq.integers.weight_ranges.quantize_weights`)."""

    weight: torch.Tensor  # int8 [C_out, ...]
    scales: torch.Tensor  # float64 [C_out]


@dataclass(frozen=True)
class IntRange:
    """The least and greatest integer seen."""

    lo: int
    hi: int

    def union(self, other: "IntRange | None") -> "IntRange":
        return self if other is None else IntRange(min(self.lo, other.lo), max(self.hi, other.hi))

    @classmethod
    def of(cls, t: torch.Tensor) -> "IntRange":
        lo, hi = torch.aminmax(t)
        return cls(int(lo), int(hi))


@dataclass(frozen=True)
class Observed:
    """What an integer op produced on the calibration data."""

    output: IntRange
    accumulator: IntRange | None = None  # conv/linear only


@dataclass(frozen=True, eq=False)
class StatsSource:
    """Calibration data (any iterable of batches: the samples calibration kept), on the quantized
    model until its `Observed` records are first needed; copies of the model share it."""

    loader: object

    def __deepcopy__(self, memo) -> "StatsSource":
        return self


@dataclass(frozen=True)
class FloatOp:
    """An op the quantized graph runs in float, between dequantize and quantize."""

    reason: str


@dataclass(frozen=True)
class SampleShape:
    """An observed value's shape on the calibration data, without its batch dimension."""

    shape: tuple[int, ...] | None


def _key(kind: type) -> str:
    return f"fxq.{kind.__name__}"


def put(holder: fx.Node | fx.GraphModule, record: object) -> None:
    holder.meta[_key(type(record))] = record


def get(holder: fx.Node | fx.GraphModule, kind: type[Record]) -> Record | None:
    return holder.meta.get(_key(kind))


def has(holder: object, kind: type) -> bool:
    """False for anything that is not a node or module carrying the record (a constant argument)."""
    return isinstance(holder, (fx.Node, fx.GraphModule)) and _key(kind) in holder.meta


def pop(holder: fx.Node | fx.GraphModule, kind: type[Record]) -> Record | None:
    return holder.meta.pop(_key(kind), None)
