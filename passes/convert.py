"""convert: observed float graph → integer graph (qparams, integer weights, integer ops)."""
from __future__ import annotations

from typing import Callable

from torch import fx, nn

from fxq import intmath
from fxq.affine import ActQParams
from fxq.config import QConfig
from fxq.context import PassContext
from fxq.graph import add_module_near, finish, label, replace_module
from fxq.observers import Observer
from fxq.ops import Kind, kind_of
from fxq.qmodules import Dequantize, QAvgPool2d, QConv2d, QLinear, Quantize
from passes import calibrate as calibrate_pass
from passes.insert_observers import OBSERVERS

META = "fxq.qparams"  # ActQParams of the integer value a node produces


def convert(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Replace observers and float ops with integer ops.

    Before → after (q: uint8 tensor, with its ``ActQParams`` in ``node.meta["fxq.qparams"]``):

        observers.x(x)                 → quantize_input(x)            float → q, once
        conv(x) / linear(x)            → QConv2d / QLinear(q)         int8 W, int32 acc, requant
        relu(x)                        → intmath.relu(q, z)           max(q, z)
        maxpool / flatten / view(x)    → unchanged, on q              same scale
        identity / dropout(x)          → removed
        avgpool(x)                     → QAvgPool2d(q)                sum, rounding division
        add(a, b)                      → quantize(add(dequantize(a), dequantize(b)))
                                         a float island that the quantize_add pass makes integer
        return y                       → return dequantize(y)         the logits, once

    The graph runs correctly after this pass; only the adds still compute in float.
    """
    modules = dict(gm.named_modules())
    _take_observed_ranges(gm, modules, ctx.config.act_bits)
    for node in list(gm.graph.nodes):
        if node.op == "placeholder" and META in node.meta:
            _quantize_input(gm, node)
        elif node.op == "output":
            _dequantize_outputs(gm, node)
        elif node.op in ("call_module", "call_function", "call_method"):
            RULES[kind_of(node, modules)](gm, node, modules, ctx.config)
    gm.delete_submodule(OBSERVERS)
    return finish(gm)


def _take_observed_ranges(gm: fx.GraphModule, modules: dict[str, nn.Module], bits: int) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(modules[node.target], Observer):
            observed = node.args[0]
            observed.meta[META] = modules[node.target].qparams(bits)
            node.replace_all_uses_with(observed)
            gm.graph.erase_node(node)


def qparams_of(node: fx.Node, user: fx.Node) -> ActQParams:
    """The parameters of the integer value ``node`` feeding ``user``; an error if it is float."""
    if not isinstance(node, fx.Node) or META not in node.meta:
        raise ValueError(f"{label(user)} reads {node}, which is not quantized: fxq needs every "
                         "input of an integer op to come from the quantized network input")
    return node.meta[META]


def _quantize_input(gm: fx.GraphModule, node: fx.Node) -> None:
    calibration = node.meta[calibrate_pass.META]
    qp = node.meta[META]
    path = add_module_near(gm, node, f"quantize_{node.name}", Quantize(qp, calibration.sample_shape))
    with gm.graph.inserting_after(node):
        quantized = gm.graph.call_module(path, (node,))
    node.replace_all_uses_with(quantized, delete_user_cb=lambda user: user is not quantized)
    quantized.meta[META] = qp


def _dequantize_outputs(gm: fx.GraphModule, output: fx.Node) -> None:
    def dequantize(value: fx.Node) -> fx.Node:
        if META not in value.meta:
            return value
        path = add_module_near(gm, output, "dequantize", Dequantize(value.meta[META]))
        with gm.graph.inserting_before(output):
            return gm.graph.call_module(path, (value,))

    output.args = fx.map_arg(output.args, dequantize)


def _weighted(gm, node, modules, config: QConfig) -> None:
    layer = modules[node.target]
    make = QConv2d if isinstance(layer, nn.Conv2d) else QLinear
    replace_module(gm, node.target, make(layer, qparams_of(node.args[0], node), node.meta[META],
                                         config, node.target))


def _activation(gm, node, modules, config: QConfig) -> None:
    source = node.args[0]
    qp = qparams_of(source, node)
    # Rewritten in place so the node keeps its name (layer1_0_relu) in the printed code.
    node.op, node.target, node.args, node.kwargs = "call_function", intmath.relu, (source, qp.zero_point), {}
    node.meta[META] = qp


def _passthrough(gm, node, modules, config: QConfig) -> None:
    source = node.args[0]
    qp = qparams_of(source, node)
    if node.op == "call_module" and isinstance(modules[node.target], (nn.Identity, nn.Dropout)):
        _replace(gm, node, source)
    else:
        node.meta[META] = qp


def _avgpool(gm, node, modules, config: QConfig) -> None:
    qp = qparams_of(node.args[0], node)
    if node.op == "call_module":
        pool = modules[node.target]
        replace_module(gm, node.target, _integer_pool(pool, node))
        node.meta[META] = qp
        return
    path = add_module_near(gm, node, "avgpool", _integer_pool(nn.AdaptiveAvgPool2d(node.args[1]), node))
    node.op, node.target, node.args, node.kwargs = "call_module", path, node.args[:1], {}
    node.meta[META] = qp


def _integer_pool(pool: nn.Module, node: fx.Node) -> QAvgPool2d:
    if isinstance(pool, nn.AdaptiveAvgPool2d):
        if pool.output_size in (1, (1, 1)):
            return QAvgPool2d(None, None)
        raise ValueError(f"{label(node)}: adaptive average pooling to {pool.output_size} is not "
                         "supported; pool to 1×1 or use AvgPool2d with a fixed window")
    kernel = _pair(pool.kernel_size)
    stride = _pair(pool.stride or pool.kernel_size)
    if _pair(pool.padding) != (0, 0) or pool.ceil_mode:
        raise ValueError(f"{label(node)}: average pooling with padding or ceil_mode is not "
                         "supported; use padding=0, ceil_mode=False")
    return QAvgPool2d(kernel, stride)


def _float_add(gm, node, modules, config: QConfig) -> None:
    a, b = node.args[:2]
    inputs = []
    for operand in (a, b):
        qp = qparams_of(operand, node)
        path = add_module_near(gm, node, f"{node.name}_dequantize", Dequantize(qp))
        with gm.graph.inserting_before(node):
            inputs.append(gm.graph.call_module(path, (operand,)))
    node.args = tuple(inputs) + tuple(node.args[2:])
    path = add_module_near(gm, node, f"{node.name}_quantize", Quantize(node.meta[META], None))
    with gm.graph.inserting_after(node):
        quantized = gm.graph.call_module(path, (node,))
    node.replace_all_uses_with(quantized, delete_user_cb=lambda user: user is not quantized)
    quantized.meta[META] = node.meta.pop(META)


def _shape(gm, node, modules, config: QConfig) -> None:
    """x.size() returns Python ints: nothing to quantize."""


def _unsupported(gm, node, modules, config: QConfig) -> None:
    raise ValueError(f"{label(node)} has no integer implementation; run insert_observers first, "
                     "which names the unsupported op")


def _replace(gm: fx.GraphModule, node: fx.Node, replacement: fx.Node) -> None:
    node.replace_all_uses_with(replacement)
    gm.graph.erase_node(node)


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


Rule = Callable[[fx.GraphModule, fx.Node, dict, QConfig], None]
RULES: dict[Kind | None, Rule] = {
    Kind.WEIGHTED: _weighted,
    Kind.ACTIVATION: _activation,
    Kind.PASSTHROUGH: _passthrough,
    Kind.AVGPOOL: _avgpool,
    Kind.ADD: _float_add,
    Kind.SHAPE: _shape,
    None: _unsupported,
}
