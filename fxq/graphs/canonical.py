"""What an op computes, not how it is spelled: layers written as functions of constant parameters
(timm's ``BatchNormAct2d`` calls ``F.batch_norm``, its ``Linear`` ``F.linear``, a weight-standardized
conv ``F.conv2d``) become the torch modules they are, so that batch norms fold and layers quantize
whatever class wrote them; fused attention (``F.scaled_dot_product_attention``) becomes the matrix
products and softmax it fuses, each with an integer form; and the shape assertions such forwards
carry (``torch._assert(x.ndim == 4)``) leave the graph once calibration has checked them on real data.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxq.graphs.graph import add_module_near

# calls that read a tensor's shape, and Python comparisons and logic on what they return
SHAPE_QUERIES = frozenset({getattr, len, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
                           operator.ge, operator.and_, operator.or_, operator.not_, operator.getitem})
SHAPE_METHODS = frozenset({"size", "dim", "numel"})


def torch_class(module: nn.Module) -> type:
    """The torch.nn class whose computation ``module`` runs: its own type, or, for a subclass that
    only constructs it differently (``class MyNorm(nn.BatchNorm2d)`` with an ``__init__`` of its
    own), that base — what the module computes, whatever it is called. A subclass that defines
    any other method (``forward``, ``_conv_forward``, ...) may compute anything: its own type."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn."):
            return cls
        if any(callable(v) and name not in _CONSTRUCTION for name, v in vars(cls).items()):
            return type(module)
    return type(module)


_CONSTRUCTION = frozenset({"__init__", "extra_repr", "__repr__", "reset_parameters"})


def fold_parameter_math(gm: fx.GraphModule) -> int:
    """Compute once every call that reads only the model's own tensors and constants (a weight
    standardized from its parameters, ``ScaledStdConv2d``'s ``F.batch_norm`` over the weight):
    a tensor result becomes a buffer read by ``get_attr``, a tuple of tensors (``torch.meshgrid``)
    buffers of the items its users take, anything else (a shape) a constant in its users'
    arguments. The layer that reads it then has constant parameters and quantizes.
    Returns how many calls were computed."""
    values: dict[fx.Node, object] = {n: _tensor(gm, n) for n in gm.graph.nodes if n.op == "get_attr"}
    pieces: list[fx.Node] = []
    done = 0
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or node.target in IMPURE \
                or not (node.all_input_nodes or node.target in _FACTORIES) \
                or not all(a in values for a in node.all_input_nodes):
            continue
        args, kwargs = fx.map_arg(node.args, values.__getitem__), fx.map_arg(node.kwargs, values.__getitem__)
        with torch.no_grad():
            value = (node.target(*args, **kwargs) if node.op == "call_function"
                     else getattr(args[0], node.target)(*args[1:], **kwargs))
        values[node] = value
        if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
            pieces.append(node)  # its users' calls (``grid[0]``) are computed in turn
            continue
        if isinstance(value, torch.Tensor):
            name = fresh_attribute(gm, f"{node.name}_computed")
            gm.register_buffer(name, value.detach().clone())
            with gm.graph.inserting_before(node):
                node.replace_all_uses_with(gm.graph.get_attr(name))
            values[next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == name)] = value
        else:
            for user in list(node.users):
                user.args = fx.map_arg(user.args, lambda a: value if a is node else a)
                user.kwargs = fx.map_arg(user.kwargs, lambda a: value if a is node else a)
        gm.graph.erase_node(node)
        done += 1
    for node in reversed(pieces):
        if not node.users:
            gm.graph.erase_node(node)
    for node in [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users]:
        gm.graph.erase_node(node)
    return done


# tensors made from constants alone (``torch.full((64, 1), 8.0)`` of a traced stride)
_FACTORIES = frozenset({torch.full, torch.zeros, torch.ones, torch.arange, torch.linspace, torch.eye})
IMPURE = frozenset({torch._assert, torch.rand, torch.randn, torch.rand_like, torch.randn_like})


def fresh_attribute(gm: fx.GraphModule, base: str) -> str:
    name, index = base, 0
    while hasattr(gm, name):
        index += 1
        name = f"{base}_{index}"
    return name


