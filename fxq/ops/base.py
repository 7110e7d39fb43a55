"""The shape of a registry entry (`Op`), and what an entry's ``lower`` works with (`Lowering`)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx, nn

from fxq.config import Rounding
from fxq.graphs import records
from fxq.graphs.context import PassContext
from fxq.graphs.graph import add_module_near, call_after, replace_module
from fxq.integers.affine import ActQParams
from fxq.ops.weighted import Weights


class Output(enum.Enum):
    """What an op's output is, for quantization."""

    OWN = "new values: observed, quantized with their own parameters"
    SAME = "the input's integers moved, picked or clamped: the input's parameters"
    NONE = "not a tensor (sizes, shapes): nothing to quantize"


def always(node: fx.Node, module: nn.Module | None) -> str | None:
    return None


@dataclass(frozen=True)
class Op:
    """Everything fxq knows about one op.

    Matching: ``modules`` (types), ``functions`` and ``methods`` (``x.relu()``); ``accepts``
    returns why a matching call cannot run on integers (``x + 1.0``, a conv with
    ``padding_mode="reflect"``), which keeps that call in float, or None.
    Quantizing: ``output`` says whether the op's output is observed; ``lower`` rewrites the call
    into integer ops during `passes.convert`. Each module ``lower`` puts in the graph is listed in
    ``integer_modules`` and carries the other facets itself: ``schema`` (how it is saved and
    checked on load), ``twin(node)`` (its float twin for `fxq.simulate`) and ``to_onnx`` (how it
    exports). A call ``lower`` leaves in the integer graph as it is (view,
    flatten) has ``keeps_call``: it is saved by name and runs the same on values in the twin.
    Properties algorithms rely on: ``homogeneous`` (``f(a·x) = a·f(x)`` for a > 0 per channel:
    cross-layer equalization may scale across it), ``channelwise`` (channel c of the output
    depends on channel c of the input only), ``clamps`` (a piecewise identity that fuses after a
    producer: the "pre"/"post" placement applies to it), ``absorbs_activation`` (a producer a
    following clamp fuses with), ``weights`` (a layer with weights, what per-layer configs,
    keep_first_last_8bit, equalization and bias correction apply to: its layout, `fxq.ops.weighted`),
    ``rewrite`` (a layer computed as other entries' ops, a transposed conv as zero insertion and a
    conv: ``rewrite(gm, node, shape_of)`` replaces the call (True) once batch norms have folded into it,
    `passes.rewrite_layers`), ``residual_join`` (a sum of
    two tensors, which `passes.quantize_add` makes an integer add with operands at their own
    scales), ``concatenates`` (a join whose inputs `passes.convert` may quantize at its own
    parameters), ``rescalable_bounds`` (a clamp whose bounds cross-layer equalization rescales per
    channel, so it may scale across it). ``example`` makes one
    float instance of the op on a ``[N, C, H, W]`` tensor, on which tests check the properties.
    ``export`` writes a call the integer graph keeps as ONNX (`fxq.deployment.onnx_export`); integer modules
    export themselves (``to_onnx``).
    """

    name: str
    doc: str
    lower: Callable[["Lowering", fx.Node], None]
    output: Output = Output.OWN
    modules: tuple[type, ...] = ()
    functions: tuple[Callable, ...] = ()
    methods: tuple[str, ...] = ()
    accepts: Callable[[fx.Node, nn.Module | None], str | None] = always
    integer_modules: tuple[type, ...] = ()
    keeps_call: bool = False
    homogeneous: bool = False
    channelwise: bool = False
    clamps: bool = False
    absorbs_activation: bool = False
    weights: Weights | None = None
    rewrite: Callable[[fx.GraphModule, fx.Node, Callable], bool] | None = None
    residual_join: bool = False
    concatenates: bool = False
    rescalable_bounds: bool = False
    example: Callable[[], Callable] | None = None
    export: Callable | None = None  # a kept call as ONNX: (builder, node, inputs, module) -> value

    @property
    def weighted(self) -> bool:
        return self.weights is not None

    def __repr__(self) -> str:
        return f"Op({self.name})"


