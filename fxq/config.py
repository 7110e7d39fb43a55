"""`QConfig`: what to quantize to, and how the ranges are chosen."""
from __future__ import annotations

from dataclasses import dataclass

# Values each field accepts today. Later issues add values (never new names).
WEIGHT_RANGES = ("minmax",)
ACT_RANGES = ("minmax",)
PLACEMENTS = ("pre",)
MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class QConfig:
    """How one network (or, later, one layer) is quantized.

    weight_bits:  bits of the symmetric, narrow-range weight integers ([-(2^(b-1)-1), 2^(b-1)-1]).
    act_bits:     bits of the asymmetric activation integers ([0, 2^b - 1], held as uint8).
    per_channel:  one weight scale per output channel (True) or one per layer (False).
    weight_range: how a weight scale is chosen: "minmax" is max |w| / (2^(b-1)-1).
    act_range:    how an activation range is chosen from calibration data: "minmax".
    placement:    where a layer's output is quantized relative to its activation: "pre" quantizes
                  the conv/linear/add output before the ReLU, which then runs as max(q, z).
    """

    weight_bits: int = 8
    act_bits: int = 8
    per_channel: bool = True
    weight_range: str = "minmax"
    act_range: str = "minmax"
    placement: str = "pre"

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


def _check_choice(field: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(
            f"QConfig.{field}={value!r} is not supported (yet); choose one of {list(allowed)}"
        )
