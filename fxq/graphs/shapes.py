"""Tracing with the calibration input's geometry: a model whose Python code computes with sizes
(timm's ``Conv2dSame`` pads by ``math.ceil(H / stride)``, MobileViT compares ``new_h != H``)
cannot be traced symbolically, yet it is a fixed graph for one input size. Its dtype and device
queries answer as the examples ran too.

`ConcreteShapes` is a torch.fx tracer mixin that runs the model alongside the trace on two
example batches, the first calibration image as a batch of 1 and of 2. A size query on a traced
tensor answers with a Python int where both batches agree (the image's own geometry: padding,
patch counts, channel counts become constants) and with a traced ``size(d)`` where the size
follows the batch, so the graph still takes any batch size. ``specialized`` says whether any
answer was a constant: then the graph holds only for the traced sample shape, which the
quantized model checks on every input (`fxq.graphs.qmodules.Quantize`).
"""
from __future__ import annotations

import operator

import torch
from torch import fx
from torch.fx import _symbolic_trace

# the model runs on the examples with torch.fx's patches of nn.Module lifted (they would trace
# that run too); a private helper of torch.fx, so its absence only disables sized tracing
_UNPATCHED = getattr(_symbolic_trace, "_maybe_revert_all_patches", None)

_VALUES = "fxq.example_values"  # a node's value on the two example batches (trace time only)


class _ShapedProxy(fx.Proxy):
    """A proxy that answers size queries from its example values (see the module docstring)."""

    def _examples(self):
        values = self.node.meta.get(_VALUES)
        return values if values is not None and all(isinstance(v, torch.Tensor) for v in values) else None

    def size(self, dim: int | None = None):
        examples = self._examples()
        if examples is None:
            return self.tracer.create_proxy("call_method", "size", (self,) if dim is None else (self, dim), {})
        one, two = (e.shape for e in examples)
        if dim is not None:
            return self._size_at(dim % len(one), one, two)
        sizes = tuple(self._size_at(d, one, two) for d in range(len(one)))
        return torch.Size(sizes) if all(isinstance(s, int) for s in sizes) else sizes

    def _size_at(self, d: int, one: torch.Size, two: torch.Size):
        if one[d] != two[d]:
            return self.tracer.create_proxy("call_method", "size", (self, d), {})
        self.tracer.specialized = True
        return one[d]

    @property
    def shape(self):
        return self.size()

    def dim(self) -> int:
        examples = self._examples()
        if examples is None:
            return self.tracer.create_proxy("call_method", "dim", (self,), {})
        return examples[0].dim()

    @property
    def ndim(self):
        return self.dim()

    @property
    def dtype(self):
        """The example's dtype (float32 for what fxq quantizes): code that casts back to it, or
        branches on it, traces as it ran."""
        examples = self._examples()
        return examples[0].dtype if examples is not None else self.tracer.create_proxy(
            "call_function", getattr, (self, "dtype"), {})

    @property
    def device(self):
        """The example's device: a branch on it (EfficientViT's ``v.device.type != 'meta'``) is
        taken as calibration ran."""
        examples = self._examples()
        return examples[0].device if examples is not None else self.tracer.create_proxy(
            "call_function", getattr, (self, "device"), {})

    def __setitem__(self, index, value) -> None:
        """``y[:, 2::3] = v`` is recorded as ``operator.setitem`` (`fxq.ops.assign` makes it a value)."""
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})

    def __len__(self) -> int:
        pieces = _pieces(self.node)
        if pieces is not None:
            return pieces
        size = self.size(0)
        if isinstance(size, int):
            return size
        raise RuntimeError("len() of a tensor whose first dimension is the batch cannot be traced; "
                           "use x.size(0)")


