import copy
import dataclasses

import pytest
import torch
from torch import fx

import fxq
from fxq.ops.layers import QConv2d
from tests.helpers import Residual, randomize_bn


def test_quantize_returns_a_graph_module_with_float_in_float_out(ctx):
    model = randomize_bn(Residual())
    qmodel = fxq.quantize(model, ctx.calib_loader)
    assert isinstance(qmodel, fx.GraphModule)
    out = qmodel(ctx.calib_loader[0])
    assert out.dtype == torch.float32 and out.shape == (4, 5)


def test_the_users_model_is_not_modified(ctx):
    model = randomize_bn(Residual()).train()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    state = copy.deepcopy(model.state_dict())
    hooks = dict(model._forward_hooks)
    fxq.quantize(model, ctx.calib_loader)
    assert model.training  # still in train mode: quantize works on an eval copy
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert dict(model._forward_hooks) == hooks and not calls


def test_printed_code_reads_like_the_integer_dataflow(ctx):
    code = fxq.quantize(randomize_bn(Residual()), ctx.calib_loader).code
    order = ["quantize_x", "unit.conv", "unit.relu", "conv2", "self.add(", "self.pool",
             "torch.flatten", "self.fc", "self.dequantize"]
    positions = [code.find(token) for token in order]
    assert -1 not in positions and positions == sorted(positions), code


def test_passes_is_a_list_users_can_extend(ctx):
    seen = []

    def spy(gm, context):
        seen.append(sum(1 for _ in gm.graph.nodes))
        return gm

    assert [p.__name__ for p in fxq.PASSES] == [
        "trace", "fold_bn", "rewrite_layers", "equalize", "fuse", "insert_observers", "calibrate",
        "reconstruct", "correct_bias", "convert", "quantize_add", "record_stats"]
    qmodel = fxq.quantize(randomize_bn(Residual()), ctx.calib_loader, passes=fxq.PASSES + [spy])
    assert seen and isinstance(qmodel.get_submodule("unit.conv"), QConv2d)


def test_every_pass_is_given_a_graph_whose_code_and_forward_are_its_graphs(ctx):
    x = ctx.calib_loader[0]

    def check(gm, context):
        assert gm.code == gm.graph.python_code("self").src
        assert torch.equal(gm(x), fx.Interpreter(gm).run(x))
        return gm

    checked = [step for p in fxq.PASSES for step in (p, check)]
    qmodel = fxq.quantize(randomize_bn(Residual()), ctx.calib_loader, passes=checked)
    assert "bn" not in qmodel.code and type(qmodel).forward.__name__ == "forward"


def test_default_config_is_the_contract():
    config = fxq.QConfig()
    assert (config.weight_bits, config.act_bits, config.per_channel, config.weight_range,
            config.act_range, config.placement) == (8, 8, True, "minmax", "mse", "pre")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.weight_bits = 4


