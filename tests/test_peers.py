"""The reference peers scripts/ measure fxq against compute what they claim to."""
import copy

import torch
from torch import nn

from scripts.evaluate import torch_ao_fake_quant


def _sqnr(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).mean() / (reference - approximation).pow(2).mean()))


def test_torch_ao_fake_quant_quantizes_at_the_width_asked_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    calib = [(torch.randn(16, 1, 8, 8), torch.zeros(16, dtype=torch.long)) for _ in range(2)]
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        reference = model(x)
        eight, three = (torch_ao_fake_quant(model, calib, bits, bits)(x) for bits in (8, 3))
    assert _sqnr(reference, eight) > 20, _sqnr(reference, eight)
    assert _sqnr(reference, three) < _sqnr(reference, eight) - 10, (_sqnr(reference, three), _sqnr(reference, eight))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
