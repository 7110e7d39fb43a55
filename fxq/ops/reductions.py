"""Reductions along axes: the sum of split attention's branches (``x.sum(dim=1)``, timm's SKNet and
ResNeSt), a mean over any dims (MambaOut's channels-last ``x.mean((1, 2))``; the spatial mean is
global pooling, `fxq.ops.pooling`) and Euclidean norms (the softmax is `fxq.ops.softmax`).

    sum:      O_q = clamp(z_O + round(s_I/s_O · Σ (I_q − z_I)))        int32 sums, one rounding
    mean:     O_q = z_I + round(Σ (I_q − z_I) / n)                      at the input's parameters
    L2 norm:  O_q = clamp(z_O + round(s_I/s_O · √Σ (I_q − z_I)²))       int64 sums, float64 root
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxq.config import Rounding
from fxq.files import schema as sc
from fxq.files.schema import Schema
from fxq.graphs import records
from fxq.graphs.twin import OnIntegers
from fxq.integers import intmath
from fxq.integers.affine import ActQParams
from fxq.ops.base import Lowering, Op, Output, hold_parameters, leaf_name, qparams_of, through


def dims_schema(v) -> bool:
    return isinstance(v, tuple) and 0 < len(v) <= 8 and all(sc.is_int(d) for d in v)


class QSum(nn.Module):
    """Integers → integers: the sum over ``dims`` of the centred inputs (int64, exact), requantized
    once to the output's parameters: in fixed point, or (``Rounding.ONNXRUNTIME``) as the
    exported graph computes it, the int32 sum in float32 times the float32 ``s_I / s_O``, rounded
    half to even (exact below 2^24 summed steps)."""

    schema = Schema({"dims": dims_schema, "keepdim": sc.one_of(True, False), "input_bits": sc.act_bits,
                     "output_bits": sc.act_bits, "requantize_as": sc.REQUANTIZE},
                    {"scales": torch.float64, "zero_points": torch.int32},
                    ranges=lambda m: m.check_ranges())

    def __init__(self, dims: tuple[int, ...], keepdim: bool, before: ActQParams, after: ActQParams,
                 rounding: Rounding = Rounding.FIXED_POINT):
        super().__init__()
        self.dims, self.keepdim, self.requantize_as = dims, keepdim, Rounding(rounding)
        self.input_bits, self.output_bits = before.bits, after.bits
        hold_parameters(self, before, after)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        z_in, z_out = (int(z) for z in self.zero_points)
        total = (q.to(torch.int64) - z_in).sum(self.dims, keepdim=self.keepdim)
        qmax = (1 << self.output_bits) - 1
        if self.requantize_as is Rounding.ONNXRUNTIME:
            return intmath.runtime_requantize(total, self.runtime_ratio(), z_out, qmax)
        m, shift = intmath.fixed_point(self.scales[0] / self.scales[1])
        return intmath.requantize(total, m, shift, z_out, qmax)

    def check_ranges(self) -> None:
        sc.parameters_fit(self, (self.input_bits, self.output_bits))

    def runtime_ratio(self) -> torch.Tensor:
        return self.scales[0].to(torch.float32) / self.scales[1].to(torch.float32)

    def extra_repr(self) -> str:
        return f"dims={self.dims}, keepdim={self.keepdim}"

    def twin(self, node) -> nn.Module:
        return OnIntegers(self.forward, [records.get(node.args[0], ActQParams)], records.get(node, ActQParams))

    def to_onnx(self, b, node, inputs):
        """Cast → Sub z_I → ReduceSum (int32) → Cast → Mul s_I/s_O → QuantizeLinear(1, z_O): what
        ``Rounding.ONNXRUNTIME`` computes."""
        name, z_in, z_out = node.name, int(self.zero_points[0]), int(self.zero_points[1])
        wide = b.node("Cast", [inputs[0]], f"{name}_wide", to=b.types.INT32)
        centred = b.node("Sub", [wide, b.constant(f"{name}_z", np.int32(z_in))], f"{name}_centred")
        total = b.node("ReduceSum", [centred, b.constant(f"{name}_axes", b.ints(list(self.dims)))], f"{name}_sum",
                       keepdims=int(self.keepdim))
        real = b.node("Mul", [b.node("Cast", [total], f"{name}_float", to=b.types.FLOAT),
                              b.constant(f"{name}_ratio", self.runtime_ratio().numpy())], f"{name}_scaled")
        return b.quantize(real, ActQParams(1.0, z_out, self.output_bits), name)


class QMean(nn.Module):
    """Integers → integers at the input's parameters: ``z + round(Σ(q − z) / n)`` over ``dims``,
    rounded half away from zero in integers (`fxq.integers.intmath.rounding_divide`), exported as the
    same integer ops, so every runtime gives the same integers."""

    schema = Schema({"dims": dims_schema, "keepdim": sc.one_of(True, False), "bits": sc.act_bits},
                    {"zero_point": torch.int32}, ranges=lambda m: sc.zero_point_fits(m, "zero_point", m.bits))

    def __init__(self, dims: tuple[int, ...], keepdim: bool, qp: ActQParams):
        super().__init__()
        self.dims, self.keepdim, self.bits = dims, keepdim, qp.bits
        self.register_buffer("zero_point", torch.tensor(qp.zero_point, dtype=torch.int32))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if any(d % q.dim() == 0 for d in self.dims):
            raise ValueError(f"this mean runs over dims {self.dims}, not the batch's; got a {q.dim()}-d tensor")
        z = int(self.zero_point)
        count = math.prod(q.shape[d] for d in self.dims)
        total = (q.to(torch.int64) - z).sum(self.dims, keepdim=self.keepdim)
        return (intmath.rounding_divide(total, count) + z).to(q.dtype)

    def extra_repr(self) -> str:
        return f"dims={self.dims}, keepdim={self.keepdim}"

    def twin(self, node) -> nn.Module:
        qp = records.get(node, ActQParams)
        return OnIntegers(self.forward, [qp], qp)

    def to_onnx(self, b, node, inputs):
        """Cast → Sub z → ReduceSum (int32) → |·| + n/2, integer Div by n, the sign back → Add z."""
        name, z = node.name, int(self.zero_point)
        count = math.prod(b.shape_of(node.args[0])[d] for d in self.dims)
        centred = b.node("Sub", [b.node("Cast", [inputs[0]], f"{name}_wide", to=b.types.INT32),
                                 b.constant(f"{name}_z", np.int32(z))], f"{name}_centred")
        total = b.node("ReduceSum", [centred, b.constant(f"{name}_axes", b.ints(list(self.dims)))], f"{name}_sum",
                       keepdims=int(self.keepdim))
        magnitude = b.node("Div", [b.node("Add", [b.node("Abs", [total], f"{name}_abs"),
                                                  b.constant(f"{name}_half", np.int32(count // 2))], f"{name}_nudged"),
                                   b.constant(f"{name}_count", np.int32(count))], f"{name}_magnitude")
        mean = b.node("Mul", [magnitude, b.node("Sign", [total], f"{name}_sign")], f"{name}_mean")
        shifted = b.node("Add", [mean, b.constant(f"{name}_z_out", np.int32(z))], f"{name}_shifted")
        return b.node("Cast", [shifted], name, to=b.types.UINT8)


class QL2Norm(nn.Module):
    """Integers → integers: the Euclidean norm over ``dims`` (ConvNeXt-V2's response norm, over
    the spatial dims): the sum of the squared centred integers in int64 (exact), then its square
    root times ``s_I/s_O``, rounded half to even, in float64 steps every runtime rounds alike."""

    schema = Schema({"dims": dims_schema, "keepdim": sc.one_of(True, False), "input_bits": sc.act_bits,
                     "output_bits": sc.act_bits},
                    {"scales": torch.float64, "zero_points": torch.int32}, ranges=lambda m: m.check_ranges())

    def __init__(self, dims: tuple[int, ...], keepdim: bool, before: ActQParams, after: ActQParams):
        super().__init__()
        self.dims, self.keepdim, self.input_bits, self.output_bits = dims, keepdim, before.bits, after.bits
        hold_parameters(self, before, after)

    def ratio(self) -> torch.Tensor:
        return self.scales[0] / self.scales[1]

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        z_in, z_out = (int(z) for z in self.zero_points)
        centred = q.to(torch.int64) - z_in
        squares = (centred * centred).sum(self.dims, keepdim=self.keepdim)
        scaled = torch.sqrt(squares.to(torch.float64)) * self.ratio()
        out = torch.round(scaled).add_(z_out).clamp_(0, (1 << self.output_bits) - 1)
        return out.to(intmath.storage_dtype(self.output_bits))

    def check_ranges(self) -> None:
        sc.parameters_fit(self, (self.input_bits, self.output_bits))

    def extra_repr(self) -> str:
        return f"L2 norm over dims={self.dims}, keepdim={self.keepdim}"

    def twin(self, node) -> nn.Module:
        return OnIntegers(self.forward, [records.get(node.args[0], ActQParams)], records.get(node, ActQParams))

    def to_onnx(self, b, node, inputs):
        """Cast → Sub z_I → Mul → ReduceSum (int64) → Cast double → Sqrt → Mul s_I/s_O → Round →
        QuantizeLinear(1, z_O): `forward`'s steps."""
        name, z_in, z_out = node.name, int(self.zero_points[0]), int(self.zero_points[1])
        centred = b.node("Sub", [b.node("Cast", [inputs[0]], f"{name}_wide", to=b.types.INT64),
                                 b.constant(f"{name}_z", np.int64(z_in))], f"{name}_centred")
        squares = b.node("ReduceSum", [b.node("Mul", [centred, centred], f"{name}_squares"),
                                       b.constant(f"{name}_axes", b.ints(list(self.dims)))], f"{name}_sum",
                         keepdims=int(self.keepdim))
        root = b.node("Sqrt", [b.node("Cast", [squares], f"{name}_real", to=b.types.DOUBLE)], f"{name}_root")
        scaled = b.node("Mul", [root, b.constant(f"{name}_ratio", self.ratio().numpy())], f"{name}_scaled")
        rounded = b.node("Cast", [b.node("Round", [scaled], f"{name}_rounded")], f"{name}_float", to=b.types.FLOAT)
        return b.quantize(rounded, ActQParams(1.0, z_out, self.output_bits), name)


