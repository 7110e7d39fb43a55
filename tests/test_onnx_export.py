"""fxq.export_onnx / fxq.deploy: every op kind exports, onnx.checker accepts the graph, onnxruntime
runs it at any batch size; table, clamp and pooling ops compute exactly what fxq computes; int8
convs and adds differ from fxq's fixed-point requantization by at most a step or two, and with
QConfig(requantize="onnxruntime") every output is bit-exact (the adds' arithmetic is checked
against onnxruntime's QLinearAdd for every input pair: its x86 AVX2 kernel)."""
import io
import pickle

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxq
from fxq.deployment import onnx_export, saturation
from tests.helpers import Residual, randomize_bn
from tests.test_ops_activations import Activations, Scaled
from tests.test_ops_joins import Branches
from tests.test_ops_layers import Grouped
from tests.test_ops_pooling import Pools


def _steps(qmodel, deployed, x) -> torch.Tensor:
    """Per output element, how many output steps the deployed model is from fxq's executor."""
    step = qmodel.get_submodule("dequantize").scale.item()
    with torch.no_grad():
        return ((deployed(x) - qmodel(x)).abs() / step).round()


class Exact(nn.Module):
    """Only ops onnxruntime runs on fxq's own integers: tables, clamps, pools, joins, reshapes."""

    def forward(self, x):
        a = F.hardswish(x) * 0.5
        b = F.relu6(x).clamp(max=4.0)
        joined = torch.cat([a, b], 1) + torch.sigmoid(torch.cat([b, a], 1))
        pooled = F.avg_pool2d(F.max_pool2d(joined, 2, ceil_mode=True), 3, 1, 1, count_include_pad=False)
        gated = pooled * torch.sigmoid(pooled.mean((2, 3), keepdim=True))
        return F.adaptive_avg_pool2d(gated, (3, 2)).flatten(1)


def test_table_clamp_pool_and_join_ops_export_exactly():
    model = Exact().eval()
    qmodel = fxq.quantize(model, [torch.randn(8, 3, 9, 9) for _ in range(4)])
    deployed = fxq.deploy(qmodel, threads=1)
    for batch in (1, 7):  # a dynamic batch dimension
        assert _steps(qmodel, deployed, torch.randn(batch, 3, 9, 9)).max() == 0


MODELS = {
    "residual": (lambda: randomize_bn(Residual()), (3, 8, 8)),
    "activations": (Activations, (3, 8, 8)),
    "constant tables": (Scaled, (3, 8, 8)),
    "branches and shape ops": (Branches, (3, 8, 8)),
    "grouped and depthwise": (Grouped, (3, 12, 12)),
    "pools": (Pools, (3, 12, 12)),
}


@pytest.mark.parametrize("name", MODELS)
def test_every_op_kind_exports_and_runs_in_onnxruntime(name, tmp_path):
    make, shape = MODELS[name]
    model = make().eval()
    qmodel = fxq.quantize(model, [torch.randn(8, *shape) for _ in range(4)])
    fxq.export_onnx(qmodel, tmp_path / "model.onnx")
    onnx.checker.check_model(onnx.load(tmp_path / "model.onnx"))
    deployed = fxq.deploy(qmodel, torch.randn(1, *shape), threads=1)
    x = torch.randn(64, *shape)
    steps = _steps(qmodel, deployed, x)
    assert steps.float().mean() < 0.25 and steps.max() <= 8, (steps.float().mean(), steps.max())
    with torch.no_grad():
        assert (deployed(x).argmax(1) == qmodel(x).argmax(1)).float().mean() >= 0.9
    assert torch.equal(pickle.loads(pickle.dumps(deployed))(x), deployed(x))


def test_a_saved_model_deploys_too(tmp_path):
    qmodel = fxq.quantize(randomize_bn(Residual()).eval(), [torch.randn(8, 3, 8, 8) for _ in range(4)])
    fxq.save(qmodel, tmp_path / "m.fxq")
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(fxq.deploy(fxq.load(tmp_path / "m.fxq"))(x), fxq.deploy(qmodel)(x))


RUNTIME = fxq.QConfig(requantize="onnxruntime")


