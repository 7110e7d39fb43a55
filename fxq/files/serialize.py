"""`fxq.save` / `fxq.load`: a quantized model as data — integer tensors, parameters, the graph
as a list of nodes, and the config. Weights narrower than 8 bits are bit-packed; every tensor
goes into one compressed byte string (`tensor_blob`), which records name by index.

    fxq.save(qmodel, "model.fxq")
    qmodel = fxq.load("model.fxq")        # bit-identical outputs

What ``load`` guarantees for a file from anywhere: it never runs code the file carries. The file
is read with ``torch.load(weights_only=True)`` (tensors and plain data only, no pickled
objects), and since torch.fx turns node names and targets into Python source, nothing from the
file reaches the graph unchecked:

- every name (node, placeholder, keyword) is a plain Python identifier that torch.fx keeps as it is;
  a module path is dotted identifiers or Sequential indices and must name a module of the file;
- functions, methods and module types come from fixed tables (`saved_graph.FUNCTIONS`, ``METHODS``,
  :data:`SCHEMAS`), looked up by name: a name is never imported or evaluated;
- the tensors are inflated to exactly the bytes their specs declare, each spec checked
  (`fxq.files.tensor_blob`), and each is read by one module or constant;
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
import re
from pathlib import Path

import torch
from torch import fx, nn

from fxq import ops
from fxq.config import QConfig, Rounding
from fxq.files import schema as sc
from fxq.files import tensor_blob
from fxq.files.saved_graph import PLAIN, InvalidModelFile, expect, is_identifier, node_from, node_record
from fxq.files.schema import Schema, SchemaError
from fxq.graphs import qmodules, records
from fxq.graphs.canonical import torch_class
from fxq.graphs.graph import attribute
from fxq.integers import packing
from fxq.ops.fallback import CONTAINERS, FLOAT_SCHEMAS
from fxq.ops.layers import QLayer

FORMAT = "fxq/8"
# A module name may also start with a digit or hold hyphens (torchvision's "block1-0", fxq's
# "2_dequantize" beside a Sequential's "2"): torch.fx writes such a part as getattr(m, "block1-0"),
# and without quotes or backslashes it cannot leave that string.
MODULE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,99}\Z")


def save(qmodel: fx.GraphModule, path: str | Path) -> None:
    """Write ``qmodel`` (from `fxq.quantize` or `fxq.load`) to ``path``."""
    if not isinstance(qmodel, fx.GraphModule):
        raise TypeError(f"fxq.save takes the GraphModule fxq.quantize returned, got {type(qmodel).__name__}")
    modules = dict(qmodel.named_modules())
    targets = sorted(_with_layers_inside({n.target for n in qmodel.graph.nodes if n.op == "call_module"}, modules),
                     key=_path_order)
    config = records.get(qmodel, QConfig)
    payload = {
        "format": FORMAT,
        "class_name": type(qmodel).__name__,
        "config": None if config is None else _config_fields(config),
        "modules": {target: _module_record(target, modules[target]) for target in targets},
        "constants": {n.target: _constant_record(qmodel, n.target) for n in qmodel.graph.nodes if n.op == "get_attr"},
        "graph": [node_record(n) for n in qmodel.graph.nodes],
    }
    payload = tensor_blob.by_index(payload)
    payload["sha256"] = digest(payload)
    torch.save(payload, path)


def load(path: str | Path) -> fx.GraphModule:
    """Read a model written by :func:`save`; its outputs equal the saved model's bit for bit.

    Raises :class:`InvalidModelFile` for anything that is not an intact fxq model file.
    """
    return build(_read(path), path)


def build(payload: dict, source: str | Path) -> fx.GraphModule:
    """The model a read, digest-checked ``payload`` describes, checked field by field and run once
    on a tiny input; anything wrong raises :class:`InvalidModelFile` naming ``source``."""
    try:
        gm = _rebuild(payload)
        _smoke_run(gm)
    except InvalidModelFile as error:
        raise InvalidModelFile(f"{source} is not a valid fxq model file: {error}") from None
    except Exception as error:  # a checked file that still fails to build or run is corrupt
        raise InvalidModelFile(f"{source} is not a valid fxq model file: it does not build into a "
                               f"working model ({type(error).__name__}: {_first_line(error)})") from None
    return gm


def digest(payload: dict) -> str:
    """SHA-256 over everything in ``payload`` except its ``"sha256"`` entry, in a fixed order."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != "sha256"})
    return h.hexdigest()


