"""Activations of one tensor: clamps at their input's scale (ReLU, ReLU6, Hardtanh, clamp), any
other elementwise function of one tensor as a lookup table (Hardswish, SiLU, GELU, x·0.5), and
PReLU as one table per channel."""
from __future__ import annotations

import copy
import math
import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxq.files import schema as sc
from fxq.files.schema import Schema
from fxq.graphs import records
from fxq.graphs.graph import attribute
from fxq.graphs.qmodules import Derived
from fxq.graphs.twin import on_integers
from fxq.integers import intmath
from fxq.integers.affine import ActQParams
from fxq.ops.base import KeepInFloat, Lowering, Op, Output, leaf_name, qparams_of
from fxq.ops.lookup import ChannelClamp, QClamp, QConstantLookup, QLookup


class QRequantize(Derived):
    """uint8 → uint8 at new parameters: ``clamp(z_O + round(M·(q − z_I)), 0, 2^b − 1)``, ``M = s_I/s_O``.

    Formula (2) with ``q − z_I`` as the accumulator; with at most 2^8 inputs it runs as a lookup
    in the table of every answer, built once with `fxq.integers.intmath.requantize`.
    """

    schema = Schema({"input_bits": sc.act_bits, "output_bits": sc.act_bits},
                    {"input_zero_point": torch.int32, "output_zero_point": torch.int32,
                     "multiplier": torch.int32, "shift": torch.int8},
                    ranges=lambda m: m.check_ranges())

    def __init__(self, before: ActQParams, after: ActQParams):
        super().__init__()
        self.input_bits, self.output_bits = before.bits, after.bits
        multiplier, shift = intmath.fixed_point(torch.tensor(before.scale / after.scale),
                                                bound=before.qmax)
        self.register_buffer("input_zero_point", torch.tensor(before.zero_point, dtype=torch.int32))
        self.register_buffer("output_zero_point", torch.tensor(after.zero_point, dtype=torch.int32))
        self.register_buffer("multiplier", multiplier.to(torch.int32))
        self.register_buffer("shift", shift.to(torch.int8))
        self.prepare()

    def compute(self, q: torch.Tensor) -> torch.Tensor:
        """The requantization itself, without the table."""
        centred = q.to(torch.int64) - int(self.input_zero_point)
        return intmath.requantize(centred, self.multiplier.to(torch.int64), self.shift.to(torch.int64),
                                  int(self.output_zero_point), (1 << self.output_bits) - 1)

    def prepare(self) -> None:
        every = torch.arange(1 << self.input_bits)
        self.register_buffer("table", self.compute(every), persistent=False)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return intmath.lookup(self.table, q)

    def extra_repr(self) -> str:
        return f"zero_point {int(self.input_zero_point)} → {int(self.output_zero_point)}"

    def check_ranges(self) -> None:
        sc.zero_point_fits(self, "input_zero_point", self.input_bits)
        sc.zero_point_fits(self, "output_zero_point", self.output_bits)
        sc.fixed_point_fits(self.multiplier, self.shift, "the")

    def twin(self, node) -> nn.Module:
        return on_integers(self.compute, node)

    def to_onnx(self, b, node, inputs):
        return b.gather(self.table, b.as_index(inputs[0], node.name), node.name)


class QReLU(nn.Module):
    """uint8 → uint8 ReLU: real 0 is ``q = z``, so ``relu(s·(q − z)) = s·(max(q, z) − z)``.

    The zero point is a buffer, so ``state_dict()`` carries it like every other integer.
    """

    schema = Schema({}, {"zero_point": torch.int32},
                    ranges=lambda m: sc.zero_point_fits(m, "zero_point", 16))

    def __init__(self, zero_point: int):
        super().__init__()
        self.register_buffer("zero_point", torch.tensor(zero_point, dtype=torch.int32))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return intmath.relu(q, int(self.zero_point))

    def extra_repr(self) -> str:
        return f"max(q, {int(self.zero_point)})"

    def twin(self, node) -> nn.Module:
        return nn.ReLU()  # max(q, z) on integers is max(x, 0) on their values

    def to_onnx(self, b, node, inputs):
        return _onnx_relu(b, inputs[0], records.get(node, ActQParams), node.name)


def _onnx_relu(b, q: str, qp: ActQParams, name: str) -> str:
    """max(q, z), as a Clip with no upper bound (one fast op that onnxruntime keeps in NHWC)."""
    return b.node("Clip", [q, b.constant(f"{name}_z", np.uint8(qp.zero_point))], name)


