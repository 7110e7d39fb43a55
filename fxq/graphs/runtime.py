"""What a graph really computes in: dtypes seen at run time, not node names."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

CALLS = ("call_module", "call_function", "call_method")


@dataclass(frozen=True)
class OpCount:
    """How many executed ops took and returned only integer tensors, only float ones, or crossed."""

    integer: int
    float: int
    boundary: int           # float in, integer out or the reverse: quantize, dequantize
    float_ops: tuple[str, ...]  # the float ops by node name, so a report can say which

    def __str__(self) -> str:
        return f"{self.integer} integer, {self.float} float, {self.boundary} boundary"


class _DtypeRecorder(fx.Interpreter):
    """Runs the graph and records, per call node, the dtypes of its tensor inputs and outputs."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.seen: dict[fx.Node, tuple[set[bool], set[bool]]] = {}

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if n.op in CALLS:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.seen[n] = (_float_flags((args, kwargs)), _float_flags(result))
        return result


def _float_flags(value) -> set[bool]:
    flags: set[bool] = set()
    fx.node.map_aggregate(value, lambda v: flags.add(v.is_floating_point())
                          if isinstance(v, torch.Tensor) else None)
    return flags


def count_ops(gm: fx.GraphModule, example: torch.Tensor) -> OpCount:
    """Run ``gm`` on ``example`` and classify every op by the tensor dtypes it actually saw.

    Works on any fx GraphModule (a float model, an fxq model, a peer's int8 model: quantized
    tensors count as integer). Ops with no tensor input or output (``x.size()``) are not counted.
    """
    recorder = _DtypeRecorder(gm)
    with torch.no_grad():
        recorder.run(example)
    integer = floating = boundary = 0
    float_ops = []
    for node, (inputs, outputs) in recorder.seen.items():
        flags = inputs | outputs
        if not flags:
            continue
        if flags == {False}:
            integer += 1
        elif flags == {True}:
            floating += 1
            float_ops.append(node.name)
        else:
            boundary += 1
    return OpCount(integer, floating, boundary, tuple(float_ops))
