"""fxq on the committed ResNet-18s and the real test sets: the issue's accuracy and size bounds.

Calibration uses 512 *training* images; accuracy is on the full 10k test set.
"""

import pytest
import torch

import fxq
from fxq.graphs.runtime import count_ops
from fxq.ops.arithmetic import QAdd
from fxq.ops.layers import QConv2d, QLinear
from scripts import data, evaluate, models
from scripts.train import accuracy
from tests.real_data import quantized, suite_model

pytestmark = pytest.mark.real_data


def results(dataset: str):
    model, test, calib, float_acc = suite_model(dataset)
    qmodel, int_acc = quantized(dataset)
    return model, qmodel, test, calib, float_acc, int_acc


def test_mnist_w8a8_loses_at_most_005_points():
    _, _, _, _, float_acc, int_acc = results("mnist")
    assert float_acc >= 99.4
    assert float_acc - int_acc <= 0.05


def test_fashion_w8a8_loses_at_most_03_points_and_no_more_than_torch_ao_plus_01():
    model, _, test, calib, float_acc, int_acc = results("fashion")
    peer_acc = accuracy(evaluate.torch_ao_x86(model, calib), test)
    assert float_acc >= 92.0
    assert float_acc - int_acc <= 0.3
    assert float_acc - int_acc <= (float_acc - peer_acc) + 0.1


@pytest.mark.parametrize("dataset", data.DATASETS)
def test_saved_model_is_at_most_026_of_float32(dataset):
    model, qmodel, *_ = results(dataset)
    assert evaluate.saved_bytes(qmodel) <= 0.26 * evaluate.saved_bytes(model)


def test_every_op_of_the_real_resnet18_runs_on_integers():
    _, qmodel, test, *_ = results("mnist")
    ops = count_ops(qmodel, test.images[:2])
    assert ops.float == 0 and ops.boundary == 2  # quantize the input, dequantize the logits
    types = [type(m) for m in qmodel.modules()]
    assert types.count(QConv2d) == 20 and types.count(QLinear) == 1 and types.count(QAdd) == 8


def test_every_layer_accumulator_fits_int32():
    _, qmodel, *_ = results("mnist")
    bounds = {name: m.accumulator_bound for name, m in qmodel.named_modules()
              if isinstance(m, (QConv2d, QLinear))}
    assert max(bounds.values()) < 2**31
    assert bounds["layer4.1.conv2"] > 2**24  # the widest layer really needs the exact kernel


def test_quantized_model_is_reproducible_and_stores_integers():
    _, qmodel, test, calib, *_ = results("mnist")
    again = fxq.quantize(models.load_trained("mnist"), calib)
    x = test.images[:64]
    assert torch.equal(qmodel(x), again(x))
    state = qmodel.state_dict()
    assert state["layer1.0.conv1.weight"].dtype == torch.int8
    assert state["layer1.0.conv1.bias"].dtype == torch.int32


def test_float_twin_agrees_with_the_integer_model_on_2000_test_images():
    """2,000 images, not 10,000: the float64 twin of a ResNet-18 took 216 s of `make test` on all."""
    _, qmodel, test, *_ = results("mnist")
    twin = fxq.simulate(qmodel)
    step = qmodel.get_submodule("dequantize").scale.item()
    agree = worst = 0
    images = test.images[:2000]
    with torch.no_grad():
        for batch in images.split(500):
            a, b = qmodel(batch), twin(batch)
            worst = max(worst, ((a - b).abs() / step).max().item())
            agree += (a.argmax(1) == b.argmax(1)).sum().item()
    assert worst <= 1.0
    assert agree / len(images) >= 0.999


def test_explain_formula_matches_the_real_resnet18_exactly():
    _, qmodel, test, *_ = results("mnist")
    for layer in ("conv1", "layer1.0.conv1", "layer4.1.conv2", "fc"):
        check = fxq.explain(qmodel, layer, test.images[:16]).check
        assert check.mismatches == 0 and check.elements > 0


def test_recursive_formula_unrolls_the_first_two_layers():
    """I_q → conv1 → ReLU → layer1.0.conv1 by the documented formulas, in plain int64."""
    from fxq.integers.reference import reference_output

    _, qmodel, test, *_ = results("mnist")
    x = test.images[:8]
    i_q = qmodel.get_submodule("quantize_x").qparams.quantize(x)
    conv1, conv2 = qmodel.get_submodule("conv1"), qmodel.get_submodule("layer1.0.conv1")
    o1 = reference_output(conv1, i_q)
    r1 = torch.maximum(o1, torch.tensor(int(conv1.output_zero_point)))
    o2 = reference_output(conv2, r1.to(torch.uint8))
    captured = {}

    class Capture(torch.fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n.target == "layer1.0.conv1":
                captured["o2"] = result
            return result

    with torch.no_grad():
        Capture(qmodel).run(x)
    assert torch.equal(o2, captured["o2"].to(torch.int64))
