"""`fxq.save` / `fxq.load`: a quantized model as data — integer tensors, parameters, the graph
as a list of nodes, and the config. No pickled code: the file is read with
``torch.load(weights_only=True)`` and every module type and function it names must be one fxq
knows (``MODULE_TYPES``, ``FUNCTIONS``). Weights narrower than 8 bits are bit-packed.

    fxq.save(qmodel, "model.fxq")
    qmodel = fxq.load("model.fxq")        # bit-identical outputs
"""
from __future__ import annotations

import dataclasses
import operator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxq import intmath, packing, qmodules
from fxq.affine import ActQParams
from fxq.api import CONFIG
from fxq.config import QConfig
from fxq.qmodules import QLayer
from passes.convert import META as QPARAMS

FORMAT = "fxq/1"
MODULE_TYPES = {cls.__name__: cls for cls in (
    qmodules.Quantize, qmodules.Dequantize, qmodules.QConv2d, qmodules.QLinear, qmodules.QAdd,
    qmodules.QAvgPool2d, qmodules.QMaxPool2d, qmodules.QRequantize,
    # float layers a quantized graph may keep (overrides to None) and shape ops
    nn.Conv2d, nn.Linear, nn.ReLU, nn.Flatten, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AvgPool2d,
)}
FUNCTIONS = {f"{fn.__module__}.{fn.__name__}": fn for fn in (
    intmath.relu, operator.add, operator.iadd, torch.add, torch.flatten, torch.relu, F.relu,
    F.adaptive_avg_pool2d, getattr,
)}
PLAIN = (int, float, str, bool, type(None))


def save(qmodel: fx.GraphModule, path: str | Path) -> None:
    """Write ``qmodel`` (from `fxq.quantize` or `fxq.load`) to ``path``."""
    if not isinstance(qmodel, fx.GraphModule):
        raise TypeError(f"fxq.save takes the GraphModule fxq.quantize returned, got {type(qmodel).__name__}")
    modules = dict(qmodel.named_modules())
    targets = sorted({n.target for n in qmodel.graph.nodes if n.op == "call_module"})
    config = qmodel.meta.get(CONFIG)
    payload = {
        "format": FORMAT,
        "class_name": type(qmodel).__name__,
        "config": None if config is None else _config_fields(config),
        "modules": {target: _module_record(target, modules[target]) for target in targets},
        "graph": [_node_record(n) for n in qmodel.graph.nodes],
    }
    torch.save(payload, path)


def load(path: str | Path) -> fx.GraphModule:
    """Read a model written by :func:`save`; its outputs equal the saved model's bit for bit."""
    payload = torch.load(path, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an fxq model file ({FORMAT}); write one with fxq.save")
    root = nn.Module()
    for target, record in payload["modules"].items():
        _install(root, target, _module_from(target, record))
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for record in payload["graph"]:
        nodes[record["name"]] = _node_from(graph, record, nodes)
    gm = fx.GraphModule(root, graph, class_name=payload["class_name"])
    if payload["config"] is not None:
        gm.meta[CONFIG] = QConfig(**payload["config"])
    return gm


def _config_fields(config: QConfig) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}


def _module_record(target: str, module: nn.Module) -> dict:
    kind = type(module).__name__
    if MODULE_TYPES.get(kind) is not type(module):
        raise ValueError(f"cannot save '{target}': {kind} is not a module fxq knows how to save "
                         f"({sorted(MODULE_TYPES)})")
    tensors = {name: t.detach() for name, t in module.state_dict().items()}
    packed = {}
    if isinstance(module, QLayer):
        bits = packing.signed_width(module.weight)
        if bits < 8:
            packed["weight"] = {"bits": bits, "shape": list(module.weight.shape),
                                "data": packing.pack(tensors.pop("weight"), bits)}
    attributes = {k: v for k, v in vars(module).items() if _is_plain(v)}
    parameters = [name for name, _ in module.named_parameters(recurse=False)]
    return {"type": kind, "attributes": attributes, "tensors": tensors, "packed": packed,
            "parameters": parameters}


def _module_from(target: str, record: dict) -> nn.Module:
    cls = MODULE_TYPES.get(record["type"])
    if cls is None:
        raise ValueError(f"'{target}' has module type {record['type']!r}, which fxq does not load")
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    vars(module).update(record["attributes"])
    tensors = dict(record["tensors"])
    for name, entry in record["packed"].items():
        tensors[name] = packing.unpack(entry["data"], entry["bits"], tuple(entry["shape"]), torch.int8)
    for name, tensor in tensors.items():
        if name in record["parameters"]:
            module.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
        else:
            module.register_buffer(name, tensor)
    if hasattr(module, "prepare"):
        module.prepare()
    return module


def _install(root: nn.Module, target: str, module: nn.Module) -> None:
    owner = root
    *parents, leaf = target.split(".")
    for name in parents:
        if not hasattr(owner, name):
            owner.add_module(name, nn.Module())
        owner = getattr(owner, name)
    owner.add_module(leaf, module)


def _node_record(node: fx.Node) -> dict:
    target = node.target
    if node.op == "call_function":
        target = next((name for name, fn in FUNCTIONS.items() if fn is node.target), None)
        if target is None:
            raise ValueError(f"cannot save node '{node.name}': function {node.target} is not one "
                             "fxq knows how to save")
    qparams = node.meta.get(QPARAMS)
    return {"name": node.name, "op": node.op, "target": target,
            "args": _encode(node.args), "kwargs": _encode(node.kwargs),
            "qparams": None if qparams is None else [qparams.scale, qparams.zero_point, qparams.bits]}


def _node_from(graph: fx.Graph, record: dict, nodes: dict[str, fx.Node]) -> fx.Node:
    target = record["target"]
    if record["op"] == "call_function":
        if target not in FUNCTIONS:
            raise ValueError(f"node '{record['name']}' calls {target!r}, which fxq does not load")
        target = FUNCTIONS[target]
    node = graph.create_node(record["op"], target, _decode(record["args"], nodes),
                             _decode(record["kwargs"], nodes), record["name"])
    if record["qparams"] is not None:
        scale, zero_point, bits = record["qparams"]
        node.meta[QPARAMS] = ActQParams(scale, zero_point, bits)
    return node


def _encode(value):
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, (tuple, list)):
        return type(value)(_encode(v) for v in value)
    if isinstance(value, dict):
        return {"dict": {k: _encode(v) for k, v in value.items()}}
    if isinstance(value, PLAIN):
        return value
    raise ValueError(f"cannot save a graph argument of type {type(value).__name__}")


def _decode(value, nodes: dict[str, fx.Node]):
    if isinstance(value, dict):
        if "node" in value:
            return nodes[value["node"]]
        return {k: _decode(v, nodes) for k, v in value["dict"].items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_decode(v, nodes) for v in value)
    return value


def _is_plain(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_plain(v) for v in value)
    return isinstance(value, PLAIN)
