"""`fxq.export_onnx`: a quantized model as a standard ONNX graph (`fxq.deploy` runs it in
onnxruntime: `fxq.deployment.deployed`).

    fxq.export_onnx(qmodel, "model.onnx")

The graph carries fxq's own integers: int8 weight initializers with their per-channel scales,
int32 biases at ``s_I·s_W``, every activation's scale and zero point. It is written in the forms
onnxruntime fuses into its int8 kernels (MLAS; VNNI on this CPU) and runs in NHWC without
layout changes between them: convolutions and linear layers as DequantizeLinear → Conv/Gemm →
QuantizeLinear (QLinearConv, QGemm), residual adds as DequantizeLinear ×2 → Add → QuantizeLinear
(QLinearAdd), ReLU as ``Max(q, z)`` on the uint8 integers (the default placement quantizes before
the ReLU, so z > 0 and the ReLU cannot vanish into the conv's clamp; with placement "post" it
does). Ops that are tables in fxq (lookup activations, products, requantizations) become a
``Gather`` in the very same table (or, for Hardswish, Hardsigmoid, Sigmoid and SiLU where `fxq.deploy`
finds onnxruntime's float ops give the table, those ops: `fxq.deployment.float_tables`), clamps and max
pooling run on the integers and average pools
on exact float32 window sums, so they compute exactly what fxq does. A value narrower than 8
bits travels in uint8 and saturates at its own top (a ``Min`` after each QuantizeLinear).

Convs, linears and adds requantize in onnxruntime with float32 arithmetic, not fxq's fixed
point: a model from ``QConfig(requantize="fixed_point")`` (the default) deploys within a step or
two of fxq's executor; one from ``QConfig(requantize="onnxruntime")`` computes exactly what
onnxruntime does and deploys bit-exact (tests/test_onnx_export.py, tests/test_deploy_real_data.py).

How each op exports is a facet of its registry entry (`fxq.ops`): every integer module has a
``to_onnx(builder, node, inputs)`` method, and every call the integer graph keeps (reshapes,
sizes) its entry's ``export``. A float op with no ONNX form raises a ``ValueError`` naming it.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection

import numpy as np
import torch
from torch import fx

from fxq import ops
from fxq.deployment import saturation
from fxq.deployment.saturation import WeightFormat
from fxq.graphs import records
from fxq.graphs.graph import run_recording
from fxq.integers.affine import ActQParams
from fxq.ops.layers import QLayer

OPSET = 21
BATCH = 2  # the batch the export runs once with, to learn every value's shape


class Builder:
    """Collects ONNX nodes and initializers; one method per ONNX idiom the facets use."""

    def __init__(self, shapes: dict, formats: dict | None = None, other_batch: Callable[[], dict] | None = None,
                 float_tables: Collection[str] = (), runtime: str = "onnxruntime"):
        from onnx import TensorProto, helper, numpy_helper
        self.helper, self.numpy_helper, self.types = helper, numpy_helper, TensorProto
        self.nodes, self.initializers, self.shapes = [], [], shapes
        # what `_recorded_shapes` records on another batch size: that run is made only if an op's
        # export asks which dims follow the batch, or whether a size does
        self._other, self._other_batch, self._batched = None, other_batch or dict, None
        self.formats = formats or {}  # layer module → `saturation.WeightFormat` (default U8S8)
        self.values: dict[fx.Node, object] = {}  # what each fx node became in the ONNX graph
        self.network_input = "x"  # the graph input's name (`to_onnx` sets it)
        self.float_tables = frozenset(float_tables)  # lookup modules exported as float ops (`QLookup.to_onnx`)
        self.runtime = runtime  # the runtime the graph is written for: some forms run faster on one
        self.count = 0

    def value(self, argument):
        """An fx argument as the ONNX graph holds it (nodes by their ONNX names)."""
        return fx.map_arg(argument, lambda a: self.values[a])

    # -------------------------------------------------------------- plumbing

    def constant(self, name: str, value) -> str:
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        name = self.fresh(name)
        self.initializers.append(self.numpy_helper.from_array(np.array(array, order="C"), name))  # 0-d stays 0-d
        return name

    @staticmethod
    def ints(values) -> torch.Tensor:
        """A list of ints as the int64 tensor ONNX's shape, axis and index inputs take."""
        return torch.tensor(values, dtype=torch.int64)

    def fresh(self, name: str) -> str:
        self.count += 1
        return f"{name}_{self.count}"

    def node(self, op: str, inputs: list[str], name: str, outputs: int = 1, **attributes):
        names = [self.fresh(name) for _ in range(outputs)]
        self.nodes.append(self.helper.make_node(op, inputs, names, name=names[0], **attributes))
        return names[0] if outputs == 1 else names

    def subsample(self, x: str, stride, name: str) -> str:
        """Every ``stride``-th position of an NCHW tensor along H and W, from the first."""
        end = np.iinfo(np.int64).max
        return self.node("Slice", [x, self.constant(f"{name}_starts", self.ints([0, 0])),
                                   self.constant(f"{name}_ends", self.ints([end, end])),
                                   self.constant(f"{name}_axes", self.ints([2, 3])),
                                   self.constant(f"{name}_steps", self.ints(list(stride)))], f"{name}_subsample")

    def batch(self, name: str) -> str:
        """The network input's batch size, as the one-element shape ONNX's Expand and Reshape take."""
        shape = self.node("Shape", [self.network_input], f"{name}_input_shape")
        return self.node("Slice", [shape, self.constant(f"{name}_zero", self.ints([0])),
                                   self.constant(f"{name}_one", self.ints([1]))], f"{name}_batch")

    def shape_of(self, node: fx.Node) -> tuple:
        """The node's output shape on the export's example run (batch first, ``BATCH``)."""
        return self.shapes[node]

    def dtype_of(self, node: fx.Node) -> torch.dtype:
        return self.shapes.get((node, "dtype"), torch.float32)

    def batched_dims(self, node: fx.Node) -> tuple[int, ...]:
        """The dims of the node's output whose size changes with the batch size."""
        if self._batched is None:
            self._batched = _batched_dims(self.shapes, self._other_run())
        return self._batched.get(node, (0,))

    def size(self, node: fx.Node) -> int:
        """A size the graph computed (``cls_tokens.shape[1]``), as the constant it is; a size that
        follows the batch has no constant and is refused by name."""
        value = self.shapes.get((node, "size"))
        if value is None or value != self._other_run().get((node, "size")):
            raise ValueError(f"node '{node.name}' is a size that changes with the batch: it does not export "
                             "as a constant; compute it from the tensor's other dims")
        return value

    def _other_run(self) -> dict:
        if self._other is None:
            self._other = self._other_batch()
        return self._other

    # -------------------------------------------------------------- quantization

    def scale_zero(self, name: str, qp: ActQParams) -> tuple[str, str]:
        if qp.bits > 8:
            raise ValueError(f"{name}: {qp.bits}-bit activations do not export (onnxruntime's integer "
                             "kernels take 8-bit activations); quantize with act_bits ≤ 8 to deploy")
        return (self.constant(f"{name}_scale", np.float32(qp.scale)),
                self.constant(f"{name}_zero", np.uint8(qp.zero_point)))

    def dequantize(self, value: str, qp: ActQParams, name: str) -> str:
        return self.node("DequantizeLinear", [value, *self.scale_zero(name, qp)], f"{name}_dq")

    def quantize(self, value: str, qp: ActQParams, name: str) -> str:
        """QuantizeLinear; a narrower width is held in uint8 and saturates at its own top, 2^b − 1."""
        q = self.node("QuantizeLinear", [value, *self.scale_zero(name, qp)], f"{name}_q")
        if qp.qmax == 255:
            return q
        return self.node("Min", [q, self.constant(f"{name}_top", np.uint8(qp.qmax))], f"{name}_top")

    # -------------------------------------------------------------- exact integer idioms

    def as_index(self, value: str, name: str) -> str:
        return self.node("Cast", [value], f"{name}_index", to=self.types.INT64)

    def gather(self, table: torch.Tensor, index: str, name: str) -> str:
        """``table[index]``: fxq's own table, looked up exactly (uint8 answers)."""
        return self.node("Gather", [self.constant(f"{name}_table", table.to(torch.uint8)), index], name)


