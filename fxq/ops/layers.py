"""Layers with weights: conv and linear become int8 GEMMs with fixed-point requantization
(`QConv2d`, `QLinear`), their accumulators computed by the fastest exact backend (`fxq.integers.gemm`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxq.config import Rounding
from fxq.files import schema as sc
from fxq.files.schema import Schema
from fxq.graphs import records
from fxq.graphs.records import QuantizedWeight
from fxq.integers import gemm, intmath
from fxq.integers.affine import ActQParams
from fxq.ops.base import Lowering, Op, Output, output_qparams, qparams_of
from fxq.ops.qlayer import LAYER_TENSORS, QLayer, layer_ranges
from fxq.ops.weighted import BATCH_NORMS, CONV_PARAMETERS, Weights


class QConv2d(QLayer):
    """uint8 → uint8 2-d convolution (formulas (1), (2)); geometry copied from the float conv.

    Grouped convolutions run one int8 GEMM per group; a depthwise one (one input channel per
    group) multiplies and adds its k_h·k_w shifted inputs directly in int32 (int64 when wide),
    which is exact and needs no im2col.
    """

    schema = Schema({"input_bits": sc.act_bits, "output_bits": sc.act_bits, "stride": sc.ints(1, 2),
                     "padding": sc.ints(0, 2), "dilation": sc.ints(1, 2), "groups": sc.int_at_least(1),
                     "requantize_as": sc.REQUANTIZE},
                    LAYER_TENSORS, ranges=layer_ranges)
    weight_dims = 4
    kind, operation = "conv", "conv"  # how reports name it and its float kernel

    def __init__(self, conv: nn.Conv2d, weights: QuantizedWeight, input_qp: ActQParams,
                 output_qp: ActQParams, name: str, rounding: Rounding = Rounding.FIXED_POINT):
        if conv.padding_mode != "zeros":
            raise ValueError(f"{name}: only padding_mode='zeros' convolutions have an integer form, "
                             f"got padding_mode={conv.padding_mode!r}")
        self.groups = conv.groups
        super().__init__(conv, weights, input_qp, output_qp, name, rounding)
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

    def onnx_layer(self, b, x: str, name: str) -> str:
        if b.runtime == "openvino" and self.strided_pointwise:
            # OpenVINO's CPU plugin runs a strided 1×1 conv whose input has a zero point in float32
            # (a Subtract, then an f32 conv: ResNet's downsample convs); on every s-th integer the
            # same conv has stride 1, and runs in u8
            return super().onnx_layer(b, b.subsample(x, self.stride, name), name, strides=[1, 1])
        return super().onnx_layer(b, x, name)

    @property
    def strided_pointwise(self) -> bool:
        """A 1×1 kernel without padding that skips positions: it reads only every s-th input."""
        return tuple(self.weight.shape[2:]) == (1, 1) and max(self.stride) > 1 and not any(self.padding)

    def onnx_op(self, b, x: str, weight: str, bias: str, name: str, strides: list[int] | None = None) -> str:
        p = list(self.padding)
        return b.node("Conv", [x, weight, bias], f"{name}_conv", pads=p + p, strides=strides or list(self.stride),
                      dilations=list(self.dilation), group=self.groups)

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
                    LAYER_TENSORS, ranges=layer_ranges)

    def __init__(self, linear: nn.Linear, weights: QuantizedWeight, input_qp: ActQParams,
                 output_qp: ActQParams, name: str, rounding: Rounding = Rounding.FIXED_POINT):
        super().__init__(linear, weights, input_qp, output_qp, name, rounding)

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
        """Over the last dim of ``[N, ..., K]``: Reshape → [−1, K] → the layer → Reshape back, so
        that onnxruntime still runs its int8 GEMM (QGemm) on it."""
        shape, name = b.shape_of(node), node.name
        if len(shape) == 2:
            return self.onnx_layer(b, inputs[0], name)
        rows = b.node("Reshape", [inputs[0], b.constant(f"{name}_rows", b.ints([-1, self.weight.shape[1]]))],
                      f"{name}_rows")
        y = self.onnx_layer(b, rows, name)
        return b.node("Reshape", [y, b.constant(f"{name}_shape", b.ints([-1, *shape[1:]]))], f"{name}_back")


def _conv_accepts(node: fx.Node, conv: nn.Conv2d) -> str | None:
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only zero padding has an integer form)"
    try:
        explicit_padding(conv)
    except ValueError as error:
        return str(error)
    return None


def lower_layer(lo: Lowering, node: fx.Node) -> None:
    """``conv(x)`` → ``QConv2d(q)``: int8 weight, int32 bias and accumulator, requantized output."""
    input_qp = qparams_of(node.args[0], node)
    layer = lo.modules[node.target]
    weights = records.get(node, records.QuantizedWeight)
    make = QConv2d if isinstance(layer, nn.Conv2d) else QLinear
    lo.become(node, make(layer, weights, input_qp, output_qparams(node), node.target, lo.rounding),
              node.target, node.args[:1])


def _columns(conv: nn.Conv2d) -> dict:
    """``F.unfold``'s arguments for the conv's input columns."""
    return dict(kernel_size=conv.kernel_size, dilation=conv.dilation, padding=explicit_padding(conv),
                stride=conv.stride)


@torch.no_grad()
def norm_as_conv(norm: nn.BatchNorm2d) -> nn.Conv2d:
    """An eval-mode batch norm alone, ``y_c = γ'_c·x_c + b'_c``, as the 1×1 depthwise conv it is."""
    identity = nn.utils.skip_init(nn.Conv2d, norm.num_features, norm.num_features, 1, groups=norm.num_features,
                                  bias=False)
    identity.weight.fill_(1.0)
    return CONV.weights.folded(identity, norm)


CONV = Op("conv2d", "int8 GEMM on im2col columns, int32 accumulator, fixed-point requantization",
          lower_layer, Output.OWN, modules=(nn.Conv2d,), accepts=_conv_accepts,
          integer_modules=(QConv2d,), absorbs_activation=True,
          weights=Weights(nn.Conv2d, norms=BATCH_NORMS, output_rank=4, columns=_columns, function=F.conv2d,
                          parameters=CONV_PARAMETERS),
          example=lambda: nn.Conv2d(4, 4, 3, padding=1))
LINEAR = Op("linear", "int8 GEMM, int32 accumulator, fixed-point requantization",
            lower_layer, Output.OWN, modules=(nn.Linear,), integer_modules=(QLinear,), absorbs_activation=True,
            weights=Weights(nn.Linear, function=F.linear,
                            parameters=(("input", ...), ("weight", ...), ("bias", None))),
            example=lambda: nn.Linear(8, 8))
OPS = (CONV, LINEAR)
