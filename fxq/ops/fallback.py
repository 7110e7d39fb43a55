"""The float fallback: any op without an integer form runs in float between integers.

    y = op(x_q, ...)   →   y_q = quantize(op(dequantize(x_q), ...))

Every integer input (in lists, tuples and keyword arguments too) is dequantized; a float
output the op's observer saw is quantized with the observed range, so the ops after it run on
integers again. Outputs that are not float tensors (sizes, indices) stay as they are.
"""
from __future__ import annotations

import inspect
import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxq.deployment import onnx_splice
from fxq.files import schema as sc
from fxq.files.schema import Schema
from fxq.graphs import records
from fxq.graphs.graph import add_module_near, label, source_line
from fxq.graphs.qmodules import Dequantize, Quantize
from fxq.integers.affine import ActQParams
from fxq.ops.base import Lowering, Op, Output, leaf_name
from fxq.ops.shape import export_channel_shuffle


class FloatFallbackWarning(UserWarning):
    """Some ops of the model have no integer form and will run in float between integers."""


def float_report(kept: list[tuple[fx.Node, str]]) -> str:
    """One message naming every call kept in float: its module path or node, its source line
    and why."""
    lines = []
    for node, reason in kept:
        where = source_line(node)
        lines.append(f"  {label(node)}{f' at {where}' if where else ''}: {reason}")
    return (f"fxq runs {len(kept)} op(s) in float, between a dequantize of their integer inputs and "
            "a quantize of their output:\n" + "\n".join(lines) + "\nThe rest of the model runs on "
            "integers. To change this: express the op with ones fxq has integer forms for (see "
            "fxq.ops.REGISTRY), or silence this with warnings.filterwarnings('ignore', "
            "category=fxq.FloatFallbackWarning)")


def lower_in_float(lo: Lowering, node: fx.Node, reason: str | None) -> None:
    """The rewrite above; ``reason`` (None: an island a later pass makes integer, like the
    residual add before `passes.quantize_add`) is recorded as a `records.FloatOp`."""
    dequantized: dict[fx.Node, fx.Node] = {}

    def dequantize(arg: fx.Node) -> fx.Node:
        if not records.has(arg, ActQParams):
            return arg
        if arg not in dequantized:
            path = add_module_near(lo.gm, node, f"{leaf_name(node)}_dequantize",
                                   Dequantize(records.get(arg, ActQParams)))
            with lo.gm.graph.inserting_before(node):
                dequantized[arg] = lo.gm.graph.call_module(path, (arg,))
        return dequantized[arg]

    node.args, node.kwargs = fx.map_arg(node.args, dequantize), fx.map_arg(node.kwargs, dequantize)
    if node.target in (torch.topk, "topk") and _constant_k(node):  # a k read from a shape keeps torch's
        node.op, node.target = "call_function", topk
    qparams = records.pop(node, ActQParams)  # from the op's own observer
    if qparams is not None:
        quantized = lo.insert_after(node, Quantize(qparams, None, lo.rounding), f"{leaf_name(node)}_quantize")
        records.put(quantized, qparams)
    if reason is not None and (dequantized or qparams is not None):  # arithmetic on sizes is not an op on tensors
        records.put(node, records.FloatOp(reason))


def topk(x: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):
    """``torch.topk`` with ONNX TopK's order among equal values, the lower index first, always
    sorted. torch's own order among ties is unspecified, and a float op's inputs are dequantized
    integers, where ties are common: the deployed model must select the same elements."""
    order = torch.sort(x, dim=dim, descending=largest, stable=True)
    return torch.return_types.topk(tuple(t.narrow(dim, 0, k).contiguous() for t in order))  # as torch's, viewable


def _constant_k(node: fx.Node) -> bool:
    k = node.kwargs["k"] if "k" in node.kwargs else node.args[1] if len(node.args) > 1 else None
    return isinstance(k, int)


def _export_topk(b, node: fx.Node, inputs: list) -> list[str]:
    bound = inspect.signature(topk).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    a = bound.arguments
    return b.node("TopK", [inputs[0], b.constant(f"{node.name}_k", b.ints([a["k"]]))], node.name, outputs=2,
                  axis=a["dim"], largest=int(a["largest"]), sorted=1)


