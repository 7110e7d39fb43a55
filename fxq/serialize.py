"""`fxq.save` / `fxq.load`: a quantized model as data — integer tensors, parameters, the graph
as a list of nodes, and the config. Weights narrower than 8 bits are bit-packed.

    fxq.save(qmodel, "model.fxq")
    qmodel = fxq.load("model.fxq")        # bit-identical outputs

What ``load`` guarantees for a file from anywhere: it never runs code the file carries. The file
is read with ``torch.load(weights_only=True)`` (tensors and plain data only, no pickled
objects), and since torch.fx turns node names and targets into Python source, nothing from the
file reaches the graph unchecked:

- every name (node, placeholder, keyword) is a plain Python identifier that torch.fx keeps as it
  is; a module path is dotted identifiers or Sequential indices and must name a module of the file;
- functions, methods and module types come from fixed tables (:data:`FUNCTIONS`,
  :data:`METHODS`, :data:`SCHEMAS`), looked up by name — a name is never imported or evaluated;
- each module is rebuilt from exactly the attributes and tensors its schema lists, each checked
  for type, dtype and range (zero points inside the width, multipliers in ``[0, 2^31)``, ...);
- a SHA-256 digest over the content catches a damaged file; a crafted file that passes every
  check must also run: ``load`` executes the model once on zeros of the calibration shape.

Anything else raises :class:`InvalidModelFile` naming the problem.
"""
from __future__ import annotations

import dataclasses
import hashlib
import keyword
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxq import packing, qmodules, records
from fxq.affine import ActQParams
from fxq.config import MAX_BITS, MIN_BITS, WIDE_ACT_BITS, QConfig
from fxq.ops import METHODS as METHOD_KINDS
from fxq.qmodules import QLayer

FORMAT = "fxq/2"
PLAIN = (int, float, str, bool, type(None))
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
INDEX = re.compile(r"(0|[1-9][0-9]{0,5})\Z")
OPS = ("placeholder", "call_module", "call_function", "call_method", "get_attr", "output")
FUNCTIONS = {f"{fn.__module__}.{fn.__name__}": fn for fn in (
    operator.add, operator.iadd, torch.add, torch.flatten, torch.relu, F.relu,
    F.adaptive_avg_pool2d, getattr,
)}
METHODS = frozenset(METHOD_KINDS)
GETATTR_NAMES = frozenset({"shape", "dtype", "ndim"})  # what getattr(x, name) may read


class InvalidModelFile(ValueError):
    """The file is not a valid fxq model: damaged, written by something else, or crafted."""


def save(qmodel: fx.GraphModule, path: str | Path) -> None:
    """Write ``qmodel`` (from `fxq.quantize` or `fxq.load`) to ``path``."""
    if not isinstance(qmodel, fx.GraphModule):
        raise TypeError(f"fxq.save takes the GraphModule fxq.quantize returned, got {type(qmodel).__name__}")
    modules = dict(qmodel.named_modules())
    targets = sorted({n.target for n in qmodel.graph.nodes if n.op == "call_module"})
    config = records.get(qmodel, QConfig)
    payload = {
        "format": FORMAT,
        "class_name": type(qmodel).__name__,
        "config": None if config is None else _config_fields(config),
        "modules": {target: _module_record(target, modules[target]) for target in targets},
        "graph": [_node_record(n) for n in qmodel.graph.nodes],
    }
    payload["sha256"] = digest(payload)
    torch.save(payload, path)


def load(path: str | Path) -> fx.GraphModule:
    """Read a model written by :func:`save`; its outputs equal the saved model's bit for bit.

    Raises :class:`InvalidModelFile` for anything that is not an intact fxq model file.
    """
    payload = _read(path)
    try:
        gm = _rebuild(payload)
        _smoke_run(gm)
    except InvalidModelFile as error:
        raise InvalidModelFile(f"{path} is not a valid fxq model file: {error}") from None
    except Exception as error:  # a checked file that still fails to build or run is corrupt
        raise InvalidModelFile(f"{path} is not a valid fxq model file: it does not build into a "
                               f"working model ({type(error).__name__}: {_first_line(error)})") from None
    return gm


