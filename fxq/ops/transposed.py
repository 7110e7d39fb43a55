"""Transposed convolutions (a UNet's and a segmentation decoder's upsampling) as what they compute:
the input with ``s − 1`` zeros inserted between neighbours, then an ordinary convolution with the
kernel flipped and its input and output channels swapped. Inserting zeros moves integers and adds
the zero point (the integer of 0), so it runs on integers at the input's parameters; the
convolution is an int8 conv like any other, into which a following batch norm folds.

    ConvTranspose2d(x)  =  Conv2d'(insert_zeros(x, s))        padding' = d·(k − 1) − p,
                                                              output_padding added after, at the end
    W'[o, i, a, b] = W[i, o, k_h − 1 − a, k_w − 1 − b]        per group
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxq.files import schema as sc
from fxq.files.schema import Schema
from fxq.graphs import records
from fxq.graphs.canonical import torch_class
from fxq.graphs.graph import add_module_near
from fxq.graphs.twin import OnIntegers
from fxq.integers.affine import ActQParams
from fxq.ops.base import KeepInFloat, Lowering, Op, Output, hold_parameters, leaf_name, pair, qparams_of
from fxq.ops.weighted import BATCH_NORMS, TRANSPOSED_PARAMETERS, Weights, kernel_rank


def insert_zeros(x: torch.Tensor, stride: tuple[int, int], fill: int = 0) -> torch.Tensor:
    """``[N, C, H, W]`` → ``[N, C, (H − 1)·s_h + 1, (W − 1)·s_w + 1]``: ``x`` at every ``s``-th
    position, ``fill`` between (0 for values; the zero point for integers)."""
    n, c, h, w = x.shape
    spread = F.pad(x[:, :, :, None, :, None], (0, stride[1] - 1, 0, 0, 0, stride[0] - 1), value=fill)
    return spread.reshape(n, c, h * stride[0], w * stride[1])[:, :, :(h - 1) * stride[0] + 1, :(w - 1) * stride[1] + 1]


fx.wrap("insert_zeros")  # one call in fxq's traced graphs, whose entry lowers it


class QInsertZeros(nn.Module):
    """Integers → integers: `insert_zeros` filling with the zero point, the integer of 0."""

    schema = Schema({"stride": sc.ints(1, 2)}, {"scales": torch.float64, "zero_points": torch.int32},
                    ranges=lambda m: sc.parameters_fit(m, (16,)))

    def __init__(self, stride: tuple[int, int], qparams: ActQParams):
        super().__init__()
        self.stride = stride
        hold_parameters(self, qparams)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return insert_zeros(q, self.stride, int(self.zero_points[0]))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, fill={int(self.zero_points[0])}"

    def twin(self, node) -> nn.Module:
        qp = records.get(node, ActQParams)
        return OnIntegers(self.forward, [qp], qp)

    def to_onnx(self, b, node, inputs):
        """``[N, C, H, 1, W, 1]`` padded with the zero point to ``[N, C, H, s_h, W, s_w]``, merged to
        ``[N, C, H·s_h, W·s_w]``, the last ``s − 1`` rows and columns cut."""
        name, (sh, sw) = node.name, self.stride
        _, c, h, w = b.shape_of(node.args[0])
        spread = b.node("Reshape", [inputs[0], b.constant(f"{name}_spread", b.ints([-1, c, h, 1, w, 1]))],
                        f"{name}_spread")
        pads = b.constant(f"{name}_pads", b.ints([0, 0, 0, 0, 0, 0, 0, 0, 0, sh - 1, 0, sw - 1]))
        fill = b.constant(f"{name}_fill", torch.tensor(int(self.zero_points[0]), dtype=torch.uint8))
        padded = b.node("Pad", [spread, pads, fill], f"{name}_padded")
        merged = b.node("Reshape", [padded, b.constant(f"{name}_merged", b.ints([-1, c, h * sh, w * sw]))],
                        f"{name}_merged")
        bounds = [b.constant(f"{name}_{k}", b.ints(v)) for k, v in (("starts", [0, 0]), ("ends", [
            (h - 1) * sh + 1, (w - 1) * sw + 1]), ("axes", [2, 3]))]
        return b.node("Slice", [merged, *bounds], name)


def lower_insert_zeros(lo: Lowering, node: fx.Node) -> None:
    """``insert_zeros(x, s)`` → ``QInsertZeros(q)``: the same integers, the zero point between."""
    qp = qparams_of(node.args[0], node)
    records.put(node, qp)
    stride = node.args[1] if len(node.args) > 1 else node.kwargs["stride"]
    lo.become(node, QInsertZeros(tuple(stride), qp), leaf_name(node), node.args[:1])


INSERT_ZEROS = Op("insert_zeros", "a transposed conv's zeros between the integers: the zero point, same scale",
                  lower_insert_zeros, Output.SAME, functions=(insert_zeros,), integer_modules=(QInsertZeros,),
                  homogeneous=True, channelwise=True, example=lambda: lambda x: insert_zeros(x, (2, 2)))


def _geometry(layer: nn.Module) -> list[tuple[int, int]]:
    """kernel, stride, padding, dilation and output padding, each 2-d (a 1-d layer's along the height)."""
    flat = torch_class(layer) is nn.ConvTranspose1d
    return [_two(getattr(layer, a), flat, width) for a, width in (
        ("kernel_size", 1), ("stride", 1), ("padding", 0), ("dilation", 1), ("output_padding", 0))]


def _reach(layer: nn.Module) -> tuple[int, int]:
    kernel, _, padding, dilation, _ = _geometry(layer)
    return tuple(d * (k - 1) - p for k, p, d in zip(kernel, padding, dilation))


def _transposable(node: fx.Node, layer: nn.Module) -> str | None:
    if layer.padding_mode != "zeros":
        return f"padding_mode={layer.padding_mode!r} (only zero padding has an integer form)"
    if len(node.args) != 1 or node.kwargs:
        return "called with an output_size"
    if min(_reach(layer)) < 0:
        return "a padding beyond the kernel's reach crops more than the kernel adds"
    return None


def transposed_as_convolution(gm: fx.GraphModule, node: fx.Node, shape_of=None) -> bool:
    """``ConvTranspose1d/2d(x)`` → `insert_zeros` → (``F.pad`` by the output padding) → the
    ``Conv2d`` it equals (the module docstring); a 1-d one on ``unsqueeze(-1)`` as the ``k × 1``
    case, squeezed back. The conv records the user's module as its origin, so overrides and
    reports name it."""
    layer = gm.get_submodule(node.target)
    flat = torch_class(layer) is nn.ConvTranspose1d
    kernel, stride, _, dilation, extra = _geometry(layer)
    conv = _equal_conv(layer, kernel, _reach(layer), dilation, flat)
    path = add_module_near(gm, node, f"{node.target.rpartition('.')[2]}_conv", conv)
    graph = gm.graph
    with graph.inserting_before(node):
        x = graph.call_method("unsqueeze", (node.args[0], -1)) if flat else node.args[0]
        if stride != (1, 1):
            x = graph.call_function(insert_zeros, (x, stride))
        if extra != (0, 0):
            x = graph.call_function(F.pad, (x, (0, extra[1], 0, extra[0])))
        y = graph.call_module(path, (x,))
    records.put(y, records.Origin(node.target))
    with graph.inserting_after(y):
        out = graph.call_method("squeeze", (y, -1)) if flat else y
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return True


def _two(value, flat: bool, width: int) -> tuple[int, int]:
    """A 2-d geometry: a 1-d layer's along the height, ``width`` (1 or 0) along the width."""
    if flat:
        return (value if isinstance(value, int) else value[0], width)
    return pair(value)


@torch.no_grad()
def _equal_conv(layer: nn.Module, kernel: tuple, padding: tuple, dilation: tuple, flat: bool) -> nn.Conv2d:
    """The ``Conv2d`` over the zero-inserted input: each group's kernel flipped, its input and output
    channels swapped."""
    groups = layer.groups
    weight = layer.weight.detach().unsqueeze(-1) if flat else layer.weight.detach()
    c_in, per_group = weight.shape[:2]
    swapped = weight.reshape(groups, c_in // groups, per_group, *kernel).transpose(1, 2)
    flipped = swapped.reshape(groups * per_group, c_in // groups, *kernel).flip(2, 3)
    conv = nn.utils.skip_init(nn.Conv2d, c_in, groups * per_group, kernel, 1, padding, dilation, groups,
                              bias=layer.bias is not None)
    conv.weight = nn.Parameter(flipped.contiguous(), requires_grad=False)
    if layer.bias is not None:
        conv.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return conv.eval()


def _not_rewritten(lo: Lowering, node: fx.Node) -> None:
    raise KeepInFloat("it was not rewritten as zero insertion and a Conv2d")


def _transposed_weights(kind: type, function) -> Weights:
    return Weights(kind, output_axis=1, norms=BATCH_NORMS, output_rank=kernel_rank(kind) + 2, function=function,
                   parameters=TRANSPOSED_PARAMETERS)


CONV_TRANSPOSE_1D, CONV_TRANSPOSE_2D = (
    Op(f"conv_transpose{rank}d", "zero insertion (the zero point), then the int8 Conv2d it equals", _not_rewritten,
       Output.OWN, modules=(kind,), accepts=_transposable, integer_modules=(QInsertZeros,),
       absorbs_activation=True, rewrite=transposed_as_convolution, weights=_transposed_weights(kind, function),
       example=example)
    for rank, kind, function, example in (
        (1, nn.ConvTranspose1d, F.conv_transpose1d,
         lambda: nn.Sequential(nn.Flatten(2), nn.ConvTranspose1d(4, 4, 3, stride=2, padding=1, output_padding=1))),
        (2, nn.ConvTranspose2d, F.conv_transpose2d,
         lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2))))
OPS = (INSERT_ZEROS, CONV_TRANSPOSE_1D, CONV_TRANSPOSE_2D)
