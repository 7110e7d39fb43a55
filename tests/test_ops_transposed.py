"""Transposed convolutions as zero insertion and a convolution: the same float function, an int8
conv on integers with a following batch norm folded in, bit-exact when deployed."""
import warnings

import pytest
import torch
from torch import nn

import fxq
from fxq.graphs import records
from fxq.graphs.graph import module_name
from fxq.ops import KEPT_BY_OVERRIDES
from fxq.ops.transposed import QInsertZeros, insert_zeros
from passes.rewrite_layers import rewrite_layers
from passes.trace import trace
from tests.helpers import images, quantize_whole

GEOMETRIES = [dict(kernel_size=2, stride=2), dict(kernel_size=3, stride=2, padding=1, output_padding=1),
              dict(kernel_size=4, stride=2, padding=1, groups=2), dict(kernel_size=3, stride=(2, 1), dilation=2),
              dict(kernel_size=3, padding=1, bias=False)]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_a_transposed_conv_is_zero_insertion_and_a_conv_computing_the_same(geometry):
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(8, 4, **geometry).eval()
    x = torch.randn(2, 8, 5, 6)
    gm = rewrite_layers(trace(layer, fxq.PassContext(fxq.QConfig(), [x])), None)
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in gm.modules())
    torch.testing.assert_close(gm(x), layer(x), rtol=0, atol=1e-5)


def test_a_1d_transposed_conv_is_the_k_by_1_case():
    torch.manual_seed(0)
    layer = nn.ConvTranspose1d(8, 4, 3, stride=2, padding=1, output_padding=1).eval()
    x = torch.randn(2, 8, 7)
    gm = rewrite_layers(trace(layer, fxq.PassContext(fxq.QConfig(), [x])), None)
    torch.testing.assert_close(gm(x), layer(x), rtol=0, atol=1e-5)


def test_insert_zeros_spreads_the_values_and_fills_between():
    x = torch.arange(1, 7, dtype=torch.uint8).reshape(1, 1, 2, 3)
    assert insert_zeros(x, (2, 3), fill=9).tolist() == [[[[1, 9, 9, 2, 9, 9, 3], [9] * 7, [4, 9, 9, 5, 9, 9, 6]]]]


class Decoder(nn.Module):
    """A UNet's up path: a transposed conv, batch norm, ReLU, and a 1-d one on the flattened maps."""

    def __init__(self, geometry: dict):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up, self.bn = nn.ConvTranspose2d(8, 4, **geometry), nn.BatchNorm2d(4)
        self.line = nn.ConvTranspose1d(4, 4, 3, stride=2, padding=1)

    def forward(self, x):
        y = torch.relu(self.bn(self.up(torch.relu(self.down(x)))))
        return y, self.line(y.flatten(2))


@pytest.mark.parametrize("geometry", GEOMETRIES[:3], ids=str)
def test_a_decoder_runs_on_integers_with_its_batch_norm_folded_and_deploys_bit_exact(geometry, tmp_path):
    torch.manual_seed(0)
    model = Decoder(geometry).eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    calibration, x = images(16)
    qmodel = quantize_whole(model, calibration, x, tmp_path, min_sqnr=20.0)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qmodel.modules())
    assert len([m for m in qmodel.modules() if isinstance(m, QInsertZeros)]) == 2


def test_overrides_keep_the_transposed_conv_as_the_user_wrote_it():
    torch.manual_seed(0)
    calibration, _ = images(16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FloatFallbackWarning)
        qmodel = fxq.quantize(Decoder(GEOMETRIES[0]).eval(), calibration, overrides={"up": None})
    kept = [n for n in qmodel.graph.nodes if records.get(n, records.FloatOp) == records.FloatOp(KEPT_BY_OVERRIDES)]
    assert [module_name(n) for n in kept] == ["up"]
    assert type(qmodel.get_submodule(kept[0].target)) is nn.ConvTranspose2d
