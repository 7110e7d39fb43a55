"""Cross-layer equalization: same float function, equal channel ranges, only where valid."""
import torch
from torch import nn

import fxq
from fxq.ops.lookup import ChannelClamp
from passes.equalize import equalize
from passes.fold_bn import fold_bn
from passes.trace import trace
from tests.helpers import Chain, Residual, check_quantized, randomize_bn, sqnr_db


def _equalized(model, **config):
    ctx = fxq.PassContext(fxq.QConfig(cross_layer_equalization=True, **config), [])
    return equalize(fold_bn(trace(model, ctx), ctx), ctx)


def _channel_ranges(out_layer, in_layer):
    out_range = out_layer.weight.detach().reshape(out_layer.weight.shape[0], -1).abs().amax(1)
    in_range = in_layer.weight.detach().transpose(0, 1).reshape(in_layer.weight.shape[1], -1).abs().amax(1)
    return out_range, in_range


def test_float_function_is_unchanged():
    model = Chain().eval()
    gm = _equalized(model)
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        expected, got = model(x), gm(x)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_each_channel_has_the_same_range_in_both_layers_of_a_chain():
    model = Chain().eval()
    before = _channel_ranges(model.conv1, model.conv2)
    gm = _equalized(model)
    for first, second in (("conv1", "conv2"), ("conv2", "conv3")):
        out_range, in_range = _channel_ranges(gm.get_submodule(first), gm.get_submodule(second))
        assert torch.allclose(out_range, in_range, rtol=1e-3)
    spread = lambda r: float(r.max() / r.min())  # noqa: E731
    assert spread(_channel_ranges(gm.conv1, gm.conv2)[0]) < spread(before[0]) / 5


def test_user_model_is_not_modified():
    model = Chain().eval()
    weights = [p.clone() for p in model.parameters()]
    _equalized(model)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


def test_residual_block_equalizes_inside_the_block_but_not_across_the_add():
    model = randomize_bn(Residual())
    gm = _equalized(model)
    out_range, in_range = _channel_ranges(gm.get_submodule("unit.conv"), gm.get_submodule("conv2"))
    assert torch.allclose(out_range, in_range, rtol=1e-3)
    folded = fold_bn(trace(model, fxq.PassContext(fxq.QConfig(), [])), None)
    assert torch.equal(gm.conv2.bias, folded.conv2.bias)  # conv2 feeds the add: never rescaled
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert (gm(x) - model(x)).abs().max() <= 1e-5 * model(x).abs().max()


def test_on_by_default_only_for_narrow_per_tensor_weights():
    assert not fxq.QConfig().cross_layer_equalization
    assert not fxq.QConfig(weight_bits=4).cross_layer_equalization
    assert fxq.QConfig(weight_bits=4, per_channel=False).cross_layer_equalization
    model = Chain().eval()
    ctx = fxq.PassContext(fxq.QConfig(), [])
    gm = fold_bn(trace(model, ctx), ctx)
    before = gm.conv1.weight.clone()
    assert torch.equal(equalize(gm, ctx).conv1.weight, before)


def _cle_error_ratio(seed: int) -> float:
    """Output MSE of per-tensor 4-bit weights with CLE over without, on one random Chain."""
    torch.manual_seed(seed)
    model = Chain(seed).eval()
    calib = [torch.randn(16, 3, 16, 16) for _ in range(4)]
    x = torch.randn(32, 3, 16, 16)
    with torch.no_grad():
        reference = model(x)
    errors = {}
    for cle in (False, True):
        config = fxq.QConfig(weight_bits=4, per_channel=False, weight_range="minmax",
                             cross_layer_equalization=cle, bias_correction=False,
                             keep_first_last_8bit=False, reconstruct=False)
        with torch.no_grad():
            errors[cle] = float((fxq.quantize(model, calib, config)(x) - reference).pow(2).mean())
    return errors[True] / errors[False]


def test_per_tensor_4_bit_weights_lose_less_after_equalization():
    """Over eight networks CLE never hurts, and typically removes over half of the error."""
    ratios = sorted(_cle_error_ratio(seed) for seed in range(8))
    assert ratios[-1] < 1.0 and ratios[len(ratios) // 2] < 0.6, ratios


class MobileBlock(nn.Module):
    """MobileNetV2's inverted residual without the residual: 1×1 → ReLU6 → depthwise → ReLU6 → 1×1,
    channels of very different ranges."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.expand = nn.Conv2d(3, 12, 1)
        self.depthwise = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.project = nn.Conv2d(12, 4, 1)
        with torch.no_grad():
            for conv in (self.expand, self.depthwise):
                conv.weight.mul_(torch.logspace(-1.5, 1.5, 12)[torch.randperm(12, generator=g)].reshape(-1, 1, 1, 1))

    def forward(self, x):
        x = nn.functional.relu6(self.expand(x))
        return self.project(nn.functional.hardtanh(self.depthwise(x), 0.0, 6.0))


def test_equalization_crosses_depthwise_convs_and_bounded_clamps_exactly():
    model = MobileBlock().eval()
    ctx = fxq.PassContext(fxq.QConfig(per_channel=False, cross_layer_equalization=True), [])
    gm = equalize(trace(model, ctx), ctx)
    x = torch.randn(8, 3, 8, 8) * 3
    assert torch.allclose(gm(x), model(x), atol=1e-5)  # the same float function
    clamps = [m for m in gm.modules() if isinstance(m, ChannelClamp)]
    assert len(clamps) == 2 and not torch.allclose(clamps[0].high, torch.full((12,), 6.0))

    def spread(w):  # largest over smallest channel range
        r = w.detach().reshape(w.shape[0], -1).abs().amax(1)
        return float(r.max() / r.min())

    assert spread(gm.get_submodule("depthwise").weight) < spread(model.depthwise.weight) / 10


def test_equalized_clamps_quantize_per_channel_and_exactly(tmp_path):
    model = MobileBlock().eval()
    config = fxq.QConfig(per_channel=False, cross_layer_equalization=True)
    qmodel = fxq.quantize(model, [torch.randn(8, 3, 8, 8) * 3 for _ in range(4)], config)
    assert check_quantized(qmodel, model, torch.randn(16, 3, 8, 8) * 3, tmp_path) > 20


def test_equalization_rescues_per_tensor_weights_across_depthwise_convs():
    """Channel ranges three decades apart (what DFQ found in ImageNet MobileNetV2): one scale per
    tensor crushes the small channels unless they are equalized first (16-bit activations: the
    weights' error alone)."""
    model = MobileBlock().eval()
    calib = [torch.randn(8, 3, 8, 8) * 3 for _ in range(4)]
    x = torch.randn(32, 3, 8, 8) * 3
    sqnr = {}
    for equalized in (False, True):
        config = fxq.QConfig(per_channel=False, act_bits=16, cross_layer_equalization=equalized)
        qmodel = fxq.quantize(model, calib, config)
        with torch.no_grad():
            sqnr[equalized] = sqnr_db(model(x), qmodel(x))
    assert sqnr[True] > sqnr[False] + 12, sqnr