def _feed(h, value) -> None:
    """Each value as its type's name, then its length and items (dict keys sorted by their repr),
    its dtype, shape and bytes, or its repr. The text is hashed in runs between tensors: one call
    per value of a small model's graph was most of loading it."""
    pieces: list = []
    _pieces(value, pieces)
    text: list[str] = []
    for piece in pieces + [None]:
        if isinstance(piece, str):
            text.append(piece)
            continue
        h.update("".join(text).encode())
        text.clear()
        if piece is not None:
            h.update(piece.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


_PLAIN = frozenset({int, float, str, bool, type(None)})


def _pieces(value, out: list) -> None:
    out.append(type(value).__name__)
    if isinstance(value, dict):
        out.append(str(len(value)))
        for key in sorted(value, key=repr):
            _pieces(key, out)
            _pieces(value[key], out)
    elif isinstance(value, (list, tuple)):
        out.append(str(len(value)))
        for item in value:
            if type(item) in _PLAIN:  # inline: most items are
                out += (type(item).__name__, repr(item))
            else:
                _pieces(item, out)
    elif isinstance(value, torch.Tensor):
        out += (f"{value.dtype}{tuple(value.shape)}", value)
    else:
        out.append(repr(value))


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
    return intact(payload, path)


def intact(payload: object, source: str | Path) -> dict:
    """``payload`` as read from ``source``, if it is an fxq model whose content matches its
    SHA-256 digest; otherwise :class:`InvalidModelFile`."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise InvalidModelFile(f"{source} is not an fxq model file ({FORMAT}, found {found!r}); write "
                               "one with fxq.save (files of older fxq versions: quantize again)")
    if payload.get("sha256") != digest(payload):
        raise InvalidModelFile(f"{source} is damaged: its content does not match its SHA-256 digest")
    return payload


def _rebuild(payload: dict) -> fx.GraphModule:
    expect(set(payload) == {"format", "class_name", "config", "modules", "constants", "graph", "tensors", "sha256"},
            f"unexpected top-level entries {sorted(map(str, payload))}")
    expect(is_identifier(payload["class_name"]), "the class name is not an identifier")
    expect(isinstance(payload["modules"], dict) and isinstance(payload["graph"], list)
            and isinstance(payload["constants"], dict),
            "modules and constants must be dicts and graph a list")
    payload = tensor_blob.with_tensors(payload)
    root = nn.Module()
    expect(all(map(_is_path, payload["modules"])), "a module path is not a dotted identifier")
    for target in sorted(payload["modules"], key=_path_order):  # a Sequential's layers in their order
        _install(root, target, _module_from(target, payload["modules"][target]))
    for target, tensor in payload["constants"].items():
        expect(_is_path(target) and isinstance(tensor, torch.Tensor) and tensor.dtype in CONSTANT_DTYPES,
                f"constant {target!r} is not a float32, int64 or bool tensor at a dotted path")
        _install_constant(root, target, tensor)
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for record in payload["graph"]:
        node = node_from(graph, record, nodes, payload["modules"], payload["constants"])
        nodes[node.name] = node
    graph.lint()
    expect(sum(n.op == "output" for n in graph.nodes) == 1, "the graph needs exactly one output")
    gm = fx.GraphModule(root, graph, class_name=payload["class_name"])
    if payload["config"] is not None:
        records.put(gm, _config_from(payload["config"]))
    return gm


def _smoke_run(gm: fx.GraphModule) -> None:
    """Run once on two samples of zeros of the calibration shape: a file that passes every check
    must also run (two: a norm over one value per group, after a global pool, refuses one)."""
    inputs = [m for m in gm.modules() if isinstance(m, qmodules.Quantize) and m.sample_shape is not None]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    expect(len(inputs) == 1 and len(placeholders) == 1,
            "expected one network input and its quantize step")
    with torch.no_grad():
        gm(torch.zeros(2, *inputs[0].sample_shape))


# ---------------------------------------------------------------- modules

def _schemas() -> dict[type, Schema]:
    """Every module type a quantized graph may hold: each registry entry's integer modules, and
    the float modules a graph keeps."""
    found = {kind: kind.schema for op in (*ops.REGISTRY, ops.FLOAT) for kind in op.integer_modules}
    return {**found, **{cls: FLOAT_SCHEMAS[cls] for cls in ops.FLOAT.modules}}


SCHEMAS = _schemas()
MODULE_TYPES = {cls.__name__: cls for cls in SCHEMAS}


def _with_layers_inside(targets: set[str], modules: dict[str, nn.Module]) -> set[str]:
    """The called modules, and every layer inside a container among them (a Sequential in float)."""
    def layers(path: str) -> set[str]:
        module = modules[path]
        if not isinstance(module, CONTAINERS):
            return set()
        children = {f"{path}.{name}" for name, _ in module.named_children()}
        return children.union(*map(layers, children))
    return targets.union(*map(layers, targets))


def _path_order(path: str) -> tuple:
    """Module paths in the order their containers run them: ``seq.2`` before ``seq.10``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.split("."))