def lower_clamp(lo: Lowering, node: fx.Node) -> None:
    """``relu6(x)`` → ``QClamp(q)`` (``QReLU`` for a ReLU) at the input's scale, placement "pre".
    With placement "post" the producer's output already has this op's parameters: the clamp stays
    unless the grid itself does it (a ReLU on z = 0); with "both", a ``QRequantize`` follows."""
    source = node.args[0]
    qp = qparams_of(source, node)
    low, high = clamp_bounds(node, lo.module(node))
    relu = isinstance(low, (int, float)) and low == 0 and high is None
    clamp = QReLU(qp.zero_point) if relu else QClamp.between(qp, low, high)
    after = records.get(node, ActQParams)
    if after is qp and (qp.zero_point == 0 if isinstance(clamp, QReLU) else clamp.is_identity(qp)):
        lo.remove(node, source)
        return
    lo.become(node, clamp, leaf_name(node), (source,))
    records.put(node, qp)
    if after is not None and after is not qp:  # placement "both": a second quantization after it
        requantized = lo.insert_after(node, QRequantize(qp, after), f"{leaf_name(node)}_requantize")
        records.put(requantized, after)


def clamp_bounds(node: fx.Node, module: nn.Module | None) -> tuple[float | None, float | None]:
    """The real ``(low, high)`` of a clamp-like call (None: unbounded)."""
    if isinstance(module, nn.ReLU):
        return 0, None
    if isinstance(module, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
        return module.min_val, module.max_val
    if isinstance(module, ChannelClamp):
        return module.low.double(), module.high.double()
    target = node.target
    if target in (F.relu, torch.relu, torch.relu_, "relu", "relu_"):
        return 0, None
    if target is F.relu6:
        return 0, 6
    if target is F.hardtanh:
        return _argument(node, 1, "min_val", -1.0), _argument(node, 2, "max_val", 1.0)
    if target in ("clamp_min", "clamp_min_"):
        return _argument(node, 1, "min", None), None
    if target in ("clamp_max", "clamp_max_"):
        return None, _argument(node, 1, "max", None)
    return _argument(node, 1, "min", None), _argument(node, 2, "max", None)


def _argument(node: fx.Node, index: int, name: str, default):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _numeric_bounds(node: fx.Node, module: nn.Module | None) -> str | None:
    if isinstance(module, ChannelClamp):
        return None
    bounds = clamp_bounds(node, module)
    if all(b is None or (isinstance(b, (int, float)) and not isinstance(b, bool)) for b in bounds):
        return None
    return "a clamp with tensor bounds"


def lower_lookup(lo: Lowering, node: fx.Node) -> None:
    """``f(x)`` → ``QLookup(q)``: the table of ``quantize_out(f(dequantize_in(q)))`` for every q."""
    source = _the_tensor(node)
    before, after = qparams_of(source, node), records.get(node, ActQParams)
    if after is None:
        raise KeepInFloat("its output was never a float tensor during calibration")
    function, name = _float_function(node, lo.module(node), source)
    lookup = QLookup(function, name, before, after)
    every = torch.arange(1 << before.bits, dtype=torch.float64)
    with torch.no_grad():
        undefined = torch.isnan(function((every - before.zero_point) * before.scale)).any()
    if undefined:  # an infinity saturates, as quantizing it would (log(0): the grid always holds 0)
        raise KeepInFloat(f"{name} is not a number on some value the input's grid holds")
    lo.become(node, lookup, leaf_name(node), (source,))


def _the_tensor(node: fx.Node) -> fx.Node:
    (tensor,) = node.all_input_nodes
    return tensor


def _float_function(node: fx.Node, module: nn.Module | None, source: fx.Node):
    """The op as a float64 function of its one tensor, its other arguments held fixed."""
    if module is not None:
        copied = copy.deepcopy(module).double()
        return copied, type(module).__name__
    kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}

    def substituted(x: torch.Tensor) -> list:
        return [x if a is source else a for a in node.args]

    if node.op == "call_method":
        return (lambda x: getattr(x, node.target)(*substituted(x)[1:], **kwargs)), f".{node.target}()"
    constants = [a for a in node.args if a is not source]
    name = getattr(node.target, "__name__", str(node.target))
    return (lambda x: node.target(*substituted(x), **kwargs)), f"{name}{tuple(constants) if constants else ''}"


