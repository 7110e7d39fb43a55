"""fxq.search_bits: widths under an average-bits budget, and the measured curve."""
import pytest
import torch

import fxq
from fxq.mixed import allocate
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
