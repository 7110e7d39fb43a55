import torch
from torch import nn

from passes.fold_bn import fold_bn
from passes.trace import trace
from tests.helpers import ConvBnRelu, module_types, randomize_bn


def test_conv_bn_becomes_one_conv_with_the_same_output(ctx):
    model = randomize_bn(ConvBnRelu())
    gm = trace(model, ctx)
    assert module_types(gm) == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    x = torch.randn(2, 3, 8, 8)
    before = gm(x)
    gm = fold_bn(gm, ctx)
    assert module_types(gm) == [nn.Conv2d, nn.ReLU]
    assert gm.conv.bias is not None
    assert torch.allclose(gm(x), before, atol=1e-5)


def test_folding_does_not_change_the_users_conv(ctx):
    model = randomize_bn(ConvBnRelu())
    weight = model.conv.weight.clone()
    fold_bn(trace(model, ctx), ctx)
    assert torch.equal(model.conv.weight, weight)


class ConvUsedTwice(nn.Module):
    """The conv's output is read by the batchnorm and by the add: folding would change the add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_conv_with_other_users_is_left_alone(ctx):
    gm = fold_bn(trace(randomize_bn(ConvUsedTwice()), ctx), ctx)
    assert module_types(gm) == [nn.Conv2d, nn.BatchNorm2d]


def test_model_without_batchnorm_is_unchanged(ctx):
    gm = trace(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()), ctx)
    code = gm.code
    assert fold_bn(gm, ctx).code == code
