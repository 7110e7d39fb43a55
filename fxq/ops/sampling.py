"""Sampling an image at points a tensor gives (``F.grid_sample``: deformable attention, spatial
transformers) on integers, at the image's scale and zero point.

Each output is a weighted sum of at most two neighbours per axis, whose positions and weights
depend only on the grid's integer along that axis: both are tables over the grid's ``2^bits``
integers, made from torch's own sampling of unit impulses (so every padding mode and
``align_corners`` reads as torch reads it), weights in fixed point. The image's centred integers
are gathered, summed exactly in int64 and rounded once: at most one step from torch's float
sampling of the values, and the same integers in torch and onnxruntime."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxq.files import schema as sc
from fxq.files.schema import Schema
from fxq.graphs import records
from fxq.graphs.twin import OnIntegers
from fxq.integers.affine import ActQParams, storage_dtype
from fxq.ops.base import KeepInFloat, Lowering, Op, Output, call_arguments, leaf_name, qparams_of

WEIGHT_BITS = 16  # each axis's weight; a corner's product has 32 fractional bits, sums stay below 2^53
NEIGHBOURS = 2  # per axis: bilinear reads two, nearest one (its second weight is 0)


class QGridSample(nn.Module):
    """(image integers ``[N, C, H, W]``, grid integers ``[N, H_out, W_out, 2]``) → image integers
    ``[N, C, H_out, W_out]``: ``F.grid_sample`` (bilinear or nearest; zeros, border or
    reflection padding; either ``align_corners``) with the grid's values ``s_g·(g − z_g)``.

    A point's output is ``Σ w_x·w_y·(q − z)`` over its neighbours, ``w`` from each axis's table
    (``2^16 ×`` torch's weight, rounded), divided by ``2^32``, rounded half to even and the zero
    point added back. Zeros padding reads real 0, the zero point, outside the image."""

    schema = Schema({"mode": sc.one_of("bilinear", "nearest"),
                     "padding_mode": sc.one_of("zeros", "border", "reflection"),
                     "align_corners": sc.one_of(True, False), "zero_point": sc.int_at_least(0),
                     "bits": sc.int_at_least(2), "grid_scale": sc.finite_float,
                     "grid_zero_point": sc.int_at_least(0), "grid_bits": sc.int_at_least(2)}, {})

    def __init__(self, mode: str, padding_mode: str, align_corners: bool, zero_point: int, bits: int,
                 grid_scale: float, grid_zero_point: int, grid_bits: int):
        super().__init__()
        self.mode, self.padding_mode, self.align_corners = mode, padding_mode, align_corners
        self.zero_point, self.bits = zero_point, bits
        self.grid_scale, self.grid_zero_point, self.grid_bits = grid_scale, grid_zero_point, grid_bits

    def tables(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For an axis of ``size`` pixels: ``(positions, weights)``, int64 ``[2^grid_bits, 2]``: the
        pixels a grid integer reads along the axis and their fixed-point weights (0 where a
        neighbour lies outside the image or is not read)."""
        grid = (torch.arange(1 << self.grid_bits, dtype=torch.float64) - self.grid_zero_point) * self.grid_scale
        points = torch.stack([grid, torch.zeros_like(grid)], -1)[None, None]  # x along the axis, y at the row
        impulses = torch.eye(size, dtype=torch.float64)[None, :, None, :]  # channel k: 1 at pixel k
        sampled = F.grid_sample(impulses, points, self.mode, self.padding_mode, self.align_corners)
        weights = torch.round(sampled[0, :, 0, :].T * (1 << WEIGHT_BITS)).to(torch.int64)  # [2^bits, size]
        read, positions = weights.topk(min(NEIGHBOURS, size), dim=1, sorted=False)
        if size < NEIGHBOURS:
            read, positions = F.pad(read, (0, 1)), F.pad(positions, (0, 1))
        return positions, read

    def forward(self, q: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        n, channels, height, width = q.shape
        centred = (q.to(torch.int64) - self.zero_point).reshape(n, channels, height * width)
        g = grid.to(torch.int64).reshape(n, 1, -1, 2)
        (x_at, x_weight), (y_at, y_weight) = self.tables(width), self.tables(height)
        sums = torch.zeros(n, channels, g.shape[2], dtype=torch.int64)
        for i in range(NEIGHBOURS):
            for j in range(NEIGHBOURS):
                index = y_at[g[..., 1], j] * width + x_at[g[..., 0], i]
                weight = y_weight[g[..., 1], j] * x_weight[g[..., 0], i]
                sums += torch.gather(centred, 2, index.expand(n, channels, -1)) * weight
        out = torch.round(sums.to(torch.float64) / (1 << 2 * WEIGHT_BITS)) + self.zero_point
        out = out.clamp_(0, (1 << self.bits) - 1).to(storage_dtype(self.bits))
        return out.reshape(n, channels, *grid.shape[1:3])

    def extra_repr(self) -> str:
        return f"mode={self.mode}, padding_mode={self.padding_mode}, align_corners={self.align_corners}"

    def twin(self, node) -> nn.Module:
        value, grid = (records.get(a, ActQParams) for a in node.args)
        return OnIntegers(self.forward, [value, grid], value)

    def to_onnx(self, b, node, inputs):
        """Each axis's tables Gathered by the grid's integers, each corner's pixels by
        GatherElements, int64 Mul/Add of the centred integers, then `forward`'s rounding:
        Cast double → Mul 2^−32 → Round → QuantizeLinear(1, z)."""
        name = node.name
        height, width = b.shape_of(node.args[0])[-2:]
        out_height, out_width = b.shape_of(node)[-2:]
        flat = b.node("Reshape", [b.as_index(inputs[0], f"{name}_image"),
                                  b.constant(f"{name}_flat", b.ints([0, 0, height * width]))], f"{name}_flat")
        centred = b.node("Sub", [flat, b.constant(f"{name}_z", np.int64(self.zero_point))], f"{name}_centred")
        points = b.constant(f"{name}_points", b.ints([0, 1, -1, 2]))
        grid = b.node("Reshape", [b.as_index(inputs[1], f"{name}_grid"), points], f"{name}_points")
        along = [b.node("Gather", [grid, b.constant(f"{name}_axis{a}", np.int64(a))], f"{name}_g{a}", axis=3)
                 for a in (0, 1)]
        per_axis = [self._looked_up(b, f"{name}_x", self.tables(width), along[0]),
                    self._looked_up(b, f"{name}_y", self.tables(height), along[1])]
        channels = b.constant(f"{name}_channels", b.ints([1, b.shape_of(node)[1], 1]))
        sums = None
        for (x_at, x_weight) in per_axis[0]:
            for (y_at, y_weight) in per_axis[1]:
                row = b.node("Mul", [y_at, b.constant(f"{name}_width", np.int64(width))], f"{name}_row")
                index = b.node("Expand", [b.node("Add", [row, x_at], f"{name}_at"), channels], f"{name}_index")
                pixels = b.node("GatherElements", [centred, index], f"{name}_pixels", axis=2)
                weight = b.node("Mul", [y_weight, x_weight], f"{name}_weight")
                term = b.node("Mul", [pixels, weight], f"{name}_term")
                sums = term if sums is None else b.node("Add", [sums, term], f"{name}_sums")
        real = b.node("Cast", [sums], f"{name}_real", to=b.types.DOUBLE)
        scaled = b.node("Mul", [real, b.constant(f"{name}_unit", np.float64(2.0 ** (-2 * WEIGHT_BITS)))],
                        f"{name}_scaled")
        rounded = b.node("Cast", [b.node("Round", [scaled], f"{name}_rounded")], f"{name}_float", to=b.types.FLOAT)
        shaped = b.node("Reshape", [rounded, b.constant(f"{name}_shape", b.ints([0, 0, out_height, out_width]))],
                        f"{name}_shaped")
        return b.quantize(shaped, ActQParams(1.0, self.zero_point, self.bits), name)

    @staticmethod
    def _looked_up(b, name: str, tables: tuple[torch.Tensor, torch.Tensor], grid: str) -> list[tuple[str, str]]:
        """Each neighbour's (pixel, weight) along one axis for every point: Gathers of the tables."""
        positions, weights = tables
        return [tuple(b.node("Gather", [b.constant(f"{name}{k}_{what}", table[:, k].contiguous()), grid],
                             f"{name}{k}_{what}") for what, table in (("at", positions), ("weight", weights)))
                for k in range(NEIGHBOURS)]


_SAMPLING = ("grid", "mode", "padding_mode", "align_corners")
_DEFAULTS = {"mode": "bilinear", "padding_mode": "zeros", "align_corners": False}


def _samplable(node: fx.Node, module: nn.Module | None) -> str | None:
    a = call_arguments(node, _SAMPLING, _DEFAULTS)
    if a["mode"] not in ("bilinear", "nearest"):
        return f"{a['mode']} sampling (the integer forms: bilinear, nearest)"
    if any(isinstance(v, fx.Node) for k, v in a.items() if k != "grid"):
        return "sampling whose mode is computed while the model runs"
    return None


def lower_grid_sample(lo: Lowering, node: fx.Node) -> None:
    """``F.grid_sample(x, grid)`` → ``QGridSample(q, g)``: table lookups, exact sums, one rounding."""
    a = call_arguments(node, _SAMPLING, _DEFAULTS)
    value, grid = qparams_of(node.args[0], node), qparams_of(a["grid"], node)
    shape = getattr(records.get(node.args[0], records.SampleShape), "shape", None)
    if shape is not None and len(shape) != 3:
        raise KeepInFloat("samples a volume (a 5-D input); the integer form samples images")
    sample = QGridSample(a["mode"], a["padding_mode"], bool(a["align_corners"]), value.zero_point, value.bits,
                         grid.scale, grid.zero_point, grid.bits)
    lo.become(node, sample, leaf_name(node), (node.args[0], a["grid"]))
    records.put(node, value)


GRID_SAMPLE = Op("grid_sample", "sampling at a grid's points: tables of neighbours and fixed-point weights "
                 "per grid integer, exact sums, one rounding; same scale", lower_grid_sample, Output.SAME,
                 functions=(F.grid_sample,), accepts=_samplable, integer_modules=(QGridSample,),
                 example=lambda: lambda h: F.grid_sample(h, torch.tanh(h[:, :2].permute(0, 2, 3, 1)),
                                                         align_corners=False))
OPS = (GRID_SAMPLE,)
