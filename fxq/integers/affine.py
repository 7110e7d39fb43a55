"""The affine mapping ``x ≈ s · (q − z)`` and how its parameters are chosen.

Every rounding in fxq — float → integer here (the network input, weights, biases) and
integer → integer requantization in ``fxq.integers.intmath`` — rounds half away from zero.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fxq.integers.intmath import storage_dtype


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, ties away from zero (2.5 → 3, −2.5 → −3).

    ``trunc(x ± 0.5)`` with the sign of x: the magnitude ``|x| + 0.5`` rounds as it does in
    ``sign(x)·⌊|x| + 0.5⌋``, so the two agree on every float, in three passes instead of five."""
    return torch.copysign(torch.full((), 0.5, dtype=x.dtype), x).add_(x).trunc_()


@dataclass(frozen=True)
class ActQParams:
    """Asymmetric activation parameters: ``x ≈ scale · (q − zero_point)``, ``q ∈ [0, 2^bits − 1]``."""

    scale: float
    zero_point: int
    bits: int

    @property
    def qmin(self) -> int:
        return 0

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @classmethod
    def from_range(cls, lo: float, hi: float, bits: int) -> "ActQParams":
        """The parameters that map ``[lo, hi]`` (widened to hold 0) onto ``[0, 2^bits − 1]``.

        Zero must be exactly representable (a padded or ReLU-clipped value is an exact 0), so the
        zero point is an integer and the range is widened to contain 0.
        """
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        qmax = (1 << bits) - 1
        scale = (hi - lo) / qmax
        if scale <= 0.0:  # an all-zero tensor: any scale represents it exactly
            return cls(1.0, 0, bits)
        zero_point = int(min(max(round(-lo / scale), 0), qmax))
        return cls(scale, zero_point, bits)

    def quantize(self, x: torch.Tensor, half_even: bool = False) -> torch.Tensor:
        """float → integers: ``clamp(round(x / s) + z, 0, 2^bits − 1)``, uint8 (int32 above 8 bits);
        ties away from zero, or to even (ONNX's QuantizeLinear) with ``half_even``."""
        x = x / self.scale
        q = (torch.round(x) if half_even else round_half_away(x)) + self.zero_point
        return q.clamp_(self.qmin, self.qmax).to(storage_dtype(self.bits))

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        """integer → float32: ``s · (q − z)``."""
        return (q.to(torch.float32) - self.zero_point) * self.scale

    def snap(self, x: torch.Tensor) -> torch.Tensor:
        """``dequantize(quantize(x))``, the same values, without the integer tensor: the same float
        operations done in place (what sensitivity studies run on every layer, many times)."""
        y = x / self.scale
        y = torch.copysign(torch.full((), 0.5, dtype=y.dtype), y).add_(y).trunc_()  # round_half_away
        return y.add_(self.zero_point).clamp_(self.qmin, self.qmax).sub_(self.zero_point).mul_(self.scale)


def weight_qmax(bits: int) -> int:
    """Largest magnitude of a narrow-range symmetric ``bits``-bit weight: ``2^(bits−1) − 1``."""
    return (1 << (bits - 1)) - 1


def weight_scales(weight: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
    """Min-max symmetric scales, one per output channel (dim 0), as float64 ``[C_out]``.

    A per-tensor scale is the same value repeated, so every kernel can treat scales per channel.
    An all-zero channel gets scale 1 (its integers are all 0 whatever the scale).
    """
    flat = weight.detach().reshape(weight.shape[0], -1).abs()  # a maximum is exact in any float type
    max_abs = (flat.amax(dim=1) if per_channel else flat.amax().expand(weight.shape[0])).to(torch.float64)
    scales = max_abs / weight_qmax(bits)
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def quantize_weight(weight: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """float weight → int8 ``clamp(round(w / s_c), −qmax, qmax)`` with ``s_c`` per output channel."""
    shape = (-1,) + (1,) * (weight.dim() - 1)
    q = round_half_away(weight.detach().to(torch.float64) / scales.reshape(shape))
    qmax = weight_qmax(bits)
    return q.clamp_(-qmax, qmax).to(torch.int8)


def quantize_bias(bias: torch.Tensor | None, input_scale: float, scales: torch.Tensor) -> torch.Tensor:
    """float bias → int32 at scale ``s_in · s_w[c]`` (zero point 0), so it adds straight into the
    accumulator. A missing bias is zeros."""
    if bias is None:
        return torch.zeros(len(scales), dtype=torch.int32)
    q = round_half_away(bias.detach().to(torch.float64) / (input_scale * scales))
    limit = 2**31 - 1
    if q.abs().max() > limit:
        raise ValueError("a bias does not fit int32 at scale s_in·s_w; the input scale is too small")
    return q.to(torch.int32)
