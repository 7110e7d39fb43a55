"""Which graph nodes fxq understands, and what each means for quantization: patterns as data."""
from __future__ import annotations

import enum
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn


class Kind(enum.Enum):
    WEIGHTED = "conv/linear"       # new integers at a new scale: observed, requantized
    ADD = "add"                    # two quantized inputs, a new scale: observed, requantized
    ACTIVATION = "activation"      # ReLU: max(q, z) at its input's scale
    PASSTHROUGH = "passthrough"    # max-pool, flatten, view, identity...: integers pass unchanged
    AVGPOOL = "avgpool"            # integer mean at its input's scale
    SHAPE = "shape"                # returns Python ints (x.size()), no tensor to quantize


MODULES: dict[type, Kind] = {
    nn.Conv2d: Kind.WEIGHTED,
    nn.Linear: Kind.WEIGHTED,
    nn.ReLU: Kind.ACTIVATION,
    nn.Identity: Kind.PASSTHROUGH,
    nn.Dropout: Kind.PASSTHROUGH,     # the identity in eval mode
    nn.MaxPool2d: Kind.PASSTHROUGH,   # max commutes with the monotone map q ↦ s·(q − z)
    nn.Flatten: Kind.PASSTHROUGH,
    nn.AdaptiveAvgPool2d: Kind.AVGPOOL,
    nn.AvgPool2d: Kind.AVGPOOL,
}
FUNCTIONS: dict[object, Kind] = {
    operator.add: Kind.ADD,           # a + b, and `a += b` once traced
    operator.iadd: Kind.ADD,
    torch.add: Kind.ADD,
    F.relu: Kind.ACTIVATION,
    torch.relu: Kind.ACTIVATION,
    torch.flatten: Kind.PASSTHROUGH,
    F.adaptive_avg_pool2d: Kind.AVGPOOL,
}
METHODS: dict[str, Kind] = {
    "add": Kind.ADD,
    "relu": Kind.ACTIVATION,
    "flatten": Kind.PASSTHROUGH,
    "view": Kind.PASSTHROUGH,
    "reshape": Kind.PASSTHROUGH,
    "contiguous": Kind.PASSTHROUGH,
    "size": Kind.SHAPE,
}


def kind_of(node: fx.Node, modules: dict[str, nn.Module]) -> Kind | None:
    """The node's kind, or None for an op fxq cannot run on integers."""
    if node.op == "call_module":
        return MODULES.get(type(modules[node.target]))
    if node.op == "call_function":
        kind = FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        kind = METHODS.get(node.target)
    else:
        return None
    if kind is Kind.ADD and not _adds_two_tensors(node):
        return None  # x + 1.0 has no quantized form here
    return kind


def _adds_two_tensors(node: fx.Node) -> bool:
    return (len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args)
            and node.kwargs.get("alpha", 1) == 1)


def supported() -> str:
    """A one-line list of what fxq quantizes, for error messages."""
    names = [t.__name__ for t in MODULES] + sorted({getattr(f, "__name__", str(f)) for f in FUNCTIONS})
    return ", ".join(names + [f".{m}()" for m in METHODS])
