"""fxq.search_bits: widths under an average-bits budget, and the measured curve."""
import pytest
import torch

import fxq
from fxq.analysis.mixed import _asking_most, allocate
from fxq.api import Calibrated
from tests.helpers import Residual, randomize_bn


def _data():
    torch.manual_seed(0)
    return [(torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))) for _ in range(4)]


def test_allocation_meets_the_budget_and_narrows_the_cheapest_layers_first():
    params = {"big": 1000, "small": 10, "sensitive": 1000}
    errors = {"big": {2: 0.1, 4: 0.01, 8: 0.0}, "small": {2: 0.5, 4: 0.2, 8: 0.0},
              "sensitive": {2: 9.0, 4: 5.0, 8: 0.0}}
    bits = allocate(errors, params, 6.0, (2, 4, 8))
    average = sum(bits[n] * params[n] for n in bits) / sum(params.values())
    assert average <= 6.0
    assert bits == {"big": 2, "small": 8, "sensitive": 8}


def test_search_returns_overrides_that_quantize_at_the_chosen_widths(tmp_path):
    model = randomize_bn(Residual())
    data = _data()
    result = fxq.search_bits(model, data, avg_weight_bits=5.0, candidates=(4, 8),
                             config=fxq.QConfig(weight_range="minmax", act_range="minmax"))
    assert result.avg_weight_bits <= 5.0
    assert set(result.bits) == {"unit.conv", "conv2", "fc"} and set(result.bits.values()) <= {4, 8}
    qmodel = fxq.quantize(model, data, result.config, overrides=result.overrides)
    for name, b in result.bits.items():
        assert qmodel.get_submodule(name).weight.abs().max() <= 2 ** (b - 1) - 1
    assert [p.budget for p in result.curve] == [8, 5.0, 4]
    assert result.curve[0].weight_bytes > result.curve[-1].weight_bytes
    assert "avg weight bits" in result.to_markdown()
    result.plot(str(tmp_path / "curve.png"))
    assert (tmp_path / "curve.png").stat().st_size > 0


@pytest.mark.parametrize("budget, candidates, message", [
    (1.0, (2, 4, 8), "outside the candidate widths"),
    (5.0, (1, 8), "use widths from 2 to 8"),
])
def test_impossible_budgets_are_rejected(budget, candidates, message):
    with pytest.raises(ValueError, match=message):
        fxq.search_bits(randomize_bn(Residual()), _data(), avg_weight_bits=budget, candidates=candidates)


def test_empty_loader_is_rejected():
    with pytest.raises(ValueError, match="empty loader"):
        fxq.search_bits(randomize_bn(Residual()), [], avg_weight_bits=5.0)


def _same_model(a: torch.fx.GraphModule, b: torch.fx.GraphModule, x: torch.Tensor) -> bool:
    state_a, state_b = a.state_dict(), b.state_dict()
    return (str(a.graph) == str(b.graph) and state_a.keys() == state_b.keys()
            and all(torch.equal(state_a[k], state_b[k]) for k in state_a) and torch.equal(a(x), b(x)))


class _CountedReads(list):
    """Calibration batches that count how many of them are read."""
    reads = 0

    def __iter__(self):
        for batch in super().__iter__():
            self.reads += 1
            yield batch


@pytest.mark.parametrize("base", [fxq.QConfig(), fxq.QConfig(per_channel=False), fxq.QConfig(placement="both")],
                         ids=["per-channel", "per-tensor", "placement-both"])
def test_one_calibration_quantizes_each_width_as_quantize_does(base):
    """`Calibrated` (search_bits' one calibration) gives the very model `fxq.quantize` makes, for
    every weight and activation width and for mixed widths, in any order, without reading the
    data again; and from scratch where calibration differs (per tensor, CLE at 4 bits but not
    at 8; another activation range rule)."""
    model, data = randomize_bn(Residual()), _CountedReads(_data())
    x = torch.randn(8, 3, 8, 8)
    shared = Calibrated(model, data, _asking_most(base, (3, 4, 8)))
    mixed = {"unit.conv": base.with_bits(weight_bits=3), "conv2": base.with_bits(weight_bits=8, act_bits=5),
             "fc": base.with_bits(weight_bits=4, act_bits=16)}
    served = [(base.with_bits(weight_bits=8), None), (base.with_bits(act_bits=4), None), (base, mixed),
              (base.with_bits(weight_bits=3), None), (base.with_bits(weight_bits=4, act_bits=6), None),
              (base.with_bits(act_bits=16), None)]
    calibrations_differ = not base.per_channel  # CLE below 8 weight bits
    for config, overrides in served + [(base.replace(act_range="minmax"), None)]:
        reads = data.reads
        got = shared.quantize(config, overrides)
        from_scratch = data.reads > reads
        expected = fxq.quantize(model, data, config, overrides=overrides)
        assert _same_model(got, expected, x), (config, overrides)
        assert from_scratch == ((config, overrides) not in served or
                                (calibrations_differ and config.weight_bits == 8)), (config, overrides)


