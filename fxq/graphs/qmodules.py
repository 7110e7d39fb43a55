"""What every integer op shares: `Derived` (tensors derived from saved integers, rebuilt on
load), `NotRepresentable` (no exact integer form: the op runs in float), and the two boundaries
of the integer graph. Each op's own integer modules live with its registry entry in `fxq.ops`.

    Quantize     float  → uint8          the network input, once
    Dequantize   uint8  → float32        the logits, once
"""
from __future__ import annotations

import torch
from torch import nn

from fxq.config import Rounding
from fxq.files import schema as sc
from fxq.files.schema import Schema
from fxq.graphs.twin import FromIntegers, SnapToGrid
from fxq.integers.affine import ActQParams


class NotRepresentable(ValueError):
    """An op's parameters, known after calibration, have no exact integer form here (a
    multiplier too large for fixed point, an accumulator too wide): `convert` runs that op in
    float instead and says so."""


class Derived(nn.Module):
    """A module whose ``prepare()`` derives non-persistent tensors (GEMM operands, lookup tables)
    from its saved integers: run once built and again after every ``load_state_dict``, so files
    hold each number once and a loaded state is never paired with stale tables."""

    def prepare(self) -> None:
        raise NotImplementedError

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.prepare()


class _ActBoundary(nn.Module):
    """Holds one value's activation parameters as buffers (``scale``, ``zero_point``)."""

    def __init__(self, qparams: ActQParams):
        super().__init__()
        self.bits = qparams.bits
        self.register_buffer("scale", torch.tensor(qparams.scale, dtype=torch.float64))
        self.register_buffer("zero_point", torch.tensor(qparams.zero_point, dtype=torch.int32))

    @property
    def qparams(self) -> ActQParams:
        return ActQParams(self.scale.item(), int(self.zero_point), self.bits)

    def extra_repr(self) -> str:
        return f"scale={self.scale.item():.6g}, zero_point={int(self.zero_point)}, bits={self.bits}"


def _boundary_ranges(module: "_ActBoundary") -> None:
    sc.zero_point_fits(module, "zero_point", module.bits)
    sc.expect(float(module.scale) > 0 and bool(torch.isfinite(module.scale)), "scale must be > 0")


_BOUNDARY_TENSORS = {"scale": torch.float64, "zero_point": torch.int32}


class Quantize(_ActBoundary):
    """float → uint8 ``clamp(round(x / s) + z)``; checks the input looks like the calibration data."""

    schema = Schema({"bits": sc.act_bits, "sample_shape": sc.optional(sc.ints(1)), "requantize_as": sc.REQUANTIZE,
                     "fixed_shape": sc.one_of(False, True)}, _BOUNDARY_TENSORS, ranges=_boundary_ranges)

    @property
    def half_even(self) -> bool:
        return self.requantize_as is Rounding.ONNXRUNTIME  # ties to even, as QuantizeLinear rounds

    def twin(self, node) -> nn.Module:
        return SnapToGrid(self.qparams, self.half_even)

    def to_onnx(self, b, node, inputs):
        return b.quantize(inputs[0], self.qparams, node.name)

    def __init__(self, qparams: ActQParams, sample_shape: tuple[int, ...] | None,
                 rounding: Rounding = Rounding.FIXED_POINT, fixed_shape: bool = False):
        super().__init__(qparams)
        self.requantize_as = Rounding(rounding)
        self.sample_shape = sample_shape  # None: an inner float island, not the network input
        self.fixed_shape = fixed_shape  # the graph holds for samples of exactly this shape (`fxq.graphs.shapes`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sample_shape is not None:
            self._check(x)
        # float16/bfloat16 values are exact in float32: the same values give the same integers
        # whatever dtype they arrive in
        return self.qparams.quantize(x.to(torch.promote_types(x.dtype, torch.float32)), self.half_even)

    def _check(self, x: object) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"the quantized model takes a float tensor, got {_describe(x)}")
        if (x.dim() != len(self.sample_shape) + 1 or x.shape[1] != self.sample_shape[0]
                or self.fixed_shape and tuple(x.shape[1:]) != tuple(self.sample_shape)):
            why = (" (the model's code computes with its input's size, so fxq traced it for this one "
                   "size; quantize again with samples of the size you need)" if self.fixed_shape else "")
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not match the calibration samples "
                f"{self.sample_shape}: pass a batch shaped [N, {', '.join(map(str, self.sample_shape))}]{why}"
            )
        finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
        if not finite.all():
            rows = torch.nonzero(~finite).flatten().tolist()
            raise ValueError(
                f"input rows {rows[:10]}{' ...' if len(rows) > 10 else ''} contain NaN or Inf: an "
                "integer has no NaN, so the quantized model cannot give the NaN the float model "
                "would. Filter or clean those inputs (torch.isfinite) before calling the model"
            )


class Dequantize(_ActBoundary):
    """uint8 → float32 ``s · (q − z)``."""

    schema = Schema({"bits": sc.act_bits}, _BOUNDARY_TENSORS, ranges=_boundary_ranges)

    def twin(self, node) -> nn.Module:
        # the very floats the integer graph makes, so float ops after it agree bit for bit
        return FromIntegers(self, self.qparams)

    def to_onnx(self, b, node, inputs):
        return b.dequantize(inputs[0], self.qparams, node.name)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        # contiguous: a float op after it (GroupNorm) reduces in another order on a channels-last
        # tensor, and the twin hands it the same floats in the standard layout
        return self.qparams.dequantize(q).contiguous()


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor"
    return type(x).__name__
