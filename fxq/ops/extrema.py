"""Extrema over dims on integers: ``x.amax(dims)``, ``x.amin(dims)`` (CBAM-style spatial attention
takes the channels' max beside their mean). ``q ↦ s·(q − z)`` is increasing, so the largest
integer is the integer of the largest value: same parameters, nothing rounds."""
from __future__ import annotations

import torch
from torch import fx, nn

from fxq.files import schema as sc
from fxq.files.schema import Schema
from fxq.graphs import records
from fxq.graphs.twin import OnIntegers
from fxq.integers.affine import ActQParams
from fxq.ops.base import Lowering, Op, Output, leaf_name, qparams_of
from fxq.ops.reductions import dims_of, dims_schema, reduces_given_dims

ONNX_REDUCTIONS = {"amax": "ReduceMax", "amin": "ReduceMin"}


class QExtremum(nn.Module):
    """Integers → integers: the largest (``amax``) or smallest (``amin``) integer over ``dims``."""

    schema = Schema({"kind": sc.one_of(*ONNX_REDUCTIONS), "dims": dims_schema, "keepdim": sc.one_of(True, False)},
                    {})

    def __init__(self, kind: str, dims: tuple[int, ...], keepdim: bool):
        super().__init__()
        self.kind, self.dims, self.keepdim = kind, dims, keepdim

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return getattr(torch, self.kind)(q, self.dims, self.keepdim)

    def extra_repr(self) -> str:
        return f"{self.kind}, dims={self.dims}, keepdim={self.keepdim}"

    def twin(self, node) -> nn.Module:
        qp = records.get(node, ActQParams)
        return OnIntegers(self.forward, [qp], qp)

    def to_onnx(self, b, node, inputs):
        """ReduceMax / ReduceMin on the integers."""
        axes = b.constant(f"{node.name}_axes", b.ints(list(self.dims)))
        return b.node(ONNX_REDUCTIONS[self.kind], [inputs[0], axes], node.name, keepdims=int(self.keepdim))


def _over_given_dims(node: fx.Node, module: nn.Module | None) -> str | None:
    return None if reduces_given_dims(node, False) else "an extremum over every element (the integer form takes dims)"


def lower_extremum(lo: Lowering, node: fx.Node) -> None:
    """``x.amax(dims)`` → ``QExtremum("amax")(q)``: the integers' own extremum, same parameters."""
    qp = qparams_of(node.args[0], node)
    dims, keepdim = dims_of(node)
    kind = node.target if isinstance(node.target, str) else node.target.__name__
    lo.become(node, QExtremum(kind, dims, keepdim), leaf_name(node), node.args[:1])
    records.put(node, qp)


EXTREMUM = Op("extremum", "the largest or smallest integer over given dims, same parameters", lower_extremum,
              Output.SAME, functions=(torch.amax, torch.amin), methods=("amax", "amin"), accepts=_over_given_dims,
              integer_modules=(QExtremum,), homogeneous=True, channelwise=False,
              example=lambda: lambda x: x.amax(1, keepdim=True))
OPS = (EXTREMUM,)