class ConcreteShapes:
    """Mix into an ``fx.Tracer``; set ``example`` (one input, batch of 1) before ``trace``."""

    example: torch.Tensor | None = None
    specialized: bool = False

    def trace(self, root, concrete_args=None):
        """Trace with the model's own tensors' size-taking methods recorded where a size is traced
        (ConViT's ``self.rel_indices.expand(B, -1, -1, -1)``: a buffer over the batch)."""
        originals = {name: getattr(torch.Tensor, name) for name in _SIZED_METHODS}
        try:
            for name, method in originals.items():
                setattr(torch.Tensor, name, self._recording(name, method))
            return super().trace(root, concrete_args)
        finally:
            for name, method in originals.items():
                setattr(torch.Tensor, name, method)

    def _recording(self, name: str, method):
        def sized(tensor, *args, **kwargs):
            if isinstance(tensor, torch.Tensor) and any(isinstance(a, fx.Proxy) for a in (*args, *kwargs.values())):
                return self.create_proxy("call_method", name, (tensor, *args), kwargs)
            return method(tensor, *args, **kwargs)
        return sized

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapedProxy(node, self)

    def to_bool(self, obj: fx.Proxy) -> bool:
        """A branch on sizes alone (Ultralytics' ``if self.shape != x.shape``) is taken as it went on
        both examples, if it went one way: the batch size does not decide it. A branch on values,
        or one the batch size decides, cannot be traced."""
        values = obj.node.meta.get(_VALUES)
        if values is None or not all(type(v) is bool for v in values) or values[0] != values[1] \
                or not _from_sizes(obj.node):
            return super().to_bool(obj)
        self.specialized = True
        return values[0]

    def iter(self, obj: fx.Proxy):
        """Iterating a split (``list(x.chunk(2, 1))``, ``for part in x.unbind(1)``) gives its pieces,
        as many as the examples had: the count is the image's geometry, like any other size."""
        pieces = _pieces(obj.node)
        return super().iter(obj) if pieces is None else iter([obj[i] for i in range(pieces)])

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if self.example is not None and kind != "output":
            node.meta[_VALUES] = self._evaluate(node)
        return node

    def _evaluate(self, node: fx.Node):
        """The node's value on each example batch; None where it cannot be computed here (its
        size queries then trace as ops, as a plain symbolic trace would)."""
        if _UNPATCHED is None:
            return None
        if node.op == "placeholder":
            return (self.example, torch.cat([self.example, self.example]))
        try:
            with _UNPATCHED():
                if node.op == "get_attr":
                    value = self.root
                    for part in node.target.split("."):
                        value = getattr(value, part)
                    return (value, value)
                return tuple(self._run(node, i) for i in (0, 1))
        except Exception:  # a value fxq cannot compute here is one the trace keeps symbolic
            return None

    def _run(self, node: fx.Node, i: int):
        def value(arg: fx.Node):
            return arg.meta[_VALUES][i]  # a KeyError/TypeError if unknown: this one is unknown too

        args, kwargs = fx.map_arg(node.args, value), fx.map_arg(node.kwargs, value)
        with torch.no_grad():
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            if node.op == "call_module":
                return self.root.get_submodule(node.target)(*args, **kwargs)
        raise ValueError(node.op)


# a tensor's methods that take sizes, which a traced size (the batch) reaches in a model's own tensor
_SIZED_METHODS = ("expand", "repeat", "view", "reshape", "new_zeros", "new_ones", "new_full", "new_empty")


def _from_sizes(node: fx.Node) -> bool:
    """The node computes on sizes alone: each path back ends at a size query, never at a value."""
    if node.op == "call_method" and node.target in ("size", "dim", "numel"):
        return True
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in ("shape", "ndim")
    return node.op == "call_function" and node.target.__module__ in ("_operator", "builtins") \
        and all(map(_from_sizes, node.all_input_nodes))


def _pieces(node: fx.Node) -> int | None:
    """How many items a traced tuple or list (a split) held on both examples; None if unknown."""
    values = node.meta.get(_VALUES)
    if values is None or not all(isinstance(v, (tuple, list)) for v in values) or len(values[0]) != len(values[1]):
        return None
    return len(values[0])


def forget_examples(graph: fx.Graph) -> None:
    """Drop the example values from the nodes (they were for tracing only)."""
    for node in graph.nodes:
        node.meta.pop(_VALUES, None)