def digest(payload: dict) -> str:
    """SHA-256 over everything in ``payload`` except its ``"sha256"`` entry, in a fixed order."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != "sha256"})
    return h.hexdigest()


def _feed(h, value) -> None:
    h.update(type(value).__name__.encode())
    if isinstance(value, dict):
        h.update(str(len(value)).encode())
        for key in sorted(value, key=repr):
            _feed(h, key)
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(str(len(value)).encode())
        for item in value:
            _feed(h, item)
    elif isinstance(value, torch.Tensor):
        h.update(f"{value.dtype}{tuple(value.shape)}".encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        h.update(repr(value).encode())


def _read(path: str | Path) -> dict:
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as error:  # torch's message may advise unsafe loading: never pass it on
        raise InvalidModelFile(
            f"{path} is not a valid fxq model file: it cannot be read as tensors and plain data "
            f"({type(error).__name__}; the file is damaged, truncated, or not written by fxq.save). "
            "Write it again with fxq.save") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise InvalidModelFile(f"{path} is not an fxq model file ({FORMAT}, found {found!r}); write "
                               "one with fxq.save (files of older fxq versions: quantize again)")
    if payload.get("sha256") != digest(payload):
        raise InvalidModelFile(f"{path} is damaged: its content does not match its SHA-256 digest")
    return payload


def _rebuild(payload: dict) -> fx.GraphModule:
    _expect(set(payload) == {"format", "class_name", "config", "modules", "graph", "sha256"},
            f"unexpected top-level entries {sorted(map(str, payload))}")
    _expect(_is_identifier(payload["class_name"]), "the class name is not an identifier")
    _expect(isinstance(payload["modules"], dict) and isinstance(payload["graph"], list),
            "modules must be a dict and graph a list")
    root = nn.Module()
    for target, record in payload["modules"].items():
        _expect(_is_path(target), f"module path {target!r} is not a dotted identifier")
        _install(root, target, _module_from(target, record))
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for record in payload["graph"]:
        node = _node_from(graph, record, nodes, payload["modules"])
        nodes[node.name] = node
    graph.lint()
    _expect(sum(n.op == "output" for n in graph.nodes) == 1, "the graph needs exactly one output")
    gm = fx.GraphModule(root, graph, class_name=payload["class_name"])
    if payload["config"] is not None:
        records.put(gm, _config_from(payload["config"]))
    return gm


def _smoke_run(gm: fx.GraphModule) -> None:
    """Run once on zeros of the calibration shape: a file that passes every check must also run."""
    inputs = [m for m in gm.modules() if isinstance(m, qmodules.Quantize) and m.sample_shape is not None]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    _expect(len(inputs) == 1 and len(placeholders) == 1,
            "expected one network input and its quantize step")
    with torch.no_grad():
        gm(torch.zeros(1, *inputs[0].sample_shape))


# ---------------------------------------------------------------- modules

Check = Callable[[object], bool]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _act_bits(v) -> bool:
    return _is_int(v) and (MIN_BITS <= v <= MAX_BITS or v == WIDE_ACT_BITS)


def _ints(low: int, length: int | None = None) -> Check:
    """A tuple of ints ≥ low (of ``length`` items, if given)."""
    return lambda v: (isinstance(v, tuple) and (length is None or len(v) == length)
                      and all(_is_int(x) and x >= low for x in v))


def _int_or_pair(low: int) -> Check:
    return lambda v: (_is_int(v) and v >= low) or _ints(low, 2)(v)


def _optional(check: Check) -> Check:
    return lambda v: v is None or check(v)


def _one_of(*values) -> Check:
    return lambda v: any(v == x and type(v) is type(x) for x in values)


@dataclass(frozen=True)
class Schema:
    """What a saved module of one type consists of: its attributes (each with a check) and its
    tensors (each with a dtype); ``build`` makes the module from them."""

    attributes: dict[str, Check]
    tensors: dict[str, torch.dtype]
    build: Callable[[type, dict, dict], nn.Module] | None = None  # None: restore the fields as they are
    optional_tensors: frozenset = frozenset()


_BITS_PAIR = lambda v: isinstance(v, tuple) and len(v) == 2 and all(map(_act_bits, v))  # noqa: E731
_LAYER_TENSORS = {"weight": torch.int8, "bias": torch.int32, "multiplier": torch.int32,
                  "shift": torch.int8, "weight_scale": torch.float64, "input_scale": torch.float64,
                  "output_scale": torch.float64, "input_zero_point": torch.int32,
                  "output_zero_point": torch.int32}
_BOUNDARY_TENSORS = {"scale": torch.float64, "zero_point": torch.int32}
_ADD_TENSORS = {f"{p}_{f}": torch.int64 for p in "ab" for f in ("zero_point", "multiplier", "shift")}
_ADD_TENSORS["output_zero_point"] = torch.int64


def _with_bias(cls, attributes, tensors) -> nn.Module:
    """A float conv or linear from its constructor's arguments; the bias if the file has one."""
    return cls(bias="bias" in tensors, **attributes)


