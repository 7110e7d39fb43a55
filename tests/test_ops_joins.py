"""Differences, products, concatenations and shape ops on integer tensors."""
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

import fxq
from fxq.graphs import records
from fxq.integers.affine import ActQParams
from fxq.ops.arithmetic import QQuotient, QSub
from fxq.ops.joins import QCat, QMul
from tests.helpers import check_quantized, quantize_whole


def _exact_round(value: Fraction) -> int:
    """Half away from zero, on an exact rational."""
    magnitude = int(abs(value) + Fraction(1, 2))
    return magnitude if value >= 0 else -magnitude


def test_a_product_is_the_requantized_product_of_the_centred_integers():
    a, b, out = ActQParams(0.02, 100, 8), ActQParams(0.011, 3, 8), ActQParams(0.05, 77, 8)
    mul = QMul(a, b, out, "mul")
    qa, qb = torch.randint(0, 256, (500,)), torch.randint(0, 256, (500,))
    got = mul(qa.to(torch.uint8), qb.to(torch.uint8)).tolist()
    m, shift = int(mul.multiplier), int(mul.shift)
    for x, y, g in zip(qa.tolist(), qb.tolist(), got):
        product = Fraction((x - 100) * (y - 3) * m, 2 ** (31 - shift))
        assert g == min(max(77 + _exact_round(product), 0), 255)
    assert abs(m * 2.0 ** (shift - 31) - 0.02 * 0.011 / 0.05) < 1e-9


def test_a_difference_is_the_rescaled_difference_rounded_once():
    a, b, out = ActQParams(0.02, 100, 8), ActQParams(0.031, 3, 8), ActQParams(0.05, 140, 8)
    sub = QSub(a, b, out, "sub")
    qa, qb = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    got = sub(qa.to(torch.uint8), qb.to(torch.uint8)).to(torch.int64)
    exact = (0.02 * (qa - 100).double() - 0.031 * (qb - 3).double()) / 0.05
    # one rounding of the fixed-point rescale: off the exact value only where it sits on a half
    assert int((got - (exact.round() + 140).clamp(0, 255)).abs().max()) <= 1
    near_half = ((exact - exact.floor()) - 0.5).abs() < 1e-6
    assert torch.equal(got[~near_half], (exact.round() + 140).clamp(0, 255)[~near_half].to(torch.int64))


def test_a_quotient_is_the_quantized_quotient_and_a_zero_divisor_saturates():
    a, b, out = ActQParams(0.02, 100, 8), ActQParams(0.01, 0, 8), ActQParams(0.1, 30, 8)
    div = QQuotient(a, b, out)
    qa, qb = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    got = div(qa.to(torch.uint8), qb.to(torch.uint8)).to(torch.int64)
    real = (0.02 * (qa - 100).double()) / (0.01 * qb.double())
    assert torch.equal(got[:, 1:], out.quantize(real[:, 1:]).to(torch.int64))
    assert got[200, 0] == 255 and got[0, 0] == 0 and got[100, 0] == 30  # +x/0, −x/0, 0/0


class PoolMixer(nn.Module):
    """PoolFormer's token mixer (``pool(x) − x``) and its StarReLU (``s·relu(x)² + b``)."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)

    def forward(self, x):
        x = self.conv(x)
        mixed = x + (self.pool(x) - x)
        return self.head(0.8 * torch.relu(mixed) ** 2 - 0.4)


def test_a_pool_mixer_and_a_square_run_on_integers_and_deploy_bit_exact(tmp_path):
    torch.manual_seed(0)
    qmodel = quantize_whole(PoolMixer().eval(), [torch.randn(8, 3, 8, 8) for _ in range(4)], torch.randn(16, 3, 8, 8),
                            tmp_path)
    assert {"QSub", "QLookup"} <= {type(m).__name__ for m in qmodel.modules()}


def test_a_concatenation_moves_each_input_to_the_output_parameters():
    inputs, out = [ActQParams(0.02, 100, 8), ActQParams(0.05, 0, 8)], ActQParams(0.05, 0, 8)
    cat = QCat(inputs, out, 1)
    assert cat.identity == [False, True]  # the second input is already at the output's parameters
    a, b = (torch.randint(0, 256, (2, 3, 4), dtype=torch.uint8) for _ in range(2))
    joined = cat(a, b)
    assert torch.equal(joined[:, 3:], b)
    assert torch.equal(joined[:, :3], out.quantize((a.double() - 100) * 0.02))


class Branches(nn.Module):
    """Squeeze-and-excitation, concatenation, a channel shuffle and shape ops after convs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.left, self.right = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.squeeze, self.excite = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.fc = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        a, b = x.chunk(2, dim=1)
        x = torch.cat([F.relu(self.left(a)), self.right(b)], dim=1)
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)  # shuffle
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(F.adaptive_avg_pool2d(x, 1)))))
        x = x * gate
        x = x.permute(0, 2, 3, 1).permute(0, 3, 1, 2)
        return self.fc(x.view(x.size(0), -1))


def test_branches_joins_and_shape_ops_run_on_integers_exactly(tmp_path):
    model = Branches().eval()
    qmodel = fxq.quantize(model, [torch.randn(8, 3, 8, 8) for _ in range(4)])
    assert [n.name for n in qmodel.graph.nodes if records.has(n, records.FloatOp)] == []
    kinds = {type(m).__name__ for m in qmodel.modules()}
    assert {"QMul", "QCat", "QLookup"} <= kinds
    assert check_quantized(qmodel, model, torch.randn(32, 3, 8, 8), tmp_path) > 25


def test_a_concatenation_shares_its_parameters_with_inputs_made_for_it_unless_asked_not_to(tmp_path):
    from passes.convert import convert, convert_requantizing_joins

    torch.manual_seed(0)
    model = Branches().eval()
    calib = [torch.randn(8, 3, 8, 8) for _ in range(4)]
    requantizing = [convert_requantizing_joins if p is convert else p for p in fxq.PASSES]
    for passes, shared in ((None, True), (requantizing, False)):
        qmodel = fxq.quantize(model, calib, passes=passes)
        (cat,) = [m for m in qmodel.modules() if isinstance(m, QCat)]
        # the two convs' outputs are read by the join only: shared, both arrive at its parameters;
        # otherwise the ReLU'd one (its own range [0, max]) is requantized by the join
        assert all(cat.identity) == shared
        assert check_quantized(qmodel, model, torch.randn(16, 3, 8, 8), tmp_path) > 20
