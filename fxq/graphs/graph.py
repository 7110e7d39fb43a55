"""Small helpers every pass uses on a GraphModule."""
from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import fx, nn

from fxq.graphs import records

_ROOT = Path(__file__).resolve().parents[2]
_PACKAGES = (str(_ROOT / "fxq") + "/", str(_ROOT / "passes") + "/")  # not the user's code


def replace_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``target`` (the node calling it keeps its name)."""
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def add_module_near(gm: fx.GraphModule, node: fx.Node, suffix: str, module: nn.Module) -> str:
    """Register ``module`` beside the submodule ``node`` ran in (``layer1.0`` + ``add`` →
    ``layer1.0.add``), with a number appended if the name is taken; returns its path."""
    scope = scope_of(node)
    while scope and not _has_submodule(gm, scope):  # a module traced through is not kept in gm
        scope = scope.rpartition(".")[0]
    owner = gm.get_submodule(scope) if scope else gm
    name, n = suffix, 1
    while hasattr(owner, name):
        name, n = f"{suffix}_{n}", n + 1
    owner.add_module(name, module)
    return f"{scope}.{name}" if scope else name


def call_after(gm: fx.GraphModule, node: fx.Node, path: str) -> fx.Node:
    """A call of the submodule at ``path`` on ``node``'s output, inserted right after it; every
    other user of ``node`` reads the call's output instead."""
    with gm.graph.inserting_after(node):
        inserted = gm.graph.call_module(path, (node,))
    node.replace_all_uses_with(inserted, delete_user_cb=lambda user: user is not inserted)
    return inserted


def run_recording(gm: fx.GraphModule, x, record: Callable[[fx.Node, object], None]):
    """``gm(x)`` node by node (no gradients), handing each node and its value to ``record`` as it
    is computed; returns the output. A node that raises is not recorded."""
    class Recorder(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            record(n, value)
            return value

    with torch.no_grad():
        return Recorder(gm).run(x)


def attribute(gm: nn.Module, target: str):
    """What a ``get_attr`` node with this dotted ``target`` reads."""
    value = gm
    for name in target.split("."):
        value = getattr(value, name)
    return value


def _has_submodule(gm: fx.GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
    except AttributeError:
        return False
    return True


def module_name(node: fx.Node) -> str:
    """The user's name for the module a call node runs (``conv`` for every call site of
    ``self.conv``, whatever copy a site runs): what configs, overrides and reports go by."""
    origin = records.get(node, records.Origin)
    return node.target if origin is None else origin.path


def scope_of(node: fx.Node) -> str:
    """The path of the module ``node`` runs inside (``""`` at the top level): a module call's
    parent, or the innermost module a function call was traced in."""
    if node.op == "call_module":
        return node.target.rpartition(".")[0]
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    """End of every pass: drop dead code and unused modules, check the graph, regenerate code — or,
    inside `code_made_when_run`, have it regenerated when the graph next runs."""
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    if _DEFERRED.get():  # the class is this graph module's own (GraphModule.__new__)
        type(gm).forward, type(gm).code = _compile_then_forward, _current_code
    else:
        gm.recompile()
    return gm


_DEFERRED = contextvars.ContextVar("fxq_code_made_when_run", default=False)


@contextlib.contextmanager
def code_made_when_run():
    """Passes in a row regenerate a graph's Python code only when something runs it: most passes change
    a graph no one runs before the next does (code generation was a fifth of a small model's quantize).
    Whoever opens this calls `compiled` on the graph it returns."""
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def compiled(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with its code generated from its graph (pickling and tracing read it)."""
    if type(gm).__dict__.get("forward") is _compile_then_forward:
        gm.recompile()
    return gm


def _compile_then_forward(self, *args, **kwargs):
    self.recompile()
    return self.forward(*args, **kwargs)


@property
def _current_code(self) -> str:
    return compiled(self)._code


def copied(gm: fx.GraphModule, shared: Iterable[torch.Tensor] = ()) -> fx.GraphModule:
    """A deep copy of ``gm`` whose records name its own nodes (torch.fx copies ``node.meta``
    shallowly, so a ``records.FusedUnit`` would still point into ``gm``); the ``shared`` tensors
    are not copied (large statistics that are only read)."""
    twin = copy.deepcopy(gm, {id(t): t for t in shared})
    counterpart = dict(zip(gm.graph.nodes, twin.graph.nodes))
    for node in twin.graph.nodes:
        for key, value in list(node.meta.items()):
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                moved = {f.name: counterpart[v] for f in dataclasses.fields(value)
                         if isinstance(v := getattr(value, f.name), fx.Node) and v in counterpart}
                if moved:
                    node.meta[key] = dataclasses.replace(value, **moved)
    return twin


def source_line(node: fx.Node) -> str | None:
    """``file:line`` of the user's code that made ``node``, where torch.fx recorded it."""
    frames = [line.strip() for line in (node.stack_trace or "").splitlines()
              if line.strip().startswith('File "') and "/torch/" not in line
              and not any(f'"{package}' in line for package in _PACKAGES)]
    if not frames:
        return None
    path, _, rest = frames[-1].removeprefix('File "').partition('", line ')
    return f"{path}:{rest.split(',')[0]}"


def label(node: fx.Node) -> str:
    """How errors name a node: the module path it calls, or its name."""
    return f"'{node.target}'" if node.op == "call_module" else f"node '{node.name}'"