SCHEMAS: dict[type, Schema] = {
    qmodules.Quantize: Schema({"bits": _act_bits, "sample_shape": _optional(_ints(1))}, _BOUNDARY_TENSORS),
    qmodules.Dequantize: Schema({"bits": _act_bits}, _BOUNDARY_TENSORS),
    qmodules.QConv2d: Schema({"input_bits": _act_bits, "output_bits": _act_bits, "stride": _ints(1, 2),
                              "padding": _ints(0, 2), "dilation": _ints(1, 2)}, _LAYER_TENSORS),
    qmodules.QLinear: Schema({"input_bits": _act_bits, "output_bits": _act_bits}, _LAYER_TENSORS),
    qmodules.QAdd: Schema({"input_bits": _BITS_PAIR, "output_bits": _act_bits}, _ADD_TENSORS),
    qmodules.QReLU: Schema({}, {"zero_point": torch.int32}),
    qmodules.QAvgPool2d: Schema({"kernel": _optional(_ints(1, 2)), "stride": _optional(_ints(1, 2))},
                                {"zero_point": torch.int32}),
    qmodules.QMaxPool2d: Schema({"kernel_size": _int_or_pair(1), "stride": _int_or_pair(1),
                                 "padding": _int_or_pair(0), "dilation": _int_or_pair(1),
                                 "return_indices": _one_of(False), "ceil_mode": _one_of(True, False)}, {}),
    qmodules.QRequantize: Schema({"input_bits": _act_bits, "output_bits": _act_bits},
                                 {"input_zero_point": torch.int32, "output_zero_point": torch.int32,
                                  "multiplier": torch.int32, "shift": torch.int8}),
    # float layers a quantized graph keeps (overrides to None), rebuilt by their constructors
    nn.Conv2d: Schema({"in_channels": lambda v: _is_int(v) and v > 0, "out_channels": lambda v: _is_int(v) and v > 0,
                       "kernel_size": _ints(1, 2), "stride": _ints(1, 2), "padding": lambda v: _ints(0, 2)(v) or _one_of("same", "valid")(v),
                       "dilation": _ints(1, 2), "groups": lambda v: _is_int(v) and v > 0,
                       "padding_mode": _one_of("zeros", "reflect", "replicate", "circular")},
                      {"weight": torch.float32, "bias": torch.float32}, _with_bias, frozenset({"bias"})),
    nn.Linear: Schema({"in_features": lambda v: _is_int(v) and v > 0, "out_features": lambda v: _is_int(v) and v > 0},
                      {"weight": torch.float32, "bias": torch.float32}, _with_bias, frozenset({"bias"})),
    nn.Flatten: Schema({"start_dim": _is_int, "end_dim": _is_int}, {},
                       lambda cls, attributes, tensors: cls(**attributes)),
}
MODULE_TYPES = {cls.__name__: cls for cls in SCHEMAS}


