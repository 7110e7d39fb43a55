"""Padding on integers: ``F.pad(x, pads)`` (timm's "same" padding, ``nn.ZeroPad2d``,
``nn.ConstantPad2d(p, 0.0)``) adds real zeros, which are the integer zero point; reflect, replicate
and circular padding (BlurPool's, ``nn.ReflectionPad2d``) copy the input's own integers. Either
way the output keeps the input's parameters and nothing rounds. Another constant (EfficientViT
pads its values with a row of ones) is the input's integer nearest it, rounded once like any
activation; one outside the input's range has no such integer, and that pad runs in float."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxq.files import schema as sc
from fxq.files.schema import Schema
from fxq.graphs import records
from fxq.graphs.qmodules import NotRepresentable
from fxq.graphs.twin import OnIntegers
from fxq.integers.affine import ActQParams
from fxq.ops.base import Lowering, Op, Output, leaf_name, qparams_of

CONSTANT_PADS = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
COPYING_PADS = {nn.ReflectionPad1d: "reflect", nn.ReflectionPad2d: "reflect", nn.ReflectionPad3d: "reflect",
                nn.ReplicationPad1d: "replicate", nn.ReplicationPad2d: "replicate", nn.ReplicationPad3d: "replicate",
                nn.CircularPad1d: "circular", nn.CircularPad2d: "circular", nn.CircularPad3d: "circular"}
ONNX_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


class QPad(nn.Module):
    """Integers → integers: ``pads`` (torch's order: last dim first, before then after) filled
    with ``fill``, the input's integer for the constant (``mode="constant"``), or with copies of
    the input's integers (``"reflect"``, ``"replicate"``, ``"circular"``)."""

    schema = Schema({"pads": lambda v: isinstance(v, tuple) and 0 < len(v) <= 8 and len(v) % 2 == 0
                     and all(sc.is_int(p) for p in v), "fill": sc.int_at_least(0),
                     "mode": sc.one_of(*ONNX_MODES)}, {})

    def __init__(self, pads: tuple[int, ...], fill: int, mode: str = "constant"):
        super().__init__()
        self.pads, self.fill, self.mode = pads, fill, mode

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if self.mode == "constant":
            return F.pad(q, self.pads, value=self.fill)
        return F.pad(q, self.pads, mode=self.mode)

    def extra_repr(self) -> str:
        return f"pads={self.pads}, " + (f"fill={self.fill}" if self.mode == "constant" else f"mode={self.mode}")

    def twin(self, node) -> nn.Module:
        qp = records.get(node, ActQParams)
        return OnIntegers(self.forward, [qp], qp)

    def to_onnx(self, b, node, inputs):
        """ONNX Pad: every axis's start pads, then every axis's end pads, first axis first."""
        rank, pairs = len(b.shape_of(node)), len(self.pads) // 2
        starts, ends = [0] * rank, [0] * rank
        for i in range(pairs):
            starts[rank - 1 - i], ends[rank - 1 - i] = self.pads[2 * i], self.pads[2 * i + 1]
        pads = b.constant(f"{node.name}_pads", b.ints(starts + ends))
        if self.mode != "constant":
            return b.node("Pad", [inputs[0], pads], node.name, mode=ONNX_MODES[self.mode])
        fill = torch.tensor(self.fill, dtype=torch.uint8)
        return b.node("Pad", [inputs[0], pads, b.constant(f"{node.name}_fill", fill)], node.name, mode="constant")


def _pad_of(node: fx.Node, module: nn.Module | None) -> tuple[tuple, str, float]:
    if module is not None:
        mode = COPYING_PADS.get(type(module), "constant")
        return tuple(module.padding), mode, float(getattr(module, "value", 0.0))
    arguments = dict(zip(("pad", "mode", "value"), node.args[1:]))
    arguments.update(node.kwargs)
    value = arguments.get("value")
    return tuple(arguments["pad"]), arguments.get("mode", "constant"), 0.0 if value is None else value


def _zero_fill_or_copies(node: fx.Node, module: nn.Module | None) -> str | None:
    pads, mode, value = _pad_of(node, module)
    if mode not in ONNX_MODES:
        return f"{mode} padding (the integer forms pad with zeros or copies)"
    if mode == "constant" and not (isinstance(value, (int, float)) and math.isfinite(value)):
        return f"padding with {value!r} (the integer form pads with a finite number)"
    if not all(isinstance(p, int) for p in pads):
        return "padding computed from the input"
    return None


def lower_pad(lo: Lowering, node: fx.Node) -> None:
    """``pad(x, pads, value=v)`` → ``QPad(q)``, filling with the input's integer for ``v`` (its zero
    point for 0), or copying its integers."""
    qp = qparams_of(node.args[0], node)
    pads, mode, value = _pad_of(node, lo.module(node))
    fill = qp.zero_point + round(value / qp.scale)
    if not qp.qmin <= fill <= qp.qmax:
        lo_value, hi_value = qp.scale * (qp.qmin - qp.zero_point), qp.scale * (qp.qmax - qp.zero_point)
        raise NotRepresentable(f"{node.name}: padding with {value} is outside its input's range "
                               f"[{lo_value:.3g}, {hi_value:.3g}]")
    lo.become(node, QPad(pads, fill, mode), leaf_name(node), node.args[:1])
    records.put(node, qp)


PAD = Op("pad", "padding: the zero point, or copies of the integers, added around them; same scale", lower_pad,
         Output.SAME, modules=CONSTANT_PADS + tuple(COPYING_PADS), functions=(F.pad,), accepts=_zero_fill_or_copies,
         integer_modules=(QPad,),
         homogeneous=True, channelwise=True, example=lambda: nn.ZeroPad2d((0, 1, 0, 1)))
OPS = (PAD,)
