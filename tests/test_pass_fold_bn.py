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


def test_a_batchnorm_with_no_conv_to_fold_into_becomes_a_depthwise_affine_conv(ctx):
    model = randomize_bn(ConvUsedTwice())
    gm = fold_bn(trace(model, ctx), ctx)
    assert module_types(gm) == [nn.Conv2d, nn.Conv2d]  # the conv's own output is needed too
    affine = gm.get_submodule("bn")
    assert affine.groups == affine.in_channels == 3 and affine.kernel_size == (1, 1)
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(gm(x), model(x), atol=1e-5)


def test_model_without_batchnorm_is_unchanged(ctx):
    gm = trace(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()), ctx)
    code = gm.code
    assert fold_bn(gm, ctx).code == code
