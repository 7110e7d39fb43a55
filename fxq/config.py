"""`QConfig`: what to quantize to, and how the ranges are chosen."""
from __future__ import annotations

from dataclasses import dataclass

# Values each field accepts today. Later issues add values (never new names).
WEIGHT_RANGES = ("minmax", "mse", "output_aware")
ACT_RANGES = ("minmax", "moving_average", "percentile", "mse", "entropy")
PLACEMENTS = ("pre", "post", "both")
MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class QConfig:
    """How one network (or, later, one layer) is quantized.

    weight_bits:  bits of the symmetric, narrow-range weight integers ([-(2^(b-1)-1), 2^(b-1)-1]).
    act_bits:     bits of the asymmetric activation integers ([0, 2^b - 1], held as uint8).
    per_channel:  one weight scale per output channel (True) or one per layer (False).
    weight_range: how weight scales are chosen (`fxq.weight_ranges`): "minmax" (max |w|),
                  "mse" (the clipping minimizing ‖w − Q(w)‖²), "output_aware" (clipping and
                  per-weight up/down rounding minimizing the layer's output error ‖ΔW·X‖² on
                  the calibration inputs).
    act_range:    how an activation range is chosen from calibration data (`fxq.observers`):
                  "minmax", "moving_average", "percentile", "mse", "entropy".
    placement:    where a layer's output is quantized relative to its ReLU: "pre" quantizes the
                  conv/linear/add output before the ReLU, which then runs as max(q, z); "post"
                  quantizes only the ReLU's output (z = 0, the ReLU is the requantization's
                  clamp); "both" does one, then the other (max(q, z), then a requantization).
    percentile:   for act_range="percentile": the share of values kept inside the range, in %.
    histogram_bins: bins of the histogram the percentile, mse and entropy observers keep.
    averaging_constant: for act_range="moving_average": c in v ← v + c·(batch − v).
    """

    weight_bits: int = 8
    act_bits: int = 8
    per_channel: bool = True
    weight_range: str = "minmax"
    act_range: str = "minmax"
    placement: str = "pre"
    percentile: float = 99.99
    histogram_bins: int = 2048
    averaging_constant: float = 0.01

    def __post_init__(self) -> None:
        for field in ("weight_bits", "act_bits"):
            bits = getattr(self, field)
            if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
                raise ValueError(
                    f"QConfig.{field}={bits!r}: use an int from {MIN_BITS} to {MAX_BITS}"
                )
        if not isinstance(self.per_channel, bool):
            raise TypeError(f"QConfig.per_channel={self.per_channel!r}: use True or False")
        _check_choice("weight_range", self.weight_range, WEIGHT_RANGES)
        _check_choice("act_range", self.act_range, ACT_RANGES)
        _check_choice("placement", self.placement, PLACEMENTS)
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"QConfig.percentile={self.percentile!r}: use a value in (50, 100]")
        if not isinstance(self.histogram_bins, int) or self.histogram_bins < 2 ** self.act_bits:
            raise ValueError(f"QConfig.histogram_bins={self.histogram_bins!r}: use an int ≥ "
                             f"2^act_bits = {2 ** self.act_bits}")
        if not 0.0 < self.averaging_constant <= 1.0:
            raise ValueError(f"QConfig.averaging_constant={self.averaging_constant!r}: use (0, 1]")


def _check_choice(field: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(
            f"QConfig.{field}={value!r} is not supported (yet); choose one of {list(allowed)}"
        )