@dataclass
class Lowering:
    """What the entries' ``lower`` functions share while converting one graph."""

    gm: fx.GraphModule
    ctx: PassContext
    modules: dict[str, nn.Module]
    grams: dict[str, torch.Tensor] = field(default_factory=dict)  # layer → H of its input
    late: list[tuple[fx.Node, str]] = field(default_factory=list)  # ops found not representable

    @property
    def rounding(self) -> Rounding:
        """How the integer modules made now round (`QConfig.requantize`)."""
        return Rounding(self.ctx.config.requantize)

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def become(self, node: fx.Node, module: nn.Module, leaf: str, args: tuple) -> None:
        """Make ``node`` call ``module`` on ``args``: in place of the module it called, or
        registered beside it (``<leaf>``) for a function or method call. The node keeps its name,
        so the printed code still reads as the network did (``layer1_0_relu``)."""
        if node.op == "call_module":
            replace_module(self.gm, node.target, module)
            target = node.target
        else:
            target = add_module_near(self.gm, node, leaf, module)
        node.op, node.target, node.args, node.kwargs = "call_module", target, args, {}

    def insert_after(self, node: fx.Node, module: nn.Module, leaf: str) -> fx.Node:
        """A call of ``module`` on ``node``'s output, which every other user now reads."""
        return call_after(self.gm, node, add_module_near(self.gm, node, leaf, module))

    def remove(self, node: fx.Node, source: fx.Node) -> None:
        """Drop ``node``, an identity on the integers: its users read ``source``."""
        node.replace_all_uses_with(source)
        self.gm.graph.erase_node(node)


def qparams_of(node: object, user: fx.Node) -> ActQParams:
    """The parameters of the integer value ``node`` feeding ``user``; `KeepInFloat` if it has none
    (a constant, a parameter read by ``get_attr``)."""
    if not records.has(node, ActQParams):
        raise KeepInFloat(f"reads {node}, a float value with no quantization parameters")
    return records.get(node, ActQParams)


def through(node: fx.Node) -> tuple[ActQParams, ActQParams]:
    """The parameters of a one-input op's integer input and of its own observed output;
    `KeepInFloat` if its output was never observed."""
    before, after = qparams_of(node.args[0], node), records.get(node, ActQParams)
    if after is None:
        raise KeepInFloat("its output was never a float tensor during calibration")
    return before, after


def hold_parameters(module: nn.Module, *qparams: ActQParams, zero_point_dtype: torch.dtype = torch.int32) -> None:
    """Register ``scales`` (float64) and ``zero_points`` of ``qparams`` (the inputs', then the
    output's) on ``module``: what `fxq.files.schema.parameters_fit` checks on load."""
    module.register_buffer("scales", torch.tensor([p.scale for p in qparams], dtype=torch.float64))
    module.register_buffer("zero_points", torch.tensor([p.zero_point for p in qparams], dtype=zero_point_dtype))


def leaf_name(node: fx.Node) -> str:
    """A short name for modules made for ``node``: its module's name, or the node's."""
    return node.target.rpartition(".")[2] if node.op == "call_module" else node.name


def pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def output_qparams(node: fx.Node) -> ActQParams:
    """A producer's output parameters: its own observer's, or with placement "post" (no observer
    on the producer) those of its activation's output, whose clamp the requantization does."""
    if not records.has(node, ActQParams):
        records.put(node, records.get(records.get(node, records.FusedUnit).activation, ActQParams))
    return records.get(node, ActQParams)


class KeepInFloat(Exception):
    """Raised by a ``lower`` that finds the call cannot run on integers after all (an input is a
    float constant): the call is lowered by the float fallback instead, with this reason."""


def call_arguments(node: fx.Node, names: tuple[str, ...], defaults: dict) -> dict:
    """A functional call's arguments after its input, by name."""
    values = dict(zip(names, node.args[1:]))
    values.update(node.kwargs)
    return {name: values.get(name, defaults.get(name)) for name in names}