class QNormalize(QL2Norm):
    """Integers → integers: ``F.normalize(x, p=2, dim)``, each value divided by its vector's
    Euclidean norm (EdgeNeXt's cross-covariance attention normalizes q and k). With v = q − z_I
    the scale cancels: ``y = v / max(√Σv², eps/s_I)``; the int64 sum is exact, then one root, one
    max, one multiply by ``s_O`` per vector and one division per value in float64 — IEEE steps
    every runtime rounds alike."""

    schema = Schema({"dims": dims_schema, "keepdim": sc.one_of(True), "input_bits": sc.act_bits,
                     "output_bits": sc.act_bits},
                    {"scales": torch.float64, "zero_points": torch.int32, "floor": torch.float64},
                    ranges=lambda m: m.check_ranges())

    def __init__(self, dim: int, eps: float, before: ActQParams, after: ActQParams):
        super().__init__((dim,), True, before, after)
        self.register_buffer("floor", torch.tensor(eps / before.scale, dtype=torch.float64))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        z_in, z_out = (int(z) for z in self.zero_points)
        centred = q.to(torch.int64) - z_in
        root = torch.sqrt((centred * centred).sum(self.dims, keepdim=True).to(torch.float64))
        denominator = torch.maximum(root, self.floor) * self.scales[1]
        out = torch.round(centred.to(torch.float64) / denominator).add_(z_out).clamp_(0, (1 << self.output_bits) - 1)
        return out.to(intmath.storage_dtype(self.output_bits))

    def check_ranges(self) -> None:
        super().check_ranges()
        sc.expect(self.floor.dim() == 0 and float(self.floor) > 0 and math.isfinite(float(self.floor)),
                  "eps must be > 0")

    def extra_repr(self) -> str:
        return f"x / ‖x‖ over dim {self.dims[0]}"

    def to_onnx(self, b, node, inputs):
        """Cast → Sub z_I → Mul → ReduceSum (int64) → Cast double → Sqrt → Max floor → Mul s_O →
        Div → Round → QuantizeLinear(1, z_O): `forward`'s steps."""
        name, z_in, z_out = node.name, int(self.zero_points[0]), int(self.zero_points[1])
        centred = b.node("Sub", [b.node("Cast", [inputs[0]], f"{name}_wide", to=b.types.INT64),
                                 b.constant(f"{name}_z", np.int64(z_in))], f"{name}_centred")
        squares = b.node("ReduceSum", [b.node("Mul", [centred, centred], f"{name}_squares"),
                                       b.constant(f"{name}_axes", b.ints(list(self.dims)))], f"{name}_sum", keepdims=1)
        root = b.node("Sqrt", [b.node("Cast", [squares], f"{name}_real", to=b.types.DOUBLE)], f"{name}_root")
        floored = b.node("Max", [root, b.constant(f"{name}_floor", self.floor.numpy())], f"{name}_floored")
        denominator = b.node("Mul", [floored, b.constant(f"{name}_s_out", self.scales[1].numpy())],
                             f"{name}_denominator")
        ratio = b.node("Div", [b.node("Cast", [centred], f"{name}_centred_real", to=b.types.DOUBLE), denominator],
                       f"{name}_ratio")
        rounded = b.node("Cast", [b.node("Round", [ratio], f"{name}_rounded")], f"{name}_float", to=b.types.FLOAT)
        return b.quantize(rounded, ActQParams(1.0, z_out, self.output_bits), name)


