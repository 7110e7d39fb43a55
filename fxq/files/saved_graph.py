"""The graph of a saved model as data (`fxq.files.serialize`): each node a record of plain values, read
back by name from fixed tables only (:data:`FUNCTIONS`, :data:`METHODS`), every name an
identifier, every argument checked; anything else is an :class:`InvalidModelFile`."""
from __future__ import annotations

import keyword
import re

import torch
from torch import fx

from fxq import ops
from fxq.files import schema as sc
from fxq.graphs import records
from fxq.integers.affine import ActQParams
from fxq.ops.shape import SHAPE_ATTRIBUTES

PLAIN = (int, float, str, bool, type(None))
MAX_REASON = 1000  # characters of why an op runs in float
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# a key of a dict the model returns (torchvision's FPN: "0", "pool"); torch.fx writes it with repr
DATA_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float64, torch.float16,
                                                    torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool)}
OPS = ("placeholder", "call_module", "call_function", "call_method", "get_attr", "output")
# the functions and methods a saved graph may call: its ops' forms, and the float fallback's
FUNCTIONS = {f"{fn.__module__}.{fn.__name__}": fn for op in (*ops.REGISTRY, ops.FLOAT) for fn in op.functions}
METHODS = frozenset(m for op in (*ops.REGISTRY, ops.FLOAT) for m in op.methods)


class InvalidModelFile(ValueError):
    """The file is not a valid fxq model: damaged, written by something else, or crafted."""


def expect(condition: bool, problem: str) -> None:
    if not condition:
        raise InvalidModelFile(problem)


def is_identifier(name) -> bool:
    return isinstance(name, str) and IDENTIFIER.match(name) is not None and not keyword.iskeyword(name)


def node_record(node: fx.Node) -> dict:
    target = node.target
    if node.op == "call_function":
        target = next((name for name, fn in FUNCTIONS.items() if fn is node.target), None)
        if target is None:
            raise ValueError(f"cannot save node '{node.name}': function {node.target} is not one "
                             "fxq knows how to save")
    qparams, kept = records.get(node, ActQParams), records.get(node, records.FloatOp)
    return {"name": node.name, "op": node.op, "target": target,
            "args": _encode(node.args), "kwargs": _encode(node.kwargs),
            "qparams": None if qparams is None else [qparams.scale, qparams.zero_point, qparams.bits],
            "float_reason": None if kept is None else kept.reason}


def node_from(graph: fx.Graph, record, nodes: dict[str, fx.Node], modules: dict, constants: dict) -> fx.Node:
    expect(isinstance(record, dict) and set(record) == {"name", "op", "target", "args", "kwargs", "qparams",
                                                         "float_reason"},
            "a graph entry is not a node record")
    name, op, target = record["name"], record["op"], record["target"]
    expect(is_identifier(name) and name not in nodes, f"node name {name!r} is not a new identifier")
    expect(op in OPS, f"node '{name}' has op {op!r}")
    target = _target(name, op, target, modules, constants)
    args, kwargs = _decode(record["args"], nodes), _decode(record["kwargs"], nodes)
    expect(isinstance(args, tuple) and isinstance(kwargs, dict), f"node '{name}' has malformed arguments")
    expect(all(map(is_identifier, kwargs)), f"node '{name}': keyword arguments must be identifiers")
    if target is getattr:
        expect(len(args) == 2 and args[1] in SHAPE_ATTRIBUTES | RESULT_FIELDS,
               f"node '{name}' reads an attribute fxq never reads")
    node = graph.create_node(op, target, args, kwargs, name)
    expect(node.name == name, f"node name {name!r} is reserved")
    if record["qparams"] is not None:
        records.put(node, _qparams_from(name, record["qparams"]))
    reason = record["float_reason"]
    if reason is not None:  # shown to the user as text, never run
        expect(isinstance(reason, str) and len(reason) <= MAX_REASON, f"node '{name}' has a malformed float reason")
        records.put(node, records.FloatOp(reason))
    return node


