"""Ops that move integers without changing them: they keep their input's parameters."""
from __future__ import annotations

import torch
from torch import fx, nn

from fxq import records
from fxq.ops.base import Lowering, Op, Output, qparams_of


def lower_identity(lo: Lowering, node: fx.Node) -> None:
    """``dropout(x)`` / ``identity(x)`` (eval mode) → removed."""
    qparams_of(node.args[0], node)
    lo.remove(node, node.args[0])


def lower_same(lo: Lowering, node: fx.Node) -> None:
    """``flatten(x)``, ``x.view(...)`` → the same call on the integers, at the same parameters
    (an ``nn.Flatten`` becomes the ``torch.flatten`` call it stands for)."""
    records.put(node, qparams_of(node.args[0], node))
    module = lo.module(node)
    if isinstance(module, nn.Flatten):
        node.op, node.target = "call_function", torch.flatten
        node.args, node.kwargs = (node.args[0], module.start_dim, module.end_dim), {}


SHAPE_ATTRIBUTES = frozenset({"shape", "dtype", "ndim"})  # what getattr(x, name) may read


def _reads_a_shape(node: fx.Node, module: nn.Module | None) -> str | None:
    if node.target is not getattr or (len(node.args) == 2 and node.args[1] in SHAPE_ATTRIBUTES):
        return None
    return f"reads the attribute {node.args[1:]!r}"


def lower_nothing(lo: Lowering, node: fx.Node) -> None:
    """``x.size()`` returns Python ints: nothing to quantize."""


IDENTITY = Op("identity", "removed: the identity in eval mode", lower_identity, Output.SAME,
              modules=(nn.Identity, nn.Dropout), homogeneous=True, channelwise=True, example=nn.Identity)
RESHAPE = Op("reshape", "the same integers in another shape", lower_same, Output.SAME,
             modules=(nn.Flatten,), functions=(torch.flatten,),
             methods=("flatten", "view", "reshape", "contiguous"), keeps_call=True, homogeneous=True,
             example=lambda: nn.Flatten())
SIZE = Op("size", "a shape, not a tensor", lower_nothing, Output.NONE, methods=("size",),
          functions=(getattr,), accepts=_reads_a_shape, keeps_call=True,
          example=lambda: lambda x: x.size())
OPS = (IDENTITY, RESHAPE, SIZE)
