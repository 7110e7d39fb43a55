"""The range and rounding rules on the real Fashion-MNIST ResNet-18 (full 10k test set)."""

import pytest

import fxq
from fxq.config import ACT_RANGES
from tests.real_data import fashion, quantized

pytestmark = pytest.mark.real_data


def accuracy_with(**fields) -> float:
    return quantized("fashion", fxq.QConfig(**fields))[1]


def test_w4_per_tensor_mse_beats_minmax_and_output_aware_beats_mse():
    # Activations held at min-max ranges, as when this gap was measured: the test isolates the
    # weight range rule, and MSE activation ranges (the default since) absorb part of the
    # weight error and narrow the gap to ~0.5 points. Learned rounding (the default below 8 bits)
    # would replace the rules' integers it compares.
    w4 = dict(weight_bits=4, per_channel=False, cross_layer_equalization=False, bias_correction=False,
              keep_first_last_8bit=False, act_range="minmax", reconstruct=False)
    minmax = accuracy_with(weight_range="minmax", **w4)
    mse = accuracy_with(weight_range="mse", **w4)
    output_aware = accuracy_with(weight_range="output_aware", **w4)
    print(f"W4A8 per-tensor: minmax {minmax:.2f}, mse {mse:.2f}, output_aware {output_aware:.2f}")
    assert mse >= minmax + 0.5
    assert output_aware > mse


@pytest.mark.parametrize("act_range", ACT_RANGES)
def test_no_activation_method_loses_more_than_03_points_at_w8a8(act_range):
    float_acc = fashion()[3]
    assert float_acc - accuracy_with(act_range=act_range) <= 0.3
