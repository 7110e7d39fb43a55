"""Several outputs, nested in tuples, lists and dicts (a detector's boxes and scores, a segmenter's
``{"out", "aux"}``, an FPN's feature maps keyed "0" … "pool"), through quantize, save → load,
deploy and evaluate."""
import pytest
import torch
from torch import nn

import fxq
from fxq.graphs import outputs
from tests.helpers import images


class Heads(nn.Module):
    """Logits, a dict of feature maps keyed as torchvision's FPN keys them, and one map twice."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.small, self.fc = nn.Conv2d(8, 4, 3, stride=2, padding=1), nn.Linear(8, 5)

    def forward(self, x):
        features = torch.relu(self.body(x))
        small = self.small(features)
        logits = self.fc(features.mean((2, 3)))
        return logits, {"0": features, "pool": small, "again": [small]}


def _quantized(requantize="fixed_point"):
    torch.manual_seed(0)
    model = Heads().eval()
    calibration, x = images(8)
    return model, fxq.quantize(model, calibration, fxq.QConfig(requantize=requantize)), x


def _same(a, b) -> bool:
    return [name for name, _ in outputs.named(a)] == [name for name, _ in outputs.named(b)] and all(
        torch.equal(u, v) for (_, u), (_, v) in zip(outputs.named(a), outputs.named(b)))


def test_outputs_are_named_by_their_paths_and_the_logits_are_the_only_matrix():
    model, qmodel, x = _quantized()
    with torch.no_grad():
        out = qmodel(x)
    assert [name for name, _ in outputs.named(out)] == ["0", "1.0", "1.pool", "1.again.0"]
    assert outputs.logits(out) is out[0]
    assert outputs.logits({"a": out[0], "b": out[0]}) is None  # two to choose from: none chosen
    assert [name for name, _ in outputs.named(torch.zeros(1))] == ["output"]


def test_every_output_saves_and_loads_in_its_structure(tmp_path):
    _, qmodel, x = _quantized()
    fxq.save(qmodel, tmp_path / "heads.fxq")
    with torch.no_grad():
        assert _same(fxq.load(tmp_path / "heads.fxq")(x), qmodel(x))


def test_a_dict_key_that_is_not_a_plain_name_is_refused_when_saving(tmp_path):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return {"a key": self.conv(x)}

    torch.manual_seed(0)
    qmodel = fxq.quantize(Odd().eval(), images(8)[0])
    with pytest.raises(ValueError, match="cannot save a dict keyed 'a key'"):
        fxq.save(qmodel, tmp_path / "odd.fxq")


def test_the_deployed_model_returns_every_output_in_the_same_structure_bit_exact():
    _, qmodel, x = _quantized("onnxruntime")
    deployed = fxq.deploy(qmodel, x[:1], threads=1, weights="exact")
    with torch.no_grad():
        theirs, ours = deployed(x), qmodel(x)
    assert deployed.bit_exact and _same(theirs, ours)
    assert isinstance(theirs, tuple) and isinstance(theirs[1]["again"], list)


def test_evaluate_measures_top1_on_the_logits_and_every_output_against_float():
    model, qmodel, x = _quantized()
    labels = torch.arange(len(x)) % 5
    result = fxq.evaluate(qmodel, [(x, labels)], model)
    with torch.no_grad():
        expected = 100.0 * float((qmodel(x)[0].argmax(1) == labels).float().mean())
    assert result.accuracy == pytest.approx(expected)
    rows = {name: (sqnr, agree) for name, sqnr, agree in result.outputs.rows}
    assert set(rows) == {"0", "1.0", "1.pool", "1.again.0"}
    assert all(sqnr > 20 for sqnr, _ in rows.values()) and rows["1.pool"] == rows["1.again.0"]
    assert "same class %" in str(result)


def test_without_classifier_logits_evaluate_gives_no_accuracy():
    model, qmodel, x = _quantized()

    class FeaturesOnly(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)[1]

    torch.manual_seed(0)
    float_model = FeaturesOnly(model).eval()
    qfeatures = fxq.quantize(float_model, images(8)[0])
    result = fxq.evaluate(qfeatures, [(x, torch.zeros(len(x), dtype=torch.long))], float_model)
    assert result.accuracy is None and len(result.outputs.rows) == 3
