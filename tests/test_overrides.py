"""Per-layer configuration: module-name globs → QConfig, or None to keep a layer in float."""
import pytest
import torch
from torch import nn

import fxq
from fxq.graphs.qmodules import Dequantize, Quantize
from fxq.graphs.runtime import count_ops
from fxq.ops.layers import QConv2d, QLayer, QLinear
from tests.helpers import Chain, Residual, randomize_bn


def test_glob_patterns_give_layers_their_own_config(ctx):
    qmodel = fxq.quantize(randomize_bn(Residual()), ctx.calib_loader,
                          overrides={"unit.*": fxq.QConfig(weight_bits=4), "fc": fxq.QConfig(act_bits=6)})
    assert qmodel.get_submodule("unit.conv").weight.abs().max() <= 7
    assert qmodel.get_submodule("conv2").weight.abs().max() == 127
    assert qmodel.get_submodule("fc").output_bits == 6


def test_none_keeps_a_layer_in_float_between_dequantize_and_quantize(ctx):
    model = randomize_bn(Residual())
    qmodel = fxq.quantize(model, ctx.calib_loader, overrides={"fc": None})
    assert type(qmodel.get_submodule("fc")) is nn.Linear
    assert isinstance(qmodel.get_submodule("fc_dequantize"), Dequantize)
    assert isinstance(qmodel.get_submodule("fc_quantize"), Quantize)
    assert isinstance(qmodel.get_submodule("unit.conv"), QConv2d)
    ops = count_ops(qmodel, ctx.calib_loader[0])
    assert ops.float == 1 and ops.boundary == 4  # fc in float; quantize in/out around it
    x = ctx.calib_loader[0]
    assert (qmodel(x) - model(x)).abs().max() < 0.1 * model(x).abs().max()


def test_first_matching_pattern_wins(ctx):
    qmodel = fxq.quantize(randomize_bn(Residual()), ctx.calib_loader,
                          overrides={"fc": fxq.QConfig(weight_bits=4), "*": None})
    assert isinstance(qmodel.get_submodule("fc"), QLinear)
    assert type(qmodel.get_submodule("conv2")) is nn.Conv2d


def test_unknown_layer_name_lists_close_matches(ctx):
    with pytest.raises(ValueError, match=r"'unit.cnv' matches no layer. Close matches: \['unit.conv'"):
        fxq.quantize(randomize_bn(Residual()), ctx.calib_loader, overrides={"unit.cnv": None})


def test_override_values_must_be_configs_or_none(ctx):
    with pytest.raises(TypeError, match="fxq.QConfig, or to None"):
        fxq.quantize(randomize_bn(Residual()), ctx.calib_loader, overrides={"fc": 4})


def test_a_one_shot_iterator_calibrates_like_the_list_it_yields(ctx):
    model, config = randomize_bn(Residual()), fxq.QConfig(act_range="mse")
    from_list = fxq.quantize(model, ctx.calib_loader, config)
    from_generator = fxq.quantize(model, (batch for batch in ctx.calib_loader), config)
    x = ctx.calib_loader[0]
    assert torch.equal(from_list(x), from_generator(x))
    assert fxq.explain(from_generator, "unit.conv").steps[0].observed is not None


def test_the_calibrate_pass_alone_takes_a_one_shot_iterator_for_histograms(ctx):
    from passes.calibrate import calibrate
    from passes.fold_bn import fold_bn
    from passes.insert_observers import insert_observers
    from passes.trace import trace
    contexts = [fxq.PassContext(fxq.QConfig(act_range="mse"), loader)
                for loader in (iter(ctx.calib_loader), ctx.calib_loader)]
    model = randomize_bn(Residual())
    graphs = [calibrate(insert_observers(fold_bn(trace(model, c), c), c), c) for c in contexts]
    observers = [[m for m in gm.modules() if isinstance(m, fxq.integers.observers.HistogramObserver)] for gm in graphs]
    assert observers[0] and all(torch.equal(a.counts, b.counts) for a, b in zip(*observers))


@pytest.mark.parametrize("config", [
    fxq.QConfig(act_range=a) for a in ("moving_average", "percentile", "mse", "entropy")] + [
    fxq.QConfig(weight_range=w, weight_bits=4, per_channel=False) for w in ("mse", "output_aware")])
def test_every_method_gives_a_working_integer_model(ctx, config):
    model = randomize_bn(Residual())
    qmodel = fxq.quantize(model, ctx.calib_loader, config)
    x = ctx.calib_loader[1]
    assert count_ops(qmodel, x).float == 0
    tolerance = 0.15 if config.weight_bits == 8 else 0.6
    assert (qmodel(x) - model(x)).abs().max() < tolerance * model(x).abs().max()


def test_keep_first_last_8bit_keeps_the_edge_layers_and_the_input_at_8_bits():
    torch.manual_seed(0)
    calib = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    config = fxq.QConfig(weight_bits=4, act_bits=4, keep_first_last_8bit=True, weight_range="minmax",
                         act_range="minmax", cross_layer_equalization=False, bias_correction=False)
    gm = fxq.quantize(Chain().eval(), calib, config)
    layers = {name: m for name, m in gm.named_modules() if isinstance(m, QLayer)}
    assert list(layers) == ["conv1", "conv2", "conv3"]
    assert gm.get_submodule("quantize_x").bits == 8
    assert layers["conv1"].weight.abs().max() > 7 and layers["conv1"].output_bits == 8
    assert layers["conv2"].weight.abs().max() <= 7 and layers["conv2"].output_bits == 4
    assert layers["conv3"].weight.abs().max() > 7 and layers["conv3"].output_bits == 8
