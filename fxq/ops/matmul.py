"""The matrix product of two activations: attention's ``q·kᵀ`` and ``weights·v``, a global-context
block's ``x·softmax(scores)`` (GCNet).

    O_q = clamp(z_O + round(M · Σ_k (A_q − z_A)(B_q − z_B))),   M = s_A·s_B/s_O

Each centred product and every partial sum is an integer below 2^53, so a float64 matrix
product forms the sums exactly in whatever order a runtime adds them; the one multiply by ``M``
and the rounding are single IEEE steps. fxq and the exported graph (MatMul on doubles) give the
same integers on every CPU.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
from torch import fx, nn

from fxq.files import schema as sc
from fxq.files.schema import Schema
from fxq.graphs.twin import on_integers
from fxq.integers.affine import ActQParams
from fxq.integers.intmath import storage_dtype
from fxq.ops.base import Lowering, Op, Output, hold_parameters, leaf_name, output_qparams, qparams_of

EXACT_SUMS = 1 << 53  # integers a float64 holds exactly


class QMatMul(nn.Module):
    """Integers @ integers → integers, broadcasting as ``torch.matmul`` does."""

    schema = Schema({"input_bits": lambda v: sc.bits_tuple(v) and len(v) == 2, "output_bits": sc.act_bits},
                    {"scales": torch.float64, "zero_points": torch.int32}, ranges=lambda m: m.check_ranges())

    def __init__(self, a: ActQParams, b: ActQParams, out: ActQParams):
        super().__init__()
        self.input_bits, self.output_bits = (a.bits, b.bits), out.bits
        hold_parameters(self, a, b, out)

    def multiplier(self) -> float:
        sa, sb, so = self.scales.tolist()
        return sa * sb / so

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        za, zb, zo = self.zero_points.tolist()
        inner = a.shape[-1]
        if inner << sum(self.input_bits) >= EXACT_SUMS:
            raise ValueError(f"a product over {inner} values at {self.input_bits} bits passes 2^53, beyond "
                             "exact float64 sums: keep it in float with overrides, or use 8-bit activations")
        sums = torch.matmul(a.to(torch.float64) - za, b.to(torch.float64) - zb)
        out = torch.round(sums * self.multiplier()).add_(zo).clamp_(0, (1 << self.output_bits) - 1)
        return out.to(storage_dtype(self.output_bits))

    def check_ranges(self) -> None:
        sc.parameters_fit(self, self.input_bits + (self.output_bits,))

    def extra_repr(self) -> str:
        return f"M={self.multiplier():.6g}, float64 sums of integers"

    def twin(self, node) -> nn.Module:
        return on_integers(self.forward, node)

    def to_onnx(self, b, node, inputs):
        """Cast double → Sub z ×2 → MatMul → Mul M → Round → QuantizeLinear(1, z_O): `forward`'s steps."""
        name = node.name
        za, zb, zo = self.zero_points.tolist()
        centred = [b.node("Sub", [b.node("Cast", [value], f"{name}_{i}_real", to=b.types.DOUBLE),
                                  b.constant(f"{name}_{i}_z", np.float64(z))], f"{name}_{i}_centred")
                   for i, (value, z) in enumerate(zip(inputs, (za, zb)))]
        sums = b.node("MatMul", centred, f"{name}_sums")
        scaled = b.node("Mul", [sums, b.constant(f"{name}_m", np.float64(self.multiplier()))], f"{name}_scaled")
        rounded = b.node("Cast", [b.node("Round", [scaled], f"{name}_rounded")], f"{name}_float", to=b.types.FLOAT)
        return b.quantize(rounded, ActQParams(1.0, zo, self.output_bits), name)


def _of_two_activations(node: fx.Node, module: nn.Module | None) -> str | None:
    computed = [isinstance(v, fx.Node) and v.op != "get_attr" for v in node.args]
    if len(node.args) == 2 and all(computed) and not node.kwargs:
        return None
    return "a product with a constant matrix (a layer's weight), or with keyword arguments"


def lower_matmul(lo: Lowering, node: fx.Node) -> None:
    """``a @ b`` → ``QMatMul(a_q, b_q)``: exact sums of the centred products, one rounding."""
    a, b = node.args
    qparams = [qparams_of(a, node), qparams_of(b, node), output_qparams(node)]
    lo.become(node, QMatMul(*qparams), leaf_name(node), (a, b))


MATMUL = Op("matmul", "the matrix product of two activations: exact float64 sums of the centred integers, one "
            "rounding", lower_matmul, Output.OWN, functions=(operator.matmul, torch.matmul, torch.bmm),
            methods=("matmul", "bmm"), accepts=_of_two_activations, integer_modules=(QMatMul,),
            example=lambda: lambda x: x @ x.transpose(-2, -1))
OPS = (MATMUL,)