_NORMALIZE_ARGUMENTS = (("input", None), ("p", 2.0), ("dim", 1), ("eps", 1e-12), ("out", None))


def _normalize_arguments(node: fx.Node) -> dict | None:
    if len(node.args) > 5 or set(node.kwargs) - {name for name, _ in _NORMALIZE_ARGUMENTS}:
        return None
    return {name: node.args[i] if len(node.args) > i else node.kwargs.get(name, default)
            for i, (name, default) in enumerate(_NORMALIZE_ARGUMENTS)}


def _euclidean_along_a_dim(node: fx.Node, module: nn.Module | None) -> str | None:
    found = _normalize_arguments(node)
    if found and found["p"] in (2, 2.0) and isinstance(found["dim"], int) and found["dim"] != 0 \
            and isinstance(found["eps"], float) and found["eps"] > 0 and found["out"] is None:
        return None
    return "a normalization other than the Euclidean one along a dim (not the batch's) with eps > 0"


def lower_normalize(lo: Lowering, node: fx.Node) -> None:
    """``F.normalize(x, dim=d)`` → ``QNormalize(q)``: exact sums of squares, float64 steps, one rounding."""
    before, after = through(node)
    found = _normalize_arguments(node)
    lo.become(node, QNormalize(found["dim"], found["eps"], before, after), leaf_name(node), node.args[:1])


