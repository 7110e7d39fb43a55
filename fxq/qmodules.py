"""The integer ops a quantized graph calls. Each holds its integers as buffers and computes with
`fxq.intmath`, so ``state_dict()`` stores integers and the graph still reads ``self.layer1.0.conv1``.

    Quantize     float  → uint8          the network input, once
    QConv2d      uint8  → uint8          int8 weight, int32 bias and accumulator, fixed-point requant
    QLinear      uint8  → uint8          the same for a fully connected layer
    QAdd         uint8, uint8 → uint8    residual add, each input rescaled to the output scale
    QAvgPool2d   uint8  → uint8          window sum and rounding division, same scale
    QMaxPool2d   uint8  → uint8          window max, same scale
    QRequantize  uint8  → uint8          a value moved to new parameters (placement "both")
    QReLU        uint8  → uint8          max(q, z), same scale
    Dequantize   uint8  → float32        the logits, once
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from fxq import affine, gemm, intmath, records
from fxq import schema as sc
from fxq.affine import ActQParams
from fxq.records import QuantizedWeight
from fxq.schema import Schema
from fxq.twin import FloatAvgPool, FloatLayer, FromIntegers, OnIntegers, SnapToGrid


BIAS_LIMIT = 2**30  # |b_q| at most this, so int32 keeps room for the weighted sum beside it


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

    schema = Schema({"bits": sc.act_bits, "sample_shape": sc.optional(sc.ints(1)), "requantize_as": sc.REQUANTIZE},
                    _BOUNDARY_TENSORS, ranges=_boundary_ranges)
    requantize_as = "fixed_point"  # "onnxruntime": ties to even, as QuantizeLinear rounds

    @property
    def half_even(self) -> bool:
        return self.requantize_as == "onnxruntime"

    def twin(self, node) -> nn.Module:
        return SnapToGrid(self.qparams, self.half_even)

    def describe(self) -> str:
        ties = "to even" if self.half_even else "away from zero"
        return f"float → integer: clamp(round(x / s) + z), ties {ties}"

    def to_onnx(self, b, node, inputs):
        return b.quantize(inputs[0], self.qparams, node.name)

    def __init__(self, qparams: ActQParams, sample_shape: tuple[int, ...] | None):
        super().__init__(qparams)
        self.sample_shape = sample_shape  # None: an inner float island, not the network input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sample_shape is not None:
            self._check(x)
        # float16/bfloat16 values are exact in float32: the same values give the same integers
        # whatever dtype they arrive in
        return self.qparams.quantize(x.to(torch.promote_types(x.dtype, torch.float32)), self.half_even)

    def _check(self, x: object) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"the quantized model takes a float tensor, got {_describe(x)}")
        if x.dim() != len(self.sample_shape) + 1 or x.shape[1] != self.sample_shape[0]:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not match the calibration samples "
                f"{self.sample_shape}: pass a batch shaped [N, {', '.join(map(str, self.sample_shape))}]"
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

    def describe(self) -> str:
        return "integer → float: s·(q − z)"

    def to_onnx(self, b, node, inputs):
        return b.dequantize(inputs[0], self.qparams, node.name)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.qparams.dequantize(q)


class QLayer(Derived):
    """A conv or linear layer as formulas (1) and (2) of `fxq.intmath`.

    Buffers: ``weight`` int8, ``bias`` int32 (scale s_in·s_w), ``multiplier`` int32 and ``shift``
    int8 per output channel, the scales they came from (float64, for reports), and both zero points.

    A channel whose bias would pass ``BIAS_LIMIT`` at ``s_I·s_W[c]`` (a near-dead channel: batch
    norm's γ ≈ 0 leaves weights ~0 beside a real bias) gets the weight scale that brings the bias to
    the limit; its weights, negligible beside the bias, round on that coarser grid. A multiplier
    that cannot move the channel's output is stored as 0 (`intmath.fixed_point`): exact.
    """

    def __init__(self, layer: nn.Module, weights: QuantizedWeight, input_qp: ActQParams,
                 output_qp: ActQParams, name: str):
        super().__init__()
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
    requantize_as = "fixed_point"  # or "onnxruntime" (`passes.adopt_runtime`): QConfig.requantize

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
        self.backend = None  # the backend of the last call (`fxq.gemm`)
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
        included, and the shape of ``positions``, by the backend `fxq.gemm` chooses for this shape
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
        if self.requantize_as == "onnxruntime":
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

    def describe(self) -> str:
        kernel = "float64 GEMM on integers" if self.wide else "int8 GEMM"
        how = ("requantized as onnxruntime does (float32 multiplier per channel, half to even)"
               if self.requantize_as == "onnxruntime" else "fixed-point requantization per channel")
        return f"{kernel}, int{self.accumulator_bits} accumulator, {how}"

    def to_onnx(self, b, node, inputs):
        return b.layer(self, inputs[0], node.name)


_LAYER_TENSORS = {"weight": torch.int8, "bias": torch.int32, "multiplier": torch.int32,
                  "shift": torch.int8, "weight_scale": torch.float64, "input_scale": torch.float64,
                  "output_scale": torch.float64, "input_zero_point": torch.int32,
                  "output_zero_point": torch.int32}


def _layer_ranges(module: QLayer) -> None:
    sc.zero_point_fits(module, "input_zero_point", module.input_bits)
    sc.zero_point_fits(module, "output_zero_point", module.output_bits)
    channels = module.weight.shape[0] if module.weight.dim() in (2, 4) else -1
    sc.expect(all(getattr(module, n).shape == (channels,) for n in ("bias", "multiplier", "shift", "weight_scale"))
              and (module.weight.dim() == 4) == isinstance(module, QConv2d) and channels % module.groups == 0,
              "weight, bias, multiplier, shift, scales and groups disagree in shape")
    sc.expect(int(module.weight.to(torch.int64).abs().max()) <= 127, "weight outside ±127")
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


class QConv2d(QLayer):
    """uint8 → uint8 2-d convolution (formulas (1), (2)); geometry copied from the float conv.

    Grouped convolutions run one int8 GEMM per group; a depthwise one (one input channel per
    group) multiplies and adds its k_h·k_w shifted inputs directly in int32 (int64 when wide),
    which is exact and needs no im2col.
    """

    schema = Schema({"input_bits": sc.act_bits, "output_bits": sc.act_bits, "stride": sc.ints(1, 2),
                     "padding": sc.ints(0, 2), "dilation": sc.ints(1, 2), "groups": sc.int_at_least(1),
                     "requantize_as": sc.REQUANTIZE},
                    _LAYER_TENSORS, ranges=_layer_ranges)

    def __init__(self, conv: nn.Conv2d, weights: QuantizedWeight, input_qp: ActQParams,
                 output_qp: ActQParams, name: str):
        if conv.padding_mode != "zeros":
            raise ValueError(f"{name}: only padding_mode='zeros' convolutions have an integer form, "
                             f"got padding_mode={conv.padding_mode!r}")
        self.groups = conv.groups
        super().__init__(conv, weights, input_qp, output_qp, name)
        self.stride, self.padding, self.dilation = conv.stride, explicit_padding(conv), conv.dilation

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.weight.shape[1] == 1

    def integer_accumulator(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        if not self.depthwise:
            return super().integer_accumulator(x)
        return intmath.depthwise_accumulate(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                            int(self.input_zero_point), torch.int32)

    def columns(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        return intmath.conv_columns(x, tuple(self.weight.shape[2:]), self.stride, self.padding, self.dilation,
                                    int(self.input_zero_point))

    def input_slice(self, centred: torch.Tensor, start: int, end: int) -> torch.Tensor:
        return gemm.input_channels(centred, self.groups, start, end)

    def float_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def as_positions(self, y: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        n, c, h, w = y.shape
        return y.permute(0, 2, 3, 1).reshape(-1, c), (n, h, w)

    def to_output(self, q: torch.Tensor, positions: tuple[int, ...]) -> torch.Tensor:
        # channels-last integers viewed as NCHW: no copy, and the next conv reads them as they are
        return q.reshape(*positions, -1).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1] * self.groups}, {self.weight.shape[0]}, "
                f"kernel_size={tuple(self.weight.shape[2:])}, stride={self.stride}, "
                f"padding={self.padding}" + (f", groups={self.groups}" if self.groups > 1 else ""))


def explicit_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """A conv's padding as two numbers: ``"valid"`` is none, ``"same"`` the symmetric padding
    that keeps the size (an even total, ``d·(k − 1)``, which odd kernels have)."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in totals):
            raise ValueError("padding='same' with an even kernel pads one side more: no integer form")
        return tuple(t // 2 for t in totals)
    return tuple(conv.padding)


class QLinear(QLayer):
    """uint8 → uint8 fully connected layer (formulas (1), (2))."""

    schema = Schema({"input_bits": sc.act_bits, "output_bits": sc.act_bits, "requantize_as": sc.REQUANTIZE},
                    _LAYER_TENSORS, ranges=_layer_ranges)

    def __init__(self, linear: nn.Linear, weights: QuantizedWeight, input_qp: ActQParams,
                 output_qp: ActQParams, name: str):
        super().__init__(linear, weights, input_qp, output_qp, name)

    def columns(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Any leading dimensions (``[N, K]``, or ``[N, H, W, K]`` after a permute) are positions."""
        positions, rows = tuple(x.shape[:-1]), x.reshape(-1, x.shape[-1])
        return (rows ^ 128).view(torch.int8), positions  # q − 128, as in intmath.conv_columns

    def input_slice(self, centred: torch.Tensor, start: int, end: int) -> torch.Tensor:
        return centred[..., start:end]

    def float_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def as_positions(self, y: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        return y.reshape(-1, y.shape[-1]), tuple(y.shape[:-1])

    def to_output(self, q: torch.Tensor, positions: tuple[int, ...]) -> torch.Tensor:
        return q.reshape(*positions, q.shape[-1])

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}"

    def to_onnx(self, b, node, inputs):
        return b.linear(self, inputs[0], node.name)


class QAdd(Derived):
    """uint8 + uint8 → uint8: ``clamp(z_O + round(M_A·(A_q − z_A) + M_B·(B_q − z_B)))``.

    Inputs of up to 8 bits take at most 2^8 values each, so the op is evaluated once for every
    pair with `fxq.intmath.add` when it is built, and then runs as a lookup in that table (64 KiB
    at 8 bits): the same integers, an order of magnitude fewer passes over the tensors.
    """

    schema = Schema({"input_bits": lambda v: sc.bits_tuple(v) and len(v) == 2, "output_bits": sc.act_bits,
                     "requantize_as": sc.REQUANTIZE},
                    {**{f"{p}_{f}": torch.int64 for p in "ab" for f in ("zero_point", "multiplier", "shift")},
                     "output_zero_point": torch.int64, "scales": torch.float64},
                    ranges=lambda m: m.check_ranges())
    requantize_as = "fixed_point"  # or "onnxruntime": QLinearAdd's float32 arithmetic

    def __init__(self, a: ActQParams, b: ActQParams, out: ActQParams, name: str):
        super().__init__()
        operands = [intmath.AddOperand.rescale(p.zero_point, p.scale, out.scale, p.bits) for p in (a, b)]
        gap = intmath.add_max_shift_gap(max(a.bits, b.bits))
        if intmath.add_shift_gap(*operands) > gap:
            raise NotRepresentable(f"{name}: the two inputs' scales ({a.scale:.3g}, {b.scale:.3g}) differ by "
                             f"more than 2^{gap}, beyond what the int64 sum holds at these widths: "
                             "check the calibration data, or keep the block in float with overrides")
        self.input_bits, self.output_bits = (a.bits, b.bits), out.bits
        for prefix, operand in zip("ab", operands):
            for field in ("zero_point", "multiplier", "shift"):
                self.register_buffer(f"{prefix}_{field}", torch.tensor(getattr(operand, field)))
        self.register_buffer("output_zero_point", torch.tensor(out.zero_point))
        self.register_buffer("scales", torch.tensor([a.scale, b.scale, out.scale], dtype=torch.float64))
        self.prepare()

    def operand(self, prefix: str) -> intmath.AddOperand:
        return intmath.AddOperand(*(int(getattr(self, f"{prefix}_{f}"))
                                    for f in ("zero_point", "multiplier", "shift")))

    def compute(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The integer add itself (`fxq.intmath.add`, or `fxq.intmath.runtime_add`), without the table."""
        if self.requantize_as == "onnxruntime":
            zero_points = (int(self.a_zero_point), int(self.b_zero_point), int(self.output_zero_point))
            return intmath.runtime_add(a, b, tuple(self.scales.tolist()), zero_points, (1 << self.output_bits) - 1)
        return intmath.add(a, b, self.operand("a"), self.operand("b"), int(self.output_zero_point),
                           (1 << self.output_bits) - 1)

    @property
    def tabulated(self) -> bool:
        """Up to 8-bit inputs the add is a 2^(b_a + b_b)-entry lookup; 16-bit ones compute it."""
        return sum(self.input_bits) <= 16

    def prepare(self) -> None:
        if not self.tabulated:
            self.register_buffer("table", None, persistent=False)
            return
        grid_a, grid_b = torch.meshgrid(torch.arange(1 << self.input_bits[0], dtype=torch.uint8),
                                        torch.arange(1 << self.input_bits[1], dtype=torch.uint8),
                                        indexing="ij")
        self.register_buffer("table", self.compute(grid_a, grid_b).flatten(), persistent=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if not self.tabulated:
            return self.compute(a, b)
        return self.table[a.to(torch.int32) * (1 << self.input_bits[1]) + b]

    def check_ranges(self) -> None:
        for prefix, bits in zip("ab", self.input_bits):
            sc.zero_point_fits(self, f"{prefix}_zero_point", bits)
            sc.fixed_point_fits(getattr(self, f"{prefix}_multiplier"), getattr(self, f"{prefix}_shift"), prefix)
        sc.zero_point_fits(self, "output_zero_point", self.output_bits)

    def twin(self, node) -> nn.Module:
        return _on_integers(self.compute, node)

    def describe(self) -> str:
        how = f"a lookup in the {1 << sum(self.input_bits)}-entry table of every input pair" if self.tabulated else "int64"
        if self.requantize_as == "onnxruntime":
            return f"onnxruntime's QLinearAdd: float32 ratios and fused multiply-adds, ties to even: {how}"
        return f"both inputs rescaled to the output scale, one rounding: {how}"

    def to_onnx(self, b, node, inputs):
        if not self.tabulated:
            raise ValueError(f"node '{node.name}': adds of 16-bit inputs do not export yet")
        return b.add(inputs, [records.get(a, ActQParams) for a in node.args[:2]], records.get(node, ActQParams), node.name)


def _on_integers(compute, node) -> nn.Module:
    """The twin of an integer kernel: run it on the integers its input values stand for."""
    inputs = [records.get(a, ActQParams) for a in node.args]
    return OnIntegers(compute, inputs, records.get(node, ActQParams))


class QRequantize(Derived):
    """uint8 → uint8 at new parameters: ``clamp(z_O + round(M·(q − z_I)), 0, 2^b − 1)``, ``M = s_I/s_O``.

    Formula (2) with ``q − z_I`` as the accumulator; with at most 2^8 inputs it runs as a lookup
    in the table of every answer, built once with `fxq.intmath.requantize`.
    """

    schema = Schema({"input_bits": sc.act_bits, "output_bits": sc.act_bits},
                    {"input_zero_point": torch.int32, "output_zero_point": torch.int32,
                     "multiplier": torch.int32, "shift": torch.int8},
                    ranges=lambda m: m.check_ranges())

    def __init__(self, before: ActQParams, after: ActQParams):
        super().__init__()
        self.input_bits, self.output_bits = before.bits, after.bits
        multiplier, shift = intmath.fixed_point(torch.tensor(before.scale / after.scale),
                                                bound=before.qmax)
        self.register_buffer("input_zero_point", torch.tensor(before.zero_point, dtype=torch.int32))
        self.register_buffer("output_zero_point", torch.tensor(after.zero_point, dtype=torch.int32))
        self.register_buffer("multiplier", multiplier.to(torch.int32))
        self.register_buffer("shift", shift.to(torch.int8))
        self.prepare()

    def compute(self, q: torch.Tensor) -> torch.Tensor:
        """The requantization itself, without the table."""
        centred = q.to(torch.int64) - int(self.input_zero_point)
        return intmath.requantize(centred, self.multiplier.to(torch.int64), self.shift.to(torch.int64),
                                  int(self.output_zero_point), (1 << self.output_bits) - 1)

    def prepare(self) -> None:
        every = torch.arange(1 << self.input_bits)
        self.register_buffer("table", self.compute(every), persistent=False)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.table[q.to(torch.int64)]

    def extra_repr(self) -> str:
        return f"zero_point {int(self.input_zero_point)} → {int(self.output_zero_point)}"

    def check_ranges(self) -> None:
        sc.zero_point_fits(self, "input_zero_point", self.input_bits)
        sc.zero_point_fits(self, "output_zero_point", self.output_bits)
        sc.fixed_point_fits(self.multiplier, self.shift, "the")

    def twin(self, node) -> nn.Module:
        return _on_integers(self.compute, node)

    def describe(self) -> str:
        return f"to new parameters: a lookup in the {1 << self.input_bits}-entry table"

    def to_onnx(self, b, node, inputs):
        return b.gather(self.table, b.as_index(inputs[0], node.name), node.name)


class QReLU(nn.Module):
    """uint8 → uint8 ReLU: real 0 is ``q = z``, so ``relu(s·(q − z)) = s·(max(q, z) − z)``.

    The zero point is a buffer, so ``state_dict()`` carries it like every other integer.
    """

    schema = Schema({}, {"zero_point": torch.int32},
                    ranges=lambda m: sc.zero_point_fits(m, "zero_point", 16))

    def __init__(self, zero_point: int):
        super().__init__()
        self.register_buffer("zero_point", torch.tensor(zero_point, dtype=torch.int32))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return intmath.relu(q, int(self.zero_point))

    def extra_repr(self) -> str:
        return f"max(q, {int(self.zero_point)})"

    def twin(self, node) -> nn.Module:
        return nn.ReLU()  # max(q, z) on integers is max(x, 0) on their values

    def describe(self) -> str:
        return f"max(q, {int(self.zero_point)}): real 0 is the zero point"

    def to_onnx(self, b, node, inputs):
        return b.relu(inputs[0], records.get(node, ActQParams), node.name)


class QMaxPool2d(nn.MaxPool2d):
    """uint8 → uint8 max pooling: max commutes with the monotone ``q ↦ s·(q − z)``.

    torch's uint8 max pooling rejects channels-last input, the layout a QConv2d returns, so the
    integers are made contiguous first.
    """

    schema = Schema({"kernel_size": sc.int_or_pair(1), "stride": sc.int_or_pair(1),
                     "padding": sc.int_or_pair(0), "dilation": sc.int_or_pair(1),
                     "return_indices": sc.one_of(False), "ceil_mode": sc.one_of(True, False)}, {})

    def twin(self, node) -> nn.Module:
        return self  # the max of values is the value of the max

    def describe(self) -> str:
        return "window max of the integers, same scale"

    def to_onnx(self, b, node, inputs):  # on the uint8 integers themselves
        k, s, p, d = (_pair(v) for v in (self.kernel_size, self.stride, self.padding, self.dilation))
        return b.node("MaxPool", [inputs[0]], node.name, kernel_shape=k, strides=s, pads=p + p, dilations=d,
                      ceil_mode=int(self.ceil_mode))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return super().forward(q.contiguous())


class QAdaptiveMaxPool2d(nn.AdaptiveMaxPool2d):
    """uint8 → uint8 adaptive max pooling; torch has no integer kernel for it, so it runs on the
    integers held in float32 (exact below 2^24) and returns them as integers."""

    schema = Schema({"output_size": lambda v: isinstance(v, tuple) and len(v) == 2
                     and all(x is None or (sc.is_int(x) and x >= 1) for x in v),
                     "return_indices": sc.one_of(False)}, {})

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return super().forward(q.to(torch.float32)).to(q.dtype)

    def twin(self, node) -> nn.Module:
        return nn.AdaptiveMaxPool2d(self.output_size)  # the max of values is the value of the max

    def describe(self) -> str:
        return "window max of the integers, same scale"

    def to_onnx(self, b, node, inputs):
        """Separably: the max over each window's rows, then over its columns (slices of the uint8
        integers, ReduceMax, Concat): exact."""
        x = inputs[0]
        for axis, (size, out) in enumerate(zip(b.shape_of(node.args[0])[-2:], b.shape_of(node)[-2:]), start=2):
            windows = [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]
            parts = [b.node("ReduceMax", [b.node("Slice", [x, b.constant(f"{node.name}_start", b.ints([start])),
                                                            b.constant(f"{node.name}_end", b.ints([end])),
                                                            b.constant(f"{node.name}_axis", b.ints([axis]))],
                                                 f"{node.name}_slice"),
                                          b.constant(f"{node.name}_axes", b.ints([axis]))], f"{node.name}_max", keepdims=1)
                     for start, end in windows]
            x = b.node("Concat", parts, f"{node.name}_{axis}", axis=axis)
        return x


class QAvgPool2d(nn.Module):
    """uint8 → uint8 average pooling at the input's scale (`fxq.intmath.window_mean`): a window
    pool (``kind="window"``: kernel, stride, padding, ceil_mode, count_include_pad,
    divisor_override as in ``nn.AvgPool2d``) or an adaptive one (``kind="adaptive"``:
    ``output_size``, None entries keeping the input's size). ``keepdim=False`` drops the two
    pooled dimensions (``x.mean((2, 3))``)."""

    schema = Schema({"kind": sc.one_of("window", "adaptive"), "kernel": sc.optional(sc.ints(1, 2)),
                     "stride": sc.optional(sc.ints(1, 2)), "padding": sc.optional(sc.ints(0, 2)),
                     "ceil_mode": sc.one_of(True, False), "count_include_pad": sc.one_of(True, False),
                     "divisor_override": sc.optional(sc.int_at_least(1)),
                     "output_size": sc.optional(lambda v: isinstance(v, tuple) and len(v) == 2
                                                and all(x is None or (sc.is_int(x) and x >= 1) for x in v)),
                     "keepdim": sc.one_of(True, False), "bits": sc.act_bits,
                     "rank": sc.optional(sc.int_at_least(3)), "requantize_as": sc.REQUANTIZE},
                    {"zero_point": torch.int32, "scale": torch.float64},
                    ranges=lambda m: sc.zero_point_fits(m, "zero_point", m.bits))
    requantize_as = "fixed_point"  # "onnxruntime": a global mean as QLinearGlobalAveragePool computes it

    def __init__(self, qp: ActQParams, kind: str, kernel=None, stride=None, padding=None, ceil_mode=False,
                 count_include_pad=True, divisor_override=None, output_size=None, keepdim=True, rank=None):
        super().__init__()
        self.kind, self.kernel, self.stride, self.padding = kind, kernel, stride, padding
        self.ceil_mode, self.count_include_pad, self.divisor_override = ceil_mode, count_include_pad, divisor_override
        self.output_size, self.keepdim, self.bits = output_size, keepdim, qp.bits
        self.rank = rank  # the input's rank, where the pooled dims were counted from the front
        self.register_buffer("zero_point", torch.tensor(qp.zero_point, dtype=torch.int32))
        self.register_buffer("scale", torch.tensor(qp.scale, dtype=torch.float64))

    @property
    def runtime_mean(self) -> bool:
        """A global mean computed as onnxruntime does (`fxq.intmath.runtime_global_mean`)."""
        return self.requantize_as == "onnxruntime" and self.kind == "adaptive" and self.output_size == (1, 1)

    @classmethod
    def global_mean(cls, qp: ActQParams, keepdim: bool = True, rank: int | None = None) -> "QAvgPool2d":
        return cls(qp, "adaptive", output_size=(1, 1), keepdim=keepdim, rank=rank)

    def windows(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The row and column membership matrices and the ``[out_h, out_w]`` divisors."""
        if self.kind == "adaptive":
            out = [size if o is None else o for o, size in zip(self.output_size, (height, width))]
            (rows, d_rows), (columns, d_columns) = (intmath.adaptive_windows(height, out[0]),
                                                    intmath.adaptive_windows(width, out[1]))
        else:
            (rows, d_rows), (columns, d_columns) = (
                intmath.pool_windows(size, k, s, p, self.ceil_mode, self.count_include_pad)
                for size, k, s, p in zip((height, width), self.kernel, self.stride, self.padding))
        divisors = d_rows[:, None] * d_columns[None, :]
        if self.divisor_override is not None:
            divisors = torch.full_like(divisors, self.divisor_override)
        return rows, columns, divisors

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if self.rank is not None and q.dim() != self.rank:
            raise ValueError(f"this mean pools dims (2, 3) of a {self.rank}-d tensor; got a {q.dim()}-d one")
        if self.runtime_mean:
            out = intmath.runtime_global_mean(q, float(self.scale), int(self.zero_point), (1 << self.bits) - 1)
        else:
            rows, columns, divisors = (t.to(q.device) for t in self.windows(*q.shape[-2:]))
            out = intmath.window_mean(q, rows, columns, divisors, int(self.zero_point), (1 << self.bits) - 1)
        return out if self.keepdim else out.reshape(out.shape[:-2])

    def extra_repr(self) -> str:
        if self.kind == "adaptive":
            return f"adaptive to {self.output_size}" + ("" if self.keepdim else ", dims dropped")
        return (f"kernel={self.kernel}, stride={self.stride}, padding={self.padding}, ceil_mode={self.ceil_mode}, "
                f"count_include_pad={self.count_include_pad}")

    def twin(self, node) -> nn.Module:
        if self.runtime_mean:
            return _on_integers(self, node)
        return FloatAvgPool(self, records.get(node, ActQParams))

    def describe(self) -> str:
        if self.runtime_mean:
            return "integer sums times onnxruntime's float32 1/N, ties to even (QLinearGlobalAveragePool)"
        return "integer window sums, one rounding division each, same scale"

    def to_onnx(self, b, node, inputs):
        """Exactly fxq's pooling: the centred integers' window means in float32 (ONNX's
        AveragePool / GlobalAveragePool, or products with the window membership matrices for
        other adaptive sizes; every window sum an exact integer), rounded half away from zero."""
        qp, name = records.get(node, ActQParams), node.name
        if self.runtime_mean:  # DequantizeLinear → GlobalAveragePool → QuantizeLinear: QLinearGlobalAveragePool
            out = b.quantize(b.node("GlobalAveragePool", [b.dequantize(inputs[0], qp, f"{name}_in")], f"{name}_mean"),
                             qp, name)
        elif self.kind == "window":
            if self.divisor_override is not None:
                raise ValueError(f"node '{name}': divisor_override does not export")
            out = b.exact_mean(inputs[0], qp, name, "AveragePool", kernel_shape=list(self.kernel),
                               strides=list(self.stride), pads=list(self.padding) * 2, ceil_mode=int(self.ceil_mode),
                               count_include_pad=int(self.count_include_pad))
        elif self.output_size == (1, 1):
            out = b.exact_mean(inputs[0], qp, name, "GlobalAveragePool")
        else:
            height, width = b.shape_of(node.args[0])[-2:]
            rows, columns, divisors = self.windows(height, width)
            x = b.centred(inputs[0], qp, name)
            across = b.node("MatMul", [x, b.constant(f"{name}_columns", columns.t().float())], f"{name}_w")
            both = b.node("MatMul", [b.constant(f"{name}_rows", rows.float()), across], f"{name}_h")
            mean = b.node("Div", [both, b.constant(f"{name}_divisors", divisors.float())], f"{name}_mean")
            out = b.rounded_back(mean, qp, name)
        if self.keepdim:
            return out
        return b.node("Reshape", [out, b.constant(f"{name}_shape", b.ints([-1, *b.shape_of(node)[1:]]))], f"{name}_flat")


def _pair(value) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [value, value]


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor"
    return type(x).__name__
