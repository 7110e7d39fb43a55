"""The float fallback: ops with no integer form run in float between integers, reported once."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxq
from fxq.graphs import records
from tests.helpers import check_quantized, output_steps


class Mixed(nn.Module):
    """Integer-friendly convs around an op with no integer form, a local response norm; and a lone
    batchnorm, a softmax over channels, a stack of a list and size arithmetic, which are integer."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LocalResponseNorm(3)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        y = self.bn(self.norm(y))
        y = F.softmax(y, dim=1) * 4.0
        both = torch.stack([y, y.flip(2)], dim=0).sum(0)
        half = y.size(1) // 2
        return self.conv2(both[:, : 2 * half])


def _calibration():
    return [torch.randn(8, 3, 8, 8) for _ in range(4)]


def test_ops_without_integer_forms_run_in_float_and_are_reported_once_with_source_lines(tmp_path):
    model = Mixed().eval()
    with pytest.warns(fxq.FloatFallbackWarning) as caught:
        qmodel = fxq.quantize(model, _calibration())
    # what is float by its kind is reported before calibration, once
    assert len(caught) == 1
    early = str(caught[0].message)
    assert "'norm'" in early and "softmax" not in early and "test_fallback.py:" in early
    assert "floordiv" not in early  # arithmetic on sizes is not an op on tensors
    kept = {n.name for n in qmodel.graph.nodes if records.has(n, records.FloatOp)}
    assert kept == {"norm"}  # a batchnorm is a depthwise conv, a softmax an exp table
    assert "conv1" not in kept and "conv2" not in kept
    table = fxq.explain(qmodel)
    runs_on = {row[0]: row[-1] for row in table.rows}
    assert runs_on["conv1"] == "integers" and runs_on["norm"] == "float: no integer form for LocalResponseNorm"
    assert table.float_ops == len(kept)
    assert f"{table.integer_ops} of {len(table.rows)} ops run on integers" in str(table)
    assert check_quantized(qmodel, model, torch.randn(16, 3, 8, 8), tmp_path) > 20


def test_a_saved_model_keeps_why_each_op_runs_in_float(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FloatFallbackWarning)
        qmodel = fxq.quantize(Mixed().eval(), _calibration())
    fxq.save(qmodel, tmp_path / "m.fxq")
    loaded = fxq.load(tmp_path / "m.fxq")
    reasons = {n.name: records.get(n, records.FloatOp) for n in loaded.graph.nodes if records.has(n, records.FloatOp)}
    assert reasons == {n.name: records.get(n, records.FloatOp) for n in qmodel.graph.nodes
                       if records.has(n, records.FloatOp)}
    assert reasons["norm"].reason == "no integer form for LocalResponseNorm"


