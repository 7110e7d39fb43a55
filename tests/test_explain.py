"""fxq.explain: every bit-width statement checked against the executed integer tensors."""
import pytest
import torch
from torch import fx

import fxq
from fxq.analysis.explanation import IntRange, bits_of, signed_bits, unsigned_bits
from fxq.graphs import records
from passes.calibrate import KEPT_SAMPLES
from tests.helpers import Residual, randomize_bn


@pytest.fixture
def qmodel(ctx):
    # fixed point: the onnxruntime arithmetic (the default) has its own test below
    return fxq.quantize(randomize_bn(Residual()), ctx.calib_loader, fxq.QConfig(requantize="fixed_point"))


def executed(qmodel, layer, batch):
    """The layer's input, accumulator, output and ReLU output, as the graph computed them."""
    node = next(n for n in qmodel.graph.nodes if n.target == layer)
    module = qmodel.get_submodule(layer)
    seen = {}

    class Capture(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n is node:
                seen["input"] = self.env[n.args[0]]
                seen["acc"] = module.accumulator(seen["input"])[0]
                seen["output"] = result
            if n.op == "call_function" and n.args and n.args[0] is node:
                seen["relu"] = result
            return result

    with torch.no_grad():
        Capture(qmodel).run(batch)
    return seen


def fits(r: IntRange, t: torch.Tensor) -> bool:
    return r.lo <= int(t.min()) and int(t.max()) <= r.hi


def minimal(bits: int, t: torch.Tensor) -> bool:
    """``bits`` holds every value of ``t`` and ``bits − 1`` does not."""
    r = IntRange.of(t)
    narrower = bits - 1
    if r.lo >= 0:
        return r.hi <= 2**bits - 1 and (narrower == 0 or r.hi > 2**narrower - 1)
    return -(2 ** (bits - 1)) <= r.lo and r.hi <= 2 ** (bits - 1) - 1 and not (
        -(2 ** (narrower - 1)) <= r.lo and r.hi <= 2 ** (narrower - 1) - 1)


def test_bit_helpers_are_the_least_widths():
    assert unsigned_bits(255) == 8 and unsigned_bits(256) == 9 and unsigned_bits(0) == 1
    assert signed_bits(-128, 127) == 8 and signed_bits(-129, 0) == 9 and signed_bits(0, 128) == 9
    assert bits_of(IntRange(-1, 0)) == 1 and bits_of(IntRange(3, 200)) == 8


@pytest.mark.parametrize("layer", ["unit.conv", "conv2", "fc"])
def test_every_stated_width_holds_the_executed_integers_and_is_the_least(qmodel, ctx, layer):
    batch = ctx.calib_loader[1]
    explanation = fxq.explain(qmodel, layer, batch)
    actual = executed(qmodel, layer, batch)
    z_in = int(qmodel.get_submodule(layer).input_zero_point)
    tensors = {"input I_q": actual["input"], "I_q − z_I": actual["input"].to(torch.int64) - z_in,
               "weight W_q": qmodel.get_submodule(layer).weight, "bias b_q": qmodel.get_submodule(layer).bias,
               "O_q": actual["output"], "ReLU": actual.get("relu"), "acc =": actual["acc"]}
    checked = 0
    for step in explanation.steps:
        tensor = next((t for prefix, t in tensors.items() if step.what.startswith(prefix)), None)
        if tensor is None or step.observed is None:
            continue
        assert step.observed == IntRange.of(tensor), step.what        # what it says it saw
        assert fits(step.worst, tensor), step.what                     # worst case holds it
        assert minimal(step.observed_bits, tensor), step.what          # and the width is the least
        checked += 1
    assert checked >= 6
    assert explanation.check.mismatches == 0 and explanation.check.elements == actual["output"].numel()


def test_text_and_markdown_state_the_formula_with_the_layers_numbers(qmodel):
    explanation = fxq.explain(qmodel, "unit.conv")
    m = qmodel.get_submodule("unit.conv")
    text, markdown = str(explanation), explanation.to_markdown()
    formula = f"O_q = clamp({int(m.output_zero_point)} + round(M[c] · (Σ W_q·(I_q − {int(m.input_zero_point)})"
    assert formula in text and formula in markdown
    assert "ReLU: max(O_q, z_O)" in text and markdown.startswith("### `unit.conv`")
    assert "calibration samples" in text  # no batch: the samples calibration kept


def test_calibration_statistics_are_recorded_when_first_explained(qmodel, ctx):
    conv2 = next(n for n in qmodel.graph.nodes if n.target == "conv2")
    assert records.get(conv2, records.Observed) is None  # quantize does not run the data twice
    fxq.explain(qmodel)
    stats = records.get(conv2, records.Observed)
    assert stats is not None and stats.accumulator is not None
    assert stats.output.lo >= 0 and stats.output.hi <= 255
    assert records.get(qmodel, records.StatsSource) is None  # the data is let go once used
    kept = torch.cat(list(ctx.calib_loader))[:KEPT_SAMPLES]  # the first samples calibration read
    assert fxq.explain(qmodel, "conv2", batch=kept).steps[5].observed == stats.accumulator


class CountingLoader(list):
    reads = 0

    def __iter__(self):
        self.reads += 1
        return super().__iter__()


def test_explaining_never_reads_the_calibration_loader_again(ctx):
    torch.manual_seed(0)
    loader = CountingLoader(ctx.calib_loader)
    qmodel = fxq.quantize(randomize_bn(Residual()), loader)
    reads = loader.reads
    table = fxq.explain(qmodel)
    assert loader.reads == reads
    assert all(row[7] != "—" for row in table.rows if row[1] in ("QConv2d", "QLinear"))


def test_whole_network_table_has_a_row_per_integer_op_and_headroom(qmodel):
    table = fxq.explain(qmodel)
    kinds = [row[1] for row in table.rows]
    assert kinds.count("QConv2d") == 2 and kinds.count("QAdd") == 1 and kinds.count("QLinear") == 1
    for row in table.rows:
        if row[1] in ("QConv2d", "QLinear"):
            weight_bits, worst, observed, headroom = row[5:9]
            assert weight_bits == 8 and observed <= worst and headroom == 32 - worst >= 0
    assert "acc headroom" in str(table) and table.to_markdown().startswith("| op")


def test_unknown_layer_lists_the_integer_layers(qmodel):
    with pytest.raises(ValueError, match=r"'pool' is not an integer conv/linear.*'unit.conv'"):
        fxq.explain(qmodel, "pool")


@pytest.mark.parametrize("layer", ["unit.conv", "fc"])
def test_with_onnxruntime_requantization_the_explanation_states_and_checks_what_runs(ctx, layer):
    qmodel = fxq.quantize(randomize_bn(Residual()), ctx.calib_loader, fxq.QConfig(requantize="onnxruntime"))
    explanation = fxq.explain(qmodel, layer, batch=ctx.calib_loader[0])
    assert "round_half_even(float32(acc[c])" in explanation.formula
    assert explanation.check.mismatches == 0 and explanation.check.elements > 0
    assert "bit-exact" in fxq.explain(qmodel).summary
