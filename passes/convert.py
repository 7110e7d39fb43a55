"""convert: observed float graph → integer graph (qparams, integer weights, integer ops)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx, nn

from fxq import records
from fxq.affine import ActQParams
from fxq.context import PassContext
from fxq.graph import add_module_near, finish, label, module_name, replace_module
from fxq.observers import InputGram, Observer
from fxq.ops import Kind, kind_of
from fxq.qmodules import Dequantize, QAvgPool2d, QConv2d, QLinear, QMaxPool2d, QReLU, QRequantize, Quantize
from fxq.weight_ranges import quantize_sites
from passes.insert_observers import INPUT_GRAMS, OBSERVERS

@dataclass
class _State:
    """What the rules share while converting one graph."""

    gm: fx.GraphModule
    ctx: PassContext
    modules: dict[str, nn.Module]
    grams: dict[str, torch.Tensor] = field(default_factory=dict)  # layer → H of its input


def convert(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Replace observers and float ops with integer ops.

    Before → after (q: uint8 tensor, with its ``ActQParams`` record):

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
        conv(x), overridden to None    → quantize(conv(dequantize(x)))   a layer kept in float
        return y                       → return dequantize(y)         the logits, once

    The graph runs correctly after this pass; only the adds still compute in float.
    """
    state = _State(gm, ctx, dict(gm.named_modules()))
    _take_calibration_statistics(state)
    _choose_weights(state)
    for node in list(gm.graph.nodes):
        if node.op == "placeholder" and records.has(node, ActQParams):
            _quantize_input(gm, node)
        elif node.op == "output":
            _dequantize_outputs(gm, node)
        elif node.op in ("call_module", "call_function", "call_method"):
            RULES[kind_of(node, state.modules)](state, node)
    for container in (OBSERVERS, INPUT_GRAMS):
        gm.delete_submodule(container)
    return finish(gm)


def _take_calibration_statistics(state: _State) -> None:
    """Observers become qparams on the observed node; input Grams are kept for their layer."""
    for node in list(state.gm.graph.nodes):
        module = state.modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, Observer):
            records.put(node.args[0], module.qparams())
        elif isinstance(module, InputGram):
            (layer,) = [user.target for user in node.users]
            state.grams[layer] = module.gram
        else:
            continue
        node.replace_all_uses_with(node.args[0])
        state.gm.graph.erase_node(node)


def _choose_weights(state: _State) -> None:
    """Integer weights for every quantized layer not given them by `passes.correct_bias`."""
    sites = {}
    for node in state.gm.graph.nodes:
        if node.op == "call_module" and kind_of(node, state.modules) is Kind.WEIGHTED and not records.has(node, records.QuantizedWeight):
            config = state.ctx.config_for(module_name(node))
            if config is not None:
                sites[node] = (state.modules[node.target].weight, config)
    grams = {node: state.grams.get(node.target) for node in sites}
    for node, weights in quantize_sites(sites, grams).items():
        records.put(node, weights)


def qparams_of(node: fx.Node, user: fx.Node) -> ActQParams:
    """The parameters of the integer value ``node`` feeding ``user``; an error if it is float."""
    if not records.has(node, ActQParams):
        raise ValueError(f"{label(user)} reads {node}, which is not quantized: fxq needs every "
                         "input of an integer op to come from the quantized network input")
    return records.get(node, ActQParams)


def _quantize_input(gm: fx.GraphModule, node: fx.Node) -> None:
    calibration = records.get(node, records.Calibration)
    qp = records.get(node, ActQParams)
    path = add_module_near(gm, node, f"quantize_{node.name}", Quantize(qp, calibration.sample_shape))
    with gm.graph.inserting_after(node):
        quantized = gm.graph.call_module(path, (node,))
    node.replace_all_uses_with(quantized, delete_user_cb=lambda user: user is not quantized)
    records.put(quantized, qp)


def _dequantize_outputs(gm: fx.GraphModule, output: fx.Node) -> None:
    def dequantize(value: fx.Node) -> fx.Node:
        if not records.has(value, ActQParams):
            return value
        path = add_module_near(gm, output, "dequantize", Dequantize(records.get(value, ActQParams)))
        with gm.graph.inserting_before(output):
            return gm.graph.call_module(path, (value,))

    output.args = fx.map_arg(output.args, dequantize)


def _weighted(state: _State, node: fx.Node) -> None:
    config = state.ctx.config_for(module_name(node))
    if config is None:  # kept in float by an override
        _float_island(state, node)
        return
    layer = state.modules[node.target]
    weights = records.get(node, records.QuantizedWeight)
    make = QConv2d if isinstance(layer, nn.Conv2d) else QLinear
    replace_module(state.gm, node.target, make(layer, weights, qparams_of(node.args[0], node),
                                               _output_qparams(node), node.target))


def _output_qparams(node: fx.Node) -> ActQParams:
    """A producer's output parameters: its own observer's, or with placement "post" (no observer
    on the producer) those of its ReLU's output, whose z = 0 makes the clamp the ReLU."""
    if not records.has(node, ActQParams):
        records.put(node, records.get(records.get(node, records.FusedUnit).activation, ActQParams))
    return records.get(node, ActQParams)


