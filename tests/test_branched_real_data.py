"""Networks that are not ResNets, trained on Fashion-MNIST (full 10k test set, 512 calibration
images): fxq's W8A8 defaults lose at most a point, and cross-layer equalization across
depthwise convs and ReLU6 rescues per-tensor MobileNetV2."""
import pytest

import fxq
from scripts import models
from tests.real_data import quantized, suite_model

pytestmark = pytest.mark.real_data


def quantized_accuracy(name: str, config: fxq.QConfig) -> float:
    return quantized(name, config)[1]


@pytest.mark.parametrize("name", sorted(models.BRANCHED))
def test_the_w8a8_defaults_lose_at_most_a_point(name):
    float_acc = suite_model(name)[3]
    assert float_acc - quantized_accuracy(name, fxq.QConfig()) <= 1.0
