"""insert_observers: an observer after every value that gets a scale of its own."""
from __future__ import annotations

import math
import warnings

import torch
from torch import fx, nn

from fxq import ops
from fxq.config import QConfig
from fxq.graphs import records
from fxq.graphs.context import PassContext
from fxq.graphs.graph import call_after, finish, label, module_name, scope_of
from fxq.integers.observers import InputGram, make_observer
from fxq.ops.activations import clamp_bounds
from fxq.ops.fallback import FloatFallbackWarning, float_report

OBSERVERS = "observers"  # the submodule holding one observer per observed node
INPUT_GRAMS = "input_grams"  # the submodule holding the output-aware weight rule's statistics


def insert_observers(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Insert an observer call after each value that is quantized with new parameters.

    Before: ``y = conv(x)``. After: ``y = observers.conv(conv(x))``, an identity that records
    ``y``'s range. Observed: every model input, and every value with parameters of its own (its
    registry entry's ``output`` is ``Output.OWN``: conv, linear, add, and every call that will
    run in float, whose output is quantized again after it).
    For a fused unit ``relu(conv(x))`` (`passes.fuse`) the producer's ``placement`` decides:
    "pre" observes the conv output only, "post" the ReLU output only, "both" each of them.
    Other ReLUs, pooling, flatten and view keep their input's scale and get no observer. A layer whose config asks for
    ``weight_range="output_aware"`` or ``bias_correction`` also gets ``input_grams.<layer>`` on its
    input edge (the input's mean, and its Gram matrix for output_aware).

    Each observer follows the config of the layer producing the value (``ctx.config_for``). An
    ``overrides`` pattern that matches no module raises a ``ValueError`` listing close matches.
    """
    modules = dict(gm.named_modules())
    kept = ops.float_calls(gm, ctx)
    if kept:
        warnings.warn(float_report(kept), FloatFallbackWarning, stacklevel=2)
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    ctx.register_layers(list(dict.fromkeys(module_name(n) for n in calls if _is_weighted(n, modules))),
                        list(dict.fromkeys(module_name(n) for n in calls)))
    containers = {OBSERVERS: nn.Module(), INPUT_GRAMS: nn.Module()}
    for name, container in containers.items():
        gm.add_module(name, container)
    for node in list(gm.graph.nodes):
        if node.op == "placeholder" or _needs_observer(node, modules, ctx):
            config = _producer_config(_unit_producer(node), ctx)
            observer = make_observer(config, f"the value of {label(node)}")
            observer.domain = _kept_by_activation(node, modules, config.placement)
            _insert_after(gm, node, containers[OBSERVERS], observer)
        if _is_weighted(node, modules):
            config = ctx.config_for(module_name(node))
            if config is not None and (config.weight_range == "output_aware" or config.bias_correction):
                _insert_on_input(gm, node, containers[INPUT_GRAMS], modules[node.target],
                                 gram=config.weight_range == "output_aware")
    return finish(gm)


def set_observer_widths(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Give each observer in ``gm`` the activation width ``ctx`` quantizes its value to.

    What an observer records does not depend on the width (it enters when the range is read,
    `fxq.integers.observers.Observer.range`), so one calibrated graph serves every activation width
    (`fxq.api.Calibrated`): this re-targets a copy of it."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target.startswith(f"{OBSERVERS}."):
            observed = node.args[0]
            gm.get_submodule(node.target).bits = _producer_config(_unit_producer(observed), ctx).act_bits


def _producer_config(node: fx.Node, ctx: PassContext) -> QConfig:
    """The config that quantizes ``node``'s output: its layer's, or the global one for inputs,
    adds (by their enclosing block) and float layers."""
    if node.op == "placeholder":
        return ctx.input_config()
    name = module_name(node) if node.op == "call_module" else scope_of(node)
    config = ctx.config_for(name) if name else ctx.config
    return config or ctx.config


def _added(container: nn.Module, node: fx.Node, module: nn.Module) -> str:
    """``module`` registered in ``container`` under the node's name (``to_`` for a node named
    ``to``: a name an ``nn.Module`` already has as an attribute cannot be a submodule's)."""
    name = node.name
    while hasattr(container, name):
        name += "_"
    container.add_module(name, module)
    return name


def _insert_after(gm: fx.GraphModule, node: fx.Node, container: nn.Module, observer: nn.Module):
    call_after(gm, node, f"{OBSERVERS}.{_added(container, node, observer)}")


def _insert_on_input(gm: fx.GraphModule, node: fx.Node, container: nn.Module, layer: nn.Module,
                     gram: bool):
    name = _added(container, node, InputGram(layer, f"the input of {label(node)}", gram))
    with gm.graph.inserting_before(node):
        gram = gm.graph.call_module(f"{INPUT_GRAMS}.{name}", (node.args[0],))
    node.args = (gram,) + tuple(node.args[1:])


def _is_weighted(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and ops.classify(node, modules)[0].weighted


def _needs_observer(node: fx.Node, modules: dict[str, nn.Module], ctx: PassContext) -> bool:
    """Values with parameters of their own: outputs of entries with ``Output.OWN`` (layers,
    adds, and every call kept in float), as the fused unit's placement allows."""
    if node.op not in ops.CALLS:
        return False
    unit = records.get(node, records.FusedUnit)
    if unit is None:
        return ops.classify(node, modules, ctx)[0].output is ops.Output.OWN
    placement = _producer_config(unit.producer, ctx).placement
    if node is unit.producer:
        return placement in ("pre", "both")
    return placement in ("post", "both")


def _kept_by_activation(node: fx.Node, modules: dict[str, nn.Module], placement: str) -> tuple[float, float]:
    """The real interval the clamp after a unit's producer keeps of its value (``(−∞, ∞)`` for
    other values): with placement "pre" only those values reach the rest of the network, so the
    range is chosen on them (a ReLU's negatives all become 0 whatever their integer). "both" asks
    for the pre-activation value on a grid of its own, so it keeps its whole range."""
    unit = records.get(node, records.FusedUnit)
    if placement != "pre" or unit is None or node is not unit.producer:
        return -math.inf, math.inf
    low, high = clamp_bounds(unit.activation, modules.get(unit.activation.target))
    low = -math.inf if low is None else float(torch.as_tensor(low).min())
    high = math.inf if high is None else float(torch.as_tensor(high).max())
    return low, high


def _unit_producer(node: fx.Node) -> fx.Node:
    """The node whose config quantizes ``node``'s value: the producer of its fused unit, if any."""
    unit = records.get(node, records.FusedUnit)
    return node if unit is None else unit.producer
