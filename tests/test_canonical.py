"""What a call computes, not how it is spelled (`fxq.graphs.canonical`): a subclass that only constructs a
torch layer differently is that layer, a batch norm over flat values is left as it is, and a
model's own shape assertion is checked by calibration, naming the node."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxq
from tests.helpers import check_quantized, randomize_bn


def _settled(model: nn.Module) -> nn.Module:
    """Batch norms with their own statistics, as trained ones have."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _calib():
    return [torch.randn(8, 3, 12, 12) for _ in range(4)]


class PlainSubclass(nn.BatchNorm2d):
    """A user's batch norm that changes nothing about what it computes."""


def test_a_subclass_that_computes_batch_norm_folds_too(tmp_path):
    torch.manual_seed(0)
    model = _settled(nn.Sequential(nn.Conv2d(3, 4, 3), PlainSubclass(4), nn.ReLU(), PlainSubclass(4)))
    qmodel = fxq.quantize(model, _calib())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qmodel.modules())
    assert check_quantized(qmodel, model, torch.randn(8, 3, 12, 12), tmp_path) > 25


def test_a_batch_norm_over_a_flat_input_is_left_as_it_is():
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))).eval()
    qmodel = fxq.quantize(model, [torch.randn(8, 6) for _ in range(2)])
    with torch.no_grad():
        x = torch.randn(5, 6)
        assert (qmodel(x) - model(x)).abs().max() < 0.1


class Asserting(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        torch._assert(x.shape[2] == 12, "this network takes 12-pixel-high images")
        return self.conv(x)


def test_a_models_own_assertion_fails_calibration_with_its_message_and_the_node():
    with pytest.raises(ValueError, match=r"cannot run through the model at node '_assert'.*12-pixel-high"):
        fxq.quantize(Asserting(), [torch.randn(2, 3, 10, 12)])


class StandardizedConv(nn.Conv2d):
    """Weight standardization (BiT's StdConv2d): the weight is computed from parameters at every call."""

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                              momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding)


def test_a_weight_computed_from_parameters_is_computed_once_and_the_conv_quantizes(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(StandardizedConv(3, 8, 3, padding=1), nn.ReLU(), StandardizedConv(8, 4, 1)).eval()
    qmodel = fxq.quantize(model, _calib())
    x = torch.randn(5, 3, 12, 12)
    assert [type(m).__name__ for m in qmodel.modules() if "Conv" in type(m).__name__] == ["QConv2d"] * 2
    assert check_quantized(qmodel, model, x, tmp_path) > 25
