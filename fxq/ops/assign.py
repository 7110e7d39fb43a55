"""Slice assignment (``y[:, 2::3] = y[:, 2::3].sigmoid()``, Ultralytics' keypoint decoding) as a
value of its own: the tracer records ``operator.setitem``, `functional_assignments` turns each into
``y' = assign(y, index, v)`` read by everything after it, and on integers both operands are moved
to the result's parameters (one 2^b-entry table each, as a concatenation moves its inputs) and
the moved values of ``v`` put at ``index``. Exported as one Gather of the two, flattened and
joined, by a fixed map of positions (the batch stays free)."""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from fxq.files import schema as sc
from fxq.files.schema import Schema
from fxq.graphs import records
from fxq.graphs.twin import OnIntegers
from fxq.integers import intmath
from fxq.integers.affine import ActQParams
from fxq.ops.base import KeepInFloat, Lowering, Op, Output, leaf_name, qparams_of
from fxq.ops.joins import QCat

# the calls whose result may alias another tensor's memory: an assignment into one is not its own value
_VIEWS = frozenset({"view", "reshape", "permute", "transpose", "expand", "unsqueeze", "squeeze", "flatten",
                    "narrow", "t", "view_as", "reshape_as", "unflatten", "contiguous", operator.getitem,
                    torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.flatten})


def assign(y: torch.Tensor, index, v: torch.Tensor) -> torch.Tensor:
    """``y`` with ``v`` at ``index``, as a new tensor (``y`` is left as it is)."""
    out = y.clone()
    out[index] = v
    return out


fx.wrap("assign")  # one call in fxq's traced graphs, whose entry lowers it


def functional_assignments(gm: fx.GraphModule) -> int:
    """Rewrite each ``operator.setitem(y, index, v)`` (an in-place slice assignment the tracer
    recorded) as ``y' = assign(y, index, v)``, every later reader of ``y`` reading ``y'``. An
    assignment into a view (whose base would change too) is left as it is. Returns how many."""
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not operator.setitem or node.kwargs:
            continue
        y, index, value = node.args
        if not isinstance(y, fx.Node) or y.op == "placeholder" or y.target in _VIEWS:
            continue
        order = {n: at for at, n in enumerate(gm.graph.nodes)}  # graph order is execution order
        later = [u for u in y.users if order[u] > order[node]]
        with gm.graph.inserting_before(node):
            result = gm.graph.call_function(assign, (y, index, value))
        for user in later:
            user.replace_input_with(y, result)
        gm.graph.erase_node(node)
        done += 1
    return done


def _after(node: fx.Node, anchor: fx.Node) -> bool:
    for following in anchor.graph.nodes:  # graph order is execution order
        if following is anchor:
            return False
        if following is node:
            return True
    return False


class QAssign(QCat):
    """``y`` and ``v`` moved to the result's parameters (``clamp(z_O + round(s_i/s_O·(q − z_i)))``,
    tables; none for an operand already at them), then ``v``'s integers put at ``index`` (the
    index is the graph call's argument)."""

    schema = Schema({"input_bits": sc.bits_tuple, "output_bits": sc.act_bits},
                    {"zero_points": torch.int32, "multipliers": torch.int64, "shifts": torch.int64},
                    ranges=lambda m: m.check_ranges())

    def __init__(self, y: ActQParams, v: ActQParams, out: ActQParams):
        super().__init__([y, v], out, 0)

    def compute(self, y: torch.Tensor, v: torch.Tensor, index) -> torch.Tensor:
        return assign(self.moved(0, y), index, self.moved(1, v))

    def forward(self, y: torch.Tensor, v: torch.Tensor, index) -> torch.Tensor:
        dtype = torch.uint8 if self.output_bits <= 8 else torch.int32
        moved = [q.to(dtype) if same else intmath.lookup(table, q)
                 for q, table, same in zip((y, v), self.tables, self.identity)]
        return assign(moved[0], index, moved[1])

    def twin(self, node) -> nn.Module:
        inputs = [records.get(a, ActQParams) for a in node.args[:2]]
        return OnIntegers(lambda y, v, index: self.compute(y, v, index), inputs, records.get(node, ActQParams))

    def to_onnx(self, b, node, inputs):
        """Both operands moved, flattened past the batch and joined, then gathered by the map of
        where each output integer comes from (its own place in ``y``, or its place in ``v``)."""
        y_shape, v_shape = b.shape_of(node.args[0]), b.shape_of(node.args[1])
        index = node.args[2] if isinstance(node.args[2], tuple) else (node.args[2],)
        if not index or index[0] != slice(None):
            raise ValueError(f"node '{node.name}': only an assignment that keeps the batch whole exports")
        sources = torch.arange(_count(y_shape)).reshape(1, *y_shape[1:])
        sources[index] = (_count(y_shape) + torch.arange(_count(v_shape))).reshape(1, *v_shape[1:])
        moved = [q if same else b.gather(table, b.as_index(q, f"{node.name}_{i}"), f"{node.name}_{i}")
                 for i, (q, table, same) in enumerate(zip(inputs[:2], self.tables, self.identity))]
        flat = [b.node("Reshape", [q, b.constant(f"{node.name}_flat{i}", b.ints([0, -1]))], f"{node.name}_flat")
                for i, q in enumerate(moved)]
        joined = b.node("Concat", flat, f"{node.name}_joined", axis=1)
        picked = b.node("Gather", [joined, b.constant(f"{node.name}_map", sources.flatten())], f"{node.name}_picked",
                        axis=1)
        return b.node("Reshape", [picked, b.constant(f"{node.name}_shape", b.ints([-1, *y_shape[1:]]))], node.name)


def _count(shape: tuple) -> int:
    """Integers per sample."""
    count = 1
    for size in shape[1:]:
        count *= size
    return count


def lower_assign(lo: Lowering, node: fx.Node) -> None:
    """``assign(y, index, v)`` → ``QAssign(y_q, v_q, index)`` at the result's own parameters."""
    y, index, value = node.args
    out = records.get(node, ActQParams)
    if out is None:
        raise KeepInFloat("its output was never a float tensor during calibration")
    lo.become(node, QAssign(qparams_of(y, node), qparams_of(value, node), out), leaf_name(node), (y, value, index))


ASSIGN = Op("assign", "a slice assignment: both operands moved to the result's parameters, then joined in place",
            lower_assign, Output.OWN, functions=(assign,), integer_modules=(QAssign,),
            example=lambda: lambda x: assign(x, (slice(None), slice(1, None, 2)), x[:, 1::2].sigmoid()))
OPS = (ASSIGN,)