def layers_from_functions(gm: fx.GraphModule, rank_of: Callable[[fx.Node], int | None], layers: dict) -> int:
    """Rewrite each call of a weighted layer's function (``layers``: ``F.linear``, ``F.conv2d``, ...
    → its `fxq.ops.weighted.Weights`) or of ``F.batch_norm`` whose parameters are the model's own
    tensors (``get_attr``) into a call of the torch module it is (``nn.Linear``, ``nn.Conv2d``,
    ``nn.BatchNorm2d``) holding those very tensors, registered beside the call. A batch norm in
    training mode, or over an input that is not 4-d (``rank_of``), stays as it is. Returns how
    many were rewritten."""
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        weights = layers.get(node.target)
        if weights is None and node.target is not F.batch_norm:
            continue
        bound = _bound(node, weights.parameters if weights is not None else _SIGNATURES[F.batch_norm])
        if bound is None or not _constant_parameters(bound):
            continue
        if weights is not None:
            module = weights.from_call(_tensor(gm, bound["weight"]), _tensor(gm, bound["bias"]), bound)
        else:
            module = _batch_norm(gm, bound, rank_of)
        if module is None:
            continue
        path = add_module_near(gm, node, node.name, module)
        node.op, node.target, node.args, node.kwargs = "call_module", path, (bound["input"],), {}
        done += 1
    return done


# each function's parameters in order, with their defaults (builtins without a signature to inspect)
_SIGNATURES = {
    F.batch_norm: (("input", ...), ("running_mean", ...), ("running_var", ...), ("weight", None), ("bias", None),
                   ("training", False), ("momentum", 0.1), ("eps", 1e-5)),
    F.scaled_dot_product_attention: (("query", ...), ("key", ...), ("value", ...), ("attn_mask", None),
                                     ("dropout_p", 0.0), ("is_causal", False), ("scale", None),
                                     ("enable_gqa", False)),
}


def _bound(node: fx.Node, names: tuple) -> dict | None:
    """The call's arguments by name (``names``: each with its default, ``...`` for none), defaults
    filled in; None if they do not fit the function."""
    if len(node.args) > len(names) or set(node.kwargs) - {n for n, _ in names}:
        return None
    bound = dict(zip((n for n, _ in names), node.args))
    for name, default in names[len(node.args):]:
        bound[name] = node.kwargs.get(name, default)
    return None if any(v is ... for v in bound.values()) else bound


_PARAMETERS = ("weight", "bias", "running_mean", "running_var")


def _constant_parameters(bound: dict) -> bool:
    """Every tensor argument but the input is a parameter or buffer of the model (or None)."""
    return isinstance(bound["input"], fx.Node) and all(
        value is None or (isinstance(value, fx.Node) and value.op == "get_attr")
        for name, value in bound.items() if name in _PARAMETERS) and not any(
        isinstance(value, fx.Node) for name, value in bound.items() if name not in _PARAMETERS + ("input",))


def as_parameter(tensor: torch.Tensor) -> nn.Parameter:
    return tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)


def _tensor(gm: fx.GraphModule, node: fx.Node | None) -> torch.Tensor | None:
    if node is None:
        return None
    owner, _, name = node.target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _batch_norm(gm, bound, rank_of) -> nn.Module | None:
    if bound["training"] is not False or bound["running_mean"] is None or rank_of(bound["input"]) != 4:
        return None
    mean, var = _tensor(gm, bound["running_mean"]), _tensor(gm, bound["running_var"])
    weight, bias = _tensor(gm, bound["weight"]), _tensor(gm, bound["bias"])
    norm = nn.BatchNorm2d(mean.numel(), eps=bound["eps"], affine=False)
    norm.running_mean, norm.running_var = mean, var
    if weight is not None or bias is not None:  # one of them alone: the other is the identity's
        norm.weight = as_parameter(weight if weight is not None else torch.ones_like(mean))
        norm.bias = as_parameter(bias if bias is not None else torch.zeros_like(mean))
        norm.affine = True
    return norm.eval()


def dtype_reads_as_casts(gm: fx.GraphModule, dtype_of: Callable[[fx.Node], torch.dtype | None]) -> int:
    """Rewrite calls that read another tensor only for its dtype as calls that name the dtype:
    ``a.type_as(b)`` → ``a.to(dtype)``, ``b.new_full(size, v)`` → ``torch.full(size, v, dtype=...)``
    (``new_zeros``, ``new_ones`` alike; Ultralytics' anchor grid). A grid made from sizes then no
    longer reads the activations, and is computed once (`fold_parameter_math`). ``dtype_of`` is
    the dtype calibration saw (None: the call is left as it is). A dtype read as an argument,
    ``a.to(b.dtype)`` (EVA's rotary embedding), becomes the dtype itself. Returns how many."""
    done = _dtype_attributes_as_constants(gm, dtype_of)
    for node in list(gm.graph.nodes):
        if node.op != "call_method" or node.target not in _DTYPE_READS:
            continue
        source = node.args[1] if node.target == "type_as" else node.args[0]
        dtype = node.kwargs.get("dtype") or (dtype_of(source) if isinstance(source, fx.Node) else None)
        if dtype is None or set(node.kwargs) - {"dtype"}:
            continue
        if node.target == "type_as":
            node.target, node.args, node.kwargs = "to", (node.args[0], dtype), {}
        else:
            rest = node.args[1:]
            if node.target == "new_full":
                if len(rest) != 2:
                    continue
                size, value = rest
            else:  # new_zeros(2, 3) or new_zeros((2, 3))
                size = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
                value = _FILLS[node.target]
            node.op, node.target = "call_function", torch.full
            node.args, node.kwargs = (tuple(size), value), {"dtype": dtype}
        done += 1
    return done


