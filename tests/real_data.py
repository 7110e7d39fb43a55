"""The committed float networks (the model suite and the branched ones) with their test sets and calibration batches,
loaded once."""
import functools
from copy import deepcopy as copy_module

import torch

import fxq
from fxq.api import Calibrated
from scripts import data, models
from scripts.train import accuracy
from tests.helpers import threads


@functools.cache
def suite_model(name: str):
    """``(model, test split, 512 training images as batches, float test accuracy)``."""
    torch.set_num_threads(threads())
    dataset = models.RECIPES[name].dataset
    model = models.load_trained(name)
    test = data.load(dataset, "test")
    return model, test, data.calibration_batches(dataset, 512), float_accuracy(model, test)


def float_accuracy(model: torch.nn.Module, test) -> float:
    """The float model's test accuracy, run channels-last (a copy): 2.1× faster for MobileNetV2
    and 1.5× for ResNet-18 on 2 AVX2 cores, the same accuracy on the suite's models."""
    nhwc = torch.channels_last
    copy = copy_module(model).to(memory_format=nhwc)
    return accuracy(copy, data.Split(test.images.contiguous(memory_format=nhwc), test.labels))


def fashion():
    """The project's own Fashion-MNIST model, the one the range methods were first studied on."""
    return suite_model("fashion")


@functools.cache
def _quantized(name: str, config: fxq.QConfig):
    model, test, calib, _ = suite_model(name)
    if config.weight_range == "output_aware":  # equal to fxq.quantize's model (tests/test_search_bits.py)
        qmodel = _calibrated(name, config.act_range).quantize(config)
    else:
        qmodel = fxq.quantize(model, calib, config)
    return qmodel, accuracy(qmodel, test)


# Two: the Gram matrices of a ResNet-18 take ~0.6 GB, and the tests ask for one model at a time
@functools.lru_cache(maxsize=2)
def _calibrated(name: str, act_range: str) -> Calibrated:
    """The suite model calibrated once, with the Gram matrices of the output-aware rule, for every
    width and weight rule (configs whose calibration differs, like CLE, are quantized from
    scratch by `Calibrated.quantize`)."""
    model, _, calib, _ = suite_model(name)
    asks_most = fxq.QConfig(weight_bits=4, act_bits=4, act_range=act_range, weight_range="output_aware",
                            bias_correction=True, cross_layer_equalization=False, keep_first_last_8bit=False)
    return Calibrated(model, calib, asks_most)


def quantized(name: str, config: fxq.QConfig | None = None):
    """``(the suite model quantized with config, its test accuracy)``, made once per equal config
    for every test that asks (the W8A8 defaults are the end-to-end bound's, the MSE ranges' ...)."""
    return _quantized(name, config or fxq.QConfig())