def _target(name: str, op: str, target, modules: dict, constants: dict):
    if op == "call_function":
        expect(isinstance(target, str) and target in FUNCTIONS,
                f"node '{name}' calls {target!r}, which fxq does not load")
        return FUNCTIONS[target]
    if op == "call_method":
        expect(target in METHODS, f"node '{name}' calls method {target!r}, which fxq does not load")
    elif op == "call_module":
        expect(isinstance(target, str) and target in modules,
                f"node '{name}' calls {target!r}, not a module of the file")
    elif op == "placeholder":
        expect(is_identifier(target), f"input {target!r} is not an identifier")
    elif op == "output":
        expect(target == "output", f"node '{name}' is an output with target {target!r}")
    elif op == "get_attr":
        expect(isinstance(target, str) and target in constants,
                f"node '{name}' reads {target!r}, not a constant of the file")
    else:
        expect(False, f"node '{name}': {op} nodes are not part of an fxq model")
    return target


def _qparams_from(name: str, values) -> ActQParams:
    expect(isinstance(values, list) and len(values) == 3, f"node '{name}' has malformed quantization parameters")
    scale, zero_point, bits = values
    expect(isinstance(scale, float) and scale > 0 and scale < float("inf") and sc.act_bits(bits)
            and sc.is_int(zero_point) and 0 <= zero_point < (1 << bits),
            f"node '{name}' has quantization parameters out of range")
    return ActQParams(scale, zero_point, bits)


# what a float op may read of torch's named results (``x.topk(k).values``)
RESULT_FIELDS = frozenset({"values", "indices"})
DEVICES = ("cpu", "cuda", "mps")  # a traced branch may have read a tensor's device (fxq.graphs.shapes)


def _encode(value):
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, (tuple, list)):  # fx's immutable lists and torch.Size as plain ones
        return (list if isinstance(value, list) else tuple)(_encode(v) for v in value)
    if isinstance(value, dict):
        for key in value:
            if not _data_key(key):
                raise ValueError(f"cannot save a dict keyed {key!r}: keys must be short names of letters, digits, "
                                 "'_', '.', '-' or integers")
        return {"dict": {k: _encode(v) for k, v in value.items()}}
    if isinstance(value, slice):
        return {"slice": [_encode(v) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"ellipsis": None}
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device) and value.type in DEVICES:
        return {"device": value.type}  # the kind only: a loaded model runs where it is moved
    if isinstance(value, PLAIN):
        return value
    raise ValueError(f"cannot save a graph argument of type {type(value).__name__}")


def _data_key(key) -> bool:
    return sc.is_int(key) or (isinstance(key, str) and DATA_KEY.match(key) is not None)


def _decode(value, nodes: dict[str, fx.Node]):
    if isinstance(value, dict):
        expect(set(value) in ({"node"}, {"dict"}, {"slice"}, {"ellipsis"}, {"dtype"}, {"device"}),
                "a graph argument is malformed")
        if "device" in value:
            expect(value["device"] in DEVICES, f"device {value['device']!r} is not one fxq loads")
            return torch.device(value["device"])
        if "slice" in value:
            expect(isinstance(value["slice"], list) and len(value["slice"]) == 3, "a malformed slice")
            return slice(*(_decode(v, nodes) for v in value["slice"]))
        if "ellipsis" in value:
            return Ellipsis
        if "dtype" in value:
            expect(value["dtype"] in DTYPES, f"dtype {value['dtype']!r} is not one fxq loads")
            return DTYPES[value["dtype"]]
        if "node" in value:
            expect(isinstance(value["node"], str) and value["node"] in nodes,
                    f"an argument names node {value['node']!r}, which is not defined before it")
            return nodes[value["node"]]
        entries = value["dict"]
        expect(isinstance(entries, dict) and all(_data_key(k) for k in entries),
                "a dict's keys must be short names of letters, digits, '_', '.', '-' or integers")
        return {k: _decode(v, nodes) for k, v in entries.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_decode(v, nodes) for v in value)
    expect(isinstance(value, PLAIN), f"a graph argument of type {type(value).__name__}")
    return value
