"""16-bit activations: int32 storage, an int64 accumulator where int32 cannot hold the worst case."""
import torch
from torch import nn

import fxq
from fxq.integers import intmath
from fxq.ops.layers import QLinear
from tests.helpers import Chain, Residual, output_steps, randomize_bn


class Wide(nn.Module):
    """A linear layer with K = 2048: 16-bit inputs × 8-bit weights overflow int32 in the worst case."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(2048, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_worst_case_beyond_int32_gets_an_int64_accumulator_and_stays_exact():
    torch.manual_seed(0)
    model = Wide().eval()
    qmodel = fxq.quantize(model, [torch.randn(32, 2048)], fxq.QConfig(act_bits=16))
    fc1 = qmodel.get_submodule("fc1")
    assert fc1.accumulator_bound > intmath.INT32_MAX and fc1.accumulator_bits == 64
    x_q = qmodel.get_submodule("quantize_x")(torch.randn(8, 2048) * 3)
    assert x_q.dtype == torch.int32 and int(x_q.max()) > 255
    acc = fc1.accumulator(x_q)[0]
    reference = ((x_q.to(torch.int64) - int(fc1.input_zero_point)) @ fc1.weight.to(torch.int64).T
                 + fc1.bias.to(torch.int64))
    assert torch.equal(acc, reference)
    assert fc1.multiplier.max() < 2 ** intmath.multiplier_precision(fc1.accumulator_bound)
    assert qmodel.get_submodule("fc2").accumulator_bits == 32


def test_16_bit_activations_are_closer_to_float_than_8_bit():
    model = randomize_bn(Residual())
    torch.manual_seed(0)
    calib = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        reference = model(x)
        error = {bits: float((fxq.quantize(model, calib, fxq.QConfig(weight_bits=8, act_bits=bits))(x)
                              - reference).pow(2).mean()) for bits in (4, 8, 16)}
    assert error[16] <= error[8] < error[4]


def test_16_bit_graph_runs_every_op_and_matches_its_simulation_bit_for_bit():
    model = Chain().eval()
    calib = [torch.randn(8, 3, 16, 16)]
    for placement in ("pre", "both"):
        qmodel = fxq.quantize(model, calib, fxq.QConfig(act_bits=16, placement=placement))
        integer, simulated = output_steps(qmodel, fxq.simulate(qmodel), torch.randn(64, 3, 16, 16))
        assert torch.equal(integer, simulated)
    residual = fxq.quantize(randomize_bn(Residual()), [torch.randn(4, 3, 8, 8)], fxq.QConfig(act_bits=16))
    assert residual.get_submodule("add").table is None  # 2^32 pairs: computed, not tabulated
    assert isinstance(residual.get_submodule("fc"), QLinear)
