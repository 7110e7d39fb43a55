"""record_stats: the integer range every op produces on the samples calibration kept (and every
conv/linear accumulator's), for `fxq.explain` — recorded the first time it is asked for."""
from __future__ import annotations

import torch
from torch import fx

from fxq.graphs import records
from fxq.graphs.context import PassContext
from fxq.graphs.records import IntRange, Observed
from fxq.ops.layers import QLayer
from passes.calibrate import batch_input


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
        acc, positions = module.accumulator(args[0])
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
    """Before → after: the same graph, carrying a ``records.StatsSource``: the first calibration
    samples (`passes.calibrate.KEPT_SAMPLES`), which calibration kept as it read them, so the
    loader is never read again (a generator cannot be) and an explanation costs a forward pass
    of a few samples on any model size.

    The ranges themselves (``records.Observed`` on each node that returns integers) are recorded
    by `observe_on_demand`, which `fxq.explain` calls: a model that is deployed but never
    explained needs none.
    """
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    calibration = records.get(placeholder, records.Calibration)
    if calibration is not None and calibration.kept is not None:
        records.put(gm, records.StatsSource([calibration.kept]))
    return gm


def observe_on_demand(gm: fx.GraphModule) -> None:
    """Run the calibration data a model still carries through its integer graph, once, and
    annotate every integer op with a ``records.Observed(output range, accumulator range)``."""
    source = records.pop(gm, records.StatsSource)
    if source is None:
        return
    recorder = StatsRecorder(gm)
    with torch.no_grad():
        for index, item in enumerate(source.loader):
            recorder.run(batch_input(item, index))
    for node, observed in recorder.seen.items():
        records.put(node, observed)