def _constructed(cls, attributes, tensors) -> nn.Module:
    """A torch module from its constructor's arguments; where the module keeps no plain ``bias``
    argument (a conv's bias is its tensor), the file's tensors say whether it has one."""
    arguments = dict(attributes)
    if "bias" in _arguments(cls) and "bias" not in arguments:
        arguments["bias"] = any(name.rpartition(".")[2].endswith("bias") for name in tensors)
    return cls(**arguments)


def _emptied(cls, attributes, tensors) -> nn.Module:
    return cls()  # its layers are saved as modules of their own, each at its path


def constructor_schema(cls: type) -> Schema:
    """A torch module rebuilt by its constructor from the arguments it keeps as attributes of
    the same name (``LayerNorm(normalized_shape, eps, elementwise_affine)``, ``LSTM(input_size,
    hidden_size, num_layers, ...)``); its state is then loaded strictly, which checks every
    tensor's name and shape. `fxq.save` rebuilds each module so before it writes the file."""
    return Schema({name: sc.plain for name in _arguments(cls)}, {}, _constructed, loose=True)


def _arguments(cls: type) -> list[str]:
    """The named arguments of the first constructor in ``cls``'s bases that names them (``LSTM``
    takes ``*args`` on to ``RNNBase``), less what the class itself supplies or refuses (an RNN's
    ``mode``; ``proj_size`` but for an LSTM)."""
    for base in cls.__mro__:
        names = [p for p in inspect.signature(base.__init__).parameters
                 if p not in ("self", "device", "dtype", "args", "kwargs")]
        if names:
            supplied = set() if base is cls else {"mode"} | ({"proj_size"} if cls is not nn.LSTM else set())
            return [n for n in names if n not in supplied]
    return []


# torch.nn's containers: a Sequential kept in float is saved as its layers, each at its path
CONTAINERS = (nn.Sequential,)
_NOT_LAYERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict, nn.Container, nn.DataParallel,
               nn.modules.lazy.LazyModuleMixin)


def _is_layer(cls: type) -> bool:
    return (isinstance(cls, type) and issubclass(cls, nn.Module) and cls not in (nn.Module, nn.RNNBase, nn.RNNCellBase)
            and not issubclass(cls, _NOT_LAYERS) and "Loss" not in cls.__name__)


# Float modules a saved model may keep, whatever ran them in float (no integer form, an
# override): every layer torch.nn defines, looked up by its name in this table (never imported
# by a name a file gives), rebuilt by its constructor from checked plain arguments.
FLOAT_SCHEMAS: dict[type, Schema] = {
    **{cls: constructor_schema(cls) for cls in vars(nn).values() if _is_layer(cls)},
    **{cls: Schema({}, {}, _emptied, loose=True) for cls in CONTAINERS},
}


def _functional() -> tuple:
    """Every function ``torch.nn.functional`` defines or re-exports from torch's kernels (its
    classes and typing helpers left out): tensor math, none reads or writes anything else."""
    kernels = ("torch.nn.functional", "torch", "torch._C._nn")
    return tuple(f for name in dir(F) if not name.startswith("_") and not inspect.isclass(f := getattr(F, name))
                 and callable(f) and getattr(f, "__module__", None) in kernels)


def _tensor_math() -> frozenset[str]:
    """Tensor methods that are also torch functions of the same name (``x.max(1)``,
    ``torch.max(x, 1)``): tensor math on tensors in memory, less those that set a tensor's own
    geometry over its storage (``as_strided``, ``resize_as_``)."""
    both = {n for n in dir(torch.Tensor) if not n.startswith("_") and callable(getattr(torch, n, None))}
    return frozenset(n for n in both if not n.startswith(("as_strided", "resize_")) and n not in _NOT_MATH)


_NOT_MATH = frozenset({"device", "dtype", "layout", "get_device", "is_distributed", "dequantize", "int_repr",
                       "q_per_channel_axis", "q_per_channel_scales", "q_per_channel_zero_points", "q_scale",
                       "q_zero_point", "qscheme"})
TENSOR_MATH = _tensor_math()