def _recorded_shapes(qmodel: fx.GraphModule, sample_shape: tuple, batch: int = BATCH) -> dict:
    """Every node's output shape (or list of shapes) on zeros of ``batch`` samples, by node and
    name; by ``(node, "dtype")`` its dtype; by ``(node, "size")`` a size it computed."""
    shapes = {}

    def record(n: fx.Node, result) -> None:
        if isinstance(result, torch.Tensor):
            shapes[n] = shapes[n.name] = tuple(result.shape)
            shapes[n, "dtype"] = result.dtype
        elif isinstance(result, (tuple, list)) and all(isinstance(r, torch.Tensor) for r in result):
            shapes[n] = shapes[n.name] = [tuple(r.shape) for r in result]
        elif type(result) is int:
            shapes[n, "size"] = result

    run_recording(qmodel, torch.zeros(batch, *sample_shape), record)
    return shapes


def _batched_dims(shapes: dict, other: dict) -> dict:
    """For each node with one tensor output: the dims whose size differs between two batch sizes."""
    return {n: tuple(d for d, (a, b) in enumerate(zip(shape, other[n])) if a != b)
            for n, shape in shapes.items() if isinstance(n, fx.Node) and isinstance(shape, tuple)}


def layer_bounds(qmodel: fx.GraphModule) -> dict[str, tuple[int, int]]:
    """Each integer conv/linear's ``(q_max of its input, max|W_q|)``, what formula (3) of
    `fxq.deployment.saturation` reads."""
    return {name: ((1 << m.input_bits) - 1, int(m.weight.to(torch.int64).abs().max()))
            for name, m in qmodel.named_modules() if isinstance(m, QLayer)}


