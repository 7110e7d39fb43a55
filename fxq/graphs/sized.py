"""The graph made for one input size: tensors and paddings a model computes from its input's
sizes (not its values) become constants for the calibration input's sizes, so that they run on
integers (`passes.trace` records the size the graph was made for)."""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx

from fxq.graphs.canonical import IMPURE, SHAPE_METHODS, fresh_attribute, is_shape_query

_BROADCASTING = frozenset({operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul})


def fold_size_tensors(gm: fx.GraphModule, values_at: Callable[[int], dict]) -> int:
    """Compute once each tensor the model makes from sizes and its own tensors alone (EdgeNeXt's
    positional encoding: ``torch.zeros(B, H, W)``, cumulative sums, sines, a conv), for the sizes
    of the input ``values_at(n)`` runs the graph on with a batch of ``n``: a tensor the batch size
    does not change becomes a buffer; one that repeats one sample over the batch becomes that
    sample, where only ``+ - *`` read it (broadcasting it back over the batch). The graph is then
    made for that image size. Returns how many were folded."""
    sized: dict[fx.Node, bool] = {}  # computable without the input's values: does it read a size?
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            sized[node] = False
        elif (node.op == "call_function" and node.target is getattr) or (node.op == "call_method"
                                                                          and node.target in SHAPE_METHODS):
            sized[node] = True  # a size of any tensor (an item of it, ``x[0]``, is a call on it below)
        elif node.op in ("call_function", "call_method", "call_module") and node.target not in IMPURE \
                and all(a in sized for a in node.all_input_nodes):  # none: a constant (``torch.arange(8)``)
            sized[node] = any(sized[a] for a in node.all_input_nodes)
    frontier = [n for n, from_sizes in sized.items() if from_sizes and not is_shape_query(n)
                and any(u not in sized for u in n.users)]
    if not frontier:
        return 0
    one, two = values_at(1), values_at(2)
    done = 0
    for node in frontier:
        value = _one_value(node, one, two)
        if value is None:
            continue
        name = fresh_attribute(gm, f"{node.name}_from_sizes")
        gm.register_buffer(name, value.detach().clone())
        with gm.graph.inserting_before(node):
            node.replace_all_uses_with(gm.graph.get_attr(name))
        done += 1
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    return done


def pads_from_sizes(gm: fx.GraphModule, values_at: Callable[[int], dict]) -> int:
    """Give each ``F.pad`` whose amounts the model computes from sizes (Swin's padding up to a
    multiple of its window: ``(ws - H % ws) % ws``) the amounts it computed for the input
    ``values_at(n)`` runs the graph on, where the batch size does not change them: a padding of
    fixed integers, which runs on integers. The graph is then made for that image size. Returns
    how many."""
    pads = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.pad and len(n.args) > 1
            and isinstance(n.args[1], (tuple, list)) and any(isinstance(p, fx.Node) for p in n.args[1])]
    if not pads:
        return 0
    one, two = values_at(1), values_at(2)
    done = 0
    for node in pads:
        amounts = [(one.get(p), two.get(p)) if isinstance(p, fx.Node) else (p, p) for p in node.args[1]]
        if all(type(a) is int and a == b for a, b in amounts):
            node.args = (node.args[0], tuple(a for a, _ in amounts), *node.args[2:])
            done += 1
    gm.graph.eliminate_dead_code()
    return done


def _one_value(node: fx.Node, one: dict, two: dict) -> torch.Tensor | None:
    """The node's value for any batch, or for one sample where its users broadcast it; None if
    the batch size changes it otherwise."""
    a, b = one.get(node), two.get(node)
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.is_floating_point()):
        return None
    if torch.equal(a, b):
        return a
    # float kernels may sum in another order for another batch size: equal to within their rounding
    repeated = a.dim() > 0 and a.shape[0] == 1 and b.shape == (2, *a.shape[1:]) and torch.allclose(
        b, a.expand_as(b), rtol=1e-5, atol=1e-6)
    return a if repeated and all(_broadcasts(u, node, two) for u in node.users) else None


def _broadcasts(user: fx.Node, node: fx.Node, values: dict) -> bool:
    """``user`` is ``node ± other`` or ``node · other`` with ``other`` a batch of the same rank."""
    if not ((user.op == "call_function" and user.target in _BROADCASTING)
            or (user.op == "call_method" and user.target in ("add", "sub", "mul"))) or user.kwargs:
        return False
    others = [a for a in user.args if a is not node]
    if len(user.args) != 2 or len(others) != 1:
        return False
    other = values.get(others[0])
    return isinstance(other, torch.Tensor) and other.dim() == values[node].dim() and other.shape[0] == 2
