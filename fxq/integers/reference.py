"""The int64 reference of a conv or linear layer, written independently of its fast kernels
(`fxq.integers.gemm`'s backends): what `fxq.explain` checks a layer against, and tests too."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fxq.config import Rounding
from fxq.integers import intmath
from fxq.ops.qlayer import QLayer


def reference_output(m: QLayer, x_q: torch.Tensor) -> torch.Tensor:
    """Formulas (1) and (2) in plain int64, written independently of the fast kernels:
    ``acc = Σ W·(I − z_I) + b`` by unfold and an int64 product, then
    ``clamp(z_O + sign(p)·⌊(|p| + 2^(r−1)) / 2^r⌋)`` with ``p = acc·m``, ``r = 31 − shift``."""
    centered = x_q.to(torch.float64) - int(m.input_zero_point)
    w = m.weight.to(torch.int64).reshape(m.weight.shape[0], -1)
    if m.kind == "conv":
        cols = F.unfold(centered, m.weight.shape[2:], m.dilation, m.padding, m.stride).round().to(torch.int64)
        n, g = cols.shape[0], m.groups  # a group's outputs read its own block of input channels
        acc = torch.einsum("gok,ngkl->ngol", w.reshape(g, -1, w.shape[1]), cols.reshape(n, g, w.shape[1], -1))
        acc = acc.reshape(n, w.shape[0], -1)
        out_h = intmath.output_size(x_q.shape[2] + 2 * m.padding[0], m.weight.shape[2], m.stride[0], m.dilation[0])
        acc = acc.reshape(n, -1, out_h, acc.shape[-1] // out_h)
        shape = (1, -1, 1, 1)
    else:
        acc = centered.round().to(torch.int64) @ w.T
        shape = (1,) * (acc.dim() - 1) + (-1,)
    acc = acc + m.bias.to(torch.int64).reshape(shape)
    if m.requantize_as is Rounding.ONNXRUNTIME:  # float32 throughout, ties to even (torch.round)
        scale = (m.input_scale.float() * m.weight_scale.float() / m.output_scale.float()).reshape(shape)
        rounded = torch.round(acc.to(torch.float32) * scale).to(torch.int64)
        return torch.clamp(rounded + int(m.output_zero_point), 0, (1 << m.output_bits) - 1)
    p = acc * m.multiplier.to(torch.int64).reshape(shape)
    r = (31 - m.shift.to(torch.int64)).reshape(shape)
    rounded = torch.sign(p) * torch.div(p.abs() + (1 << (r - 1)), 1 << r, rounding_mode="floor")
    return torch.clamp(rounded + int(m.output_zero_point), 0, (1 << m.output_bits) - 1)