@pytest.mark.parametrize("name", MODELS)
def test_with_onnxruntime_requantization_deploy_is_bit_exact(name):
    make, shape = MODELS[name]
    qmodel = fxq.quantize(make().eval(), [torch.randn(8, *shape) for _ in range(4)], config=RUNTIME)
    deployed = fxq.deploy(qmodel, threads=1)
    x = torch.randn(64, *shape) * 1.5  # beyond the calibrated ranges too: saturation agrees
    with torch.no_grad():
        assert torch.equal(deployed(x), qmodel(x))
    assert deployed.bit_exact and "bit-exact" in repr(deployed)


def test_a_fixed_point_model_deploys_and_says_it_is_not_bit_exact():
    qmodel = fxq.quantize(randomize_bn(Residual()).eval(), [torch.randn(8, 3, 8, 8) for _ in range(4)],
                          fxq.QConfig(requantize="fixed_point"))
    deployed = fxq.deploy(qmodel, threads=1)
    assert not deployed.bit_exact and "requantize='onnxruntime'" in repr(deployed)


@pytest.mark.parametrize("bits", [(8, 8), (4, 8), (6, 6)])
def test_a_model_quantized_with_the_defaults_deploys_bit_exact(bits):
    """No one has to know about requantize: up to 8-bit activations the default is onnxruntime's arithmetic."""
    config = fxq.QConfig(weight_bits=bits[0], act_bits=bits[1])
    assert config.requantize == "onnxruntime" and fxq.QConfig(act_bits=16).requantize == "fixed_point"
    qmodel = fxq.quantize(randomize_bn(Residual()).eval(), [torch.randn(8, 3, 8, 8) for _ in range(4)], config)
    deployed = fxq.deploy(qmodel, threads=1)
    x = torch.randn(64, 3, 8, 8) * 1.5
    with torch.no_grad():
        assert torch.equal(deployed(x), qmodel(x))
    assert deployed.bit_exact


@pytest.mark.parametrize("bits", [(8, 4), (4, 6), (3, 2)])
def test_narrow_widths_deploy_bit_exact_in_uint8_containers(bits):
    config = fxq.QConfig(weight_bits=bits[0], act_bits=bits[1], requantize="onnxruntime",
                         keep_first_last_8bit=False)
    qmodel = fxq.quantize(randomize_bn(Residual()).eval(), [torch.randn(8, 3, 8, 8) for _ in range(4)], config=config)
    model = onnx.load_from_string(_exported(qmodel))
    assert "Min" in {n.op_type for n in model.graph.node}  # each narrow value saturates at 2^b − 1
    x = torch.randn(32, 3, 8, 8) * 2
    with torch.no_grad():
        assert torch.equal(fxq.deploy(qmodel, threads=1)(x), qmodel(x))


def _exported(qmodel, weights: str = "auto") -> bytes:
    buffer = io.BytesIO()
    fxq.export_onnx(qmodel, buffer, weights)
    return buffer.getvalue()


def test_onnxruntime_requantization_survives_save_and_load(tmp_path):
    qmodel = fxq.quantize(randomize_bn(Residual()).eval(), [torch.randn(8, 3, 8, 8) for _ in range(4)], config=RUNTIME)
    fxq.save(qmodel, tmp_path / "m.fxq")
    loaded = fxq.load(tmp_path / "m.fxq")
    x = torch.randn(16, 3, 8, 8) * 2
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x)) and torch.equal(fxq.deploy(loaded, threads=1)(x), loaded(x))
    assert "onnxruntime" in fxq.explain(loaded).to_markdown()


def test_sixteen_bit_activations_cannot_take_onnxruntime_requantization():
    with pytest.raises(ValueError, match="act_bits ≤ 8"):
        fxq.QConfig(act_bits=16, requantize="onnxruntime")


