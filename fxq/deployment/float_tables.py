"""Which lookup tables onnxruntime computes exactly as their function's float ops (`fxq.ops.lookup.FLOAT_FORMS`).

onnxruntime's Gather reads one index at a time (28 ns an element on 2 AVX-512 cores: 72 % of a
MobileNetV3's time at batch 32 went to its Hardswish and Hardsigmoid tables). The same function as
DequantizeLinear → its float ops → QuantizeLinear (Add, Clip, Mul, Div for Hardswish and Hardsigmoid;
Sigmoid, and a Mul for SiLU) runs several times faster, and gives the table's integers wherever its
float32 values do not land on the other side of a rounding boundary than the table's float64 ones —
which is checked, not assumed: every input integer of every such table, at several positions (vector
body and tail), through this machine's onnxruntime with the deployed model's session options. A table
that differs on one integer stays a Gather.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import fx

from fxq.deployment.onnx_export import OPSET, Builder
from fxq.ops.lookup import QLookup

REPEATS = 7  # every input integer at this many positions, the length odd: vector bodies and tails


def candidates(qmodel: fx.GraphModule) -> dict[str, QLookup]:
    """The lookup modules with a float form and at most 8-bit inputs, by name."""
    return {name: m for name, m in qmodel.named_modules()
            if isinstance(m, QLookup) and m.float_form() is not None and m.input_bits <= 8}


def exact_on_onnxruntime(qmodel: fx.GraphModule, session) -> set[str]:
    """The lookup modules whose float form gives their table on every input integer in sessions
    ``session(model_bytes)`` makes (a function of a uint8 array to the list of output arrays)."""
    tables = candidates(qmodel)
    if not tables:
        return set()
    b = Builder({})
    outputs = [tables[name].float_onnx(b, "x", f"t{i}") for i, name in enumerate(tables)]
    count = 256 * REPEATS + 5
    x = ((np.arange(count) * 7) % 256).astype(np.uint8)  # each integer at positions of every residue mod 16
    results = session(_model(b, outputs, count).SerializeToString())(x)
    index = torch.from_numpy(x).long()
    return {name for (name, m), got in zip(tables.items(), results)
            if torch.equal(torch.from_numpy(got.astype(np.int64))[index < len(m.table)],
                           m.table.to(torch.int64)[index[index < len(m.table)]])}


def _model(b: Builder, outputs: list[str], count: int):
    helper, types = b.helper, b.types
    graph = helper.make_graph(b.nodes, "fxq_float_tables", [helper.make_tensor_value_info("x", types.UINT8, [count])],
                              [helper.make_tensor_value_info(o, types.UINT8, [count]) for o in outputs],
                              b.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
