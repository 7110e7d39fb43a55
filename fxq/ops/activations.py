"""Activations of one tensor: ReLU as ``max(q, z)`` at its input's scale."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxq import records
from fxq.affine import ActQParams
from fxq.ops.base import Lowering, Op, Output, leaf_name, qparams_of
from fxq.qmodules import QReLU, QRequantize


def lower_relu(lo: Lowering, node: fx.Node) -> None:
    """``relu(x)`` → ``QReLU(q)``: ``max(q, z)`` (placement "pre"); nothing with placement "post"
    (the producer's clamp at z = 0 is the ReLU); with "both", ``QRequantize(QReLU(q))``."""
    source = node.args[0]
    qp = qparams_of(source, node)
    after = records.get(node, ActQParams)
    if after is qp:  # placement "post": the producer's clamp at z = 0 already did the ReLU
        lo.remove(node, source)
        return
    lo.become(node, QReLU(qp.zero_point), leaf_name(node), (source,))
    records.put(node, qp)
    if after is not None:  # placement "both": a second quantization, after the ReLU
        requantized = lo.insert_after(node, QRequantize(qp, after), f"{leaf_name(node)}_requantize")
        records.put(requantized, after)


RELU = Op("relu", "max(q, z) at the input's scale: real 0 is the zero point", lower_relu, Output.SAME,
          modules=(nn.ReLU,), functions=(F.relu, torch.relu, torch.relu_), methods=("relu", "relu_"),
          integer_modules=(QReLU, QRequantize), homogeneous=True, channelwise=True, clamps=True,
          example=nn.ReLU)
OPS = (RELU,)