def _namespaces() -> tuple:
    """torch.fft's, torch.linalg's and torch.special's functions: tensor math, nothing else."""
    return tuple(f for space in (torch.fft, torch.linalg, torch.special) for name in dir(space)
                 if not name.startswith("_") and callable(f := getattr(space, name)) and not inspect.isclass(f)
                 and not inspect.ismodule(f))


# Float functions and tensor methods a saved model may call, by name: torch.nn.functional's,
# torch.fft's, torch.linalg's, torch.special's, and torch's elementwise math, reductions and tensor
# plumbing. None of them touches anything but tensors.
FLOAT_FUNCTIONS = _functional() + _namespaces() + tuple(getattr(torch, n) for n in sorted(TENSOR_MATH)) + (
    F.layer_norm, F.group_norm, F.batch_norm, F.softmax, F.log_softmax, F.interpolate, F.gelu,
    F.silu, F.hardswish, F.hardsigmoid, F.relu6, F.hardtanh, F.leaky_relu, F.elu, F.mish,
    F.softplus, F.sigmoid, F.tanh, F.normalize, F.dropout, F.pad, F.max_pool2d, F.avg_pool2d,
    F.adaptive_max_pool2d, F.adaptive_avg_pool2d, F.linear, F.conv1d, F.conv2d, F.scaled_dot_product_attention,
    torch.sigmoid, torch.tanh, torch.exp, torch.sqrt, torch.rsqrt, torch.abs, torch.clamp, torch.softmax,
    torch.stack, torch.cat, torch.mul, torch.div, torch.sub, torch.matmul, torch.mean, torch.sum,
    torch.amax, torch.transpose, torch.permute, torch.reshape, torch.squeeze, torch.unsqueeze,
    torch.chunk, torch.split, torch.flip, torch.roll, torch.where, torch.maximum, torch.minimum,
    torch.logsumexp, torch.log, torch.erf, torch.amin, torch.bmm, torch.einsum, torch.cumsum, torch.var,
    torch.std, torch.add, torch.neg, torch.addcmul, torch.addcdiv, torch.norm, torch.linalg.vector_norm,
    torch.square, torch.reciprocal, torch.zeros, torch.ones, torch.arange, torch.cos, torch.sin,
    operator.mul, operator.truediv, operator.sub, operator.neg, operator.floordiv, operator.mod,
    operator.getitem, operator.matmul, operator.pow, operator.invert, topk,
)
# casts to a dtype by name, and copies
CASTS = frozenset({"long", "int", "short", "half", "double", "bool", "byte", "char", "bfloat16", "clone", "detach"})
FLOAT_METHODS = TENSOR_MATH | CASTS | frozenset({
    "mean", "sum", "amax", "flip", "roll", "permute", "transpose", "mul", "mul_", "div", "div_",
    "sub", "sub_", "sigmoid", "tanh", "softmax", "chunk", "split", "squeeze", "unsqueeze", "expand",
    "expand_as", "view_as", "reshape_as", "clamp", "clamp_", "clamp_min", "clamp_max", "pow",
    "sqrt", "rsqrt", "exp", "abs", "neg", "matmul", "float", "type_as", "contiguous", "__getitem__",
    "logsumexp", "log", "erf", "amin", "var", "std", "add", "add_", "cumsum", "bmm", "norm", "addcmul",
    "addcdiv", "square", "reciprocal", "sin", "cos", "to", "float", "cumsum", "flatten", "repeat", "bool",
})


def export_float(b, node: fx.Node, inputs: list, module: nn.Module | None) -> str:
    """Float ops as ONNX: layer normalization as LayerNormalization, torch layers torch.onnx has no
    form for by their formulas (`_FORMULAS`); any other op as torch.onnx exports it, spliced in
    (`fxq.deployment.onnx_splice`)."""
    formula = _FORMULAS.get(type(module))
    if formula is not None:
        return formula(b, node.name, inputs[0], module)
    if node.target is topk:
        return _export_topk(b, node, inputs)
    if node.target is getattr and isinstance(inputs[0], list):  # a field of torch's named result (topk's)
        return inputs[0][("values", "indices").index(node.args[1])]
    if isinstance(module, nn.LayerNorm):
        weight, bias = (b.constant(f"{node.name}_{k}", getattr(module, k).detach()) for k in ("weight", "bias"))
        return b.node("LayerNormalization", [inputs[0], weight, bias], node.name,
                      axis=-len(module.normalized_shape), epsilon=module.eps)
    if node.target is F.layer_norm:
        bound = inspect.signature(F.layer_norm).bind(*node.args, **node.kwargs).arguments
        return b.node("LayerNormalization", [inputs[0], b.value(bound["weight"]), b.value(bound["bias"])], node.name,
                      axis=-len(bound["normalized_shape"]), epsilon=bound.get("eps", 1e-5))
    return onnx_splice.splice(b, node, module)