# each form's (order, dims, keepdim) arguments: position and keyword
_NORM_ARGUMENTS = {"norm": ((1, "p"), (2, "dim"), (3, "keepdim")),
                   torch.norm: ((1, "p"), (2, "dim"), (3, "keepdim")),
                   torch.linalg.vector_norm: ((1, "ord"), (2, "dim"), (3, "keepdim"))}


def _norm_arguments(node: fx.Node) -> tuple[object, object, object]:
    found = [node.args[i] if len(node.args) > i else node.kwargs.get(k, d)
             for (i, k), d in zip(_NORM_ARGUMENTS[node.target], ("fro", None, False))]
    dims = (found[1],) if isinstance(found[1], int) else found[1]
    return found[0], tuple(dims) if isinstance(dims, (tuple, list)) else dims, found[2]


def _euclidean_over_dims(node: fx.Node, module: nn.Module | None) -> str | None:
    order, dims, keepdim = _norm_arguments(node)
    known = {k for _, k in _NORM_ARGUMENTS[node.target]}
    given = isinstance(dims, tuple) and dims and all(isinstance(d, int) and d != 0 for d in dims)
    if order in (2, 2.0, "fro") and given and isinstance(keepdim, bool) and set(node.kwargs) <= known:
        return None
    return "a norm other than the Euclidean one over given dims (or with a dtype)"


