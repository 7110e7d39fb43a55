"""onnxruntime's int8 products in 16-bit pairs: whether this machine's kernels saturate, and which
weight format keeps each layer exact.

onnxruntime's x86 U8S8 kernels (uint8 activations × int8 weights) on a CPU without VNNI multiply
with VPMADDUBSW: two neighbouring products are added into one signed 16-bit lane, which saturates
at 32767. A pair reaches 2·255·127 = 64,770, so sums come out wrong (one QLinearConv, 64 inputs of
255, weights 127, output scale 10000: 105 instead of 207; DESIGN.md). VNNI (VPDPBUSD) adds into
32 bits and ARM widens first: no saturation there. Weights held as uint8 with zero point 128
(U8U8) are widened to 16 bits before the products and are exact everywhere, at a cost in speed
where U8S8 would saturate (2–7× on the AVX2 CPU measured in DESIGN.md).

A layer is *pair-safe* when no pair can pass the limit, whatever its input:

    (3)  2 · q_max(I) · max|W_q| ≤ 32767

(an 8-bit input and |W_q| ≤ 64, or a 7-bit input, q_max = 127, and any 8-bit weight). Such a
layer runs exactly in U8S8 on every CPU, which `QConfig(pair_safe=...)` quantizes for.

OpenVINO's CPU plugin (oneDNN) multiplies the same way on the same CPUs, and is probed the same way:
its own answer, not onnxruntime's, decides what a model deployed to it takes.

Weight formats a deployed model can take (``fxq.deploy(..., weights=...)``):

    "auto"    U8S8 where the runtime deployed to does not saturate on this machine (the probe below),
              else "exact"
    "exact"   U8S8 for pair-safe layers, U8U8 for the others: exact on every CPU
    "u8s8"    int8 weights everywhere: fastest, exact only where the runtime does not saturate
    "u8u8"    uint8 weights everywhere
"""
from __future__ import annotations

import enum
import functools

import numpy as np

PAIR_LIMIT = 2**15 - 1
CHOICES = ("auto", "exact", "u8s8", "u8u8")


class WeightFormat(str, enum.Enum):
    """How one layer's weights travel in the ONNX graph."""

    U8S8 = "u8s8"  # int8 weights, zero point 0
    U8U8 = "u8u8"  # uint8 weights W_q + 128, zero point 128

    def __str__(self) -> str:
        return self.value


def pair_safe(input_qmax: int, weight_absmax: int) -> bool:
    """Formula (3): no two products of the layer can pass 32767 together."""
    return 2 * input_qmax * weight_absmax <= PAIR_LIMIT


def layer_formats(layers: dict[str, tuple[int, int]], choice: str,
                  runtime: str = "onnxruntime") -> dict[str, WeightFormat]:
    """Each layer's weight format for ``choice`` (one of `CHOICES`) on ``runtime``; ``layers`` maps
    a layer's name to ``(q_max of its input, max|W_q|)``."""
    if choice not in CHOICES:
        raise ValueError(f"weights={choice!r}: choose one of {list(CHOICES)}")
    if choice == "auto":
        choice = "exact" if runtime_saturates(runtime) else "u8s8"
    if choice != "exact":
        return {name: WeightFormat(choice) for name in layers}
    return {name: WeightFormat.U8S8 if pair_safe(*bounds) else WeightFormat.U8U8
            for name, bounds in layers.items()}


@functools.cache
def runtime_saturates(runtime: str = "onnxruntime") -> bool:
    """Whether ``runtime`` ("onnxruntime" or "openvino") adds U8S8 products in saturating 16-bit
    pairs on this machine: a 1×1 conv, a 3×3 conv and a Gemm, every input 255 and every weight 127,
    checked against the exact answer (once per process and runtime)."""
    from fxq.deployment.runtimes import LOADERS

    return any(int(LOADERS[runtime](model, 1)(x)[0].ravel()[0]) != expected for model, x, expected in _probes())


def _probes():
    """(model bytes, its input, the exact output) for each probe: every input 255 and weight 127, in
    the DequantizeLinear → Conv/Gemm → QuantizeLinear form fxq exports."""
    channels = 64
    for kernel, out_scale in ((1, 10000.0), (3, 100000.0)):
        x = np.full((1, channels, kernel, kernel), 255, np.uint8)
        weight = np.full((1, channels, kernel, kernel), 127, np.int8)
        expected = round(channels * kernel * kernel * 255 * 127 / out_scale)
        yield _model("Conv", x.shape, weight, out_scale), x, expected
    x = np.full((1, channels), 255, np.uint8)
    yield _model("Gemm", x.shape, np.full((1, channels), 127, np.int8), 10000.0), x, round(
        channels * 255 * 127 / 10000)


def _model(op: str, shape: tuple, weight: np.ndarray, out_scale: float) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    def constant(name, value):
        return numpy_helper.from_array(np.asarray(value), name)

    initializers = [constant("one", np.float32(1)), constant("u0", np.uint8(0)), constant("w", weight),
                    constant("w_scale", np.ones(1, np.float32)), constant("w_zero", np.zeros(1, np.int8)),
                    constant("out_scale", np.float32(out_scale))]
    attributes = {"transB": 1} if op == "Gemm" else {}
    nodes = [helper.make_node("DequantizeLinear", ["x", "one", "u0"], ["xf"]),
             helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wf"], axis=0),
             helper.make_node(op, ["xf", "wf"], ["yf"], **attributes),
             helper.make_node("QuantizeLinear", ["yf", "out_scale", "u0"], ["y"])]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.UINT8, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()
