"""Inputs and models a new user brings that once gave silent wrong answers or raw errors."""
import io

import pytest
import torch
from torch import nn

import fxq
from tests.helpers import ConvBnRelu, Residual, output_steps, randomize_bn


class NearDead(nn.Module):
    """conv → bn → relu twice, one channel's batch-norm γ almost zero: its weights vanish beside
    its bias once folded, and its requantization multiplier is tiny."""

    def __init__(self, gamma: float):
        super().__init__()
        self.first, self.second = ConvBnRelu(3, 4), ConvBnRelu(4, 4)
        randomize_bn(self)
        with torch.no_grad():
            self.first.bn.weight[1] = gamma
            self.second.bn.weight[2] = gamma
            self.first.bn.bias[1] = 0.7  # the dead channel still outputs a constant

    def forward(self, x):
        return self.second(self.first(x))


@pytest.mark.parametrize("gamma", [1e-5, 1e-6, 1e-9, 0.0])
def test_near_dead_channels_quantize_and_agree_with_the_twin(gamma):
    model = NearDead(gamma).eval()
    calib = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    qmodel = fxq.quantize(model, calib)
    x = torch.randn(16, 3, 8, 8)
    integer, simulated = output_steps(qmodel, fxq.simulate(qmodel), x)
    assert torch.equal(integer, simulated)
    with torch.no_grad():
        reference = model(x)
        noise = (qmodel(x) - reference).pow(2).sum() / reference.pow(2).sum()
    assert 10 * torch.log10(noise) < -35  # SQNR above 35 dB, as with healthy channels


def test_constant_calibration_data_is_refused():
    with pytest.raises(ValueError, match="every calibration input value is 0"):
        fxq.quantize(randomize_bn(Residual()), [torch.zeros(4, 3, 8, 8)] * 3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_at_inference_name_their_rows(ctx, bad):
    qmodel = fxq.quantize(randomize_bn(Residual()), ctx.calib_loader)
    x = torch.randn(5, 3, 8, 8)
    x[3, 1, 2, 2] = bad
    with pytest.raises(ValueError, match=r"input rows \[3\] contain NaN or Inf"):
        qmodel(x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_narrow_float_inputs_give_the_integers_of_the_same_values_in_float32(ctx, dtype):
    qmodel = fxq.quantize(randomize_bn(Residual()), ctx.calib_loader)
    narrow = (3 * torch.randn(64, 3, 8, 8)).to(dtype)
    assert torch.equal(qmodel(narrow), qmodel(narrow.float()))


def test_a_state_dict_carries_every_integer(ctx):
    model = randomize_bn(Residual())
    qa = fxq.quantize(model, ctx.calib_loader)
    qb = fxq.quantize(model, [3 * torch.rand(4, 3, 8, 8) - 1 for _ in range(3)])  # other ranges
    x = torch.randn(8, 3, 8, 8)
    assert not torch.equal(qa(x), qb(x))
    qa.load_state_dict(qb.state_dict())
    assert torch.equal(qa(x), qb(x))


def test_a_quantized_model_pickles_whole(ctx):
    qmodel = fxq.quantize(randomize_bn(Residual()), ctx.calib_loader)
    buffer = io.BytesIO()
    torch.save(qmodel, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)  # our own object, in this test only
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(again(x), qmodel(x))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, a, b):
        return self.conv(a) + b


def test_a_model_with_two_inputs_is_refused_by_name(ctx):
    with pytest.raises(TypeError, match=r"TwoInputs.forward takes 2 inputs \(a, b\); fxq quantizes models with one"):
        fxq.quantize(TwoInputs(), ctx.calib_loader)
