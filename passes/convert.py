"""convert: observed float graph → integer graph (qparams, integer weights, integer ops)."""
from __future__ import annotations

import warnings

from torch import fx

from fxq import ops
from fxq.config import Rounding
from fxq.files import saved_graph
from fxq.graphs import records
from fxq.graphs.canonical import drop_shape_checks
from fxq.graphs.context import PassContext
from fxq.graphs.graph import add_module_near, call_after, finish, module_name, source_line
from fxq.graphs.qmodules import Dequantize, Quantize
from fxq.integers.affine import ActQParams
from fxq.integers.observers import InputGram, Observer
from fxq.integers.weight_ranges import quantize_sites
from fxq.ops import Lowering
from fxq.ops.fallback import FloatFallbackWarning, float_report
from passes.insert_observers import INPUT_GRAMS, OBSERVERS


def convert(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Replace observers and float ops with integer ops.

    Each call is rewritten by its registry entry (`fxq.ops`); with q a uint8 tensor carrying an
    ``ActQParams`` record:

        observers.x(x)                 → quantize_input(x)            float → q, once
        conv(x) / linear(x)            → QConv2d / QLinear(q)         int8 W, int32 acc, requant
        relu(x)                        → QReLU(q)                     max(q, z)       placement "pre"
        relu(conv(x))                  → QConv2d(q), clamp at z = 0   no ReLU op      placement "post"
        relu(conv(x))                  → QRequantize(QReLU(QConv2d(q)))               placement "both"
        maxpool(x)                     → QMaxPool2d(q)                same scale
        flatten / view(x)              → unchanged, on q              same scale
        identity / dropout(x)          → removed
        avgpool(x)                     → QAvgPool2d(q)                sum, rounding division
        add(a, b)                      → quantize(add(dequantize(a), dequantize(b)))
                                         a float island that the quantize_add pass makes integer
        anything else, or overridden   → quantize(op(dequantize(x)))  kept in float (FloatOp record)
        return y                       → return dequantize(y)         the logits, once

    The graph runs correctly after this pass; only the adds still compute in float.
    """
    return _convert(gm, ctx, share_joins=True)


def convert_requantizing_joins(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """`convert`, except that every input of a concatenation keeps its own parameters and is
    requantized to the join's by the join (what ``scripts/zoo.py`` compares `convert` with:
    ``passes=[convert_requantizing_joins if p is convert else p for p in fxq.PASSES]``)."""
    return _convert(gm, ctx, share_joins=False)


def _convert(gm: fx.GraphModule, ctx: PassContext, share_joins: bool) -> fx.GraphModule:
    drop_shape_checks(gm)  # calibration ran them on real data: they held
    lo = Lowering(gm, ctx, dict(gm.named_modules()))
    _take_calibration_statistics(lo)
    if share_joins:
        _share_join_parameters(lo)
    _choose_weights(lo)
    on_tensors = set(ops.tensor_calls(gm.graph))
    for node in list(gm.graph.nodes):
        if node.op == "placeholder" and records.has(node, ActQParams):
            _quantize_input(gm, node, lo.rounding)
        elif node.op == "output":
            _dequantize_outputs(gm, node)
        elif node.op in ops.CALLS:
            ops.lower(lo, node)
    for container in (OBSERVERS, INPUT_GRAMS):
        gm.delete_submodule(container)
    late = [(node, why) for node, why in lo.late if node in on_tensors]  # not arithmetic on sizes
    if late:
        warnings.warn("with the calibrated parameters, " + float_report(late), FloatFallbackWarning, stacklevel=2)
    gm = finish(gm)
    _check_saveable(gm)
    return gm


def _take_calibration_statistics(lo: Lowering) -> None:
    """Observers become qparams on the observed node; input Grams are kept for their layer."""
    for node in list(lo.gm.graph.nodes):
        module = lo.module(node)
        if isinstance(module, Observer):
            if module.observed:  # it saw a float tensor (not sizes or indices)
                records.put(node.args[0], module.qparams())
                records.put(node.args[0], records.SampleShape(module.sample_shape))
        elif isinstance(module, InputGram):
            (layer,) = [user.target for user in node.users]
            lo.grams[layer] = module.gram_matrix
        else:
            continue
        node.replace_all_uses_with(node.args[0])
        lo.gm.graph.erase_node(node)


def _share_join_parameters(lo: Lowering) -> None:
    """Give each input of a concatenation the concatenation's parameters, so it is joined as it is.

    The concatenation's observer saw every input's values, so its range holds them all. An input
    made only for the join (a conv → ReLU read by nothing else) is then requantized once, by its
    producer, straight to the joined grid, instead of to its own grid and again by the join.
    Inputs read elsewhere too, the network input, and inputs of another width keep their own.
    """
    for node in lo.gm.graph.nodes:
        if node.op not in ops.CALLS or not ops.classify(node, lo.modules, lo.ctx)[0].concatenates:
            continue
        joined = records.get(node, ActQParams)
        for tensor in (t for t in node.all_input_nodes if joined is not None):
            source = _own_parameters(tensor, lo)
            if source is not None and records.get(source, ActQParams).bits == joined.bits:
                records.put(source, joined)


def _own_parameters(node: fx.Node, lo: Lowering) -> fx.Node | None:
    """The node whose parameters ``node``'s integers will have, if every step from it to ``node``
    is read by the next step only: ``node`` itself if observed, else back through ops that keep
    their input's parameters (ReLU, max pooling, reshapes)."""
    while isinstance(node, fx.Node) and len(node.users) == 1 and node.op in ops.CALLS:
        if records.has(node, ActQParams):
            return node
        if ops.classify(node, lo.modules, lo.ctx)[0].output is not ops.Output.SAME or not node.args:
            return None
        node = node.args[0]
    return None