def _module_record(target: str, module: nn.Module) -> dict:
    schema = SCHEMAS.get(type(module))
    if schema is None:
        raise ValueError(f"cannot save '{target}': {type(module).__name__} is not a module fxq knows "
                         f"how to save ({sorted(MODULE_TYPES)})")
    tensors = {name: t.detach() for name, t in module.state_dict().items()}
    packed = {}
    if isinstance(module, QLayer):
        bits = packing.signed_width(module.weight)
        if bits < 8:
            packed["weight"] = {"bits": bits, "shape": list(module.weight.shape),
                                "data": packing.pack(tensors.pop("weight"), bits)}
    attributes = {name: getattr(module, name) for name in schema.attributes}
    return {"type": type(module).__name__, "attributes": attributes, "tensors": tensors, "packed": packed}


def _module_from(target: str, record) -> nn.Module:
    _expect(isinstance(record, dict) and set(record) == {"type", "attributes", "tensors", "packed"},
            f"'{target}' is not a module record")
    cls = MODULE_TYPES.get(record["type"]) if isinstance(record["type"], str) else None
    _expect(cls is not None, f"'{target}' has module type {record['type']!r}, which fxq does not load")
    schema = SCHEMAS[cls]
    attributes, tensors = record["attributes"], _tensors_of(target, record)
    _expect(isinstance(attributes, dict) and set(attributes) == set(schema.attributes),
            f"'{target}' ({cls.__name__}) must have the attributes {sorted(schema.attributes)}")
    for name, check in schema.attributes.items():
        _expect(check(attributes[name]), f"'{target}'.{name} = {attributes[name]!r} is out of range")
    required = set(schema.tensors) - schema.optional_tensors
    _expect(required <= set(tensors) <= set(schema.tensors),
            f"'{target}' ({cls.__name__}) must hold the tensors {sorted(schema.tensors)}")
    for name, tensor in tensors.items():
        _expect(tensor.dtype == schema.tensors[name],
                f"'{target}'.{name} is {tensor.dtype}, expected {schema.tensors[name]}")
    if schema.build is not None:
        module = schema.build(cls, dict(attributes), tensors)
        module.load_state_dict(tensors)
        return module.eval().requires_grad_(False)
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    vars(module).update(attributes)
    for name, tensor in tensors.items():
        module.register_buffer(name, tensor)
    _check_integers(target, module)
    if isinstance(module, qmodules.Derived):
        module.prepare()
    return module.eval()


def _tensors_of(target: str, record: dict) -> dict[str, torch.Tensor]:
    tensors, packed = record["tensors"], record["packed"]
    _expect(isinstance(tensors, dict) and isinstance(packed, dict), f"'{target}' has malformed tensors")
    tensors = dict(tensors)
    for name, entry in packed.items():
        _expect(name == "weight" and "weight" not in tensors and isinstance(entry, dict)
                and set(entry) == {"bits", "shape", "data"}, f"'{target}' has a malformed packed weight")
        bits, shape, data = entry["bits"], entry["shape"], entry["data"]
        _expect(_is_int(bits) and 2 <= bits < 8 and isinstance(shape, list) and 1 <= len(shape) <= 4
                and all(_is_int(s) and s > 0 for s in shape) and isinstance(data, torch.Tensor)
                and data.dtype == torch.uint8 and data.dim() == 1, f"'{target}' has a malformed packed weight")
        count = 1
        for size in shape:
            count *= size
        _expect(data.numel() == (count * bits + 7) // 8, f"'{target}': packed weight of the wrong size")
        tensors[name] = packing.unpack(data, bits, tuple(shape), torch.int8)
    _expect(all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()),
            f"'{target}' has tensors that are not tensors")
    return tensors