def _threshold(b, name: str, x: str, m: nn.Threshold) -> str:
    """``x if x > threshold else value``."""
    above = b.node("Greater", [x, b.constant(f"{name}_threshold", np.float32(m.threshold))], f"{name}_above")
    return b.node("Where", [above, x, b.constant(f"{name}_value", np.float32(m.value))], name)


def _rms_norm(b, name: str, x: str, m: nn.RMSNorm) -> str:
    """``x / √(mean(x², last dims) + eps) · weight`` (eps: the dtype's own when None, as torch)."""
    axes = b.constant(f"{name}_axes", b.ints(list(range(-len(m.normalized_shape), 0))))
    mean = b.node("ReduceMean", [b.node("Mul", [x, x], f"{name}_square"), axes], f"{name}_mean", keepdims=1)
    eps = m.eps if m.eps is not None else float(torch.finfo(torch.float32).eps)
    root = b.node("Sqrt", [b.node("Add", [mean, b.constant(f"{name}_eps", np.float32(eps))], f"{name}_sum")],
                  f"{name}_root")
    y = b.node("Div", [x, root], f"{name}_normal")
    return y if m.weight is None else b.node("Mul", [y, b.constant(f"{name}_weight", m.weight.detach())], name)


def _local_response_norm(b, name: str, x: str, m: nn.LocalResponseNorm) -> str:
    """``x / (k + α · mean of x² over n channels)^β`` as torch computes it: the squares padded by
    ⌊n/2⌋ channels before and ⌊(n−1)/2⌋ after, averaged over windows of n (ONNX's own LRN takes
    odd n only). Images only ([N, C, H, W])."""
    squares = b.node("Unsqueeze", [b.node("Mul", [x, x], f"{name}_square"), b.constant(f"{name}_axis", b.ints([1]))],
                     f"{name}_volume")
    pads = b.constant(f"{name}_pads", b.ints([0, 0, m.size // 2, 0, 0, 0, 0, (m.size - 1) // 2, 0, 0]))
    padded = b.node("Pad", [squares, pads], f"{name}_padded")
    mean = b.node("AveragePool", [padded], f"{name}_mean", kernel_shape=[m.size, 1, 1])
    mean = b.node("Squeeze", [mean, b.constant(f"{name}_axis_again", b.ints([1]))], f"{name}_means")
    scaled = b.node("Add", [b.node("Mul", [mean, b.constant(f"{name}_alpha", np.float32(m.alpha))], f"{name}_alpha"),
                            b.constant(f"{name}_k", np.float32(m.k))], f"{name}_base")
    return b.node("Div", [x, b.node("Pow", [scaled, b.constant(f"{name}_beta", np.float32(m.beta))],
                                    f"{name}_power")], name)


def _channel_shuffle(b, name: str, x: str, m: nn.ChannelShuffle) -> str:
    return export_channel_shuffle(b, name, x, m.groups)


_FORMULAS = {nn.Threshold: _threshold, nn.RMSNorm: _rms_norm, nn.LocalResponseNorm: _local_response_norm,
             nn.ChannelShuffle: _channel_shuffle}


# Not in the registry, so it matches nothing: its forms are what a saved model may keep in float
# (its modules, functions and methods, each saved by its schema or by name).
FLOAT = Op(
    "float", "kept in float: dequantize its integer inputs, run it, quantize its output",
    lambda lo, node: lower_in_float(lo, node, "no integer form"), Output.OWN,
    modules=tuple(FLOAT_SCHEMAS), functions=FLOAT_FUNCTIONS, methods=tuple(sorted(FLOAT_METHODS)),
    integer_modules=(Quantize, Dequantize), export=export_float,
)