@pytest.mark.parametrize("kwargs, pattern", [
    ({"weight_range": "kmeans"}, "weight_range='kmeans' is not supported"),
    ({"act_range": "median"}, "act_range='median' is not supported"),
    ({"percentile": 40.0}, "percentile=40.0"),
    ({"histogram_bins": 100}, "histogram_bins=100"),
    ({"averaging_constant": 0.0}, "averaging_constant=0.0"),
    ({"placement": "after"}, "placement='after' is not supported"),
    ({"weight_bits": 9}, "weight_bits=9"),
    ({"act_bits": 1}, "act_bits=1"),
    ({"weight_bits": 8.0}, "weight_bits=8.0"),
    ({"pair_safe": True, "act_bits": 16}, "pair_safe=True with act_bits=16"),
])
def test_unsupported_config_values_are_rejected_by_name(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        fxq.QConfig(**kwargs)


def test_pair_safe_takes_one_bit_from_weights_only_beside_8_bit_activations():
    assert fxq.QConfig().layer_weight_bits == 8 and fxq.QConfig(pair_safe=True).layer_weight_bits == 7
    assert fxq.QConfig(pair_safe=True, act_bits=6).layer_weight_bits == 8  # 2·63·127 < 2^15 already
    assert fxq.QConfig(pair_safe=True, weight_bits=4).layer_weight_bits == 4
    assert fxq.QConfig(pair_safe=True).weight_range == "minmax"  # the 8-bit methods, one bit less


def test_wrong_config_type_and_missing_loader(ctx):
    model = randomize_bn(Residual())
    with pytest.raises(TypeError, match="fxq.QConfig"):
        fxq.quantize(model, ctx.calib_loader, config={"weight_bits": 8})
    with pytest.raises(ValueError, match="calib_loader is None"):
        fxq.quantize(model, None)


def test_quantized_model_names_a_wrong_input_shape(ctx):
    qmodel = fxq.quantize(randomize_bn(Residual()), ctx.calib_loader)
    with pytest.raises(ValueError, match=r"\(2, 1, 8, 8\) does not match .* \[N, 3, 8, 8\]"):
        qmodel(torch.randn(2, 1, 8, 8))
    with pytest.raises(TypeError, match="float tensor"):
        qmodel(torch.ones(2, 3, 8, 8, dtype=torch.uint8))


def test_lower_bit_widths_and_per_tensor_weights_run(ctx):
    model = randomize_bn(Residual())
    config = fxq.QConfig(weight_bits=4, act_bits=6, per_channel=False, keep_first_last_8bit=False)
    qmodel = fxq.quantize(model, ctx.calib_loader, config)
    conv = qmodel.get_submodule("unit.conv")
    assert conv.weight.abs().max() <= 7 and len(set(conv.weight_scale.tolist())) == 1
    quantized_input = qmodel.get_submodule("quantize_x")(ctx.calib_loader[0])
    assert quantized_input.max() <= 63


def test_source_never_uses_pytorchs_quantization_stack():
    import pathlib
    import re
    root = pathlib.Path(fxq.__file__).resolve().parent.parent
    forbidden = re.compile(r"torch\.ao|torch\.quantization|quantize_per_(tensor|channel)|"
                           r"torch\.q(u)?int\d|torch\.fake_quantize|fake_quantize_per|torch\.ops\.quantized|nn\.quantized")
    sources = list((root / "fxq").glob("*.py")) + list((root / "passes").glob("*.py"))
    assert len(sources) >= 10
    offenders = [f"{p.name}: {line.strip()}" for p in sources
                 for line in p.read_text().splitlines() if forbidden.search(line)]
    assert offenders == []


def test_defaults_follow_the_bit_widths_and_explicit_fields_win():
    assert (fxq.QConfig().weight_range, fxq.QConfig().act_range) == ("minmax", "mse")
    low = fxq.QConfig(weight_bits=4, act_bits=4)
    assert (low.weight_range, low.act_range, low.cross_layer_equalization, low.bias_correction) == (
        "output_aware", "mse", False, True)
    assert fxq.QConfig(weight_bits=4, weight_range="mse").weight_range == "mse"
    assert fxq.QConfig(weight_bits=4, act_bits=8).act_range == "mse"
    assert fxq.QConfig(act_range="minmax").act_range == "minmax"
    assert not fxq.QConfig().keep_first_last_8bit
    assert all(fxq.QConfig(weight_bits=w, act_bits=a).keep_first_last_8bit for w, a in ((6, 6), (4, 8), (8, 4)))


def test_an_override_wins_over_keeping_the_first_and_last_layer_at_8_bits(ctx):
    qmodel = fxq.quantize(randomize_bn(Residual()), ctx.calib_loader, fxq.QConfig(weight_bits=4),
                          overrides={"fc": fxq.QConfig(weight_bits=3)})
    assert qmodel.get_submodule("unit.conv").weight.abs().max() > 7  # first: held at 8 bits
    assert qmodel.get_submodule("conv2").weight.abs().max() <= 7
    assert qmodel.get_submodule("fc").weight.abs().max() <= 3  # last, but overridden


def test_with_bits_re_derives_the_defaulted_fields_only():
    config = fxq.QConfig(act_range="percentile")
    narrow = config.with_bits(weight_bits=4)
    assert (narrow.weight_bits, narrow.weight_range, narrow.act_range) == (4, "output_aware", "percentile")
    assert narrow.with_bits(weight_bits=8) == config


def test_16_bit_activations_are_accepted_and_other_wide_widths_are_not():
    assert fxq.QConfig(act_bits=16).act_bits == 16
    with pytest.raises(ValueError, match=r"act_bits=12: use an int from 2 to 8 \(or 16\)"):
        fxq.QConfig(act_bits=12)
    with pytest.raises(ValueError, match="weight_bits=16"):
        fxq.QConfig(weight_bits=16)
    with pytest.raises(ValueError, match="histogram_bins=2048"):
        fxq.QConfig(act_bits=16, act_range="entropy")