def _check_integers(target: str, module: nn.Module) -> None:
    """The ranges fxq's integer kernels rely on (see `fxq.intmath`)."""
    def scalar(name: str) -> int:
        value = getattr(module, name)
        _expect(value.dim() == 0, f"'{target}'.{name} must be a scalar")
        return int(value)

    def zero_point(name: str, bits: int) -> None:
        _expect(0 <= scalar(name) <= (1 << bits) - 1, f"'{target}'.{name} is outside its {bits}-bit range")

    def fixed_point(m: torch.Tensor, shift: torch.Tensor, name: str) -> None:
        _expect(bool((m >= 0).all() and (m < 2**31).all() and (shift < 31).all() and (shift >= -31).all()),
                f"'{target}': {name} multiplier or shift outside [0, 2^31) × [−31, 30]")

    if isinstance(module, (qmodules.Quantize, qmodules.Dequantize)):
        zero_point("zero_point", module.bits)
        _expect(float(module.scale) > 0 and bool(torch.isfinite(module.scale)), f"'{target}'.scale must be > 0")
    elif isinstance(module, QLayer):
        zero_point("input_zero_point", module.input_bits)
        zero_point("output_zero_point", module.output_bits)
        channels = module.weight.shape[0] if module.weight.dim() in (2, 4) else -1
        _expect(all(getattr(module, n).shape == (channels,) for n in ("bias", "multiplier", "shift", "weight_scale"))
                and (module.weight.dim() == 4) == isinstance(module, qmodules.QConv2d),
                f"'{target}': weight, bias, multiplier, shift and scales disagree in shape")
        _expect(int(module.weight.to(torch.int64).abs().max()) <= 127, f"'{target}'.weight outside ±127")
        fixed_point(module.multiplier.long(), module.shift.long(), "a channel's")
    elif isinstance(module, qmodules.QAdd):
        for prefix, bits in zip("ab", module.input_bits):
            zero_point(f"{prefix}_zero_point", bits)
            fixed_point(torch.tensor(scalar(f"{prefix}_multiplier")), torch.tensor(scalar(f"{prefix}_shift")), prefix)
        zero_point("output_zero_point", module.output_bits)
    elif isinstance(module, qmodules.QRequantize):
        zero_point("input_zero_point", module.input_bits)
        zero_point("output_zero_point", module.output_bits)
        fixed_point(torch.tensor(scalar("multiplier")), torch.tensor(scalar("shift")), "the")
    elif isinstance(module, (qmodules.QReLU, qmodules.QAvgPool2d)):
        zero_point("zero_point", 16)


def _install(root: nn.Module, target: str, module: nn.Module) -> None:
    owner = root
    *parents, leaf = target.split(".")
    for name in parents:
        if name not in owner._modules:
            owner.add_module(name, nn.Module())
        owner = owner._modules[name]
        _expect(type(owner) is nn.Module, f"module path {target!r} runs through a layer")
    _expect(leaf not in owner._modules and not hasattr(owner, leaf), f"module path {target!r} is taken")
    owner.add_module(leaf, module)


# ---------------------------------------------------------------- graph

def _node_record(node: fx.Node) -> dict:
    target = node.target
    if node.op == "call_function":
        target = next((name for name, fn in FUNCTIONS.items() if fn is node.target), None)
        if target is None:
            raise ValueError(f"cannot save node '{node.name}': function {node.target} is not one "
                             "fxq knows how to save")
    qparams = records.get(node, ActQParams)
    return {"name": node.name, "op": node.op, "target": target,
            "args": _encode(node.args), "kwargs": _encode(node.kwargs),
            "qparams": None if qparams is None else [qparams.scale, qparams.zero_point, qparams.bits]}