def _choose_weights(lo: Lowering) -> None:
    """Integer weights for every quantized layer not given them by `passes.correct_bias`."""
    sites = {}
    for node in lo.gm.graph.nodes:
        op, _ = ops.classify(node, lo.modules) if node.op in ops.CALLS else (None, None)
        if op is not None and op.weighted and not records.has(node, records.QuantizedWeight):
            config = lo.ctx.config_for(module_name(node))
            if config is not None:
                sites[node] = (lo.modules[node.target].weight, config)
    grams = {node: lo.grams.get(node.target) for node in sites}
    for node, weights in quantize_sites(sites, grams, lo.ctx.chosen_weights).items():
        records.put(node, weights)


def _quantize_input(gm: fx.GraphModule, node: fx.Node, rounding: Rounding) -> None:
    calibration = records.get(node, records.Calibration)
    qp = records.get(node, ActQParams)
    fixed = records.has(node, records.FixedShape)
    path = add_module_near(gm, node, f"quantize_{node.name}", Quantize(qp, calibration.sample_shape, rounding, fixed))
    records.put(call_after(gm, node, path), qp)


def _dequantize_outputs(gm: fx.GraphModule, output: fx.Node) -> None:
    def dequantize(value: fx.Node) -> fx.Node:
        if not records.has(value, ActQParams):
            return value
        path = add_module_near(gm, output, "dequantize", Dequantize(records.get(value, ActQParams)))
        with gm.graph.inserting_before(output):
            return gm.graph.call_module(path, (value,))

    output.args = fx.map_arg(output.args, dequantize)


_SAVEABLE = frozenset(saved_graph.FUNCTIONS.values())


def _check_saveable(gm: fx.GraphModule) -> None:
    """Every call left is one fxq can save (a file never holds code): a function or method another
    library adds (``torch.ops.torchvision.nms``) is refused when quantize returns, by name and
    line, never at save."""
    foreign = [n for n in gm.graph.nodes if (n.op == "call_function" and n.target not in _SAVEABLE)
               or (n.op == "call_method" and n.target not in saved_graph.METHODS)]
    if foreign:
        calls = "".join(f"\n  '{n.name}' calls {getattr(n.target, '__name__', n.target)} at "
                        f"{source_line(n) or 'an unknown line'}" for n in foreign)
        raise TypeError(
            f"{len(foreign)} call(s) are to functions fxq neither has an integer form for nor can save "
            f"(a file never holds code):{calls}\nFix: move them out of the forward (post-processing), or "
            "into a submodule kept whole and in float with overrides={'name': None} (it then runs in this "
            "process only)")
