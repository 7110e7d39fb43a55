"""quantize_add: the float islands convert leaves around residual adds become integer adds."""
from __future__ import annotations

import warnings

from torch import fx, nn

from fxq import ops
from fxq.config import Rounding
from fxq.graphs import records
from fxq.graphs.context import PassContext
from fxq.graphs.graph import add_module_near, finish
from fxq.graphs.qmodules import Dequantize, NotRepresentable, Quantize
from fxq.integers.affine import ActQParams
from fxq.ops.arithmetic import QAdd
from fxq.ops.fallback import FloatFallbackWarning, float_report


def quantize_add(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Rewrite each dequantize → add → quantize island into one integer add.

    Before: ``y = quantize(dequantize(a) + dequantize(b))`` (a, b uint8; ``+``, ``+=`` or
    ``torch.add``). After: ``y = QAdd(a, b)``, which rescales both inputs to ``y``'s scale with
    their own fixed-point multipliers and rounds once (`fxq.integers.intmath.add`).
    Guard: the add's float result feeds only the quantize (otherwise the float value is needed).
    An add whose two input scales are too far apart for the int64 sum stays a float island, and
    a warning says so.
    """
    modules = dict(gm.named_modules())
    kept = []
    for node in list(gm.graph.nodes):
        island = _island(node, modules)
        if island is None:
            continue
        add, (deq_a, deq_b) = island
        a, b = deq_a.args[0], deq_b.args[0]
        try:
            qadd = QAdd(*(records.get(n, ActQParams) for n in (a, b, node)), f"the add {add.name}",
                        Rounding(ctx.config.requantize))
        except NotRepresentable as why:  # the island stays: the add runs in float
            records.put(add, records.FloatOp(str(why)))
            kept.append((add, str(why)))
            continue
        path = add_module_near(gm, add, "add", qadd)
        # Rewritten in place so the add keeps its name (add, add_1, ...) in the printed code.
        add.op, add.target, add.args, add.kwargs = "call_module", path, (a, b), {}
        records.put(add, records.get(node, ActQParams))
        node.replace_all_uses_with(add)
        for dead in (node, deq_a, deq_b):
            gm.graph.erase_node(dead)
    if kept:
        warnings.warn("with the calibrated parameters, " + float_report(kept), FloatFallbackWarning, stacklevel=2)
    return finish(gm)


def _island(node: fx.Node, modules: dict[str, nn.Module]):
    """``(add, (dequantize_a, dequantize_b))`` if ``node`` quantizes such an add, else None."""
    if node.op != "call_module" or not isinstance(modules[node.target], Quantize):
        return None
    add = node.args[0]
    if not isinstance(add, fx.Node) or add.op not in ops.CALLS or not ops.classify(add, modules)[0].residual_join:
        return None
    if len(add.users) > 1:  # the float sum is read elsewhere too
        return None
    inputs = add.args[:2]
    if not all(n.op == "call_module" and isinstance(modules[n.target], Dequantize) for n in inputs):
        return None
    return add, inputs