def _node_from(graph: fx.Graph, record, nodes: dict[str, fx.Node], modules: dict) -> fx.Node:
    _expect(isinstance(record, dict) and set(record) == {"name", "op", "target", "args", "kwargs", "qparams"},
            "a graph entry is not a node record")
    name, op, target = record["name"], record["op"], record["target"]
    _expect(_is_identifier(name) and name not in nodes, f"node name {name!r} is not a new identifier")
    _expect(op in OPS, f"node '{name}' has op {op!r}")
    target = _target(name, op, target, modules)
    args, kwargs = _decode(record["args"], nodes), _decode(record["kwargs"], nodes)
    _expect(isinstance(args, tuple) and isinstance(kwargs, dict), f"node '{name}' has malformed arguments")
    if target is getattr:
        _expect(len(args) == 2 and args[1] in GETATTR_NAMES, f"node '{name}' reads an attribute fxq never reads")
    node = graph.create_node(op, target, args, kwargs, name)
    _expect(node.name == name, f"node name {name!r} is reserved")
    if record["qparams"] is not None:
        records.put(node, _qparams_from(name, record["qparams"]))
    return node


def _target(name: str, op: str, target, modules: dict):
    if op == "call_function":
        _expect(isinstance(target, str) and target in FUNCTIONS, f"node '{name}' calls {target!r}, which fxq does not load")
        return FUNCTIONS[target]
    if op == "call_method":
        _expect(target in METHODS, f"node '{name}' calls method {target!r}, which fxq does not load")
    elif op == "call_module":
        _expect(isinstance(target, str) and target in modules, f"node '{name}' calls {target!r}, not a module of the file")
    elif op == "placeholder":
        _expect(_is_identifier(target), f"input {target!r} is not an identifier")
    elif op == "output":
        _expect(target == "output", f"node '{name}' is an output with target {target!r}")
    else:
        _expect(False, f"node '{name}': {op} nodes are not part of an fxq model")
    return target


def _qparams_from(name: str, values) -> ActQParams:
    _expect(isinstance(values, list) and len(values) == 3, f"node '{name}' has malformed quantization parameters")
    scale, zero_point, bits = values
    _expect(isinstance(scale, float) and scale > 0 and scale < float("inf") and _act_bits(bits)
            and _is_int(zero_point) and 0 <= zero_point < (1 << bits),
            f"node '{name}' has quantization parameters out of range")
    return ActQParams(scale, zero_point, bits)


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
        _expect(set(value) in ({"node"}, {"dict"}), "a graph argument is malformed")
        if "node" in value:
            _expect(isinstance(value["node"], str) and value["node"] in nodes,
                    f"an argument names node {value['node']!r}, which is not defined before it")
            return nodes[value["node"]]
        entries = value["dict"]
        _expect(isinstance(entries, dict) and all(_is_identifier(k) for k in entries),
                "keyword arguments must be identifiers")
        return {k: _decode(v, nodes) for k, v in entries.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_decode(v, nodes) for v in value)
    _expect(isinstance(value, PLAIN), f"a graph argument of type {type(value).__name__}")
    return value


# ---------------------------------------------------------------- config and names

def _config_fields(config: QConfig) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}


def _config_from(values) -> QConfig:
    names = {f.name for f in dataclasses.fields(QConfig) if f.init}
    _expect(isinstance(values, dict) and set(values) <= names, "the config has unknown fields")
    _expect(all(isinstance(v, PLAIN) for v in values.values()), "the config holds non-plain values")
    try:
        return QConfig(**values)
    except (TypeError, ValueError) as error:
        raise InvalidModelFile(f"its config is invalid: {error}") from None


def _is_identifier(name) -> bool:
    return isinstance(name, str) and IDENTIFIER.match(name) is not None and not keyword.iskeyword(name)


def _is_path(path) -> bool:
    """A dotted module path: identifiers, or the indices of a Sequential (``layer1.0.conv1``)."""
    return isinstance(path, str) and all(_is_identifier(part) or INDEX.match(part)
                                         for part in path.split("."))


def _expect(condition: bool, problem: str) -> None:
    if not condition:
        raise InvalidModelFile(problem)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]