def _one_tensor_and_constants(node: fx.Node, module: nn.Module | None) -> str | None:
    """A lookup table needs one tensor input; every other argument a constant number."""
    if module is not None:
        return None if not list(module.parameters()) else f"{type(module).__name__} has learned parameters"
    if len(node.all_input_nodes) != 1:
        return "an elementwise op of several tensors"
    if node.all_input_nodes[0] not in node.args:
        return "an elementwise op with its tensor passed by keyword"
    others = [a for a in list(node.args) + list(node.kwargs.values()) if not isinstance(a, fx.Node)]
    if all(isinstance(a, (int, float, bool, str)) or a is None for a in others):
        return None
    return "an elementwise op with non-numeric arguments"


RELU = Op("relu", "max(q, z) at the input's scale: real 0 is the zero point", lower_clamp, Output.SAME,
          modules=(nn.ReLU,), functions=(F.relu, torch.relu, torch.relu_), methods=("relu", "relu_"),
          integer_modules=(QReLU, QRequantize), homogeneous=True, channelwise=True, clamps=True,
          example=nn.ReLU)
CLAMP = Op("clamp", "clamp(q, low, high) at the input's scale, the bounds rounded to its grid",
           lower_clamp, Output.SAME, modules=(nn.ReLU6, nn.Hardtanh, ChannelClamp),
           functions=(F.relu6, F.hardtanh, torch.clamp, torch.clip),
           methods=("clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_"),
           accepts=_numeric_bounds, integer_modules=(QClamp, QRequantize), channelwise=True, clamps=True,
           rescalable_bounds=True,
           example=nn.ReLU6)
# torch's elementwise math of one tensor (YOLO-OBB's angle cos/sin, a log, a root, a rounding):
# a table like any function of one tensor; one not finite on the input's grid stays float, named
UNARY_MATH = ("cos", "sin", "tan", "acos", "asin", "atan", "cosh", "sinh", "asinh", "log", "log1p", "log2",
              "log10", "exp2", "expm1", "sqrt", "rsqrt", "reciprocal", "erf", "erfc", "sign", "floor", "ceil",
              "round", "trunc", "frac")
LOOKUP = Op(
    "lookup", "a lookup table: for each input integer, the output integer of the float function",
    lower_lookup, Output.OWN,
    modules=(nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid, nn.GELU, nn.Tanh, nn.LeakyReLU, nn.ELU,
             nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign, nn.LogSigmoid, nn.Hardshrink,
             nn.Softshrink, nn.Tanhshrink),
    functions=(F.hardswish, F.hardsigmoid, F.silu, F.sigmoid, torch.sigmoid, F.gelu, F.tanh, torch.tanh,
               F.leaky_relu, F.elu, F.selu, F.celu, F.mish, F.softplus, F.softsign, F.logsigmoid,
               torch.exp, torch.neg, torch.abs, torch.square, operator.neg, operator.abs, operator.add,
               operator.sub, operator.mul, operator.truediv, operator.pow, torch.add, torch.sub, torch.mul,
               torch.div, torch.pow, operator.floordiv, operator.mod, torch.remainder, torch.fmod,
               *(getattr(torch, name) for name in UNARY_MATH)),
    methods=("sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "neg", "abs", "square", "add", "add_", "sub",
             "sub_", "mul", "mul_", "div", "div_", "pow", "remainder", "fmod",
             *UNARY_MATH, *(f"{name}_" for name in UNARY_MATH)),
    accepts=_one_tensor_and_constants, integer_modules=(QLookup,), channelwise=True,
    example=nn.Hardswish)


def _constants_of(node: fx.Node) -> list[fx.Node]:
    """The call's constant tensors (read by get_attr), when every other input is one tensor."""
    inputs = node.all_input_nodes
    constants = [a for a in inputs if a.op == "get_attr"]
    return constants if constants and len(inputs) == len(constants) + 1 else []


def _a_tensor_and_constants(node: fx.Node, module: nn.Module | None) -> str | None:
    numbers_only = all(not isinstance(v, fx.Node) for v in node.kwargs.values()) and set(node.kwargs) <= {"value"}
    if not _constants_of(node) or not numbers_only or any(isinstance(a, fx.Node) and a not in node.all_input_nodes
                                                          for a in node.args):
        return "an elementwise op of two computed tensors"
    return None


