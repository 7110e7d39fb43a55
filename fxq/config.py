"""`QConfig`: what to quantize to, and how the ranges are chosen."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields

# Values each field accepts today. Later issues add values (never new names).
WEIGHT_RANGES = ("minmax", "mse", "output_aware")
ACT_RANGES = ("minmax", "moving_average", "percentile", "mse", "entropy")
PLACEMENTS = ("pre", "post", "both")


class Rounding(str, enum.Enum):
    """How an integer module rounds, chosen when it is built (`QConfig.requantize`): fxq's fixed
    point (int32 multiplier and shift, ties away from zero), or onnxruntime's own arithmetic
    (float32 multipliers, ties to even), so that the deployed model is bit-exact."""

    FIXED_POINT = "fixed_point"
    ONNXRUNTIME = "onnxruntime"


REQUANTIZE = tuple(r.value for r in Rounding)
RUNTIMES = ("onnxruntime", "openvino")  # what `fxq.deploy` runs an exported model on
MIN_BITS, MAX_BITS = 2, 8
WIDE_ACT_BITS = 16  # activations may also be 16-bit (int32 storage, float64-exact GEMM)
# Fields that None leaves to `defaults_for` the bit widths.
AUTO_FIELDS = ("weight_range", "act_range", "cross_layer_equalization", "bias_correction",
               "keep_first_last_8bit", "requantize", "reconstruct")
SWITCHES = ("cross_layer_equalization", "bias_correction", "keep_first_last_8bit", "reconstruct")  # True/False


@dataclass(frozen=True)
class QConfig:
    """How one network (or, later, one layer) is quantized.

    weight_bits:  bits of the symmetric, narrow-range weight integers ([-(2^(b-1)-1), 2^(b-1)-1]).
    act_bits:     bits of the asymmetric activation integers ([0, 2^b - 1]): 2 to 8, held as
                  uint8, or 16, held as int32 (the accumulator check then asks for int64).
    per_channel:  one weight scale per output channel (True) or one per layer (False).
    weight_range: how weight scales are chosen (`fxq.integers.weight_ranges`): "minmax" (max |w|),
                  "mse" (the clipping minimizing ‖w − Q(w)‖²), "output_aware" (clipping and
                  per-weight up/down rounding minimizing the layer's output error ‖ΔW·X‖² on
                  the calibration inputs).
    act_range:    how an activation range is chosen from calibration data (`fxq.integers.observers`):
                  "minmax", "moving_average", "percentile", "mse", "entropy".
    cross_layer_equalization: rescale conv → ReLU → conv channel pairs to equal weight ranges
                  before quantizing (`passes.equalize`); the float function is unchanged.
    bias_correction: remove the expected output shift that weight rounding causes, measured on
                  the calibration inputs (`passes.correct_bias`).
    keep_first_last_8bit: the first and last conv/linear (and the network input) stay at 8 bits
                  whatever the widths above.
    placement:    where a layer's output is quantized relative to its ReLU: "pre" quantizes the
                  conv/linear/add output before the ReLU, which then runs as max(q, z); "post"
                  quantizes only the ReLU's output (z = 0, the ReLU is the requantization's
                  clamp); "both" does one, then the other (max(q, z), then a requantization).
    requantize:   the arithmetic that brings integers to new parameters. "onnxruntime" (the
                  default up to 8-bit activations): what onnxruntime's int8 kernels compute on x86
                  (MLAS), so that `fxq.deploy` is bit-exact with the quantized model: the
                  accumulator times a float32 multiplier rounded half to even, adds in float32 with
                  fused multiply-adds, inputs rounded half to even (`fxq.integers.intmath`).
                  "fixed_point" (the default for 16-bit activations, which onnxruntime's kernels do
                  not take): an int32 multiplier and a rounding right shift, half away from zero
                  (what an integer-only accelerator runs; DESIGN.md).
    pair_safe:    quantize so that onnxruntime's fast U8S8 kernels compute every layer exactly on
                  every CPU (`fxq.deployment.saturation`): without VNNI they add two uint8 × int8 products in
                  a 16-bit lane, which a layer with 8-bit inputs and 8-bit weights can pass.
                  True holds such layers' weights at 7 bits (±63; 2·255·63 < 2^15), so
                  `fxq.deploy` keeps int8 weights (U8S8) there instead of the exact but slower
                  uint8 ones (U8U8). Measured on the model suite against 8-bit weights:
                  README, "Exact and fast on every CPU" (python -m scripts.pair_safe).
    reconstruct:  learn, one conv/linear at a time, how each weight rounds (up or down) and where
                  the layer's output range ends, against the float model's output on the calibration
                  images, with the layers before it already quantized (`passes.reconstruct`:
                  AdaRound, LSQ steps, QDrop). The result is still a choice of integers and scales.
                  On by default when weights or activations are below 8 bits: there it lowered
                  the loss of every depthwise and concat net of the suite at W4A4 and W3A3
                  (MobileNetV2 W3A3 −21.6 → −4.3 points) and left the ResNets where they were;
                  it costs 1–2 minutes on 2 cores where the weight rules take seconds (README,
                  "Learned rounding and ranges").
    reconstruct_iterations, reconstruct_batch, reconstruct_samples: its Adam steps per layer,
                  the samples in each step (up to 64 output positions of each), and how many
                  calibration samples it learns on (the first ones; calibration keeps them).
    percentile:   for act_range="percentile": the share of values kept inside the range, in %.
    histogram_bins: the least number of bins over the observed values that the percentile, mse
                  and entropy observers read their range from (they keep twice as many, so the
                  grid can grow in one pass).
    averaging_constant: for act_range="moving_average": c in v ← v + c·(batch − v).

    weight_range, act_range, cross_layer_equalization, bias_correction and keep_first_last_8bit
    left at None take the defaults for the bit widths (`defaults_for`): what measured best at
    those widths over a suite of differently trained models (docs/low_bits.md).
    """

    weight_bits: int = 8
    act_bits: int = 8
    per_channel: bool = True
    weight_range: str | None = None
    act_range: str | None = None
    cross_layer_equalization: bool | None = None
    bias_correction: bool | None = None
    keep_first_last_8bit: bool | None = None
    placement: str = "pre"
    requantize: str | None = None
    pair_safe: bool = False
    reconstruct: bool | None = None
    reconstruct_iterations: int = 300
    reconstruct_batch: int = 32
    reconstruct_samples: int = 512
    percentile: float = 99.99
    histogram_bins: int = 2048
    averaging_constant: float = 0.01
    _auto: frozenset = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, extra in (("weight_bits", ()), ("act_bits", (WIDE_ACT_BITS,))):
            bits = getattr(self, name)
            if (not isinstance(bits, int) or isinstance(bits, bool)
                    or not (MIN_BITS <= bits <= MAX_BITS or bits in extra)):
                also = f" (or {WIDE_ACT_BITS})" if extra else ""
                raise ValueError(f"QConfig.{name}={bits!r}: use an int from {MIN_BITS} to {MAX_BITS}{also}")
        for name in ("per_channel", "pair_safe") + SWITCHES:
            value = getattr(self, name)
            if not isinstance(value, bool) and not (value is None and name in AUTO_FIELDS):
                raise TypeError(f"QConfig.{name}={value!r}: use True or False")
        auto = frozenset(name for name in AUTO_FIELDS if getattr(self, name) is None)
        object.__setattr__(self, "_auto", auto)
        defaults = defaults_for(self.weight_bits, self.act_bits, self.per_channel)
        for name in auto:
            object.__setattr__(self, name, defaults[name])
        _check_choice("weight_range", self.weight_range, WEIGHT_RANGES)
        _check_choice("act_range", self.act_range, ACT_RANGES)
        _check_choice("placement", self.placement, PLACEMENTS)
        _check_choice("requantize", self.requantize, REQUANTIZE)
        if self.requantize == "onnxruntime" and self.act_bits > 8:
            raise ValueError(f"QConfig.requantize='onnxruntime' with act_bits={self.act_bits}: onnxruntime's "
                             "integer kernels take activations of up to 8 bits; use act_bits ≤ 8 or "
                             "requantize='fixed_point'")
        if self.pair_safe and self.act_bits > 8:
            raise ValueError(f"QConfig.pair_safe=True with act_bits={self.act_bits}: it concerns onnxruntime's "
                             "8-bit kernels, which take activations of up to 8 bits; use act_bits ≤ 8")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"QConfig.percentile={self.percentile!r}: use a value in (50, 100]")
        # The entropy rule compares the histogram against every level; the others only need
        # bins finer than the 8-bit grid.
        needed = 2 ** (self.act_bits if self.act_range == "entropy" else min(self.act_bits, 8))
        if not isinstance(self.histogram_bins, int) or self.histogram_bins < needed:
            raise ValueError(f"QConfig.histogram_bins={self.histogram_bins!r}: use an int ≥ {needed} "
                             f"for act_bits={self.act_bits}, act_range={self.act_range!r}")
        for name in ("reconstruct_iterations", "reconstruct_batch", "reconstruct_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"QConfig.{name}={value!r}: use an int ≥ 1")
        if not 0.0 < self.averaging_constant <= 1.0:
            raise ValueError(f"QConfig.averaging_constant={self.averaging_constant!r}: use (0, 1]")

    @property
    def layer_weight_bits(self) -> int:
        """The width a layer's weights are quantized to: ``weight_bits``, at most 7 where
        ``pair_safe`` meets 8-bit activations (formula (3) of `fxq.deployment.saturation`)."""
        return min(self.weight_bits, 7) if self.pair_safe and self.act_bits == 8 else self.weight_bits

    def with_bits(self, weight_bits: int | None = None, act_bits: int | None = None) -> "QConfig":
        """This config at other widths; the methods it left to the defaults follow the new widths
        (``dataclasses.replace`` would keep the old widths' choices)."""
        return self.replace(weight_bits=self.weight_bits if weight_bits is None else weight_bits,
                            act_bits=self.act_bits if act_bits is None else act_bits)

    def replace(self, **changes) -> "QConfig":
        """This config with ``changes``; fields it left to the defaults stay defaulted."""
        values = {f.name: None if f.name in self._auto else getattr(self, f.name)
                  for f in fields(self) if f.init}
        return QConfig(**{**values, **changes})


def defaults_for(weight_bits: int, act_bits: int, per_channel: bool = True) -> dict:
    """The methods fxq uses at these widths unless told otherwise (docs/low_bits.md measures them).

    Activations take the MSE-optimal clipping at every width: at 8 bits it matched min-max on
    the trained suite (mean +0.005 vs +0.004 points against float, worst −0.15 vs −0.18 on MobileNetV3) and
    raised SQNR on each of 12 timm CNNs by 0.1–3.4 dB, where a few large values stretched a min-max
    range (ResNeSt's attention: 17.7 → 19.9 dB, above PyTorch's own histogram-ranged PTQ at 19.2).
    8-bit weights keep min-max ranges. Below 8 bits the rounding error dominates: weights take the
    output-aware rule and bias correction, and CLE when one scale serves the whole tensor (with a
    scale per channel, equalizing channels no longer helps the weights and only reshapes the
    activations: it measured slightly worse). Below 8 bits, too, the network input and the first
    and last layers stay at 8 bits: on models fxq was not tuned on they carried most of the loss
    (a 4-bit input alone cost 9 points on one), for under 1 % of the weights. Below 8 bits each
    layer's rounding and output step are then learned (`passes.reconstruct`).

    Requantization follows onnxruntime's arithmetic wherever its kernels take the activations (up
    to 8 bits), so that the default model deploys bit-exact at onnxruntime's int8 speed; over the
    model suite it measured as accurate as fixed point (README, "Results"; `scripts/model_suite.py`).
    """
    low_weights, low_acts = weight_bits < 8, act_bits < 8
    return {
        "weight_range": "output_aware" if low_weights else "minmax",
        "act_range": "mse",
        "cross_layer_equalization": low_weights and not per_channel,
        "bias_correction": low_weights,
        "keep_first_last_8bit": low_weights or low_acts,
        "requantize": "onnxruntime" if act_bits <= 8 else "fixed_point",
        "reconstruct": low_weights or low_acts,
    }


def _check_choice(field: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(
            f"QConfig.{field}={value!r} is not supported (yet); choose one of {list(allowed)}"
        )
