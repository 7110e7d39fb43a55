"""fxq.compare and layer sensitivity on a tiny model."""
import math

import pytest
import torch

import fxq
from fxq.analysis import comparison
from fxq.analysis.comparison import folded_float, sensitivity, sqnr_db, with_quantized_layers
from tests.helpers import Chain, Residual, randomize_bn


def test_sqnr_of_known_noise():
    x = torch.ones(100)
    assert sqnr_db(x, x) == math.inf
    assert abs(sqnr_db(x, x * 1.1) - 20.0) < 1e-4  # noise power 1 % of signal: 20 dB


def test_compare_gives_cumulative_and_isolated_sqnr_per_layer(ctx):
    model = randomize_bn(Residual())
    qmodel = fxq.quantize(model, ctx.calib_loader)
    result = fxq.compare(model, qmodel, ctx.calib_loader[0])
    assert [r[0] for r in result.rows] == ["unit.conv", "conv2", "fc"]
    first = result.rows[0]
    assert first[1] == first[2]  # nothing before the first layer: cumulative = isolated
    assert all(10 < r[2] < 80 for r in result.rows)
    assert "isolated SQNR dB" in str(result) and result.to_markdown().startswith("| layer")


class ReluCat(torch.nn.Module):
    """Convs whose outputs are mostly negative, each through a ReLU into a concat (the issue's case)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Conv2d(16, 4, 1)
        with torch.no_grad():
            self.a.bias.fill_(-1.0), self.b.bias.fill_(-1.0)

    def forward(self, x):
        return self.head(torch.cat([torch.relu(self.a(x)), torch.nn.functional.relu(self.b(x))], 1))


def test_sqnr_is_measured_on_what_the_next_layer_reads_after_the_relu():
    torch.manual_seed(0)
    model, x = ReluCat().eval(), torch.randn(16, 3, 10, 10)
    qmodel = fxq.quantize(model, [x])
    rows = {name: (cumulative, isolated) for name, cumulative, isolated in fxq.compare(model, qmodel, x).rows}
    with torch.no_grad():
        kept = torch.relu(model.a(x))  # what the concat reads from a
        read = {}
        handle = qmodel.get_submodule("a").register_forward_hook(lambda m, i, o: read.update(a=o))
        qmodel(x)
        handle.remove()
    qp = qmodel.get_submodule("a").output_qparams
    after_relu = sqnr_db(kept, torch.relu(qp.dequantize(read["a"])))
    assert rows["a"][0] == pytest.approx(after_relu, abs=1e-6) and rows["a"][1] == pytest.approx(after_relu, abs=1e-6)
    before_relu = sqnr_db(model.a(x).detach(), qp.dequantize(read["a"]))
    assert after_relu > before_relu + 3  # the negatives the ReLU drops no longer count as error
    assert rows["b"][0] > 25


def test_snap_to_gridd_layers_reproduce_the_integer_model(ctx):
    """All layers quantized as qmodel does them ≈ the integer model (adds stay float here)."""
    model = randomize_bn(Residual())
    qmodel = fxq.quantize(model, ctx.calib_loader)
    folded = folded_float(model)
    everything = with_quantized_layers(folded, qmodel, ["unit.conv", "conv2", "fc"])
    x = ctx.calib_loader[0]
    step = qmodel.get_submodule("fc").output_qparams.scale
    assert (everything(x) - qmodel(x)).abs().max() < 4 * step
    assert torch.equal(folded(x), folded_float(model)(x))  # the copy, not the folded model, changed


@pytest.mark.parametrize("record_bytes", [2**30, 3000], ids=["one record", "a record per few images"])
def test_sensitivity_reports_every_layer_both_ways(ctx, monkeypatch, record_bytes):
    """Each study equals the whole model with those layers quantized, however the images are split
    for the recorded runs it reuses."""
    monkeypatch.setattr(comparison, "RECORD_BYTES", record_bytes)
    model = randomize_bn(Residual())
    qmodel = fxq.quantize(model, ctx.calib_loader, fxq.QConfig(weight_bits=2, act_bits=2))
    x = torch.cat([ctx.calib_loader[0], torch.randn(36, 3, 8, 8)])
    labels = model(x).argmax(1)  # float predictions as labels, some of them changed
    labels[::3] = torch.randint(0, 5, labels[::3].shape)
    result = sensitivity(model, qmodel, x, labels)
    names = ["unit.conv", "conv2", "fc"]
    assert [r[0] for r in result.rows] == names
    folded = folded_float(model)

    def accuracy(names):
        hits = (with_quantized_layers(folded, qmodel, names)(x).argmax(1) == labels).sum().item()
        return 100.0 * hits / len(labels)

    for name, only, all_but in result.rows:
        assert only == accuracy([name]) and all_but == accuracy([n for n in names if n != name])
    assert result.all_quantized == accuracy(names) and result.float_accuracy == accuracy([])
    assert len(result.ranked()) == 3 and "only this layer quantized" in result.to_markdown()


class Segmenter(Chain):
    """A model without logits: a dict holding one feature map, whose channels are classes."""

    def forward(self, x):
        return {"out": super().forward(x)}


@pytest.mark.parametrize("record_bytes", [2**30, 3000], ids=["one record", "a record per few images"])
def test_sensitivity_of_a_feature_map_is_the_agreement_of_its_positions(monkeypatch, record_bytes):
    monkeypatch.setattr(comparison, "RECORD_BYTES", record_bytes)
    torch.manual_seed(0)
    model = Segmenter().eval()
    qmodel = fxq.quantize(model, [torch.randn(8, 3, 8, 8) for _ in range(2)], fxq.QConfig(weight_bits=2, act_bits=2))
    x = torch.randn(24, 3, 8, 8)
    result = sensitivity(model, qmodel, x, torch.zeros(24, dtype=torch.long))
    folded = folded_float(model)
    names = ["conv1", "conv2", "conv3"]

    def agreement(names):
        classes = with_quantized_layers(folded, qmodel, names)(x)["out"].argmax(1)
        return 100.0 * (classes == folded(x)["out"].argmax(1)).sum().item() / classes.numel()

    assert result.measure == comparison.AGREEMENT and result.float_accuracy == 100.0
    for name, only, all_but in result.rows:
        assert only == agreement([name]) and all_but == agreement([n for n in names if n != name])
    assert len({score for row in result.rows for score in row[1:]}) > 2  # studies that differ: it can fail


def test_evaluate_sums_over_batches_what_compare_measures_on_one():
    torch.manual_seed(0)
    model = randomize_bn(Residual()).eval()
    calib = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    qmodel = fxq.quantize(model, calib)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)) for _ in range(3)]
    result = fxq.evaluate(qmodel, batches, model)
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert result.samples == 18
    assert result.accuracy == pytest.approx(100.0 * (qmodel(images).argmax(1) == labels).sum().item() / 18)
    whole = fxq.compare(model, qmodel, images)
    for (name, c, i), (name1, c1, i1) in zip(result.layers.rows, whole.rows):
        assert name == name1 and c == pytest.approx(c1, rel=1e-9) and i == pytest.approx(i1, rel=1e-9)
    assert fxq.evaluate(qmodel, [b[0] for b in batches]).accuracy is None  # no labels: no accuracy
    with pytest.raises(ValueError, match="no batches"):
        fxq.evaluate(qmodel, [])
