"""1-d and 3-d convolutions as the int8 ``Conv2d`` they equal, once batch norms have folded into
them (`passes.rewrite_layers`):

    Conv1d(x)   =  squeeze(Conv2d_{k×1}(unsqueeze(x, -1)), -1)
    Conv3d(x)   =  the Conv2d over the other two axes, run on every window along one axis: the
                   input padded along that axis, its k windows (stride s, dilation d) cut and laid
                   beside the channels (``[N·D_out, C·k, H, W]``: channel ``c·k + i`` is tap i of
                   channel c, as the weight ``[C_out, C_in/g · k, k_h, k_w]`` reads them), then the
                   output's windows moved back to their axis. An axis the kernel spans by 1
                   (LambdaNet's ``(r, r, 1)``) takes no windows: the input itself.

Padding and cutting move integers (the padding is the zero point), so every step runs on integers;
the convolution is an int8 conv like any other.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxq.graphs import records
from fxq.graphs.graph import add_module_near
from fxq.ops.base import KeepInFloat, Lowering, Op, Output
from fxq.ops.layers import QConv2d
from fxq.ops.weighted import BATCH_NORMS, CONV_PARAMETERS, Weights, holding


def _zero_padding(node: fx.Node, conv: nn.Module) -> str | None:
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only zero padding has an integer form)"
    if len(node.args) != 1 or node.kwargs:
        return "called with more than its input"
    if isinstance(conv.padding, str) and conv.padding == "same" and any(
            d * (k - 1) % 2 for d, k in zip(conv.dilation, conv.kernel_size)):
        return "padding='same' with an even kernel pads one side more: no integer form"
    return None


def _padding(conv: nn.Module) -> tuple[int, ...]:
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    if conv.padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
    return tuple(conv.padding)


def _replace(gm: fx.GraphModule, node: fx.Node, conv: nn.Conv2d, suffix: str,
             before: Callable[[fx.Graph, fx.Node], fx.Node], after: Callable[[fx.Graph, fx.Node], fx.Node]) -> None:
    """``node`` becomes ``after(conv(before(input)))``; the conv records the user's module as its
    origin, so overrides and reports name it."""
    path = add_module_near(gm, node, f"{node.target.rpartition('.')[2]}_{suffix}", conv)
    graph = gm.graph
    with graph.inserting_before(node):
        y = graph.call_module(path, (before(graph, node.args[0]),))
        records.put(y, records.Origin(node.target))
        out = after(graph, y)
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def conv1d_as_conv2d(gm: fx.GraphModule, node: fx.Node, shape_of: Callable) -> bool:
    """``Conv1d(x)`` (ECA's channel attention) → ``unsqueeze(-1)`` → the ``k×1`` ``Conv2d`` → ``squeeze(-1)``."""
    conv = gm.get_submodule(node.target)
    square = nn.utils.skip_init(nn.Conv2d, conv.in_channels, conv.out_channels, (conv.kernel_size[0], 1),
                                (conv.stride[0], 1), (_padding(conv)[0], 0), (conv.dilation[0], 1), conv.groups,
                                bias=conv.bias is not None)
    holding(square, conv.weight.detach().unsqueeze(-1), None if conv.bias is None else conv.bias.detach())
    _replace(gm, node, square, "2d", lambda graph, x: graph.call_method("unsqueeze", (x, -1)),
             lambda graph, y: graph.call_method("squeeze", (y, -1)))
    return True


def conv3d_as_conv2d(gm: fx.GraphModule, node: fx.Node, shape_of: Callable) -> bool:
    """``Conv3d(x)`` → windows along one axis beside the channels → ``Conv2d`` → moved back (the
    module docstring). The input's sizes come from calibration (``shape_of``); unknown, the call
    is left as it is."""
    conv, shape = gm.get_submodule(node.target), shape_of(node.args[0])
    if shape is None or len(shape) != 5:
        return False
    padding = _padding(conv)
    flat = [a for a in range(3) if conv.kernel_size[a] == 1 and conv.stride[a] == 1 and padding[a] == 0]
    axis = flat[0] if flat else 0
    keep = [a for a in range(3) if a != axis]
    k, s, p, d = conv.kernel_size[axis], conv.stride[axis], padding[axis], conv.dilation[axis]
    depth = (shape[2 + axis] + 2 * p - d * (k - 1) - 1) // s + 1
    weight = conv.weight.detach().movedim(2 + axis, 2)
    square = nn.utils.skip_init(nn.Conv2d, conv.in_channels * k, conv.out_channels,
                                *[tuple(getattr(conv, f)[a] for a in keep) for f in ("kernel_size", "stride")],
                                tuple(padding[a] for a in keep), tuple(conv.dilation[a] for a in keep),
                                conv.groups, bias=conv.bias is not None)
    holding(square, weight.reshape(weight.shape[0], -1, *weight.shape[3:]),
            None if conv.bias is None else conv.bias.detach())
    sizes = [shape[2 + a] for a in keep]
    out_sizes = [(sizes[i] + 2 * padding[a] - conv.dilation[a] * (conv.kernel_size[a] - 1) - 1)
                 // conv.stride[a] + 1 for i, a in enumerate(keep)]

    def windows(graph: fx.Graph, x: fx.Node) -> fx.Node:
        if p:
            pads = [0, 0] * (2 - axis) + [p, p]  # F.pad lists the last axis first
            x = graph.call_function(F.pad, (x, tuple(pads)))
        if k == 1 and s == 1:
            laid = graph.call_method("permute", (x, 0, 2 + axis, 1, *[2 + a for a in keep]))
            return graph.call_method("reshape", (laid, -1, shape[1], *sizes))
        cut = [slice(None)] * (2 + axis)
        taps = [graph.call_function(operator.getitem, (x, (*cut, slice(i * d, i * d + s * (depth - 1) + 1, s))))
                for i in range(k)]
        stacked = graph.call_function(torch.cat, ([graph.call_method("unsqueeze", (t, 2)) for t in taps], 2))
        laid = graph.call_method("permute", (stacked, 0, 3 + axis, 1, 2, *[3 + a for a in keep]))
        return graph.call_method("reshape", (laid, -1, shape[1] * k, *sizes))

    def back(graph: fx.Graph, y: fx.Node) -> fx.Node:
        unfolded = graph.call_method("reshape", (y, -1, depth, conv.out_channels, *out_sizes))
        order = [0, 2 + axis, 1] + [2 + a for a in keep]
        return graph.call_method("permute", (unfolded, *[order.index(i) for i in range(5)]))

    _replace(gm, node, square, "2d", windows, back)
    return True


def _not_rewritten(lo: Lowering, node: fx.Node) -> None:
    raise KeepInFloat("its input's sizes were never seen during calibration, so it was not rewritten as a Conv2d")


CONV1D = Op("conv1d", "the k×1 int8 Conv2d it equals", _not_rewritten, Output.OWN, modules=(nn.Conv1d,),
            accepts=lambda node, conv: _zero_padding(node, conv), integer_modules=(QConv2d,),
            absorbs_activation=True, rewrite=conv1d_as_conv2d,
            weights=Weights(nn.Conv1d, norms=BATCH_NORMS, output_rank=3, function=F.conv1d,
                            parameters=CONV_PARAMETERS),
            example=lambda: nn.Sequential(nn.Flatten(2), nn.Conv1d(4, 4, 3, padding=1)))
CONV3D = Op("conv3d", "windows along one axis beside the channels, then an int8 Conv2d", _not_rewritten,
            Output.OWN, modules=(nn.Conv3d,), accepts=lambda node, conv: _zero_padding(node, conv),
            integer_modules=(QConv2d,), absorbs_activation=True, rewrite=conv3d_as_conv2d,
            weights=Weights(nn.Conv3d, norms=BATCH_NORMS, output_rank=5, function=F.conv3d,
                            parameters=CONV_PARAMETERS),
            example=lambda: nn.Sequential(nn.Unflatten(2, (2, 4)), nn.Conv3d(4, 4, 3, padding=1), nn.Flatten(2, 3)))
OPS = (CONV1D, CONV3D)