def _saved_type(module: nn.Module) -> type:
    """The type a module is saved as: a subclass that only constructs a torch layer differently is that layer."""
    kind = torch_class(module)
    return kind if kind in SCHEMAS else type(module)


def _module_record(target: str, module: nn.Module) -> dict:
    kind = _saved_type(module)
    schema = SCHEMAS.get(kind)
    if schema is None:
        own = "" if type(module).__module__.startswith("torch.") else (
            f": it is the model's own code ({type(module).__module__}), kept whole in float, and a "
            "file never holds code. Make it traceable (so fxq quantizes inside it) or keep the float "
            "model beside the file")
        raise ValueError(f"cannot save '{target}': {type(module).__name__} is not a module fxq knows "
                         f"how to save ({sorted(MODULE_TYPES)}){own}")
    tensors = {} if isinstance(module, CONTAINERS) else {name: t.detach() for name, t in module.state_dict().items()}
    packed = {}
    if isinstance(module, QLayer):
        bits = packing.signed_width(module.weight)
        if bits < 8:
            packed["weight"] = {"bits": bits, "shape": list(module.weight.shape),
                                "data": packing.pack(tensors.pop("weight"), bits)}
    attributes = {name: getattr(module, name) for name in schema.attributes
                  if not schema.loose or (hasattr(module, name) and sc.plain(getattr(module, name)))}
    attributes = {k: v.value if isinstance(v, Rounding) else v for k, v in attributes.items()}
    if schema.loose:  # tuples, as the tracer and the strict state load expect them
        attributes = {k: tuple(v) if isinstance(v, list) else v for k, v in attributes.items()}
    record = {"type": kind.__name__, "attributes": attributes, "tensors": tensors, "packed": packed}
    if schema.loose and not isinstance(module, CONTAINERS):
        _check_rebuilds(target, module, record)
    return record


def _check_rebuilds(target: str, module: nn.Module, record: dict) -> None:
    """A float module saved by its constructor's arguments must come back as it is: same state,
    same attributes (a constructor argument it does not keep would come back as its default)."""
    try:
        rebuilt = _module_from(target, record)
    except InvalidModelFile as error:
        raise ValueError(f"cannot save '{target}': {error}") from None
    differing = [name for name, value in vars(module).items() if not name.startswith("_")
                 and sc.plain(value) and getattr(rebuilt, name, None) != value]
    if differing:
        raise ValueError(f"cannot save '{target}' ({type(module).__name__}): its constructor does not restore "
                         f"{differing}; keep the float model beside the file")


def _module_from(target: str, record) -> nn.Module:
    expect(isinstance(record, dict) and set(record) == {"type", "attributes", "tensors", "packed"},
            f"'{target}' is not a module record")
    cls = MODULE_TYPES.get(record["type"]) if isinstance(record["type"], str) else None
    expect(cls is not None, f"'{target}' has module type {record['type']!r}, which fxq does not load")
    schema = SCHEMAS[cls]
    attributes, tensors = record["attributes"], _tensors_of(target, record)
    expect(isinstance(attributes, dict) and (set(schema.attributes) - schema.optional_attributes
                                              <= set(attributes) <= set(schema.attributes)
                                              or schema.loose and set(attributes) <= set(schema.attributes)),
            f"'{target}' ({cls.__name__}) must have the attributes {sorted(schema.attributes)}")
    for name, value in attributes.items():
        expect(schema.attributes[name](value), f"'{target}'.{name} = {value!r} is out of range")
    if schema.loose:
        expect(all(t.dtype in (torch.float32, torch.int64) for t in tensors.values()),
                f"'{target}' ({cls.__name__}) holds tensors that are neither float32 nor int64")
        return _constructed_module(target, schema, cls, attributes, tensors)
    required = set(schema.tensors) - schema.optional_tensors
    expect(required <= set(tensors) <= set(schema.tensors),
            f"'{target}' ({cls.__name__}) must hold the tensors {sorted(schema.tensors)}")
    for name, tensor in tensors.items():
        expect(tensor.dtype == schema.tensors[name],
                f"'{target}'.{name} is {tensor.dtype}, expected {schema.tensors[name]}")
    if schema.build is not None:
        module = schema.build(cls, dict(attributes), tensors)
        module.load_state_dict(tensors)
        return module.eval().requires_grad_(False)
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    vars(module).update(attributes)
    if "requantize_as" in attributes:
        module.requantize_as = Rounding(attributes["requantize_as"])
    for name, tensor in tensors.items():
        module.register_buffer(name, tensor)
    if schema.ranges is not None:
        try:
            schema.ranges(module)
        except SchemaError as error:
            raise InvalidModelFile(f"'{target}': {error}") from None
    if isinstance(module, qmodules.Derived):
        module.prepare()
    return module.eval()