def lower_l2_norm(lo: Lowering, node: fx.Node) -> None:
    """``x.norm(p=2, dim)`` → ``QL2Norm(q)``: int64 sums of squares, a float64 root, one rounding."""
    before, after = through(node)
    _, dims, keepdim = _norm_arguments(node)
    lo.become(node, QL2Norm(dims, keepdim, before, after), leaf_name(node), node.args[:1])


def dims_of(node: fx.Node) -> tuple[object, object]:
    """``(dims, keepdim)`` of a sum or mean call, dims as a tuple where given as ints."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return ((dims,) if isinstance(dims, int) else tuple(dims) if isinstance(dims, list) else dims), keepdim


def reduces_given_dims(node: fx.Node, but_the_batch: bool) -> bool:
    dims, keepdim = dims_of(node)
    return (isinstance(dims, tuple) and bool(dims) and all(isinstance(d, int) and (d or not but_the_batch)
                                                           for d in dims)
            and isinstance(keepdim, bool) and set(node.kwargs) <= {"dim", "keepdim"})


def _over_dims_but_the_batch(node: fx.Node, module: nn.Module | None) -> str | None:
    return None if reduces_given_dims(node, True) else "a mean over every value, over the batch, or with a dtype"


def lower_mean(lo: Lowering, node: fx.Node) -> None:
    """``x.mean(dims)`` → ``QMean(q)``: integer sums, one rounding division, same parameters."""
    qp = qparams_of(node.args[0], node)
    dims, keepdim = dims_of(node)
    lo.become(node, QMean(dims, keepdim, qp), leaf_name(node), node.args[:1])
    records.put(node, qp)


def _over_given_dims(node: fx.Node, module: nn.Module | None) -> str | None:
    if reduces_given_dims(node, False):
        return None
    return "a sum over every element, or with a dtype (the integer form sums given dims)"


def lower_sum(lo: Lowering, node: fx.Node) -> None:
    """``x.sum(dim)`` → ``QSum(q)``: int sums, one requantization to the sum's parameters."""
    before, after = through(node)
    dims, keepdim = dims_of(node)
    lo.become(node, QSum(dims, keepdim, before, after, lo.rounding), leaf_name(node), node.args[:1])


SUM = Op("sum", "int sums of the centred integers over given dims, requantized once", lower_sum, Output.OWN,
         functions=(torch.sum,), methods=("sum",), accepts=_over_given_dims, integer_modules=(QSum,),
         example=lambda: lambda x: x.sum(dim=1, keepdim=True))
MEAN = Op("mean_over_dims", "integer sums over any dims but the batch's, one rounding division, same parameters",
          lower_mean, Output.SAME, functions=(torch.mean,), methods=("mean",), accepts=_over_dims_but_the_batch,
          integer_modules=(QMean,), homogeneous=True, channelwise=False,
          example=lambda: lambda x: x.mean(1, keepdim=True))
L2_NORM = Op("l2_norm", "the Euclidean norm over given dims: int64 sums of squares, a float64 root, one rounding",
             lower_l2_norm, Output.OWN, functions=(torch.norm, torch.linalg.vector_norm), methods=("norm",),
             accepts=_euclidean_over_dims, integer_modules=(QL2Norm,),
             example=lambda: lambda x: x.norm(p=2, dim=(2, 3), keepdim=True))
NORMALIZE = Op("normalize", "each vector over a dim divided by its Euclidean norm: int64 sums of squares, float64 "
               "root and division, one rounding", lower_normalize, Output.OWN, functions=(F.normalize,),
               accepts=_euclidean_along_a_dim, integer_modules=(QNormalize,),
               example=lambda: lambda x: F.normalize(x, dim=-1))
OPS = (SUM, MEAN, L2_NORM, NORMALIZE)
