"""Pooling and resampling on integers, at the input's scale: window max, window mean with one
rounding, and nearest-neighbour upsampling (each output integer a copy of an input integer)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxq import records
from fxq import schema as sc
from fxq.affine import ActQParams
from fxq.ops.base import Lowering, Op, Output, leaf_name, pair, qparams_of
from fxq.qmodules import QAdaptiveMaxPool2d, QAvgPool2d, QMaxPool2d
from fxq.schema import Schema
from fxq.twin import OnIntegers


def _arguments(node: fx.Node, names: tuple[str, ...], defaults: dict) -> dict:
    """A functional call's arguments after its input, by name."""
    values = dict(zip(names, node.args[1:]))
    values.update(node.kwargs)
    return {name: values.get(name, defaults.get(name)) for name in names}


_MAX = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVG = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")


def _max_pool_of(node: fx.Node, module: nn.Module | None) -> nn.Module:
    if module is not None:
        return module
    if node.target is F.adaptive_max_pool2d:
        return nn.AdaptiveMaxPool2d(**_arguments(node, ("output_size", "return_indices"), {"return_indices": False}))
    a = _arguments(node, _MAX, {"padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False})
    return nn.MaxPool2d(**a)


def _no_indices(node: fx.Node, module: nn.Module | None) -> str | None:
    return "max pooling that returns indices" if _max_pool_of(node, module).return_indices else None


def lower_max_pool(lo: Lowering, node: fx.Node) -> None:
    """``maxpool(x)`` → ``QMaxPool2d(q)``: max commutes with the monotone ``q ↦ s·(q − z)``."""
    qp = qparams_of(node.args[0], node)
    pool = _max_pool_of(node, lo.module(node))
    if isinstance(pool, nn.AdaptiveMaxPool2d):
        integer = QAdaptiveMaxPool2d(pair(pool.output_size))
    else:
        integer = QMaxPool2d(pool.kernel_size, pool.stride or pool.kernel_size, pool.padding, pool.dilation,
                             ceil_mode=pool.ceil_mode)
    lo.become(node, integer, leaf_name(node), node.args[:1])
    records.put(node, qp)


def _avg_pool_of(lo_module: nn.Module | None, node: fx.Node, qp) -> QAvgPool2d:
    pool = lo_module
    if pool is None and node.target is F.adaptive_avg_pool2d:
        pool = nn.AdaptiveAvgPool2d(_arguments(node, ("output_size",), {})["output_size"])
    elif pool is None:
        a = _arguments(node, _AVG, {"stride": None, "padding": 0, "ceil_mode": False,
                                    "count_include_pad": True, "divisor_override": None})
        pool = nn.AvgPool2d(**a)
    if isinstance(pool, nn.AdaptiveAvgPool2d):
        return QAvgPool2d(qp, "adaptive", output_size=pair(pool.output_size))
    return QAvgPool2d(qp, "window", pair(pool.kernel_size), pair(pool.stride or pool.kernel_size),
                      pair(pool.padding), pool.ceil_mode, pool.count_include_pad, pool.divisor_override)


def lower_avg_pool(lo: Lowering, node: fx.Node) -> None:
    """``avgpool(x)`` → ``QAvgPool2d(q)``: integer window sums, one rounding division each."""
    qp = qparams_of(node.args[0], node)
    lo.become(node, _avg_pool_of(lo.module(node), node, qp), leaf_name(node), node.args[:1])
    records.put(node, qp)


def _mean_dims(node: fx.Node) -> tuple[tuple, bool]:
    a = _arguments(node, ("dim", "keepdim"), {"keepdim": False})
    dims = a["dim"] if isinstance(a["dim"], (tuple, list)) else (a["dim"],)
    return tuple(sorted(dims)) if all(isinstance(d, int) for d in dims) else (), a["keepdim"]


def _spatial_mean(node: fx.Node, module: nn.Module | None) -> str | None:
    dims, keepdim = _mean_dims(node)
    if dims in ((2, 3), (-2, -1)) and isinstance(keepdim, bool) and "dtype" not in node.kwargs:
        return None
    return f"a mean over dims {dims or '?'} (the integer form averages the two spatial dims)"


def lower_mean(lo: Lowering, node: fx.Node) -> None:
    """``x.mean((2, 3))`` → the global ``QAvgPool2d`` (dims dropped unless ``keepdim``)."""
    qp = qparams_of(node.args[0], node)
    dims, keepdim = _mean_dims(node)
    # dims counted from the front are the last two of a 4-d tensor only
    pool = QAvgPool2d.global_mean(qp, keepdim, rank=4 if dims == (2, 3) else None)
    lo.become(node, pool, leaf_name(node), node.args[:1])
    records.put(node, qp)


MAX_POOL = Op("max_pool2d", "window max of the integers at the input's scale", lower_max_pool, Output.SAME,
              modules=(nn.MaxPool2d, nn.AdaptiveMaxPool2d), functions=(F.max_pool2d, F.adaptive_max_pool2d),
              accepts=_no_indices, integer_modules=(QMaxPool2d, QAdaptiveMaxPool2d), homogeneous=True,
              channelwise=True, example=lambda: nn.MaxPool2d(3, 2, 1, ceil_mode=True))
AVG_POOL = Op("avg_pool2d", "integer window sums, one rounding division each, at the input's scale",
              lower_avg_pool, Output.SAME, modules=(nn.AvgPool2d, nn.AdaptiveAvgPool2d),
              functions=(F.avg_pool2d, F.adaptive_avg_pool2d), integer_modules=(QAvgPool2d,),
              homogeneous=True, channelwise=True,
              example=lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False))
MEAN = Op("mean", "the spatial mean as global average pooling", lower_mean, Output.SAME,
          functions=(torch.mean,), methods=("mean",), accepts=_spatial_mean, integer_modules=(QAvgPool2d,),
          homogeneous=True, channelwise=True, example=lambda: lambda x: x.mean((2, 3), keepdim=True))


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

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        x = q if q.dtype == torch.uint8 else q.to(torch.float32)
        resized = F.interpolate(x, _one_for_all(self.size), _one_for_all(self.scale_factor), self.mode,
                                recompute_scale_factor=self.recompute_scale_factor or None)
        return resized.to(q.dtype)

    def extra_repr(self) -> str:
        how = f"size={self.size}" if self.size else f"scale_factor={self.scale_factor}"
        return f"{how}, mode={self.mode}"

    def twin(self, node) -> nn.Module:
        qp = records.get(node, ActQParams)
        return OnIntegers(self.forward, [qp], qp)

    def describe(self) -> str:
        return "each output integer a copy of its nearest input integer, same scale"

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


def _one_for_all(values: tuple | None):
    """A one-item size or scale as torch takes it for every spatial dim: a number."""
    return values[0] if values is not None and len(values) == 1 else values


_RESIZE = ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")


def _resize_of(node: fx.Node, module: nn.Module | None) -> dict:
    if module is not None:
        return {"size": module.size, "scale_factor": module.scale_factor, "mode": module.mode,
                "recompute_scale_factor": module.recompute_scale_factor, "antialias": False}
    return _arguments(node, _RESIZE, {"mode": "nearest", "antialias": False})


def _nearest(node: fx.Node, module: nn.Module | None) -> str | None:
    a = _resize_of(node, module)
    if a["mode"] not in ("nearest", "nearest-exact") or a["antialias"]:
        return f"{a['mode']} resampling (the integer form copies nearest neighbours)"
    if any(isinstance(v, fx.Node) for v in (a["size"], a["scale_factor"])):
        return "resampling to a size computed from the input"
    return None


def _as_tuple(value, convert) -> tuple | None:
    if value is None:
        return None
    return tuple(convert(v) for v in value) if isinstance(value, (tuple, list)) else (convert(value),)


def lower_resize(lo: Lowering, node: fx.Node) -> None:
    """``interpolate(x, mode="nearest")`` → ``QResizeNearest(q)``: copies of the integers."""
    qp = qparams_of(node.args[0], node)
    a = _resize_of(node, lo.module(node))
    resize = QResizeNearest(_as_tuple(a["size"], int), _as_tuple(a["scale_factor"], float), a["mode"],
                            bool(a["recompute_scale_factor"]))
    lo.become(node, resize, leaf_name(node), node.args[:1])
    records.put(node, qp)


RESIZE = Op("resize_nearest", "nearest-neighbour upsampling: copies of the integers, same scale", lower_resize,
            Output.SAME, modules=(nn.Upsample, nn.UpsamplingNearest2d), functions=(F.interpolate,),
            accepts=_nearest, integer_modules=(QResizeNearest,), homogeneous=True, channelwise=True,
            example=lambda: nn.Upsample(scale_factor=2))
OPS = (MAX_POOL, AVG_POOL, MEAN, RESIZE)