def _qlinear_session(op: str, scales, zero_points, shapes=((65536,), (65536,))):
    """onnxruntime's own ``op`` ("Add" or "Mul") of two uint8 tensors (DequantizeLinear ×2 → op →
    QuantizeLinear, which it fuses into QLinearAdd / QLinearMul)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    constants = [numpy_helper.from_array(np.array(v, dtype=t), n) for n, v, t in
                 [("sa", scales[0], np.float32), ("sb", scales[1], np.float32), ("so", scales[2], np.float32),
                  ("za", zero_points[0], np.uint8), ("zb", zero_points[1], np.uint8), ("zo", zero_points[2], np.uint8)]]
    nodes = [helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["af"]),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bf"]),
             helper.make_node(op, ["af", "bf"], ["of"]),
             helper.make_node("QuantizeLinear", ["of", "so", "zo"], ["o"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.UINT8, list(shape)) for n, shape in zip("ab", shapes)]
    graph = helper.make_graph(nodes, op, inputs, [helper.make_tensor_value_info("o", TensorProto.UINT8, None)],
                              constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_runtime_add_is_onnxruntimes_qlinear_add_for_every_input_pair():
    from fxq.integers import intmath
    a, b = torch.meshgrid(torch.arange(256, dtype=torch.uint8), torch.arange(256, dtype=torch.uint8), indexing="ij")
    a, b = a.flatten(), b.flatten()
    for _ in range(30):
        scales = tuple(float(torch.empty(1).uniform_(-6, 0).exp().float()) for _ in range(3))
        zero_points = tuple(int(z) for z in torch.randint(0, 256, (3,)))
        ours = intmath.runtime_add(a, b, scales, zero_points, 255)
        theirs = _qlinear_session("Add", scales, zero_points).run(None, {"a": a.numpy(), "b": b.numpy()})[0]
        assert torch.equal(ours, torch.from_numpy(theirs)), (scales, zero_points)


def _weight_dtypes(qmodel, weights: str) -> set:
    model = onnx.load_from_string(_exported(qmodel, weights))
    names = {i for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].count("_weight_")
             for i in n.input[:1]}
    return {onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name for t in model.graph.initializer if t.name in names}


@pytest.mark.parametrize("weights", ["exact", "u8u8", "u8s8", "auto"])
def test_every_weight_format_deploys_bit_exact_where_it_says_so(weights):
    """U8U8 and "exact" on every CPU; U8S8 only where this machine's onnxruntime does not saturate."""
    qmodel = fxq.quantize(randomize_bn(Residual()).eval(), [torch.randn(8, 3, 8, 8) for _ in range(4)], config=RUNTIME)
    deployed = fxq.deploy(qmodel, threads=1, weights=weights)
    x = torch.randn(64, 3, 8, 8) * 2
    exact = weights != "u8s8" or not saturation.runtime_saturates()
    assert deployed.bit_exact == exact
    if exact:
        with torch.no_grad():
            assert torch.equal(deployed(x), qmodel(x))


def test_u8u8_weights_travel_as_uint8_with_zero_point_128_and_exact_picks_per_layer():
    config = RUNTIME.replace(pair_safe=True, keep_first_last_8bit=True, weight_bits=8)
    qmodel = fxq.quantize(randomize_bn(Residual()).eval(), [torch.randn(8, 3, 8, 8) for _ in range(4)], config=config)
    assert _weight_dtypes(qmodel, "u8u8") == {"uint8"} and _weight_dtypes(qmodel, "u8s8") == {"int8"}
    formats = onnx_export.weight_formats(qmodel, "exact")
    bounds = onnx_export.layer_bounds(qmodel)
    assert all(bounds[n][1] <= 63 for n in formats)  # pair_safe: 7-bit weights beside 8-bit inputs
    assert set(formats.values()) == {saturation.WeightFormat.U8S8}


def test_deploy_never_claims_bit_exact_on_a_format_that_saturates_here(monkeypatch):
    """On a CPU whose U8S8 kernels saturate (no VNNI), "auto" takes U8U8 for every layer that
    could pass 32767 in a pair, and forcing U8S8 there is reported as not exact."""
    monkeypatch.setattr(saturation, "runtime_saturates", lambda runtime="onnxruntime": True)
    qmodel = fxq.quantize(randomize_bn(Residual()).eval(), [torch.randn(8, 3, 8, 8) for _ in range(4)], config=RUNTIME)
    forced = fxq.deploy(qmodel, threads=1, weights="u8s8")
    assert not forced.bit_exact and forced.saturating and "NOT exact" in repr(forced)
    auto = fxq.deploy(qmodel, threads=1)
    assert auto.bit_exact and auto.weight_format == "u8u8"
    x = torch.randn(32, 3, 8, 8) * 2
    with torch.no_grad():
        assert torch.equal(auto(x), qmodel(x))
    safe = fxq.quantize(randomize_bn(Residual()).eval(), [torch.randn(8, 3, 8, 8) for _ in range(4)],
                        config=RUNTIME.replace(pair_safe=True))
    fast = fxq.deploy(safe, threads=1)
    assert fast.bit_exact and fast.weight_format == "u8s8"


