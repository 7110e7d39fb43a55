"""Normalizations on integers: by each sample's own statistics, group norm (BiT, PoolFormer) and
layer norm (ConvNeXt over channels, MobileViT over tokens); by running statistics, a batch norm
over ``[N, C]`` or ``[N, C, L]`` (RepViT's head) that no layer absorbs, one table per channel.

    x = s_I·(q − z_I)                                        per group: n values, S1 = Σ(q − z_I), S2 = Σ(q − z_I)²
    (x − μ)/√(σ² + ε) = (n·(q − z_I) − S1) / √(n·S2 − S1² + ε·n²/s_I²)
    O_q = clamp(z_O + round(γ_c/s_O · that + β_c/s_O))

The statistics are exact integer sums (int64). What follows them — one square root per group,
a division per channel, a multiply and an add per value — is float64 arithmetic, which every
runtime rounds identically operation by operation (IEEE 754), so the exported graph computes
the very same integers.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxq.files import schema as sc
from fxq.files.schema import Schema
from fxq.graphs import records
from fxq.graphs.graph import attribute
from fxq.graphs.twin import OnIntegers
from fxq.integers.affine import ActQParams
from fxq.integers.intmath import storage_dtype
from fxq.ops.activations import QChannelLookup
from fxq.ops.base import KeepInFloat, Lowering, Op, Output, hold_parameters, leaf_name, qparams_of, through

KINDS = ("group", "layer")


class QNorm(nn.Module):
    """Integers → integers: a group norm (``groups`` groups of channels, dim 1) or a layer norm
    (over the trailing dims of ``normalized_shape``) with its affine per channel folded into
    ``gain = γ/s_O`` and ``offset = β/s_O``.

    Both are computed on a 4-d view ``[A, G, C', R]`` whose last two dims are one group: a group
    norm views ``[N, C, ...]`` as ``[N, G, C/G, rest]``, a layer norm ``[..., M]`` as
    ``[positions, 1, 1, M]``; ``gain`` and ``offset`` are shaped to broadcast over it.
    """

    schema = Schema({"kind": sc.one_of(*KINDS), "groups": sc.int_at_least(1),
                     "normalized_shape": lambda v: isinstance(v, tuple) and len(v) <= 8 and all(
                         sc.is_int(d) and d >= 1 for d in v),
                     "input_bits": sc.act_bits, "output_bits": sc.act_bits},
                    {"gain": torch.float64, "offset": torch.float64, "eps_ratio": torch.float64,
                     "scales": torch.float64, "zero_points": torch.int32},
                    ranges=lambda m: m.check_ranges())

    def __init__(self, kind: str, groups: int, normalized_shape: tuple[int, ...], weight: torch.Tensor,
                 bias: torch.Tensor, eps: float, before: ActQParams, after: ActQParams):
        super().__init__()
        self.kind, self.groups, self.normalized_shape = kind, groups, tuple(normalized_shape)
        self.input_bits, self.output_bits = before.bits, after.bits
        real = weight.detach().to(torch.float64).flatten(), bias.detach().to(torch.float64).flatten()
        self.register_buffer("gain", real[0] / after.scale)
        self.register_buffer("offset", real[1] / after.scale)
        self.register_buffer("eps_ratio", torch.tensor(eps / before.scale**2, dtype=torch.float64))
        hold_parameters(self, before, after)

    def view(self) -> list[int]:
        """The ``[A, G, C', R]`` view as a reshape target (−1: follows from the input)."""
        if self.kind == "group":
            return [0, self.groups, self.gain.numel() // self.groups, -1]
        return [-1, 1, 1, self.gain.numel()]

    def affine_shape(self) -> tuple[int, ...]:
        return (self.groups, self.gain.numel() // self.groups, 1) if self.kind == "group" else (1, 1, -1)

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "group":
            return x.reshape(x.shape[0], self.groups, x.shape[1] // self.groups, -1)
        return x.reshape(-1, 1, 1, self.gain.numel())

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        z_in, z_out = (int(z) for z in self.zero_points)
        v = self.grouped(q.to(torch.int64) - z_in)
        n = v.shape[2] * v.shape[3]
        if n * n << (2 * self.input_bits) >= 1 << 62:
            raise ValueError(f"a group of {n} values at {self.input_bits} bits overflows the int64 statistics "
                             "(n²·2^(2b) ≥ 2^62): keep this norm in float with overrides, or use 8-bit activations")
        s1 = v.sum((2, 3), keepdim=True)
        s2 = (v * v).sum((2, 3), keepdim=True)
        spread = torch.sqrt((n * s2 - s1 * s1).to(torch.float64) + float(n * n) * self.eps_ratio)
        multiplier = self.gain.reshape(self.affine_shape()) / spread
        y = (n * v - s1).to(torch.float64) * multiplier + self.offset.reshape(self.affine_shape())
        out = torch.round(y).add_(z_out).clamp_(0, (1 << self.output_bits) - 1)
        return out.to(storage_dtype(self.output_bits)).reshape(q.shape)

    def check_ranges(self) -> None:
        channels = self.gain.numel()
        sc.expect(self.gain.dim() == 1 and self.offset.shape == self.gain.shape and channels >= 1,
                  "gain and offset must be one number per channel")
        sc.expect(channels % self.groups == 0, "the channels must split into the groups")
        sc.expect(self.kind == "group" or math.prod(self.normalized_shape) == channels,
                  "a layer norm's gain must cover its normalized shape")
        sc.expect(bool(torch.isfinite(self.gain).all() and torch.isfinite(self.offset).all()),
                  "gain and offset must be finite")
        sc.expect(self.eps_ratio.dim() == 0 and float(self.eps_ratio) > 0 and math.isfinite(float(self.eps_ratio)),
                  "eps must be > 0")
        sc.parameters_fit(self, (self.input_bits, self.output_bits))

    def extra_repr(self) -> str:
        over = f"{self.groups} groups" if self.kind == "group" else f"over {self.normalized_shape}"
        return f"{self.kind} norm {over}, integer statistics"

    def twin(self, node) -> nn.Module:
        return OnIntegers(self.forward, [records.get(node.args[0], ActQParams)], records.get(node, ActQParams))

    def to_onnx(self, b, node, inputs):
        """Cast → Sub z_I → Reshape to the group view → int64 ReduceSums of v and v² → the float64
        steps as `forward` orders them → Round → QuantizeLinear(1, z_O) → Reshape back."""
        name, z_in, z_out = node.name, int(self.zero_points[0]), int(self.zero_points[1])

        def const(key: str, value) -> str:
            return b.constant(f"{name}_{key}", value)

        def op(kind: str, args: list[str], key: str, **attributes) -> str:
            return b.node(kind, args, f"{name}_{key}", **attributes)

        wide = op("Sub", [op("Cast", [inputs[0]], "wide", to=b.types.INT64), const("z", np.int64(z_in))], "centred")
        v = op("Reshape", [wide, const("view", b.ints(self.view()))], "grouped")
        axes = const("axes", b.ints([2, 3]))
        s1 = op("ReduceSum", [v, axes], "s1", keepdims=1)
        s2 = op("ReduceSum", [op("Mul", [v, v], "squares"), axes], "s2", keepdims=1)
        n = op("ReduceProd", [op("Shape", [v], "group_shape", start=2), const("size_axes", b.ints([0]))], "n",
               keepdims=1)
        spread_sq = op("Sub", [op("Mul", [n, s2], "n_s2"), op("Mul", [s1, s1], "s1_s1")], "spread_sq")
        eps = op("Mul", [op("Cast", [op("Mul", [n, n], "n_n")], "n_n_real", to=b.types.DOUBLE),
                         const("eps_ratio", self.eps_ratio.numpy())], "eps")
        spread = op("Sqrt", [op("Add", [op("Cast", [spread_sq], "spread_sq_real", to=b.types.DOUBLE), eps],
                                "variance")], "spread")
        shape = self.affine_shape()
        multiplier = op("Div", [const("gain", self.gain.reshape(shape).numpy()), spread], "multiplier")
        numerator = op("Cast", [op("Sub", [op("Mul", [v, n], "n_v"), s1], "numerator")], "numerator_real",
                       to=b.types.DOUBLE)
        offset = const("offset", self.offset.reshape(shape).numpy())
        y = op("Add", [op("Mul", [numerator, multiplier], "scaled"), offset], "shifted")
        rounded = op("Cast", [op("Round", [y], "rounded")], "rounded_float", to=b.types.FLOAT)
        out = b.quantize(rounded, ActQParams(1.0, z_out, self.output_bits), name)
        return op("Reshape", [out, op("Shape", [inputs[0]], "input_shape")], "restored")


def _argument(node: fx.Node, index: int, key: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(key, default)


# where each function takes its arguments: (position of its size argument, weight, bias, eps)
_POSITIONS = {F.group_norm: (1, 2, 3, 4), F.layer_norm: (1, 2, 3, 4)}
_SIZE_KEY = {F.group_norm: "num_groups", F.layer_norm: "normalized_shape"}


def _parts(node: fx.Node, module: nn.Module | None) -> tuple:
    """(kind, groups or normalized shape, weight node or tensor, bias, eps) of the call."""
    if module is not None:
        if isinstance(module, nn.GroupNorm):
            return "group", module.num_groups, module.weight, module.bias, module.eps
        return "layer", tuple(module.normalized_shape), module.weight, module.bias, module.eps
    size_at, weight_at, bias_at, eps_at = _POSITIONS[node.target]
    kind = "group" if node.target is F.group_norm else "layer"
    size = _argument(node, size_at, _SIZE_KEY[node.target])
    size = (size,) if kind == "layer" and isinstance(size, int) else size
    return (kind, tuple(size) if isinstance(size, list) else size, _argument(node, weight_at, "weight"),
            _argument(node, bias_at, "bias"), _argument(node, eps_at, "eps", 1e-5))


def _constant(value) -> bool:
    return value is None or isinstance(value, torch.Tensor) or (isinstance(value, fx.Node) and value.op == "get_attr")


def _accepts(node: fx.Node, module: nn.Module | None) -> str | None:
    if module is None and node.target not in _POSITIONS:
        return "not a norm fxq knows"
    kind, size, weight, bias, eps = _parts(node, module)
    if not (_constant(weight) and _constant(bias)):
        return "a norm whose weight or bias is computed"
    if not (isinstance(eps, float) and eps > 0):
        return "a norm with eps = 0 (a constant group would divide by zero)"
    sized = sc.is_int(size) if kind == "group" else (isinstance(size, tuple) and all(sc.is_int(d) for d in size))
    return None if sized else "a norm whose groups or normalized shape are computed"


def _tensor(lo: Lowering, value, like: int, fill: float) -> torch.Tensor:
    if value is None:
        return torch.full((like,), fill, dtype=torch.float64)
    return attribute(lo.gm, value.target) if isinstance(value, fx.Node) else value


def lower_norm(lo: Lowering, node: fx.Node) -> None:
    """``group_norm``/``layer_norm`` → ``QNorm(q)``: integer statistics per group, the affine
    and output scale folded into one float64 multiplier per (sample, channel)."""
    before, after = through(node)
    kind, size, weight, bias, eps = _parts(node, lo.module(node))
    channels = _channels(node, kind, size, weight)
    weight, bias = _tensor(lo, weight, channels, 1.0), _tensor(lo, bias, channels, 0.0)
    if weight.numel() != channels or bias.numel() != channels:
        raise KeepInFloat("its weight or bias does not have one number per channel")
    groups, normalized = (size, ()) if kind == "group" else (1, size)
    norm = QNorm(kind, groups, normalized, weight, bias, eps, before, after)
    lo.become(node, norm, leaf_name(node), node.args[:1])


def _channels(node: fx.Node, kind: str, size, weight) -> int:
    if kind == "layer":
        return math.prod(size)
    shape = getattr(records.get(node, records.SampleShape), "shape", None)
    if shape is not None:
        return shape[0]
    if isinstance(weight, (torch.Tensor, nn.Parameter)):
        return weight.numel()
    raise KeepInFloat("its number of channels is unknown")


def _running_statistics(node: fx.Node, module: nn.Module | None) -> str | None:
    if module.training or not module.track_running_stats or module.running_mean is None:
        return "a batch norm with batch statistics (no fixed affine form)"
    return None


def lower_batch_norm(lo: Lowering, node: fx.Node) -> None:
    """``BatchNorm1d(x)`` → ``QChannelLookup(q)``: per channel c (dim 1), the table of
    ``quantize_out(f_c·x + t_c)`` with ``f = γ/√(var + ε)``, ``t = β − f·mean``."""
    norm, source = lo.module(node), node.args[0]
    before, after = qparams_of(source, node), records.get(node, ActQParams)
    if after is None:
        raise KeepInFloat("its output was never a float tensor during calibration")
    mean, var = norm.running_mean.detach().double(), norm.running_var.detach().double()
    gamma = norm.weight.detach().double() if norm.affine else torch.ones_like(mean)
    beta = norm.bias.detach().double() if norm.affine else torch.zeros_like(mean)
    factor = gamma / torch.sqrt(var + norm.eps)
    shift = beta - factor * mean

    def affine(x: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
        index = channel.long()  # the table's constant is the channel's index
        return factor[index] * x + shift[index]

    channels = torch.arange(mean.numel(), dtype=torch.float64)
    lo.become(node, QChannelLookup(affine, "batch norm", channels, before, after), leaf_name(node), (source,))


GROUP_NORM = Op("group_norm", "integer statistics per sample and group, one float64 multiplier per channel",
                lower_norm, Output.OWN, modules=(nn.GroupNorm,), functions=(F.group_norm,), accepts=_accepts,
                integer_modules=(QNorm,), example=lambda: nn.GroupNorm(2, 4))
LAYER_NORM = Op("layer_norm", "integer statistics per position, one float64 multiplier per channel",
                lower_norm, Output.OWN, modules=(nn.LayerNorm,), functions=(F.layer_norm,), accepts=_accepts,
                integer_modules=(QNorm,), example=lambda: nn.LayerNorm(8))
BATCH_NORM_1D = Op("batch_norm1d", "a batch norm no layer absorbs: one lookup table per channel",
                   lower_batch_norm, Output.OWN, modules=(nn.BatchNorm1d,), accepts=_running_statistics,
                   integer_modules=(QChannelLookup,), channelwise=True,
                   example=lambda: nn.Sequential(nn.Flatten(2), _settled(nn.BatchNorm1d(4))))


def _settled(norm: nn.BatchNorm1d) -> nn.BatchNorm1d:
    """A batch norm with statistics of its own (not the identity's), in eval mode."""
    with torch.no_grad():
        norm.running_mean.copy_(torch.linspace(-1, 1, norm.num_features))
        norm.running_var.copy_(torch.linspace(0.5, 2, norm.num_features))
        norm.weight.copy_(torch.linspace(-1, 2, norm.num_features))
    return norm.eval()


OPS = (GROUP_NORM, LAYER_NORM, BATCH_NORM_1D)
