"""passes.reconstruct: learned rounding and output ranges, a choice of integers and steps only."""
import pytest
import torch

import fxq
from fxq.graphs import records
from fxq.integers.affine import ActQParams
from fxq.integers.learned import LearnedRange, LearnedRounding
from fxq.ops.qlayer import QLayer
from passes.reconstruct import Reconstruction
from tests.helpers import Chain, assert_deploys_bit_exact


def test_learned_rounding_starts_at_the_float_weight_and_ends_on_floor_or_ceiling():
    torch.manual_seed(0)
    weight = torch.randn(6, 3, 3, 3)
    scales = weight.abs().flatten(1).amax(1).double() / 7
    rounding = LearnedRounding(weight, scales, 4)
    assert torch.allclose(rounding.soft()[0], weight, atol=1e-3 * float(scales.max()))
    scaled = weight / rounding.scales
    q = rounding.integers().float()
    assert torch.all((q == torch.floor(scaled)) | (q == torch.ceil(scaled)))
    chosen = torch.where(torch.rand(weight.shape) < 0.5, torch.floor(scaled), torch.ceil(scaled)).clamp(-7, 7)
    rounding.set_integers(chosen.to(torch.int8))
    assert torch.equal(rounding.integers().float(), chosen)
    assert torch.equal(rounding.weight(), rounding.scales * chosen)
    assert float(rounding.soft(2.0)[1].detach()) > 0
    rounding.v.data *= 20  # h(V) reaches exactly 0 or 1: nothing left to penalize
    assert float(rounding.soft(2.0)[1].detach()) == 0 and torch.equal(rounding.integers().float(), chosen)


@pytest.mark.parametrize("beta", [None, 2.0, 7.5])
def test_soft_rounding_gradients_are_autograds_of_its_formula(beta):
    torch.manual_seed(0)
    weight = torch.randn(5, 4, 3)
    rounding = LearnedRounding(weight, weight.abs().flatten(1).amax(1).double() / 3, 3)
    rounding.v.data = torch.randn(weight.shape) * 3  # some h clamped at 0 or 1, some q at ±qmax
    rounding.floor[0, 0] = 3
    rounding.floor[1, 0] = -4
    upstream = torch.randn(weight.shape)
    v = rounding.v.detach().clone().requires_grad_(True)
    h = (torch.sigmoid(v) * 1.2 - 0.1).clamp(0, 1)
    expected_weight = rounding.scales * (rounding.floor + h).clamp(-3, 3)
    expected_penalty = (1 - (2 * h - 1).abs().pow(beta)).sum() if beta else torch.zeros(())
    ((expected_weight * upstream).sum() + 0.3 * expected_penalty).backward()
    weight_out, penalty = rounding.soft(beta)
    ((weight_out * upstream).sum() + 0.3 * penalty).backward()
    assert torch.allclose(weight_out, expected_weight) and torch.allclose(penalty, expected_penalty)
    assert torch.allclose(rounding.v.grad, v.grad, atol=1e-6) and (v.grad == 0).any() and (v.grad != 0).any()


def test_learned_range_snaps_to_its_grid_and_passes_gradients_to_its_step():
    qp = ActQParams(0.1, 3, 4)
    fake = LearnedRange(qp)
    x = torch.linspace(-1, 2, 101)
    assert torch.allclose(fake(x), (torch.round(x / 0.1) + 3).clamp(0, 15).sub(3) * 0.1, atol=1e-6)
    fake.log_scale.requires_grad_(True)
    fake(x).pow(2).sum().backward()
    assert fake.log_scale.grad is not None and fake.log_scale.grad != 0
    fake.enabled = False
    assert torch.equal(fake(x), x)


LEARNING = fxq.QConfig(weight_bits=4, act_bits=4, reconstruct_iterations=60)  # learning by default


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 16, 16, generator=g) for _ in range(4)], torch.randn(64, 3, 16, 16, generator=g)


def test_learning_brings_4_bit_networks_closer_to_float_on_held_out_inputs():
    ratios = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = Chain(seed).eval()
        calib, x = _data(seed + 1)
        with torch.no_grad():
            reference = model(x)
            error = [float((fxq.quantize(model, calib, fxq.QConfig(weight_bits=4, act_bits=4, reconstruct=learn,
                                                                   keep_first_last_8bit=False))(x)
                            - reference).pow(2).mean()) for learn in (False, True)]
        ratios.append(error[1] / error[0])
    assert max(ratios) < 1 and sum(ratios) / 3 < 0.93, ratios


def test_each_learned_layer_records_what_it_changed_and_explain_shows_it():
    torch.manual_seed(0)
    model = Chain().eval()
    calib, x = _data()
    qmodel = fxq.quantize(model, calib, LEARNING)
    learned = {n.target: records.get(n, Reconstruction) for n in qmodel.graph.nodes
               if records.get(n, Reconstruction) is not None}
    assert set(learned) == {"conv1", "conv2", "conv3"}  # the first and last, kept at 8 bits, learn too
    for r in learned.values():
        assert r.error_after <= r.error_before and 0 <= r.flipped <= r.weights
    assert any(r.flipped > 0 for r in learned.values())
    text = str(fxq.explain(qmodel))
    assert "weights rounded away from nearest" in text and "conv2" in text.split("Learned rounding")[1]
    assert all(isinstance(qmodel.get_submodule(name), QLayer) for name in learned)


def test_a_learned_model_deploys_bit_exact_and_the_float_model_is_untouched():
    torch.manual_seed(0)
    model = Chain().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib, x = _data()
    qmodel = fxq.quantize(model, calib, LEARNING)
    assert_deploys_bit_exact(qmodel, x[:8])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_learning_is_one_field_away_and_checked():
    assert not fxq.QConfig().reconstruct  # on by default below 8 bits only
    assert all(fxq.QConfig(weight_bits=w, act_bits=a).reconstruct for w, a in ((4, 8), (8, 6), (3, 3)))
    assert not fxq.QConfig(weight_bits=4).with_bits(weight_bits=8).reconstruct
    config = fxq.QConfig(weight_bits=4, reconstruct=False)
    assert not config.reconstruct and not config.with_bits(weight_bits=3).reconstruct
    assert fxq.QConfig(reconstruct=True).reconstruct
    for field in ("reconstruct_iterations", "reconstruct_batch", "reconstruct_samples"):
        with pytest.raises(ValueError, match=field):
            fxq.QConfig(**{field: 0})