def test_a_layer_is_pair_safe_exactly_when_no_two_products_can_pass_32767():
    assert saturation.pair_safe(255, 64) and not saturation.pair_safe(255, 65)
    assert saturation.pair_safe(127, 127) and not saturation.pair_safe(130, 127)
    with pytest.raises(ValueError, match="auto.*exact.*u8s8.*u8u8"):
        saturation.layer_formats({"fc": (255, 127)}, "int8")


@pytest.mark.parametrize("broadcast", [False, True], ids=["elementwise", "gate-broadcast"])
def test_runtime_mul_is_onnxruntimes_qlinear_mul_for_every_input_pair(broadcast):
    """Every pair, elementwise and as a squeeze-excite gate broadcasts ([256, 1] against [256, 256])."""
    from fxq.integers import intmath
    a, b = torch.meshgrid(torch.arange(256, dtype=torch.uint8), torch.arange(256, dtype=torch.uint8), indexing="ij")
    gate = torch.arange(256, dtype=torch.uint8)[:, None]
    a, b = (a.flatten(), b.flatten()) if not broadcast else (b.contiguous(), gate)
    for _ in range(30):
        scales = tuple(float(torch.empty(1).uniform_(-6, 1).exp().float()) for _ in range(3))
        zero_points = tuple(int(z) for z in torch.randint(0, 256, (3,)))
        ours = intmath.runtime_mul(a, b, scales, zero_points, 255)
        session = _qlinear_session("Mul", scales, zero_points, (a.shape, b.shape))
        theirs = session.run(None, {"a": a.numpy(), "b": b.numpy()})[0]
        assert torch.equal(ours, torch.from_numpy(theirs)), (scales, zero_points)


class SqueezeExcite(nn.Module):
    """MobileNetV3's gate: x · hardsigmoid(conv(relu(conv(mean(x))))), broadcast over H and W."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.squeeze, self.excite = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)

    def forward(self, x):
        y = self.conv(x)
        gate = nn.functional.hardsigmoid(self.excite(torch.relu(self.squeeze(y.mean((2, 3), keepdim=True)))))
        return y * gate


@pytest.mark.parametrize("requantize", ["onnxruntime", "fixed_point"])
def test_a_product_deploys_as_onnxruntimes_qlinear_mul_in_its_arithmetic_and_saves(requantize, tmp_path):
    """onnxruntime's arithmetic: the product is DequantizeLinear ×2 → Mul → QuantizeLinear (its QLinearMul
    kernel), bit-exact; fixed point keeps the table of every pair (a Gather). Either survives save and load."""
    calibration = [torch.randn(8, 3, 8, 8) for _ in range(4)]
    qmodel = fxq.quantize(randomize_bn(SqueezeExcite()).eval(), calibration, fxq.QConfig(requantize=requantize))
    fxq.save(qmodel, tmp_path / "se.fxq")
    loaded = fxq.load(tmp_path / "se.fxq")
    x = torch.randn(64, 3, 8, 8) * 1.5
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
    for model in (qmodel, loaded):
        deployed = fxq.deploy(model, threads=1)
        ops = [n.op_type for n in onnx.load_from_string(deployed.model_bytes).graph.node]
        assert ("Mul" in ops and "Gather" not in ops) if requantize == "onnxruntime" else "Gather" in ops
        if requantize == "onnxruntime":
            with torch.no_grad():
                assert deployed.bit_exact and torch.equal(deployed(x), qmodel(x))


def test_a_product_saved_before_the_choice_of_arithmetic_loads_as_fixed_point():
    """Files written before QMul recorded its arithmetic hold no `requantize_as` and no scales."""
    from fxq.files import serialize
    from fxq.integers.affine import ActQParams
    from fxq.ops.joins import QMul
    product = QMul(ActQParams(0.05, 10, 8), ActQParams(0.02, 0, 8), ActQParams(0.01, 3, 8), "mul")
    record = serialize._module_record("mul", product)
    del record["attributes"]["requantize_as"]
    loaded = serialize._module_from("mul", record)
    a, b = torch.randint(0, 256, (2, 1000), dtype=torch.uint8)
    assert loaded.requantize_as is fxq.config.Rounding.FIXED_POINT and torch.equal(loaded(a, b), product(a, b))
