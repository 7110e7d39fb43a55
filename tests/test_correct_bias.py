"""Bias correction: the mean output error of weight rounding goes back into the bias."""
import torch

import fxq
from fxq.graphs import records
from passes.calibrate import calibrate
from passes.correct_bias import correct_bias
from passes.fold_bn import fold_bn
from passes.fuse import fuse
from passes.insert_observers import insert_observers
from passes.trace import trace
from tests.helpers import Chain


def _config(correct: bool, **fields):
    return fxq.QConfig(weight_bits=3, per_channel=False, weight_range="minmax",
                       cross_layer_equalization=False, bias_correction=correct, reconstruct=False, **fields)


def _calib():
    torch.manual_seed(1)
    return [torch.rand(16, 3, 16, 16) for _ in range(4)]  # non-negative: a real mean to correct


def test_corrected_layer_has_zero_mean_output_error_on_the_calibration_data():
    model = Chain().eval()
    ctx = fxq.PassContext(_config(True), _calib())
    gm = model
    for step in (trace, fold_bn, fuse, insert_observers, calibrate):
        gm = step(gm, ctx)
    conv = gm.get_submodule("conv1")
    float_bias = conv.bias.detach().clone()
    gm = correct_bias(gm, ctx)
    node = next(n for n in gm.graph.nodes if n.target == "conv1")
    weight_q, scales = records.get(node, records.QuantizedWeight)
    x = torch.cat(ctx.calib_loader)
    deq = weight_q.double() * scales.reshape(-1, 1, 1, 1)
    exact = torch.nn.functional.conv2d(x.double(), conv.weight.double(), float_bias.double(), padding=1)
    corrected = torch.nn.functional.conv2d(x.double(), deq, conv.bias.double(), padding=1)
    uncorrected = torch.nn.functional.conv2d(x.double(), deq, float_bias.double(), padding=1)
    mean_error = lambda y: (y - exact).mean(dim=(0, 2, 3)).abs().max()  # noqa: E731
    assert mean_error(corrected) < 1e-4 * mean_error(uncorrected)  # float32 bias: not exactly 0


def test_bias_correction_reduces_the_network_output_bias():
    model = Chain().eval()
    calib = _calib()
    x = torch.rand(32, 3, 16, 16)
    with torch.no_grad():
        reference = model(x)
        shift = {c: float((fxq.quantize(model, calib, _config(c))(x) - reference).mean(dim=(0, 2, 3)).abs().mean())
                 for c in (False, True)}
    assert shift[True] < 0.5 * shift[False]


def test_user_model_keeps_its_biases():
    model = Chain().eval()
    before = model.conv1.bias.clone()
    fxq.quantize(model, _calib(), _config(True))
    assert torch.equal(model.conv1.bias, before)


def test_defaults_switch_it_on_below_8_bit_weights():
    assert not fxq.QConfig().bias_correction
    assert fxq.QConfig(weight_bits=6, act_bits=6).bias_correction
    assert not fxq.QConfig(weight_bits=6, bias_correction=False).bias_correction