def _activation(state: _State, node: fx.Node) -> None:
    source = node.args[0]
    qp = qparams_of(source, node)
    after = records.get(node, ActQParams)
    if after is qp:  # placement "post": the producer's clamp at z = 0 already did the ReLU
        node.replace_all_uses_with(source)
        state.gm.graph.erase_node(node)
        return
    leaf = node.target.rpartition(".")[2] if node.op == "call_module" else node.name
    if after is not None:  # placement "both": a second quantization, after the ReLU
        path = add_module_near(state.gm, node, f"{leaf}_requantize", QRequantize(qp, after))
    relu = QReLU(qp.zero_point)
    if node.op == "call_module":
        replace_module(state.gm, node.target, relu)
        target = node.target
    else:
        target = add_module_near(state.gm, node, leaf, relu)
    # Rewritten in place so the node keeps its name (layer1_0_relu) in the printed code.
    node.op, node.target, node.args, node.kwargs = "call_module", target, (source,), {}
    records.put(node, qp)
    if after is not None:
        with state.gm.graph.inserting_after(node):
            requantized = state.gm.graph.call_module(path, (node,))
        node.replace_all_uses_with(requantized, delete_user_cb=lambda user: user is not requantized)
        records.put(requantized, after)


def _passthrough(state: _State, node: fx.Node) -> None:
    source = node.args[0]
    qp = qparams_of(source, node)
    module = state.modules.get(node.target) if node.op == "call_module" else None
    if isinstance(module, (nn.Identity, nn.Dropout)):
        node.replace_all_uses_with(source)
        state.gm.graph.erase_node(node)
        return
    if isinstance(module, nn.MaxPool2d):
        pool = QMaxPool2d(module.kernel_size, module.stride, module.padding, module.dilation,
                          ceil_mode=module.ceil_mode)
        replace_module(state.gm, node.target, pool)
    records.put(node, qp)


def _avgpool(state: _State, node: fx.Node) -> None:
    qp = qparams_of(node.args[0], node)
    if node.op == "call_module":
        replace_module(state.gm, node.target, _integer_pool(state.modules[node.target], node, qp))
    else:
        pool = _integer_pool(nn.AdaptiveAvgPool2d(node.args[1]), node, qp)
        path = add_module_near(state.gm, node, "avgpool", pool)
        node.op, node.target, node.args, node.kwargs = "call_module", path, node.args[:1], {}
    records.put(node, qp)


def _integer_pool(pool: nn.Module, node: fx.Node, qp: ActQParams) -> QAvgPool2d:
    if isinstance(pool, nn.AdaptiveAvgPool2d):
        if pool.output_size in (1, (1, 1)):
            return QAvgPool2d(None, None, qp.zero_point)
        raise ValueError(f"{label(node)}: adaptive average pooling to {pool.output_size} is not "
                         "supported; pool to 1×1 or use AvgPool2d with a fixed window")
    kernel = _pair(pool.kernel_size)
    stride = _pair(pool.stride or pool.kernel_size)
    if _pair(pool.padding) != (0, 0) or pool.ceil_mode:
        raise ValueError(f"{label(node)}: average pooling with padding or ceil_mode is not "
                         "supported; use padding=0, ceil_mode=False")
    return QAvgPool2d(kernel, stride, qp.zero_point)


def _float_island(state: _State, node: fx.Node) -> None:
    """Run ``node`` in float between integers: dequantize its inputs, quantize its output."""
    gm = state.gm
    inputs = []
    for operand in node.args:
        if isinstance(operand, fx.Node):
            path = add_module_near(gm, node, f"{node.name}_dequantize",
                                   Dequantize(qparams_of(operand, node)))
            with gm.graph.inserting_before(node):
                operand = gm.graph.call_module(path, (operand,))
        inputs.append(operand)
    node.args = tuple(inputs)
    path = add_module_near(gm, node, f"{node.name}_quantize", Quantize(_output_qparams(node), None))
    with gm.graph.inserting_after(node):
        quantized = gm.graph.call_module(path, (node,))
    node.replace_all_uses_with(quantized, delete_user_cb=lambda user: user is not quantized)
    records.put(quantized, records.pop(node, ActQParams))


def _shape(state: _State, node: fx.Node) -> None:
    """x.size() returns Python ints: nothing to quantize."""


def _unsupported(state: _State, node: fx.Node) -> None:
    raise ValueError(f"{label(node)} has no integer implementation; run insert_observers first, "
                     "which names the unsupported op")


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


Rule = Callable[[_State, fx.Node], None]
RULES: dict[Kind | None, Rule] = {
    Kind.WEIGHTED: _weighted,
    Kind.ACTIVATION: _activation,
    Kind.PASSTHROUGH: _passthrough,
    Kind.AVGPOOL: _avgpool,
    Kind.ADD: _float_island,
    Kind.SHAPE: _shape,
    None: _unsupported,
}