def test_a_pipeline_without_the_calibrate_pass_quantizes_every_config_from_scratch(monkeypatch):
    from fxq import api
    timed = lambda gm, ctx: api.calibrate(gm, ctx)  # noqa: E731  (a user's wrapper around a pass)
    monkeypatch.setattr(api, "PASSES", [timed if p is api.calibrate else p for p in api.PASSES])
    model, data = randomize_bn(Residual()), _data()
    shared = Calibrated(model, data, fxq.QConfig(weight_bits=4))
    config = fxq.QConfig(weight_bits=6)
    assert shared.graph is None
    assert _same_model(shared.quantize(config), fxq.quantize(model, data, config), torch.randn(4, 3, 8, 8))


def test_each_layers_integers_are_chosen_once_per_weight_config(monkeypatch):
    """A config served after another with the same weight widths (here: other activation widths)
    chooses no weight again; a new weight width chooses only the layers it changes."""
    from fxq.integers import weight_ranges
    chosen = []
    real = weight_ranges.quantize_weights
    monkeypatch.setattr(weight_ranges, "quantize_weights", lambda w, bits, *a: chosen.append(bits) or real(w, bits, *a))
    model, data = randomize_bn(Residual()), _data()
    base = fxq.QConfig(weight_bits=4, keep_first_last_8bit=False)
    shared = Calibrated(model, data, base)
    shared.quantize(base)
    first = len(chosen)
    shared.quantize(base.with_bits(act_bits=6))
    assert first > 0 and len(chosen) == first
    shared.quantize(base, overrides={"fc": base.with_bits(weight_bits=6)})
    assert chosen[first:] == [6]


def test_layer_errors_are_measured_at_the_ends_and_interpolated_between():
    """At the narrowest and widest width: the logits' error with that layer alone quantized, as a
    whole run of the model so gives it; between: between them, as the layer's own error is."""
    import copy

    from fxq.analysis.comparison import folded_float, integer_layers, quantized_layer
    from fxq.analysis.mixed import _layer_errors
    from fxq.graphs.graph import replace_module
    model, data = randomize_bn(Residual()), _data()
    config = fxq.QConfig(keep_first_last_8bit=False)
    shared = Calibrated(model, data, _asking_most(config, (2, 4, 8)))
    per_width = {b: shared.quantize(config.with_bits(weight_bits=b)) for b in (2, 4, 8)}
    errors = _layer_errors(model, per_width, data, lambda items, desc: items)
    inputs = torch.cat([x for x, _ in data])
    folded = folded_float(model, None, inputs)
    with torch.no_grad():
        reference = folded(inputs).double()
    for name, by_width in errors.items():
        for width in (2, 8):
            alone = copy.deepcopy(folded)
            layer = integer_layers(per_width[width])[name]
            replace_module(alone, name, quantized_layer(folded.get_submodule(name), layer))
            with torch.no_grad():
                exact = (alone(inputs).double() - reference).pow(2).sum() / reference.pow(2).sum()
            assert by_width[width] == pytest.approx(float(exact), rel=1e-5)
        assert by_width[8] <= by_width[4] <= by_width[2], name


@pytest.mark.parametrize("shape, count", [((3, 32, 32), 512), ((3, 224, 224), 32), ((3, 64, 64), 128),
                                          ((1, 8, 8), 512)])
def test_the_layer_errors_read_512_images_at_32x32_and_fewer_where_images_are_larger(shape, count):
    from fxq.analysis.mixed import scoring_inputs
    batches = [torch.zeros(100, *shape) for _ in range(6)]
    assert len(scoring_inputs(batches)) == count
