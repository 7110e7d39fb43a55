from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxq.integers.affine import ActQParams, quantize_bias, quantize_weight, round_half_away, weight_scales


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=64), min_size=1, max_size=50))
def test_rounding_takes_ties_away_from_zero_on_every_float(values):
    x = torch.tensor(values, dtype=torch.float64)
    for value, rounded in zip(values, round_half_away(x).tolist()):
        exact = Fraction(value)
        nearest = int(abs(exact) + Fraction(1, 2)) * (1 if exact >= 0 else -1)
        # |x| + 0.5 is itself rounded in float64 just below 2^-1 and at ≥ 2^52 (where x is whole)
        assert rounded == nearest or abs(exact) >= 2**52 or abs(exact) == Fraction(0.49999999999999994)


def test_exact_halves_round_away_from_zero_in_float32_and_float64():
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 2.4999, -2.4999], dtype=dtype)
        assert round_half_away(x).tolist() == [-3, -2, -1, 1, 2, 3, 2, -2]


def test_range_is_widened_to_hold_zero_and_zero_is_exact():
    qp = ActQParams.from_range(0.5, 2.0, 8)  # all positive: the range becomes [0, 2]
    assert qp.zero_point == 0 and qp.scale == pytest.approx(2.0 / 255)
    qp = ActQParams.from_range(-1.3, 0.7, 8)
    assert qp.dequantize(qp.quantize(torch.tensor([0.0]))).item() == 0.0


def test_quantize_dequantize_error_is_at_most_half_a_step_inside_the_range():
    qp = ActQParams.from_range(-2.0, 5.0, 8)
    x = torch.linspace(-2.0, 5.0, 1001)
    q = qp.quantize(x)
    assert q.dtype == torch.uint8
    assert (qp.dequantize(q) - x).abs().max() <= qp.scale / 2 + 1e-6


def test_constant_zero_tensor_gets_a_usable_scale():
    assert ActQParams.from_range(0.0, 0.0, 8) == ActQParams(1.0, 0, 8)


def test_weights_are_symmetric_narrow_range_per_channel():
    w = torch.tensor([[0.5, -1.0], [0.02, 0.01], [0.0, 0.0]])
    scales = weight_scales(w, 8, per_channel=True)
    q = quantize_weight(w, scales, 8)
    assert q.dtype == torch.int8
    assert q[0].tolist() == [64, -127] and q[1].tolist() == [127, 64] and q[2].tolist() == [0, 0]
    assert scales[2] == 1.0


def test_per_tensor_scale_is_shared():
    w = torch.tensor([[0.5, -1.0], [0.02, 0.01]])
    scales = weight_scales(w, 4, per_channel=False)
    assert torch.equal(scales, torch.full((2,), 1.0 / 7, dtype=torch.float64))
    assert quantize_weight(w, scales, 4)[0].tolist() == [4, -7]


def test_bias_is_int32_at_input_times_weight_scale():
    scales = torch.tensor([0.01, 0.02], dtype=torch.float64)
    q = quantize_bias(torch.tensor([0.3, -0.5]), 0.1, scales)
    assert q.dtype == torch.int32 and q.tolist() == [300, -250]
    assert quantize_bias(None, 0.1, scales).tolist() == [0, 0]


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6, width=32), min_size=1, max_size=40),
       st.floats(min_value=1e-4, max_value=10.0), st.integers(0, 255))
def test_snapping_to_the_grid_is_quantize_then_dequantize(values, scale, zero_point):
    qp = ActQParams(scale, zero_point, 8)
    x = torch.tensor(values, dtype=torch.float32)
    assert torch.equal(qp.snap(x), qp.dequantize(qp.quantize(x)))