def test_an_override_to_none_keeps_any_module_in_float():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.act = nn.ReLU()
            self.pool = nn.MaxPool2d(2)

        def forward(self, x):
            return self.pool(self.act(self.conv(x)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FloatFallbackWarning)
        qmodel = fxq.quantize(Net().eval(), _calibration(), overrides={"act": None})
    act = next(n for n in qmodel.graph.nodes if n.name == "act")
    assert isinstance(qmodel.get_submodule("act"), nn.ReLU)
    assert records.get(act, records.FloatOp).reason == "kept in float by overrides"
    assert type(qmodel.get_submodule("pool")).__name__ == "QMaxPool2d"  # integers again after it


class DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else -x  # Python control flow on a tensor value


class WithUntraceablePart(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.odd = DataDependent()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.odd(torch.relu(self.conv(x))))


def test_an_untraceable_submodule_is_refused_by_name_or_kept_whole_by_overrides(tmp_path):
    """Never "quantize ok, save fails": untraceable code is refused when quantize returns, unless
    overrides keep it in float on the user's word, and then save and deploy say why they refuse."""
    model, calibration = WithUntraceablePart().eval(), _calibration()
    with pytest.raises(TypeError, match=r"(?s)'odd'.*x.sum\(\) > 0.*torch.where.*overrides=\{'odd': None\}"):
        fxq.quantize(model, calibration)
    qmodel = fxq.quantize(model, calibration, overrides={"odd": None})
    x = torch.randn(4, 3, 8, 8)
    odd = next(n for n in qmodel.graph.nodes if n.name == "odd")
    assert odd.op == "call_module" and records.get(odd, records.FloatOp).reason == "kept in float by overrides"
    with pytest.raises(ValueError, match="'odd'.*the model's own code.*a file never holds code"):
        fxq.save(qmodel, tmp_path / "model.fxq")
    with pytest.raises(ValueError, match="'odd'.*one path through its Python code"):
        fxq.deploy(qmodel)
    integer, simulated = output_steps(qmodel, fxq.simulate(qmodel), x)
    assert torch.equal(integer, simulated)


def test_the_float_ops_are_reported_before_calibration():
    from passes import fold_bn, fuse, insert_observers, trace

    class Unread(list):
        def __iter__(self):
            raise AssertionError("calibration data read")

    ctx = fxq.PassContext(fxq.QConfig(), Unread())
    with pytest.warns(fxq.FloatFallbackWarning, match="'norm'"):
        gm = trace.trace(Mixed().eval(), ctx)
        for step in (fold_bn.fold_bn, fuse.fuse, insert_observers.insert_observers):
            gm = step(gm, ctx)


def test_an_op_whose_calibrated_parameters_have_no_integer_form_runs_in_float_and_is_reported():
    """A conv whose output was a tiny constant during calibration (its input was all zeros)
    needs a requantization multiplier far beyond fixed point: it runs in float instead of
    stopping the whole model."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every ReLU output is 0
        model[2].bias.fill_(1e-12)
    with pytest.warns(fxq.FloatFallbackWarning, match="(?s)with the calibrated parameters.*'2'.*too large"):
        qmodel = fxq.quantize(model, _calibration())
    assert [n.name for n in qmodel.graph.nodes if records.has(n, records.FloatOp)] == ["_2"]
    x = torch.randn(4, 3, 8, 8)
    integer, simulated = output_steps(qmodel, fxq.simulate(qmodel), x)
    assert torch.equal(integer, simulated)


class SelectiveKernel(nn.Module):
    """Attention over three branches: torch.softmax (not F.softmax) asked for a dtype is kept in
    float between integers."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 5, padding=2)

    def forward(self, x):
        weights = torch.softmax(torch.stack([self.a(x), self.b(x), self.c(x)], 1), 1, dtype=torch.float32)
        return (weights[:, 0] * self.a(x)).mean((2, 3))


def test_torch_softmax_kept_in_float_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model = SelectiveKernel().eval()
    with pytest.warns(fxq.FloatFallbackWarning, match="softmax.*with a dtype"):
        qmodel = fxq.quantize(model, [torch.randn(4, 3, 8, 8) for _ in range(2)])
    assert check_quantized(qmodel, model, torch.randn(8, 3, 8, 8), tmp_path) > 20


class OperatorCall(nn.Module):
    """A call fxq cannot save by name: torch's operator registry called directly."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.ops.aten.hardswish(self.conv(x)))


def test_a_call_fxq_cannot_save_is_refused_when_quantize_returns_not_at_save():
    with pytest.raises(TypeError, match=r"(?s)neither has an integer form for nor can save.*hardswish.*"
                                        r"test_fallback.py.*overrides"):
        fxq.quantize(OperatorCall().eval(), _calibration())


class QuerySelection(nn.Module):
    """RT-DETR's query selection: the best-scoring positions by a top-k over scores (8-bit
    integers dequantized: many ties), their features gathered. A tie broken differently picks
    other features."""

    def __init__(self):
        super().__init__()
        self.features, self.score = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x):
        features = self.features(x).flatten(2).transpose(1, 2)  # [N, positions, 8]
        scores = self.score(x).flatten(1)
        chosen = torch.topk(scores, 20, dim=1).indices
        return features.gather(1, chosen[..., None].expand(-1, -1, 8)), scores.topk(5, largest=False).values


def test_a_float_topk_breaks_ties_by_the_lower_index_as_onnx_topk_and_deploys_bit_exact(tmp_path):
    x = torch.tensor([[1.0, 3, 3, 2, 3, 1, 1, 0, 3, 2]])
    values, indices = fxq.ops.fallback.topk(x, 6)
    assert values.tolist() == [[3, 3, 3, 3, 2, 2]] and indices.tolist() == [[1, 2, 4, 8, 3, 9]]
    assert fxq.ops.fallback.topk(x, 3, largest=False).indices.tolist() == [[7, 0, 5]]
    torch.manual_seed(0)
    model = QuerySelection().eval()
    calib = [torch.randn(8, 3, 12, 12) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FloatFallbackWarning)
        qmodel = fxq.quantize(model, calib, fxq.QConfig(requantize="onnxruntime"))
    x = torch.randn(16, 3, 12, 12)
    scores = qmodel(x)[1]
    assert len(scores.unique()) < scores.numel()  # ties among the selected scores
    check_quantized(qmodel, model, x, tmp_path)
    deployed = fxq.deploy(fxq.load(tmp_path / "model.fxq"), threads=1, weights="exact")
    assert all(torch.equal(a, b) for a, b in zip(deployed(x), qmodel(x)))
