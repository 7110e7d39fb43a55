"""Pooling on integers, at the input's scale: window max, and window mean with one rounding."""
from __future__ import annotations

import torch.nn.functional as F
from torch import fx, nn

from fxq import records
from fxq.ops.base import Lowering, Op, Output, pair, qparams_of
from fxq.qmodules import QAvgPool2d, QMaxPool2d


def lower_max_pool(lo: Lowering, node: fx.Node) -> None:
    """``maxpool(x)`` → ``QMaxPool2d(q)``: max commutes with the monotone ``q ↦ s·(q − z)``."""
    qp = qparams_of(node.args[0], node)
    pool = lo.modules[node.target]
    lo.become(node, QMaxPool2d(pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                               ceil_mode=pool.ceil_mode), node.target, node.args[:1])
    records.put(node, qp)


def _avg_pool_accepts(node: fx.Node, pool: nn.Module | None) -> str | None:
    if pool is None:
        pool = nn.AdaptiveAvgPool2d(node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size"))
    if isinstance(pool, nn.AdaptiveAvgPool2d):
        return None if pool.output_size in (1, (1, 1), [1, 1]) else f"adaptive pooling to {pool.output_size}"
    if pair(pool.padding) != (0, 0) or pool.ceil_mode:
        return "average pooling with padding or ceil_mode"
    return None


def lower_avg_pool(lo: Lowering, node: fx.Node) -> None:
    """``avgpool(x)`` → ``QAvgPool2d(q)``: integer window sum, one rounding division."""
    qp = qparams_of(node.args[0], node)
    pool = lo.module(node)
    if pool is None or isinstance(pool, nn.AdaptiveAvgPool2d):
        integer = QAvgPool2d(None, None, qp.zero_point)
    else:
        kernel = pair(pool.kernel_size)
        integer = QAvgPool2d(kernel, pair(pool.stride or pool.kernel_size), qp.zero_point)
    lo.become(node, integer, "avgpool", node.args[:1])
    records.put(node, qp)


MAX_POOL = Op("max_pool2d", "window max of the integers at the input's scale", lower_max_pool, Output.SAME,
              modules=(nn.MaxPool2d,), integer_modules=(QMaxPool2d,), homogeneous=True, channelwise=True,
              example=lambda: nn.MaxPool2d(2))
AVG_POOL = Op("avg_pool2d", "integer window sum, one rounding division, at the input's scale",
              lower_avg_pool, Output.SAME, modules=(nn.AvgPool2d, nn.AdaptiveAvgPool2d),
              functions=(F.adaptive_avg_pool2d,), accepts=_avg_pool_accepts,
              integer_modules=(QAvgPool2d,), homogeneous=True, channelwise=True,
              example=lambda: nn.AvgPool2d(2))
OPS = (MAX_POOL, AVG_POOL)
