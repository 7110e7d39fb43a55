"""The committed float networks (the model suite and the branched ones) with their test sets and calibration batches,
loaded once."""
import functools

import torch

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
