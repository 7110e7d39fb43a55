"""Cross-layer equalization: same float function, equal channel ranges, only where valid."""
import torch

import fxq
from passes.equalize import equalize
from passes.fold_bn import fold_bn
from passes.trace import trace
from tests.helpers import Chain, Residual, randomize_bn


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
                             keep_first_last_8bit=False)
        with torch.no_grad():
            errors[cle] = float((fxq.quantize(model, calib, config)(x) - reference).pow(2).mean())
    return errors[True] / errors[False]


def test_per_tensor_4_bit_weights_lose_less_after_equalization():
    """Over eight networks CLE never hurts, and typically removes over half of the error."""
    ratios = sorted(_cle_error_ratio(seed) for seed in range(8))
    assert ratios[-1] < 1.0 and ratios[len(ratios) // 2] < 0.6, ratios
