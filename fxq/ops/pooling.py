"""Pooling on integers, at the input's scale: window max, and window mean with one rounding."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxq import records
from fxq.ops.base import Lowering, Op, Output, leaf_name, pair, qparams_of
from fxq.qmodules import QAdaptiveMaxPool2d, QAvgPool2d, QMaxPool2d


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
OPS = (MAX_POOL, AVG_POOL, MEAN)