def lower_constant_lookup(lo: Lowering, node: fx.Node) -> None:
    """``x · γ`` with γ a parameter (or ``addcmul(β, γ, x)`` with two) → ``QConstantLookup(q)``:
    a table per element of the constants (broadcast together)."""
    constant_nodes = _constants_of(node)
    (source,) = [a for a in node.all_input_nodes if a not in constant_nodes]
    before, after = qparams_of(source, node), records.get(node, ActQParams)
    if after is None:
        raise KeepInFloat("its output was never a float tensor during calibration")
    constants = [attribute(lo.gm, c.target) for c in constant_nodes]
    for c, tensor in zip(constant_nodes, constants):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise KeepInFloat(f"{c.target} is not a float tensor")
    shape = torch.broadcast_shapes(*(c.shape for c in constants))
    flat = [c.detach().double().expand(shape).reshape(-1) for c in constants]
    # tables are built on a grid broadcast against the constants: an in-place method cannot
    # grow its tensor to that shape (and must not write into the grid); its value is the same
    target = node.target.rstrip("_") if node.op == "call_method" else node.target

    def function(x: torch.Tensor, element: torch.Tensor) -> torch.Tensor:
        """The op at one element of the constants: ``element`` indexes them (broadcast, flattened)."""
        values = {c: f[element.long()] for c, f in zip(constant_nodes, flat)}
        args = [x if a is source else values.get(a, a) for a in node.args]
        return getattr(args[0], target)(*args[1:], **node.kwargs) if node.op == "call_method" else target(
            *args, **node.kwargs)

    name = f"{getattr(target, '__name__', target)} by {', '.join(c.target for c in constant_nodes)}"
    every = (torch.arange(1 << before.bits, dtype=torch.float64) - before.zero_point) * before.scale
    elements = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)
    with torch.no_grad():
        if not torch.isfinite(function(every[None, :], elements.reshape(-1, 1))).all():
            raise KeepInFloat(f"{name} is not finite on every value the input's grid holds")
    lo.become(node, QConstantLookup(function, name[:80], elements, before, after), leaf_name(node), (source,))


CONSTANT = Op(
    "constant_lookup", "an elementwise op with a constant tensor: one lookup table per element of the constant",
    lower_constant_lookup, Output.OWN,
    functions=(operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div,
               torch.addcmul, torch.addcdiv),
    methods=("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "addcmul", "addcdiv"),
    accepts=_a_tensor_and_constants, integer_modules=(QConstantLookup,), channelwise=True,
    example=lambda: lambda x: x * torch.arange(1.0, 5.0).reshape(4, 1, 1))


class QChannelLookup(QConstantLookup):
    """b-bit → b'-bit: one lookup table per channel (dim 1, whatever the input's rank), for an
    op with one learned number per channel such as PReLU's slope; ``shape`` is ``(C,)``."""

    def offsets_for(self, rank: int) -> torch.Tensor:
        return self.offsets.reshape(-1, *[1] * (rank - 2)) if rank >= 2 else self.offsets


def _prelu(x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, x, slope * x)


def _slope_is_a_constant(node: fx.Node, module: nn.Module | None) -> str | None:
    if module is not None:
        return None
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    return None if isinstance(weight, fx.Node) and weight.op == "get_attr" else "a PReLU whose slope is computed"


def lower_prelu(lo: Lowering, node: fx.Node) -> None:
    """``prelu(x, a)`` → ``QChannelLookup(q)``: per channel c, the table of
    ``quantize_out(prelu(dequantize_in(q), a_c))`` for every q (one table if a has one number)."""
    module = lo.module(node)
    source = node.args[0]
    before, after = qparams_of(source, node), records.get(node, ActQParams)
    if after is None:
        raise KeepInFloat("its output was never a float tensor during calibration")
    if module is not None:
        slope, name = module.weight, "PReLU"
    else:
        weight = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
        slope, name = attribute(lo.gm, weight.target), f"prelu by {weight.target}"
    if not torch.isfinite(slope).all():
        raise KeepInFloat("its slope is not finite")
    lookup = QChannelLookup(_prelu, name, slope.detach().reshape(-1), before, after)
    lo.become(node, lookup, leaf_name(node), (source,))


PRELU = Op("prelu", "max(x, 0) + a_c·min(x, 0): one lookup table per channel c of the learned slope",
           lower_prelu, Output.OWN, modules=(nn.PReLU,), functions=(F.prelu, torch.prelu),
           methods=("prelu",), accepts=_slope_is_a_constant, integer_modules=(QChannelLookup,),
           channelwise=True, example=lambda: _a_prelu(4))


def _a_prelu(channels: int) -> nn.PReLU:
    prelu = nn.PReLU(channels)
    with torch.no_grad():  # slopes of both signs, as trained ones end up
        prelu.weight.copy_(torch.linspace(-0.5, 1.5, channels))
    return prelu


OPS = (RELU, CLAMP, LOOKUP, CONSTANT, PRELU)