def _constructed_module(target: str, schema: Schema, cls: type, attributes: dict, tensors: dict) -> nn.Module:
    try:
        module = schema.build(cls, dict(attributes), tensors)
        module.load_state_dict(tensors, strict=True)
    except (TypeError, ValueError, RuntimeError) as error:
        raise InvalidModelFile(f"'{target}' ({cls.__name__}) does not build from its fields: "
                               f"{_first_line(error)}") from None
    return module.eval().requires_grad_(False)


def _tensors_of(target: str, record: dict) -> dict[str, torch.Tensor]:
    tensors, packed = record["tensors"], record["packed"]
    expect(isinstance(tensors, dict) and isinstance(packed, dict), f"'{target}' has malformed tensors")
    tensors = dict(tensors)
    for name, entry in packed.items():
        expect(name == "weight" and "weight" not in tensors and isinstance(entry, dict)
                and set(entry) == {"bits", "shape", "data"}, f"'{target}' has a malformed packed weight")
        bits, shape, data = entry["bits"], entry["shape"], entry["data"]
        expect(sc.is_int(bits) and 2 <= bits < 8 and isinstance(shape, list) and 1 <= len(shape) <= 4
                and all(sc.is_int(s) and s > 0 for s in shape) and isinstance(data, torch.Tensor)
                and data.dtype == torch.uint8 and data.dim() == 1, f"'{target}' has a malformed packed weight")
        count = 1
        for size in shape:
            count *= size
        expect(data.numel() == (count * bits + 7) // 8, f"'{target}': packed weight of the wrong size")
        tensors[name] = packing.unpack(data, bits, tuple(shape), torch.int8)
    expect(all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()),
            f"'{target}' has tensors that are not tensors")
    return tensors


def _install(root: nn.Module, target: str, module: nn.Module) -> None:
    owner, leaf = _container(root, target)
    owner.add_module(leaf, module)


def _install_constant(root: nn.Module, target: str, tensor: torch.Tensor) -> None:
    owner, leaf = _container(root, target)
    owner.register_buffer(leaf, tensor)


def _container(root: nn.Module, target: str) -> tuple[nn.Module, str]:
    """The plain container module ``target`` goes in (made as needed), and its last name."""
    owner = root
    *parents, leaf = target.split(".")
    for name in parents:
        if name not in owner._modules:
            owner.add_module(name, nn.Module())
        owner = owner._modules[name]
        expect(type(owner) is nn.Module or type(owner) in CONTAINERS, f"path {target!r} runs through a layer")
    expect(leaf not in owner._modules and not hasattr(owner, leaf), f"path {target!r} is taken")
    return owner, leaf


CONSTANT_DTYPES = (torch.float32, torch.int64, torch.bool)


def _constant_record(qmodel: fx.GraphModule, target: str) -> torch.Tensor:
    """A tensor the graph reads with ``get_attr`` (a float op's parameter as float32; a mask as
    bool; indices as int64)."""
    value = attribute(qmodel, target)
    if not isinstance(value, torch.Tensor) or value.is_complex():
        raise ValueError(f"cannot save '{target}': the graph reads it, and it is not a real tensor")
    kind = torch.float32 if value.is_floating_point() else torch.bool if value.dtype == torch.bool else torch.int64
    return value.detach().to(kind)


# ---------------------------------------------------------------- config and names

def _config_fields(config: QConfig) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}


def _config_from(values) -> QConfig:
    names = {f.name for f in dataclasses.fields(QConfig) if f.init}
    expect(isinstance(values, dict) and set(values) <= names, "the config has unknown fields")
    expect(all(isinstance(v, PLAIN) for v in values.values()), "the config holds non-plain values")
    try:
        return QConfig(**values)
    except (TypeError, ValueError) as error:
        raise InvalidModelFile(f"its config is invalid: {error}") from None


def _is_path(path) -> bool:
    """A dotted module path of names torch.fx writes safely (``layer1.0.conv1``, ``block1-0``)."""
    return isinstance(path, str) and all(MODULE_NAME.match(part) and not keyword.iskeyword(part)
                                         for part in path.split("."))


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]
