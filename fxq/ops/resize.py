"""Resampling on integers, at the input's scale and zero point. Nearest neighbours copy input
integers (nothing rounds). Bilinear resampling is a weighted mean of at most two neighbours per
axis, so it stays in the input's range: the weights are fixed point (16 fractional bits, from
torch's own coordinate mapping), the centred integers are summed exactly and rounded once."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxq.files import schema as sc
from fxq.files.schema import Schema
from fxq.graphs import records
from fxq.graphs.twin import OnIntegers
from fxq.integers.affine import ActQParams, storage_dtype
from fxq.ops.base import Lowering, Op, Output, call_arguments, leaf_name, qparams_of

WEIGHT_BITS = 16  # a weight's fractional bits: sums of 16-bit inputs stay below 2^53, exact in float64


class QResizeNearest(nn.Module):
    """Integers → integers: nearest-neighbour resampling (``F.interpolate`` with mode "nearest" or
    "nearest-exact", by ``size`` or ``scale_factor``): every output integer is a copy of an input
    integer, so the input's parameters hold and nothing rounds. torch resamples uint8 itself;
    wider integers go through float32, exact below 2^24."""

    schema = Schema({"size": sc.optional(sc.ints(1)),
                     "scale_factor": sc.optional(lambda v: isinstance(v, tuple) and 1 <= len(v) <= 3
                                                 and all(sc.finite_float(x) and x > 0 for x in v)),
                     "mode": sc.one_of("nearest", "nearest-exact"),
                     "recompute_scale_factor": sc.one_of(True, False)}, {})

    def __init__(self, size: tuple | None, scale_factor: tuple | None, mode: str, recompute_scale_factor: bool):
        super().__init__()
        self.size, self.scale_factor, self.mode = size, scale_factor, mode
        self.recompute_scale_factor = recompute_scale_factor

    def forward(self, q: torch.Tensor, size: tuple | None = None) -> torch.Tensor:
        """``size``: the output size read from a tensor's shape in the graph (``x.shape[2:]``),
        where the float model resized to another tensor's size."""
        x = q if q.dtype == torch.uint8 else q.to(torch.float32)
        size = _one_for_all(self.size) if size is None else size
        resized = F.interpolate(x, size, _one_for_all(self.scale_factor), self.mode,
                                recompute_scale_factor=self.recompute_scale_factor or None)
        return resized.to(q.dtype)

    def extra_repr(self) -> str:
        how = (f"size={self.size}" if self.size else f"scale_factor={self.scale_factor}" if self.scale_factor
               else "size read from a shape")
        return f"{how}, mode={self.mode}"

    def twin(self, node) -> nn.Module:
        qp = records.get(node, ActQParams)
        return OnIntegers(self.forward, [qp], qp)

    def to_onnx(self, b, node, inputs):
        """ONNX Resize on the integers: torch's "nearest" is Resize's asymmetric floor, its
        "nearest-exact" half_pixel rounding half up; by the output size the export saw, or by
        the scale factors torch was given (then torch and onnxruntime compute the same ratio)."""
        rank = len(b.shape_of(node))
        transform, rounding = (("asymmetric", "floor") if self.mode == "nearest"
                               else ("half_pixel", "round_prefer_ceil"))
        if self.scale_factor is not None and not self.recompute_scale_factor:
            factors = self.scale_factor * (rank - 2) if len(self.scale_factor) == 1 else self.scale_factor
            scales = torch.tensor([1.0, 1.0, *factors], dtype=torch.float32)
            how = ["", b.constant(f"{node.name}_scales", scales)]
        else:
            how = ["", "", b.node("Concat", [b.node("Slice", [b.node("Shape", [inputs[0]], f"{node.name}_shape"),
                                                        b.constant(f"{node.name}_0", b.ints([0])),
                                                        b.constant(f"{node.name}_2", b.ints([2]))],
                                              f"{node.name}_nc"),
                                       b.constant(f"{node.name}_hw", b.ints(list(b.shape_of(node)[2:])))],
                            f"{node.name}_sizes", axis=0)]
        return b.node("Resize", [inputs[0], *how], node.name, mode="nearest",
                      coordinate_transformation_mode=transform, nearest_mode=rounding)


