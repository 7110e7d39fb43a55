"""Ops that move integers without changing them: they keep their input's parameters."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.ops import stochastic_depth

from fxq.files import schema as sc
from fxq.files.schema import Schema
from fxq.graphs import records
from fxq.graphs.graph import add_module_near, attribute
from fxq.graphs.twin import OnIntegers
from fxq.integers import intmath
from fxq.integers.affine import ActQParams
from fxq.ops.base import Lowering, Op, Output, hold_parameters, qparams_of


def lower_identity(lo: Lowering, node: fx.Node) -> None:
    """``dropout(x)`` / ``identity(x)`` (eval mode) → removed."""
    qparams_of(node.args[0], node)
    lo.remove(node, node.args[0])


def lower_same(lo: Lowering, node: fx.Node) -> None:
    """``flatten(x)``, ``x.permute(...)``, ``x.chunk(2)``, ``x[i]`` → the same call on the integers,
    at the same parameters (a tuple's items share them). Two rewrites: an ``nn.Flatten`` becomes
    the ``torch.flatten`` call it stands for, and ``view`` becomes ``reshape``: an integer conv
    returns a channels-last view, which ``view`` cannot always reshape and ``reshape`` copies.
    A parameter of the model moved so (a class token expanded over the batch) is quantized once,
    as a `QConstant`."""
    if _is_constant(lo, node.args[0]):
        _quantize_constant(lo, node)
    records.put(node, qparams_of(node.args[0], node))
    module = lo.module(node)
    if isinstance(module, nn.Flatten):
        node.op, node.target = "call_function", torch.flatten
        node.args, node.kwargs = (node.args[0], module.start_dim, module.end_dim), {}
    elif node.op == "call_method" and node.target == "view":
        node.target = "reshape"


class QConstant(nn.Module):
    """A tensor of the model (a class token) as integers, ``q = clamp(z + round(v / s))``: what the
    integer graph moves (expands over the batch) and joins like any activation."""

    schema = Schema({"output_bits": sc.act_bits}, {"values": torch.int32, "scales": torch.float64,
                                                   "zero_points": torch.int32},
                    ranges=lambda m: m.check_ranges())

    def __init__(self, values: torch.Tensor, qparams: ActQParams):
        super().__init__()
        self.output_bits = qparams.bits
        self.register_buffer("values", qparams.quantize(values.detach().to(torch.float32)).to(torch.int32))
        hold_parameters(self, qparams)

    def forward(self) -> torch.Tensor:
        return self.values.to(intmath.storage_dtype(self.output_bits))

    def check_ranges(self) -> None:
        sc.parameters_fit(self, (self.output_bits,))
        sc.expect(bool((self.values >= 0).all() and (self.values < (1 << self.output_bits)).all()),
                  f"the values are outside {self.output_bits} bits")

    def twin(self, node) -> nn.Module:
        return OnIntegers(self.forward, [], records.get(node, ActQParams))

    def to_onnx(self, b, node, inputs):
        return b.constant(node.name, self.forward())

    def extra_repr(self) -> str:
        return f"{tuple(self.values.shape)}, bits={self.output_bits}"


def _is_constant(lo: Lowering, value) -> bool:
    return isinstance(value, fx.Node) and value.op == "get_attr" and not records.has(value, ActQParams) \
        and isinstance(attribute(lo.gm, value.target), torch.Tensor) \
        and attribute(lo.gm, value.target).is_floating_point()


def _quantize_constant(lo: Lowering, node: fx.Node) -> None:
    """``node``'s constant input becomes a `QConstant`: at the parameters of the concatenation it
    is moved into (its observer saw these very values), else at its own range."""
    constant = node.args[0]
    value = attribute(lo.gm, constant.target).detach()
    qparams = _joined_parameters(lo, node) or ActQParams.from_range(
        value.min(), value.max(), lo.ctx.config.act_bits)
    with lo.gm.graph.inserting_before(node):
        made = lo.gm.graph.call_module(add_module_near(lo.gm, node, f"{constant.name}_q", QConstant(value, qparams)))
    records.put(made, qparams)
    node.args = (made, *node.args[1:])
    if not constant.users:
        lo.gm.graph.erase_node(constant)


def _joined_parameters(lo: Lowering, node: fx.Node) -> ActQParams | None:
    """The parameters of the concatenation ``node``'s values reach through moves alone, if any."""
    from fxq.ops import classify  # the registry holds this module's entries
    while len(node.users) == 1:
        (node,) = node.users
        op, _ = classify(node, lo.modules, lo.ctx)
        if op.concatenates:
            return records.get(node, ActQParams)
        if op.output is not Output.SAME:
            return None
    return None


def lower_item(lo: Lowering, node: fx.Node) -> None:
    """``x[i]``: an item or slice of integers keeps their parameters; of sizes, it is a size."""
    if records.has(node.args[0], ActQParams):
        records.put(node, records.get(node.args[0], ActQParams))


SHAPE_ATTRIBUTES = frozenset({"shape", "dtype", "ndim"})  # what getattr(x, name) may read


def _reads_a_shape(node: fx.Node, module: nn.Module | None) -> str | None:
    if node.target is not getattr or (len(node.args) == 2 and node.args[1] in SHAPE_ATTRIBUTES):
        return None
    return f"reads the attribute {node.args[1:]!r}"


def lower_nothing(lo: Lowering, node: fx.Node) -> None:
    """``x.size()`` returns Python ints: nothing to quantize."""


def _not_training(node: fx.Node, module: nn.Module | None) -> str | None:
    """Dropout and stochastic depth are identities unless called with training=True."""
    if module is not None:
        return None
    position = 3 if node.target is stochastic_depth else 2
    training = node.args[position] if len(node.args) > position else node.kwargs.get("training", True)
    return "dropout in training mode" if training is not False else None


def export_reshape(b, node: fx.Node, inputs: list, module) -> object:
    """Reshapes as ONNX Reshape to the shape they produced (the first dim, where the batch is,
    as -1: other dims must not depend on the batch size), permutes and
    transposes as Transpose, chunks and splits as Split (sizes as they came out), flips as Slice,
    expands as Expand, repeats as Tile, unbinds as Split and Squeeze; pixel (un)shuffles and
    channel shuffles as Reshape → Transpose → Reshape."""
    target, x, name = _SHUFFLES.get(type(module)) or _SHUFFLES.get(node.target, node.target), inputs[0], node.name
    in_shape, out_shape = b.shape_of(node.args[0]), b.shape_of(node)
    if target in ("contiguous", "clone", "detach"):
        return x
    if target in ("pixel_shuffle", "pixel_unshuffle"):
        return _pixel_moves(b, name, x, in_shape, out_shape, target == "pixel_shuffle")
    if target == "channel_shuffle":
        groups = module.groups if module is not None else _dim_argument(node, 1, "groups", None)
        return export_channel_shuffle(b, name, x, groups)
    if target in (torch.chunk, torch.split, "chunk", "split"):
        axis = _dim_argument(node, 2, "dim", 0) % len(in_shape)
        sizes = b.ints([shape[axis] for shape in out_shape])
        return list(b.node("Split", [x, b.constant(f"{name}_sizes", sizes)], name, outputs=len(sizes), axis=axis))
    if target in (torch.unbind, "unbind"):
        axis = _dim_argument(node, 1, "dim", 0) % len(in_shape)
        parts = b.node("Split", [x, b.constant(f"{name}_sizes", b.ints([1] * in_shape[axis]))], name,
                       outputs=in_shape[axis], axis=axis)
        return [b.node("Squeeze", [part, b.constant(f"{name}_axis", b.ints([axis]))], f"{name}_item")
                for part in parts]
    if target in (torch.permute, "permute"):
        dims = node.args[1:] if target == "permute" and not isinstance(node.args[1], (tuple, list)) else node.args[1]
        return b.node("Transpose", [x], name, perm=[d % len(in_shape) for d in dims])
    if target in (torch.transpose, "transpose", "t"):
        first, second = (0, 1) if target == "t" else (node.args[1] % len(in_shape), node.args[2] % len(in_shape))
        perm = list(range(len(in_shape)))
        perm[first], perm[second] = perm[second], perm[first]
        return b.node("Transpose", [x], name, perm=perm)
    if target in (torch.flip, "flip"):  # a Slice that runs backwards over each flipped axis
        dims = node.args[1:] if target == "flip" and not isinstance(node.args[1], (tuple, list)) else node.args[1]
        axes = b.ints([d % len(in_shape) for d in dims])
        starts, ends, steps = b.ints([-1] * len(axes)), b.ints([-2**63] * len(axes)), b.ints([-1] * len(axes))
        return b.node("Slice", [x, b.constant(f"{name}_starts", starts), b.constant(f"{name}_ends", ends),
                                b.constant(f"{name}_axes", axes), b.constant(f"{name}_steps", steps)], name)
    if target in (torch.roll, "roll"):
        return _roll(b, node, x, in_shape)
    if target == "expand_as":
        return b.node("Expand", [x, b.node("Shape", [inputs[1]], f"{name}_shape")], name)
    if target == "expand" and in_shape[0] == out_shape[0]:  # broadcasting keeps the input's batch
        return b.node("Expand", [x, b.constant(f"{name}_shape", b.ints([1, *out_shape[1:]]))], name)
    if target == "expand" and in_shape[0] == 1 and 0 in b.batched_dims(node):  # a class token over the batch
        shape = b.node("Concat", [b.batch(name), b.constant(f"{name}_rest", b.ints(list(out_shape[1:])))],
                       f"{name}_shape", axis=0)
        return b.node("Expand", [x, shape], name)
    if target == "repeat" and all(isinstance(r, int) for r in _sizes(node)):
        return b.node("Tile", [x, b.constant(f"{name}_repeats", b.ints(list(_sizes(node))))], name)
    if target in (torch.unsqueeze, "unsqueeze", torch.squeeze, "squeeze") and _dim_argument(node, 1, "dim", None) \
            is not None:  # by axis, wherever the batch is (RT-DETR's reference points)
        dim = _dim_argument(node, 1, "dim", None)
        unsqueeze = target in (torch.unsqueeze, "unsqueeze")
        axis = dim % (len(in_shape) + unsqueeze)
        if not unsqueeze and in_shape[axis] != 1:  # torch leaves a dim of another size as it is
            return x
        return b.node("Unsqueeze" if unsqueeze else "Squeeze", [x, b.constant(f"{name}_axis", b.ints([axis]))], name)
    if target in _RESHAPES and (out_shape[:1] == in_shape[:1] or set(b.batched_dims(node)) <= {0}):
        shape = b.ints([-1, *out_shape[1:]])
        return b.node("Reshape", [x, b.constant(f"{name}_shape", shape)], name)
    raise ValueError(f"node '{name}' ({target if isinstance(target, str) else target.__name__}) does not export yet")


_RESHAPES = frozenset({torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten, "flatten", "view",
                       "reshape", "squeeze", "unsqueeze", "unflatten", "reshape_as", "view_as"})
# module types and functions that move integers between channels and pixels, by what they do
_SHUFFLES = {nn.PixelShuffle: "pixel_shuffle", nn.PixelUnshuffle: "pixel_unshuffle",
             nn.ChannelShuffle: "channel_shuffle", nn.Unflatten: "unflatten", F.pixel_shuffle: "pixel_shuffle",
             F.pixel_unshuffle: "pixel_unshuffle", F.channel_shuffle: "channel_shuffle"}


def _roll(b, node: fx.Node, x: str, shape: tuple) -> str:
    """``torch.roll(x, shifts, dims)`` (Swin's shifted windows): per dim, the last ``s`` items
    (of that dim's fixed size) then the rest, as ONNX Slice and Concat."""
    shifts, dims = _dim_argument(node, 1, "shifts", None), _dim_argument(node, 2, "dims", None)
    shifts, dims = (shifts, dims) if isinstance(shifts, (tuple, list)) else ((shifts,), (dims,))
    if dims[0] is None:
        raise ValueError(f"node '{node.name}': a roll of the flattened tensor does not export; give dims")
    for at, (shift, dim) in enumerate(zip(shifts, dims)):
        dim, size = dim % len(shape), shape[dim % len(shape)]
        cut = shift % size
        if cut == 0:
            continue
        axis = b.constant(f"{node.name}_axis{at}", b.ints([dim]))

        def part(start: int, end: int) -> str:
            return b.node("Slice", [x, b.constant(f"{node.name}_s", b.ints([start])),
                                    b.constant(f"{node.name}_e", b.ints([end])), axis], f"{node.name}_part")
        x = b.node("Concat", [part(size - cut, size), part(0, size - cut)], f"{node.name}_{at}", axis=dim)
    return b.node("Identity", [x], node.name)


def _pixel_moves(b, name: str, x: str, in_shape: tuple, out_shape: tuple, to_pixels: bool) -> str:
    """Pixel shuffle ``[N, C·r², H, W]`` → ``[N, C, r, r, H, W]`` → ``[N, C, H, r, W, r]`` →
    ``[N, C, H·r, W·r]``; pixel unshuffle the way back (torch's channel order, not ONNX's
    SpaceToDepth's)."""
    if to_pixels:
        (_, c, h, w), r = out_shape, out_shape[2] // in_shape[2]
        split, perm = [-1, c, r, r, h // r, w // r], [0, 1, 4, 2, 5, 3]
    else:
        (_, c, h, w), r = in_shape, in_shape[2] // out_shape[2]
        split, perm = [-1, c, h // r, r, w // r, r], [0, 1, 3, 5, 2, 4]
    parts = b.node("Reshape", [x, b.constant(f"{name}_split", b.ints(split))], f"{name}_split")
    moved = b.node("Transpose", [parts], f"{name}_moved", perm=perm)
    return b.node("Reshape", [moved, b.constant(f"{name}_shape", b.ints([-1, *out_shape[1:]]))], name)


def export_channel_shuffle(b, name: str, x: str, groups: int) -> str:
    """``[N, g·c, H, W]`` → ``[N, g, c, H, W]`` → ``[N, c, g, H, W]`` → ``[N, c·g, H, W]``: the
    same moves on integers or on floats."""
    shape = b.node("Shape", [x], f"{name}_shape")

    def dims(start: int, end: int) -> str:
        return b.node("Slice", [shape, b.constant(f"{name}_{start}", b.ints([start])),
                                b.constant(f"{name}_{end}", b.ints([end]))], f"{name}_dims")
    pieces = b.node("Concat", [dims(0, 1), b.constant(f"{name}_groups", b.ints([groups, -1])), dims(2, 4)],
                    f"{name}_pieces", axis=0)
    grouped = b.node("Reshape", [x, pieces], f"{name}_grouped")
    swapped = b.node("Transpose", [grouped], f"{name}_swapped", perm=[0, 2, 1, 3, 4])
    return b.node("Reshape", [swapped, shape], name)


def _sizes(node: fx.Node) -> tuple:
    """The sizes of ``x.repeat(*sizes)`` / ``x.repeat(sizes)``."""
    return tuple(node.args[1]) if isinstance(node.args[1], (tuple, list)) else tuple(node.args[1:])


def _dim_argument(node: fx.Node, index: int, keyword: str, default: int) -> int:
    return node.args[index] if len(node.args) > index else node.kwargs.get(keyword, default)


def export_item(b, node: fx.Node, inputs: list, module) -> object:
    """An item of a split (a name), or an item or slice of a tensor (``x[:, 0]``, ``x[..., :-1]``,
    ``x[:, None]``) as ONNX Slice, Squeeze of the dims an integer takes, Unsqueeze where None adds one."""
    source, index = inputs[0], node.args[1]
    if source is None:  # an item of a size
        return None
    if isinstance(source, list):
        return source[index]
    index = index if isinstance(index, tuple) else (index,)
    if _leading_tensors(b, index):
        return _gather_by_tensors(b, node, source, index)
    index = fx.map_arg(index, b.size)  # slice(None, n): n a size
    index = _full_index(tuple(index), len(b.shape_of(node.args[0])), node)
    gathered = [(at, i) for at, i in enumerate(index) if isinstance(i, list)]
    index = tuple(slice(None) if isinstance(i, list) else i for i in index)
    indexing = [i for i in index if i is not None]
    starts, ends, steps = zip(*map(_slice_bounds, indexing)) if indexing else ((), (), ())
    bounds = (("starts", starts), ("ends", ends), ("axes", range(len(indexing))), ("steps", steps))
    value = b.node("Slice", [source] + [b.constant(f"{node.name}_{k}", b.ints(list(v))) for k, v in bounds],
                   f"{node.name}_slice") if indexing else source
    taken = [axis for axis, i in enumerate(indexing) if isinstance(i, int)]
    if taken:
        value = b.node("Squeeze", [value, b.constant(f"{node.name}_taken", b.ints(taken))], f"{node.name}_squeeze")
    kept = [i for i in index if not isinstance(i, int)]  # the output's leading dims, in order
    added = [axis for axis, i in enumerate(kept) if i is None]
    if added:
        value = b.node("Unsqueeze", [value, b.constant(f"{node.name}_added", b.ints(added))], f"{node.name}_new")
    for at, chosen in gathered:  # one list of positions: its dim stays where it is, as torch keeps it
        axis = sum(not isinstance(i, int) for i in index[:at])
        value = b.node("Gather", [value, b.constant(f"{node.name}_positions", b.ints(chosen))], f"{node.name}_gather",
                       axis=axis)
    return b.node("Identity", [value], node.name)


def _leading_tensors(b, index: tuple) -> int:
    """How many index tensors lead the index (``x[batch, top]``), with whole slices after them."""
    count = 0
    for i in index:
        if not (isinstance(i, fx.Node) and isinstance(b.values.get(i), str)):
            break
        count += 1
    rest_whole = all(isinstance(i, slice) and i == slice(None) for i in index[count:])
    one_shape = len({tuple(b.shape_of(i)) for i in index[:count]}) == 1  # GatherND does not broadcast
    return count if count and rest_whole and one_shape else 0


def _gather_by_tensors(b, node: fx.Node, source: str, index: tuple) -> str:
    """``x[i, j]`` with index tensors of one shape (RT-DETR's top-k queries by batch and position):
    ONNX GatherND on the indices stacked along a last axis."""
    name, count = node.name, _leading_tensors(b, index)
    columns = [b.node("Unsqueeze", [b.as_index(b.values[i], f"{name}_{k}"), b.constant(f"{name}_last", b.ints([-1]))],
                      f"{name}_column") for k, i in enumerate(index[:count])]
    stacked = b.node("Concat", columns, f"{name}_indices", axis=-1)
    return b.node("GatherND", [source, stacked], name)


def _slice_bounds(i: int | slice) -> tuple[int, int, int]:
    """ONNX Slice's (start, end, step) of one dim's index; an integer is the slice of its item."""
    end_of_dim = torch.iinfo(torch.int64).max
    if isinstance(i, int):
        return i, end_of_dim if i == -1 else i + 1, 1
    return i.start or 0, end_of_dim if i.stop is None else i.stop, i.step or 1


def _full_index(index: tuple, rank: int, node: fx.Node) -> tuple:
    """``index`` with its Ellipsis spelled out as whole slices; integers, slices, None and at most
    one list of integers (a gather along that dim: timm's zigzag order of DCT coefficients)."""
    def plain(i) -> bool:
        return i is None or _integer(i) or (isinstance(i, slice) and all(
            v is None or isinstance(v, int) for v in (i.start, i.stop, i.step)))

    def positions(i) -> bool:
        return isinstance(i, list) and len(i) > 0 and all(map(_integer, i))

    indexing = sum(i is not None and i is not Ellipsis for i in index)
    if index.count(Ellipsis) == 1:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (rank - indexing) + index[at + 1:]
    lists = sum(map(positions, index))
    if not all(plain(i) or positions(i) for i in index) or lists > 1 or indexing > rank:
        raise ValueError(f"node '{node.name}': only integers, slices, None, one Ellipsis and one list of "
                         f"integers index a tensor in export, got {index!r}")
    return index


def _integer(i) -> bool:
    return isinstance(i, int) and not isinstance(i, bool)


def export_size(b, node: fx.Node, inputs: list, module) -> None:
    """Sizes are not values of the ONNX graph: the reshapes read the shapes they produced."""
    return None


def _to_float32(node: fx.Node, module: nn.Module | None) -> str | None:
    """``x.float()``, ``x.to(torch.float32)``: the values fxq quantizes are float32 already."""
    arguments = list(node.args[1:]) + list(node.kwargs.values())
    if node.target == "float" and not arguments:
        return None
    if node.target == "to" and arguments == [torch.float32] and set(node.kwargs) <= {"dtype"}:
        return None
    return "a cast to another dtype or device"


IDENTITY = Op("identity", "removed: the identity in eval mode", lower_identity, Output.SAME,
              modules=(nn.Identity, nn.Dropout, nn.Dropout2d), functions=(F.dropout, stochastic_depth),
              accepts=_not_training, homogeneous=True, channelwise=True, example=nn.Identity)
RESHAPE = Op("reshape", "the same integers in another shape or order", lower_same, Output.SAME,
             modules=(nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle),
             functions=(torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
                        torch.unsqueeze, torch.chunk, torch.split, torch.unbind, torch.narrow, torch.flip,
                        torch.roll, torch.unflatten, F.pixel_shuffle, F.pixel_unshuffle, F.channel_shuffle),
             methods=("flatten", "view", "reshape", "contiguous", "permute", "transpose", "squeeze",
                      "unsqueeze", "chunk", "split", "unbind", "narrow", "flip", "roll", "expand",
                      "expand_as", "repeat", "t", "unflatten", "reshape_as", "view_as", "clone", "detach"),
             keeps_call=True, homogeneous=True, integer_modules=(QConstant,), example=lambda: nn.Flatten(),
             export=export_reshape)
ITEM = Op("getitem", "an item or slice of integers, same parameters", lower_item, Output.SAME,
          functions=(operator.getitem,), keeps_call=True, homogeneous=True, example=lambda: lambda x: x[:, :2],
          export=export_item)
SIZE = Op("size", "a shape, not a tensor", lower_nothing, Output.NONE, methods=("size", "dim", "numel"),
          functions=(getattr,), accepts=_reads_a_shape, keeps_call=True,
          example=lambda: lambda x: x.size(), export=export_size)
CAST = Op("cast", "removed: a cast of float32 values to float32", lower_identity, Output.SAME,
          methods=("float", "to"), accepts=_to_float32, homogeneous=True, channelwise=True,
          example=lambda: lambda x: x.float().to(torch.float32))
OPS = (IDENTITY, CAST, RESHAPE, ITEM, SIZE)
