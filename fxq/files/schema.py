"""How a module of a quantized graph is saved and checked on load: its schema.

Every module type a saved model may hold declares one `Schema` (integer modules as the class
attribute ``schema``; float modules a graph keeps, in `fxq.ops.fallback`). `fxq.files.serialize`
rebuilds a module from exactly the attributes and tensors its schema lists and runs its range
check, so a file can only ever produce modules whose integers the kernels were written for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fxq.config import MAX_BITS, MIN_BITS, WIDE_ACT_BITS
from fxq.config import REQUANTIZE as _REQUANTIZE

Check = Callable[[object], bool]


class SchemaError(ValueError):
    """A module's saved fields break its schema."""


@dataclass(frozen=True)
class Schema:
    """What a saved module of one type consists of: its attributes (each with a check) and its
    tensors (each with a dtype). ``build`` makes the module from them (None: restore the fields
    as they are, then ``ranges`` checks the integers the kernels rely on)."""

    attributes: dict[str, Check]
    tensors: dict[str, torch.dtype]
    build: Callable[[type, dict, dict], nn.Module] | None = None
    optional_tensors: frozenset = frozenset()
    optional_attributes: frozenset = frozenset()  # what files written before they existed lack
    ranges: Callable[[nn.Module], None] | None = None
    loose: bool = False  # any subset of the attributes; the tensors the built module's state holds


def expect(condition: bool, problem: str) -> None:
    if not condition:
        raise SchemaError(problem)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def act_bits(v) -> bool:
    return is_int(v) and (MIN_BITS <= v <= MAX_BITS or v == WIDE_ACT_BITS)


def bits_tuple(v) -> bool:
    return isinstance(v, tuple) and 1 <= len(v) <= 4096 and all(map(act_bits, v))


def ints(low: int, length: int | None = None) -> Check:
    """A tuple of ints ≥ low (of ``length`` items, if given)."""
    return lambda v: (isinstance(v, tuple) and (length is None or len(v) == length)
                      and all(is_int(x) and x >= low for x in v))


def int_at_least(low: int) -> Check:
    return lambda v: is_int(v) and v >= low


def int_or_pair(low: int) -> Check:
    return lambda v: (is_int(v) and v >= low) or ints(low, 2)(v)


def optional(check: Check) -> Check:
    return lambda v: v is None or check(v)


def one_of(*values) -> Check:
    return lambda v: any(v == x and type(v) is type(x) for x in values)


REQUANTIZE = one_of(*_REQUANTIZE)


def finite_float(v) -> bool:
    return isinstance(v, float) and v == v and abs(v) != float("inf")


def plain(v) -> bool:
    """A constructor argument of a torch module: a number, string, bool or None, or a short
    tuple/list of numbers."""
    if v is None or isinstance(v, (bool, str)) or is_int(v) or finite_float(v):
        return not isinstance(v, str) or len(v) <= 64
    return (isinstance(v, (tuple, list)) and len(v) <= 8
            and all(is_int(x) or finite_float(x) for x in v))


def scalar(module: nn.Module, name: str) -> int:
    value = getattr(module, name)
    expect(value.dim() == 0, f"{name} must be a scalar")
    return int(value)


def zero_point_fits(module: nn.Module, name: str, bits: int) -> None:
    expect(0 <= scalar(module, name) <= (1 << bits) - 1, f"{name} is outside its {bits}-bit range")


def parameters_fit(module: nn.Module, widths: tuple[int, ...]) -> None:
    """``scales`` and ``zero_points`` hold one positive finite scale and one zero point within its
    width for each of ``widths`` (the inputs', then the output's)."""
    count = len(widths)
    expect(module.scales.shape == (count,) and module.zero_points.shape == (count,),
           f"{count} scales and zero points")
    expect(bool((module.scales > 0).all() and torch.isfinite(module.scales).all()), "scales must be > 0")
    for z, bits in zip(module.zero_points.tolist(), widths):
        expect(0 <= z < (1 << bits), "a zero point is outside its width")


def fixed_point_fits(m: torch.Tensor, shift: torch.Tensor, name: str) -> None:
    """Multipliers in ``[0, 2^31)`` and shifts in ``[−31, 30]``: what `fxq.integers.intmath` is exact for."""
    m, shift = m.to(torch.int64), shift.to(torch.int64)
    expect(bool((m >= 0).all() and (m < 2**31).all() and (shift < 31).all() and (shift >= -31).all()),
           f"{name} multiplier or shift outside [0, 2^31) × [−31, 30]")


def table_fits(table: torch.Tensor, entries: int, bits: int) -> None:
    """A lookup table of ``entries`` answers, each a ``bits``-bit integer."""
    expect(table.dim() == 1 and table.numel() == entries, f"the table must have {entries} entries")
    expect(bool((table.to(torch.int64) >= 0).all() and (table.to(torch.int64) < (1 << bits)).all()),
           f"the table holds values outside {bits} bits")