def weight_formats(qmodel: fx.GraphModule, weights: str = "auto",
                   runtime: str = "onnxruntime") -> dict[str, WeightFormat]:
    """Each integer conv/linear's weight format (`fxq.deployment.saturation`) for the choice ``weights``
    on ``runtime``."""
    return saturation.layer_formats(layer_bounds(qmodel), weights, runtime)


def to_onnx(qmodel: fx.GraphModule, weights: str = "auto", float_tables: Collection[str] = (),
            runtime: str = "onnxruntime"):
    """The ONNX ``ModelProto`` of ``qmodel`` (opset 21, dynamic batch), weights in the formats
    ``weights`` chooses for ``runtime`` (`fxq.deployment.saturation`), the lookup modules named in ``float_tables``
    as their float ops (`fxq.deployment.float_tables`)."""
    from onnx import TensorProto, helper

    inputs = [m for m in qmodel.modules() if type(m).__name__ == "Quantize" and m.sample_shape is not None]
    if len(inputs) != 1:
        raise ValueError("export a model from fxq.quantize or fxq.load: it has no network-input quantize step")
    sample_shape = tuple(inputs[0].sample_shape)
    modules = dict(qmodel.named_modules())
    formats = {modules[name]: f for name, f in weight_formats(qmodel, weights, runtime).items()}
    shapes = _recorded_shapes(qmodel, sample_shape)
    b = Builder(shapes, formats, lambda: _recorded_shapes(qmodel, sample_shape, BATCH + 1), float_tables, runtime)
    values = b.values
    b.network_input = next(n.name for n in qmodel.graph.nodes if n.op == "placeholder")
    for node in qmodel.graph.nodes:
        if node.op == "placeholder":
            values[node] = node.name
        elif node.op == "output":
            leaves = output_leaves(node)
            outputs = _distinct([values[a] for a in leaves], b)
        elif node.op == "get_attr":
            values[node] = b.constant(node.name, _attribute(qmodel, node.target))
        elif _reads_only_sizes(node, values) and isinstance(shapes.get(node), tuple):
            values[node] = _made_from_sizes(b, qmodel, node, sample_shape)
        elif _reads_only_sizes(node, values):
            values[node] = None  # arithmetic on sizes: the reshapes read the shapes they produced
        else:
            values[node] = _export_call(b, node, modules, b.value(node.args))
    placeholders = [n for n in qmodel.graph.nodes if n.op == "placeholder"]
    graph_inputs = [helper.make_tensor_value_info(n.name, TensorProto.FLOAT, ["batch", *sample_shape])
                    for n in placeholders]
    graph_outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, _declared(b, n))
                     for name, n in zip(outputs, leaves)]
    graph = helper.make_graph(b.nodes, "fxq", graph_inputs, graph_outputs, b.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fxq")


def output_leaves(output: fx.Node) -> list[fx.Node]:
    """The values the model returns, in order, through any nesting of tuples, lists and dicts:
    the ONNX graph's outputs."""
    leaves: list[fx.Node] = []
    fx.map_arg(output.args[0], leaves.append)
    return leaves


@dataclass(frozen=True)
class Slot:
    """Where the ONNX graph's output ``index`` goes in what the model returns."""

    index: int


def output_structure(qmodel: fx.GraphModule):
    """What ``qmodel`` returns, with each value replaced by the `Slot` of its ONNX output."""
    output = next(n for n in qmodel.graph.nodes if n.op == "output")
    slots = iter(range(len(output_leaves(output))))

    def plain(value):
        if isinstance(value, fx.Node):
            return Slot(next(slots))
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return (tuple if isinstance(value, tuple) else list)(plain(v) for v in value)
        return value
    return plain(output.args[0])


def fill(structure, results: list):
    """``structure`` (`output_structure`) with each slot replaced by its result."""
    if isinstance(structure, Slot):
        return results[structure.index]
    if isinstance(structure, dict):
        return {k: fill(v, results) for k, v in structure.items()}
    if isinstance(structure, (tuple, list)):
        return type(structure)(fill(v, results) for v in structure)
    return structure


def _distinct(names: list, b: Builder) -> list[str]:
    """ONNX outputs need names of their own: a value returned twice is returned again by Identity."""
    if any(not isinstance(n, str) for n in names):
        raise ValueError("the model returns a value that is not a tensor (a size): it does not export")
    seen: set[str] = set()
    distinct = []
    for name in names:
        distinct.append(name if name not in seen else b.node("Identity", [name], f"{name}_again"))
        seen.add(name)
    return distinct


def _declared(b: Builder, node: fx.Node) -> list:
    """An output's shape as the graph declares it: "batch" wherever the batch size moves it (a
    decoder's ``[layers, batch, queries, C]`` too)."""
    batched = b.batched_dims(node)
    return ["batch" if dim in batched else size for dim, size in enumerate(b.shapes[node])]


def _reads_only_sizes(node: fx.Node, values: dict) -> bool:
    return all(values[a] is None for a in node.all_input_nodes)


def _made_from_sizes(b: Builder, qmodel: fx.GraphModule, node: fx.Node, sample_shape: tuple):
    """A tensor a call makes from sizes alone (EdgeNeXt's positional encoding starts from
    ``torch.zeros(B, H, W)``): its value for one sample as a constant, repeated over the batch
    (Expand to the network input's batch) when its first dim is the batch. Other dependences on
    the batch size have no such form, but for ``arange`` of it, and are refused by name."""
    one, two = (_value_of(qmodel, node, torch.zeros(n, *sample_shape)) for n in (1, 2))
    if torch.equal(one, two):
        return b.constant(node.name, one)
    if all(torch.equal(v, torch.arange(n, dtype=v.dtype)) for n, v in ((1, one), (2, two))):
        return _batch_range(b, node.name, one.dtype)  # RT-DETR's batch index of its top-k queries
    if one.dim() == 0 or two.shape[1:] != one.shape[1:] or not torch.equal(two, one.expand_as(two)):
        raise ValueError(f"node '{node.name}' makes a tensor from the batch size that is not one sample's "
                         "repeated over the batch: it does not export; compute it from the input tensor instead")
    shape = b.node("Concat", [b.batch(node.name), b.constant(f"{node.name}_rest", b.ints(list(one.shape[1:])))],
                   f"{node.name}_shape", axis=0)
    return b.node("Expand", [b.constant(f"{node.name}_sample", one), shape], node.name)


def _batch_range(b: Builder, name: str, dtype: torch.dtype) -> str:
    """``torch.arange(B)`` for the network input's batch size B: ONNX Range (int64), cast."""
    limit = b.node("Squeeze", [b.batch(name), b.constant(f"{name}_axis", b.ints([0]))], f"{name}_limit")
    steps = [b.constant(f"{name}_{k}", torch.tensor(v, dtype=torch.int64)) for k, v in (("start", 0), ("delta", 1))]
    index = b.node("Range", [steps[0], limit, steps[1]], f"{name}_range")
    if dtype == torch.int64:
        return index
    to = b.helper.np_dtype_to_tensor_dtype(np.dtype(str(dtype).removeprefix("torch.")))
    return b.node("Cast", [index], name, to=to)


def _value_of(qmodel: fx.GraphModule, node: fx.Node, x: torch.Tensor) -> torch.Tensor:
    found = {}
    run_recording(qmodel, x, lambda n, value: found.setdefault(n, value) if n is node else None)
    return found[node]


def _export_call(b: Builder, node: fx.Node, modules: dict, arguments: tuple):
    module = modules.get(node.target) if node.op == "call_module" else None
    if module is not None and hasattr(module, "to_onnx"):
        return module.to_onnx(b, node, list(arguments))
    # a call the integer graph kept (a reshape, a size) exports by its entry; any other call is a
    # float op between integers
    op = ops.FLOAT if records.has(node, records.FloatOp) else next(
        (c for c in ops.match(node, modules) if c.export is not None and c.accepts(node, module) is None), ops.FLOAT)
    return op.export(b, node, list(arguments), module)


def _attribute(qmodel: fx.GraphModule, target: str) -> torch.Tensor:
    from fxq.graphs.graph import attribute
    return attribute(qmodel, target).detach().to(torch.float32)


def export_onnx(qmodel: fx.GraphModule, path: str | Path | io.BytesIO, weights: str = "auto",
                float_tables: Collection[str] = (), runtime: str = "onnxruntime") -> None:
    """Write ``qmodel`` (from `fxq.quantize` or `fxq.load`) as an ONNX model (opset 21, dynamic
    batch) that ``onnx.checker`` accepts and onnxruntime runs.

    ``weights`` (`fxq.deployment.saturation`): "auto" suits ``runtime`` ("onnxruntime" or "openvino")
    on this machine; a file bound for other CPUs takes "exact" (U8U8 where a U8S8 kernel without
    VNNI could saturate). ``float_tables``: lookup modules to write as their float ops, not a Gather
    in their table — exact only where the runtime's float kernels give the table (`fxq.deploy`
    checks which do on this machine)."""
    import onnx

    model = to_onnx(qmodel, weights, float_tables, runtime)
    onnx.checker.check_model(model)
    if isinstance(path, io.BytesIO):
        path.write(model.SerializeToString())
    else:
        onnx.save(model, str(path))
