"""fuse: ``conv → relu``, ``linear → relu`` and ``add → relu`` become one quantization unit."""
from __future__ import annotations

from torch import fx

from fxq import records
from fxq.context import PassContext
from fxq.graph import finish
from fxq.ops import Kind, kind_of

PRODUCERS = (Kind.WEIGHTED, Kind.ADD)


def fuse(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Group each producer with the ReLU that follows it into one unit.

    Before: ``y = relu(conv(x))`` as two unrelated nodes. After: the same nodes, both carrying
    a ``records.FusedUnit(conv, relu)`` record. The unit is what the placement applies to:
    ``"pre"`` (the default) quantizes the unit at the producer's output, so the ReLU runs as
    ``max(q, z)`` on that scale; a placement after the activation observes the ReLU's output
    instead and never quantizes the raw producer output. The graph's dataflow does not change.
    Guard: the producer's output feeds only the activation (a residual branch that also reads the
    pre-activation value needs it quantized on its own).
    """
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method") or not node.args:
            continue
        producer = node.args[0]
        if (kind_of(node, modules) is not Kind.ACTIVATION or not isinstance(producer, fx.Node)
                or kind_of(producer, modules) not in PRODUCERS):
            continue
        if len(producer.users) > 1:  # the pre-activation value is read elsewhere too
            continue
        unit = records.FusedUnit(producer, node)
        records.put(producer, unit)
        records.put(node, unit)
    return finish(gm)
