"""The committed float networks (the model suite and the branched ones) with their test sets and calibration batches,
loaded once."""
import functools

import torch

import fxq
from scripts import data, models
from scripts.train import accuracy


@functools.cache
def suite_model(name: str):
    """``(model, test split, 512 training images as batches, float test accuracy)``."""
    torch.set_num_threads(2)
    dataset = models.RECIPES[name].dataset
    model = models.load_trained(name)
    test = data.load(dataset, "test")
    return model, test, data.calibration_batches(dataset, 512), accuracy(model, test)


def fashion():
    """The project's own Fashion-MNIST model, the one the range methods were first studied on."""
    return suite_model("fashion")


@functools.cache
def _quantized(name: str, config: fxq.QConfig):
    model, test, calib, _ = suite_model(name)
    qmodel = fxq.quantize(model, calib, config)
    return qmodel, accuracy(qmodel, test)


def quantized(name: str, config: fxq.QConfig | None = None):
    """``(the suite model quantized with config, its test accuracy)``, made once per equal config
    for every test that asks (the W8A8 defaults are the end-to-end bound's, the MSE ranges' ...)."""
    return _quantized(name, config or fxq.QConfig())
