"""`QLayer`, what a conv and a linear share on integers: formula (1), the accumulator, by the
fastest exact backend (`fxq.integers.gemm`), and formula (2), the requantization; its saved form and its
ONNX form. `fxq.ops.layers` holds the conv and the linear themselves and their registry entries."""
from __future__ import annotations

import functools

import torch
from torch import nn

from fxq.config import Rounding
from fxq.deployment.saturation import WeightFormat
from fxq.files import schema as sc
from fxq.graphs.qmodules import Derived, NotRepresentable
from fxq.graphs.records import QuantizedWeight
from fxq.graphs.twin import FloatLayer
from fxq.integers import affine, gemm, intmath
from fxq.integers.affine import ActQParams

BIAS_LIMIT = 2**30  # |b_q| at most this, so int32 keeps room for the weighted sum beside it


class QLayer(Derived):
    """A conv or linear layer as formulas (1) and (2) of `fxq.integers.intmath`.

    Buffers: ``weight`` int8, ``bias`` int32 (scale s_in·s_w), ``multiplier`` int32 and ``shift``
    int8 per output channel, the scales they came from (float64, for reports), and both zero points.

    A channel whose bias would pass ``BIAS_LIMIT`` at ``s_I·s_W[c]`` (a near-dead channel: batch
    norm's γ ≈ 0 leaves weights ~0 beside a real bias) gets the weight scale that brings the bias to
    the limit; its weights, negligible beside the bias, round on that coarser grid. A multiplier
    that cannot move the channel's output is stored as 0 (`intmath.fixed_point`): exact.
    """

    def __init__(self, layer: nn.Module, weights: QuantizedWeight, input_qp: ActQParams,
                 output_qp: ActQParams, name: str, rounding: Rounding = Rounding.FIXED_POINT):
        super().__init__()
        self.requantize_as = Rounding(rounding)
        weight_q, weight_scale = _fit_bias(layer, weights, input_qp.scale)
        bias_q = affine.quantize_bias(layer.bias, input_qp.scale, weight_scale)
        self.input_bits, self.output_bits = input_qp.bits, output_qp.bits
        bounds = intmath.accumulator_bounds(weight_q, _absmax(input_qp), bias_q)
        bound = int(bounds.max())
        if input_qp.bits <= 8 and (bound > intmath.INT32_MAX
                                   or 128 * 127 * weight_q[0].numel() > intmath.INT32_MAX):
            raise NotRepresentable(f"{name}: the worst-case accumulator {bound} (K = "
                             f"{weight_q[0].numel()}) does not fit the int32 GEMM; lower weight_bits "
                             "for this layer, or use 16-bit activations (an int64 accumulator)")
        if bound >= intmath.FLOAT64_EXACT:
            raise NotRepresentable(f"{name}: the worst-case accumulator {bound} is beyond "
                             "2^53, where the 16-bit path is no longer exact; lower weight_bits")
        real_multiplier = input_qp.scale * weight_scale / output_qp.scale
        multiplier, shift = _layer_multipliers(real_multiplier, bounds, output_qp, name)
        self.register_buffer("weight", weight_q)
        self.register_buffer("bias", bias_q)
        self.register_buffer("multiplier", multiplier.to(torch.int32))
        self.register_buffer("shift", shift.to(torch.int8))
        self.register_buffer("weight_scale", weight_scale.to(torch.float64))
        self.register_buffer("input_scale", torch.tensor(input_qp.scale, dtype=torch.float64))
        self.register_buffer("output_scale", torch.tensor(output_qp.scale, dtype=torch.float64))
        self.register_buffer("input_zero_point", torch.tensor(input_qp.zero_point, dtype=torch.int32))
        self.register_buffer("output_zero_point", torch.tensor(output_qp.zero_point, dtype=torch.int32))
        self.prepare()

    @property
    def wide(self) -> bool:
        """16-bit input: float64-exact GEMM on centred columns, int64 accumulator."""
        return self.input_bits > 8

    groups = 1
    weight_dims = 2  # [C_out, K]; a conv's is [C_out, C_in / groups, k_h, k_w]
    kind = "linear"  # how reports name it
    operation = "GEMM"  # its float kernel, as reports name it

    def prepare(self) -> None:
        """The int8 GEMM's weight and constant (one per group: ``[groups, K, C_out / groups]``), the
        worst-case accumulator, the float32 chunks and onnxruntime's float32 multipliers, derived
        from the buffers (not saved)."""
        self.register_buffer("runtime_multiplier", intmath.runtime_multiplier(
            self.input_scale, self.weight_scale, self.output_scale), persistent=False)
        absmax = _absmax(self.input_qparams)
        self.accumulator_bound = intmath.accumulator_bound(self.weight, absmax, self.bias)
        self.accumulator_bits = 32 if self.accumulator_bound <= intmath.INT32_MAX else 64
        self.float32_chunks = None if self.wide else gemm.float32_chunks(self.weight, absmax)
        self._float_weights = {}
        self.backend = None  # the backend of the last call (`fxq.integers.gemm`)
        if self.wide:  # 16-bit inputs accumulate in float64 only
            self.register_buffer("gemm_weight", None, persistent=False)
            self.register_buffer("gemm_constant", None, persistent=False)
            return
        weights, constants = zip(*(intmath.gemm_operands(w, int(self.input_zero_point), b) for w, b
                                   in zip(self.weight.chunk(self.groups), self.bias.chunk(self.groups))))
        self.register_buffer("gemm_weight", torch.stack(weights), persistent=False)
        self.register_buffer("gemm_constant", torch.cat(constants), persistent=False)

    @property
    def input_qparams(self) -> ActQParams:
        return ActQParams(float(self.input_scale), int(self.input_zero_point), self.input_bits)

    @property
    def output_qparams(self) -> ActQParams:
        return ActQParams(float(self.output_scale), int(self.output_zero_point), self.output_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc, positions = self.accumulator(x)
        return self.to_output(self.requantize(acc), positions)

    def accumulator(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Formula (1): the accumulator ``[positions, C_out]`` (int32; int64 when wide), bias
        included, and the shape of ``positions``, by the backend `fxq.integers.gemm` chooses for this shape
        (every backend gives the same integers)."""
        candidates = {b: functools.partial(self.accumulate_by, b, x[:1]) for b in self.backends()}
        self.backend = gemm.choose(self._shape_key(x), x.device, candidates)
        return self.accumulate_by(self.backend, x)

    def backends(self) -> list[gemm.Backend]:
        """The exact ways this layer can accumulate; a 16-bit input only in float64."""
        if self.wide:
            return [gemm.Backend.FLOAT64]
        return [gemm.Backend.INTEGER] + [gemm.Backend.FLOAT32] * (self.float32_chunks is not None) + [
            gemm.Backend.FLOAT64]

    def accumulate_by(self, backend: gemm.Backend, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Formula (1) by one named backend."""
        if backend is gemm.Backend.INTEGER:
            return self.integer_accumulator(x)
        return self.float_accumulator(x, torch.float32 if backend is gemm.Backend.FLOAT32 else torch.float64)

    def _shape_key(self, x: torch.Tensor) -> tuple:
        geometry = tuple(getattr(self, a, None) for a in ("stride", "padding", "dilation"))
        return (type(self).__name__, tuple(self.weight.shape), geometry, self.groups, self.wide,
                len(self.float32_chunks or ()), tuple(x.shape[1:]), x.device.type)

    def integer_accumulator(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Formula (1) as int8 GEMMs on im2col columns, one per group."""
        columns, positions = self.columns(x)
        return self.accumulate(columns), positions

    def accumulate(self, columns: torch.Tensor) -> torch.Tensor:
        """Formula (1) on int8 im2col columns ``[positions, K·groups]``, one GEMM per group."""
        if self.groups == 1:
            return intmath.accumulate(columns, self.gemm_weight[0], self.gemm_constant)
        blocks = intmath.group_columns(columns, self.groups, self.weight.shape[1])
        out = [intmath.accumulate(block, weight, constant) for block, weight, constant
               in zip(blocks, self.gemm_weight, self.gemm_constant.chunk(self.groups))]
        return torch.cat(out, 1)

    def float_accumulator(self, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Formula (1) by float convs/GEMMs on ``I_q − z``: in float32 one per chunk of input
        channels (`gemm.float32_chunks`: each exact), added in int32; in float64 one."""
        parts = self._float_parts(dtype, x.device)
        whole = len(parts) == 1
        bias = self._float_bias(dtype) if whole else None  # exact inside the op: |b| is in the bound
        centred = x.to(dtype).sub_(int(self.input_zero_point))
        acc_dtype = torch.int64 if self.wide else torch.int32
        acc = positions = None
        for (start, end), weight in parts:
            part = centred if whole else self.input_slice(centred, start, end)
            y, positions = self.as_positions(gemm.exact_float(self.float_op, part, weight, bias))
            acc = y.to(acc_dtype) if acc is None else acc.add_(y.to(acc_dtype))
        if bias is None:
            acc.add_(self.bias.to(acc_dtype))
        return acc, positions

    def _float_parts(self, dtype: torch.dtype, device: torch.device) -> list:
        """``[((start, end), weight chunk)]`` in ``dtype`` on ``device``, made once."""
        key = (dtype, device)
        if key not in self._float_weights:
            chunks = self.float32_chunks if dtype == torch.float32 else [(0, self.weight.shape[1])]
            weight = self.weight.to(device=device, dtype=dtype)
            self._float_weights[key] = [((s, e), weight[:, s:e].contiguous()) for s, e in chunks]
        return self._float_weights[key]

    def _float_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        if dtype == torch.float32 and self.accumulator_bound > gemm.FLOAT32_EXACT:
            return None
        return self.bias.to(dtype)

    def input_slice(self, centred: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Input channels ``[start, end)`` of every group."""
        raise NotImplementedError

    def float_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The float conv/linear itself."""
        raise NotImplementedError

    def as_positions(self, y: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """A float op's output as ``[positions, C_out]`` and the shape of positions."""
        raise NotImplementedError

    def requantize(self, acc: torch.Tensor) -> torch.Tensor:
        """Formula (2): accumulator → uint8 at the output scale."""
        if self.requantize_as is Rounding.ONNXRUNTIME:
            return intmath.runtime_requantize(acc, self.runtime_multiplier, int(self.output_zero_point),
                                              (1 << self.output_bits) - 1)
        return intmath.requantize(acc, self.multiplier.to(torch.int64), self.shift.to(torch.int64),
                                  int(self.output_zero_point), (1 << self.output_bits) - 1)

    def columns(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The GEMM's int8 ``[positions, K]`` input and the shape of ``positions``."""
        raise NotImplementedError

    def to_output(self, q: torch.Tensor, positions: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError

    def twin(self, node) -> nn.Module:
        return FloatLayer(self)

    def to_onnx(self, b, node, inputs):
        return self.onnx_layer(b, inputs[0], node.name)

    def onnx_layer(self, b, x: str, name: str, **op_options) -> str:
        """DequantizeLinear → Conv/Gemm (int8 weight and int32 bias, dequantized) → QuantizeLinear,
        which onnxruntime fuses into QLinearConv/QGemm. In the U8U8 format the weight travels as
        uint8 ``W_q + 128`` with zero point 128: the same values, which onnxruntime multiplies
        without 16-bit pair sums (`fxq.deployment.saturation`)."""
        x_f = b.dequantize(x, self.input_qparams, f"{name}_in")
        weight_q, zero = self.weight, torch.zeros(self.weight.shape[0], dtype=torch.int8)
        if b.formats.get(self) is WeightFormat.U8U8:
            weight_q = (weight_q.to(torch.int16) + 128).to(torch.uint8)
            zero = torch.full_like(zero, 128, dtype=torch.uint8)
        weight = b.node("DequantizeLinear", [
            b.constant(f"{name}_weight", weight_q),
            b.constant(f"{name}_weight_scale", self.weight_scale.to(torch.float32)),
            b.constant(f"{name}_weight_zero", zero)], f"{name}_w", axis=0)
        bias = b.node("DequantizeLinear", [
            b.constant(f"{name}_bias", self.bias),
            b.constant(f"{name}_bias_scale", (self.input_scale * self.weight_scale).to(torch.float32)),
            b.constant(f"{name}_bias_zero", torch.zeros_like(self.bias))], f"{name}_b", axis=0)
        return b.quantize(self.onnx_op(b, x_f, weight, bias, name, **op_options), self.output_qparams, name)

    def onnx_op(self, b, x: str, weight: str, bias: str, name: str) -> str:
        """The float ONNX op on the dequantized input, weight and bias (``op_options`` of
        `onnx_layer` are the layer's own)."""
        return b.node("Gemm", [x, weight, bias], f"{name}_gemm", transB=1)


LAYER_TENSORS = {"weight": torch.int8, "bias": torch.int32, "multiplier": torch.int32,
                  "shift": torch.int8, "weight_scale": torch.float64, "input_scale": torch.float64,
                  "output_scale": torch.float64, "input_zero_point": torch.int32,
                  "output_zero_point": torch.int32}


def layer_ranges(module: QLayer) -> None:
    sc.zero_point_fits(module, "input_zero_point", module.input_bits)
    sc.zero_point_fits(module, "output_zero_point", module.output_bits)
    channels = module.weight.shape[0] if module.weight.dim() == module.weight_dims else -1
    sc.expect(all(getattr(module, n).shape == (channels,) for n in ("bias", "multiplier", "shift", "weight_scale"))
              and module.weight.dim() == module.weight_dims and channels % module.groups == 0,
              "weight, bias, multiplier, shift, scales and groups disagree in shape")
    sc.expect(max(-int(module.weight.min()), int(module.weight.max())) <= 127, "weight outside ±127")
    sc.fixed_point_fits(module.multiplier, module.shift, "a channel's")


def _absmax(qp: ActQParams) -> int:
    """The largest ``|I_q − z_I|``."""
    return max(qp.zero_point, qp.qmax - qp.zero_point)


def _fit_bias(layer: nn.Module, weights: QuantizedWeight, input_scale: float) -> QuantizedWeight:
    """Widen the weight scale of channels whose bias would not fit ``BIAS_LIMIT`` at ``s_I·s_W``."""
    if layer.bias is None:
        return weights
    needed = layer.bias.detach().to(torch.float64).abs() / (input_scale * BIAS_LIMIT)
    widen = needed > weights.scales
    if not widen.any():
        return weights
    scales = torch.where(widen, needed, weights.scales)
    largest = int(weights.weight.to(torch.int64).abs().max()) or 1
    shape = (-1,) + (1,) * (weights.weight.dim() - 1)
    regridded = affine.round_half_away(layer.weight.detach().to(torch.float64) / scales.reshape(shape))
    regridded = regridded.clamp_(-largest, largest).to(torch.int8)
    return QuantizedWeight(torch.where(widen.reshape(shape), regridded, weights.weight), scales)


def _layer_multipliers(real: torch.Tensor, bounds: torch.Tensor, output_qp: ActQParams, name: str):
    """Each channel's fixed-point multiplier; a multiplier too large to hold is named by channel."""
    try:
        return intmath.fixed_point(real, intmath.multiplier_precision(int(bounds.max())), bounds)
    except ValueError:
        channel = int(real.argmax())
        raise NotRepresentable(
            f"{name}: channel {channel}'s requantization multiplier M = s_I·s_W/s_O = "
            f"{float(real[channel]):.3g} is too large to hold in fixed point: the output scale "
            f"s_O = {output_qp.scale:.3g} is tiny (the layer's output was almost constant on the "
            "calibration data). Calibrate on varied, real inputs, or keep this layer in float "
            f"(overrides={{'{name}': None}})") from None
