"""fuse: ``conv → relu``, ``linear → relu`` and ``add → relu`` become one quantization unit."""
from __future__ import annotations

from torch import fx

from fxq import ops
from fxq.graphs import records
from fxq.graphs.context import PassContext
from fxq.graphs.graph import finish


def fuse(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Group each producer (an entry that ``absorbs_activation``: conv, linear, add) with the
    clamp that follows it (an entry that ``clamps``: ReLU) into one unit.

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
        if node.op not in ops.CALLS or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        producer = node.args[0]
        if producer.op not in ops.CALLS or not (ops.classify(node, modules, ctx)[0].clamps
                                                 and ops.classify(producer, modules, ctx)[0].absorbs_activation):
            continue
        if len(producer.users) > 1:  # the pre-activation value is read elsewhere too
            continue
        unit = records.FusedUnit(producer, node)
        records.put(producer, unit)
        records.put(node, unit)
    return finish(gm)
