"""A module called at several places: every call site is its own integer op with its own
activation parameters, and the sites share one set of integer weights."""
import torch
from torch import nn

import fxq
from fxq.analysis.comparison import sqnr_db
from fxq.ops.layers import QConv2d
from fxq.ops.pooling import QAvgPool2d
from tests.helpers import output_steps


class Reused(nn.Module):
    """One conv applied three times to inputs of very different ranges, one pool twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.widen = nn.Conv2d(3, 3, 1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(3 * 2 * 2, 4)
        with torch.no_grad():
            self.widen.weight.mul_(30)  # the second site's input is ~30× the first's

    def forward(self, x):
        a = self.conv(x)
        b = self.conv(self.widen(a))
        c = self.conv(self.pool(b))
        return self.fc(torch.flatten(self.pool(c), 1))


def test_each_call_site_has_its_own_parameters_and_the_model_stays_accurate():
    model = Reused().eval()
    calib = [torch.randn(8, 3, 8, 8) for _ in range(4)]
    qmodel = fxq.quantize(model, calib)
    sites = [n for n in qmodel.graph.nodes
             if n.op == "call_module" and isinstance(qmodel.get_submodule(n.target), QConv2d)
             and n.target.startswith("conv")]
    assert [n.target for n in sites] == ["conv", "conv_1", "conv_2"]
    scales = [float(qmodel.get_submodule(n.target).output_scale) for n in sites]
    assert max(scales) > 5 * min(scales)  # the last call's parameters are no longer everyone's
    pools = [m for m in qmodel.modules() if isinstance(m, QAvgPool2d)]
    assert len(pools) == 2
    x = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        assert sqnr_db(model(x), qmodel(x)) > 25  # one qparams set for all sites: about 0 dB


def test_sites_share_their_integer_weights_and_match_the_twin():
    qmodel = fxq.quantize(Reused().eval(), [torch.randn(8, 3, 8, 8) for _ in range(4)])
    weights = {id(qmodel.get_submodule(name).weight) for name in ("conv", "conv_1", "conv_2")}
    assert len(weights) == 1
    integer, simulated = output_steps(qmodel, fxq.simulate(qmodel), torch.randn(32, 3, 8, 8))
    assert torch.equal(integer, simulated)


def test_an_override_on_the_module_applies_at_every_site():
    qmodel = fxq.quantize(Reused().eval(), [torch.randn(8, 3, 8, 8)],
                          overrides={"conv": fxq.QConfig(weight_bits=4)})
    for name in ("conv", "conv_1", "conv_2"):
        assert qmodel.get_submodule(name).weight.abs().max() <= 7
    assert qmodel.get_submodule("widen").weight.abs().max() == 127
