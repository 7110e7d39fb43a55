"""Runs of a graph that differ from one recorded run in a single module: only the nodes that module
reaches are computed again, the rest is read from the record.

    runs = Runs(folded, images)                       # every node's value, once
    out = runs.with_module("layer3.0.conv1", layer)   # that layer replaced; what precedes it is reused

Layer-by-layer studies (`fxq.search_bits`' error of each layer, `fxq.sensitivity`) change one layer
at a time: on a chain of layers this computes about half of what a whole run per layer does.
"""
from __future__ import annotations

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

# Recorded values are kept for every node: inputs are split so a record stays under this size.
RECORD_BYTES = 2**30


def _cloned(value):
    """A copy an in-place op downstream (ReLU(inplace=True), ``+=``) cannot change."""
    return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, value)


def _bytes(value) -> int:
    sizes = []
    tree_map(lambda v: sizes.append(v.numel() * v.element_size()) if isinstance(v, torch.Tensor) else None, value)
    return sum(sizes)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, values: dict):
        super().__init__(gm, garbage_collect_values=False)
        self.values = values

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        self.values[n] = _cloned(value)
        return value


class _Suffix(fx.Interpreter):
    """``gm`` with ``target`` replaced by ``module``: recorded values up to it, computed after."""

    def __init__(self, runs: "Runs", target: str, module: nn.Module):
        super().__init__(runs.gm)
        self.runs, self.target, self.replacement = runs, target, module
        self.changed = runs.downstream(target)

    def run_node(self, n: fx.Node):
        if n in self.changed or n.op == "output":
            return super().run_node(n)
        value = self.runs.values[n]
        return _cloned(value) if any(user in self.changed for user in n.users) else value

    def call_module(self, target, args, kwargs):
        if target == self.target:
            return self.replacement(*args, **kwargs)
        return super().call_module(target, args, kwargs)


class Runs:
    """Every node's value of ``gm`` on ``batch`` (``output`` is its output), and runs of ``gm`` with
    one submodule replaced."""

    def __init__(self, gm: fx.GraphModule, batch: torch.Tensor):
        self.gm, self.values = gm, {}
        with torch.no_grad():
            self.output = _Recorder(gm, self.values).run(batch)
        self._downstream: dict[str, set[fx.Node]] = {}

    def downstream(self, target: str) -> set[fx.Node]:
        """The nodes whose values depend on a call of the submodule ``target``."""
        if target not in self._downstream:
            reached: set[fx.Node] = set()
            for node in self.gm.graph.nodes:
                called = node.op == "call_module" and node.target == target
                if called or any(a in reached for a in node.all_input_nodes):
                    reached.add(node)
            self._downstream[target] = reached
        return self._downstream[target]

    def calls(self, target: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The recorded (input, output) of each call of the submodule ``target``."""
        return [(self.values[n.args[0]], self.values[n]) for n in self.gm.graph.nodes
                if n.op == "call_module" and n.target == target]

    def with_module(self, target: str, module: nn.Module):
        """``gm``'s output with the submodule at ``target`` replaced by ``module``."""
        inputs = [self.values[n] for n in self.gm.graph.nodes if n.op == "placeholder"]
        with torch.no_grad():
            return _Suffix(self, target, module).run(*inputs)


def chunk_size(gm: fx.GraphModule, batch: torch.Tensor, limit: int = RECORD_BYTES) -> int:
    """How many samples of ``batch`` a record (every node's value) holds in ``limit`` bytes,
    measured on one sample."""
    values: dict = {}
    with torch.no_grad():
        _Recorder(gm, values).run(batch[:1])
    return max(1, limit // max(1, sum(_bytes(v) for v in values.values())))
