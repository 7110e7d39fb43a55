"""The committed Fashion-MNIST ResNet-18 with its test set and calibration batches, loaded once."""
import functools

import torch

from scripts import data, models
from scripts.train import accuracy


@functools.cache
def fashion():
    """``(model, test split, 512 training images as batches, float test accuracy)``."""
    torch.set_num_threads(2)
    model = models.load_trained("fashion")
    test = data.load("fashion", "test")
    return model, test, data.calibration_batches("fashion", 512), accuracy(model, test)
