"""Every op fxq knows: one `Op` entry each, with all its facets (`fxq.ops.base.Op`).

    fxq.ops.REGISTRY                  the entries
    fxq.ops.classify(node, modules)   (the entry that lowers a call, why it stays float if so)
    fxq.ops.weights_of(module)        a weighted layer's layout (`fxq.ops.weighted`), or None

A call no entry matches, or one its entry does not accept, runs in float between integers
(`fxq.ops.fallback.FLOAT`). Adding an op is one entry in one of the family modules below plus
its tests; `tests/test_registry.py` checks that every entry has every facet.
"""
from __future__ import annotations

from torch import fx, nn

from fxq.graphs import records
from fxq.graphs.canonical import torch_class
from fxq.graphs.context import PassContext
from fxq.graphs.graph import module_name
from fxq.graphs.qmodules import NotRepresentable
from fxq.ops import (
    activations,
    arithmetic,
    assign,
    attention,
    convolutions,
    extrema,
    layers,
    matmul,
    norms,
    padding,
    pooling,
    reductions,
    resize,
    sampling,
    shape,
    softmax,
    transposed,
)
from fxq.ops.base import KeepInFloat, Lowering, Op, Output
from fxq.ops.fallback import FLOAT, lower_in_float
from fxq.ops.weighted import Weights

__all__ = ["FLOAT", "FUNCTIONAL_LAYERS", "KeepInFloat", "Lowering", "Op", "Output", "REGISTRY", "REWRITES",
           "Weights", "classify", "lower", "match", "weights_of", "records"]

# In order: where two entries match one form (``a + b`` and ``x + 3`` are both operator.add),
# the first that accepts the call lowers it.
REGISTRY: tuple[Op, ...] = (*layers.OPS, *convolutions.OPS, *arithmetic.OPS, *matmul.OPS, *activations.OPS,
                             *pooling.OPS, *resize.OPS, *transposed.OPS, *assign.OPS, *padding.OPS, *reductions.OPS,
                             *softmax.OPS, *extrema.OPS, *norms.OPS, *shape.OPS, *attention.OPS, *sampling.OPS)
CALLS = ("call_module", "call_function", "call_method")


def _index(forms: str) -> dict:
    index: dict = {}
    for op in REGISTRY:
        for form in getattr(op, forms):
            index.setdefault(form, []).append(op)
    return index


_BY_MODULE, _BY_FUNCTION, _BY_METHOD = _index("modules"), _index("functions"), _index("methods")
# the functions and methods that return sizes, not tensors
_SIZES = frozenset(form for op in REGISTRY if op.output is Output.NONE for form in op.functions + op.methods)


def weights_of(module: nn.Module) -> Weights | None:
    """The weight layout of a layer (`fxq.ops.weighted`) by what it computes; None if it has none."""
    return next((op.weights for op in _BY_MODULE.get(torch_class(module), ()) if op.weights), None)


# the layers computed by an F.* call on the model's own tensors (F.conv2d), by that function
FUNCTIONAL_LAYERS = {op.weights.function: op.weights for op in REGISTRY if op.weights and op.weights.function}
REWRITES = tuple(op for op in REGISTRY if op.rewrite is not None)


def match(node: fx.Node, modules: dict[str, nn.Module]) -> list[Op]:
    """The entries whose forms match the call (a module by the torch class whose forward it runs:
    a subclass that overrides ``forward`` may compute anything)."""
    if node.op == "call_module":
        return _BY_MODULE.get(torch_class(modules[node.target]), [])
    if node.op == "call_function":
        return _BY_FUNCTION.get(node.target, [])
    if node.op == "call_method":
        return _BY_METHOD.get(node.target, [])
    return []


KEPT_BY_OVERRIDES = "kept in float by overrides"
# why a call of these module types has no integer form here, and what to do
HINTS = {nn.BatchNorm2d: "a batchnorm without running statistics has no fixed affine form"}


def classify(node: fx.Node, modules: dict[str, nn.Module],
             ctx: PassContext | None = None) -> tuple[Op, str | None]:
    """The entry that lowers the call, and why it runs in float when that entry is `FLOAT`
    (with ``ctx``, a module its ``overrides`` map to None is kept in float)."""
    if ctx is not None and node.op == "call_module" and ctx.config_for(module_name(node)) is None:
        return FLOAT, KEPT_BY_OVERRIDES
    candidates = match(node, modules)
    if not candidates:
        kind = type(modules[node.target]) if node.op == "call_module" else None
        hint = f": {HINTS[kind]}" if kind in HINTS else ""
        return FLOAT, f"no integer form for {describe_call(node, modules)}{hint}"
    module = modules.get(node.target) if node.op == "call_module" else None
    reasons = []
    for op in candidates:
        reason = op.accepts(node, module)
        if reason is None:
            return op, None
        reasons.append(reason)
    return FLOAT, "; ".join(reasons)


def lower(lo: Lowering, node: fx.Node) -> None:
    """Lower one call with its entry; in float if it has no integer form, if an override keeps
    it in float, or if its entry finds an input it cannot take (`KeepInFloat`)."""
    op, reason = classify(node, lo.modules, lo.ctx)
    if op is FLOAT:
        lower_in_float(lo, node, reason)
        return
    try:
        op.lower(lo, node)
    except (KeepInFloat, NotRepresentable) as why:  # known only now, after calibration: reported by convert
        lower_in_float(lo, node, str(why))
        lo.late.append((node, str(why)))


def describe_call(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", str(node.target))


def tensor_calls(graph: fx.Graph) -> list[fx.Node]:
    """The calls that read a tensor: not arithmetic on sizes (``x.size(0) // 2``), whose inputs
    are all Python values. A tensor flows from inputs, parameters and every module call."""
    tensors: set[fx.Node] = set()
    calls = []
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr", "call_module"):
            tensors.add(node)
        reads_tensor = any(arg in tensors for arg in node.all_input_nodes)
        if node.op in CALLS and reads_tensor:
            calls.append(node)
            if node.target not in _SIZES:
                tensors.add(node)
    return calls


def float_calls(gm: fx.GraphModule, ctx: PassContext) -> list[tuple[fx.Node, str]]:
    """Every call on tensors that will run in float, with the reason (what overrides keep in
    float, the user asked for, and is not listed)."""
    modules = dict(gm.named_modules())
    found = []
    for node in tensor_calls(gm.graph):
        op, reason = classify(node, modules, ctx)
        if op is FLOAT and reason != KEPT_BY_OVERRIDES:
            found.append((node, reason))
    return found
