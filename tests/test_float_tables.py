"""Lookup tables that onnxruntime runs as their function's float ops (`fxq.deployment.float_tables`): only
where its answer is the table on every input integer, so the deployed model stays bit-exact."""
import io

import onnx
import pytest
import torch
from torch import nn

import fxq
from fxq.deployment import float_tables
from fxq.ops.lookup import QLookup

pytest.importorskip("onnxruntime")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Hardswish(), nn.Conv2d(8, 8, 1), nn.Hardsigmoid(),
                         nn.Conv2d(8, 8, 1), nn.SiLU(), nn.Conv2d(8, 8, 1), nn.GELU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 4)).eval()


def _quantized(**fields):
    torch.manual_seed(1)
    calibration = [torch.randn(8, 3, 8, 8) * 2 for _ in range(4)]
    return fxq.quantize(_model(), calibration, fxq.QConfig(requantize="onnxruntime", **fields))


def _ops(deployed) -> list[str]:
    return [n.op_type for n in onnx.load_from_string(deployed.model_bytes).graph.node]


@pytest.mark.parametrize("fields", [{}, {"act_bits": 6}])
def test_tables_with_a_float_form_deploy_as_float_ops_where_exact_and_stay_bit_exact(fields):
    """Hardswish and Hardsigmoid in IEEE-rounded ops: exact wherever the tables' float64 values are not
    within float32's rounding of a boundary. SiLU and Sigmoid through the runtime's own Sigmoid kernel:
    exact here, checked on each machine. GELU has no float form (its Erf): a Gather."""
    qmodel = _quantized(**fields)
    deployed = fxq.deploy(qmodel)
    # which tables pass depends on the CPU's kernels (all three, here and under QEMU's AVX2-only Haswell);
    # none passing would be a broken check, not a CPU
    assert set(deployed.float_tables) <= {"1", "3", "5"} and deployed.float_tables and deployed.bit_exact
    assert _ops(deployed).count("Gather") == 4 - len(deployed.float_tables)
    assert _ops(deployed).count("Div") == len({"1", "3"} & set(deployed.float_tables))
    x = torch.randn(256, 3, 8, 8) * 3  # past the calibrated range too: every integer of the tables
    assert torch.equal(deployed(x), qmodel(x))


def test_a_table_its_float_ops_miss_by_one_integer_stays_a_gather():
    qmodel = _quantized()
    table = qmodel.get_submodule("1")
    table.table[100] += 1  # what a float32 rounding on the other side of a boundary would give
    table.prepare()
    deployed = fxq.deploy(qmodel)
    assert "1" not in deployed.float_tables and deployed.bit_exact
    x = torch.randn(256, 3, 8, 8) * 3
    assert torch.equal(deployed(x), qmodel(x))


def test_a_loaded_model_deploys_its_tables_as_float_ops_too(tmp_path):
    qmodel = _quantized()
    fxq.save(qmodel, tmp_path / "m.fxq")
    loaded = fxq.load(tmp_path / "m.fxq")
    assert fxq.deploy(loaded).float_tables == fxq.deploy(qmodel).float_tables
    assert [name for name, m in loaded.named_modules() if isinstance(m, QLookup) and m.float_form()] == ["1", "3", "5"]


def test_export_writes_gathers_unless_told_which_tables_are_exact():
    qmodel = _quantized()
    buffer = io.BytesIO()
    fxq.export_onnx(qmodel, buffer)
    assert [n.op_type for n in onnx.load_from_string(buffer.getvalue()).graph.node].count("Gather") == 4
    assert set(float_tables.candidates(qmodel)) == {"1", "3", "5"}