class QResizeBilinear(nn.Module):
    """Integers → integers: bilinear resampling (``F.interpolate(x, mode="bilinear")``, by
    ``size`` or ``scale_factor``, either ``align_corners``). Along each spatial axis the output is
    ``Σ w·(q − z)`` over the input's rows with integer weights ``w = round(2^16 · torch's weight)``;
    the two axes' sums are exact in float64, divided by ``2^32`` and rounded once (half to even),
    and the zero point added back: at most one step from torch's float bilinear of the values."""

    schema = Schema({"size": sc.optional(sc.ints(1)),
                     "scale_factor": sc.optional(lambda v: isinstance(v, tuple) and 1 <= len(v) <= 2
                                                 and all(sc.finite_float(x) and x > 0 for x in v)),
                     "align_corners": sc.one_of(True, False),
                     "recompute_scale_factor": sc.one_of(True, False), "zero_point": sc.int_at_least(0),
                     "bits": sc.int_at_least(2)}, {})

    def __init__(self, size: tuple | None, scale_factor: tuple | None, align_corners: bool,
                 recompute_scale_factor: bool, zero_point: int, bits: int):
        super().__init__()
        self.size, self.scale_factor, self.align_corners = size, scale_factor, align_corners
        self.recompute_scale_factor, self.zero_point, self.bits = recompute_scale_factor, zero_point, bits

    def weights(self, height: int, width: int, size: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The integer weights (rows: output positions, columns: input positions) along the height
        and the width: torch's bilinear resampling of unit impulses along each axis, fixed point."""
        size = _one_for_all(self.size) if size is None else tuple(size)
        impulses = [torch.eye(height, dtype=torch.float64)[:, None, :, None].expand(height, 1, height, width),
                    torch.eye(width, dtype=torch.float64)[:, None, None, :].expand(width, 1, height, width)]
        resized = [F.interpolate(x, size, _one_for_all(self.scale_factor), "bilinear",
                                 self.align_corners, self.recompute_scale_factor or None) for x in impulses]
        along_h, along_w = resized[0][:, 0, :, 0].T, resized[1][:, 0, 0, :].T
        return tuple(torch.round(w * (1 << WEIGHT_BITS)) for w in (along_h, along_w))

    def forward(self, q: torch.Tensor, size: tuple | None = None) -> torch.Tensor:
        """``size``: the output size read from a tensor's shape in the graph (``y.shape[2:]``)."""
        along_h, along_w = self.weights(*q.shape[-2:], size)
        sums = along_h @ (q.to(torch.float64) - self.zero_point) @ along_w.T
        out = torch.round(sums / (1 << 2 * WEIGHT_BITS)) + self.zero_point
        return out.clamp_(0, (1 << self.bits) - 1).to(storage_dtype(self.bits))

    def extra_repr(self) -> str:
        how = (f"size={self.size}" if self.size else f"scale_factor={self.scale_factor}" if self.scale_factor
               else "size read from a shape")
        return f"{how}, align_corners={self.align_corners}"

    def twin(self, node) -> nn.Module:
        qp = records.get(node, ActQParams)
        return OnIntegers(self.forward, [qp], qp)

    def to_onnx(self, b, node, inputs):
        """Cast double → Sub z → MatMul by each axis's weights (for the sizes the export saw) →
        Mul 2^−32 → Round → QuantizeLinear(1, z): `forward`'s steps."""
        name = node.name
        read = b.shape_of(node)[-2:] if self.size is None and self.scale_factor is None else None
        along_h, along_w = self.weights(*b.shape_of(node.args[0])[-2:], read)
        real = b.node("Cast", [inputs[0]], f"{name}_real", to=b.types.DOUBLE)
        centred = b.node("Sub", [real, b.constant(f"{name}_z", np.float64(self.zero_point))], f"{name}_centred")
        rows = b.node("MatMul", [b.constant(f"{name}_h", along_h), centred], f"{name}_rows")
        sums = b.node("MatMul", [rows, b.constant(f"{name}_w", along_w.T.contiguous())], f"{name}_sums")
        scaled = b.node("Mul", [sums, b.constant(f"{name}_unit", np.float64(2.0 ** (-2 * WEIGHT_BITS)))],
                        f"{name}_scaled")
        rounded = b.node("Cast", [b.node("Round", [scaled], f"{name}_rounded")], f"{name}_float", to=b.types.FLOAT)
        return b.quantize(rounded, ActQParams(1.0, self.zero_point, self.bits), name)


def _one_for_all(values: tuple | None):
    """A one-item size or scale as torch takes it for every spatial dim: a number."""
    return values[0] if values is not None and len(values) == 1 else values


_RESIZE = ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")


def _resize_of(node: fx.Node, module: nn.Module | None) -> dict:
    if module is not None:
        return {"size": module.size, "scale_factor": module.scale_factor, "mode": module.mode,
                "align_corners": module.align_corners, "recompute_scale_factor": module.recompute_scale_factor,
                "antialias": False}
    return call_arguments(node, _RESIZE, {"mode": "nearest", "antialias": False})


def _resizable(node: fx.Node, module: nn.Module | None) -> str | None:
    a = _resize_of(node, module)
    if a["mode"] not in ("nearest", "nearest-exact", "bilinear") or a["antialias"]:
        smoothing = " antialiased" if a["antialias"] else ""
        return f"{a['mode']}{smoothing} resampling (the integer forms: nearest, bilinear)"
    if _computed(a["scale_factor"]):
        return "resampling by a factor computed from the input"
    return None


def _computed(value) -> bool:
    """A size or factor that is (or holds) a node: read from a shape while the model runs."""
    return isinstance(value, fx.Node) or (isinstance(value, (tuple, list)) and any(isinstance(v, fx.Node)
                                                                                  for v in value))


def _as_tuple(value, convert) -> tuple | None:
    if value is None:
        return None
    return tuple(convert(v) for v in value) if isinstance(value, (tuple, list)) else (convert(value),)


def lower_resize(lo: Lowering, node: fx.Node) -> None:
    """``interpolate(x, mode="nearest")`` → ``QResizeNearest(q)``: copies of the integers;
    ``mode="bilinear"`` → ``QResizeBilinear(q)``: fixed-point weights, one rounding."""
    qp = qparams_of(node.args[0], node)
    a = _resize_of(node, lo.module(node))
    computed = _computed(a["size"])
    size, scale_factor = None if computed else _as_tuple(a["size"], int), _as_tuple(a["scale_factor"], float)
    recompute = bool(a["recompute_scale_factor"])
    resize = (QResizeBilinear(size, scale_factor, bool(a["align_corners"]), recompute, qp.zero_point, qp.bits)
              if a["mode"] == "bilinear" else QResizeNearest(size, scale_factor, a["mode"], recompute))
    lo.become(node, resize, leaf_name(node), (node.args[0], a["size"]) if computed else node.args[:1])
    records.put(node, qp)


RESIZE = Op("resize", "nearest (copies of the integers) or bilinear (fixed-point weights, exact sums, one "
            "rounding) resampling; same scale", lower_resize, Output.SAME,
            modules=(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d), functions=(F.interpolate,),
            accepts=_resizable, integer_modules=(QResizeNearest, QResizeBilinear), homogeneous=True, channelwise=True,
            example=lambda: nn.Upsample(scale_factor=2))
OPS = (RESIZE,)
