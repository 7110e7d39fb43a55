"""Every kernel of fxq.integers.intmath against exact rational arithmetic at the edges of its domain:
multipliers from 2^-40 to the largest representable, zero points 0 and 255, accumulators at ±2^31."""
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxq.integers import intmath
from tests.helpers import needs_exact_int8_gemm

ACC_EDGES = [-2**31, -2**31 + 1, -2**30, -12345, -3, -1, 0, 1, 2, 12345, 2**30, 2**31 - 1]
EXPONENTS = range(-40, 30)


def exact_round(x: Fraction) -> int:
    """Round half away from zero, exactly."""
    magnitude = int(abs(x) + Fraction(1, 2))
    return magnitude if x >= 0 else -magnitude


def as_fraction(m: int, shift: int) -> Fraction:
    return Fraction(m) * Fraction(2) ** (shift - intmath.MULTIPLIER_BITS)


def _reals():
    """Multipliers 2^e·f over the whole range, with mantissas at both ends of [1, 2)."""
    return torch.tensor([2.0**e * f for e in EXPONENTS for f in (1.0, 1.37, 1.9999999)], dtype=torch.float64)


@pytest.mark.parametrize("zero_point", [0, 255])
def test_requantize_is_exact_for_every_multiplier_zero_point_and_accumulator_edge(zero_point):
    real = _reals()
    m, shift = intmath.fixed_point(real)
    acc = torch.tensor(ACC_EDGES, dtype=torch.int64)[:, None].expand(-1, len(real)).contiguous()
    before = acc.clone()
    out = intmath.requantize(acc, m, shift, zero_point, 255)
    assert torch.equal(acc, before)  # an int64 accumulator is read, never overwritten
    assert (m == 0).any() and (acc < 0).any()  # the edges include multipliers that drop everything
    for c in range(len(real)):
        multiplier = as_fraction(int(m[c]), int(shift[c]))
        for i, a in enumerate(ACC_EDGES):
            expected = min(max(zero_point + exact_round(multiplier * a), 0), 255)
            assert int(out[i, c]) == expected, (float(real[c]), a)


def test_fixed_point_keeps_31_bits_or_zeroes_what_cannot_move_an_output():
    real = _reals()
    m, shift = intmath.fixed_point(real)
    for c, value in enumerate(real.tolist()):
        fixed = as_fraction(int(m[c]), int(shift[c]))
        if int(m[c]) == 0:  # every |acc| ≤ 2^31 − 1 then rounds to 0 with the real multiplier too
            assert Fraction(value) * (2**31 - 1) < Fraction(1, 2)
        else:
            assert abs(fixed - Fraction(value)) <= Fraction(value) * Fraction(1, 2**30)
            assert intmath.MULTIPLIER_BITS - int(shift[c]) <= 62  # every right shift fits int64


def test_a_wide_accumulator_keeps_multipliers_an_int32_one_would_drop():
    real = torch.tensor([2.0**-40], dtype=torch.float64)
    bound = 2**50
    m, shift = intmath.fixed_point(real, intmath.multiplier_precision(bound), bound)
    assert int(m) > 0
    acc = torch.tensor([[bound], [-bound], [3 * 2**39]], dtype=torch.int64)
    out = intmath.requantize(acc, m, shift, 7, 2**16 - 1)
    expected = [min(max(7 + exact_round(as_fraction(int(m), int(shift)) * int(a)), 0), 2**16 - 1)
                for a in acc.flatten().tolist()]
    assert out.flatten().tolist() == expected


def test_a_multiplier_too_large_to_hold_is_refused():
    with pytest.raises(ValueError, match="too large"):
        intmath.fixed_point(torch.tensor([2.0**31], dtype=torch.float64))
    m, shift = intmath.fixed_point(torch.tensor([2.0**30 * 0.99], dtype=torch.float64))
    assert int(shift) == 30


@settings(max_examples=300, deadline=None)
@given(za=st.integers(0, 255), zb=st.integers(0, 255), zo=st.integers(0, 255),
       ea=st.integers(-20, 12), eb=st.integers(-20, 12),
       fa=st.floats(1.0, 1.999), fb=st.floats(1.0, 1.999))
def test_integer_add_is_exact_for_any_scales_and_zero_points(za, zb, zo, ea, eb, fa, fb):
    a = intmath.AddOperand.rescale(za, fa * 2.0**ea, 1.0, 8)
    b = intmath.AddOperand.rescale(zb, fb * 2.0**eb, 1.0, 8)
    if intmath.add_shift_gap(a, b) > intmath.add_max_shift_gap(8):
        return  # QAdd refuses these with a named error
    qa = torch.tensor([0, 1, 127, 128, 254, 255], dtype=torch.uint8).repeat_interleave(6)
    qb = torch.tensor([0, 1, 127, 128, 254, 255], dtype=torch.uint8).repeat(6)
    out = intmath.add(qa, qb, a, b, zo, 255)
    for x, y, o in zip(qa.tolist(), qb.tolist(), out.tolist()):
        total = (as_fraction(a.multiplier, a.shift) * (x - za) + as_fraction(b.multiplier, b.shift) * (y - zb))
        assert o == min(max(zo + exact_round(total), 0), 255)


@settings(max_examples=200, deadline=None)
@given(total=st.integers(-2**40, 2**40), count=st.integers(1, 4096))
def test_rounding_divide_is_exact(total, count):
    out = intmath.rounding_divide(torch.tensor([total]), count)
    assert int(out) == exact_round(Fraction(total, count))


def test_rounding_right_shift_at_the_edges_of_int64():
    p = torch.tensor([2**62 - 1, -(2**62), 2**61, -(2**61) - 1], dtype=torch.int64)
    for r in (1, 31, 62):
        out = intmath.rounding_right_shift(p, torch.tensor(r))
        assert out.tolist() == [exact_round(Fraction(int(v), 2**r)) for v in p.tolist()]


@needs_exact_int8_gemm
@pytest.mark.parametrize("k, channels", [(1, 1), (9, 1), (1, 6), (27, 4)])
def test_the_int8_gemm_is_exact_for_single_channel_and_single_column_operands(k, channels):
    """A [M, 1] or [K, 1] operand may carry any stride for its size-1 dimension; the GEMM must
    not read it as the row pitch (a 1×1 conv on one channel, a linear layer with one output)."""
    weight = torch.randint(-127, 128, (channels, k), dtype=torch.int8)
    nhwc = torch.randint(-128, 128, (3, 5, 5, k), dtype=torch.int8)
    columns = nhwc.as_strided((75, k), (k, 1)) if k > 1 else nhwc.as_strided((75, 1), (1, 25))
    gemm_weight, constant = intmath.gemm_operands(weight, 128, torch.zeros(channels, dtype=torch.int32))
    acc = intmath.accumulate(columns, gemm_weight, constant)
    assert torch.equal(acc.long(), columns.long() @ weight.long().t())
