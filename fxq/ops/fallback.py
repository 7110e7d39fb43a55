"""The float fallback: any op without an integer form runs in float between integers.

    y = op(x_q, ...)   →   y_q = quantize(op(dequantize(x_q), ...))

Every integer input (in lists, tuples and keyword arguments too) is dequantized; a float
output the op's observer saw is quantized with the observed range, so the ops after it run on
integers again. Outputs that are not float tensors (sizes, indices) stay as they are.
"""
from __future__ import annotations

import inspect
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxq import onnx_splice, records
from fxq import schema as sc
from fxq.affine import ActQParams
from fxq.graph import add_module_near, label, source_line
from fxq.ops.base import Lowering, Op, Output, leaf_name
from fxq.qmodules import Dequantize, Quantize
from fxq.schema import Schema


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
    qparams = records.pop(node, ActQParams)  # from the op's own observer
    if qparams is not None:
        quantized = lo.insert_after(node, Quantize(qparams, None, lo.rounding), f"{leaf_name(node)}_quantize")
        records.put(quantized, qparams)
    if reason is not None and (dequantized or qparams is not None):  # arithmetic on sizes is not an op on tensors
        records.put(node, records.FloatOp(reason))


def _with_bias(cls, attributes, tensors) -> nn.Module:
    """A float conv or linear from its constructor's arguments; the bias if the file has one."""
    return cls(bias="bias" in tensors, **attributes)


def _positive(v) -> bool:
    return sc.is_int(v) and v > 0


# Float modules a saved model may keep, rebuilt by their constructors from checked arguments.
def _conv_schema(dims: int) -> Schema:
    return Schema({"in_channels": _positive, "out_channels": _positive, "kernel_size": sc.ints(1, dims),
                   "stride": sc.ints(1, dims),
                   "padding": lambda v: sc.ints(0, dims)(v) or sc.one_of("same", "valid")(v),
                   "dilation": sc.ints(1, dims), "groups": _positive,
                   "padding_mode": sc.one_of("zeros", "reflect", "replicate", "circular")},
                  {"weight": torch.float32, "bias": torch.float32}, _with_bias, frozenset({"bias"}))


# Float modules a saved model may keep, rebuilt by their constructors from checked arguments.
FLOAT_SCHEMAS: dict[type, Schema] = {
    nn.Conv1d: _conv_schema(1),  # ECA's channel attention
    nn.Conv2d: _conv_schema(2),
    nn.Linear: Schema({"in_features": _positive, "out_features": _positive},
                      {"weight": torch.float32, "bias": torch.float32}, _with_bias, frozenset({"bias"})),
}


def _constructed(cls, attributes, tensors) -> nn.Module:
    return cls(**attributes)


def constructor_schema(cls: type) -> Schema:
    """A torch module rebuilt by its constructor from the arguments it keeps as attributes of
    the same name (``LayerNorm(normalized_shape, eps, elementwise_affine)``); its state is then
    loaded strictly, which checks every tensor's name and shape."""
    names = [p for p in inspect.signature(cls.__init__).parameters
             if p not in ("self", "device", "dtype", "args", "kwargs")]
    return Schema({name: sc.plain for name in names}, {}, _constructed, loose=True)


# Float modules a saved model may keep, by their constructors, whatever ran them in float
# (no integer form, an override): normalizations, activations, resampling.
FLOAT_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.InstanceNorm2d, nn.BatchNorm1d, nn.BatchNorm2d,
                 nn.Conv3d, nn.ReLU, nn.ReLU6,
                 nn.Hardtanh, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
                 nn.Hardsigmoid, nn.Mish, nn.ELU, nn.Softplus, nn.Softmax, nn.Upsample, nn.Identity,
                 nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                 nn.Flatten)
FLOAT_SCHEMAS.update({cls: constructor_schema(cls) for cls in FLOAT_MODULES})
# Float functions and tensor methods a saved model may call, by name: torch's elementwise math,
# reductions, normalizations and tensor plumbing. None of them touches anything but tensors.
FLOAT_FUNCTIONS = (
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
    operator.getitem, operator.matmul, operator.pow, operator.invert,
)
FLOAT_METHODS = frozenset({
    "mean", "sum", "amax", "flip", "roll", "permute", "transpose", "mul", "mul_", "div", "div_",
    "sub", "sub_", "sigmoid", "tanh", "softmax", "chunk", "split", "squeeze", "unsqueeze", "expand",
    "expand_as", "view_as", "reshape_as", "clamp", "clamp_", "clamp_min", "clamp_max", "pow",
    "sqrt", "rsqrt", "exp", "abs", "neg", "matmul", "float", "type_as", "contiguous", "__getitem__",
    "logsumexp", "log", "erf", "amin", "var", "std", "add", "add_", "cumsum", "bmm", "norm", "addcmul",
    "addcdiv", "square", "reciprocal", "sin", "cos", "to", "float", "cumsum", "flatten", "repeat", "bool",
})


def export_float(b, node: fx.Node, inputs: list, module: nn.Module | None) -> str:
    """Float ops as ONNX: layer normalization as LayerNormalization; any other op as torch.onnx
    exports it, spliced in (`fxq.onnx_splice`)."""
    if isinstance(module, nn.LayerNorm):
        weight, bias = (b.constant(f"{node.name}_{k}", getattr(module, k).detach()) for k in ("weight", "bias"))
        return b.node("LayerNormalization", [inputs[0], weight, bias], node.name,
                      axis=-len(module.normalized_shape), epsilon=module.eps)
    if node.target is F.layer_norm:
        bound = inspect.signature(F.layer_norm).bind(*node.args, **node.kwargs).arguments
        return b.node("LayerNormalization", [inputs[0], b.value(bound["weight"]), b.value(bound["bias"])], node.name,
                      axis=-len(bound["normalized_shape"]), epsilon=bound.get("eps", 1e-5))
    return onnx_splice.splice(b, node, module)


# Not in the registry, so it matches nothing: its forms are what a saved model may keep in float
# (its modules, functions and methods, each saved by its schema or by name).
FLOAT = Op(
    "float", "kept in float: dequantize its integer inputs, run it, quantize its output",
    lambda lo, node: lower_in_float(lo, node, "no integer form"), Output.OWN,
    modules=tuple(FLOAT_SCHEMAS), functions=FLOAT_FUNCTIONS, methods=tuple(sorted(FLOAT_METHODS)),
    integer_modules=(Quantize, Dequantize), export=export_float,
)
