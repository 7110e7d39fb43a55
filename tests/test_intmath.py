"""The integer kernels against exact rational arithmetic and int64 references."""
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from fxq.integers import intmath
from tests.helpers import needs_exact_int8_gemm


def exact_round_half_away(x: Fraction) -> int:
    magnitude = int(abs(x) + Fraction(1, 2))  # floor(|x| + 1/2)
    return magnitude if x >= 0 else -magnitude


def test_fixed_point_multiplier_has_31_significant_bits():
    reals = torch.tensor([1e-6, 0.0037, 0.25, 0.5, 0.9999999, 1.0, 1.7, 3.2], dtype=torch.float64)
    m, shift = intmath.fixed_point(reals)
    assert ((m >= 2**30) & (m < 2**31)).all()
    rebuilt = m.double() * torch.pow(2.0, shift.double() - 31)
    assert torch.allclose(rebuilt, reals, rtol=2**-30, atol=0)


def test_multiplier_of_one_or_more_is_a_left_shift():
    m, shift = intmath.fixed_point(torch.tensor([1.0, 2.5], dtype=torch.float64))
    assert shift.tolist() == [1, 2]


def test_negligible_multiplier_is_zero_and_huge_one_is_refused():
    m, shift = intmath.fixed_point(torch.tensor([2.0**-40], dtype=torch.float64))
    assert m.item() == 0
    with pytest.raises(ValueError, match="not representable"):
        intmath.fixed_point(torch.tensor([2.0**30], dtype=torch.float64))


def test_rounding_right_shift_rounds_half_away_from_zero():
    p = torch.tensor([5, 6, 7, -5, -6, -7, 4, -4], dtype=torch.int64)  # /4: 1.25 1.5 1.75 ...
    r = torch.tensor(2)
    assert intmath.rounding_right_shift(p, r).tolist() == [1, 2, 2, -1, -2, -2, 1, -1]


def test_requantize_rounds_exact_halves_away_from_zero():
    m, shift = intmath.fixed_point(torch.tensor([0.5], dtype=torch.float64))
    acc = torch.tensor([-3, -1, 1, 3, -4], dtype=torch.int32).reshape(5, 1)  # M·acc = ±0.5, ±1.5
    assert intmath.requantize(acc, m, shift, 10, 255).flatten().tolist() == [8, 9, 11, 12, 8]


def test_requantize_matches_exact_rational_formula():
    torch.manual_seed(0)
    acc = torch.randint(-2**31 + 1, 2**31 - 1, (4, 5, 3), dtype=torch.int64).to(torch.int32)
    real = torch.tensor([0.00037, 0.0123, 0.5], dtype=torch.float64)
    m, shift = intmath.fixed_point(real)
    out = intmath.requantize(acc, m, shift, zero_point=7, qmax=255)
    for idx in [(0, 0, 0), (1, 2, 1), (3, 4, 2), (2, 1, 0)]:
        c = idx[2]
        multiplier = Fraction(int(m[c])) * Fraction(2) ** (int(shift[c]) - 31)
        expected = min(max(7 + exact_round_half_away(multiplier * int(acc[idx])), 0), 255)
        assert int(out[idx]) == expected
    assert out.dtype == torch.uint8