def _dtype_attributes_as_constants(gm: fx.GraphModule, dtype_of: Callable[[fx.Node], torch.dtype | None]) -> int:
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not getattr or node.args[1:] != ("dtype",) \
                or not isinstance(node.args[0], fx.Node):
            continue
        dtype = dtype_of(node.args[0])
        if dtype is None:
            continue
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda n: dtype if n is node else n)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda n: dtype if n is node else n)
        gm.graph.erase_node(node)
        done += 1
    return done


_DTYPE_READS = frozenset({"type_as", "new_full", "new_zeros", "new_ones"})
_FILLS = {"new_zeros": 0, "new_ones": 1}  # new_full gives its own


def stack_as_cat(gm: fx.GraphModule) -> int:
    """Rewrite ``torch.stack(tensors, dim)`` (SKNet's branches) as ``torch.cat`` of each tensor
    unsqueezed at ``dim``: the same values, as a concatenation fxq joins on integers."""
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.stack:
            continue
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or set(node.kwargs) - {"tensors", "dim"}:
            continue
        with gm.graph.inserting_before(node):
            parts = [gm.graph.call_method("unsqueeze", (t, dim)) for t in tensors]
        node.target, node.args, node.kwargs = torch.cat, (parts, dim), {}
        done += 1
    return done


def attention_as_matmuls(gm: fx.GraphModule, shape_of: Callable[[fx.Node], tuple | None]) -> int:
    """Rewrite each ``F.scaled_dot_product_attention(q, k, v)`` (no dropout, not causal) as the ops
    it fuses, ``softmax((q @ kᵀ) · scale, -1) @ v``, which run on integers, the scale ``1/√E``
    from the head size ``E`` calibration saw (``shape_of``). A mask the model holds as a finite
    float tensor (a learned relative-position bias, as TinyViT's) is added to the scores before
    the softmax; a boolean or infinite mask would stretch the scores' range to nothing, so that
    attention stays fused (in float). Returns how many."""
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
            continue
        bound = _bound(node, _SIGNATURES[node.target])
        if bound is None or bound["dropout_p"] != 0.0 or bound["is_causal"] or bound["enable_gqa"] \
                or not _additive_mask(gm, bound["attn_mask"]):
            continue
        scale = bound["scale"]
        if scale is None:
            shape = shape_of(bound["query"])
            scale = None if not shape else shape[-1] ** -0.5
        if not isinstance(scale, (int, float)):
            continue
        graph = gm.graph
        with graph.inserting_before(node):
            scores = graph.call_function(torch.matmul,
                                         (bound["query"], graph.call_method("transpose", (bound["key"], -2, -1))))
            scores = graph.call_function(operator.mul, (scores, scale))
            if bound["attn_mask"] is not None:
                scores = graph.call_function(operator.add, (scores, bound["attn_mask"]))
            weights = graph.call_function(torch.softmax, (scores, -1))
            out = graph.call_function(torch.matmul, (weights, bound["value"]))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        done += 1
    return done


def _additive_mask(gm: fx.GraphModule, mask) -> bool:
    """No mask, or one held by the model as a float tensor with finite values."""
    if mask is None:
        return True
    if not isinstance(mask, fx.Node) or mask.op != "get_attr":
        return False
    value = _tensor(gm, mask)
    return isinstance(value, torch.Tensor) and value.is_floating_point() and bool(torch.isfinite(value).all())


def is_shape_query(node: fx.Node) -> bool:
    """A call that reads sizes, ranks or comparisons of them: never a tensor op."""
    if node.op == "call_function":
        return node.target in SHAPE_QUERIES
    return node.op == "call_method" and node.target in SHAPE_METHODS


def drop_shape_checks(gm: fx.GraphModule) -> int:
    """Erase every ``torch._assert`` (calibration ran them on real data: they held) and the shape
    queries only they read. Returns how many assertions were erased."""
    asserts = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch._assert]
    for node in asserts:
        gm.graph.erase_node(node)
    changed = True
    while changed:
        dead = [n for n in gm.graph.nodes if not n.users and is_shape_query(n)]
        for node in dead:
            gm.graph.erase_node(node)
        changed = bool(dead)
    return len(asserts)
