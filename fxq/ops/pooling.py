"""Pooling on integers, at the input's scale: window max, and window mean with one rounding
(resampling is `fxq.ops.resize`)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxq.config import Rounding
from fxq.files import schema as sc
from fxq.files.schema import Schema
from fxq.graphs import records
from fxq.graphs.twin import FloatAvgPool, on_integers
from fxq.integers import intmath, windows
from fxq.integers.affine import ActQParams
from fxq.ops.base import Lowering, Op, Output, call_arguments, leaf_name, pair, qparams_of


class QMaxPool2d(nn.MaxPool2d):
    """uint8 → uint8 max pooling: max commutes with the monotone ``q ↦ s·(q − z)``.

    torch's uint8 max pooling rejects channels-last input, the layout a QConv2d returns, so the
    integers are made contiguous first.
    """

    schema = Schema({"kernel_size": sc.int_or_pair(1), "stride": sc.int_or_pair(1),
                     "padding": sc.int_or_pair(0), "dilation": sc.int_or_pair(1),
                     "return_indices": sc.one_of(False), "ceil_mode": sc.one_of(True, False)}, {})

    def twin(self, node) -> nn.Module:
        return self  # the max of values is the value of the max

    def to_onnx(self, b, node, inputs):  # on the uint8 integers themselves
        k, s, p, d = (list(pair(v)) for v in (self.kernel_size, self.stride, self.padding, self.dilation))
        return b.node("MaxPool", [inputs[0]], node.name, kernel_shape=k, strides=s, pads=p + p, dilations=d,
                      ceil_mode=int(self.ceil_mode))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return super().forward(q.contiguous())


class QAdaptiveMaxPool2d(nn.AdaptiveMaxPool2d):
    """uint8 → uint8 adaptive max pooling; torch has no integer kernel for it, so it runs on the
    integers held in float32 (exact below 2^24) and returns them as integers."""

    schema = Schema({"output_size": lambda v: isinstance(v, tuple) and len(v) == 2
                     and all(x is None or (sc.is_int(x) and x >= 1) for x in v),
                     "return_indices": sc.one_of(False)}, {})

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return super().forward(q.to(torch.float32)).to(q.dtype)

    def twin(self, node) -> nn.Module:
        return nn.AdaptiveMaxPool2d(self.output_size)  # the max of values is the value of the max

    def to_onnx(self, b, node, inputs):
        """Separably: the max over each window's rows, then over its columns (slices of the uint8
        integers, ReduceMax, Concat): exact."""
        x = inputs[0]
        for axis, (size, out) in enumerate(zip(b.shape_of(node.args[0])[-2:], b.shape_of(node)[-2:]), start=2):
            windows = [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]
            parts = [b.node("ReduceMax", [b.node("Slice", [x, b.constant(f"{node.name}_start", b.ints([start])),
                                                            b.constant(f"{node.name}_end", b.ints([end])),
                                                            b.constant(f"{node.name}_axis", b.ints([axis]))],
                                                 f"{node.name}_slice"),
                                          b.constant(f"{node.name}_axes", b.ints([axis]))],
                                f"{node.name}_max", keepdims=1)
                     for start, end in windows]
            x = b.node("Concat", parts, f"{node.name}_{axis}", axis=axis)
        return x


class QAvgPool2d(nn.Module):
    """uint8 → uint8 average pooling at the input's scale (`fxq.integers.windows.window_mean`): a window
    pool (``kind="window"``: kernel, stride, padding, ceil_mode, count_include_pad,
    divisor_override as in ``nn.AvgPool2d``) or an adaptive one (``kind="adaptive"``:
    ``output_size``, None entries keeping the input's size). ``keepdim=False`` drops the two
    pooled dimensions (``x.mean((2, 3))``)."""

    schema = Schema({"kind": sc.one_of("window", "adaptive"), "kernel": sc.optional(sc.ints(1, 2)),
                     "stride": sc.optional(sc.ints(1, 2)), "padding": sc.optional(sc.ints(0, 2)),
                     "ceil_mode": sc.one_of(True, False), "count_include_pad": sc.one_of(True, False),
                     "divisor_override": sc.optional(sc.int_at_least(1)),
                     "output_size": sc.optional(lambda v: isinstance(v, tuple) and len(v) == 2
                                                and all(x is None or (sc.is_int(x) and x >= 1) for x in v)),
                     "keepdim": sc.one_of(True, False), "bits": sc.act_bits,
                     "rank": sc.optional(sc.int_at_least(3)), "requantize_as": sc.REQUANTIZE},
                    {"zero_point": torch.int32, "scale": torch.float64},
                    ranges=lambda m: sc.zero_point_fits(m, "zero_point", m.bits))

    def __init__(self, qp: ActQParams, kind: str, kernel=None, stride=None, padding=None, ceil_mode=False,
                 count_include_pad=True, divisor_override=None, output_size=None, keepdim=True, rank=None,
                 rounding: Rounding = Rounding.FIXED_POINT):
        super().__init__()
        self.requantize_as = Rounding(rounding)  # onnxruntime's: a global mean as QLinearGlobalAveragePool
        self.kind, self.kernel, self.stride, self.padding = kind, kernel, stride, padding
        self.ceil_mode, self.count_include_pad, self.divisor_override = ceil_mode, count_include_pad, divisor_override
        self.output_size, self.keepdim, self.bits = output_size, keepdim, qp.bits
        self.rank = rank  # the input's rank, where the pooled dims were counted from the front
        self.register_buffer("zero_point", torch.tensor(qp.zero_point, dtype=torch.int32))
        self.register_buffer("scale", torch.tensor(qp.scale, dtype=torch.float64))

    @property
    def runtime_mean(self) -> bool:
        """A global mean computed as onnxruntime does (`fxq.integers.intmath.runtime_global_mean`)."""
        return self.requantize_as is Rounding.ONNXRUNTIME and self.kind == "adaptive" and self.output_size == (1, 1)

    @classmethod
    def global_mean(cls, qp: ActQParams, keepdim: bool = True, rank: int | None = None,
                    rounding: Rounding = Rounding.FIXED_POINT) -> "QAvgPool2d":
        return cls(qp, "adaptive", output_size=(1, 1), keepdim=keepdim, rank=rank, rounding=rounding)

    def windows(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The row and column membership matrices and the ``[out_h, out_w]`` divisors."""
        if self.kind == "adaptive":
            out = [size if o is None else o for o, size in zip(self.output_size, (height, width))]
            (rows, d_rows), (columns, d_columns) = (windows.adaptive_windows(height, out[0]),
                                                    windows.adaptive_windows(width, out[1]))
        else:
            (rows, d_rows), (columns, d_columns) = (
                windows.pool_windows(size, k, s, p, self.ceil_mode, self.count_include_pad)
                for size, k, s, p in zip((height, width), self.kernel, self.stride, self.padding))
        divisors = d_rows[:, None] * d_columns[None, :]
        if self.divisor_override is not None:
            divisors = torch.full_like(divisors, self.divisor_override)
        return rows, columns, divisors

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if self.rank is not None and q.dim() != self.rank:
            raise ValueError(f"this mean pools dims (2, 3) of a {self.rank}-d tensor; got a {q.dim()}-d one")
        if self.runtime_mean:
            out = intmath.runtime_global_mean(q, float(self.scale), int(self.zero_point), (1 << self.bits) - 1)
        else:
            rows, columns, divisors = (t.to(q.device) for t in self.windows(*q.shape[-2:]))
            out = windows.window_mean(q, rows, columns, divisors, int(self.zero_point), (1 << self.bits) - 1)
        return out if self.keepdim else out.reshape(out.shape[:-2])

    def extra_repr(self) -> str:
        if self.kind == "adaptive":
            return f"adaptive to {self.output_size}" + ("" if self.keepdim else ", dims dropped")
        return (f"kernel={self.kernel}, stride={self.stride}, padding={self.padding}, ceil_mode={self.ceil_mode}, "
                f"count_include_pad={self.count_include_pad}")

    def twin(self, node) -> nn.Module:
        if self.runtime_mean:
            return on_integers(self, node)
        return FloatAvgPool(self, records.get(node, ActQParams))

    def to_onnx(self, b, node, inputs):
        """Exactly fxq's pooling: the centred integers' window means in float32 (ONNX's
        AveragePool / GlobalAveragePool, or products with the window membership matrices for
        other adaptive sizes; every window sum an exact integer), rounded half away from zero."""
        qp, name = records.get(node, ActQParams), node.name
        if self.runtime_mean:  # DequantizeLinear → GlobalAveragePool → QuantizeLinear: QLinearGlobalAveragePool
            out = b.quantize(b.node("GlobalAveragePool", [b.dequantize(inputs[0], qp, f"{name}_in")], f"{name}_mean"),
                             qp, name)
        elif self.kind == "window":
            if self.divisor_override is not None:
                raise ValueError(f"node '{name}': divisor_override does not export")
            out = _exact_mean(b, inputs[0], qp, name, "AveragePool", kernel_shape=list(self.kernel),
                               strides=list(self.stride), pads=list(self.padding) * 2, ceil_mode=int(self.ceil_mode),
                               count_include_pad=int(self.count_include_pad))
        elif self.output_size == (1, 1):
            out = _exact_mean(b, inputs[0], qp, name, "GlobalAveragePool")
        else:
            height, width = b.shape_of(node.args[0])[-2:]
            rows, columns, divisors = self.windows(height, width)
            x = _centred(b, inputs[0], qp, name)
            across = b.node("MatMul", [x, b.constant(f"{name}_columns", columns.t().float())], f"{name}_w")
            both = b.node("MatMul", [b.constant(f"{name}_rows", rows.float()), across], f"{name}_h")
            mean = b.node("Div", [both, b.constant(f"{name}_divisors", divisors.float())], f"{name}_mean")
            out = _rounded_back(b, mean, qp, name)
        if self.keepdim:
            return out
        shape = b.constant(f"{name}_shape", b.ints([-1, *b.shape_of(node)[1:]]))
        return b.node("Reshape", [out, shape], f"{name}_flat")


def _centred(b, q: str, qp: ActQParams, name: str) -> str:
    """``q − z`` in float32 (exact: small integers)."""
    as_float = b.node("Cast", [q], f"{name}_float", to=b.types.FLOAT)
    return b.node("Sub", [as_float, b.constant(f"{name}_z", np.float32(qp.zero_point))], f"{name}_centred")


def _rounded_back(b, mean: str, qp: ActQParams, name: str) -> str:
    """``clamp(z + round_half_away(mean), 0, qmax)`` as uint8: fxq's rounding rule."""
    magnitude = b.node("Floor", [b.node("Add", [b.node("Abs", [mean], f"{name}_abs"),
                                                      b.constant(f"{name}_half", np.float32(0.5))], f"{name}_nudge")],
                          f"{name}_floor")
    rounded = b.node("Mul", [b.node("Sign", [mean], f"{name}_sign"), magnitude], f"{name}_round")
    shifted = b.node("Add", [rounded, b.constant(f"{name}_z", np.float32(qp.zero_point))], f"{name}_shift")
    clipped = b.node("Clip", [shifted, b.constant(f"{name}_lo", np.float32(0)),
                                 b.constant(f"{name}_hi", np.float32(qp.qmax))], f"{name}_clip")
    return b.node("Cast", [clipped], name, to=b.types.UINT8)


def _exact_mean(b, q: str, qp: ActQParams, name: str, op: str, **attributes) -> str:
    """An average pooling of the centred integers in float32 (every window sum is an exact
    integer, one correctly rounded division), rounded back as fxq does: exact."""
    return _rounded_back(b, b.node(op, [_centred(b, q, qp, name)], f"{name}_mean", **attributes), qp, name)


_MAX = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVG = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")


def _max_pool_of(node: fx.Node, module: nn.Module | None) -> nn.Module:
    if module is not None:
        return module
    if node.target is F.adaptive_max_pool2d:
        return nn.AdaptiveMaxPool2d(**call_arguments(node, ("output_size", "return_indices"),
                                                     {"return_indices": False}))
    a = call_arguments(node, _MAX, {"padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False})
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
        # as pairs: a model may give lists (timm's MViTv2), which the saved form does not take
        integer = QMaxPool2d(*(pair(v) for v in (pool.kernel_size, pool.stride or pool.kernel_size, pool.padding,
                                                 pool.dilation)), ceil_mode=pool.ceil_mode)
    lo.become(node, integer, leaf_name(node), node.args[:1])
    records.put(node, qp)


def _avg_pool_of(lo: Lowering, node: fx.Node, qp) -> QAvgPool2d:
    pool = lo.module(node)
    if pool is None and node.target is F.adaptive_avg_pool2d:
        pool = nn.AdaptiveAvgPool2d(call_arguments(node, ("output_size",), {})["output_size"])
    elif pool is None:
        a = call_arguments(node, _AVG, {"stride": None, "padding": 0, "ceil_mode": False,
                                    "count_include_pad": True, "divisor_override": None})
        pool = nn.AvgPool2d(**a)
    if isinstance(pool, nn.AdaptiveAvgPool2d):
        return QAvgPool2d(qp, "adaptive", output_size=pair(pool.output_size), rounding=lo.rounding)
    return QAvgPool2d(qp, "window", pair(pool.kernel_size), pair(pool.stride or pool.kernel_size),
                      pair(pool.padding), pool.ceil_mode, pool.count_include_pad, pool.divisor_override,
                      rounding=lo.rounding)


def lower_avg_pool(lo: Lowering, node: fx.Node) -> None:
    """``avgpool(x)`` → ``QAvgPool2d(q)``: integer window sums, one rounding division each."""
    qp = qparams_of(node.args[0], node)
    lo.become(node, _avg_pool_of(lo, node, qp), leaf_name(node), node.args[:1])
    records.put(node, qp)


def _mean_dims(node: fx.Node) -> tuple[tuple, bool]:
    a = call_arguments(node, ("dim", "keepdim"), {"keepdim": False})
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
    pool = QAvgPool2d.global_mean(qp, keepdim, rank=4 if dims == (2, 3) else None, rounding=lo.rounding)
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


OPS = (MAX_POOL, AVG_POOL, MEAN)
