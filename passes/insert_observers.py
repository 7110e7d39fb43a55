"""insert_observers: an observer after every value that gets a scale of its own."""
from __future__ import annotations

from torch import fx, nn

from fxq.context import PassContext
from fxq.graph import finish, label
from fxq.observers import make_observer
from fxq.ops import Kind, kind_of, supported

OBSERVERS = "observers"  # the submodule holding one observer per observed node


def insert_observers(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Insert an observer call after each value that is quantized with new parameters.

    Before: ``y = conv(x)``. After: ``y = observers.conv(conv(x))``, an identity that records
    ``y``'s range. Observed: every model input, and the output of each conv, linear and add
    (with the default placement "pre", before its ReLU). ReLU, pooling, flatten and view keep
    their input's scale and get no observer. An op fxq cannot run on integers raises a
    ``ValueError`` naming it and listing what is supported.
    """
    modules = dict(gm.named_modules())
    container = nn.Module()
    gm.add_module(OBSERVERS, container)
    for node in list(gm.graph.nodes):
        if node.op == "placeholder" or _needs_observer(node, modules):
            observer = make_observer(ctx.config.act_range, f"the value of {label(node)}")
            container.add_module(node.name, observer)
            with gm.graph.inserting_after(node):
                observed = gm.graph.call_module(f"{OBSERVERS}.{node.name}", (node,))
            node.replace_all_uses_with(observed, delete_user_cb=lambda user: user is not observed)
    return finish(gm)


def _needs_observer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op not in ("call_module", "call_function", "call_method"):
        return False
    kind = kind_of(node, modules)
    if kind is None:
        raise ValueError(
            f"{label(node)} ({_describe(node, modules)}) has no integer implementation in fxq. "
            f"Supported: {supported()}. Fix: express it with supported ops, or fold it away "
            "before quantizing (a batchnorm must directly follow a conv to be folded)"
        )
    return kind in (Kind.WEIGHTED, Kind.ADD)


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", str(node.target))