@pytest.mark.parametrize("layout", ["positions", "images", "strided", "scalar"])
def test_a_large_accumulator_requantizes_by_blocks_to_the_element_wise_formula(layout):
    """Above `intmath.BLOCK_ELEMENTS` requantization runs a block of rows at a time: every element
    is still formula (2) (`rounding_right_shift` on int64, at once), in both roundings."""
    torch.manual_seed(2)
    channels = 48
    acc = torch.randint(-2**24, 2**24, (3 * intmath.BLOCK_ELEMENTS // channels + 7, channels), dtype=torch.int32)
    real = torch.rand(channels, dtype=torch.float64) * 2**-12
    if layout == "images":  # [N, H, W, C]: blocks of whole images
        acc = acc[:acc.shape[0] // 64 * 64].reshape(-1, 8, 8, channels)
    elif layout == "strided":  # a channels-first view: done whole
        acc = acc.t().contiguous().t()
    elif layout == "scalar":  # one multiplier for every element (a join's operand)
        acc, real = acc.flatten(), real[:1]
    m, shift = intmath.fixed_point(real)
    zero_point, qmax = 37, 255
    expected = (intmath.rounding_right_shift(acc.to(torch.int64) * m, 31 - shift) + zero_point).clamp(0, qmax)
    out = intmath.requantize(acc, m, shift, zero_point, qmax)
    assert out.dtype == torch.uint8 and out.shape == acc.shape
    assert torch.equal(out.to(torch.int64), expected)
    multiplier = real.to(torch.float32)
    expected = (torch.round(acc.to(torch.float32) * multiplier) + zero_point).clamp(0, qmax)
    assert torch.equal(intmath.runtime_requantize(acc, multiplier, zero_point, qmax).to(torch.float32), expected)


def worst_case_conv(channels: int):
    """All weights ±127 with a sign pattern, inputs at both ends of the uint8 range."""
    torch.manual_seed(1)
    w = torch.where(torch.rand(8, channels, 3, 3) < 0.5, -127, 127).to(torch.int8)
    w[0] = 127  # one channel with every product at the maximum
    x = torch.where(torch.rand(2, channels, 6, 6) < 0.5, 0, 255).to(torch.uint8)
    x[0] = 255
    return x, w


def int64_conv_reference(x, zero_point, w, bias, stride=1, padding=1):
    """Σ W·(I − z) + b with int64 everywhere; padding is real zero, i.e. I = z."""
    padded = F.pad(x.long() - zero_point, (padding,) * 4)  # centered values, so pad with 0
    cols = padded.unfold(2, 3, stride).unfold(3, 3, stride)  # [N, C, H', W', 3, 3]
    out = torch.einsum("nchwij,ocij->nohw", cols, w.long())
    return out + bias.long().reshape(1, -1, 1, 1)


def integer_conv(x, zero_point, w, bias, stride=1, padding=1):
    cols, (n, h, wd) = intmath.conv_columns(x, (3, 3), (stride, stride), (padding, padding), (1, 1),
                                            zero_point)
    acc = intmath.accumulate(cols, *intmath.gemm_operands(w, zero_point, bias))
    return acc.reshape(n, h, wd, -1).permute(0, 3, 1, 2)


@needs_exact_int8_gemm
@pytest.mark.parametrize("zero_point", [0, 128, 255])
def test_accumulate_is_exact_on_the_widest_resnet18_layer(zero_point):
    """K = 512·3·3 = 4608 with |W| = 127 and inputs at the range ends: |acc| reaches 1.5·10^8,
    far past float32's exact 2^24, and the int8 GEMM still matches int64 to the last unit."""
    x, w = worst_case_conv(512)
    bias = torch.full((8,), -2**20, dtype=torch.int32)
    acc = integer_conv(x, zero_point, w, bias)
    reference = int64_conv_reference(x, zero_point, w, bias)
    assert reference.abs().max() > 2**26  # float32 is exact only to 2^24
    assert acc.dtype == torch.int32
    assert torch.equal(acc.long(), reference)


def test_float32_would_not_be_exact_there():
    """Why fxq does not emulate the integer conv with a float32 conv."""
    x, w = worst_case_conv(512)
    naive = F.conv2d(x.float(), w.float(), padding=1).long()
    assert not torch.equal(naive, int64_conv_reference(x, 0, w, torch.zeros(8, dtype=torch.int32)))


@needs_exact_int8_gemm
def test_strided_conv_columns_pad_with_the_zero_point():
    torch.manual_seed(3)
    x = torch.randint(0, 256, (2, 5, 7, 7), dtype=torch.uint8)
    w = torch.randint(-127, 128, (4, 5, 3, 3), dtype=torch.int8)
    bias = torch.randint(-1000, 1000, (4,), dtype=torch.int32)
    got = integer_conv(x, 77, w, bias, stride=2, padding=1)
    assert torch.equal(got.long(), int64_conv_reference(x, 77, w, bias, stride=2, padding=1))


def test_accumulator_bound_is_the_worst_case():
    w = torch.tensor([[1, -2, 3], [-4, 0, 0]], dtype=torch.int8)
    assert intmath.accumulator_bound(w, 10, torch.tensor([5, -100], dtype=torch.int32)) == 140


def test_integer_add_matches_exact_rational_formula():
    torch.manual_seed(2)
    a_q = torch.randint(0, 256, (1000,), dtype=torch.uint8)
    b_q = torch.randint(0, 256, (1000,), dtype=torch.uint8)
    a = intmath.AddOperand.rescale(100, 0.031, 0.047, 8)
    b = intmath.AddOperand.rescale(20, 0.093, 0.047, 8)  # M_B ≥ 1: a left shift
    assert b.shift > 0 >= a.shift
    out = intmath.add(a_q, b_q, a, b, zero_point=60, qmax=255)
    for i in range(0, 1000, 37):
        ma = Fraction(a.multiplier) * Fraction(2) ** (a.shift - 31)
        mb = Fraction(b.multiplier) * Fraction(2) ** (b.shift - 31)
        real = ma * (int(a_q[i]) - 100) + mb * (int(b_q[i]) - 20)
        assert int(out[i]) == min(max(60 + exact_round_half_away(real), 0), 255)


def test_relu_is_max_with_the_zero_point():
    q = torch.tensor([0, 99, 100, 101, 255], dtype=torch.uint8)
    assert intmath.relu(q, 100).tolist() == [100, 100, 100, 101, 255]


def test_lookup_is_indexing_for_every_index_dtype_and_layout():
    torch.manual_seed(0)
    table = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8)
    index = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8).to(memory_format=torch.channels_last)
    wide = torch.randint(0, 1 << 16, (3, 7), dtype=torch.int32).T  # a transposed view
    for i in (index, wide, index.to(torch.int64)):
        got = intmath.lookup(table, i)
        assert got.shape == i.shape and torch.equal(got, table[i.long()])
