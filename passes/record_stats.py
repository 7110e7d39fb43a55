"""record_stats: run the calibration data once more, through the integer graph, and record the
integer range every op produced (and every conv/linear accumulator), for `fxq.explain`."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from fxq.context import PassContext
from fxq.graph import finish
from fxq.qmodules import QLayer
from passes.calibrate import batch_input

META = "fxq.record_stats"


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
    """What an integer op produced on the calibration data (``node.meta["fxq.record_stats"]``)."""

    output: IntRange
    accumulator: IntRange | None = None  # conv/linear only


class StatsRecorder(fx.Interpreter):
    """Runs the integer graph; a conv/linear runs as its two formulas so the accumulator is seen."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.seen: dict[fx.Node, Observed] = {}
        self._accumulator: IntRange | None = None

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if not isinstance(module, QLayer):
            return super().call_module(target, args, kwargs)
        columns, positions = module.columns(args[0])
        acc = module.accumulate(columns)
        self._accumulator = IntRange.of(acc)
        return module.to_output(module.requantize(acc), positions)

    def run_node(self, n: fx.Node):
        self._accumulator = None
        result = super().run_node(n)
        if isinstance(result, torch.Tensor) and not result.is_floating_point():
            old = self.seen.get(n)
            acc = self._accumulator
            if acc is not None and old is not None:
                acc = acc.union(old.accumulator)
            self.seen[n] = Observed(IntRange.of(result).union(old and old.output), acc)
        return result


def record_stats(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Annotate every integer op with the ranges it produced on the calibration data.

    Before → after: the same graph; each node that returned an integer tensor gets
    ``node.meta["fxq.record_stats"] = Observed(output range, accumulator range)``.
    """
    recorder = StatsRecorder(gm)
    with torch.no_grad():
        for index, item in enumerate(ctx.calib_loader):
            recorder.run(batch_input(item, index))
    for node, observed in recorder.seen.items():
        node.meta[META] = observed
    return finish(gm)
